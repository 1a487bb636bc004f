"""Reads and writes of the ``photos`` collection."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from pymongo import UpdateOne
from pymongo.database import Database

from snapmap_pipeline.clustering import PhotoPoint
from snapmap_pipeline.contract.validation import PhotoUpload
from snapmap_pipeline.store.geocell import cell_of
from snapmap_pipeline.store.lease import clustering_lease

PHOTO_FIELDS = {"location": 1, "takenAt": 1, "eventId": 1, "cell": 1}


def source_version(source: dict, published_at: datetime | None) -> str:
    """Which of two messages about one photo is newer, as a string that sorts that way: the
    Kafka timestamp (0 when the message has none), then partition and offset (these decide
    between messages of the same millisecond, within a partition by offset). The ingest step
    rejects producer timestamps in the future (``check_publish_time``), so no message can
    outrank every later one; a producer timestamp behind the true time only makes its own
    message lose."""
    millis = int(published_at.timestamp() * 1000) if published_at else 0
    return f"{millis:015d}:{int(source['partition']):06d}:{int(source['offset']):020d}"


def newest_per_photo(
    uploads: Iterable[tuple[PhotoUpload, dict, datetime | None]],
) -> dict[str, tuple[PhotoUpload, dict, datetime | None]]:
    """The message with the greatest ``source_version`` per photo id: the order in which
    ``upsert_uploads`` lets a message replace a stored one, so one batch keeps the message that
    several batches would leave stored."""
    newest: dict[str, tuple[str, tuple[PhotoUpload, dict, datetime | None]]] = {}
    for entry in uploads:
        upload, source, published_at = entry
        version = source_version(source, published_at)
        kept = newest.get(upload.photo_id)
        if kept is None or version > kept[0]:
            newest[upload.photo_id] = (version, entry)
    return {photo_id: entry for photo_id, (_, entry) in newest.items()}


def upsert_uploads(
    db: Database, uploads: Sequence[tuple[PhotoUpload, dict, datetime | None]]
) -> int:
    """Upsert the photos of valid messages: ``(upload, source, published_at)`` triples, where
    ``published_at`` is the message's Kafka timestamp or None.

    A photo the upload backend already wrote is updated, never duplicated; one that does not
    exist yet is created from the message. ``uploadedAt`` (the publish time, or now if that is
    later or missing) and ``eventId`` are only set on insert.
    The newest message about a photo wins whatever order runs apply them in and however they
    are split into batches: each write carries its ``sourceVersion``, and a message older than
    the stored version (or than another message of ``uploads`` about the same photo) is not
    applied (a replay of an old range cannot bring back a photo's old location). The versions
    are read and the writes made under the clustering lease, so no other run writes a photo in
    between: the versions are compared on the read, and the writes filter by ``_id`` alone (a
    version condition in an upsert's filter would also make a superseded photo's upsert an
    insert of an ``_id`` that exists). Returns the number of documents created or modified.

    A message newer than the one a dead-lettered photo was dead-lettered with lets the photo
    back in (``deadLettered`` and its ``poison_attempts`` removed): the run that applied it
    clusters the photo again, and dead-letters it again, naming this message, if it still
    fails. Kept out, the photo would leave this message neither applied nor dead-lettered. A
    replay of the dead-lettered message itself (the same version) keeps the photo out.
    """
    if not uploads:
        return 0
    newest = newest_per_photo(uploads)
    versions = {
        photo_id: source_version(source, published_at)
        for photo_id, (_, source, published_at) in newest.items()
    }
    now = datetime.now(UTC)
    with clustering_lease(db):
        stored = {
            d["_id"]: d
            for d in db.photos.find(
                {"_id": {"$in": list(versions)}},
                {"sourceVersion": 1, "storageUrl": 1, "eventId": 1, "deadLettered": 1},
            )
        }
        requests = []
        # Events whose album lists a photo whose storageUrl changes: clustering does not see
        # the URL, so no recluster would mark their manifests for rewriting.
        albums_changed: set[str] = set()
        let_back_in: list[str] = []
        for upload, source, published_at in newest.values():
            version = versions[upload.photo_id]
            previous = stored.get(upload.photo_id, {})
            newer = previous.get("sourceVersion")
            if newer is not None and newer > version:
                continue  # superseded by a message already applied
            if previous.get("eventId") and previous.get("storageUrl") != upload.storage_url:
                albums_changed.add(previous["eventId"])
            fields = {
                "location": {"type": "Point", "coordinates": [upload.lon, upload.lat]},
                "cell": cell_of(upload.lon, upload.lat),
                "takenAt": upload.taken_at,
                "storageUrl": upload.storage_url,
                "source": source,
                "sourceVersion": version,
            }
            # Gone from a newer message, an extra field goes from the photo too.
            unset = {} if upload.extra else {"extraJson": ""}
            if upload.extra:
                # Kept as text: extra keys are not vetted as MongoDB field names.
                fields["extraJson"] = json.dumps(upload.extra, sort_keys=True)
            if previous.get("deadLettered") and (newer is None or version > newer):
                unset["deadLettered"] = ""
                let_back_in.append(upload.photo_id)
            update = {
                "$set": fields,
                "$setOnInsert": {"uploadedAt": min(published_at or now, now), "eventId": None},
            }
            if unset:
                update["$unset"] = unset
            requests.append(UpdateOne({"_id": upload.photo_id}, update, upsert=True))
        if not requests:
            return 0
        result = db.photos.bulk_write(requests, ordered=False)
        if let_back_in:
            # After the photos' write: a stop in between leaves the attempts counted, which
            # only makes a photo that fails again go out sooner.
            db.poison_attempts.delete_many({"_id": {"$in": let_back_in}})
        if albums_changed:
            db.events.update_many(
                {"_id": {"$in": sorted(albums_changed)}}, {"$set": {"manifestPending": True}}
            )
    return result.upserted_count + result.modified_count


def to_point(document: dict) -> PhotoPoint:
    lon, lat = document["location"]["coordinates"]
    return PhotoPoint(document["_id"], document["takenAt"], float(lon), float(lat))


def orphan_ids(db: Database, uploaded_before: datetime, limit: int) -> list[str]:
    """Photos without an event uploaded before ``uploaded_before`` (the sweeper's work)."""
    query = {"eventId": None, "uploadedAt": {"$lt": uploaded_before}, "deadLettered": {"$ne": True}}
    cursor = db.photos.find(query, {"_id": 1}).sort("uploadedAt", 1).limit(limit)
    return [d["_id"] for d in cursor]
