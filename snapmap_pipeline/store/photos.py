"""Reads and writes of the ``photos`` collection."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from pymongo import UpdateOne
from pymongo.database import Database

from snapmap_pipeline.clustering import ClusterParams, PhotoPoint
from snapmap_pipeline.contract.validation import PhotoUpload
from snapmap_pipeline.store.geocell import cell_of, cells_near
from snapmap_pipeline.store.lease import clustering_lease

PHOTO_FIELDS = {"location": 1, "takenAt": 1, "eventId": 1, "cell": 1}
# Cells per query: keeps each $in small enough for any server; more cells mean more queries.
_CELLS_PER_QUERY = 500


def source_version(source: dict, published_at: datetime | None) -> str:
    """Which of two messages about one photo is newer, as a string that sorts that way: the
    broker's publish time, then partition and offset (ties only between partitions)."""
    millis = int(published_at.timestamp() * 1000) if published_at else 0
    return f"{millis:015d}:{int(source['partition']):06d}:{int(source['offset']):020d}"


def upsert_uploads(db: Database, uploads: Sequence[tuple[PhotoUpload, dict, datetime]]) -> int:
    """Upsert the photos of valid messages: ``(upload, source, published_at)`` triples.

    A photo the upload backend already wrote is updated, never duplicated; one that does not
    exist yet is created from the message. ``uploadedAt`` and ``eventId`` are only set on insert.
    The newest message about a photo wins whatever order runs apply them in: each write carries
    its ``sourceVersion``, and a message older than the stored version is not applied (a replay
    of an old range cannot bring back a photo's old location). The versions are read and the
    writes made under the clustering lease, so no other run writes a photo in between; every
    query is by ``_id`` (a filter on the version as well would be a collection scan on the
    local server). Returns the number of documents created or modified.
    """
    if not uploads:
        return 0
    versions = {
        upload.photo_id: source_version(source, published_at)
        for upload, source, published_at in uploads
    }
    with clustering_lease(db):
        stored = {
            d["_id"]: d.get("sourceVersion")
            for d in db.photos.find({"_id": {"$in": list(versions)}}, {"sourceVersion": 1})
        }
        requests = []
        for upload, source, published_at in uploads:
            version = versions[upload.photo_id]
            newer = stored.get(upload.photo_id)
            if newer is not None and newer > version:
                continue  # superseded by a message already applied
            fields = {
                "location": {"type": "Point", "coordinates": [upload.lon, upload.lat]},
                "cell": cell_of(upload.lon, upload.lat),
                "takenAt": upload.taken_at,
                "storageUrl": upload.storage_url,
                "source": source,
                "sourceVersion": version,
            }
            if upload.extra:
                # Kept as text: extra keys are not vetted as MongoDB field names.
                fields["extraJson"] = json.dumps(upload.extra, sort_keys=True)
            requests.append(
                UpdateOne(
                    {"_id": upload.photo_id},
                    {
                        "$set": fields,
                        "$setOnInsert": {"uploadedAt": published_at, "eventId": None},
                    },
                    upsert=True,
                )
            )
        if not requests:
            return 0
        result = db.photos.bulk_write(requests, ordered=False)
    return result.upserted_count + result.modified_count


def to_point(document: dict) -> PhotoPoint:
    lon, lat = document["location"]["coordinates"]
    return PhotoPoint(document["_id"], document["takenAt"], float(lon), float(lat))


def load_points(db: Database, photo_ids: Iterable[str]) -> dict[str, dict]:
    """Photo documents (location, takenAt, eventId) by id."""
    ids = list(photo_ids)
    found: dict[str, dict] = {}
    for start in range(0, len(ids), 5000):
        chunk = ids[start : start + 5000]
        query = {"_id": {"$in": chunk}, "deadLettered": {"$ne": True}}
        for document in db.photos.find(query, PHOTO_FIELDS):
            found[document["_id"]] = document
    return found


def load_neighbourhood(
    db: Database, frontier: Sequence[PhotoPoint], params: ClusterParams
) -> list[dict]:
    """Every stored photo that may be linked to a frontier photo: taken within W of it, in a
    cell within 2R of it. A superset; the engine keeps only the photos really linked.

    Frontier photos are grouped into time buckets of W so that one query per bucket covers
    its cells with a tight ``takenAt`` range (indexed by ``(cell, takenAt)``).
    """
    window = timedelta(seconds=params.window_s)
    reach_m = 2.0 * params.radius_m + 1.0
    buckets: dict[int, tuple[set[int], datetime, datetime]] = {}
    bucket_s = max(params.window_s, 1.0)
    for photo in frontier:
        key = int(photo.taken_at.timestamp() // bucket_s)
        cells, low, high = buckets.get(key, (set(), photo.taken_at, photo.taken_at))
        cells |= cells_near(photo.lon, photo.lat, reach_m)
        buckets[key] = (cells, min(low, photo.taken_at), max(high, photo.taken_at))

    found: dict[str, dict] = {}
    for cells, low, high in buckets.values():
        cell_list = sorted(cells)
        for start in range(0, len(cell_list), _CELLS_PER_QUERY):
            query = {
                "cell": {"$in": cell_list[start : start + _CELLS_PER_QUERY]},
                "takenAt": {"$gte": low - window, "$lte": high + window},
                "deadLettered": {"$ne": True},
            }
            for document in db.photos.find(query, PHOTO_FIELDS):
                found[document["_id"]] = document
    return list(found.values())


def photo_ids_taken_between(db: Database, start: datetime, end: datetime) -> list[str]:
    """Ids of photos with ``start <= takenAt < end`` (a daily partition's own photos)."""
    query = {"takenAt": {"$gte": start, "$lt": end}}
    return [d["_id"] for d in db.photos.find(query, {"_id": 1})]


def orphan_ids(db: Database, uploaded_before: datetime, limit: int) -> list[str]:
    """Photos without an event uploaded before ``uploaded_before`` (the sweeper's work)."""
    query = {"eventId": None, "uploadedAt": {"$lt": uploaded_before}, "deadLettered": {"$ne": True}}
    cursor = db.photos.find(query, {"_id": 1}).sort("uploadedAt", 1).limit(limit)
    return [d["_id"] for d in cursor]
