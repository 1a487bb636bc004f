"""The micro-batch's own check: after linking, every valid photo of the batch has an event.

It runs inside each ingest run, between ``photo_event_links`` and the steps that publish and
commit, and it is blocking (cases.md #29): a photo the clustering left without an event (a
decision lost between the engine and the link queue) fails the run with an ERROR, so the
batch's event updates are not published and its offsets are not committed. The sweeper's
``orphan_photos`` check reclusters such a photo once it is older than the grace period; the
range's next run (the sensor requests failed ranges again) then passes and commits.

Dead-lettered photos are left out: they are meant to have no event. A photo found without an
event is confirmed under the clustering lease with the link queue drained, so a decision another
run has queued but not yet applied is not a false alarm.
"""

# No `from __future__ import annotations` here: Dagster validates the `context` parameter's
# annotation as a class, not a string.
from collections.abc import Sequence

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetIn,
    MetadataValue,
    asset_check,
)
from pymongo.database import Database

from snapmap_pipeline.assets.events import photo_event_links
from snapmap_pipeline.assets.ingest import IngestedBatch
from snapmap_pipeline.resources.mongo import MongoResource
from snapmap_pipeline.store.events import apply_pending_links
from snapmap_pipeline.store.lease import clustering_lease

EXAMPLES = 10
_IN_CHUNK = 5000


def unlinked_photos(db: Database, photo_ids: Sequence[str]) -> list[str]:
    """The photos of ``photo_ids`` that exist, are not dead-lettered and have no event, sorted.
    Queried by ``_id`` only (further conditions are filtered here, not by the server)."""
    unlinked: list[str] = []
    for start in range(0, len(photo_ids), _IN_CHUNK):
        chunk = list(photo_ids[start : start + _IN_CHUNK])
        for doc in db.photos.find({"_id": {"$in": chunk}}, {"eventId": 1, "deadLettered": 1}):
            if doc.get("eventId") is None and not doc.get("deadLettered"):
                unlinked.append(doc["_id"])
    return sorted(unlinked)


def confirm_unlinked(db: Database, suspects: Sequence[str]) -> list[str]:
    """``suspects`` still without an event once the link queue is drained under the lease."""
    if not suspects:
        return []
    with clustering_lease(db):
        while apply_pending_links(db, take_lease=False)[1]:
            pass
        return unlinked_photos(db, suspects)


@asset_check(
    asset=photo_event_links,
    name="batch_photos_linked",
    blocking=True,
    additional_ins={"photo_uploads": AssetIn("photo_uploads")},
    description=(
        "Every valid photo of the micro-batch has an event after linking (dead-lettered ones "
        "excepted). Blocking: on failure the batch's updates are not published and its offsets "
        "not committed; the sweeper's orphan_photos heals the photo."
    ),
)
def batch_photos_linked(
    context: AssetCheckExecutionContext, photo_uploads: IngestedBatch, mongo: MongoResource
) -> AssetCheckResult:
    db = mongo.db()
    suspects = unlinked_photos(db, photo_uploads.photo_ids)
    unlinked = confirm_unlinked(db, suspects)
    if unlinked:
        context.log.error(
            "%s: %d of %d valid photos have no event after linking, e.g. %s; not publishing or "
            "committing this batch (the sweeper reclusters them after the grace period)",
            photo_uploads.offsets.key,
            len(unlinked),
            len(photo_uploads.photo_ids),
            ", ".join(unlinked[:3]),
        )
    return AssetCheckResult(
        passed=not unlinked,
        severity=AssetCheckSeverity.ERROR,
        description=(
            f"{len(unlinked)} photos of {photo_uploads.offsets.key} have no event"
            if unlinked
            else f"all {len(photo_uploads.photo_ids)} photos of the batch have an event"
        ),
        metadata={
            "offset_range": photo_uploads.offsets.key,
            "photos_checked": len(photo_uploads.photo_ids),
            "unlinked_suspects": len(suspects),
            "unlinked": len(unlinked),
            "unlinked_examples": MetadataValue.json(unlinked[:EXAMPLES]),
        },
    )
