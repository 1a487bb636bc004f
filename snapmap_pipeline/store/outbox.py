"""The outbox of event changes: every event write sets ``publishPending`` and
``manifestPending``; these functions drain them. Kafka messages (``event-updates``) must go out
for a run to succeed; manifests in Blob Storage are retried by the next run or sweep when the
storage account is unavailable, so an Azure outage never stops ingestion."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from azure.core.exceptions import AzureError
from pymongo import UpdateOne
from pymongo.database import Database

from snapmap_pipeline.resources.blob import BlobStorageResource
from snapmap_pipeline.resources.kafka import KafkaResource

log = logging.getLogger(__name__)
BATCH = 1000


@dataclass
class OutboxReport:
    published: int = 0
    manifests_written: int = 0
    manifests_unchanged: int = 0
    manifests_pending: int = 0


def update_message(event: dict) -> dict:
    """The ``event-updates`` message of one event version (contract: docs/event-updates.md)."""
    action = (
        "tombstoned"
        if event.get("mergedInto")
        else ("created" if event["version"] == 1 else "changed")
    )
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
    db: Database, blob: BlobStorageResource, limit: int = 5000
) -> OutboxReport:
    """Write the JSON album of every event whose manifest is pending. A storage failure leaves
    the rest pending (reported, not raised)."""
    report = OutboxReport()
    events = list(db.events.find({"manifestPending": True}).sort("_id", 1).limit(limit))
    if not events:
        return report
    try:
        with blob.service() as client:
            for event in events:
                changed = blob.put_manifest(client, event["_id"], manifest(db, event))
                db.events.update_one(
                    {"_id": event["_id"], "version": event["version"]},
                    {"$set": {"manifestPending": False}},
                )
                if changed:
                    report.manifests_written += 1
                else:
                    report.manifests_unchanged += 1
    except AzureError as error:
        log.warning("Blob Storage unavailable, manifests stay pending: %s", str(error)[:200])
    report.manifests_pending = db.events.count_documents({"manifestPending": True})
    return report


def manifest(db: Database, event: dict) -> dict:
    """The album: event fields and its photos with their storageUrls; a tombstone points to the
    event it was merged into."""
    body = update_message(event)
    if event.get("mergedInto"):
        body["photos"] = []
        return body
    photos = db.photos.find({"eventId": event["_id"]}, {"storageUrl": 1, "takenAt": 1}).sort(
        [("takenAt", 1), ("_id", 1)]
    )
    body["photos"] = [
        {"photoId": p["_id"], "storageUrl": p.get("storageUrl"), "takenAt": _iso(p["takenAt"])}
        for p in photos
    ]
    return body


def _iso(moment) -> str:
    return moment.isoformat().replace("+00:00", "Z")
