"""The consumer group's commit never moves backwards when two runs of one partition finish
together (the commit is read, walked and written under the partition's offsets lease)."""

from __future__ import annotations

import threading

import pytest

from snapmap_pipeline.resources.kafka import KafkaResource
from snapmap_pipeline.store.batches import commit_contiguous
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


def applied(db, topic: str, first: int, last: int) -> None:
    db.batches.insert_one(
        {
            "_id": f"{topic}/0/{first}-{last}",
            "topic": topic,
            "partition": 0,
            "first": first,
            "last": last,
            "status": "applied",
        }
    )


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
