"""Dead letters: a message that cannot be applied goes to the dead-letter topic with its
original bytes and headers that say why and where it came from, and is recorded in the
``dead_letters`` collection (keyed by source topic/partition/offset, with the topic's id) so that
a retried run does not send it again and the offset accounting can find it. A record of another
topic id is of a topic since deleted and created again under the same name: the new topic's
letter at that offset is sent and replaces the record."""

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
    # The broker's id of the source topic; None when the caller did not know it.
    topic_id: str | None = None

    @property
    def source_key(self) -> str:
        """``topic/partition/offset``; a letter with no source offset (a photo stored by the
        upload backend whose message never arrived) adds its key, the photo id, so that two
        such photos get two letters rather than one taken for the other's."""
        plain = f"{self.topic}/{self.partition}/{self.offset}"
        if self.offset < 0 and self.key is not None:
            return f"{plain}/{self.key.decode(errors='replace')}"
        return plain

    @classmethod
    def from_message(
        cls, message: Message, code: str, reason: str, topic_id: str | None = None
    ) -> DeadLetter:
        return cls(
            message.topic(),
            message.partition(),
            message.offset(),
            code,
            reason[:MAX_REASON_CHARS],
            message.key(),
            message.value(),
            topic_id,
        )

    def headers(self) -> list[tuple[str, bytes]]:
        headers = [
            ("snapmap.error.code", self.code.encode()),
            ("snapmap.error.reason", self.reason.encode()),
            ("snapmap.source.topic", self.topic.encode()),
            ("snapmap.source.partition", str(self.partition).encode()),
            ("snapmap.source.offset", str(self.offset).encode()),
        ]
        if self.topic_id is not None:
            headers.append(("snapmap.source.topic_id", self.topic_id.encode()))
        return headers

    def sent_before(self, record: dict) -> bool:
        """Whether ``record`` (of this letter's source key) is this letter's, not a letter of
        a deleted topic of the same name; records and letters without an id match any."""
        recorded = record.get("topicId")
        return recorded is None or self.topic_id is None or recorded == self.topic_id


def send_dead_letters(
    db: Database, kafka: KafkaResource, topic: str, letters: list[DeadLetter]
) -> int:
    """Send the letters not sent before, wait for the broker's acks, then record them.
    Returns how many were sent now."""
    if not letters:
        return 0
    keys = [letter.source_key for letter in letters]
    records = {
        d["_id"]: d for d in db.dead_letters.find({"_id": {"$in": keys}}, {"_id": 1, "topicId": 1})
    }
    fresh = [
        letter
        for letter in letters
        if letter.source_key not in records or not letter.sent_before(records[letter.source_key])
    ]
    if fresh:
        kafka.send(topic, [(letter.key, letter.value, letter.headers()) for letter in fresh])
        now = datetime.now(UTC)
        db.dead_letters.bulk_write(
            [record_of(letter, records, now) for letter in fresh], ordered=False
        )
    return len(fresh)


def record_of(letter: DeadLetter, records: dict[str, dict], now: datetime) -> UpdateOne:
    """The write that records a sent letter: inserted once; a deleted topic's record of the
    same source key is replaced (only while it still names that topic)."""
    fields = {
        "topic": letter.topic,
        "partition": letter.partition,
        "offset": letter.offset,
        "code": letter.code,
        "reason": letter.reason,
        "sentAt": now,
    }
    if letter.topic_id is not None:
        fields["topicId"] = letter.topic_id
    previous = records.get(letter.source_key)
    if previous is None:
        return UpdateOne({"_id": letter.source_key}, {"$setOnInsert": fields}, upsert=True)
    return UpdateOne(
        {"_id": letter.source_key, "topicId": previous.get("topicId")}, {"$set": fields}
    )
