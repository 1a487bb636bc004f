"""Recluster the neighbourhood of some photos: the one operation behind streaming runs,
daily backfills and the sweeper.

Under the clustering lease: load the seed photos and the closure of photos linked to them
(``clustering.closure``'s locality rule), run the canonical pass over that closure, compare with
what is stored, write the event changes conditionally and queue the photo links. The result is
the canonical one whatever order or batches the photos came in, because the closure holds every
photo whose decisions could depend on the seed.

Loading the closure. Every read is an indexed equality or range: photos by ``_id`` (the seed),
by ``eventId`` (events a photo moved away from), and by ``(cell, takenAt)`` for the
neighbourhood; dead-lettered photos are dropped here rather than by an unindexed ``$ne``.
The neighbourhood is fetched in rounds, one ``$or`` query per round (or a few for a very large
seed): the first round fetches, for every seed photo, the cells within the link reach (2R plus
slack) over ``takenAt`` within W, which is exactly what the locality rule needs. Everything
fetched stays in memory and the closure is grown through it hop by hop
(``clustering.locality.linked_through``); only photos whose own cells and times were not
fetched yet go back to the database. Each later round doubles the time margin (up to 64 W)
around those photos, and the reach in space (up to 16 link reaches) when the closure reached
cells never fetched, so a crowd that keeps going for hours along a street costs a number of
rounds that grows with the logarithm of its length, not one round per hop, while a crowd that
stays in one square is not fetched a district wide. Wider rounds can return photos that turn
out not to be linked; they are dropped, and the closure is the same set as with hop-by-hop
fetches.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from pymongo import UpdateOne
from pymongo.database import Database

from snapmap_pipeline.clustering import (
    ClusterParams,
    PhotoPoint,
    canonical_pass,
    diff,
    event_id_for,
    link_reach_m,
)
from snapmap_pipeline.clustering.locality import linked_through
from snapmap_pipeline.clustering.model import epoch_us, from_epoch_us
from snapmap_pipeline.store.events import (
    WriteConflict,
    effective_links,
    load_stored_events,
    queue_links,
    write_events,
)
from snapmap_pipeline.store.geocell import cell_of, cells_near
from snapmap_pipeline.store.lease import clustering_lease
from snapmap_pipeline.store.photos import PHOTO_FIELDS, to_point

log = logging.getLogger(__name__)
MAX_CONFLICT_RETRIES = 5

# Round k of a closure load fetches W * 2**k around new photos (k at most 6, as the engine's
# closure does) in cells within the link reach * 2**j, where j counts the earlier rounds that
# reached cells never fetched (j at most 4: 1.6 km at R = 50 m, about one more ring of cells;
# wider would fetch whole districts of a busy city for one crowd).
_MAX_TIME_DOUBLINGS = 6
_MAX_REACH_DOUBLINGS = 4
# Limits per query: branches of the $or (each one cell list and one takenAt range), cells over
# all branches, and documents per reply (so a query costs 1 + returned // _REPLY_DOCS round
# trips).
_BRANCHES_PER_QUERY = 200
_CELLS_PER_QUERY = 2_000
_IDS_PER_QUERY = 5_000
_REPLY_DOCS = 10_000
_LOAD_FIELDS = PHOTO_FIELDS | {"deadLettered": 1}
_LATEST = 2**63
# What a closure photo still needs fetched (``_ClosureLoad._need``).
_COVERED, _LONGER, _FARTHER = 0, 1, 2


@dataclass
class ReclusterReport:
    """What one recluster did; counts are plotted in the Dagster UI."""

    seed_photos: int = 0
    closure_photos: int = 0
    closure_rounds: int = 0
    closure_queries: int = 0
    photos_fetched: int = 0
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
            "closure_rounds",
            "closure_queries",
            "photos_fetched",
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
    reclustered: set[str] | None = None,
    taken_between: tuple[datetime, datetime] | None = None,
) -> ReclusterReport:
    """Recluster the closure of ``seed_ids`` (plus the members of ``also_events``, for photos
    that moved away from an event). Retries on a write conflict with fresh state.

    ``reclustered``, when given, gains the ids of the closure once its result is written: by
    the locality theorem (``clustering.locality``) the closure is a union of whole linked
    components, each computed exactly, so a caller working through many seeds (a day's
    chunks) need not recluster those photos again.

    ``taken_between``, when given, is the ``takenAt`` of the first and the last seed photo (a
    day's chunk): every photo taken strictly between them is read with one range query under
    the lease, in place of the seed's reads by id and of the neighbourhood queries inside that
    range. Photos of the range that are not seeds are known to the closure load, which adds
    those linked to the seed as it would add fetched ones. The two end instants themselves are
    read as without a range (seeds by id, neighbours by cell): any number of photos may share
    one ``takenAt`` (a camera that stamps only the date), and a range closed on them would hold
    all of those photos in every chunk that ends or starts there."""
    seed = sorted(set(seed_ids))
    if not seed:
        return ReclusterReport()
    for attempt in range(1, MAX_CONFLICT_RETRIES + 1):
        try:
            return _recluster_once(db, seed, params, set(also_events), reclustered, taken_between)
        except WriteConflict as conflict:
            log.warning("recluster attempt %d lost a race (%s); retrying", attempt, conflict)
    raise WriteConflict(f"recluster lost {MAX_CONFLICT_RETRIES} races in a row")


def _recluster_once(
    db: Database,
    seed_ids: Sequence[str],
    params: ClusterParams,
    also_events: set[str],
    reclustered: set[str] | None,
    taken_between: tuple[datetime, datetime] | None,
) -> ReclusterReport:
    report = ReclusterReport(seed_photos=len(seed_ids))
    clock = _Clock(report)
    with clustering_lease(db) as token:
        report.lease_token = token
        load = _ClosureLoad(db, params)
        known: dict[str, dict] = {}
        if taken_between is not None:
            known = _photos_taken_between(db, *taken_between)
            load.know(known, *taken_between)
        docs = {photo_id: known[photo_id] for photo_id in seed_ids if photo_id in known}
        # Seeds outside the range (or all of them, without one): their takenAt moved since
        # the caller chose them, or no range was given.
        docs.update(_photos_by(db, "_id", [i for i in seed_ids if i not in known]))
        for photo_id, doc in _photos_by(db, "eventId", sorted(also_events)).items():
            docs.setdefault(photo_id, doc)
        docs.update(load.grow(docs))
        # Photos the upload backend wrote alone have no cell until a closure holds them.
        _fill_missing_cells(db, docs.values())
        report.closure_rounds = load.rounds
        report.closure_queries = load.queries
        report.photos_fetched = load.photos_fetched
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
        if reclustered is not None:
            reclustered.update(docs)

    report.created = len(changes.created)
    report.changed = len(changes.changed)
    report.tombstoned = len(changes.tombstoned)
    report.links_queued = len(changes.links)
    report.unchanged_events = changes.unchanged_events
    log.info(
        "reclustered %d seed photos in a closure of %d (loaded in %d rounds, %d queries, %d "
        "photos fetched): %d events created, %d changed, %d tombstoned, %d links queued "
        "(lease token %d)",
        report.seed_photos,
        report.closure_photos,
        report.closure_rounds,
        report.closure_queries,
        report.photos_fetched,
        report.created,
        report.changed,
        report.tombstoned,
        report.links_queued,
        token,
    )
    return report


def _photos_taken_between(db: Database, first: datetime, last: datetime) -> dict[str, dict]:
    """Every photo taken in the open range ``(first, last)``, minus dead-lettered ones."""
    if last <= first:
        return {}
    query = {"takenAt": {"$gt": first, "$lt": last}}
    return {
        doc["_id"]: doc
        for doc in db.photos.find(query, _LOAD_FIELDS, batch_size=_REPLY_DOCS)
        if not doc.get("deadLettered")
    }


def _photos_by(db: Database, field_name: str, values: Iterable[str]) -> dict[str, dict]:
    """Photo documents whose ``field_name`` (``_id`` or ``eventId``, both indexed) is one of
    ``values``, minus dead-lettered photos, by id."""
    wanted = list(values)
    found: dict[str, dict] = {}
    for start in range(0, len(wanted), _IDS_PER_QUERY):
        query = {field_name: {"$in": wanted[start : start + _IDS_PER_QUERY]}}
        for doc in db.photos.find(query, _LOAD_FIELDS, batch_size=_REPLY_DOCS):
            if not doc.get("deadLettered"):
                found[doc["_id"]] = doc
    return found


class _ClosureLoad:
    """The stored photos linked to some seed photos, directly or through other stored photos,
    fetched in widening rounds (see the module docstring). Times are microseconds since the
    epoch; a cell's fetched time ranges are closed intervals, merged."""

    def __init__(self, db: Database, params: ClusterParams) -> None:
        self._db = db
        self._params = params
        self._window_us = params.window_us
        self._reach_m = link_reach_m(params.radius_m) + 1.0
        # Snapping ranges to a grid of W makes neighbouring photos ask for the same range, so
        # their cells share one branch of the query.
        self._grid_us = max(self._window_us, 1_000)
        self._fetched: dict[int, list[tuple[int, int]]] = {}
        # A time range read for every cell at once (``know``), and the photos read in it.
        self._everywhere: list[tuple[int, int]] = []
        self._known: dict[str, dict] = {}
        self._reach_doublings = 0
        self.rounds = 0
        self.queries = 0
        self.photos_fetched = 0

    def know(self, docs: dict[str, dict], first: datetime, last: datetime) -> None:
        """``docs`` are every stored photo taken in the open range ``(first, last)``, whatever
        its cell (dead-lettered ones left out): they join the closure like fetched photos when
        linked to it, and that range is never asked for again."""
        self._known = docs
        low, high = epoch_us(first) + 1, epoch_us(last) - 1
        self._everywhere = [(low, high)] if low <= high else []

    def grow(self, seed_docs: dict[str, dict]) -> dict[str, dict]:
        """The documents of the stored photos that join the seed's closure (seed excluded)."""
        members = {photo_id: to_point(doc) for photo_id, doc in seed_docs.items()}
        pool: dict[str, tuple[dict, PhotoPoint]] = {
            photo_id: (doc, to_point(doc))
            for photo_id, doc in self._known.items()
            if photo_id not in members
        }
        joined: dict[str, dict] = {}
        frontier = list(members.values())
        while frontier:
            needs = [(p, self._need(p)) for p in frontier]
            uncovered = [p for p, need in needs if need]
            farther = any(need == _FARTHER for _, need in needs)
            for doc in self._fetch_round(uncovered, farther) if uncovered else ():
                if doc["_id"] not in members and not doc.get("deadLettered"):
                    pool.setdefault(doc["_id"], (doc, to_point(doc)))
            frontier = linked_through(frontier, [p for _, p in pool.values()], self._params)
            for photo in frontier:
                members[photo.photo_id] = photo
                joined[photo.photo_id] = pool.pop(photo.photo_id)[0]
        return joined

    def _need(self, photo: PhotoPoint) -> int:
        """What is still to fetch for ``photo``: ``_COVERED`` when every stored photo that may
        be linked to it was fetched already; ``_FARTHER`` when a cell within its link reach
        was never fetched (outside the ranges every cell was read over); ``_LONGER`` when
        its cells were, but not over all of its time."""
        taken_us = epoch_us(photo.taken_at)
        wanted = [(taken_us - self._window_us, taken_us + self._window_us)]
        rest = _minus(wanted, self._everywhere)
        if not rest:
            return _COVERED
        need = _COVERED
        for cell in cells_near(photo.lon, photo.lat, self._reach_m):
            ranges = self._fetched.get(cell)
            if not ranges:
                return _FARTHER
            for low, high in rest:
                i = bisect_right(ranges, (low, _LATEST)) - 1
                if i < 0 or ranges[i][1] < high:
                    need = _LONGER
        return need

    def _fetch_round(self, photos: list[PhotoPoint], farther: bool) -> list[dict]:
        """One round: fetch what ``photos`` need, minus what was fetched before. The time
        margin doubles every round; the reach doubles only in the rounds after the first
        where the closure reached cells never fetched (``farther``): a crowd that stays in one
        square for hours needs a longer time there, not a wider district."""
        margin_us = self._window_us << min(self.rounds, _MAX_TIME_DOUBLINGS)
        if self.rounds and farther:
            self._reach_doublings = min(self._reach_doublings + 1, _MAX_REACH_DOUBLINGS)
        reach_m = self._reach_m * 2**self._reach_doublings
        self.rounds += 1

        wanted: dict[int, list[tuple[int, int]]] = {}
        for photo in photos:
            taken_us = epoch_us(photo.taken_at)
            low = (taken_us - margin_us) // self._grid_us * self._grid_us
            high = -(-(taken_us + margin_us) // self._grid_us) * self._grid_us
            for cell in cells_near(photo.lon, photo.lat, reach_m):
                wanted.setdefault(cell, []).append((low, high))

        branches: dict[tuple[int, int], list[int]] = {}
        for cell, ranges in wanted.items():
            outside = _minus(_merged(ranges), self._everywhere)
            for piece in _minus(outside, self._fetched.get(cell, [])):
                branches.setdefault(piece, []).append(cell)
            self._fetched[cell] = _merged(self._fetched.get(cell, []) + ranges)

        docs = []
        for query in _branch_queries(branches):
            self.queries += 1
            docs.extend(self._db.photos.find(query, _LOAD_FIELDS, batch_size=_REPLY_DOCS))
        self.photos_fetched += len(docs)
        return docs


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Closed integer intervals merged into sorted disjoint ones (touching ones joined)."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            if high > merged[-1][1]:
                merged[-1] = (merged[-1][0], high)
        else:
            merged.append((low, high))
    return merged


def _minus(ranges: list[tuple[int, int]], taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The integers of sorted disjoint closed ``ranges`` that no interval of sorted disjoint
    ``taken`` holds, as closed intervals."""
    pieces = []
    for low, high in ranges:
        cursor = low
        for taken_low, taken_high in taken:
            if taken_high < cursor:
                continue
            if taken_low > high:
                break
            if taken_low > cursor:
                pieces.append((cursor, taken_low - 1))
            cursor = taken_high + 1
            if cursor > high:
                break
        if cursor <= high:
            pieces.append((cursor, high))
    return pieces


def _branch_queries(branches: dict[tuple[int, int], list[int]]) -> Iterator[dict]:
    """``find`` filters for ``{(low_us, high_us): cells}``: one branch per time range (the
    cells as one ``$in``), packed into ``$or`` queries within the per-query limits."""
    batch: list[dict] = []
    cells_in_batch = 0
    for (low, high), cells in sorted(branches.items()):
        cells = sorted(cells)
        for start in range(0, len(cells), _CELLS_PER_QUERY):
            part = cells[start : start + _CELLS_PER_QUERY]
            if batch and (
                len(batch) == _BRANCHES_PER_QUERY or cells_in_batch + len(part) > _CELLS_PER_QUERY
            ):
                yield _or(batch)
                batch, cells_in_batch = [], 0
            batch.append(
                {
                    "cell": {"$in": part},
                    "takenAt": {"$gte": from_epoch_us(low), "$lte": from_epoch_us(high)},
                }
            )
            cells_in_batch += len(part)
    if batch:
        yield _or(batch)


def _or(branches: list[dict]) -> dict:
    return branches[0] if len(branches) == 1 else {"$or": branches}


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
