"""The canonical pass: group photos into events by the canonical rule, fast.

The rule (architecture.md, "Clustering semantics"), over photos sorted by
``(taken_at, photo_id)``: photo ``p`` may join event ``e`` when the great-circle distance
from ``p`` to ``e``'s centroid is at most R and ``taken_at(p) <= end(e) + W``, both taken
over the photos that joined ``e`` before ``p``. Among such candidates ``p`` joins the
nearest centroid; distances within :data:`TIE_TOLERANCE_M` of the nearest count as equal
and go to the smallest event id (string order). With no candidate ``p`` starts an event
whose id is ``event_id_for(p.photo_id)``. A centroid is the normalised sum of the members'
unit vectors, so the antimeridian and the poles need no special case.

How it is computed. Photos are processed in canonical order, in blocks of consecutive
photos. For each block one haversine BallTree holds the centroids of the events still
joinable at the block's start (their *snapshot*) and the block's own photos, and one radius
query (2R) per block photo returns two kinds of hits:

* snapshot centroids within R of the photo, and
* earlier photos of the block within 2R and at most W before it.

Why that is enough: if ``e`` is a candidate of ``p`` and no photo joined ``e`` earlier in
the block, ``e``'s centroid is its snapshot centroid, found by the first kind. Otherwise let
``m`` be the last photo that joined ``e`` (it is in the block). The centroid after ``m``
joined lies on the arc between the previous centroid and ``m``, and ``m`` was within R of
the previous centroid, so ``m`` is within R of the current centroid; ``p`` is within R of
it too, so ``m`` is within 2R of ``p`` and, ``e`` being joinable, at most W before it:
the second kind finds ``m``, and ``m``'s event is ``e``. Every decision is then re-made
exactly with the current centroids in a short sequential loop.

A photo with no hit cannot have a candidate, nor can one whose only hits are photos more
than R away that had no hits themselves (see ``_Sweep._may_join``); such photos (most of a
city's background noise) become one-photo events in bulk, without entering the loop. In a
dense crowd a photo has many earlier hits but they belong to a few events, so the loop then
checks the events touched so far in the block instead of collecting the events of its hits
(both are supersets of the candidates; the exact check decides).

Block sizes adapt: a block shrinks when its tree hits outnumber its tree points (the
build cost) many times over, and grows when they are few. Independently, a block ends
early once its hits pass two million, and the query runs in chunks sized so that even a
chunk of photos that all hit every tree point stays within a fixed number of pairs; a sparse
block that runs into a crowd therefore cannot list (block size)^2 pairs. Block boundaries
never change the result (a property test runs blocks of one to four photos).

Cost: O(n log n) for the sort; one tree query per photo; per block a tree build over the
joinable events and the block's photos; per photo with hits a loop over its candidate
events, after collecting at most its earlier hits (bounded by the block size, which
shrinks in a crowd). Linear in n for a fixed density; a crowd of 100k photos in a 50 m
disc costs about twice one of 50k (BENCHMARKS.md). Memory: O(n) plus the hits of one
block (at most a few million pairs).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from snapmap_pipeline.clustering import geo
from snapmap_pipeline.clustering.model import (
    ClusterParams,
    ClusterResult,
    Event,
    PhotoColumns,
    PhotoPoint,
    event_id_for,
    photo_columns,
    to_utc,
    unique_photos,
)

#: Centroid distances (metres) closer than this to the nearest one count as a tie. Far above
#: float noise in the distance (about 1e-9 m), far below any real difference in position.
TIE_TOLERANCE_M = 1e-6

# Block sizes (photos), and the tree hits per tree point (joinable events plus block photos)
# above which the next block is halved and below which it is doubled.
_BLOCK_MIN, _BLOCK_START, _BLOCK_MAX = 64, 1024, 16384
_HITS_SHRINK, _HITS_GROW = 16.0, 4.0
# Memory bounds: a block stops after the query chunk that takes its hits past
# _MAX_BLOCK_HITS, and a chunk is small enough that even if every photo in it hit every
# tree point it would list at most _CHUNK_WORST_HITS pairs (at least _CHUNK_MIN photos).
_MAX_BLOCK_HITS = 2_000_000
_CHUNK_WORST_HITS = 16_000_000
_CHUNK_MIN = 64
# A photo with this many times more earlier block hits than events touched so far in the
# block checks those events instead of collecting its hits' events.
_TOUCHED_SCAN_RATIO = 4


@dataclass(frozen=True)
class EventTable:
    """A canonical pass as columns (what :func:`canonical_pass` turns into objects).

    Photos are in canonical order, ``n`` of them: ``photo_ids`` (list of str), ``order``
    (int64 ``(n,)``: each photo's index in the caller's input) and ``photo_event`` (int64
    ``(n,)``: row of the photo's event). Events, ``k`` of them, one row each:
    ``event_ids`` (list of str), ``lon``/``lat`` (float64 degrees), ``radius_m`` (float64
    metres), ``photo_count`` (int64), ``first_photo``/``last_photo`` (int64 canonical photo
    positions), ``start_us``/``end_us`` (int64 microseconds since the Unix epoch).
    """

    photo_ids: list[str]
    order: np.ndarray
    photo_event: np.ndarray
    event_ids: list[str]
    lon: np.ndarray
    lat: np.ndarray
    radius_m: np.ndarray
    photo_count: np.ndarray
    first_photo: np.ndarray
    last_photo: np.ndarray
    start_us: np.ndarray
    end_us: np.ndarray


def canonical_pass(
    photos: Iterable[PhotoPoint], params: ClusterParams = ClusterParams()
) -> ClusterResult:
    """Cluster ``photos`` by the canonical rule.

    Repeats of a photo (same id, same data) are ignored; one id with two different
    photos raises ``ValueError``, as do invalid coordinates or naive datetimes (see
    :func:`~snapmap_pipeline.clustering.model.photo_columns`). The result depends only on
    the set of photos, never on their order. ``start_at``/``end_at`` are in UTC.
    """
    with _collector_paused():
        unique = unique_photos(photos)
        table = cluster_columns(photo_columns(unique), params)
        return _as_result(table, unique)


def _as_result(table: EventTable, unique: list[PhotoPoint]) -> ClusterResult:
    """Objects for the columns of ``table``; ``unique`` are the photos it was built from."""
    lon = table.lon.tolist()
    lat = table.lat.tolist()
    radius = table.radius_m.tolist()
    count = table.photo_count.tolist()
    first = table.first_photo.tolist()
    last = table.last_photo.tolist()
    order = table.order.tolist()
    events = {}
    for row, event_id in enumerate(table.event_ids):
        events[event_id] = Event(
            event_id,
            lon[row],
            lat[row],
            radius[row],
            to_utc(unique[order[first[row]]].taken_at),
            to_utc(unique[order[last[row]]].taken_at),
            count[row],
            table.photo_ids[first[row]],
        )
    event_ids = table.event_ids
    assignment = dict(
        zip(table.photo_ids, [event_ids[row] for row in table.photo_event.tolist()], strict=True)
    )
    return ClusterResult(events, assignment)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector, restoring its previous state on exit.

    A pass over a million photos creates millions of objects that can never form cycles
    (events, floats, dict entries). Each of the collector's full collections meanwhile
    re-scans every live tracked object; at 1M photos that was about 10 % of the pass.
    Reference counting still frees everything as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def cluster_columns(columns: PhotoColumns, params: ClusterParams = ClusterParams()) -> EventTable:
    """The canonical pass over validated columns (see
    :func:`~snapmap_pipeline.clustering.model.photo_columns`) with unique photo ids, without
    building an object per photo or event."""
    with _collector_paused():
        return _cluster_columns(columns, params)


def _cluster_columns(columns: PhotoColumns, params: ClusterParams) -> EventTable:
    ids_in = columns.photo_ids
    order = canonical_order(columns.taken_at_us, ids_in)
    photo_ids = [ids_in[i] for i in order.tolist()]
    taken_at_us = columns.taken_at_us[order]
    latlon = geo.latlon_radians(columns.lon[order], columns.lat[order])
    state = _Sweep(taken_at_us, latlon, photo_ids, params).run()

    first = np.array(state.first, dtype=np.int64)
    last = np.array(state.last, dtype=np.int64)
    event_lat = np.array(state.lat)
    event_lon = np.array(state.lon)
    photo_event = state.labels
    member_m = geo.haversine_m(
        latlon[:, 0], latlon[:, 1], event_lat[photo_event], event_lon[photo_event]
    )
    radius_m = np.zeros(len(first))
    np.maximum.at(radius_m, photo_event, member_m)

    count = np.array(state.count, dtype=np.int64)
    # A one-photo event sits exactly on its photo: report the input degrees unchanged rather
    # than a radians round trip. atan2 can land a hair outside the degree ranges; clip that.
    single = count == 1
    lon = np.where(single, columns.lon[order][first], np.clip(geo.degrees(event_lon), -180, 180))
    lat = np.where(single, columns.lat[order][first], np.clip(geo.degrees(event_lat), -90, 90))
    event_ids = [event_id_for(photo_ids[i]) for i in first.tolist()]
    if len(set(event_ids)) != len(event_ids):
        # 80-bit ids: a collision means a broken hash, never chance; refuse to merge events.
        raise RuntimeError("two events derived the same event id; event_id_for is broken")
    return EventTable(
        photo_ids=photo_ids,
        order=order,
        photo_event=photo_event,
        event_ids=event_ids,
        lon=lon,
        lat=lat,
        radius_m=radius_m,
        photo_count=count,
        first_photo=first,
        last_photo=last,
        start_us=taken_at_us[first],
        end_us=taken_at_us[last],
    )


def canonical_order(taken_at_us: np.ndarray, photo_ids: Sequence[str]) -> np.ndarray:
    """Indexes that sort photos by ``(taken_at, photo_id)``; int64 ``(n,)``.

    Sorts by time in numpy, then only runs of equal times by id (Python string order).
    """
    order = np.argsort(taken_at_us, kind="stable")
    times = taken_at_us[order]
    starts = np.flatnonzero(np.r_[True, times[1:] != times[:-1]])
    ends = np.r_[starts[1:], len(times)]
    for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
        if hi - lo > 1:
            order[lo:hi] = sorted(order[lo:hi].tolist(), key=photo_ids.__getitem__)
    return order


class _Sweep:
    """State of one canonical pass over photos already in canonical order.

    Inputs: ``taken_at_us`` int64 ``(n,)``, ``latlon`` float64 ``(n, 2)`` ``[lat, lon]``
    radians, ``photo_ids`` list of n str. Events are rows ``0..k-1`` of plain Python lists
    (the sequential loop reads and writes single elements, which lists do fastest): sum of
    member unit vectors, member count, last ``taken_at``, centroid latitude, longitude and
    cosine of latitude (radians), and first and last member positions. ``labels`` is the
    event row of each photo.
    """

    def __init__(
        self,
        taken_at_us: np.ndarray,
        latlon: np.ndarray,
        photo_ids: list[str],
        params: ClusterParams,
    ) -> None:
        self.t = taken_at_us
        self.latlon = latlon
        self.photo_ids = photo_ids
        self.radius_m = params.radius_m
        self.window_us = params.window_us
        self.vectors = geo.unit_vectors(latlon[:, 0], latlon[:, 1])
        self.labels = np.full(len(taken_at_us), -1, dtype=np.int64)
        self.sx: list[float] = []
        self.sy: list[float] = []
        self.sz: list[float] = []
        self.count: list[int] = []
        self.end: list[int] = []
        self.lat: list[float] = []
        self.lon: list[float] = []
        self.cos_lat: list[float] = []
        self.first: list[int] = []
        self.last: list[int] = []

    def run(self) -> _Sweep:
        n = len(self.t)
        joinable = np.empty(0, dtype=np.int64)
        start, size = 0, _BLOCK_START
        while start < n:
            stop = min(n, start + size)
            joinable = self._still_joinable(joinable, int(self.t[start]))
            tree_points = len(joinable) + stop - start
            stop, hits, touched = self._block(start, stop, joinable)
            joinable = np.union1d(joinable, np.fromiter(touched, np.int64, len(touched)))
            # Balance the per-block tree build (about tree_points points) against the
            # per-hit work of the query and the loop.
            hits_per_point = hits / tree_points
            if hits_per_point > _HITS_SHRINK:
                size = max(_BLOCK_MIN, size // 2)
            elif hits_per_point < _HITS_GROW:
                size = min(_BLOCK_MAX, size * 2)
            start = stop
        return self

    def _still_joinable(self, events: np.ndarray, now_us: int) -> np.ndarray:
        """The events a photo taken at ``now_us`` or later could still join."""
        end = np.fromiter(map(self.end.__getitem__, events.tolist()), np.int64, len(events))
        return events[end >= now_us - self.window_us]

    def _block(self, start: int, stop: int, joinable: np.ndarray) -> tuple[int, int, set[int]]:
        """Assign photos ``start..stop-1``, or fewer when the hits would exceed
        ``_MAX_BLOCK_HITS``. Returns where the block really ended, the number of tree hits
        and the events of the block's photos."""
        ev_lat = np.fromiter(map(self.lat.__getitem__, joinable.tolist()), float, len(joinable))
        ev_lon = np.fromiter(map(self.lon.__getitem__, joinable.tolist()), float, len(joinable))
        tree_latlon = np.vstack((np.column_stack((ev_lat, ev_lon)), self.latlon[start:stop]))
        tree = geo.build_tree(tree_latlon)
        rows, cols = self._hits(tree, start, stop, len(tree_latlon))
        stop = start + (int(rows[-1]) + 1 if len(rows) else stop - start)
        size = stop - start
        block_latlon = self.latlon[start:stop]
        n_events = len(joinable)

        # Snapshot centroids within R (plus slack; the loop decides exactly).
        is_event = cols < n_events
        event_rows, event_cols = rows[is_event], cols[is_event]
        near = geo.haversine_m(
            block_latlon[event_rows, 0],
            block_latlon[event_rows, 1],
            ev_lat[event_cols],
            ev_lon[event_cols],
        ) <= geo.with_slack(self.radius_m)
        event_rows, event_hits = event_rows[near], joinable[event_cols[near]]

        # Earlier photos of the block at most W before: their events may have moved here.
        photo_rows, photo_cols = rows[~is_event], cols[~is_event] - n_events
        earlier = photo_cols < photo_rows
        photo_rows, photo_cols = photo_rows[earlier], photo_cols[earlier]
        t = self.t[start:stop]
        recent = t[photo_rows] - t[photo_cols] <= self.window_us
        photo_rows, photo_hits = photo_rows[recent], photo_cols[recent]

        quiet = np.flatnonzero(~self._may_join(size, event_rows, photo_rows, photo_hits, start))
        block_labels = np.full(size, -1, dtype=np.int64)
        block_labels[quiet] = self._new_events(start + quiet)
        labels = block_labels.tolist()

        bounds = np.arange(size + 1)
        self._decide(
            start,
            labels,
            (np.searchsorted(event_rows, bounds).tolist(), event_hits.tolist()),
            (np.searchsorted(photo_rows, bounds).tolist(), photo_hits.tolist()),
        )
        self.labels[start:stop] = labels
        return stop, len(rows), set(labels)

    def _may_join(
        self,
        size: int,
        event_rows: np.ndarray,
        photo_rows: np.ndarray,
        photo_hits: np.ndarray,
        start: int,
    ) -> np.ndarray:
        """Bool ``(size,)``: which block photos may have a candidate event (the others
        start one-photo events without entering the loop).

        A candidate either is a snapshot event within R (an event hit), or its last photo
        ``m`` is an earlier block photo within 2R (a photo hit). If ``m`` is more than R
        away, the event's centroid is not ``m`` itself, so the event has two members and
        ``m`` joined it: ``m`` had a hit of its own. So a photo hit farther than R only
        counts when the hit photo has a hit; in a city this spares the loop about half of
        the photos that merely have a neighbour within 2R.
        """
        has_hit = np.zeros(size, dtype=bool)
        has_hit[event_rows] = True
        has_hit[photo_rows] = True
        ours = self.latlon[start + photo_rows]
        theirs = self.latlon[start + photo_hits]
        close = geo.haversine_m(ours[:, 0], ours[:, 1], theirs[:, 0], theirs[:, 1])
        counts = (close <= geo.with_slack(self.radius_m)) | has_hit[photo_hits]
        may_join = np.zeros(size, dtype=bool)
        may_join[event_rows] = True
        may_join[photo_rows[counts]] = True
        return may_join

    def _hits(
        self, tree: geo.BallTree, start: int, stop: int, tree_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Query block photos ``start..stop-1`` in chunks (2R plus slack), stopping after the
        chunk that takes the hits past ``_MAX_BLOCK_HITS``: a sparse block that runs into a
        dense crowd ends early instead of listing (block size)^2 pairs. ``tree_size`` is
        the number of points in ``tree``. Returns block rows (ascending; every queried photo
        hits at least itself) and tree rows."""
        reach_m = geo.link_reach_m(self.radius_m)
        chunk = max(_CHUNK_MIN, _CHUNK_WORST_HITS // tree_size)
        rows, cols, total = [], [], 0
        for lo in range(0, stop - start, chunk):
            r, c = geo.pairs_within(
                tree, self.latlon[start + lo : min(stop, start + lo + chunk)], reach_m
            )
            rows.append(r + lo)
            cols.append(c)
            total += len(r)
            if total > _MAX_BLOCK_HITS:
                break
        return np.concatenate(rows), np.concatenate(cols)

    def _decide(
        self,
        start: int,
        labels: list[int],
        event_csr: tuple[list[int], list[int]],
        photo_csr: tuple[list[int], list[int]],
    ) -> None:
        """The sequential part: place the block's photos that have hits one by one, each
        joining the nearest joinable centroid within R or starting an event.

        ``labels`` holds the event of each block photo (-1: not placed yet) and is filled
        in. ``event_csr`` lists each row's snapshot events, ``photo_csr`` its earlier block
        photos, as ``(row pointers, values)``. When a photo has many more earlier hits than
        the block has touched events so far (a dense crowd), the touched events are
        checked instead: they include the events of all earlier block photos.
        """
        stop = start + len(labels)
        t = self.t[start:stop].tolist()
        lat = self.latlon[start:stop, 0].tolist()
        lon = self.latlon[start:stop, 1].tolist()
        cos_lat = np.cos(self.latlon[start:stop, 0]).tolist()
        vx, vy, vz = self.vectors[start:stop].T.tolist()
        event_ptr, event_hits = event_csr
        photo_ptr, photo_hits = photo_csr
        # Local names: this loop runs once per photo of the block.
        sx, sy, sz, count, end = self.sx, self.sy, self.sz, self.count, self.end
        c_lat, c_lon, c_cos, first, last = self.lat, self.lon, self.cos_lat, self.first, self.last
        radius, window, arc, cos = self.radius_m, self.window_us, geo.arc_m, math.cos
        touched: list[int] = []
        seen: set[int] = set()
        for i, e in enumerate(labels):
            if e < 0:
                candidates = set(event_hits[event_ptr[i] : event_ptr[i + 1]])
                hits = photo_hits[photo_ptr[i] : photo_ptr[i + 1]]
                if len(hits) > _TOUCHED_SCAN_RATIO * len(touched):
                    candidates.update(touched)
                else:
                    for j in hits:
                        candidates.add(labels[j])
                oldest_end = t[i] - window
                la, lo, cl = lat[i], lon[i], cos_lat[i]
                found = []
                for c in candidates:
                    if end[c] >= oldest_end:
                        d = arc(la, lo, cl, c_lat[c], c_lon[c], c_cos[c])
                        if d <= radius:
                            found.append((d, c))
                if not found:
                    e = len(count)
                    sx.append(vx[i])
                    sy.append(vy[i])
                    sz.append(vz[i])
                    count.append(1)
                    end.append(t[i])
                    c_lat.append(la)
                    c_lon.append(lo)
                    c_cos.append(cl)
                    first.append(start + i)
                    last.append(start + i)
                else:
                    e = found[0][1] if len(found) == 1 else self._nearest(found)
                    sx[e] += vx[i]
                    sy[e] += vy[i]
                    sz[e] += vz[i]
                    count[e] += 1
                    end[e] = t[i]
                    last[e] = start + i
                    e_lat, e_lon = geo.vector_latlon(sx[e], sy[e], sz[e])
                    c_lat[e], c_lon[e], c_cos[e] = e_lat, e_lon, cos(e_lat)
                labels[i] = e
            if e not in seen:
                seen.add(e)
                touched.append(e)

    def _new_events(self, positions: np.ndarray) -> np.ndarray:
        """Start one event per photo at ``positions`` (canonical, int64); returns the rows."""
        first = len(self.count)
        vectors = self.vectors[positions]
        self.sx.extend(vectors[:, 0].tolist())
        self.sy.extend(vectors[:, 1].tolist())
        self.sz.extend(vectors[:, 2].tolist())
        self.count.extend([1] * len(positions))
        self.end.extend(self.t[positions].tolist())
        lat = self.latlon[positions, 0]
        self.lat.extend(lat.tolist())
        self.lon.extend(self.latlon[positions, 1].tolist())
        self.cos_lat.extend(np.cos(lat).tolist())
        self.first.extend(positions.tolist())
        self.last.extend(positions.tolist())
        return np.arange(first, first + len(positions))

    def _nearest(self, found: list[tuple[float, int]]) -> int:
        """The nearest event; ties (within TIE_TOLERANCE_M) go to the smallest event id."""
        best = min(d for d, _ in found) + TIE_TOLERANCE_M
        tied = [e for d, e in found if d <= best]
        if len(tied) == 1:
            return tied[0]
        return min(tied, key=lambda e: event_id_for(self.photo_ids[self.first[e]]))
