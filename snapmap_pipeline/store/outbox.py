"""The outbox of event changes: every event write sets ``publishPending`` and
``manifestPending``; these functions drain them. Kafka messages (``event-updates``) must go out
for a run to succeed; manifests in Blob Storage are retried by the next run or sweep when the
storage account is unavailable, so an Azure outage never stops ingestion."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from azure.core.exceptions import AzureError
from pymongo import UpdateOne
from pymongo.database import Database

from snapmap_pipeline.resources.blob import BlobStorageResource, encode_manifest
from snapmap_pipeline.resources.kafka import KafkaResource
from snapmap_pipeline.store.events import is_live
from snapmap_pipeline.store.lease import LeaseTimeout, clustering_lease, held_lease

log = logging.getLogger(__name__)
BATCH = 1000
# Concurrent manifest uploads: the real service serves them in parallel (Azurite does not).
MANIFEST_WORKERS = 8
# One manifest pass at a time: two passes overlapping could finish in the wrong order and leave
# an older version of an album in storage than the one marked written.
MANIFESTS_LEASE_ID = "manifests"


@dataclass
class OutboxReport:
    published: int = 0
    manifests_written: int = 0
    manifests_unchanged: int = 0
    #: Events whose manifest still waits, in the whole database (other runs' included).
    manifests_pending: int = 0
    #: Of those read by this pass, left for the run whose link decisions are still queued.
    manifests_waiting_for_links: int = 0
    #: Why this pass stopped writing manifests, when Blob Storage failed; None otherwise.
    storage_error: str | None = None
    #: The pass wrote nothing because another pass held the manifests lease for the whole wait.
    busy: bool = False


def update_message(event: dict) -> dict:
    """The ``event-updates`` message of one event version (contract: docs/event-updates.md)."""
    action = ("changed" if event["version"] > 1 else "created") if is_live(event) else "tombstoned"
    lon, lat = event["centroid"]["coordinates"]
    return {
        "eventId": event["_id"],
        "action": action,
        "centroid": {"type": "Point", "coordinates": [lon, lat]},
        "radiusM": event["radiusM"],
        "startAt": _iso(event["startAt"]),
        "endAt": _iso(event["endAt"]),
        "photoCount": event["photoCount"],
        "version": event["version"],
        "mergedInto": event.get("mergedInto"),
    }


def publish_pending(db: Database, kafka: KafkaResource, topic: str) -> int:
    """Send one message per pending event version, keyed by event id; then clear the flag if
    the event is still at that version. At-least-once: consumers dedupe by (eventId, version)."""
    published = 0
    while True:
        events = list(db.events.find({"publishPending": True}).sort("_id", 1).limit(BATCH))
        if not events:
            return published
        kafka.send(
            topic,
            [
                (e["_id"].encode(), json.dumps(update_message(e), sort_keys=True).encode(), [])
                for e in events
            ],
        )
        db.events.bulk_write(
            [
                UpdateOne(
                    {"_id": e["_id"], "version": e["version"]},
                    {"$set": {"publishPending": False, "publishedVersion": e["version"]}},
                )
                for e in events
            ],
            ordered=False,
        )
        published += len(events)
        if len(events) < BATCH:
            return published


def write_pending_manifests(
    db: Database, blob: BlobStorageResource, limit: int = 5000, wait_s: float = 120.0
) -> OutboxReport:
    """Write the JSON album of up to ``limit`` events whose manifest is pending and whose
    membership is settled. A storage failure leaves the rest pending (reported, not raised).

    Each written manifest's SHA-256 is kept on its event (``manifestSha256``) when
    ``manifestPending`` is cleared, so a manifest whose content has not changed since is not
    sent again, and one that changed is uploaded without first reading the blob: one request
    per written manifest. If the upload succeeds but the digest is not recorded (a crash, a
    MongoDB outage), the event stays pending and the next pass uploads the same content again.

    Passes run one at a time under the manifests lease, read to upload to mark, so a pass that
    read an event's older version never uploads it after a later pass wrote the newer one. A
    pass that waits ``wait_s`` for the lease in vain writes nothing and reports ``busy``: the
    manifests stay pending for the holder's next pass, the next run or the sweep. Known limit:
    a holder paused past its lease's expiry (no heartbeat for 30 s) can still finish an upload
    after the next holder's; Blob Storage writes carry no fencing token.

    The albums' photos are read with one query per thousand events, and the queued links only
    for those events and photos (never the whole queue); the blobs are written by
    ``MANIFEST_WORKERS`` threads (the real service serves them in parallel), and the written
    versions are marked in bulk."""
    report = OutboxReport()
    try:
        with held_lease(db, MANIFESTS_LEASE_ID, wait_s=wait_s):
            _write_pass(db, blob, limit, report)
    except LeaseTimeout as busy:
        log.info("manifests left pending: %s", busy)
        report.busy = True
    report.manifests_pending = db.events.count_documents({"manifestPending": True})
    return report


def _write_pass(db: Database, blob: BlobStorageResource, limit: int, report: OutboxReport) -> None:
    # Events, queued link decisions and albums are read under the clustering lease: a
    # recluster writes its events and queues their links under it, and the link step applies
    # them under it, so this pass never sees an event without the decisions that make its
    # album. An event with decisions still queued is left to the run that queued them (its
    # own event_updates step comes after its link step), or to the next pass.
    with clustering_lease(db):
        ready, albums, waiting = settled_pending_events(db, limit)
    report.manifests_waiting_for_links = waiting
    encoded = {
        event["_id"]: encode_manifest(manifest_of(event, albums.get(event["_id"], [])))
        for event in ready
    }
    unchanged = [e for e in ready if e.get("manifestSha256") == encoded[e["_id"]][1]]
    to_write = [e for e in ready if e.get("manifestSha256") != encoded[e["_id"]][1]]
    written: list[dict] = []
    try:
        if to_write:
            _upload(blob, to_write, encoded, written)
    except AzureError as error:
        report.storage_error = str(error)[:200]
        log.warning("Blob Storage unavailable, manifests stay pending: %s", report.storage_error)
    finally:
        _mark_written(db, unchanged + written, encoded)
    report.manifests_written = len(written)
    report.manifests_unchanged = len(unchanged)


def settled_pending_events(
    db: Database, limit: int
) -> tuple[list[dict], dict[str, list[dict]], int]:
    """Up to ``limit`` events with a pending manifest whose membership is settled, in ``_id``
    order, their albums (``album_photos``), and how many of the pending events read on the way
    were not settled (``events_with_queued_links``). Read page by page, each page no longer
    than the events still wanted, so any number of waiting events never hides the settled ones
    behind them, and the queued links are asked about the events read, never read whole."""
    ready: list[dict] = []
    albums: dict[str, list[dict]] = {}
    waiting = 0
    after: str | None = None
    while len(ready) < limit:
        size = min(BATCH, limit - len(ready))
        query: dict = {"manifestPending": True}
        if after is not None:
            query["_id"] = {"$gt": after}
        page = list(db.events.find(query).sort("_id", 1).limit(size))
        page_albums = album_photos(db, [e["_id"] for e in page])
        moving = events_with_queued_links(db, [e["_id"] for e in page], page_albums)
        for event in page:
            if event["_id"] in moving:
                waiting += 1
            else:
                ready.append(event)
                albums[event["_id"]] = page_albums.get(event["_id"], [])
        if len(page) < size:
            break
        after = page[-1]["_id"]
    return ready, albums, waiting


def events_with_queued_links(
    db: Database, event_ids: list[str], albums: dict[str, list[dict]]
) -> set[str]:
    """Those of ``event_ids`` whose membership queued link decisions will still change: the
    events queued links link photos to, and the events holding a photo of ``albums`` (their
    albums) that has a link queued. Only the queued links of these events and photos are read,
    by the ``eventId`` and ``_id`` indexes."""
    moving = set(db.pending_links.distinct("eventId", {"eventId": {"$in": event_ids}}))
    event_of = {p["_id"]: p["eventId"] for photos in albums.values() for p in photos}
    photo_ids = list(event_of)
    for start in range(0, len(photo_ids), BATCH):
        query = {"_id": {"$in": photo_ids[start : start + BATCH]}}
        for link in db.pending_links.find(query, {"_id": 1}):
            moving.add(event_of[link["_id"]])
    return moving


def _upload(
    blob: BlobStorageResource,
    events: list[dict],
    encoded: dict[str, tuple[bytes, str]],
    written: list[dict],
) -> None:
    """Upload the events' manifests on ``MANIFEST_WORKERS`` threads, appending each event to
    ``written`` in order as its upload succeeds; the first failure is raised and the uploads
    not yet started are cancelled."""
    with (
        blob.service() as client,
        ThreadPoolExecutor(MANIFEST_WORKERS, thread_name_prefix="manifest") as pool,
    ):
        futures = [
            (event, pool.submit(blob.upload_manifest, client, event["_id"], *encoded[event["_id"]]))
            for event in events
        ]
        try:
            for event, future in futures:
                future.result()
                written.append(event)
        finally:
            pool.shutdown(cancel_futures=True)


def _mark_written(db: Database, events: list[dict], encoded: dict[str, tuple[bytes, str]]) -> None:
    """Clear ``manifestPending`` of the versions whose manifest is in storage and record the
    digest of its content; an event written again since keeps its flag."""
    requests = [
        UpdateOne(
            {"_id": e["_id"], "version": e["version"]},
            {"$set": {"manifestPending": False, "manifestSha256": encoded[e["_id"]][1]}},
        )
        for e in events
    ]
    for start in range(0, len(requests), BATCH):
        db.events.bulk_write(requests[start : start + BATCH], ordered=False)


def album_photos(db: Database, event_ids: list[str]) -> dict[str, list[dict]]:
    """The photos linked to each event, in ``(takenAt, _id)`` order, a thousand events per
    query. A dead-lettered photo that still links to an event (a run stopped before releasing
    it) is left out, as the event's ``photoCount`` leaves it out: when the event was
    reclustered without it before the stop, unsetting its link later changes no event, and
    nothing would rewrite an album that listed it. Left out here rather than by an unindexed
    ``$ne``."""
    albums: dict[str, list[dict]] = {}
    fields = {"storageUrl": 1, "takenAt": 1, "eventId": 1, "deadLettered": 1}
    for start in range(0, len(event_ids), BATCH):
        query = {"eventId": {"$in": event_ids[start : start + BATCH]}}
        for photo in db.photos.find(query, fields):
            if not photo.get("deadLettered"):
                albums.setdefault(photo["eventId"], []).append(photo)
    for photos in albums.values():
        photos.sort(key=lambda p: (p["takenAt"], p["_id"]))
    return albums


def manifest_of(event: dict, photos: list[dict]) -> dict:
    """The album: event fields and its photos (in ``(takenAt, _id)`` order) with their
    storageUrls; a tombstone points to the event it was merged into and lists no photos."""
    body = update_message(event)
    body["photos"] = (
        []
        if event.get("mergedInto")
        else [
            {"photoId": p["_id"], "storageUrl": p.get("storageUrl"), "takenAt": _iso(p["takenAt"])}
            for p in photos
        ]
    )
    return body


def manifest(db: Database, event: dict) -> dict:
    """The album of one event, read from ``photos``."""
    if event.get("mergedInto"):
        return manifest_of(event, [])
    return manifest_of(event, album_photos(db, [event["_id"]]).get(event["_id"], []))


def _iso(moment) -> str:
    return moment.isoformat().replace("+00:00", "Z")
