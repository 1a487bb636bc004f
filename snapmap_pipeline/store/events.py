"""Reads and conditional writes of ``events`` and ``pending_links``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from datetime import UTC, datetime

from pymongo import DeleteOne, UpdateOne
from pymongo.database import Database

from snapmap_pipeline.clustering import Changes, ClusterParams, Event, StoredEvent
from snapmap_pipeline.store.lease import clustering_lease


class WriteConflict(RuntimeError):
    """Another writer changed an event between our read and our write; recompute and retry."""


#: Events that hold photos. A tombstone (``mergedInto`` set) and a retired event (no successor:
#: its last photos were dead-lettered) both have ``photoCount`` 0; a live event never does.
LIVE_EVENTS = {"mergedInto": None, "photoCount": {"$gt": 0}}


def is_live(event: Mapping) -> bool:
    """The document-level form of :data:`LIVE_EVENTS`."""
    return event.get("mergedInto") is None and event.get("photoCount", 0) > 0


def load_stored_events(db: Database, event_ids: Iterable[str]) -> dict[str, StoredEvent]:
    ids = list(set(event_ids))
    stored: dict[str, StoredEvent] = {}
    for start in range(0, len(ids), 5000):
        for doc in db.events.find({"_id": {"$in": ids[start : start + 5000]}}):
            lon, lat = doc["centroid"]["coordinates"]
            stored[doc["_id"]] = StoredEvent(
                event_id=doc["_id"],
                version=int(doc["version"]),
                photo_count=int(doc["photoCount"]),
                lon=float(lon),
                lat=float(lat),
                radius_m=float(doc["radiusM"]),
                start_at=doc["startAt"],
                end_at=doc["endAt"],
                first_photo_id=doc["firstPhotoId"],
                merged_into=doc.get("mergedInto"),
            )
    return stored


def event_fields(event: Event, params: ClusterParams) -> dict:
    return {
        "centroid": {"type": "Point", "coordinates": [event.lon, event.lat]},
        "radiusM": event.radius_m,
        "startAt": event.start_at,
        "endAt": event.end_at,
        "photoCount": event.photo_count,
        "firstPhotoId": event.first_photo_id,
        "mergedInto": None,
        "params": {"radiusM": params.radius_m, "windowS": params.window_s},
    }


def write_events(
    db: Database, changes: Changes, stored: Mapping[str, StoredEvent], params: ClusterParams
) -> None:
    """Write created, changed and tombstoned events, each conditional on the version read.

    Every write marks the event ``publishPending`` (the outbox of ``event-updates``). Raises
    ``WriteConflict`` when any condition fails; the caller recomputes from fresh state.
    """
    now = datetime.now(UTC)
    requests = []
    for event in changes.created:
        document = event_fields(event, params) | {
            "version": 1,
            "updatedAt": now,
            "publishPending": True,
            "publishedVersion": 0,
            "manifestPending": True,
        }
        requests.append(UpdateOne({"_id": event.event_id}, {"$setOnInsert": document}, upsert=True))
    for event in changes.changed:
        version = stored[event.event_id].version
        update = event_fields(event, params) | {
            "version": version + 1,
            "updatedAt": now,
            "publishPending": True,
            "manifestPending": True,
        }
        requests.append(UpdateOne({"_id": event.event_id, "version": version}, {"$set": update}))
    for event_id, merged_into in changes.tombstoned.items():
        version = stored[event_id].version
        update = {
            "mergedInto": merged_into,
            "photoCount": 0,
            "version": version + 1,
            "updatedAt": now,
            "publishPending": True,
            "manifestPending": True,
        }
        requests.append(UpdateOne({"_id": event_id, "version": version}, {"$set": update}))
    if not requests:
        return
    result = db.events.bulk_write(requests, ordered=False)
    expected_updates = len(changes.changed) + len(changes.tombstoned)
    if result.upserted_count != len(changes.created) or result.matched_count != expected_updates:
        raise WriteConflict(
            f"events changed under us: {result.upserted_count}/{len(changes.created)} created, "
            f"{result.matched_count}/{expected_updates} updated"
        )


def effective_links(db: Database, photo_docs: Mapping[str, dict]) -> dict[str, str | None]:
    """Each photo's event: its pending link decision if one is queued, else ``eventId``."""
    links = {photo_id: doc.get("eventId") for photo_id, doc in photo_docs.items()}
    ids = list(links)
    for start in range(0, len(ids), 5000):
        for pending in db.pending_links.find({"_id": {"$in": ids[start : start + 5000]}}):
            links[pending["_id"]] = pending["eventId"]
    return links


def queue_links(db: Database, links: Mapping[str, str], token: int) -> None:
    """Queue link decisions made under lease ``token``; newer tokens replace older ones."""
    requests = [
        UpdateOne({"_id": photo_id}, {"$set": {"eventId": event_id, "token": token}}, upsert=True)
        for photo_id, event_id in links.items()
    ]
    for start in range(0, len(requests), 10_000):
        db.pending_links.bulk_write(requests[start : start + 10_000], ordered=False)


def apply_pending_links(
    db: Database, limit: int = 50_000, take_lease: bool = True
) -> tuple[int, int]:
    """Apply queued link decisions to ``photos.eventId``, oldest token first, and dequeue them.

    A photo only takes a decision whose token is newer than the one it last took, so a slow
    link step can never undo a newer decision, and a dead-lettered photo takes none (its
    decision was queued before it was dead-lettered). The photos' tokens are read and the
    writes made under the clustering lease, so no other run links a photo in between: the
    tokens are compared on the read, and the writes filter by ``_id`` alone.
    ``take_lease=False`` is for a caller that already holds it (the lease is not re-entrant).
    Returns (photos changed, decisions applied).
    """
    pending = list(db.pending_links.find({}).sort("token", 1).limit(limit))
    if not pending:
        return 0, 0
    changed = 0
    with clustering_lease(db) if take_lease else nullcontext():
        taken: dict[str, int | None] = {}
        ids = [p["_id"] for p in pending]
        for start in range(0, len(ids), 5000):
            query = {"_id": {"$in": ids[start : start + 5000]}}
            for doc in db.photos.find(query, {"linkToken": 1, "deadLettered": 1}):
                if not doc.get("deadLettered"):
                    taken[doc["_id"]] = doc.get("linkToken")
        updates = [
            UpdateOne(
                {"_id": p["_id"]},
                {"$set": {"eventId": p["eventId"], "linkToken": p["token"]}},
            )
            for p in pending
            if p["_id"] in taken and (taken[p["_id"]] is None or taken[p["_id"]] < p["token"])
        ]
        if updates:
            changed = db.photos.bulk_write(updates, ordered=False).modified_count
    db.pending_links.bulk_write(
        [DeleteOne({"_id": p["_id"], "token": p["token"]}) for p in pending], ordered=False
    )
    return changed, len(pending)


def photos_linked_to(db: Database, event_ids: Iterable[str]) -> dict[str, list[str]]:
    """The photos each event holds by their effective link (see :func:`effective_links`),
    dead-lettered photos left out. Events that hold none are absent."""
    wanted = set(event_ids)
    ids = sorted(wanted)
    members: dict[str, dict] = {}
    for start in range(0, len(ids), 5000):
        chunk = ids[start : start + 5000]
        for doc in db.photos.find({"eventId": {"$in": chunk}}, {"eventId": 1, "deadLettered": 1}):
            members[doc["_id"]] = doc
        for pending in db.pending_links.find({"eventId": {"$in": chunk}}, {"_id": 1}):
            members.setdefault(pending["_id"], {})
    unknown = [photo_id for photo_id, doc in members.items() if not doc]
    for start in range(0, len(unknown), 5000):
        query = {"_id": {"$in": unknown[start : start + 5000]}}
        for doc in db.photos.find(query, {"eventId": 1, "deadLettered": 1}):
            members[doc["_id"]] = doc
    kept = {p: doc for p, doc in members.items() if doc and not doc.get("deadLettered")}
    held: dict[str, list[str]] = {}
    for photo_id, event_id in effective_links(db, kept).items():
        if event_id in wanted:
            held.setdefault(event_id, []).append(photo_id)
    return {event_id: sorted(photo_ids) for event_id, photo_ids in held.items()}


def retire_emptied_events(db: Database, event_ids: Iterable[str]) -> list[str]:
    """Retire the live events among ``event_ids`` that no photo links to any more: photoCount 0,
    no ``mergedInto``, a new version published as ``tombstoned`` with an empty manifest.

    The caller holds the clustering lease, so no run links a photo to them in between."""
    ids = sorted(set(event_ids))
    held = photos_linked_to(db, ids)
    now = datetime.now(UTC)
    retired: list[str] = []
    for event in db.events.find({"_id": {"$in": [i for i in ids if i not in held]}}):
        if not is_live(event):
            continue
        update = {
            "photoCount": 0,
            "version": int(event["version"]) + 1,
            "updatedAt": now,
            "publishPending": True,
            "manifestPending": True,
        }
        written = db.events.update_one(
            {"_id": event["_id"], "version": event["version"]}, {"$set": update}
        )
        if written.matched_count != 1:
            raise WriteConflict(f"event {event['_id']} changed while it was being retired")
        retired.append(event["_id"])
    return retired
