"""Which photos must be loaded to recluster some photos exactly: links, search windows and
the closure.

Link photos ``a`` and ``b`` when their great-circle distance is at most 2R (plus a 1e-6
relative and 1 mm slack, :func:`~snapmap_pipeline.clustering.geo.link_reach_m`) and their
``taken_at`` differ by at most W. A *linked component* is a connected set of that graph.

**Locality theorem.** For any set S of photos and any linked component C of S, the
canonical pass over S, restricted to C, equals the canonical pass over C: the same photos
form the same events, with the same ids and fields.

*Proof.* (1) Every event of a canonical pass lies inside one component. When ``p`` joins
``e``, let ``m`` be the last photo that joined ``e``. Photos are processed in time order,
so ``end(e) = taken_at(m) <= taken_at(p) <= end(e) + W``. The centroid ``c`` after ``m``
joined is the normalised sum of the previous sum and ``m``'s unit vector, so it lies on the
minor arc between the previous centroid ``c'`` and ``m``; ``m`` was within R of ``c'`` (or
founded ``e``, and then ``c = m``), hence within R of ``c``. ``p`` is within R of ``c``,
so ``m`` and ``p`` are at most 2R apart and linked; by induction over joins, ``e`` is
connected. (2) The same argument applies to every *candidate* ``e`` of ``p`` (joinable,
centroid within R), joined or not: its last photo ``m`` is linked to ``p``, so by (1) all
of ``e`` lies in ``p``'s component. (3) Induction over the canonical order of S: suppose
that before ``p`` both passes have grouped the already processed photos of C identically.
By (2), every candidate of ``p`` in the pass over S consists of photos of C, so ``p`` sees
the same candidates with the same centroids, ends and ids in both passes, and makes the
same choice; a new event's id depends on ``p`` alone. Event fields are functions of the
members. QED.

The slack only adds links, so components under it are unions of exact components and the
theorem still holds; it also absorbs the float rounding of computed centroids (about 1e-9
m), which the exact argument ignores.

**Consequences.** Reclustering photos B exactly needs the union of the components of the
whole store that contain B: :func:`closure`. Its search step, :func:`search_windows`,
fetches every photo that could be linked to a given photo: taken within W of it, inside
the cap of radius 2R around it. Loading less (dropping a linked photo, even one farther
than R from every photo of B or linked only through other photos) can change the answer;
``tests/engine/test_locality.py`` builds such cases. In a crowd that never pauses for W the
closure is the whole crowd: exactness has that price.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from snapmap_pipeline.clustering import geo
from snapmap_pipeline.clustering.model import (
    MAX_WINDOW_S,
    ClusterParams,
    PhotoColumns,
    PhotoPoint,
    epoch_us,
    from_epoch_us,
    photo_columns,
    unique_photos,
)

#: Default size (metres) of the grid cells that split search windows in space.
GROUP_CELL_M = 5_000.0

# Later closure rounds fetch 2, 4, ... 64 times W around new photos.
_MAX_MARGIN_DOUBLINGS = 6

# Below this many (source, destination) combinations, listing every linked pair is cheaper
# than building a tree per time chunk.
_SMALL_PAIRS = 250_000


@dataclass(frozen=True, slots=True)
class SearchWindow:
    """A box of stored photos to fetch: ``taken_from <= taken_at <= taken_to`` (aware UTC),
    ``lon_min <= lon <= lon_max`` and ``lat_min <= lat <= lat_max`` (degrees), all bounds
    inclusive. A window never crosses the antimeridian: a box across it is two windows."""

    taken_from: datetime
    taken_to: datetime
    lon_min: float
    lon_max: float
    lat_min: float
    lat_max: float

    def contains(self, lon: float, lat: float, taken_at: datetime) -> bool:
        """Whether a photo at ``(lon, lat)`` degrees, taken at ``taken_at``, is inside."""
        return (
            self.taken_from <= taken_at <= self.taken_to
            and self.lon_min <= lon <= self.lon_max
            and self.lat_min <= lat <= self.lat_max
        )


def linked(a: PhotoPoint, b: PhotoPoint, params: ClusterParams = ClusterParams()) -> bool:
    """Whether two photos are linked (within 2R plus slack and within W of each other)."""
    columns = photo_columns([a, b])
    if abs(int(columns.taken_at_us[1]) - int(columns.taken_at_us[0])) > params.window_us:
        return False
    latlon = geo.latlon_radians(columns.lon, columns.lat)
    distance = geo.haversine_m(latlon[0, 0], latlon[0, 1], latlon[1, 0], latlon[1, 1])
    return bool(distance <= geo.link_reach_m(params.radius_m))


def linked_to(
    candidates: Sequence[PhotoPoint],
    frontier: Sequence[PhotoPoint],
    params: ClusterParams = ClusterParams(),
) -> list[PhotoPoint]:
    """The ``candidates`` linked to at least one ``frontier`` photo, in candidate order.

    One hop only: a candidate linked only through another candidate is not returned.
    """
    if not candidates or not frontier:
        return []
    mask = _linked_mask(photo_columns(frontier), photo_columns(candidates), params)
    return [photo for photo, hit in zip(candidates, mask.tolist(), strict=True) if hit]


def search_windows(
    photos: Sequence[PhotoPoint],
    params: ClusterParams = ClusterParams(),
    *,
    group_cell_m: float = GROUP_CELL_M,
    time_margin_s: float | None = None,
) -> list[SearchWindow]:
    """Windows that together contain every photo that could be linked to one of ``photos``.

    Photos are grouped so that a batch spread over days or over a region does not fetch
    everything in between: split where consecutive times are more than 2W apart (their
    windows could not overlap), then by grid cells of about ``group_cell_m`` metres, then by
    time again inside each cell. Each group gets the box around the caps of radius 2R (plus
    slack) of its photos and the times ``[first - margin, last + margin]``, where the margin
    is W unless ``time_margin_s`` asks for more (a wider fetch saves round trips when a
    closure keeps growing in time). Longitude spans are exact for caps on a sphere; a cap
    that contains a pole takes every longitude; a box across the antimeridian is split in
    two. Windows may overlap; the fetch is a superset.
    """
    if not photos:
        return []
    columns = photo_columns(unique_photos(photos))
    reach_m = geo.link_reach_m(params.radius_m)
    margin_us = params.window_us
    if time_margin_s is not None:
        margin_us = max(margin_us, timedelta(seconds=time_margin_s) // timedelta(microseconds=1))
    windows = []
    for group in _groups(columns, margin_us, group_cell_m):
        windows.extend(_group_windows(columns, group, reach_m, margin_us))
    return windows


def closure(
    seed: Sequence[PhotoPoint],
    fetch: Callable[[list[SearchWindow]], Iterable[PhotoPoint]],
    params: ClusterParams = ClusterParams(),
) -> list[PhotoPoint]:
    """The union of the linked components that contain the ``seed`` photos.

    ``fetch(windows)`` must return (at least) every stored photo inside any of the windows;
    extra photos are fine, they are kept only if linked. The closure grows in rounds: fetch
    the windows of photos added in the last round (skipping photos whose windows were
    already fetched), keep the fetched photos linked to the closure (exact link test, also
    through other fetched photos), stop when a round adds nothing. The first round fetches
    exactly the seed's windows; each later round doubles the time margin (up to 64 W), so a
    crowd that goes on for hours takes a few round trips rather than one per W. Seed photos
    win over fetched photos with the same id; of two fetched versions the first one is
    kept. Returns the seed photos first, then the others in the order they joined.
    """
    members = {p.photo_id: p for p in unique_photos(seed)}
    if not members:
        return []
    photo_columns(list(members.values()))  # validate the seed before any fetch
    pool: dict[str, PhotoPoint] = {}
    fetched: list[SearchWindow] = []
    frontier = list(members.values())
    rounds = 0
    while frontier:
        uncovered = _not_covered(frontier, fetched, params)
        if uncovered:
            margin_s = min(params.window_s * 2 ** min(rounds, _MAX_MARGIN_DOUBLINGS), MAX_WINDOW_S)
            windows = search_windows(uncovered, params, time_margin_s=margin_s)
            fetched.extend(windows)
            rounds += 1
            for photo in fetch(windows):
                if photo.photo_id not in members:
                    pool.setdefault(photo.photo_id, photo)
        frontier = _absorb(frontier, pool, params)
        for photo in frontier:
            members[photo.photo_id] = photo
    return list(members.values())


def linked_through(
    sources: Sequence[PhotoPoint],
    candidates: Sequence[PhotoPoint],
    params: ClusterParams = ClusterParams(),
) -> list[PhotoPoint]:
    """The ``candidates`` linked to a ``sources`` photo directly or through other
    candidates (every hop, in memory), in the order found. Candidates must not repeat a
    photo id; sources are never returned."""
    waiting = list(candidates)
    if not sources or not waiting:
        return []
    if (len(sources) + len(waiting)) ** 2 <= _SMALL_PAIRS:
        return _reachable(list(sources), waiting, params)
    # The candidates become columns sorted by time once; each hop then works on the rows
    # still open and within W of the hop's frontier, so a component reached in many hops
    # costs array slicing per hop, not a rebuild of every candidate.
    order, (times, latlon) = _sorted_by_time(photo_columns(waiting))
    _, frontier = _sorted_by_time(photo_columns(sources))
    is_open = np.ones(len(waiting), dtype=bool)
    found: list[PhotoPoint] = []
    while True:
        low = int(np.searchsorted(times, frontier[0][0] - params.window_us, side="left"))
        high = int(np.searchsorted(times, frontier[0][-1] + params.window_us, side="right"))
        rows = low + np.flatnonzero(is_open[low:high])
        if not len(rows):
            return found
        joined = rows[_linked_sorted(frontier, (times[rows], latlon[rows]), params)]
        if not len(joined):
            return found
        is_open[joined] = False
        found.extend(waiting[i] for i in np.sort(order[joined]).tolist())
        frontier = (times[joined], latlon[joined])


def _absorb(
    sources: list[PhotoPoint], pool: dict[str, PhotoPoint], params: ClusterParams
) -> list[PhotoPoint]:
    """Move every pool photo linked to ``sources``, directly or through other pool photos,
    out of ``pool``; returns them in the order found."""
    found = linked_through(sources, list(pool.values()), params)
    for photo in found:
        del pool[photo.photo_id]
    return found


def _reachable(
    sources: list[PhotoPoint], waiting: list[PhotoPoint], params: ClusterParams
) -> list[PhotoPoint]:
    """The ``waiting`` photos connected to ``sources`` by links, with every link among
    them listed at once (for small inputs: one tree instead of one per hop)."""
    everyone = photo_columns(sources + waiting)
    latlon = geo.latlon_radians(everyone.lon, everyone.lat)
    rows, cols = geo.pairs_within(geo.build_tree(latlon), latlon, geo.link_reach_m(params.radius_m))
    close = np.abs(everyone.taken_at_us[rows] - everyone.taken_at_us[cols]) <= params.window_us
    neighbours: dict[int, list[int]] = {}
    for a, b in zip(rows[close].tolist(), cols[close].tolist(), strict=True):
        neighbours.setdefault(a, []).append(b)
    seen = set(range(len(sources)))
    queue = list(seen)
    while queue:
        for b in neighbours.get(queue.pop(), ()):
            if b not in seen:
                seen.add(b)
                queue.append(b)
    return [p for i, p in enumerate(waiting, start=len(sources)) if i in seen]


def _linked_mask(src: PhotoColumns, dst: PhotoColumns, params: ClusterParams) -> np.ndarray:
    """Bool ``(len(dst),)``: which ``dst`` photos are linked to at least one ``src`` photo."""
    dst_order, dst_sorted = _sorted_by_time(dst)
    mask = np.zeros(len(dst_order), dtype=bool)
    mask[dst_order] = _linked_sorted(_sorted_by_time(src)[1], dst_sorted, params)
    return mask


def _sorted_by_time(
    photos: PhotoColumns,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The time order of ``photos`` (a stable argsort), and their (int64 times in
    microseconds, ``[lat, lon]`` radians rows) in that order."""
    order = np.argsort(photos.taken_at_us, kind="stable")
    return order, (photos.taken_at_us[order], geo.latlon_radians(photos.lon, photos.lat)[order])


def _linked_sorted(
    src: tuple[np.ndarray, np.ndarray], dst: tuple[np.ndarray, np.ndarray], params: ClusterParams
) -> np.ndarray:
    """:func:`_linked_mask` for photos in time order (as :func:`_sorted_by_time` gives them);
    the mask is in ``dst``'s order."""
    if len(src[0]) * len(dst[0]) <= _SMALL_PAIRS:
        return _linked_by_pairs(src, dst, params)
    return _linked_by_chunks(src, dst, params)


def _linked_by_pairs(
    src: tuple[np.ndarray, np.ndarray], dst: tuple[np.ndarray, np.ndarray], params: ClusterParams
) -> np.ndarray:
    """:func:`_linked_mask` for small inputs: list every pair within 2R, test its times.
    ``src``/``dst`` are (int64 times in microseconds, ``[lat, lon]`` radians rows)."""
    (src_t, src_latlon), (dst_t, dst_latlon) = src, dst
    reach_m = geo.link_reach_m(params.radius_m)
    rows, cols = geo.pairs_within(geo.build_tree(src_latlon), dst_latlon, reach_m)
    hit = np.zeros(len(dst_t), dtype=bool)
    hit[rows[np.abs(dst_t[rows] - src_t[cols]) <= params.window_us]] = True
    return hit


def _linked_by_chunks(
    src: tuple[np.ndarray, np.ndarray], dst: tuple[np.ndarray, np.ndarray], params: ClusterParams
) -> np.ndarray:
    """:func:`_linked_mask` for large inputs, both sorted by time, without listing the
    pairs of a dense crowd.

    Destination photos are taken in time chunks spanning at most W/2. Sources within W of
    the whole chunk (the *core*) need no time test, so one count-only tree query answers for
    all of them without listing pairs. Only the sources near the edges of the chunk's time
    range are tested pair by pair, and only against photos still unlinked; in a crowd the
    core has already linked almost all of them.
    """
    (src_t, src_latlon), (dst_t, dst_latlon) = src, dst
    window = params.window_us
    reach_m = geo.link_reach_m(params.radius_m)
    hit = np.zeros(len(dst_t), dtype=bool)
    lo = 0
    while lo < len(dst_t):
        hi = int(np.searchsorted(dst_t, dst_t[lo] + window // 2, side="right"))
        first, last = int(dst_t[lo]), int(dst_t[hi - 1])
        near_start, near_stop = (
            int(np.searchsorted(src_t, first - window, side="left")),
            int(np.searchsorted(src_t, last + window, side="right")),
        )
        core_start, core_stop = (
            int(np.searchsorted(src_t, last - window, side="left")),
            int(np.searchsorted(src_t, first + window, side="right")),
        )
        if core_stop > core_start:
            tree = geo.build_tree(src_latlon[core_start:core_stop])
            counts = tree.query_radius(
                dst_latlon[lo:hi], r=geo.metres_to_radians(reach_m), count_only=True
            )
            hit[lo:hi] |= counts > 0
        edges = np.r_[np.arange(near_start, core_start), np.arange(core_stop, near_stop)]
        open_rows = lo + np.flatnonzero(~hit[lo:hi])
        if len(edges) and len(open_rows):
            tree = geo.build_tree(dst_latlon[open_rows])
            rows, cols = geo.pairs_within(tree, src_latlon[edges], reach_m)
            close = np.abs(src_t[edges[rows]] - dst_t[open_rows[cols]]) <= window
            hit[open_rows[cols[close]]] = True
        lo = hi
    return hit


def _not_covered(
    photos: list[PhotoPoint], windows: list[SearchWindow], params: ClusterParams
) -> list[PhotoPoint]:
    """The photos whose own search box is not inside the union of ``windows`` piece by
    piece (each longitude piece of the box inside one window)."""
    if not windows:
        return photos
    columns = photo_columns(photos)
    window = params.window_us
    reach_m = geo.link_reach_m(params.radius_m)
    lat_lo, lat_hi = geo.cap_lat_bounds_deg(columns.lat, reach_m)
    half = geo.cap_lon_halfwidth_deg(columns.lat, reach_m)
    full = ~np.isfinite(half)
    half = np.where(full, 0.0, half)
    west, east = columns.lon - half, columns.lon + half
    pieces = [  # (piece exists, lon_min, lon_max) for each photo
        (
            np.ones(len(photos), dtype=bool),
            np.where(full, -180.0, np.maximum(west, -180.0)),
            np.where(full, 180.0, np.minimum(east, 180.0)),
        ),
        (~full & (west < -180.0), west + 360.0, np.full(len(photos), 180.0)),
        (~full & (east > 180.0), np.full(len(photos), -180.0), east - 360.0),
    ]
    t_from = columns.taken_at_us - window
    t_to = columns.taken_at_us + window
    covered = np.ones(len(photos), dtype=bool)
    for exists, lon_min, lon_max in pieces:
        inside = ~exists
        for w in windows:
            inside |= (
                (epoch_us(w.taken_from) <= t_from)
                & (t_to <= epoch_us(w.taken_to))
                & (w.lat_min <= lat_lo)
                & (lat_hi <= w.lat_max)
                & (w.lon_min <= lon_min)
                & (lon_max <= w.lon_max)
            )
        covered &= inside
    return [photo for photo, done in zip(photos, covered.tolist(), strict=True) if not done]


def _groups(columns: PhotoColumns, margin_us: int, cell_m: float) -> list[np.ndarray]:
    """Index arrays of photos that share a search window (see :func:`search_windows`)."""
    cell_deg = math.degrees(geo.metres_to_radians(max(cell_m, 1.0)))
    groups = []
    for by_time in _split_by_gaps(np.arange(len(columns.photo_ids)), columns, margin_us):
        lat_cell = np.floor(columns.lat[by_time] / cell_deg).astype(np.int64)
        lon_cell = np.floor(columns.lon[by_time] / cell_deg).astype(np.int64)
        key = lat_cell * (1 << 32) + lon_cell
        order = np.argsort(key, kind="stable")
        cuts = np.flatnonzero(np.diff(key[order])) + 1
        for in_cell in np.split(by_time[order], cuts):
            groups.extend(_split_by_gaps(in_cell, columns, margin_us))
    return groups


def _split_by_gaps(indexes: np.ndarray, columns: PhotoColumns, margin_us: int) -> list[np.ndarray]:
    """``indexes`` sorted by time and cut where consecutive times are more than two time
    margins apart (their windows could not overlap)."""
    ordered = indexes[np.argsort(columns.taken_at_us[indexes], kind="stable")]
    gaps = np.flatnonzero(np.diff(columns.taken_at_us[ordered]) > 2 * margin_us)
    return np.split(ordered, gaps + 1)


def _group_windows(
    columns: PhotoColumns, group: np.ndarray, reach_m: float, margin_us: int
) -> list[SearchWindow]:
    t = columns.taken_at_us[group]
    taken_from = from_epoch_us(int(t.min()) - margin_us)
    taken_to = from_epoch_us(int(t.max()) + margin_us)
    lat_lo, lat_hi = geo.cap_lat_bounds_deg(columns.lat[group], reach_m)
    lat_min, lat_max = float(lat_lo.min()), float(lat_hi.max())
    half = geo.cap_lon_halfwidth_deg(columns.lat[group], reach_m)
    return [
        SearchWindow(taken_from, taken_to, lon_min, lon_max, lat_min, lat_max)
        for lon_min, lon_max in _lon_ranges(columns.lon[group], half)
    ]


def _lon_ranges(lon: np.ndarray, half: np.ndarray) -> list[tuple[float, float]]:
    """The shortest arc of longitudes covering every ``[lon - half, lon + half]`` (degrees),
    as one or two ranges inside [-180, 180].

    Intervals are placed on a circle of 360 degrees; the arc is the complement of the
    largest uncovered gap. An arc across the antimeridian becomes two ranges; an arc ending
    exactly on it also gets the degenerate range on the other side, because lon -180 and
    180 are the same meridian but a stored photo carries only one of the two values.
    """
    if not np.isfinite(half).all():
        return [(-180.0, 180.0)]
    starts = np.mod(lon - half + 180.0, 360.0)
    order = np.argsort(starts, kind="stable")
    starts = starts[order]
    ends = starts + 2.0 * half[order]
    reach = np.maximum.accumulate(ends)
    wrapped = reach[-1] - 360.0  # coverage that wraps past 360 back onto [0, ...]
    gaps = np.r_[starts[1:] - np.maximum(reach[:-1], wrapped), starts[0] + 360.0 - reach[-1]]
    j = int(np.argmax(gaps))
    if gaps[j] <= 0.0:
        return [(-180.0, 180.0)]
    if j == len(gaps) - 1:
        arc_start, arc_end = float(starts[0]), float(reach[-1])
    else:
        arc_start, arc_end = float(starts[j + 1]), float(max(reach[j], wrapped)) + 360.0
    west, east = arc_start - 180.0, arc_end - 180.0
    ranges = []
    if east >= 180.0:
        ranges += [(west, 180.0), (-180.0, min(east - 360.0, 180.0))]
    else:
        ranges.append((west, east))
    if west <= -180.0:
        ranges.append((180.0, 180.0))
    return ranges
