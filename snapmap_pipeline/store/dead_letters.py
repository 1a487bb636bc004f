"""Dead letters: a message that cannot be applied goes to the dead-letter topic with its
original bytes and headers that say why and where it came from, and is recorded in the
``dead_letters`` collection (keyed by source topic/partition/offset) so that a retried run does
not send it again and the offset accounting can find it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import Message
from pymongo import UpdateOne
from pymongo.database import Database

from snapmap_pipeline.resources.kafka import KafkaResource

MAX_REASON_CHARS = 500


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    code: str
    reason: str
    key: bytes | None
    value: bytes | None

    @property
    def source_key(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"

    @classmethod
    def from_message(cls, message: Message, code: str, reason: str) -> DeadLetter:
        return cls(
            message.topic(),
            message.partition(),
            message.offset(),
            code,
            reason[:MAX_REASON_CHARS],
            message.key(),
            message.value(),
        )

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("snapmap.error.code", self.code.encode()),
            ("snapmap.error.reason", self.reason.encode()),
            ("snapmap.source.topic", self.topic.encode()),
            ("snapmap.source.partition", str(self.partition).encode()),
            ("snapmap.source.offset", str(self.offset).encode()),
        ]


def send_dead_letters(
    db: Database, kafka: KafkaResource, topic: str, letters: list[DeadLetter]
) -> int:
    """Send the letters not sent before, wait for the broker's acks, then record them.
    Returns how many were sent now."""
    if not letters:
        return 0
    keys = [letter.source_key for letter in letters]
    already = {d["_id"] for d in db.dead_letters.find({"_id": {"$in": keys}}, {"_id": 1})}
    fresh = [letter for letter in letters if letter.source_key not in already]
    if fresh:
        kafka.send(topic, [(letter.key, letter.value, letter.headers()) for letter in fresh])
        now = datetime.now(UTC)
        db.dead_letters.bulk_write(
            [
                UpdateOne(
                    {"_id": letter.source_key},
                    {
                        "$setOnInsert": {
                            "topic": letter.topic,
                            "partition": letter.partition,
                            "offset": letter.offset,
                            "code": letter.code,
                            "reason": letter.reason,
                            "sentAt": now,
                        }
                    },
                    upsert=True,
                )
                for letter in fresh
            ],
            ordered=False,
        )
    return len(fresh)
