"""Collections and indexes, created idempotently once per client.

``photos``: ``_id`` = photoId; GeoJSON ``location``; ``cell`` (see ``geocell``) with
``takenAt`` for the neighbourhood loads; ``(takenAt, _id)`` for the backfill's days;
``uploadedAt`` for the sweeper; ``eventId``.
``events``: ``_id`` = eventId; GeoJSON ``centroid``; ``endAt``; ``version``/``publishedVersion``
(the outbox of event-updates); ``manifestPending``/``manifestSha256`` (the outbox of manifests),
with ``updatedAt`` for the sweeper's sample of written manifests.
``pending_links``: photo-to-event decisions not yet applied to ``photos`` (the link step's
queue), by ``token`` and by ``eventId``. ``leases``: the clustering lease. ``batches``: what
each offset range ended as (the offset accounting). ``migrations``: one-time data changes
already done, by ``_id`` (see ``store/batches.py::stamp_legacy_batches``).
"""

from __future__ import annotations

import logging

from pymongo import ASCENDING, DESCENDING
from pymongo.database import Database
from pymongo.errors import OperationFailure

log = logging.getLogger(__name__)

_INDEXES: dict[str, list[list[tuple[str, object]]]] = {
    "photos": [
        [("cell", ASCENDING), ("takenAt", ASCENDING)],
        # Serves takenAt ranges and the backfill's day pages, sorted by (takenAt, _id).
        [("takenAt", ASCENDING), ("_id", ASCENDING)],
        [("uploadedAt", ASCENDING)],
        [("eventId", ASCENDING)],
    ],
    "events": [
        [("endAt", ASCENDING)],
        [("startAt", ASCENDING)],
        [("publishPending", ASCENDING)],
        [("manifestPending", ASCENDING)],
        # The sweeper's sample of written manifests: the most recently changed ones.
        [("manifestPending", ASCENDING), ("updatedAt", DESCENDING)],
    ],
    "pending_links": [
        [("token", ASCENDING)],
        # The queued links of given events (``store/events.py::photos_linked_to``).
        [("eventId", ASCENDING)],
    ],
    "batches": [[("topic", ASCENDING), ("partition", ASCENDING), ("first", ASCENDING)]],
}
_GEO_INDEXES = {"photos": "location", "events": "centroid"}


def ensure_schema(db: Database) -> dict[str, bool]:
    """Create the indexes. Returns, per collection, whether the server answers geo queries on
    its 2dsphere index. A server that refuses the index, or accepts it but cannot use it (the
    local MongoDB-compatible server does the latter), gets one plain log line, and clustering
    carries on: it never uses geo queries."""
    for collection, indexes in _INDEXES.items():
        for keys in indexes:
            db[collection].create_index(keys)
    geo: dict[str, bool] = {}
    refused: list[str] = []
    for collection, field in _GEO_INDEXES.items():
        try:
            db[collection].create_index([(field, "2dsphere")])
            probe = {
                field: {"$nearSphere": {"$geometry": {"type": "Point", "coordinates": [0, 0]}}}
            }
            list(db[collection].find(probe, {"_id": 1}).limit(1))
            geo[collection] = True
        except OperationFailure as error:
            geo[collection] = False
            refused.append(f"{collection}.{field} ({str(error).splitlines()[0][:120]})")
    if refused:
        log.warning(
            "server cannot serve 2dsphere queries on %s; clustering does not need them",
            ", ".join(refused),
        )
    return geo
