"""Offset bookkeeping: which ranges are applied, and the contiguous commit.

A batch record names its topic by name and by the broker's topic id: a topic deleted and
created again under the same name starts again at offset 0, and only the ranges of the topic
that exists now may move its committed offset. Records written before ids were recorded are
taken as the current topic's once: the first commit of a topic in a database stamps them with
the topic's id and records that it did in ``migrations`` (``stamp_legacy_batches``). A record
without an id written after that (by a worker of the previous version still finishing its run
during an upgrade) still counts as the current topic's, whatever it is by then.
"""

from __future__ import annotations

import logging
import threading
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


# (database, topic) pairs whose legacy records this process knows are stamped: the migration's
# marker is read once per process, not at every commit.
_STAMPED: set[tuple[str, str]] = set()
_STAMPED_LOCK = threading.Lock()


def stamp_legacy_batches(db: Database, topic: str, topic_id: str) -> int:
    """Stamp ``topic``'s batch records written before ids were recorded with ``topic_id``, once
    per database: later calls read the marker in ``migrations`` (or, in this process, not even
    that). Returns how many records were stamped now."""
    key = (db.name, topic)
    if key in _STAMPED:
        return 0
    marker = f"batches.topicId/{topic}"
    stamped = 0
    if db.migrations.find_one({"_id": marker}, {"_id": 1}) is None:
        stamped = db.batches.update_many(
            {"topic": topic, "topicId": None}, {"$set": {"topicId": topic_id}}
        ).modified_count
        db.migrations.update_one(
            {"_id": marker},
            {"$setOnInsert": {"topicId": topic_id, "stamped": stamped, "at": datetime.now(UTC)}},
            upsert=True,
        )
        log.info("stamped %d batch records of %s with topic id %s", stamped, topic, topic_id)
    with _STAMPED_LOCK:
        _STAMPED.add(key)
    return stamped


def commit_contiguous(db: Database, kafka: KafkaResource, topic: str, partition: int) -> int:
    """Advance the group's committed offset over every applied range that starts at it.

    Ranges applied out of order wait until the gap before them is applied, so the committed
    offset never passes an offset that is still pending (cases.md #15). Read, walk and commit
    happen under the partition's offsets lease: Kafka keeps the last commit, not the highest,
    so two runs of one partition finishing together could otherwise move it backwards (the
    one that walked less committing last).

    Only ranges recorded with the topic's current id count: the ranges of a deleted topic of
    the same name cover offsets the current topic's messages have not been applied at. The
    walk takes the id the run last saw (no broker round trip); the id is asked afresh right
    before the commit, and a topic recreated in between gets one more walk with its new id."""
    lease_id = offsets_lease_id(topic, partition)
    with held_lease(db, lease_id) as token:
        topic_id = kafka.known_topic_id(topic)
        stamp_legacy_batches(db, topic, topic_id)
        for attempt in range(2):
            committed, position = walk_applied(db, kafka, topic, partition, topic_id)
            if position <= committed:
                return position
            # A holder paused past its lease (SIGSTOP, a long GC) must not commit: the next
            # holder may have committed further already. What is left is the moment between
            # this check and the commit, which Kafka cannot make conditional.
            if not lease_held(db, lease_id, token):
                log.warning(
                    "offsets lease of %s/%d lost before committing %d; left to the next holder",
                    topic,
                    partition,
                    position,
                )
                return committed
            # Likewise a topic recreated before or during the walk; what is left is the moment
            # until the commit below.
            current = kafka.topic_id(topic)
            if current == topic_id:
                kafka.commit_offset(topic, partition, position)
                return position
            log.warning(
                "%s was deleted and created again (id %s, was %s) before offset %d of partition "
                "%d was committed; %s",
                topic,
                current,
                topic_id,
                position,
                partition,
                "walking the new topic's ranges" if attempt == 0 else "not committing",
            )
            topic_id = current
    return committed


def walk_applied(
    db: Database, kafka: KafkaResource, topic: str, partition: int, topic_id: str
) -> tuple[int, int]:
    """The group's committed offset, and the offset after the applied ranges of the topic with
    ``topic_id`` (or without an id) that follow it contiguously."""
    with kafka.consumer() as consumer:
        low = kafka.watermarks(consumer, topic, partition).low
        # Offsets below the low watermark were deleted by retention (the sensor recorded the
        # gap); they can never be applied, so the commit does not wait for them.
        committed = max(kafka.committed(consumer, topic, [partition]).get(partition, low), low)
    position = committed
    while True:
        batch = db.batches.find_one(
            {
                "topic": topic,
                "topicId": {"$in": [topic_id, None]},
                "partition": partition,
                "status": "applied",
                "first": {"$lte": position},
                "last": {"$gte": position},
            }
        )
        if batch is None:
            return committed, position
        position = batch["last"] + 1
