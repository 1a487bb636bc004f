"""Offset bookkeeping: which ranges are applied, and the contiguous commit.

A batch record names its topic by name and by the broker's topic id: a topic deleted and
created again under the same name starts again at offset 0, and only the ranges of the topic
that exists now may move its committed offset. Records written before ids were recorded are
taken as the current topic's by the first commit that sees them (they are stamped with its id).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pymongo.database import Database

from snapmap_pipeline.resources.kafka import KafkaResource
from snapmap_pipeline.store.lease import held_lease, lease_held, offsets_lease_id

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from snapmap_pipeline.assets.ingest import IngestedBatch


def record_batch(db: Database, batch: IngestedBatch) -> None:
    offsets = batch.offsets
    db.batches.update_one(
        {"_id": offsets.key},
        {
            "$set": {
                "topic": offsets.topic,
                "topicId": offsets.topic_id,
                "partition": offsets.partition,
                "first": offsets.first,
                "last": offsets.last,
                "read": batch.read,
                "valid": batch.valid,
                "deadLettered": batch.dead_lettered,
                "lostToRetention": batch.lost_to_retention,
                "status": "applied",
            },
            "$setOnInsert": {"appliedAt": datetime.now(UTC)},
        },
        upsert=True,
    )


def commit_contiguous(db: Database, kafka: KafkaResource, topic: str, partition: int) -> int:
    """Advance the group's committed offset over every applied range that starts at it.

    Ranges applied out of order wait until the gap before them is applied, so the committed
    offset never passes an offset that is still pending (cases.md #15). Read, walk and commit
    happen under the partition's offsets lease: Kafka keeps the last commit, not the highest,
    so two runs of one partition finishing together could otherwise move it backwards (the
    one that walked less committing last).

    Only ranges recorded with the topic's current id count: the ranges of a deleted topic of
    the same name cover offsets the current topic's messages have not been applied at."""
    lease_id = offsets_lease_id(topic, partition)
    with held_lease(db, lease_id) as token:
        topic_id = kafka.topic_id(topic)
        db.batches.update_many(
            {"topic": topic, "partition": partition, "topicId": None},
            {"$set": {"topicId": topic_id}},
        )
        with kafka.consumer() as consumer:
            low = kafka.watermarks(consumer, topic, partition).low
            # Offsets below the low watermark were deleted by retention (the sensor recorded
            # the gap); they can never be applied, so the commit does not wait for them.
            committed = max(kafka.committed(consumer, topic, [partition]).get(partition, low), low)
        position = committed
        while True:
            batch = db.batches.find_one(
                {
                    "topic": topic,
                    "topicId": topic_id,
                    "partition": partition,
                    "status": "applied",
                    "first": {"$lte": position},
                    "last": {"$gte": position},
                }
            )
            if batch is None:
                break
            position = batch["last"] + 1
        if position <= committed:
            return position
        # A holder paused past its lease (SIGSTOP, a long GC) must not commit: the next holder
        # may have committed further already. What is left is the moment between this check
        # and the commit, which Kafka cannot make conditional.
        if not lease_held(db, lease_id, token):
            log.warning(
                "offsets lease of %s/%d lost before committing %d; left to the next holder",
                topic,
                partition,
                position,
            )
            return committed
        # Likewise a topic recreated during the walk; what is left is the moment until the
        # commit below.
        if kafka.topic_id(topic) != topic_id:
            log.warning(
                "%s was deleted and created again before offset %d of partition %d was "
                "committed; not committing",
                topic,
                position,
                partition,
            )
            return committed
        kafka.commit_offset(topic, partition, position)
    return position
