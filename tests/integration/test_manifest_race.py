"""A run's event_updates step meets another run's events whose link decisions are still
queued (the other run is between its events and link steps): their manifests wait for the
links, so no album is written without its photos (found by the breaker on a clean clone)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from snapmap_pipeline.clustering import ClusterParams
from snapmap_pipeline.resources.blob import BlobStorageResource
from snapmap_pipeline.store.events import apply_pending_links
from snapmap_pipeline.store.geocell import cell_of
from snapmap_pipeline.store.outbox import write_pending_manifests
from snapmap_pipeline.store.recluster import recluster

pytestmark = pytest.mark.storage

T0 = datetime(2026, 5, 1, 18, 0, tzinfo=UTC)


def manifest_photos(blob: BlobStorageResource, event_id: str) -> list[str]:
    with blob.service() as client:
        stored = client.get_blob_client(blob.manifest_container, f"{event_id}.json")
        return [p["photoId"] for p in json.loads(stored.download_blob().readall())["photos"]]


def test_an_event_with_queued_links_keeps_its_manifest_pending_until_they_are_applied(mongo, blob):
    db = mongo.db()
    for i in range(3):
        lon, lat = 10.0, 60.0 + i * 1e-5
        db.photos.insert_one(
            {
                "_id": f"p{i}",
                "location": {"type": "Point", "coordinates": [lon, lat]},
                "cell": cell_of(lon, lat),
                "takenAt": T0 + timedelta(minutes=i),
                "storageUrl": f"azure://photos/p{i}.jpg",
                "eventId": None,
            }
        )
    try:
        # Run Y's events step: the event is written (manifest pending), its links queued.
        recluster(db, ["p0", "p1", "p2"], ClusterParams())
        (event,) = db.events.find({"mergedInto": None})

        # Run X's event_updates step, on another partition, comes now.
        early = write_pending_manifests(db, blob)
        assert early.manifests_written == 0
        assert early.manifests_waiting_for_links == 1
        assert early.storage_error is None
        assert db.events.find_one({"_id": event["_id"]})["manifestPending"] is True

        # Run Y's link step, then its own event_updates step.
        apply_pending_links(db)
        late = write_pending_manifests(db, blob)
        assert late.manifests_written == 1
        assert late.manifests_pending == 0
        assert manifest_photos(blob, event["_id"]) == ["p0", "p1", "p2"]
    finally:
        with blob.service() as client:
            client.delete_container(blob.manifest_container)
