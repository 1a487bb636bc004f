"""The first step of a micro-batch: read exactly its offset range, dead-letter what breaks the
contract, upsert the valid photos."""

from dataclasses import dataclass, field
from datetime import UTC, datetime

from confluent_kafka import Message
from dagster import AssetExecutionContext, Config, MetadataValue, Output, asset
from pymongo.database import Database

from snapmap_pipeline.contract.validation import InvalidUpload, PhotoUpload, validate_upload
from snapmap_pipeline.resources.blob import BlobStorageResource
from snapmap_pipeline.resources.kafka import KafkaResource, OffsetRange
from snapmap_pipeline.resources.mongo import MongoResource
from snapmap_pipeline.settings import PipelineSettings
from snapmap_pipeline.store.dead_letters import DeadLetter, send_dead_letters
from snapmap_pipeline.store.photos import upsert_uploads

OWNERS = ["team:data-engineering"]


class OffsetRangeConfig(Config):
    """The micro-batch: offsets first..last (inclusive) of one partition."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int

    def offsets(self) -> OffsetRange:
        return OffsetRange(self.topic, self.partition, self.first_offset, self.last_offset)


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
    kind, millis = message.timestamp()
    return datetime.fromtimestamp(millis / 1000, UTC) if kind and millis > 0 else None


def split_batch(
    messages: list[Message], blob: BlobStorageResource
) -> tuple[dict[str, tuple[PhotoUpload, dict, datetime]], list[DeadLetter]]:
    """Validate each message; the last valid message per photoId wins within a batch."""
    policy = blob.url_policy()
    valid: dict[str, tuple[PhotoUpload, dict, datetime]] = {}
    rejected: list[DeadLetter] = []
    for message in messages:
        sent_at = published_at(message)
        source = {
            "topic": message.topic(),
            "partition": message.partition(),
            "offset": message.offset(),
        }
        try:
            upload = validate_upload(message.value(), policy, sent_at)
        except InvalidUpload as invalid:
            rejected.append(DeadLetter.from_message(message, invalid.code, invalid.reason))
            continue
        valid[upload.photo_id] = (upload, source, sent_at or datetime.now(UTC))
    return valid, rejected


def moved_events(db: Database, uploads: dict[str, tuple[PhotoUpload, dict, datetime]]) -> list[str]:
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
    offsets = config.offsets()
    messages, lost = kafka.read_range(offsets)
    if lost:
        context.log.warning(
            "%d offsets of %s were deleted by retention before this run read them",
            lost,
            offsets.key,
        )
    valid, rejected = split_batch(messages, blob)
    db = mongo.db()
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
