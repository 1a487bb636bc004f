"""Dead letters: a message that cannot be applied goes to the dead-letter topic with its
original bytes and headers that say why and where it came from, and is recorded in the
``dead_letters`` collection (keyed by source topic/partition/offset, with the topic's id) so that
a retried run does not send it again and the offset accounting can find it. A record of another
topic id is of a topic since deleted and created again under the same name: the new topic's
letter at that offset is sent and replaces the record.

A letter raised after ingest (a poison photo) carries no bytes: they are read back from its
source offset (``with_original_bytes``). When that offset no longer holds the photo's message
(its topic deleted, or deleted and created again; retention) the letter is sent without bytes
and its reason says why, so that the photo is dead-lettered once instead of failing every
retry. A message too large to copy (over ``MAX_LETTER_BYTES``, key and value together) is
sent without its bytes as well, its reason saying where they stay."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from confluent_kafka import Message
from pymongo import UpdateOne
from pymongo.database import Database

from snapmap_pipeline.resources.kafka import KafkaResource, OffsetRange, TopicMissing

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 500
# The most original bytes (key and value) a letter carries: below a producer's default
# message.max.bytes (1,000,000) and the broker's default max.message.bytes (1,048,588), with
# room for the headers. A message on photo-uploads can be larger (its producer and the topic
# allowed it); its letter goes without the bytes rather than failing every run of its range.
MAX_LETTER_BYTES = 900_000


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

    def __post_init__(self) -> None:
        # A reason may quote a value that JSON allows and UTF-8 cannot hold (half of a
        # surrogate pair, "\ud800"); escaped, it can be sent as a header and recorded.
        escaped = self.reason.encode("utf-8", "backslashreplace").decode("utf-8")
        if escaped != self.reason:
            object.__setattr__(self, "reason", escaped)

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
        key, value = message.key(), message.value()
        size = len(key or b"") + len(value or b"")
        if size > MAX_LETTER_BYTES:
            where = f"{message.topic()}/{message.partition()}/{message.offset()}"
            # The statement first: a long reason is cut at MAX_REASON_CHARS. Not logged here:
            # a letter is also made only to name its source offset (``held_back_before``).
            reason = (
                f"[original bytes not copied: the message's {size} bytes are more than a dead "
                f"letter carries ({MAX_LETTER_BYTES}); they stay at {where} until retention "
                f"deletes them] {reason}"
            )
            key = value = None
        return cls(
            message.topic(),
            message.partition(),
            message.offset(),
            code,
            reason[:MAX_REASON_CHARS],
            key,
            value,
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


def with_original_bytes(kafka: KafkaResource, letters: list[DeadLetter]) -> list[DeadLetter]:
    """``letters``, those without bytes completed with the bytes at their source offset; a
    letter whose source offset no longer holds its message gets a reason that says so and
    stays without bytes. Raises ``KafkaUnavailable`` only for an outage (to be retried)."""
    topic_ids: dict[str, str | None] = {}
    completed = []
    for letter in letters:
        if letter.value is None and letter.offset >= 0:
            letter = _completed(kafka, letter, topic_ids)
        completed.append(letter)
    return completed


def _completed(kafka: KafkaResource, letter: DeadLetter, topic_ids: dict) -> DeadLetter:
    where = f"{letter.topic}/{letter.partition}/{letter.offset}"
    if letter.topic not in topic_ids:
        try:
            topic_ids[letter.topic] = kafka.topic_id(letter.topic)
        except TopicMissing:
            topic_ids[letter.topic] = None
    current = topic_ids[letter.topic]
    if current is None:
        return _without_bytes(letter, f"{letter.topic} no longer exists")
    if letter.topic_id not in (None, current):
        return _without_bytes(
            letter, f"{letter.topic} was deleted and created again (id {current})"
        )
    with kafka.consumer() as consumer:
        marks = kafka.watermarks(consumer, letter.topic, letter.partition)
    if letter.offset >= marks.high:
        # Not an outage: the partition never reached this offset since its topic was created
        # again (a letter recorded before topic ids were), or the broker lost messages.
        return _without_bytes(
            letter,
            f"{where} is beyond the partition's end offset {marks.high} (its topic was deleted "
            "and created again, or the broker lost messages)",
        )
    messages, _ = kafka.read_range(
        OffsetRange(letter.topic, letter.partition, letter.offset, letter.offset)
    )
    if not messages:
        return _without_bytes(letter, f"{where} was deleted by retention")
    message = messages[0]
    if letter.topic_id is None and not _same_photo(letter, message.value()):
        return _without_bytes(letter, f"{where} holds another photo's message")
    return DeadLetter.from_message(message, letter.code, letter.reason, letter.topic_id)


def _same_photo(letter: DeadLetter, value: bytes | None) -> bool:
    """Whether ``value`` can be the message of the photo the letter is keyed by (the photo id).
    Asked of letters recorded before topic ids were: they cannot tell a recreated topic by its
    id, but the message at their offset then names another photo."""
    if letter.key is None or value is None:
        return True
    try:
        photo_id = json.loads(value).get("photoId")
    except (ValueError, AttributeError):
        return True
    return photo_id is None or photo_id == letter.key.decode(errors="replace")


def _without_bytes(letter: DeadLetter, why: str) -> DeadLetter:
    log.warning("dead letter of %s sent without its bytes: %s", letter.source_key, why)
    # The statement first: a long reason is cut at MAX_REASON_CHARS.
    reason = f"[original bytes unavailable: {why}] {letter.reason}"
    return replace(letter, reason=reason[:MAX_REASON_CHARS])


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
