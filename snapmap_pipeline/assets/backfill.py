"""Backfills: recluster history one UTC day at a time, by ``takenAt``.

A day's seed is its own photos; ``recluster`` grows each seed into its closure, which reaches
across midnight into the neighbouring days as far as the canonical rule needs. An event that
crosses midnight is therefore computed identically by both days, and days reclustered in any
order, once or twice, leave the canonical result. The seed is taken in time-ordered chunks so
that a day of a million photos never holds more than one chunk's closure in memory.

The ``snapmap recluster`` command runs the same ``recluster_day`` outside Dagster.
"""

# No `from __future__ import annotations` here: Dagster reads the `config` parameter's
# annotation as a class, not a string.
import base64
import io
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from dagster import (
    AssetExecutionContext,
    AssetSelection,
    Config,
    DagsterLogManager,
    DailyPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
    asset,
    define_asset_job,
)
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import Field
from pymongo.database import Database

from snapmap_pipeline.assets.events import report_metadata
from snapmap_pipeline.assets.ingest import OWNERS
from snapmap_pipeline.clustering import ClusterParams
from snapmap_pipeline.contract.validation import (
    EARLIEST_TAKEN_AT,
    MAX_FUTURE_SKEW,
    MAX_PUBLISH_SKEW,
)
from snapmap_pipeline.jobs import RECLUSTER_JOB_NAME
from snapmap_pipeline.resources.blob import BlobStorageResource
from snapmap_pipeline.resources.kafka import KafkaResource
from snapmap_pipeline.resources.mongo import MongoResource
from snapmap_pipeline.settings import PipelineSettings
from snapmap_pipeline.store.events import LIVE_EVENTS, apply_pending_links
from snapmap_pipeline.store.outbox import publish_pending, write_pending_manifests
from snapmap_pipeline.store.recluster import ReclusterReport, recluster

DEFAULT_CHUNK_SIZE = 50_000
# A day's histogram stays a few kilobytes of PNG in the run's metadata.
_PLOT_SIZE_IN = (4.0, 2.4)
_PLOT_DPI = 72

# The latest takenAt the contract accepts is this far after the time a run reads the message:
# a day after its Kafka timestamp, which may itself be an hour ahead of the read.
LATEST_TAKEN_AT_AHEAD = MAX_FUTURE_SKEW + MAX_PUBLISH_SKEW

# UTC on purpose: a day is 24 hours everywhere, with no DST shifts (cases.md #30). The days run
# from the upload contract's earliest takenAt to the day of its latest one (today's partition
# is end_offset 1, each further day one more), so that the day of every photo the contract
# accepts can be backfilled from the UI as well as with `snapmap recluster`.
DAILY_PARTITIONS = DailyPartitionsDefinition(
    start_date=EARLIEST_TAKEN_AT,
    timezone="UTC",
    end_offset=1 + math.ceil(LATEST_TAKEN_AT_AHEAD / timedelta(days=1)),
)

Logger = logging.Logger | logging.LoggerAdapter | DagsterLogManager


@dataclass
class DayReport:
    """What reclustering one day did: the merged recluster report and the follow-up steps."""

    day_start: datetime
    day_end: datetime
    chunks: int = 0
    photos: int = 0
    # The day's photos a chunk left out because an earlier chunk's closure held them.
    seed_photos_in_earlier_closures: int = 0
    recluster: ReclusterReport = field(default_factory=ReclusterReport)
    links_applied: int = 0
    photos_relinked: int = 0
    event_updates_published: int = 0
    manifests_written: int = 0
    manifests_pending: int = 0
    event_sizes: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DayChunk:
    """Ids of consecutive photos of a day in ``(takenAt, _id)`` order, and the ``takenAt`` of
    the first and the last of them."""

    ids: list[str]
    first: datetime
    last: datetime


def day_photo_chunks(
    db: Database, start: datetime, end: datetime, chunk_size: int
) -> Iterator[DayChunk]:
    """The photos taken in ``[start, end)``, in ``(takenAt, _id)`` order, ``chunk_size`` at a
    time. Each chunk is its own query resuming after the last photo of the previous one, so
    no server cursor stays open while a chunk is reclustered."""
    after: dict = {}
    while True:
        query: dict = {"takenAt": {"$gte": start, "$lt": end}}
        if after:
            query = {
                "$and": [
                    query,
                    {
                        "$or": [
                            {"takenAt": {"$gt": after["takenAt"]}},
                            {"takenAt": after["takenAt"], "_id": {"$gt": after["_id"]}},
                        ]
                    },
                ]
            }
        documents = list(
            db.photos.find(query, {"_id": 1, "takenAt": 1})
            .sort([("takenAt", 1), ("_id", 1)])
            .limit(chunk_size)
        )
        if not documents:
            return
        yield DayChunk(
            [d["_id"] for d in documents], documents[0]["takenAt"], documents[-1]["takenAt"]
        )
        if len(documents) < chunk_size:
            return
        after = documents[-1]


def recluster_day(
    db: Database,
    kafka: KafkaResource,
    blob: BlobStorageResource,
    params: ClusterParams,
    event_updates_topic: str,
    start: datetime,
    end: datetime,
    log: Logger,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> DayReport:
    """Recluster the photos taken in ``[start, end)`` (and the closure they pull in), apply the
    queued links, publish the event updates and write the manifests."""
    report = DayReport(day_start=start, day_end=end)
    # Photos of closures written by earlier chunks: their components are already exact, so a
    # crowd that spans the day is loaded once rather than by every chunk that holds some of it.
    reclustered: set[str] = set()
    for chunk in day_photo_chunks(db, start, end, chunk_size):
        report.chunks += 1
        report.photos += len(chunk.ids)
        seed = [photo_id for photo_id in chunk.ids if photo_id not in reclustered]
        report.seed_photos_in_earlier_closures += len(chunk.ids) - len(seed)
        # The chunk's time range is read whole, its end instants excepted (photos sharing one
        # takenAt can outnumber a chunk): the seed and its neighbours inside it in one range
        # query instead of reads by id and by (cell, takenAt).
        between = (chunk.first, chunk.last)
        report.recluster.merge(
            recluster(db, seed, params, reclustered=reclustered, taken_between=between)
        )
        applied, changed = apply_all_links(db)
        report.links_applied += applied
        report.photos_relinked += changed
        log.info(
            "%s chunk %d: %d photos, %d of them reclustered by earlier chunks; %d links "
            "applied (%d photos relinked)",
            start.date().isoformat(),
            report.chunks,
            len(chunk.ids),
            len(chunk.ids) - len(seed),
            applied,
            changed,
        )

    published = publish_all(db, kafka, blob, event_updates_topic)
    report.event_updates_published = published.event_updates
    report.manifests_written = published.manifests_written
    report.manifests_pending = published.manifests_pending
    if published.storage_error:
        log.warning(
            "Blob Storage failed (%s); %d manifests still pending, the next run or sweep "
            "writes them",
            published.storage_error,
            report.manifests_pending,
        )
    report.event_sizes = _event_sizes(db, start, end)
    log.info(
        "%s: %d photos in %d chunks, closure %d; events %d created, %d changed, %d tombstoned; "
        "%d event updates published, %d manifests written; %d live events start this day",
        start.date().isoformat(),
        report.photos,
        report.chunks,
        report.recluster.closure_photos,
        report.recluster.created,
        report.recluster.changed,
        report.recluster.tombstoned,
        report.event_updates_published,
        report.manifests_written,
        sum(report.event_sizes.values()),
    )
    return report


def apply_all_links(db: Database, take_lease: bool = True) -> tuple[int, int]:
    """Drain the link queue; returns (decisions applied, photos whose event changed).
    ``take_lease=False`` when the caller holds the clustering lease already."""
    applied = changed = 0
    while True:
        batch_changed, batch_applied = apply_pending_links(db, take_lease=take_lease)
        if batch_applied == 0:
            return applied, changed
        applied += batch_applied
        changed += batch_changed


@dataclass
class Published:
    """What draining the outbox did."""

    event_updates: int = 0
    manifests_written: int = 0
    manifests_pending: int = 0
    storage_error: str | None = None


def publish_all(
    db: Database, kafka: KafkaResource, blob: BlobStorageResource, topic: str
) -> Published:
    """Send every pending event update (a Kafka failure raises) and write pending manifests
    until none is left or Blob Storage stops making progress (they stay pending for the next
    run or sweep)."""
    published = Published(event_updates=publish_pending(db, kafka, topic))
    while True:
        outbox = write_pending_manifests(db, blob)
        published.manifests_written += outbox.manifests_written
        published.manifests_pending = outbox.manifests_pending
        published.storage_error = outbox.storage_error
        progressed = outbox.manifests_written + outbox.manifests_unchanged
        if not outbox.manifests_pending or not progressed:
            return published


def _event_sizes(db: Database, start: datetime, end: datetime) -> dict[int, int]:
    """How many live events starting in ``[start, end)`` have each photo count."""
    pipeline = [
        {"$match": LIVE_EVENTS | {"startAt": {"$gte": start, "$lt": end}}},
        {"$group": {"_id": "$photoCount", "events": {"$sum": 1}}},
    ]
    return {int(d["_id"]): int(d["events"]) for d in db.events.aggregate(pipeline)}


def event_size_plot(sizes: dict[int, int], title: str) -> str:
    """A small PNG histogram of event sizes (photos per event, log scale of events), as
    markdown with a data URI. Drawn on an Agg canvas without pyplot's global state."""
    figure = Figure(figsize=_PLOT_SIZE_IN, dpi=_PLOT_DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    if sizes:
        counts = sorted(sizes.items())
        axes.bar([c for c, _ in counts], [n for _, n in counts], width=0.9, log=True)
    axes.set_xlabel("photos per event")
    axes.set_ylabel("events")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"![event sizes, {title}](data:image/png;base64,{encoded})"


def day_metadata(report: DayReport, settings: PipelineSettings) -> dict:
    """Counts as numbers (plotted across partitions by the UI), R and W, and the size plot."""
    sizes = report.event_sizes
    day = report.day_start.date().isoformat()
    return {
        **report_metadata(report.recluster, settings),
        "chunks": report.chunks,
        "day_photos": report.photos,
        "seed_photos_in_earlier_closures": report.seed_photos_in_earlier_closures,
        "links_applied": report.links_applied,
        "photos_relinked": report.photos_relinked,
        "event_updates_published": report.event_updates_published,
        "manifests_written": report.manifests_written,
        "manifests_pending": report.manifests_pending,
        "live_events_started": sum(sizes.values()),
        "largest_event_photos": max(sizes, default=0),
        "event_sizes": MetadataValue.md(event_size_plot(sizes, f"events starting {day} UTC")),
    }


class DailyEventsConfig(Config):
    """Tuning of one day's backfill run."""

    chunk_size: int = Field(
        default=DEFAULT_CHUNK_SIZE, gt=0, description="Seed photos reclustered per step."
    )


@asset(
    partitions_def=DAILY_PARTITIONS,
    group_name="backfill",
    kinds={"mongodb", "kafka", "azure"},
    owners=OWNERS,
    description=(
        "Events of one UTC day, recomputed: the photos taken that day (by `takenAt`) and the "
        "closure they pull in across midnight are reclustered with the canonical rule, links "
        "applied, event updates published and manifests written. Any order of days, any "
        "number of times, gives the same events."
    ),
)
def daily_events(
    context: AssetExecutionContext,
    config: DailyEventsConfig,
    mongo: MongoResource,
    kafka: KafkaResource,
    blob: BlobStorageResource,
    settings: PipelineSettings,
) -> MaterializeResult:
    window = context.partition_time_window
    params = settings.cluster_params()
    context.instance.add_run_tags(
        context.run_id,
        {"snapmap/radius_m": f"{params.radius_m:g}", "snapmap/window_s": f"{params.window_s:g}"},
    )
    report = recluster_day(
        mongo.db(),
        kafka,
        blob,
        params,
        settings.event_updates_topic,
        window.start,
        window.end,
        context.log,
        config.chunk_size,
    )
    return MaterializeResult(metadata=day_metadata(report, settings))


recluster_days_job = define_asset_job(
    RECLUSTER_JOB_NAME,
    selection=AssetSelection.assets(daily_events),
    description="Recluster days of history by takenAt (one run per UTC day of a backfill).",
    tags={"snapmap/kind": "recluster"},
)
