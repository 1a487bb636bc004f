"""The photo-uploads sensor against the real broker: cursor, run keys, caps, gaps, outages."""

from __future__ import annotations

import json
import time

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import NewPartitions
from dagster import SkipReason, build_sensor_context, instance_for_test

from snapmap_pipeline.resources.kafka import KafkaResource, KafkaUnavailable
from snapmap_pipeline.sensors.kafka_sensor import SensorCursor, photo_uploads_sensor
from tests.integration.pipeline import Harness, publish, upload
from tests.integration.test_ingestion import changed

pytestmark = [pytest.mark.kafka, pytest.mark.sensor]


def values(count: int, prefix: str = "p") -> list[bytes]:
    return [
        upload(f"{prefix}-{i}", "2026-01-17T13:20:00Z", 81.77 + i * 0.01, 25.43)
        for i in range(count)
    ]


def tick(resources: dict, cursor: str | None):
    with (
        instance_for_test() as instance,
        build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context,
    ):
        return photo_uploads_sensor(context), context


def test_cursor_advances_and_ranges_cover_every_offset_once(resources, settings, kafka):
    publish(kafka, settings.uploads_topic, values(1200))
    result, _ = tick(resources, None)

    cursor = json.loads(result.cursor)
    topic_id = cursor.pop("topic_id")
    assert topic_id == kafka.topic_id(settings.uploads_topic)
    assert sum(cursor.values()) == 1200
    covered: dict[int, list[int]] = {}
    for request in result.run_requests:
        config = request.run_config["ops"]["photo_uploads"]["config"]
        assert config["last_offset"] - config["first_offset"] + 1 <= settings.max_messages_per_run
        assert request.run_key == (
            f"{settings.uploads_topic}/{config['partition']}/"
            f"{config['first_offset']}-{config['last_offset']}@{topic_id}"
        )
        assert set(request.run_config["ops"]["photo_uploads"]["config"]) == {
            "topic",
            "partition",
            "first_offset",
            "last_offset",
            "topic_id",
        }
        covered.setdefault(config["partition"], []).extend(
            range(config["first_offset"], config["last_offset"] + 1)
        )
    for partition, offsets in covered.items():
        assert sorted(offsets) == list(range(cursor[str(partition)]))

    publish(kafka, settings.uploads_topic, values(3, "more"))
    later, _ = tick(resources, result.cursor)
    assert sum(SensorCursor.parse(later.cursor).offsets.values()) == 1203
    assert sum(int(r.tags["snapmap/batch_size"]) for r in later.run_requests) == 3


def test_same_tick_evaluated_twice_requests_the_same_run_keys(resources, settings, kafka):
    publish(kafka, settings.uploads_topic, values(30))
    first, _ = tick(resources, None)
    again, _ = tick(resources, None)
    assert [r.run_key for r in first.run_requests] == [r.run_key for r in again.run_requests]
    assert len({r.run_key for r in first.run_requests}) == len(first.run_requests)


def test_duplicate_run_keys_launch_one_run(resources, settings, kafka, mongo):
    """cases.md #25: the daemon dedupes run keys; even two executions leave one state."""
    publish(kafka, settings.uploads_topic, values(10), partition=0)
    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        (request,) = harness.tick()
        harness.execute(request)
        state = list(mongo.db().events.find({}).sort("_id"))
        harness.execute(request)
    assert list(mongo.db().events.find({}).sort("_id")) == state
    assert mongo.db().photos.count_documents({"eventId": None}) == 0


def test_large_backlog_is_capped_per_run_and_per_tick(resources, settings, kafka):
    """cases.md #27: 20,000 messages, no payloads in run config, later ticks take the rest."""
    publish(kafka, settings.uploads_topic, values(20_000))
    cursor = None
    requested = 0
    started = time.monotonic()
    ticks = 0
    while requested < 20_000:
        result, _ = tick(resources, cursor)
        ticks += 1
        assert len(result.run_requests) <= settings.max_runs_per_tick
        for request in result.run_requests:
            assert len(json.dumps(request.run_config)) < 500
        requested += sum(int(r.tags["snapmap/batch_size"]) for r in result.run_requests)
        cursor = result.cursor
    assert requested == 20_000
    assert ticks >= 20_000 / (settings.max_runs_per_tick * settings.max_messages_per_run)
    assert (time.monotonic() - started) / ticks < 10, "a tick must stay far below 60 s"


def test_unknown_partition_starts_at_committed_offset_else_earliest(resources, settings, kafka):
    """cases.md #18: a brand-new group reads messages produced before it existed."""
    publish(kafka, settings.uploads_topic, values(6), partition=1)
    kafka.commit_offset(settings.uploads_topic, 1, 4)
    publish(kafka, settings.uploads_topic, values(2, "early"), partition=2)
    result, _ = tick(resources, None)
    ranges = {
        r.run_config["ops"]["photo_uploads"]["config"]["partition"]: (
            r.run_config["ops"]["photo_uploads"]["config"]["first_offset"],
            r.run_config["ops"]["photo_uploads"]["config"]["last_offset"],
        )
        for r in result.run_requests
    }
    assert ranges == {1: (4, 5), 2: (0, 1)}


def test_new_partitions_are_picked_up(resources, settings, kafka):
    publish(kafka, settings.uploads_topic, values(3), partition=0)
    first, _ = tick(resources, None)
    admin = kafka.admin()
    futures = admin.create_partitions([NewPartitions(settings.uploads_topic, 5)])
    futures[settings.uploads_topic].result(timeout=10)
    publish(kafka, settings.uploads_topic, values(2, "new"), partition=4)
    second, _ = tick(resources, first.cursor)
    partitions = {
        r.run_config["ops"]["photo_uploads"]["config"]["partition"] for r in second.run_requests
    }
    assert partitions == {4}
    assert json.loads(second.cursor)["4"] == 2


def test_retention_gap_is_recorded_not_silent(resources, settings, kafka):
    publish(kafka, settings.uploads_topic, values(10), partition=0)
    cursor = json.dumps({"0": 0, "1": 0, "2": 0})
    admin = kafka.admin()
    futures = admin.delete_records([TopicPartition(settings.uploads_topic, 0, 6)])
    for future in futures.values():
        future.result(timeout=10)
    result, _ = tick(resources, cursor)
    (request,) = result.run_requests
    assert request.tags["snapmap/retention_gap"] == "0-5"
    assert request.run_config["ops"]["photo_uploads"]["config"]["first_offset"] == 6
    (observation,) = result.asset_events
    assert observation.metadata["retention_gap_offsets"].value == 6


def test_nothing_new_says_why(resources, settings, kafka):
    result, _ = tick(resources, None)
    assert isinstance(result, SkipReason)
    assert "no new offsets" in result.skip_message


def test_unreachable_broker_fails_fast_and_cleanly(resources):
    """cases.md #21: bounded time, a clear error, no consumer created at import."""
    dead = KafkaResource(bootstrap_servers="127.0.0.1:1", timeout_s=2.0)
    started = time.monotonic()
    with pytest.raises(KafkaUnavailable, match="photo-uploads|metadata"):
        for _ in range(3):
            tick({**resources, "kafka": dead}, None)
    assert time.monotonic() - started < 15


def keys_by_partition(result) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for request in result.run_requests:
        found.setdefault(int(request.tags["snapmap/partition"]), []).append(request.run_key)
    return found


def test_one_partitions_backlog_does_not_starve_the_others(resources, settings, kafka):
    """A tick cut by ``max_runs_per_tick`` records where it stopped; the next tick starts at
    the partition after it, so a long backlog on partition 0 shares the ticks."""
    publish(kafka, settings.uploads_topic, values(40), partition=0)
    publish(kafka, settings.uploads_topic, values(2, "one"), partition=1)
    publish(kafka, settings.uploads_topic, values(2, "two"), partition=2)
    small = changed(settings, max_messages_per_run=2, max_runs_per_tick=3)
    capped = {**resources, "settings": small}

    first, _ = tick(capped, None)
    topic_id = kafka.topic_id(settings.uploads_topic)
    assert keys_by_partition(first).keys() == {0}
    assert json.loads(first.cursor) == {"0": 6, "resume_partition": 1, "topic_id": topic_id}

    second, _ = tick(capped, first.cursor)
    assert {p: len(keys) for p, keys in keys_by_partition(second).items()} == {1: 1, 2: 1, 0: 1}
    assert SensorCursor.parse(second.cursor) == SensorCursor({0: 8, 1: 2, 2: 2}, 1, topic_id)

    cursor = second.cursor
    for _ in range(20):
        result, context = tick(capped, cursor)
        if isinstance(result, SkipReason):
            cursor = context.cursor
            break
        assert keys_by_partition(result).keys() == {0}
        cursor = result.cursor
    # A tick that covered every partition leaves the cursor in its plain form.
    assert json.loads(cursor) == {"0": 40, "1": 2, "2": 2, "topic_id": topic_id}


def test_cursors_without_or_with_a_stale_resume_partition_still_load(resources, settings, kafka):
    """Cursors written before ``resume_partition`` existed (or edited by an operator) start at
    the first partition; a resume partition the topic no longer has starts there too."""
    for partition in range(3):
        publish(kafka, settings.uploads_topic, values(1, f"p{partition}"), partition=partition)
    capped = {**resources, "settings": changed(settings, max_runs_per_tick=1)}
    topic_id = kafka.topic_id(settings.uploads_topic)
    for cursor in ('{"0": 0, "1": 0, "2": 0}', '{"0": 0, "1": 0, "2": 0, "resume_partition": 7}'):
        result, _ = tick(capped, cursor)
        assert keys_by_partition(result).keys() == {0}
        assert SensorCursor.parse(result.cursor) == SensorCursor({0: 1, 1: 0, 2: 0}, 1, topic_id)
    resumed, _ = tick(capped, '{"0": 0, "1": 0, "2": 0, "resume_partition": 2}')
    assert keys_by_partition(resumed).keys() == {2}
    assert SensorCursor.parse(resumed.cursor) == SensorCursor({0: 0, 1: 0, 2: 1}, 0, topic_id)
