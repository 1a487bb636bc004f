"""cases.md #16, #17 and #20, the consumer-group faults, with each case's input on this design.

The pipeline never joins its consumer group: the sensor and the runs read by ``assign`` at
explicit offsets with short-lived consumers, and the group only stores the committed offsets,
moved after a run applied its batch. So there is no poll loop to outlast (#16), no join to pay
per tick (#17) and no rebalance to lose finished offsets in (#20). What each case expects of the
end state still applies and is asserted here: exactly one photo document and one eventId per
photo, no duplicate events, every offset committed, and a rerun that changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from confluent_kafka import Consumer
from dagster import instance_for_test

import snapmap_pipeline.assets.events as events_module
from snapmap_pipeline.resources.kafka import KafkaResource
from tests.integration.pipeline import Harness, groups, live_events, photo_events, publish, upload
from tests.integration.test_ingestion import committed

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.sensor]

SENSOR_TIME_LIMIT_S = 60  # Dagster's default sensor evaluation timeout


class ShortPollInterval(KafkaResource):
    """The pipeline's Kafka resource with the case's ``max.poll.interval.ms=10000`` (and a
    session timeout below it, as librdkafka requires) on every consumer it creates."""

    def consumer_config(self) -> dict:
        return super().consumer_config() | {
            "max.poll.interval.ms": 10_000,
            "session.timeout.ms": 6_000,
        }


class NeverClosesThenCrashes(KafkaResource):
    """The pipeline's Kafka resource whose consumers are never closed (each stays open, held
    here so it is not collected either), and whose first watermark read crashes the tick."""

    @contextmanager
    def consumer(self) -> Iterator[Consumer]:
        consumer = Consumer(self.consumer_config())
        LEAKED.append(consumer)
        yield consumer

    def watermarks(self, consumer, topic, partition):
        raise RuntimeError("tick 1 crashed")


LEAKED: list[Consumer] = []


def group_members(kafka: KafkaResource) -> tuple[str, int]:
    """The consumer group's state and number of members, as the broker describes it."""
    future = kafka.admin().describe_consumer_groups([kafka.consumer_group])[kafka.consumer_group]
    description = future.result(timeout=kafka.timeout_s * 2)
    return description.state, len(description.members)


def one_event_per_photo(db, photo_ids: set[str]) -> dict[str, str]:
    """Asserts one document and one live event per photo and no duplicate events; returns
    the assignment."""
    assignment = photo_events(db)
    assert set(assignment) == photo_ids
    assert db.photos.count_documents({}) == len(photo_ids)
    assert None not in assignment.values()
    events = live_events(db)
    assert set(assignment.values()) == set(events), "every live event has photos, and only those"
    assert sum(e["photoCount"] for e in events.values()) == len(photo_ids), "no double counts"
    members = [frozenset(p for p, e in assignment.items() if e == event) for event in events]
    assert len(set(members)) == len(members), "no two events with the same photos"
    return assignment


def ends(kafka: KafkaResource, topic: str) -> dict[int, int]:
    with kafka.consumer() as consumer:
        partitions = kafka.partitions(consumer, topic)
        marks = {p: kafka.watermarks(consumer, topic, p).high for p in partitions}
    return {p: high for p, high in marks.items() if high > 0}


def test_16_a_batch_slower_than_max_poll_interval_is_applied_once(
    resources, settings, kafka, mongo, monkeypatch
):
    """The batch holding ``slow-1`` takes 15 s (an injected sleep in its clustering step) with
    ``max.poll.interval.ms=10000`` on every consumer. No consumer is a group member while the
    run works, the next messages are planned and applied right after, and a redelivery of the
    slow batch changes nothing.

    Seen failing with event ids drawn at random (``clustering.engine.event_id_for``
    patched): the redelivery moves ``slow-1`` to another event."""
    slow_kafka = ShortPollInterval(**kafka.model_dump())
    resources = {**resources, "kafka": slow_kafka}
    first = [
        upload("slow-1", "2026-01-17T13:20:00Z", 81.772379, 25.4301623),
        upload("slow-2", "2026-01-17T13:21:00Z", 81.77238, 25.4301623),
    ]
    publish(kafka, settings.uploads_topic, first, partition=0)
    recluster = events_module.recluster
    seen_during_work: list[tuple[str, int]] = []

    def slow_recluster(db, ids, params, moved=()):
        if "slow-1" in ids and not seen_during_work:
            time.sleep(15)
            seen_during_work.append(group_members(kafka))
        return recluster(db, ids, params, moved)

    db = mongo.db()
    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        (slow,) = harness.tick()
        monkeypatch.setattr(events_module, "recluster", slow_recluster)
        began = time.monotonic()
        assert harness.execute(slow).success
        assert time.monotonic() - began >= 15
        (state, members) = seen_during_work[0]
        assert members == 0, f"a consumer was in the group during the batch ({state})"
        assert committed(kafka, settings.uploads_topic) == {0: 2}

        publish(
            kafka, settings.uploads_topic, [upload("after-1", "2026-01-17T15:00:00Z", 2.35, 48.85)]
        )
        assert harness.drain(), "the pipeline keeps consuming after the slow batch"
        before = one_event_per_photo(db, {"slow-1", "slow-2", "after-1"})
        assert before["slow-1"] == before["slow-2"]
        event_count = db.events.count_documents({})

        assert harness.execute(slow).success, "the slow batch delivered again"
        monkeypatch.undo()
    assert one_event_per_photo(db, set(before)) == before
    assert db.events.count_documents({}) == event_count
    assert committed(kafka, settings.uploads_topic) == ends(kafka, settings.uploads_topic)


def test_17_a_tick_whose_consumer_was_never_closed_is_followed_by_a_prompt_tick(
    resources, settings, kafka, mongo
):
    """Three uploads; tick 1 leaves its consumers open and crashes before returning; tick 2,
    straight after, plans all three within a few seconds, and their runs apply and commit them.

    Seen failing with the leaked consumer subscribed to the topic and polled until assigned (a
    group member that stays): tick 2 still plans promptly, but the run's offset commit is refused
    with UNKNOWN_MEMBER_ID while that member holds the group (see docs/reliability.md)."""
    values = [
        upload(f"tick-{i}", f"2026-01-17T13:2{i}:00Z", 81.772379 + i * 1e-5, 25.4301623)
        for i in range(3)
    ]
    publish(kafka, settings.uploads_topic, values, partition=0)
    leaky = NeverClosesThenCrashes(**kafka.model_dump())
    db = mongo.db()
    try:
        with instance_for_test() as instance:
            crashing = Harness(instance, {**resources, "kafka": leaky})
            with pytest.raises(RuntimeError, match="tick 1 crashed"):
                crashing.tick()
            assert LEAKED, "tick 1 left its consumer open"
            assert crashing.cursor is None, "the crashed tick moved no cursor"

            harness = Harness(instance, resources)
            began = time.monotonic()
            requests = harness.tick()
            took = time.monotonic() - began
            assert took < SENSOR_TIME_LIMIT_S / 6, f"tick 2 took {took:.1f} s"
            assert [(r.tags["snapmap/partition"], r.tags["snapmap/offsets"]) for r in requests] == [
                ("0", "0-2")
            ]
            for request in requests:
                assert harness.execute(request).success
            assert harness.tick() == []
    finally:
        while LEAKED:
            LEAKED.pop().close()
    assignment = one_event_per_photo(db, {"tick-0", "tick-1", "tick-2"})
    assert len(groups(assignment)) == 1
    assert committed(kafka, settings.uploads_topic) == {0: 3}


def test_20_two_pipeline_instances_interleaved_apply_each_photo_once(
    resources, settings, kafka, mongo, monkeypatch
):
    """Twenty uploads over two partitions, two pipeline instances (each its own Dagster
    instance and sensor cursor) over the same topic and database. Instance A's first run dies
    after applying its batch and before committing (the moment a rebalance would drop the
    offset); instance B then starts and plans from the committed offsets, so it applies the same
    ranges again; A's remaining run and a rerun of its failed one come last.

    Seen failing with the commit step dropping the offsets of finished work (the case's root
    cause; ``commit_contiguous`` patched to commit nothing): the committed offsets stay empty."""
    values = [
        upload(
            f"pair-{i:02d}",
            f"2026-01-17T13:{20 + i // 4:02d}:{(i % 4) * 10:02d}Z",
            81.772379 + (i // 4) * 0.01,
            25.4301623 + (i % 4) * 1e-5,
        )
        for i in range(20)
    ]
    publish(kafka, settings.uploads_topic, values[0::2], partition=0)
    publish(kafka, settings.uploads_topic, values[1::2], partition=1)
    photo_ids = {f"pair-{i:02d}" for i in range(20)}
    db = mongo.db()

    with instance_for_test() as instance_a, instance_for_test() as instance_b:
        a = Harness(instance_a, resources)
        a_runs = sorted(a.tick(), key=lambda r: r.tags["snapmap/partition"])
        assert len(a_runs) == 2

        def revoked(*args, **kwargs):
            raise RuntimeError("instance A stopped before committing")

        monkeypatch.setattr(events_module, "commit_contiguous", revoked)
        assert not a.execute(a_runs[0], raise_on_error=False).success
        monkeypatch.undo()
        assert committed(kafka, settings.uploads_topic) == {}

        b = Harness(instance_b, resources)
        b_runs = b.tick()
        assert sorted(r.run_key for r in b_runs) == sorted(r.run_key for r in a_runs)
        for request in b_runs:
            assert b.execute(request).success
        settled = one_event_per_photo(db, photo_ids)
        assert committed(kafka, settings.uploads_topic) == {0: 10, 1: 10}

        assert a.execute(a_runs[1]).success
        assert a.execute(a_runs[0]).success, "A's failed batch, run again"
        assert a.tick() == [] and b.tick() == []

    assert one_event_per_photo(db, photo_ids) == settled
    assert len(groups(settled)) == 5
    assert committed(kafka, settings.uploads_topic) == {0: 10, 1: 10}
