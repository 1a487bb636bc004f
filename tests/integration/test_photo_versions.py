"""A photo re-sent with changed content: the newest message wins whatever order the runs apply
them in, so a late run (or a replay of an old range) cannot bring back the old content."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import KafkaError
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
from dagster import RunRequest, instance_for_test

from snapmap_pipeline.assets.ingest import held_back_before, split_batch
from snapmap_pipeline.cli import account_partition
from snapmap_pipeline.contract.validation import PhotoUpload
from snapmap_pipeline.resources.kafka import OffsetRange
from snapmap_pipeline.store.photos import upsert_uploads
from tests.integration.pipeline import Harness, photo_events, upload

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.storage]

T0 = 1_777_640_400_000  # 2026-05-01T13:00Z: publish times (ms) of the two messages: T0, T0 + 60 s
OLD = (2.3500, 48.8500)  # where the first message put the photo
NEW = (2.3600, 48.8600)  # the correction, published a minute later


def produce(kafka, topic: str, partition: int, value: bytes, timestamp_ms: int) -> None:
    with kafka.producer() as producer:
        producer.produce(topic, value=value, partition=partition, timestamp=timestamp_ms)


def accept_any_producer_timestamp(kafka, topic: str) -> None:
    """Make ``topic`` take whatever timestamp a producer sets, as a topic created by hand or on
    a broker older than Kafka 3.6 does: the pipeline's own guard is then all there is."""
    limit = ConfigEntry(
        "message.timestamp.after.max.ms",
        str(2**63 - 1),
        incremental_operation=AlterConfigOpType.SET,
    )
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[limit])
    for future in kafka.admin().incremental_alter_configs([resource]).values():
        future.result(timeout=15)


@pytest.mark.parametrize("first_applied", ["newer", "older"])
def test_newest_message_about_a_photo_wins_in_any_run_order(
    first_applied, resources, settings, kafka, mongo
):
    topic = settings.uploads_topic
    taken = "2026-05-01T12:00:00Z"
    produce(kafka, topic, 0, upload("edited", taken, *OLD), T0)
    produce(kafka, topic, 1, upload("edited", taken, *NEW), T0 + 60_000)
    # A neighbour of each place, so each location has its own event.
    produce(kafka, topic, 2, upload("near-old", taken, OLD[0] + 1e-5, OLD[1]), T0)
    produce(kafka, topic, 2, upload("near-new", taken, NEW[0] + 1e-5, NEW[1]), T0)

    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        # A new topic's partitions can take a tick or two to show their messages.
        requests: dict = {}
        for _ in range(5):
            requests |= {r.tags["snapmap/partition"]: r for r in harness.tick()}
            if len(requests) == 3:
                break
        assert set(requests) == {"0", "1", "2"}
        order = ["1", "0"] if first_applied == "newer" else ["0", "1"]
        for partition in [*order, "2"]:
            harness.execute(requests[partition])
        harness.execute(requests["0"])  # a replay of the old range, last of all

    db = mongo.db()
    photo = db.photos.find_one({"_id": "edited"})
    assert tuple(photo["location"]["coordinates"]) == NEW, json.dumps(photo, default=str)
    events = photo_events(db)
    assert events["edited"] == events["near-new"] != events["near-old"], events


def test_a_new_storage_url_for_a_linked_photo_rewrites_its_events_manifest(
    resources, settings, kafka, mongo, blob
):
    """The URL does not move the photo, so no recluster changes its event; the album must
    still follow the newest message (found by the breaker: the old URL stayed for good)."""
    topic = settings.uploads_topic
    taken = "2026-05-01T12:00:00Z"
    produce(kafka, topic, 0, upload("shot", taken, *OLD), T0)
    produce(kafka, topic, 0, upload("shot-2", taken, OLD[0] + 1e-5, OLD[1]), T0)
    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        harness.drain()
        event_id = mongo.db().photos.find_one({"_id": "shot"})["eventId"]
        assert album_urls(blob, event_id)["shot"] == "azure://photos/shot.jpg"

        moved = json.loads(upload("shot", taken, *OLD))
        moved["storageUrl"] = "azure://photos/shot-reupload.jpg"
        produce(kafka, topic, 0, json.dumps(moved).encode(), T0 + 60_000)
        harness.drain()

    assert mongo.db().photos.find_one({"_id": "shot"})["eventId"] == event_id
    assert album_urls(blob, event_id)["shot"] == "azure://photos/shot-reupload.jpg"


def album_urls(blob, event_id: str) -> dict[str, str]:
    with blob.service() as client:
        stored = client.get_blob_client(blob.manifest_container, f"{event_id}.json")
        album = json.loads(stored.download_blob().readall())
    return {p["photoId"]: p["storageUrl"] for p in album["photos"]}


def requests_by_partition(harness: Harness, partitions: int) -> dict[int, RunRequest]:
    """One tick's request per partition (a new topic's partitions can take a tick or two to
    show their messages)."""
    requests: dict[int, RunRequest] = {}
    for _ in range(10):
        requests |= {int(r.tags["snapmap/partition"]): r for r in harness.tick()}
        if len(requests) == partitions:
            return requests
        time.sleep(1)
    raise AssertionError(f"the sensor requested only partitions {sorted(requests)}")


def narrowed(request: RunRequest, first: int, last: int) -> RunRequest:
    """``request`` for offsets first..last of its partition only (another split into runs)."""
    config = json.loads(json.dumps(request.run_config))
    config["ops"]["photo_uploads"]["config"] |= {"first_offset": first, "last_offset": last}
    tags = dict(request.tags) | {"snapmap/offsets": f"{first}-{last}"}
    return RunRequest(run_key=f"{request.run_key}/{first}-{last}", run_config=config, tags=tags)


MID = (2.3550, 48.8550)  # a third place, published between the two others
# Messages about one photo, published in this order, as (partition, publish time, place): the
# second one is behind the first on the same partition, as from a producer whose clock went
# back (or a second producer with a slower clock). The newest by publish time is NEW.
SPLITS = {
    # offsets of partition 0 per run, in the order the runs are executed
    "one run": [(0, 1)],
    "two runs in order": [(0, 0), (1, 1)],
    "two runs reversed": [(1, 1), (0, 0)],
}


@pytest.mark.parametrize("partition_1_first", [False, True], ids=["p0-first", "p1-first"])
@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
def test_the_winner_does_not_depend_on_how_the_messages_are_split_into_runs(
    split, partition_1_first, resources, settings, kafka, mongo
):
    """Found by a breaker: within a batch the last offset won, across batches the greatest
    version, so an older publish time at a higher offset won only when both were in one run."""
    topic = settings.uploads_topic
    taken = "2026-05-01T12:00:00Z"
    produce(kafka, topic, 0, upload("edited", taken, *NEW), T0 + 60_000)
    produce(kafka, topic, 0, upload("edited", taken, *OLD), T0)
    produce(kafka, topic, 1, upload("edited", taken, *MID), T0 + 30_000)

    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        requests = requests_by_partition(harness, 2)
        runs = [narrowed(requests[0], first, last) for first, last in split]
        runs.insert(0 if partition_1_first else len(runs), requests[1])
        for run in runs:
            harness.execute(run)

    photo = mongo.db().photos.find_one({"_id": "edited"})
    assert tuple(photo["location"]["coordinates"]) == NEW, json.dumps(photo, default=str)
    assert photo["source"]["partition"] == 0 and photo["source"]["offset"] == 0


def test_a_producer_timestamp_in_the_future_is_dead_lettered_and_outranks_nothing(
    resources, settings, kafka, mongo
):
    """Found by a breaker: a message stamped in 2100 passed the takenAt guard (which is
    relative to that same stamp), won over every later correction of its photo for good, and
    gave a new photo an uploadedAt in 2100, out of the sweeper's sight."""
    topic = settings.uploads_topic
    taken = "2026-05-01T12:00:00Z"
    year_2100 = int(datetime(2100, 1, 1, tzinfo=UTC).timestamp() * 1000)
    now = int(time.time() * 1000)
    accept_any_producer_timestamp(kafka, topic)
    produce(kafka, topic, 0, upload("edited", taken, *OLD), year_2100)
    produce(kafka, topic, 0, upload("edited", taken, *NEW), now)
    produce(kafka, topic, 1, upload("stamped-2100", taken, *MID), year_2100)
    # Half an hour ahead: a skewed producer clock, accepted; uploadedAt is not in the future.
    produce(kafka, topic, 2, upload("skewed", taken, *MID), now + 30 * 60_000)

    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        harness.drain()
    applied_by = datetime.now(UTC)

    db = mongo.db()
    photo = db.photos.find_one({"_id": "edited"})
    assert tuple(photo["location"]["coordinates"]) == NEW, json.dumps(photo, default=str)
    assert db.photos.find_one({"_id": "stamped-2100"}) is None
    skewed = db.photos.find_one({"_id": "skewed"})
    assert skewed["eventId"] is not None
    assert skewed["uploadedAt"].replace(tzinfo=UTC) <= applied_by
    letters = {(d["partition"], d["offset"]): d for d in db.dead_letters.find({})}
    assert set(letters) == {(0, 0), (1, 0)}
    assert {d["code"] for d in letters.values()} == {"publish_time_in_future"}
    assert "2100-01-01" in letters[(0, 0)]["reason"]

    # Every offset ended applied or dead-lettered, and the group committed them all.
    with kafka.consumer() as consumer:
        committed = kafka.committed(consumer, topic, [0, 1, 2])
    for partition, end in ((0, 2), (1, 1), (2, 1)):
        account = account_partition(db, topic, partition, 0, end, committed[partition])
        assert account.ok and account.pending == 0 and committed[partition] == end, account


def test_a_timestamp_past_the_year_9999_is_dead_lettered_not_a_crash(
    resources, settings, kafka, mongo
):
    """Found by a breaker: a producer timestamp no datetime holds (the year 10000, 2**62 ms)
    raised ValueError in the ingest step, so every run of its range failed, the rest of the
    batch was never validated and the partition never committed again."""
    topic = settings.uploads_topic
    taken = "2026-05-01T12:00:00Z"
    accept_any_producer_timestamp(kafka, topic)
    year_10000 = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp() * 1000) + 1000
    produce(kafka, topic, 0, upload("far", taken, *OLD), year_10000)
    produce(kafka, topic, 0, upload("farther", taken, *MID), 2**62)
    produce(kafka, topic, 0, upload("fine", taken, *NEW), int(time.time() * 1000))

    with instance_for_test() as instance:
        Harness(instance, resources).drain()

    db = mongo.db()
    assert db.photos.find_one({"_id": "fine"})["eventId"] is not None
    assert db.photos.count_documents({"_id": {"$in": ["far", "farther"]}}) == 0
    letters = {d["offset"]: d for d in db.dead_letters.find({})}
    assert set(letters) == {0, 1}
    assert {d["code"] for d in letters.values()} == {"publish_time_in_future"}
    assert "after the year 9999" in letters[1]["reason"]
    with kafka.consumer() as consumer:
        committed = kafka.committed(consumer, topic, [0])
    account = account_partition(db, topic, 0, 0, 3, committed[0])
    assert account.ok and account.pending == 0 and committed[0] == 3, account


def test_a_range_read_again_later_keeps_a_future_stamped_message_dead_lettered(
    resources, settings, kafka, mongo, blob
):
    """A stamp two hours ahead is no longer in the future three hours later: a replay then
    must still dead-letter it (the first read's outcome), not apply it as well."""
    topic = settings.uploads_topic
    taken = "2026-05-01T12:00:00Z"
    ahead = datetime.now(UTC) + timedelta(hours=2)
    accept_any_producer_timestamp(kafka, topic)
    produce(kafka, topic, 0, upload("edited", taken, *NEW), T0)
    produce(kafka, topic, 0, upload("edited", taken, *OLD), int(ahead.timestamp() * 1000))
    with instance_for_test() as instance:
        Harness(instance, resources).drain()
    db = mongo.db()
    assert db.dead_letters.find_one({"offset": 1})["code"] == "publish_time_in_future"

    # The same range read again, as a run three hours from now would see it.
    messages, _ = kafka.read_range(OffsetRange(topic, 0, 0, 1, kafka.topic_id(topic)))
    later = ahead + timedelta(hours=1)
    topic_id = kafka.topic_id(topic)
    held = held_back_before(db, messages, topic_id)
    valid, rejected = split_batch(messages, blob, topic_id, later, held)
    assert held == {1: "publish_time_in_future"}
    assert [(r.offset, r.code) for r in rejected] == [(1, "publish_time_in_future")]
    assert valid["edited"][1]["offset"] == 0
    # Without the record of the first read's outcome the later read would apply it.
    valid, rejected = split_batch(messages, blob, topic_id, later)
    assert not rejected and valid["edited"][1]["offset"] == 1


def test_a_range_read_again_later_keeps_an_unstamped_message_dead_lettered(
    resources, settings, kafka, mongo, blob
):
    """A message without a Kafka timestamp is bounded by the time it was read: a photo dated
    two days ahead is dead-lettered now, and a replay three days from now must still
    dead-letter it, not apply it as well."""
    topic = settings.uploads_topic
    ahead = (datetime.now(UTC) + timedelta(days=2)).isoformat(timespec="seconds")
    produce(kafka, topic, 0, upload("early", "2026-05-01T12:00:00Z", *OLD), T0)
    produce(kafka, topic, 0, upload("dated-ahead", ahead.replace("+00:00", "Z"), *OLD), -1)
    with instance_for_test() as instance:
        Harness(instance, resources).drain()
    db = mongo.db()
    assert db.dead_letters.find_one({"offset": 1})["code"] == "timestamp_out_of_range"

    messages, _ = kafka.read_range(OffsetRange(topic, 0, 0, 1, kafka.topic_id(topic)))
    later = datetime.now(UTC) + timedelta(days=3)
    topic_id = kafka.topic_id(topic)
    held = held_back_before(db, messages, topic_id)
    valid, rejected = split_batch(messages, blob, topic_id, later, held)
    assert held == {1: "timestamp_out_of_range"}
    assert [(r.offset, r.code) for r in rejected] == [(1, "timestamp_out_of_range")]
    assert set(valid) == {"early"}
    # Without the record of the first read's outcome the later read would apply it.
    valid, rejected = split_batch(messages, blob, topic_id, later)
    assert not rejected and set(valid) == {"early", "dated-ahead"}


def test_a_topic_the_pipeline_creates_refuses_a_producer_timestamp_hours_ahead(settings, kafka):
    """The broker's own guard (Kafka 3.6+): ``ensure_topics`` sets
    ``message.timestamp.after.max.ms`` to an hour, so such a message never reaches the log."""
    outcomes: list[KafkaError | None] = []
    ahead = int((datetime.now(UTC) + timedelta(hours=3)).timestamp() * 1000)
    with kafka.producer() as producer:
        producer.produce(
            settings.uploads_topic,
            value=upload("ahead", "2026-05-01T12:00:00Z", *NEW),
            partition=0,
            timestamp=ahead,
            on_delivery=lambda error, _message: outcomes.append(error),
        )
        producer.flush(15)
    assert len(outcomes) == 1 and outcomes[0] is not None, outcomes
    assert outcomes[0].code() == KafkaError.INVALID_TIMESTAMP, outcomes[0]


def test_a_newer_message_without_extra_fields_leaves_none_of_the_older_ones(mongo):
    """The stored photo is the newest message, its extra fields included: a correction that
    drops an extra field must not keep the older message's value of it."""
    db = mongo.db()
    taken = datetime(2026, 5, 1, 12, tzinfo=UTC)
    tagged = PhotoUpload("edited", taken, *OLD, "azure://photos/a.jpg", {"album": "old trip"})
    plain = PhotoUpload("edited", taken, *NEW, "azure://photos/a.jpg")
    source = {"topic": "photo-uploads", "partition": 0, "topicId": None}
    published = datetime.fromtimestamp(T0 / 1000, UTC)

    upsert_uploads(db, [(tagged, source | {"offset": 0}, published)])
    assert json.loads(db.photos.find_one({"_id": "edited"})["extraJson"]) == {"album": "old trip"}
    upsert_uploads(db, [(plain, source | {"offset": 1}, published)])

    photo = db.photos.find_one({"_id": "edited"})
    assert tuple(photo["location"]["coordinates"]) == NEW
    assert "extraJson" not in photo, photo["extraJson"]
