"""``photo-uploads`` deleted and created again under the same name (an operator's mistake, a
rebuilt cluster): the new topic starts again at offset 0 with a new topic id. The sensor must
start the new topic from its beginning, and the group's offset may move only over ranges
applied from the new topic, never over the deleted topic's ranges of the same offsets."""

from __future__ import annotations

import json
import time

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicCollection
from dagster import SensorResult, build_sensor_context, instance_for_test

from snapmap_pipeline.cli import account_partition
from snapmap_pipeline.resources.kafka import KafkaResource
from snapmap_pipeline.sensors.kafka_sensor import photo_uploads_sensor
from tests.integration.pipeline import Harness, publish, upload
from tests.integration.test_ingestion import changed, committed

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
