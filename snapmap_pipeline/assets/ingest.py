"""The first step of a micro-batch: read exactly its offset range, dead-letter what breaks the
contract, upsert the valid photos."""

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from confluent_kafka import TIMESTAMP_CREATE_TIME, Message
from dagster import AssetExecutionContext, Config, MetadataValue, Output, asset
from pymongo.database import Database

from snapmap_pipeline.contract.validation import (
    PUBLISH_TIME_IN_FUTURE,
    TIMESTAMP_OUT_OF_RANGE,
    InvalidUpload,
    PhotoUpload,
    check_publish_time,
    validate_upload,
)
from snapmap_pipeline.resources.blob import BlobStorageResource
from snapmap_pipeline.resources.kafka import KafkaResource, OffsetRange, TopicRecreated
from snapmap_pipeline.resources.mongo import MongoResource
from snapmap_pipeline.settings import PipelineSettings
from snapmap_pipeline.store.dead_letters import DeadLetter, send_dead_letters
from snapmap_pipeline.store.photos import newest_per_photo, upsert_uploads

OWNERS = ["team:data-engineering"]

# Dagster's run tag that caps a run's automatic retries (run_retries in dagster.yaml); 0 means
# the run is never retried, whatever the instance's max_retries.
MAX_RETRIES_TAG = "dagster/max_retries"


class OffsetRangeConfig(Config):
    """The micro-batch: offsets first..last (inclusive) of one partition of the topic with
    ``topic_id`` (None in run configs written before the sensor recorded topic ids: the run then
    takes the topic as it finds it)."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    topic_id: str | None = None

    def offsets(self) -> OffsetRange:
        return OffsetRange(
            self.topic, self.partition, self.first_offset, self.last_offset, self.topic_id
        )


@dataclass
class IngestedBatch:
    """What the clustering step needs from the ingest step (small: ids, not payloads)."""

    offsets: OffsetRange
    photo_ids: list[str]
    moved_event_ids: list[str] = field(default_factory=list)
    read: int = 0
    valid: int = 0
    dead_lettered: int = 0
    lost_to_retention: int = 0


def published_at(message: Message) -> datetime | None:
    """The message's Kafka timestamp; None when it has none. A timestamp past the year 9999
    (which no datetime holds) is from a broken clock: ``InvalidUpload``."""
    if not has_kafka_timestamp(message):
        return None
    _kind, millis = message.timestamp()
    try:
        return datetime.fromtimestamp(millis / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidUpload(
            PUBLISH_TIME_IN_FUTURE, f"Kafka timestamp {millis} ms is after the year 9999"
        ) from None


def producer_set_time(message: Message) -> datetime | None:
    """The message's timestamp when the producer set it (CreateTime); None for the broker's
    own time (LogAppendTime), which the pipeline trusts, and for no timestamp."""
    kind, _ = message.timestamp()
    return published_at(message) if kind == TIMESTAMP_CREATE_TIME else None


def has_kafka_timestamp(message: Message) -> bool:
    kind, millis = message.timestamp()
    return bool(kind) and millis > 0


def held_back_before(db: Database, messages: list[Message], topic_id: str | None) -> dict[int, str]:
    """Offsets among ``messages`` that an earlier read dead-lettered against the time it read
    them, with the code it gave: for a Kafka timestamp in the future, or, for a message
    without a Kafka timestamp, for a photo time out of range (its upper bound is then the read
    time). Both verdicts change as time passes; a replay of the range must still dead-letter
    the message, or its offset would end both dead-lettered and applied, and the replay would
    not reproduce the first outcome."""
    letters = {
        DeadLetter.from_message(message, PUBLISH_TIME_IN_FUTURE, "", topic_id).source_key: message
        for message in messages
    }
    if not letters:
        return {}
    held: dict[int, str] = {}
    for record in db.dead_letters.find(
        {"_id": {"$in": list(letters)}}, {"_id": 1, "code": 1, "topicId": 1}
    ):
        recorded_topic = record.get("topicId")
        same_topic = recorded_topic is None or topic_id is None or recorded_topic == topic_id
        message = letters[record["_id"]]
        code = record.get("code")
        read_time_verdict = code == PUBLISH_TIME_IN_FUTURE or (
            code == TIMESTAMP_OUT_OF_RANGE and not has_kafka_timestamp(message)
        )
        if read_time_verdict and same_topic:
            held[message.offset()] = code
    return held


def split_batch(
    messages: list[Message],
    blob: BlobStorageResource,
    topic_id: str | None = None,
    read_at: datetime | None = None,
    held_back: Mapping[int, str] | None = None,
) -> tuple[dict[str, tuple[PhotoUpload, dict, datetime | None]], list[DeadLetter]]:
    """Validate each message of the topic with ``topic_id``, read at ``read_at`` (default
    now). A producer timestamp more than ``MAX_PUBLISH_SKEW`` after ``read_at`` is not
    trusted. A message without a Kafka timestamp has its photo's time bounded by ``read_at``
    instead. The offsets in ``held_back`` (``held_back_before``: dead-lettered by an earlier
    read against its own read time) stay dead-lettered with the code they had. Per photoId the
    valid message with the greatest ``source_version`` wins, the order ``upsert_uploads``
    applies across batches, so the stored photo does not depend on how the messages were split
    into runs."""
    policy = blob.url_policy()
    read_at = read_at or datetime.now(UTC)
    valid: list[tuple[PhotoUpload, dict, datetime | None]] = []
    rejected: list[DeadLetter] = []
    for message in messages:
        source = {
            "topic": message.topic(),
            "partition": message.partition(),
            "offset": message.offset(),
            "topicId": topic_id,
        }
        try:
            if held_back and message.offset() in held_back:
                raise InvalidUpload(
                    held_back[message.offset()],
                    "dead-lettered when first read, against the time of that read; a re-read "
                    "keeps that outcome",
                )
            sent_at = published_at(message)
            check_publish_time(producer_set_time(message), read_at)
            upload = validate_upload(message.value(), policy, sent_at, read_at)
        except InvalidUpload as invalid:
            rejected.append(
                DeadLetter.from_message(message, invalid.code, invalid.reason, topic_id)
            )
            continue
        valid.append((upload, source, sent_at))
    return newest_per_photo(valid), rejected


def moved_events(
    db: Database, uploads: dict[str, tuple[PhotoUpload, dict, datetime | None]]
) -> list[str]:
    """Events that photos of this batch belonged to before their location or time changed:
    those events may lose members and must be reclustered too."""
    moved: set[str] = set()
    ids = list(uploads)
    for doc in db.photos.find(
        {"_id": {"$in": ids}, "eventId": {"$ne": None}}, {"location": 1, "takenAt": 1, "eventId": 1}
    ):
        upload = uploads[doc["_id"]][0]
        stored_lon, stored_lat = doc["location"]["coordinates"]
        if (stored_lon, stored_lat) != (upload.lon, upload.lat) or doc[
            "takenAt"
        ] != upload.taken_at:
            moved.add(doc["eventId"])
    return sorted(moved)


def of_current_topic(
    context: AssetExecutionContext, offsets: OffsetRange, kafka: KafkaResource
) -> OffsetRange:
    """``offsets`` with the topic's current id; raises ``TopicRecreated`` when the range was
    planned on a topic that has since been deleted and created again under the same name
    (reading it would apply the new topic's messages as the old range's: the sensor plans
    the new topic's offsets itself).

    Before raising, the run is tagged so that Dagster's run retries leave it alone: the
    range's messages are gone, and each retry would only fail again while its partition
    waits."""
    current = kafka.topic_id(offsets.topic)
    if offsets.topic_id is not None and offsets.topic_id != current:
        context.instance.add_run_tags(
            context.run_id, {MAX_RETRIES_TAG: "0", "snapmap/topic_recreated": current}
        )
        raise TopicRecreated(
            f"{offsets.key}: {offsets.topic} was deleted and created again (its id is now "
            f"{current}); the range's messages are gone, so this run cannot apply them and "
            "is tagged not to be retried"
        )
    return replace(offsets, topic_id=current)


@asset(
    group_name="ingest",
    kinds={"kafka", "mongodb"},
    owners=OWNERS,
    description=(
        "One micro-batch of photo-uploads: the offset range in the run config, read with "
        "assign+seek, validated against contract/photo-upload.schema.json. Invalid messages go "
        "to the dead-letter topic with their reason; valid photos are upserted into `photos`."
    ),
)
def photo_uploads(
    context: AssetExecutionContext,
    config: OffsetRangeConfig,
    kafka: KafkaResource,
    mongo: MongoResource,
    blob: BlobStorageResource,
    settings: PipelineSettings,
) -> Output[IngestedBatch]:
    # The producer for this run's dead letters and event updates gets its id while the batch
    # is read, instead of holding up the first send by about 0.5 s.
    kafka.start_sender()
    offsets = of_current_topic(context, config.offsets(), kafka)
    messages, lost = kafka.read_range(offsets)
    read_at = datetime.now(UTC)
    # Deleted and created again while this run read: the messages may be the new topic's.
    of_current_topic(context, offsets, kafka)
    if lost:
        context.log.warning(
            "%d offsets of %s were deleted by retention before this run read them",
            lost,
            offsets.key,
        )
    db = mongo.db()
    held_back = held_back_before(db, messages, offsets.topic_id)
    valid, rejected = split_batch(messages, blob, offsets.topic_id, read_at, held_back)
    sent = send_dead_letters(db, kafka, settings.dead_letter_topic, rejected)
    moved = moved_events(db, valid) if valid else []
    written = upsert_uploads(db, list(valid.values()))

    context.log.info(
        "%s: read %d messages, %d valid photos (%d written), %d dead-lettered (%d newly sent), "
        "%d lost to retention",
        offsets.key,
        len(messages),
        len(valid),
        written,
        len(rejected),
        sent,
        lost,
    )
    reasons: dict[str, int] = {}
    for letter in rejected:
        reasons[letter.code] = reasons.get(letter.code, 0) + 1
    batch = IngestedBatch(
        offsets=offsets,
        photo_ids=sorted(valid),
        moved_event_ids=moved,
        read=len(messages),
        valid=len(valid),
        dead_lettered=len(rejected),
        lost_to_retention=lost,
    )
    return Output(
        batch,
        metadata={
            "offset_range": offsets.key,
            "messages_read": len(messages),
            "photos_valid": len(valid),
            "photos_written": written,
            "dead_lettered": len(rejected),
            "lost_to_retention": lost,
            "dead_letter_reasons": MetadataValue.json(reasons),
        },
    )
