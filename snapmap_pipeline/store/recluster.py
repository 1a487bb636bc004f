"""Recluster the neighbourhood of some photos: the one operation behind streaming runs,
daily backfills and the sweeper.

Under the clustering lease: load the seed photos and the closure of photos linked to them
(``clustering.closure``'s locality rule), run the canonical pass over that closure, compare with
what is stored, write the event changes conditionally and queue the photo links. The result is
the canonical one whatever order or batches the photos came in, because the closure holds every
photo whose decisions could depend on the seed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pymongo import UpdateOne
from pymongo.database import Database

from snapmap_pipeline.clustering import (
    ClusterParams,
    PhotoPoint,
    canonical_pass,
    diff,
    event_id_for,
    linked_to,
)
from snapmap_pipeline.store.events import (
    WriteConflict,
    effective_links,
    load_stored_events,
    queue_links,
    write_events,
)
from snapmap_pipeline.store.geocell import cell_of
from snapmap_pipeline.store.lease import clustering_lease
from snapmap_pipeline.store.photos import (
    PHOTO_FIELDS,
    load_neighbourhood,
    load_points,
    to_point,
)

log = logging.getLogger(__name__)
MAX_CONFLICT_RETRIES = 5


@dataclass
class ReclusterReport:
    """What one recluster did; counts are plotted in the Dagster UI."""

    seed_photos: int = 0
    closure_photos: int = 0
    created: int = 0
    changed: int = 0
    tombstoned: int = 0
    links_queued: int = 0
    unchanged_events: int = 0
    lease_token: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def merge(self, other: ReclusterReport) -> None:
        for name in (
            "seed_photos",
            "closure_photos",
            "created",
            "changed",
            "tombstoned",
            "links_queued",
            "unchanged_events",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lease_token = max(self.lease_token, other.lease_token)
        for step, seconds in other.seconds.items():
            self.seconds[step] = self.seconds.get(step, 0.0) + seconds


def recluster(
    db: Database,
    seed_ids: Iterable[str],
    params: ClusterParams,
    also_events: Iterable[str] = (),
) -> ReclusterReport:
    """Recluster the closure of ``seed_ids`` (plus the members of ``also_events``, for photos
    that moved away from an event). Retries on a write conflict with fresh state."""
    seed = sorted(set(seed_ids))
    if not seed:
        return ReclusterReport()
    for attempt in range(1, MAX_CONFLICT_RETRIES + 1):
        try:
            return _recluster_once(db, seed, params, set(also_events))
        except WriteConflict as conflict:
            log.warning("recluster attempt %d lost a race (%s); retrying", attempt, conflict)
    raise WriteConflict(f"recluster lost {MAX_CONFLICT_RETRIES} races in a row")


def _recluster_once(
    db: Database, seed_ids: Sequence[str], params: ClusterParams, also_events: set[str]
) -> ReclusterReport:
    report = ReclusterReport(seed_photos=len(seed_ids))
    clock = _Clock(report)
    with clustering_lease(db) as token:
        report.lease_token = token
        docs = load_points(db, seed_ids)
        _fill_missing_cells(db, docs.values())
        if also_events:
            query = {"eventId": {"$in": sorted(also_events)}, "deadLettered": {"$ne": True}}
            for doc in db.photos.find(query, PHOTO_FIELDS):
                docs.setdefault(doc["_id"], doc)
        docs.update(_closure_docs(db, [to_point(d) for d in docs.values()], params))
        clock.lap("load")

        points = [to_point(d) for d in docs.values()]
        report.closure_photos = len(points)
        result = canonical_pass(points, params)
        clock.lap("cluster")

        links = effective_links(db, docs)
        candidates = {event_id_for(p.photo_id) for p in points}
        candidates |= {event_id for event_id in links.values() if event_id}
        stored = load_stored_events(db, candidates)
        changes = diff(result, stored, links)
        write_events(db, changes, stored, params)
        queue_links(db, changes.links, token)
        clock.lap("write")

    report.created = len(changes.created)
    report.changed = len(changes.changed)
    report.tombstoned = len(changes.tombstoned)
    report.links_queued = len(changes.links)
    report.unchanged_events = changes.unchanged_events
    log.info(
        "reclustered %d seed photos in a closure of %d: %d events created, %d changed, "
        "%d tombstoned, %d links queued (lease token %d)",
        report.seed_photos,
        report.closure_photos,
        report.created,
        report.changed,
        report.tombstoned,
        report.links_queued,
        token,
    )
    return report


def _closure_docs(
    db: Database, seed: Sequence[PhotoPoint], params: ClusterParams
) -> dict[str, dict]:
    """Grow the seed by the stored photos linked to it until nothing new joins."""
    known = {p.photo_id for p in seed}
    found: dict[str, dict] = {}
    frontier = list(seed)
    while frontier:
        candidates = [
            doc for doc in load_neighbourhood(db, frontier, params) if doc["_id"] not in known
        ]
        joined = linked_to([to_point(d) for d in candidates], frontier, params)
        joined_ids = {p.photo_id for p in joined}
        for doc in candidates:
            if doc["_id"] in joined_ids:
                found[doc["_id"]] = doc
        known |= joined_ids
        frontier = joined
    return found


def _fill_missing_cells(db: Database, docs: Iterable[dict]) -> None:
    """Photos written by the upload backend alone (their message was lost) have no ``cell``
    yet; give them one so that later neighbourhood loads find them."""
    updates = []
    for doc in docs:
        if "cell" not in doc:
            lon, lat = doc["location"]["coordinates"]
            updates.append(UpdateOne({"_id": doc["_id"]}, {"$set": {"cell": cell_of(lon, lat)}}))
    if updates:
        db.photos.bulk_write(updates, ordered=False)


class _Clock:
    def __init__(self, report: ReclusterReport) -> None:
        self._report = report
        self._last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self._report.seconds[step] = self._report.seconds.get(step, 0.0) + now - self._last
        self._last = now
