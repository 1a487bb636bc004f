"""A stand-in for the upload backend: what it does for each upload, against real servers.

For a photo it stores, in this order, as the real backend does: the image in Blob Storage
(``<container>/<photoId>.jpg``, a small real JPEG), the photo document in MongoDB ``photos``
(upsert by ``_id``), and only then the message on ``photo-uploads``, keyed by photoId. A lost
record is stored but never produced; a duplicate or malformed record is produced only.

Writes are batched (one ``bulk_write`` and a pool of blob uploads per batch, produced
asynchronously with delivery reports) and every call is bounded by a timeout. A batch holds
only records due within ``STORE_AHEAD_S`` of its first one, so a photo document never waits
long for its message (the sweeper would take it for a lost one). Any failure raises
``BackendError``: a demo that silently loses uploads would explain nothing.
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache

from azure.core.exceptions import AzureError, ResourceExistsError
from azure.storage.blob import BlobServiceClient, ContainerClient, ContentSettings
from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicCollection
from confluent_kafka.admin import AdminClient
from PIL import Image, ImageDraw
from pymongo import MongoClient, UpdateOne
from pymongo.errors import PyMongoError

from snapmap_pipeline.simulator.generator import DEFAULT_CONTAINER, RecordKind, UploadRecord

log = logging.getLogger(__name__)

STORE_AHEAD_S = 1.0
BLOB_WORKERS = 8  # Azure SDK sessions pool 10 connections; Azurite gains little past 8

# Due time of a record, in seconds after the start: (position among records, record) -> s.
Schedule = Callable[[int, UploadRecord], float]


class BackendError(RuntimeError):
    """A server refused or did not answer in time; the simulation stops."""


@dataclass(frozen=True)
class BackendSettings:
    """Where the simulated backend writes. Kafka security settings are passed through to
    librdkafka unchanged (``security.protocol``, ``sasl.*``, ``ssl.ca.location``)."""

    bootstrap_servers: str
    mongodb_uri: str
    database: str
    blob_connection_string: str
    topic: str = "photo-uploads"
    container: str = DEFAULT_CONTAINER
    write_concern: str = "1"
    kafka_security: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 10.0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], **overrides: object) -> BackendSettings:
        """Settings from the variables that ``scripts/env.sh`` exports; ``overrides`` win."""
        missing = [
            name
            for name in (
                "KAFKA_BOOTSTRAP_SERVERS",
                "MONGODB_URI",
                "AZURE_STORAGE_CONNECTION_STRING",
            )
            if not environ.get(name)
        ]
        if missing:
            raise BackendError(f"{', '.join(missing)} not set: run `source scripts/env.sh` first")
        security = {
            "security.protocol": environ.get("KAFKA_SECURITY_PROTOCOL", ""),
            "sasl.mechanism": environ.get("KAFKA_SASL_MECHANISM", ""),
            "sasl.username": environ.get("KAFKA_SASL_USERNAME", ""),
            "sasl.password": environ.get("KAFKA_SASL_PASSWORD", ""),
            "ssl.ca.location": environ.get("KAFKA_SSL_CA_LOCATION", ""),
        }
        values: dict[str, object] = {
            "bootstrap_servers": environ["KAFKA_BOOTSTRAP_SERVERS"],
            "mongodb_uri": environ["MONGODB_URI"],
            "database": environ.get("MONGODB_DATABASE") or "snapmap",
            "blob_connection_string": environ["AZURE_STORAGE_CONNECTION_STRING"],
            "write_concern": environ.get("MONGODB_WRITE_CONCERN") or "1",
            "kafka_security": tuple((k, v) for k, v in security.items() if v),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class PublishReport:
    """What the backend did: records handled by kind, photos and blobs stored, messages the
    broker acknowledged per partition with the offsets they got."""

    handled: Counter[str] = field(default_factory=Counter)
    photos_stored: int = 0
    blobs_stored: int = 0
    delivered: int = 0
    offsets: dict[int, list[int]] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def as_dict(self) -> dict:
        return {
            "handled": dict(sorted(self.handled.items())),
            "photosStored": self.photos_stored,
            "blobsStored": self.blobs_stored,
            "delivered": self.delivered,
            "offsets": {str(p): pair for p, pair in sorted(self.offsets.items())},
            "elapsedS": round(self.elapsed_s, 3),
        }


def as_fast_as_possible(_index: int, _record: UploadRecord) -> float:
    return 0.0


def at_rate(photos_per_s: float) -> Schedule:
    """One record every ``1 / photos_per_s`` seconds."""
    if photos_per_s <= 0:
        raise ValueError("rate must be positive")
    return lambda index, _record: index / photos_per_s


def at_speedup(speedup: float, first: datetime) -> Schedule:
    """Records at their ``publish_at`` relative to ``first``, compressed ``speedup`` times."""
    if speedup <= 0:
        raise ValueError("speedup must be positive")
    return lambda _index, record: (record.publish_at - first).total_seconds() / speedup


@cache
def placeholder_jpeg() -> bytes:
    """A real 64x64 JPEG of a few hundred bytes, made once and reused for every photo."""
    image = Image.new("RGB", (64, 64), (46, 104, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((18, 10, 46, 38), fill=(250, 196, 64))
    draw.rectangle((0, 46, 63, 63), fill=(58, 128, 70))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=40, optimize=True)
    return buffer.getvalue()


class UploadBackend:
    """Open clients on ``with``; ``publish`` a stream; the producer is flushed (bounded) and
    every client closed on exit."""

    def __init__(
        self, settings: BackendSettings, batch_size: int = 200, progress_every: int = 1000
    ) -> None:
        if batch_size < 1 or progress_every < 1:
            raise ValueError("batch_size and progress_every must be at least 1")
        self.settings = settings
        self.batch_size = batch_size
        self.progress_every = progress_every
        self._producer: Producer | None = None
        self._mongo: MongoClient | None = None
        self._blobs: BlobServiceClient | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._failures: list[str] = []
        self._report = PublishReport()
        # The broker's id of the topic when the clients opened: the report names it, so that a
        # summary counts this run's dead letters, not those of a deleted topic of the same name.
        self.topic_id: str | None = None

    def __enter__(self) -> UploadBackend:
        try:
            self._open()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self._close()

    def publish(
        self,
        records: Iterable[UploadRecord],
        schedule: Schedule = as_fast_as_possible,
        total: int | None = None,
    ) -> PublishReport:
        """Store and produce ``records`` in order, each at its due time; waits for the broker
        to acknowledge every message and raises ``BackendError`` on any failure."""
        start = time.monotonic()
        self._report = PublishReport()
        for batch in _batches(records, schedule, self.batch_size):
            self._wait_until(start + batch[0][0])
            self._store([record for _, record in batch if record.stores_photo])
            for due, record in batch:
                self._wait_until(start + due)
                self._produce(record)
                self._count(record, start, total)
            self._producer.poll(0)
            self._raise_on_failures()
        self._flush()
        self._report.elapsed_s = time.monotonic() - start
        log.info(
            "done: %d records in %.1f s; %d photos and %d blobs stored; %d messages acknowledged",
            sum(self._report.handled.values()),
            self._report.elapsed_s,
            self._report.photos_stored,
            self._report.blobs_stored,
            self._report.delivered,
        )
        return self._report

    def _open(self) -> None:
        settings = self.settings
        timeout_ms = int(settings.timeout_s * 1000)
        self._producer = Producer(
            {
                "bootstrap.servers": settings.bootstrap_servers,
                "client.id": "snapmap-upload-simulator",
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 20,
                "message.timeout.ms": timeout_ms * 3,
                "socket.timeout.ms": timeout_ms,
                "socket.connection.setup.timeout.ms": timeout_ms,
                "logger": logging.getLogger("snapmap_pipeline.simulator.librdkafka"),
                **dict(settings.kafka_security),
            }
        )
        self._check_topic()

        write_concern: str | int = settings.write_concern
        if settings.write_concern.isdigit():
            write_concern = int(settings.write_concern)
        self._mongo = MongoClient(
            settings.mongodb_uri,
            tz_aware=True,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            socketTimeoutMS=timeout_ms * 3,
            w=write_concern,
            appname="snapmap-upload-simulator",
        )
        try:
            self._mongo.admin.command("ping")
        except PyMongoError as error:
            raise BackendError(f"MongoDB at {_host_of(settings.mongodb_uri)}: {error}") from error

        self._blobs = BlobServiceClient.from_connection_string(
            settings.blob_connection_string,
            connection_timeout=settings.timeout_s,
            read_timeout=settings.timeout_s,
            retry_total=3,
        )
        try:
            self._blobs.create_container(settings.container, timeout=int(settings.timeout_s))
            log.info("created blob container %s", settings.container)
        except ResourceExistsError:
            pass
        except AzureError as error:
            raise BackendError(f"blob container {settings.container}: {error}") from error
        self._pool = ThreadPoolExecutor(BLOB_WORKERS, thread_name_prefix="blob-upload")

    def _check_topic(self) -> None:
        topic = self.settings.topic
        try:
            metadata = self._producer.list_topics(topic, timeout=self.settings.timeout_s)
        except KafkaException as error:
            raise BackendError(
                f"Kafka at {self.settings.bootstrap_servers} did not answer: {error}"
            ) from error
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            raise BackendError(
                f"topic {topic} is not available on {self.settings.bootstrap_servers} "
                f"({found.error if found else 'missing'}); the broker does not create topics"
            )
        self.topic_id = self._describe_topic_id()
        log.info(
            "publishing to %s (id %s, %d partitions)", topic, self.topic_id, len(found.partitions)
        )

    def _describe_topic_id(self) -> str:
        """The topic's id as Kafka's tools print it (URL-safe base64), as the pipeline records
        it in its dead letters."""
        topic, timeout_s = self.settings.topic, self.settings.timeout_s
        admin = AdminClient(
            {
                "bootstrap.servers": self.settings.bootstrap_servers,
                "socket.timeout.ms": int(timeout_s * 1000),
                "logger": logging.getLogger("snapmap_pipeline.simulator.librdkafka"),
                **dict(self.settings.kafka_security),
            }
        )
        try:
            future = admin.describe_topics(TopicCollection([topic]), request_timeout=timeout_s)
            description = future[topic].result(timeout=timeout_s * 2)
        except (KafkaException, TimeoutError) as error:
            raise BackendError(f"description of {topic}: {error}") from error
        return str(description.topic_id).replace("+", "-").replace("/", "_")

    def _store(self, records: list[UploadRecord]) -> None:
        """Blobs first, then the photo documents: a message never names a missing photo."""
        if not records:
            return
        container = self._blobs.get_container_client(self.settings.container)
        uploads = [self._pool.submit(_put_blob, container, r, self.settings) for r in records]
        for upload in uploads:
            upload.result()
        self._report.blobs_stored += len(uploads)

        now = _whole_ms(datetime.now(UTC))
        requests = [
            UpdateOne(
                {"_id": record.photo.photo_id},
                {
                    "$set": {
                        "location": {
                            "type": "Point",
                            "coordinates": [record.photo.lon, record.photo.lat],
                        },
                        "takenAt": record.photo.taken_at,
                        "storageUrl": record.photo.storage_url,
                    },
                    "$setOnInsert": {"uploadedAt": now, "eventId": None},
                },
                upsert=True,
            )
            for record in records
        ]
        try:
            self._mongo[self.settings.database].photos.bulk_write(requests, ordered=False)
        except PyMongoError as error:
            raise BackendError(f"bulk write of {len(requests)} photos: {error}") from error
        self._report.photos_stored += len(requests)

    def _produce(self, record: UploadRecord) -> None:
        if not record.is_published:
            return
        deadline = time.monotonic() + self.settings.timeout_s * 3
        while True:
            try:
                self._producer.produce(
                    self.settings.topic,
                    value=record.value,
                    key=record.key,
                    on_delivery=self._on_delivery,
                )
                return
            except BufferError:
                if time.monotonic() > deadline:
                    raise BackendError("producer queue stayed full; is the broker up?") from None
                self._producer.poll(0.1)

    def _wait_until(self, moment: float) -> None:
        """Sleep until ``moment`` (monotonic), serving delivery reports meanwhile."""
        while (remaining := moment - time.monotonic()) > 0:
            self._producer.poll(min(remaining, 0.5))

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._failures.append(str(error))
            return
        self._report.delivered += 1
        span = self._report.offsets.setdefault(message.partition(), [message.offset()] * 2)
        span[0] = min(span[0], message.offset())
        span[1] = max(span[1], message.offset())

    def _raise_on_failures(self) -> None:
        if self._failures:
            raise BackendError(
                f"{len(self._failures)} messages to {self.settings.topic} failed: "
                f"{self._failures[0]}"
            )

    def _flush(self) -> None:
        remaining = self._producer.flush(self.settings.timeout_s * 3)
        self._raise_on_failures()
        if remaining:
            raise BackendError(f"{remaining} messages not acknowledged before the timeout")

    def _count(self, record: UploadRecord, start: float, total: int | None) -> None:
        handled = self._report.handled
        handled[record.kind.value] += 1
        done = sum(handled.values())
        if done % self.progress_every == 0:
            elapsed = max(time.monotonic() - start, 1e-6)
            log.info(
                "%d/%s records: %d valid, %d duplicate, %d malformed, %d lost (stored only); "
                "%d acknowledged; %.0f records/s",
                done,
                total if total is not None else "?",
                handled[RecordKind.VALID],
                handled[RecordKind.DUPLICATE],
                handled[RecordKind.MALFORMED],
                handled[RecordKind.LOST],
                self._report.delivered,
                done / elapsed,
            )

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._producer is not None:
            remaining = self._producer.flush(self.settings.timeout_s)
            if remaining:
                log.warning("%d messages were still unacknowledged at close", remaining)
        if self._mongo is not None:
            self._mongo.close()
        if self._blobs is not None:
            self._blobs.close()
        self._pool = self._producer = self._mongo = self._blobs = None


def _put_blob(container: ContainerClient, record: UploadRecord, settings: BackendSettings) -> None:
    try:
        container.upload_blob(
            record.photo.blob_name,
            placeholder_jpeg(),
            overwrite=True,
            content_settings=ContentSettings(content_type="image/jpeg"),
            timeout=int(settings.timeout_s),
        )
    except AzureError as error:
        raise BackendError(f"upload of {record.photo.storage_url}: {error}") from error


def _batches(
    records: Iterable[UploadRecord], schedule: Schedule, size: int
) -> Iterator[list[tuple[float, UploadRecord]]]:
    """Consecutive records with their due times: at most ``size``, all due within
    ``STORE_AHEAD_S`` of the first."""
    batch: list[tuple[float, UploadRecord]] = []
    for index, record in enumerate(records):
        due = schedule(index, record)
        if batch and (len(batch) >= size or due > batch[0][0] + STORE_AHEAD_S):
            yield batch
            batch = []
        batch.append((due, record))
    if batch:
        yield batch


def _whole_ms(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond - moment.microsecond % 1000)


def _host_of(uri: str) -> str:
    """The host part of a MongoDB URI without credentials, for messages."""
    rest = uri.split("://", 1)[-1]
    return rest.rsplit("@", 1)[-1].split("/", 1)[0]


__all__ = [
    "BackendError",
    "BackendSettings",
    "PublishReport",
    "UploadBackend",
    "as_fast_as_possible",
    "at_rate",
    "at_speedup",
    "placeholder_jpeg",
]
