"""Clustering, linking, publishing and committing: the rest of a micro-batch."""

from dagster import AssetExecutionContext, MaterializeResult, Output, asset

from snapmap_pipeline.assets.ingest import OWNERS, IngestedBatch
from snapmap_pipeline.assets.plots import event_map
from snapmap_pipeline.resources.blob import BlobStorageResource
from snapmap_pipeline.resources.kafka import KafkaResource
from snapmap_pipeline.resources.mongo import MongoResource
from snapmap_pipeline.settings import PipelineSettings
from snapmap_pipeline.store.batches import commit_contiguous, record_batch
from snapmap_pipeline.store.dead_letters import send_dead_letters, with_original_bytes
from snapmap_pipeline.store.events import apply_pending_links
from snapmap_pipeline.store.outbox import publish_pending, write_pending_manifests
from snapmap_pipeline.store.poison import recluster_isolating_poison
from snapmap_pipeline.store.recluster import ReclusterReport, recluster


def report_metadata(report: ReclusterReport, settings: PipelineSettings) -> dict:
    """Counts as numbers (plotted by the UI) plus the parameters and step durations."""
    return {
        "seed_photos": report.seed_photos,
        "closure_photos": report.closure_photos,
        "events_created": report.created,
        "events_changed": report.changed,
        "events_tombstoned": report.tombstoned,
        "links_queued": report.links_queued,
        "radius_m": settings.radius_m,
        "window_s": settings.window_s,
        "lease_token": report.lease_token,
        **{f"seconds_{step}": round(s, 3) for step, s in report.seconds.items()},
    }


@asset(
    group_name="clustering",
    kinds={"mongodb", "scikitlearn"},
    owners=OWNERS,
    description=(
        "Events of the batch's neighbourhood: the closure of photos linked to the batch is "
        "reclustered with the canonical rule (R metres, W seconds) and the differences are "
        "written to `events` under the clustering lease; link decisions are queued."
    ),
)
def events(
    context: AssetExecutionContext,
    photo_uploads: IngestedBatch,
    kafka: KafkaResource,
    mongo: MongoResource,
    settings: PipelineSettings,
) -> Output[ReclusterReport]:
    db = mongo.db()
    params = settings.cluster_params()

    def step(ids):
        return recluster(db, ids, params, photo_uploads.moved_event_ids)

    def dead_letter(letters):
        return send_dead_letters(
            db, kafka, settings.dead_letter_topic, with_original_bytes(kafka, letters)
        )

    report, poisoned = recluster_isolating_poison(
        db, photo_uploads.photo_ids, step, dead_letter, settings.max_poison_attempts
    )
    if poisoned:
        context.log.error("dead-lettered poison photos after repeated failures: %s", poisoned)
    metadata = report_metadata(report, settings) | {
        "poison_dead_lettered": len(poisoned),
        "event_map": event_map(db, photo_uploads.photo_ids),
    }
    return Output(report, metadata=metadata)


@asset(
    group_name="clustering",
    kinds={"mongodb"},
    owners=OWNERS,
    deps=[events],
    description=(
        "photo.eventId: queued link decisions applied with idempotent bulk updates, only where "
        "they change; a decision never overrides a newer one (lease tokens)."
    ),
)
def photo_event_links(context: AssetExecutionContext, mongo: MongoResource) -> MaterializeResult:
    db = mongo.db()
    changed = applied = 0
    while True:
        batch_changed, batch_applied = apply_pending_links(db)
        changed += batch_changed
        applied += batch_applied
        if batch_applied == 0:
            break
    context.log.info("applied %d link decisions, %d photos changed event", applied, changed)
    return MaterializeResult(metadata={"links_applied": applied, "photos_relinked": changed})


@asset(
    group_name="publish",
    kinds={"kafka", "azure"},
    owners=OWNERS,
    deps=[photo_event_links],
    description=(
        "One event-updates message per created, changed or tombstoned event version, keyed by "
        "event id, and the event's manifest (album JSON) in the event-manifests container."
    ),
)
def event_updates(
    context: AssetExecutionContext,
    kafka: KafkaResource,
    mongo: MongoResource,
    blob: BlobStorageResource,
    settings: PipelineSettings,
) -> MaterializeResult:
    db = mongo.db()
    published = publish_pending(db, kafka, settings.event_updates_topic)
    manifests = write_pending_manifests(db, blob)
    if manifests.busy:
        context.log.info(
            "another pass held the manifests lease throughout the wait; %d manifests stay "
            "pending for it, the next run or the sweep",
            manifests.manifests_pending,
        )
    if manifests.storage_error:
        context.log.warning(
            "Blob Storage failed (%s); %d manifests still pending, the next run or sweep "
            "writes them",
            manifests.storage_error,
            manifests.manifests_pending,
        )
    context.log.info(
        "published %d event updates; manifests: %d written, %d unchanged, %d left to runs "
        "whose links are still queued; %d pending in all (other runs' included)",
        published,
        manifests.manifests_written,
        manifests.manifests_unchanged,
        manifests.manifests_waiting_for_links,
        manifests.manifests_pending,
    )
    return MaterializeResult(
        metadata={
            "event_updates_published": published,
            "manifests_written": manifests.manifests_written,
            "manifests_unchanged": manifests.manifests_unchanged,
            "manifests_pending": manifests.manifests_pending,
        }
    )


@asset(
    group_name="publish",
    kinds={"kafka"},
    owners=OWNERS,
    deps=[event_updates],
    description=(
        "The consumer group's committed offsets: the batch is recorded as applied, then the "
        "group's offset advances over every contiguous applied range, so lag in Kafka tools is "
        "the real backlog."
    ),
)
def consumer_offsets(
    context: AssetExecutionContext,
    photo_uploads: IngestedBatch,
    kafka: KafkaResource,
    mongo: MongoResource,
) -> MaterializeResult:
    db = mongo.db()
    record_batch(db, photo_uploads)
    committed = commit_contiguous(
        db, kafka, photo_uploads.offsets.topic, photo_uploads.offsets.partition
    )
    context.log.info(
        "batch %s applied; committed offset of partition %d is now %d",
        photo_uploads.offsets.key,
        photo_uploads.offsets.partition,
        committed,
    )
    return MaterializeResult(
        metadata={
            "offset_range": photo_uploads.offsets.key,
            "committed_offset": committed,
            "partition": photo_uploads.offsets.partition,
        }
    )
