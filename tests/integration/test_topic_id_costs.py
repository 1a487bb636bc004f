"""What the topic-id checks cost a micro-batch: describe round trips to the broker per run, and
the stamping of batch records written before topic ids were recorded (once per database, not
at every commit). A pre-upgrade record is still committed as the current topic's."""

from __future__ import annotations

from typing import ClassVar

import pytest
from confluent_kafka.admin import AdminClient
from dagster import instance_for_test
from pymongo import MongoClient, monitoring

from snapmap_pipeline.resources.kafka import KafkaResource
from snapmap_pipeline.store.batches import commit_contiguous
from tests.conftest import stack_setting
from tests.integration.pipeline import Harness, photo_events, publish, upload
from tests.integration.test_ingestion import committed
from tests.integration.test_offset_commits import applied

pytestmark = [pytest.mark.kafka, pytest.mark.storage]


class CountedAdmin:
    """The real admin client, with its ``describe_topics`` calls written down."""

    def __init__(self, admin: AdminClient, calls: list[str]) -> None:
        self._admin = admin
        self._calls = calls

    def describe_topics(self, topics, **kwargs):
        self._calls.extend(topics.topic_names)
        return self._admin.describe_topics(topics, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._admin, name)


class CountingKafka(KafkaResource):
    """The product's resource; every describe request it sends is counted (class-wide: Dagster
    builds the run's own copy of the resource)."""

    describes: ClassVar[list[str]] = []

    def admin(self):
        return CountedAdmin(super().admin(), CountingKafka.describes)


def test_one_run_asks_the_topic_id_three_times(resources, settings, kafka, mongo):
    """Before: four describe round trips per run, each on a new admin client (before and after
    the read, before the walk and before the commit). Now the walk takes the id the run saw
    after its read; the checks that guard the run remain: the one before the read (the run
    config's id may name a deleted topic), the one after it, the one before the commit."""
    values = [upload(f"d-{i}", f"2026-04-01T08:0{i}:00Z", 4.89 + i * 1e-5, 52.37) for i in range(5)]
    publish(kafka, settings.uploads_topic, values, partition=0)
    counting = {**resources, "kafka": CountingKafka(**kafka.model_dump())}
    with instance_for_test() as instance:
        harness = Harness(instance, counting)
        (request,) = harness.tick()
        CountingKafka.describes.clear()
        harness.execute(request)
    assert CountingKafka.describes == [settings.uploads_topic] * 3
    assert committed(kafka, settings.uploads_topic) == {0: 5}
    assert all(photo_events(mongo.db()).values())


class BatchUpdates(monitoring.CommandListener):
    """The multi-document updates sent to ``batches`` (each a scan on the local server)."""

    def __init__(self) -> None:
        self.count = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "update" and event.command.get("update") == "batches":
            self.count += sum(1 for u in event.command.get("updates", []) if u.get("multi"))

    def succeeded(self, event) -> None:
        pass

    def failed(self, event) -> None:
        pass


def test_pre_upgrade_records_are_stamped_once_and_committed(kafka, mongo, settings):
    topic = settings.uploads_topic
    publish(kafka, topic, [b"{}"] * 15, partition=0)
    topic_id = kafka.topic_id(topic)
    updates = BatchUpdates()
    client = MongoClient(
        stack_setting("MONGODB_URI"), event_listeners=[updates], w=1, tz_aware=True
    )
    try:
        db = client[mongo.database]
        applied(db, topic, 0, 4)
        applied(db, topic, 5, 9)

        assert commit_contiguous(db, kafka, topic, 0) == 10
        assert committed(kafka, topic) == {0: 10}
        assert {d.get("topicId") for d in db.batches.find()} == {topic_id}
        assert updates.count == 1

        applied(db, topic, 10, 14, topic_id)
        assert commit_contiguous(db, kafka, topic, 0) == 15
        assert committed(kafka, topic) == {0: 15}
        # Before: every commit sent the stamping update (a scan of batches) again.
        assert updates.count == 1
        marker = db.migrations.find_one({"_id": f"batches.topicId/{topic}"})
        assert (marker["topicId"], marker["stamped"]) == (topic_id, 2)
    finally:
        client.close()
