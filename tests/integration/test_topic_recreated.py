"""``photo-uploads`` deleted and created again under the same name (an operator's mistake, a
rebuilt cluster): the new topic starts again at offset 0 with a new topic id. The sensor must
start the new topic from its beginning, and the group's offset may move only over ranges
applied from the new topic, never over the deleted topic's ranges of the same offsets."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicCollection
from dagster import SensorResult, build_sensor_context, instance_for_test
from dagster._daemon.auto_run_reexecution.auto_run_reexecution import should_retry

from snapmap_pipeline.cli import account_partition, collect_stats
from snapmap_pipeline.jobs import INGEST_JOB_NAME
from snapmap_pipeline.resources.kafka import KafkaResource
from snapmap_pipeline.sensors.kafka_sensor import photo_uploads_sensor
from snapmap_pipeline.simulator.__main__ import collect_summary
from snapmap_pipeline.store.dead_letters import send_dead_letters, with_original_bytes
from snapmap_pipeline.store.poison import recluster_isolating_poison
from tests.integration.pipeline import Harness, publish, upload
from tests.integration.sweeper_data import cli_env, snapmap
from tests.integration.test_ingestion import changed, committed, read_all

pytestmark = [pytest.mark.kafka, pytest.mark.storage, pytest.mark.sensor]

OLD_MESSAGES = 12
NEW_MESSAGES = 5


def uploads(prefix: str, count: int, invalid_at: int) -> list[bytes]:
    """``count`` photos 20 m and one minute apart (one event), one invalid message among them."""
    values = [
        upload(f"{prefix}-{i}", f"2026-03-02T10:{i:02d}:00Z", 2.3522, 48.8566 + i * 1.8e-4)
        for i in range(count)
    ]
    values[invalid_at] = b"[1, 2, 3]"
    return values


def topic_id_of(kafka: KafkaResource, topic: str) -> str | None:
    """The topic's id as Kafka's tools print it (asked here, not through the product's code),
    or None while the topic does not exist."""
    admin = kafka.admin()
    future = admin.describe_topics(TopicCollection([topic]), request_timeout=10)[topic]
    try:
        uuid = future.result(timeout=15).topic_id
    except KafkaException as error:
        if error.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return None
        raise
    return str(uuid).replace("+", "-").replace("/", "_")


def recreate(kafka: KafkaResource, topic: str, partitions: int) -> str:
    """Delete ``topic``, create it again, and return the new topic's id."""
    old_id = topic_id_of(kafka, topic)
    admin = kafka.admin()
    admin.delete_topics([topic], operation_timeout=10)[topic].result(timeout=15)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kafka.ensure_topics({topic: partitions})
        new_id = topic_id_of(kafka, topic)
        if new_id not in (None, old_id):
            return new_id
        time.sleep(0.5)
    raise AssertionError(f"{topic} was not created again within 30 s")


def evaluate(instance, resources: dict, cursor: str | None) -> SensorResult:
    with build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        result = photo_uploads_sensor(context)
    assert isinstance(result, SensorResult), result
    return result


def offsets_of(request) -> tuple[int, int]:
    config = request.run_config["ops"]["photo_uploads"]["config"]
    return config["first_offset"], config["last_offset"]


@pytest.fixture
def small_runs(resources, settings) -> dict:
    """Four offsets per run (a recreated topic's first range must not be one run), and failed
    ranges requested again at once (so a tick would show it)."""
    return {**resources, "settings": changed(settings, max_messages_per_run=4, heal_after_s=0)}


def applied_then_recreated(harness: Harness, kafka: KafkaResource, topic: str) -> str:
    """12 messages applied and committed on the first topic, then the topic recreated with 5
    new ones (fewer: every new offset is also an applied offset of the deleted topic). An
    invalid message sits at offset 3 of both topics. Returns the new topic's id."""
    publish(kafka, topic, uploads("old", OLD_MESSAGES, invalid_at=3), partition=0)
    harness.drain()
    assert committed(kafka, topic) == {0: OLD_MESSAGES}
    new_id = recreate(kafka, topic, partitions=3)
    assert committed(kafka, topic) == {}  # Kafka drops a deleted topic's group offsets
    publish(kafka, topic, uploads("new", NEW_MESSAGES, invalid_at=3), partition=0)
    return new_id


def assert_new_topic_applied(db, kafka: KafkaResource, topic: str, new_id: str) -> None:
    """Every new offset applied or dead-lettered, all of them committed, and the product's
    accounting agrees."""
    assert committed(kafka, topic) == {0: NEW_MESSAGES}
    linked = {d["_id"]: d.get("eventId") for d in db.photos.find({"_id": {"$regex": "^new-"}})}
    assert sorted(linked) == ["new-0", "new-1", "new-2", "new-4"]
    assert all(linked.values()), linked
    letter = db.dead_letters.find_one({"_id": f"{topic}/0/3"})
    assert (letter["topicId"], letter["code"]) == (new_id, "not_object")
    account = account_partition(db, topic, 0, 0, NEW_MESSAGES, NEW_MESSAGES, new_id)
    assert account.ok, account
    assert (account.applied, account.pending, account.dead_lettered) == (NEW_MESSAGES, 0, 1)


def test_sensor_restarts_a_recreated_topic_from_its_beginning(
    small_runs, settings, kafka, mongo, capfd
):
    topic = settings.uploads_topic
    db = mongo.db()
    with instance_for_test() as instance:
        harness = Harness(instance, small_runs)
        new_id = applied_then_recreated(harness, kafka, topic)

        result = evaluate(instance, small_runs, harness.cursor)
        # Before: the cursor stayed at 12, beyond the new end offset 5; nothing was requested
        # and the lag was -7.
        assert json.loads(result.cursor) == {"0": NEW_MESSAGES, "1": 0, "2": 0, "topic_id": new_id}
        assert [r.run_key for r in result.run_requests] == [
            f"{topic}/0/0-3@{new_id}",
            f"{topic}/0/4-4@{new_id}",
        ]
        (observation,) = result.asset_events
        assert observation.metadata["cursor_reset_partition"].value == 0
        assert observation.metadata["cursor_reset_from"].value == OLD_MESSAGES
        assert observation.metadata["cursor_reset_to"].value == 0
        tick_log = capfd.readouterr().err
        assert f"ERROR - {topic} was deleted and created again (topic id {new_id}" in tick_log

        harness.cursor = result.cursor
        for request in result.run_requests:
            harness.execute(request)
        assert_new_topic_applied(db, kafka, topic, new_id)
        assert harness.tick() == []


def test_only_the_current_topics_ranges_are_committed(small_runs, settings, kafka, mongo):
    """Even with a cursor started afresh on the new topic (an operator's reset), its ranges
    applied last-first: the commit must wait for offset 0 of the new topic, whatever the
    deleted topic's applied ranges say about the same offsets."""
    topic = settings.uploads_topic
    db = mongo.db()
    with instance_for_test() as instance:
        harness = Harness(instance, small_runs)
        new_id = applied_then_recreated(harness, kafka, topic)

        harness.cursor = None
        requests = harness.tick()
        assert [offsets_of(r) for r in requests] == [(0, 3), (4, 4)]
        harness.execute(requests[1])
        # Before: the walk went through the deleted topic's 0-3, the new 4-4, then the deleted
        # topic's 5-11 and committed 12, past offsets 0-3 of the new topic, never applied.
        assert committed(kafka, topic) == {}
        harness.execute(requests[0])
        assert_new_topic_applied(db, kafka, topic, new_id)


def test_a_run_planned_on_the_deleted_topic_applies_nothing(small_runs, settings, kafka, mongo):
    """A range requested before the deletion and run after it would read the new topic's
    messages as the old range's: it fails, records nothing, and is not requested again."""
    topic = settings.uploads_topic
    db = mongo.db()
    with instance_for_test() as instance:
        harness = Harness(instance, small_runs)
        publish(kafka, topic, uploads("old", 3, invalid_at=1), partition=0)
        (stale,) = harness.tick()
        new_id = recreate(kafka, topic, partitions=3)
        publish(kafka, topic, uploads("new", NEW_MESSAGES, invalid_at=3), partition=0)

        run = harness.execute(stale, raise_on_error=False)
        assert not run.success
        (failure,) = [e for e in run.all_events if e.is_step_failure]
        cause = failure.event_specific_data.error.cause
        assert cause.cls_name == "TopicRecreated"
        assert "deleted and created again" in cause.message
        assert db.batches.count_documents({}) == 0
        assert db.photos.count_documents({}) == 0

        requests = harness.tick()
        assert [(offsets_of(r), r.tags.get("snapmap/heal_attempt")) for r in requests] == [
            ((0, 3), None),
            ((4, 4), None),
        ]
        for request in requests:
            harness.execute(request)
        assert_new_topic_applied(db, kafka, topic, new_id)
        assert harness.tick() == []


def test_a_deleted_topics_runs_neither_hold_the_partition_nor_retry(small_runs, settings, kafka):
    """A run planned on the deleted topic can never succeed: it must not count as the
    partition's unfinished run, and Dagster's run retries must leave it alone, while a
    transient failure of the same job is still retried."""
    topic = settings.uploads_topic
    resources = {
        **small_runs,
        "settings": changed(small_runs["settings"], max_pending_runs_per_partition=1),
    }
    retries = {"run_retries": {"enabled": True, "max_retries": 3}}
    with instance_for_test(overrides=retries) as instance:
        harness = Harness(instance, resources)
        publish(kafka, topic, uploads("old", 3, invalid_at=1), partition=0)
        (stale,) = harness.tick()
        job = harness.definitions.resolve_job_def(INGEST_JOB_NAME)
        # Queued as the daemon would have queued it, before the topic was deleted.
        instance.create_run_for_job(
            job_def=job, run_config=stale.run_config, tags={**job.tags, **stale.tags}
        )
        new_id = recreate(kafka, topic, partitions=3)
        publish(kafka, topic, uploads("new", NEW_MESSAGES, invalid_at=3), partition=0)

        # Before: partition 0 counted the queued run of the deleted topic as busy and got
        # nothing until that run and its three retries had failed.
        requests = harness.tick()
        assert [r.run_key for r in requests] == [
            f"{topic}/0/0-3@{new_id}",
            f"{topic}/0/4-4@{new_id}",
        ]

        failed = harness.execute(stale, raise_on_error=False)
        assert not failed.success
        run = instance.get_run_by_id(failed.run_id)
        # Before: will_retry was "true", and the daemon would have run it three more times.
        assert run.tags.get("dagster/will_retry") == "false", run.tags
        assert run.tags["snapmap/topic_recreated"] == new_id
        assert not should_retry(run, instance)

        broken = {**resources, "settings": changed(settings, event_updates_topic="missing-topic")}
        transient = Harness(instance, broken).execute(requests[0], raise_on_error=False)
        assert not transient.success
        run = instance.get_run_by_id(transient.run_id)
        assert run.tags.get("dagster/will_retry") == "true", run.tags
        assert "dagster/max_retries" not in run.tags
        assert should_retry(run, instance)


def test_a_poison_letter_whose_offset_the_new_topic_lacks_is_sent_without_bytes(
    settings, kafka, mongo
):
    """A photo stored before topic ids were recorded, from offset 7 of a topic since deleted
    and created again with two messages: its poison letter cannot have its bytes. It is sent
    once, without them, saying why; before, every attempt raised KafkaUnavailable (an outage
    to the retry policy) and the photo was never dead-lettered."""
    topic = settings.uploads_topic
    recreate(kafka, topic, partitions=3)
    values = [upload(f"now-{i}", f"2026-03-02T10:0{i}:00Z", 2.35, 48.85) for i in range(2)]
    publish(kafka, topic, values, partition=0)
    db = mongo.db()
    db.photos.insert_many(
        [
            {
                "_id": photo_id,
                "location": {"type": "Point", "coordinates": [2.35, 48.85]},
                "takenAt": datetime(2026, 3, 2, 9, 0, tzinfo=UTC),
                "eventId": None,
                "source": {"topic": topic, "partition": 0, "offset": offset},
            }
            for photo_id, offset in (("legacy-7", 7), ("legacy-1", 1), ("now-0", 0))
        ]
    )

    def step(ids):
        raise ValueError(f"cannot cluster {ids}")

    def dead_letter(letters):
        return send_dead_letters(
            db, kafka, settings.dead_letter_topic, with_original_bytes(kafka, letters)
        )

    report, poisoned = recluster_isolating_poison(
        db, ["legacy-7", "legacy-1", "now-0"], step, dead_letter, max_attempts=1
    )
    assert sorted(poisoned) == ["legacy-1", "legacy-7", "now-0"]
    letters = {}
    for message in read_all(kafka, settings.dead_letter_topic):
        headers = dict(message.headers())
        offset = int(headers["snapmap.source.offset"])
        letters[offset] = (message.value(), headers["snapmap.error.reason"].decode())
    value, reason = letters[7]
    assert value is None
    assert reason.startswith(
        f"[original bytes unavailable: {topic}/0/7 is beyond the partition's end offset 2"
    ), reason
    # Offset 1 exists, but holds another photo's message: not taken for legacy-1's bytes.
    value, reason = letters[1]
    assert value is None and "holds another photo's message" in reason, reason
    value, reason = letters[0]
    assert value == values[0] and "unavailable" not in reason, reason
    flagged = db.photos.count_documents({"deadLettered": True})
    assert flagged == 3


def test_accounting_of_a_deleted_topic_says_it_does_not_exist(settings, kafka, mongo):
    topic = settings.uploads_topic
    kafka.admin().delete_topics([topic], operation_timeout=10)[topic].result(timeout=15)
    deadline = time.monotonic() + 30
    while topic_id_of(kafka, topic) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    env = cli_env(mongo.database, SNAPMAP_CONSUMER_GROUP=kafka.consumer_group)
    done = snapmap(["accounting", "--topic", topic], env)
    assert done.returncode == 1, done.stdout + done.stderr
    # Before: "snapmap: Kafka unavailable: topic ... is not available: ...UNKNOWN_TOPIC_OR_PART",
    # which reads like a broker outage.
    assert f"snapmap: topic {topic} does not exist on" in done.stderr, done.stderr
    assert "unavailable" not in done.stderr


def test_summary_counts_only_the_dead_letters_of_its_topic(settings, mongo):
    """A simulator report names the topic id it published to: letters at the same offsets of a
    deleted topic of the same name (with another id, or none) are not its run's."""
    topic = settings.uploads_topic
    db = mongo.db()
    db.dead_letters.insert_many(
        [
            {
                "_id": f"{topic}/0/3",
                "topic": topic,
                "partition": 0,
                "offset": 3,
                "code": "not_json",
                "topicId": "current-id",
            },
            {
                "_id": f"{topic}/0/4@old",
                "topic": topic,
                "partition": 0,
                "offset": 4,
                "code": "schema",
                "topicId": "deleted-id",
            },
            {"_id": f"{topic}/0/5", "topic": topic, "partition": 0, "offset": 5, "code": "schema"},
        ]
    )
    report = {
        "topic": topic,
        "topicId": "current-id",
        "backend": {"offsets": {"0": [0, 9]}},
        "stream": {"kinds": {"malformed": 1}},
    }
    run = collect_summary(db, collect_stats(db), report)["run"]
    # Before: 3 letters, two of them of the deleted topic.
    assert (run["found"]["deadLetters"], run["found"]["deadLettersByCode"]) == (1, {"not_json": 1})
    older = collect_summary(db, collect_stats(db), {**report, "topicId": None})["run"]
    assert older["found"]["deadLetters"] == 3  # a report without an id cannot tell them apart
