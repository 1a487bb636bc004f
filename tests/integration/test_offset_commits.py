"""The consumer group's commit never moves backwards when two runs of one partition finish
together (the commit is read, walked and written under the partition's offsets lease)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import Consumer
from pymongo import MongoClient

from snapmap_pipeline.resources.kafka import KafkaResource, KafkaUnavailable
from snapmap_pipeline.store.batches import commit_contiguous
from snapmap_pipeline.store.lease import offsets_lease_id
from tests.conftest import stack_setting
from tests.integration.pipeline import publish
from tests.integration.test_ingestion import committed

pytestmark = [pytest.mark.kafka, pytest.mark.storage]

WALKED = threading.Event()  # the slow run has walked its ranges and is about to commit
HOLD_S = 3.0


class SlowCommit(KafkaResource):
    """A run whose commit request is slow to leave (a paused worker, a long GC)."""

    def commit_offset(self, topic: str, partition: int, next_offset: int) -> None:
        WALKED.set()
        threading.Event().wait(HOLD_S)
        super().commit_offset(topic, partition, next_offset)


def applied(db, topic: str, first: int, last: int, topic_id: str | None = None) -> None:
    """An applied batch record of partition 0; without ``topic_id``, as written before topic
    ids were recorded."""
    document = {
        "_id": f"{topic}/0/{first}-{last}",
        "topic": topic,
        "partition": 0,
        "first": first,
        "last": last,
        "status": "applied",
    }
    if topic_id is not None:
        document["topicId"] = topic_id
    db.batches.insert_one(document)


def test_a_slow_commit_finishing_last_does_not_move_the_offset_back(kafka, mongo, settings):
    topic = settings.uploads_topic
    publish(kafka, topic, [b"{}"] * 20, partition=0)
    db = mongo.db()
    applied(db, topic, 0, 9)
    slow = SlowCommit(**kafka.model_dump())
    WALKED.clear()
    results: dict[str, int] = {}
    first_run = threading.Thread(
        target=lambda: results.setdefault("slow", commit_contiguous(db, slow, topic, 0))
    )
    first_run.start()
    try:
        assert WALKED.wait(60), "the slow run never reached its commit"
        # The second run's range is applied while the first is still committing 10.
        applied(db, topic, 10, 19)
        results["fast"] = commit_contiguous(db, kafka, topic, 0)
    finally:
        first_run.join(120)
    assert results == {"slow": 10, "fast": 20}
    assert committed(kafka, topic) == {0: 20}


class LeaseTakenDuringWalk(KafkaResource):
    """A run paused past its offsets lease: by the time it has read the committed offset,
    another holder has been granted the lease (as after an expiry)."""

    mongo_uri: str
    database: str

    def committed(self, consumer, topic, partitions, coordinator_retry_s=None):
        found = super().committed(consumer, topic, partitions, coordinator_retry_s)
        with MongoClient(self.mongo_uri) as client:
            client[self.database].leases.update_one(
                {"_id": offsets_lease_id(topic, partitions[0])},
                {
                    "$set": {
                        "holder": "next-run",
                        "expiresAt": datetime.now(UTC) + timedelta(minutes=1),
                    },
                    "$inc": {"token": 1},
                },
            )
        return found


def test_a_run_that_lost_its_offsets_lease_does_not_commit(kafka, mongo, settings, caplog):
    topic = settings.uploads_topic
    publish(kafka, topic, [b"{}"] * 10, partition=0)
    db = mongo.db()
    applied(db, topic, 0, 9)
    late = LeaseTakenDuringWalk(
        **kafka.model_dump(), mongo_uri=stack_setting("MONGODB_URI"), database=mongo.database
    )

    assert commit_contiguous(db, late, topic, 0) == 0
    assert committed(kafka, topic) == {}
    assert any("lease" in r.getMessage() and "lost" in r.getMessage() for r in caplog.records)
    # The lease's next holder (here, once it has expired) commits the applied range.
    db.leases.update_one(
        {"_id": offsets_lease_id(topic, 0)},
        {"$set": {"expiresAt": datetime(1970, 1, 1, tzinfo=UTC)}},
    )
    assert commit_contiguous(db, kafka, topic, 0) == 10
    assert committed(kafka, topic) == {0: 10}


def test_a_consumer_subscribed_with_the_pipelines_group_blocks_commits_with_its_cause_named(
    kafka, settings
):
    """The pipeline commits from outside its group; the broker refuses that while another
    consumer is a member (UNKNOWN_MEMBER_ID). The error says so, and commits work again once
    that consumer leaves."""
    publish(kafka, settings.uploads_topic, [b"{}"] * 3, partition=0)
    intruder = Consumer(
        {
            "bootstrap.servers": kafka.bootstrap_servers,
            "group.id": kafka.consumer_group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        intruder.subscribe([settings.uploads_topic])
        deadline = time.monotonic() + 60
        while not intruder.assignment() and time.monotonic() < deadline:
            intruder.poll(0.5)
        assert intruder.assignment(), "the subscribed consumer never joined its group"

        with pytest.raises(KafkaUnavailable, match="has active members"):
            kafka.commit_offset(settings.uploads_topic, 0, 1)
    finally:
        intruder.close()

    kafka.commit_offset(settings.uploads_topic, 0, 1)
    assert committed(kafka, settings.uploads_topic)[0] == 1
