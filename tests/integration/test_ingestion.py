"""A micro-batch's guarantees: dead letters with reasons, poison isolation, commit only after
success, and runs that overlap in space agreeing with serial ones."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from datetime import UTC, datetime, timedelta
from typing import ClassVar

import pytest
from confluent_kafka import Producer
from dagster import instance_for_test

from snapmap_pipeline.clustering import ClusterParams
from snapmap_pipeline.resources.kafka import KafkaResource, OffsetRange
from snapmap_pipeline.settings import PipelineSettings
from snapmap_pipeline.store.dead_letters import DeadLetter, send_dead_letters
from snapmap_pipeline.store.events import apply_pending_links
from snapmap_pipeline.store.poison import recluster_isolating_poison
from snapmap_pipeline.store.recluster import recluster
from tests.integration.pipeline import (
    Harness,
    execute_in_subprocess,
    groups,
    photo_events,
    publish,
    resource_specs,
    upload,
)

pytestmark = [pytest.mark.kafka, pytest.mark.storage]


def changed(settings: PipelineSettings, **fields) -> PipelineSettings:
    """A copy with some fields changed (built anew: Dagster resources keep their config)."""
    return PipelineSettings(**{**settings.model_dump(), **fields})


def read_all(kafka: KafkaResource, topic: str, partition: int = 0) -> list:
    with kafka.consumer() as consumer:
        high = kafka.watermarks(consumer, topic, partition).high
    if high == 0:
        return []
    messages, _ = kafka.read_range(OffsetRange(topic, partition, 0, high - 1))
    return messages


def committed(kafka: KafkaResource, topic: str) -> dict[int, int]:
    with kafka.consumer() as consumer:
        return kafka.committed(consumer, topic, kafka.partitions(consumer, topic))


MALFORMED = {
    b"{not json": "not_json",
    b"[1,2,3]": "not_object",
    upload("oob-1", "2026-01-17T13:20:00Z", 190.0, 25.43): "schema",
    upload("oob-2", "2026-01-17T13:20:00Z", 81.77, 95.0): "schema",
    upload("naive", "2026-01-17T13:20:00", 81.77, 25.43): "schema",
    b'{"photoId":{"$ne":null},"timestamp":"2026-01-17T13:20:00Z","location":[1,2],'
    b'"storageUrl":"azure://bucket/a.jpg"}': "schema",
    upload("bad-url", "2026-01-17T13:20:00Z", 81.77, 25.43).replace(
        b"azure://photos/", b"azure://My_Bucket/"
    ): "bad_storage_url",
    b"\xff\xfe\x00": "not_utf8",
}


def test_each_malformed_kind_is_dead_lettered_with_reason_and_bytes(
    resources, settings, kafka, mongo
):
    valid = [upload(f"ok-{i}", f"2026-01-17T13:2{i}:00Z", 81.77, 25.43) for i in range(3)]
    publish(kafka, settings.uploads_topic, [*MALFORMED, *valid], partition=0)
    with instance_for_test() as instance:
        Harness(instance, resources).drain()

    letters = read_all(kafka, settings.dead_letter_topic)
    assert len(letters) == len(MALFORMED)
    by_value = {m.value(): dict(m.headers()) for m in letters}
    for raw, code in MALFORMED.items():
        headers = by_value[raw]
        assert headers["snapmap.error.code"].decode() == code
        assert headers["snapmap.error.reason"]
        assert headers["snapmap.source.topic"].decode() == settings.uploads_topic
        assert headers["snapmap.source.partition"] == b"0"
    offsets = sorted(int(h["snapmap.source.offset"]) for h in by_value.values())
    assert offsets == list(range(len(MALFORMED)))

    db = mongo.db()
    assert db.photos.count_documents({}) == 3
    assert db.events.count_documents({}) == 1
    assert committed(kafka, settings.uploads_topic) == {0: len(MALFORMED) + 3}


def only_letter_reason(kafka: KafkaResource, topic: str, code: bytes) -> str:
    """The reason of the one letter on ``topic``, which must carry ``code``."""
    (letter,) = read_all(kafka, topic)
    headers = dict(letter.headers())
    assert headers["snapmap.error.code"] == code
    return headers["snapmap.error.reason"].decode()


def test_a_producer_clock_behind_is_recognisable_on_the_dead_letter_topic(
    resources, settings, kafka, mongo
):
    """A producer whose clock is a month behind: its message's Kafka timestamp (CreateTime) is
    a month before the photo's time. The dead letter keeps the stable code, and its reason
    header names the Kafka timestamp, the photo's time and the upper bound that failed."""
    taken_at = datetime(2026, 1, 17, 13, 20, tzinfo=UTC)
    stamped = taken_at - timedelta(days=31)
    with kafka.producer() as producer:
        producer.produce(
            settings.uploads_topic,
            value=upload("clock-behind", "2026-01-17T13:20:00Z", 81.77, 25.43),
            partition=0,
            timestamp=int(stamped.timestamp() * 1000),
        )
    with instance_for_test() as instance:
        Harness(instance, resources).drain()

    reason = only_letter_reason(kafka, settings.dead_letter_topic, b"timestamp_out_of_range")
    assert reason.startswith(
        "timestamp 2026-01-17T13:20:00Z is more than a day after the message's Kafka timestamp "
        "2025-12-17T13:20:00Z (31 days 0:00:00 after; upper bound 2025-12-18T13:20:00Z)"
    )
    assert mongo.db().photos.count_documents({}) == 0


def test_a_message_without_a_kafka_timestamp_is_bounded_by_the_time_it_was_read(
    resources, settings, kafka, mongo
):
    """A producer can send -1, the record format's "no timestamp", and the broker keeps it.
    The upper bound of such a message's photo time is then a day after the run read it: a
    photo dated in the year 9999 is dead-lettered, and the reason says which time it was
    compared with and why."""
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    with kafka.producer() as producer:
        for photo_id, taken_at in [("year-9999", "9999-12-31T00:00:00Z"), ("today", now)]:
            producer.produce(
                settings.uploads_topic,
                value=upload(photo_id, taken_at, 81.77, 25.43),
                partition=0,
                timestamp=-1,
            )
    with instance_for_test() as instance:
        Harness(instance, resources).drain()

    reason = only_letter_reason(kafka, settings.dead_letter_topic, b"timestamp_out_of_range")
    assert reason.startswith(
        "timestamp 9999-12-31T00:00:00Z is more than a day after the time the message was read "
    )
    assert "the message has no Kafka timestamp" in reason
    assert [p["_id"] for p in mongo.db().photos.find()] == ["today"]


# A valid photo published after a hostile message: the same run must apply it.
NEAR = upload("near", "2026-03-01T10:00:00Z", 13.405, 52.52)


def applied_in_one_run(resources: dict) -> None:
    """Tick once and execute the one run it requests, which must succeed at its first try."""
    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        (request,) = harness.tick()
        assert harness.execute(request, raise_on_error=False).success


def test_a_message_too_large_to_copy_is_dead_lettered_without_its_bytes(
    resources, settings, kafka, mongo
):
    """The broker takes messages of up to about 1 MiB, a producer takes 1,000,000 bytes by
    default. A message on photo-uploads larger than that (its producer allowed it) cannot be
    copied to the dead-letter topic: its letter goes without the bytes, the reason says where
    they stay, and the run applies the rest of its batch at once instead of failing for good."""
    huge = upload("huge", "2026-03-01T10:00:00Z", 13.405, 52.52, pad="x" * 1_040_000)
    producer = Producer(
        {"bootstrap.servers": kafka.bootstrap_servers, "message.max.bytes": 1_048_576}
    )
    producer.produce(settings.uploads_topic, value=huge, key=b"k" * 100, partition=0)
    assert producer.flush(30) == 0
    publish(kafka, settings.uploads_topic, [NEAR], partition=0)
    applied_in_one_run(resources)

    (letter,) = read_all(kafka, settings.dead_letter_topic)
    headers = dict(letter.headers())
    assert headers["snapmap.error.code"] == b"too_large"
    assert headers["snapmap.source.offset"] == b"0"
    assert letter.value() is None
    reason = headers["snapmap.error.reason"].decode()
    assert reason.startswith(
        f"[original bytes not copied: the message's {len(huge) + 100} bytes are more than a "
        f"dead letter carries (900000); they stay at {settings.uploads_topic}/0/0 until "
        "retention deletes them] message is "
    )
    assert mongo.db().dead_letters.count_documents({"code": "too_large"}) == 1
    assert photo_events(mongo.db())["near"] is not None
    assert committed(kafka, settings.uploads_topic) == {0: 2}


def test_a_reason_quoting_a_lone_surrogate_is_sent_and_recorded(resources, settings, kafka, mongo):
    """JSON may escape half a UTF-16 pair (\\ud800), which no UTF-8 text can hold. A reason
    that quotes such a value (here the host of a storageUrl) is sent with it escaped, so the
    letter's header and its record can be written and the run applies the rest of its batch."""
    bad = upload("lone", "2026-03-01T10:00:00Z", 13.405, 52.52).replace(
        b"azure://photos/lone.jpg", b"https://a\\ud800b:1/c/x.jpg"
    )
    publish(kafka, settings.uploads_topic, [bad, NEAR], partition=0)
    applied_in_one_run(resources)

    (letter,) = read_all(kafka, settings.dead_letter_topic)
    headers = dict(letter.headers())
    assert headers["snapmap.error.code"] == b"bad_storage_url"
    assert b"https://a\\ud800b" in headers["snapmap.error.reason"]
    assert letter.value() == bad
    (record,) = mongo.db().dead_letters.find({})
    assert "https://a\\ud800b" in record["reason"]
    assert photo_events(mongo.db())["near"] is not None
    assert committed(kafka, settings.uploads_topic) == {0: 2}


def test_rerun_does_not_send_dead_letters_twice(resources, settings, kafka, mongo):
    publish(kafka, settings.uploads_topic, [b"{bad", b"{worse"], partition=0)
    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        (request,) = harness.drain()
        harness.execute(request)
    assert len(read_all(kafka, settings.dead_letter_topic)) == 2


class SenderWatchingKafka(KafkaResource):
    """Records, each time a run reads its batch, whether the run's producer already runs."""

    seen: ClassVar[list[bool]] = []

    def read_range(self, offsets):
        SenderWatchingKafka.seen.append(self._sender is not None)
        return super().read_range(offsets)


def test_a_run_starts_its_producer_before_reading_its_batch(resources, settings, kafka, mongo):
    """A new idempotent producer holds up its first send by about 0.5 s unless it was started
    a moment before (bench/pipeline/producer_start.py): a run starts it before the read."""
    publish(kafka, settings.uploads_topic, [b"{bad"], partition=0)
    SenderWatchingKafka.seen.clear()
    watching = {**resources, "kafka": SenderWatchingKafka(**kafka.model_dump())}
    with instance_for_test() as instance:
        (request,) = Harness(instance, watching).drain()
    assert SenderWatchingKafka.seen == [True]
    assert len(read_all(kafka, settings.dead_letter_topic)) == 1


def test_poison_photo_is_isolated_then_dead_lettered(resources, settings, kafka, mongo):
    """A valid photo whose processing keeps failing: the rest of its batch is applied at once,
    it fails the run until the attempt limit, then it is dead-lettered with its bytes."""
    values = [
        upload(f"crowd-{i:02d}", f"2026-01-17T13:{i:02d}:00Z", 81.77 + i * 0.001, 25.43)
        for i in range(16)
    ]
    publish(kafka, settings.uploads_topic, values, partition=0)
    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        (request,) = harness.tick()
        harness.execute(request)  # ingest, cluster, link normally

    db = mongo.db()
    db.photos.update_many({}, {"$set": {"eventId": None}})
    db.events.delete_many({})
    ids = sorted(d["_id"] for d in db.photos.find({}, {"_id": 1}))
    params = ClusterParams()

    def step(seed):
        if "crowd-07" in seed:
            raise ValueError("cannot cluster crowd-07")
        return recluster(db, seed, params)

    def dead_letter(letters):
        from snapmap_pipeline.assets.events import with_original_bytes

        return send_dead_letters(
            db, kafka, settings.dead_letter_topic, with_original_bytes(kafka, letters)
        )

    for attempt in (1, 2):
        with pytest.raises(ValueError, match="crowd-07"):
            recluster_isolating_poison(db, ids, step, dead_letter, max_attempts=3)
        apply_pending_links(db)
        assert db.poison_attempts.find_one({"_id": "crowd-07"})["attempts"] == attempt
    linked = {k for k, v in photo_events(db).items() if v}
    assert linked == set(ids) - {"crowd-07"}

    report, poisoned = recluster_isolating_poison(db, ids, step, dead_letter, max_attempts=3)
    assert poisoned == ["crowd-07"]
    (letter,) = read_all(kafka, settings.dead_letter_topic)
    assert dict(letter.headers())["snapmap.error.code"] == b"processing_failed"
    assert letter.value() == values[7]
    source_topic_id = db.photos.find_one({"_id": "crowd-07"})["source"]["topicId"]
    assert dict(letter.headers())["snapmap.source.topic_id"] == source_topic_id.encode()
    assert db.photos.find_one({"_id": "crowd-07"})["deadLettered"] is True


def test_a_photo_that_succeeds_starts_its_attempt_count_afresh(kafka, mongo, settings):
    """A photo that failed twice for unrelated reasons, weeks apart, each time processed
    successfully afterwards: its next single failure is the first of a new count, not the one
    that dead-letters it. A record at the limit stays through a success: it belongs to a photo
    being dead-lettered by the run that reached the limit, and the sweeper finds the
    dead-lettered photos still linked to an event by their records."""
    from tests.integration.sweeper_data import backend_photo

    db = mongo.db()
    walk = [
        backend_photo(f"walk-{i}", f"2026-03-02T10:0{i}:00Z", 4.3500 + i * 0.0001, 50.85)
        for i in range(4)
    ]
    db.photos.insert_many(walk)
    ids = [p["_id"] for p in walk]
    failing: set[str] = set()

    def step(seed):
        if broken := sorted(failing & set(seed)):
            raise ValueError(f"cannot cluster {', '.join(broken)}")
        return recluster(db, seed, ClusterParams())

    def dead_letter(letters):
        return send_dead_letters(db, kafka, settings.dead_letter_topic, letters)

    for _ in range(2):  # a failure, then a run in which the photo's step completes
        failing.add("walk-2")
        with pytest.raises(ValueError, match="walk-2"):
            recluster_isolating_poison(db, ids, step, dead_letter, max_attempts=3)
        assert db.poison_attempts.find_one({"_id": "walk-2"})["attempts"] == 1
        failing.clear()
        recluster_isolating_poison(db, ids, step, dead_letter, max_attempts=3)
        assert db.poison_attempts.find_one({"_id": "walk-2"}) is None, "cleared by the success"

    failing.add("walk-2")
    with pytest.raises(ValueError, match="walk-2"):
        recluster_isolating_poison(db, ids, step, dead_letter, max_attempts=3)
    assert db.poison_attempts.find_one({"_id": "walk-2"})["attempts"] == 1
    assert not db.photos.find_one({"_id": "walk-2"}).get("deadLettered")

    # Another run's step completes for walk-3 after this run's attempt reached the limit and
    # before this run marked the photo: the record stays, and the photo ends dead-lettered.
    failing = {"walk-3"}

    def another_run_succeeds_meanwhile(letters):
        recluster_isolating_poison(db, ["walk-3"], fail_on_nothing, dead_letter, 3)
        return dead_letter(letters)

    def fail_on_nothing(seed):
        return recluster(db, seed, ClusterParams())

    _, poisoned = recluster_isolating_poison(
        db, ["walk-3"], step, another_run_succeeds_meanwhile, max_attempts=1
    )
    assert poisoned == ["walk-3"]
    record = db.poison_attempts.find_one({"_id": "walk-3"})
    assert (record["attempts"], record["deadLettered"]) == (1, True)

    # A replay of its message puts the dead-lettered photo in a step that completes (the
    # closure leaves it out): its record stays too.
    failing.clear()
    recluster_isolating_poison(db, ids, step, dead_letter, max_attempts=3)
    assert db.poison_attempts.find_one({"_id": "walk-3"})["attempts"] == 1
    assert db.photos.find_one({"_id": "walk-3"})["deadLettered"] is True


def test_original_bytes_are_not_taken_from_a_topic_created_again(settings, kafka):
    """A poison letter's source offset is read back only from the topic it came from: after
    the topic was deleted and created again, that offset holds another message."""
    from snapmap_pipeline.assets.events import with_original_bytes

    values = [upload("late-00", "2026-01-17T13:00:00Z", 81.77, 25.43)]
    publish(kafka, settings.uploads_topic, values, partition=0)
    current = kafka.topic_id(settings.uploads_topic)

    def letter(topic_id):
        return DeadLetter(
            settings.uploads_topic, 0, 0, "processing_failed", "x", b"k", None, topic_id
        )

    (same,) = with_original_bytes(kafka, [letter(current)])
    assert same.value == values[0] and same.topic_id == current
    (other,) = with_original_bytes(kafka, [letter("AAAAAAAAAAAAAAAAAAAAAA")])
    assert other.value is None and other.topic_id == "AAAAAAAAAAAAAAAAAAAAAA"


def test_offsets_commit_only_after_the_run_succeeds(resources, settings, kafka, mongo, unique):
    """cases.md #15: a run that fails after writing leaves the group's offset where it was;
    the retried run applies the batch and then commits."""
    publish(kafka, settings.uploads_topic, [upload("m1", "2026-01-17T13:20:00Z", 1, 2)], 0)
    broken = changed(settings, event_updates_topic=f"missing-topic-{unique}")
    with instance_for_test() as instance:
        harness = Harness(instance, {**resources, "settings": broken})
        (request,) = harness.tick()
        result = harness.execute(request, raise_on_error=False)
        assert not result.success
        assert committed(kafka, settings.uploads_topic) == {}
        assert mongo.db().photos.find_one({"_id": "m1"})["eventId"]

        harness.resources = resources
        assert harness.execute(request).success
    assert committed(kafka, settings.uploads_topic) == {0: 1}


def test_read_range_never_commits(settings, kafka):
    """cases.md #14: reading stores no offsets for the group."""
    publish(kafka, settings.uploads_topic, [b"x"] * 10, partition=0)
    messages, lost = kafka.read_range(OffsetRange(settings.uploads_topic, 0, 0, 9))
    assert (len(messages), lost) == (10, 0)
    assert committed(kafka, settings.uploads_topic) == {}


def test_out_of_order_success_commits_only_the_contiguous_prefix(resources, settings, kafka, mongo):
    values = [upload(f"o-{i}", f"2026-01-17T13:{i:02d}:00Z", i * 0.01, 0.0) for i in range(12)]
    publish(kafka, settings.uploads_topic, values, partition=0)
    small = changed(settings, max_messages_per_run=4)
    with instance_for_test() as instance:
        harness = Harness(instance, {**resources, "settings": small})
        first, second, third = harness.tick()
        harness.execute(third)
        harness.execute(second)
        assert committed(kafka, settings.uploads_topic) == {}
        harness.execute(first)
    assert committed(kafka, settings.uploads_topic) == {0: 12}


def test_overlapping_runs_in_parallel_equal_serial(
    resources, settings, kafka, mongo, unique, dagster_postgres_url
):
    """Two partitions' batches in the same neighbourhood, executed at the same time on a
    PostgreSQL-backed instance, end like one serial pass."""
    crowd = [
        upload(
            f"c-{i:03d}",
            f"2026-01-17T13:{i // 4:02d}:{(i % 4) * 15:02d}Z",
            81.7700 + (i % 7) * 4e-5,
            25.4300 + (i % 5) * 4e-5,
        )
        for i in range(120)
    ]
    publish(kafka, settings.uploads_topic, crowd[0::2], partition=0)
    publish(kafka, settings.uploads_topic, crowd[1::2], partition=1)
    overrides = {"storage": {"postgres": {"postgres_url": dagster_postgres_url}}}
    with instance_for_test(overrides=overrides) as instance:
        harness = Harness(instance, resources)
        requests = harness.tick()
        assert len(requests) == 2
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=spawn) as pool:
            futures = [
                pool.submit(
                    execute_in_subprocess,
                    instance.get_ref(),
                    resource_specs(resources),
                    r.run_config,
                    r.tags,
                )
                for r in requests
            ]
            assert [f.result(timeout=300) for f in futures] == [True, True]
        runs = instance.get_runs()
        assert len(runs) == 2

    parallel = photo_events(mongo.db())
    serial_db = mongo.db().client[f"serial_{unique}"]
    try:
        from snapmap_pipeline.store.schema import ensure_schema

        ensure_schema(serial_db)
        serial_db.photos.insert_many(
            list(mongo.db().photos.find({}, {"eventId": 0, "linkToken": 0}))
        )
        serial_db.photos.update_many({}, {"$set": {"eventId": None}})
        recluster(serial_db, [d["_id"] for d in serial_db.photos.find({})], ClusterParams())
        apply_pending_links(serial_db)
        serial = photo_events(serial_db)
    finally:
        mongo.db().client.drop_database(f"serial_{unique}")
    assert parallel == serial
    assert len(groups(parallel)) >= 1
    assert None not in parallel.values()


def test_replay_from_an_old_offset_changes_nothing(resources, settings, kafka, mongo):
    values = [upload(f"r-{i}", f"2026-01-17T13:{i:02d}:00Z", 81.77, 25.43) for i in range(8)]
    publish(kafka, settings.uploads_topic, values, partition=2)
    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        harness.drain()
        db = mongo.db()
        before = (list(db.photos.find({}).sort("_id")), list(db.events.find({}).sort("_id")))
        harness.cursor = '{"0": 0, "1": 0, "2": 0}'
        kafka.commit_offset(settings.uploads_topic, 2, 0)
        replays = harness.drain()
    assert replays
    assert (list(db.photos.find({}).sort("_id")), list(db.events.find({}).sort("_id"))) == before
    assert committed(kafka, settings.uploads_topic)[2] == 8


def test_letters_without_a_source_offset_are_one_per_photo(settings, kafka, mongo):
    """Photos the upload backend stored whose message never arrived have no source offset;
    each poison one still gets its own letter (found by the breaker: the second was taken for
    the first and dropped without one)."""
    letters = [
        DeadLetter("unknown", -1, -1, "processing_failed", "x", photo_id.encode(), None)
        for photo_id in ("lost-a", "lost-b")
    ]
    db = mongo.db()
    for letter in letters:  # poisoned in separate runs
        assert send_dead_letters(db, kafka, settings.dead_letter_topic, [letter]) == 1
    assert send_dead_letters(db, kafka, settings.dead_letter_topic, letters) == 0
    assert db.dead_letters.count_documents({}) == 2
    sent = read_all(kafka, settings.dead_letter_topic)
    assert sorted(m.key() for m in sent) == [b"lost-a", b"lost-b"]
