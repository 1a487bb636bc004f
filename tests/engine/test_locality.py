"""The locality theorem in examples: the closure gives the whole-world answer, loading less
can change it, and search windows reach exactly as far as links do (antimeridian, poles,
time gaps, latitude-correct longitude spans)."""

from __future__ import annotations

import math
import random
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapmap_pipeline.clustering import (
    EARTH_RADIUS_M,
    ClusterParams,
    PhotoPoint,
    canonical_pass,
    closure,
    event_id_for,
    geo,
    linked,
    linked_to,
    search_windows,
)
from snapmap_pipeline.clustering import locality as locality_module
from snapmap_pipeline.clustering.locality import linked_through
from snapmap_pipeline.clustering.model import MAX_RADIUS_M, MAX_WINDOW_S

from .oracle import great_circle_m
from .worlds import ANCHORS, STEP_M, T0, destination, fetcher, inside

pytestmark = pytest.mark.engine

HERE = (81.772379, 25.4301623)


def photo(
    photo_id: str,
    seconds: float,
    east_m: float = 0.0,
    north_m: float = 0.0,
    origin: tuple[float, float] = HERE,
) -> PhotoPoint:
    return PhotoPoint(
        photo_id, T0 + timedelta(seconds=seconds), *destination(*origin, east_m, north_m)
    )


def by_id(photos: list[PhotoPoint]) -> dict[str, PhotoPoint]:
    return {p.photo_id: p for p in photos}


# --- the closure is enough ... -----------------------------------------------------------


def test_closure_of_a_seed_gives_the_whole_world_answer_and_skips_unrelated_photos():
    world = [
        photo("a", 0),
        photo("b", 100, east_m=40),
        photo("s", 200, east_m=65),
        photo("far", 200, east_m=5_000),
        photo("later", 2_000),
        photo("other", 150, north_m=300),
    ]
    members = closure([by_id(world)["s"]], fetcher(by_id(world)))
    assert sorted(p.photo_id for p in members) == ["a", "b", "s"]
    whole = canonical_pass(world).assignment
    assert canonical_pass(members).assignment == {k: whole[k] for k in ("a", "b", "s")}


# --- ... and loading less is not ---------------------------------------------------------


def test_dropping_a_photo_farther_than_r_but_within_2r_changes_the_answer():
    # a founds the event, b (40 m east) pulls the centroid to 20 m, s (65 m east of a,
    # so beyond R from a) joins at 45 m. Without a, s joins b's event under b's id.
    a, b, s = photo("a", 0), photo("b", 100, east_m=40), photo("s", 200, east_m=65)
    assert great_circle_m(a.lon, a.lat, s.lon, s.lat) > 50.0
    assert linked(a, s)
    assert canonical_pass([a, b, s]).assignment["s"] == event_id_for("a")
    assert canonical_pass([b, s]).assignment["s"] == event_id_for("b")
    assert "a" in {p.photo_id for p in closure([s], fetcher(by_id([a, b, s])))}


def test_dropping_a_photo_linked_only_through_another_changes_the_answer():
    # a is 500 s before s (more than W): not linked to s directly, only through b.
    a, b, s = photo("a", 0), photo("b", 250), photo("s", 500)
    assert not linked(a, s) and linked(a, b) and linked(b, s)
    assert canonical_pass([a, b, s]).assignment["s"] == event_id_for("a")
    assert canonical_pass([b, s]).assignment["s"] == event_id_for("b")
    assert {p.photo_id for p in closure([s], fetcher(by_id([a, b, s])))} == {"a", "b", "s"}


def test_a_photo_just_beyond_the_link_bounds_is_not_needed():
    s = photo("s", 400)
    too_far = photo("x", 400, east_m=100.5)  # beyond 2R
    too_early = photo("y", 99.999)  # more than W before
    assert not linked(s, too_far) and not linked(s, too_early)
    world = by_id([s, too_far, too_early])
    assert [p.photo_id for p in closure([s], fetcher(world))] == ["s"]


def test_links_at_exactly_2r_and_w_hold():
    a = photo("a", 0)
    b = photo("b", 300, north_m=100.0)
    assert great_circle_m(a.lon, a.lat, b.lon, b.lat) == pytest.approx(100.0, abs=1e-6)
    assert linked(a, b)


def test_linked_to_is_one_hop():
    a, b, c = photo("a", 0), photo("b", 250), photo("c", 500)
    assert linked_to([b, c], [a]) == [b]


def test_seed_photos_win_over_stored_versions():
    stored = photo("s", 0, east_m=1_000)
    moved = photo("s", 0)
    neighbour = photo("n", 10, east_m=20)
    members = closure([moved], fetcher(by_id([stored, neighbour])))
    assert by_id(members) == {"s": moved, "n": neighbour}


def test_closure_does_not_refetch_windows_it_already_has():
    chain = [photo(f"c{i:02d}", 200 * i) for i in range(30)]  # 100 minutes, linked in a row
    calls: list = []
    members = closure([chain[15]], fetcher(by_id(chain), calls))
    assert len(members) == 30
    fetched = [w for windows in calls for w in windows]
    # Time margins double round after round: a few round trips, not one per photo.
    assert len(calls) <= 5 and len(fetched) <= 10


def _reachable_by_brute_force(
    sources: list[PhotoPoint],
    candidates: list[PhotoPoint],
    params: ClusterParams,
    reach_m: float | None = None,
) -> set[str]:
    """Every candidate connected to a source through candidates, from the whole matrix of
    great-circle distances and time gaps (the test's own haversine, no tree). Photos link
    within ``reach_m`` (2R unless given) and W, times compared in whole microseconds."""
    everyone = sources + candidates
    lat = np.radians([p.lat for p in everyone])
    lon = np.radians([p.lon for p in everyone])
    micros = np.array([(p.taken_at - T0) // timedelta(microseconds=1) for p in everyone])
    half = (
        np.sin((lat[:, None] - lat[None, :]) / 2) ** 2
        + np.cos(lat[:, None])
        * np.cos(lat[None, :])
        * np.sin((lon[:, None] - lon[None, :]) / 2) ** 2
    )
    metres = 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(half, 0.0, 1.0)))
    adjacent = (metres <= (2 * params.radius_m if reach_m is None else reach_m)) & (
        np.abs(micros[:, None] - micros[None, :]) <= params.window_us
    )
    reached = np.zeros(len(everyone), dtype=bool)
    reached[: len(sources)] = True
    queue = list(range(len(sources)))
    while queue:
        for other in np.flatnonzero(adjacent[queue.pop()] & ~reached).tolist():
            reached[other] = True
            queue.append(other)
    return {p.photo_id for p, hit in zip(everyone, reached, strict=True) if hit} - {
        p.photo_id for p in sources
    }


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(600, 1_100))
def test_linked_through_over_many_hops_reaches_what_brute_force_reaches(seed, size):
    """Inputs large enough for the hop-by-hop path: walks on the lattice that wander for
    hours (hundreds of hops), crowds, and scattered photos; a few photos are the sources."""
    rng = random.Random(seed)
    anchor = rng.choice(ANCHORS)
    specs: list[tuple[int, int, int]] = []
    while len(specs) < size:
        x, y, t = rng.randint(-60, 60), rng.randint(-60, 60), rng.randint(0, 2_000)
        kind = rng.choice(["walk", "walk", "crowd", "scatter"])
        for _ in range(rng.randint(20, 300)):
            specs.append((x, y, t))
            if kind == "walk":
                x, y, t = x + rng.randint(-9, 9), y + rng.randint(-9, 9), t + rng.randint(0, 11)
            elif kind == "crowd":
                x, y, t = x + rng.randint(-3, 3), y + rng.randint(-3, 3), t + rng.randint(0, 2)
            else:
                x, y, t = rng.randint(-90, 90), rng.randint(-90, 90), rng.randint(0, 3_000)
    photos = [
        PhotoPoint(
            f"p{i}",
            T0 + timedelta(seconds=30 * steps),
            *destination(*anchor, sx * STEP_M, sy * STEP_M),
        )
        for i, (sx, sy, steps) in enumerate(specs[:size])
    ]
    rng.shuffle(photos)
    sources, candidates = photos[:3], photos[3:]
    params = ClusterParams()

    found = linked_through(sources, candidates, params)

    assert len(found) == len({p.photo_id for p in found})
    assert {p.photo_id for p in found} == _reachable_by_brute_force(sources, candidates, params)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.sampled_from([501, 502, 530, 700]),
    shape=st.sampled_from(["one instant", "steps of W", "steps of 2R", "chain", "far apart"]),
    params=st.sampled_from(
        [
            ClusterParams(),
            ClusterParams(radius_m=MAX_RADIUS_M, window_s=MAX_WINDOW_S),
            ClusterParams(radius_m=50.0, window_s=MAX_WINDOW_S),
            ClusterParams(radius_m=MAX_RADIUS_M, window_s=0.0),
            ClusterParams(radius_m=0.5, window_s=0.0),
        ]
    ),
    by_time=st.booleans(),
)
def test_linked_through_on_exact_boundaries_reaches_what_brute_force_reaches(
    seed, size, shape, params, by_time
):
    """Inputs just past the small-input threshold whose links sit on the boundaries: photos
    at one instant, gaps of exactly W (and W plus 1 us), distances of exactly 2R (and 1 %
    more) along a meridian, near the poles and the antimeridian, with the largest and the
    smallest R and W; given in time order (the order a store reads them) or shuffled."""
    assert (size + 1) ** 2 > locality_module._SMALL_PAIRS
    rng = random.Random(seed)
    anchor = rng.choice(ANCHORS)
    two_r, window = 2 * params.radius_m, timedelta(seconds=params.window_s)
    photos = []
    east = north = 0.0
    taken = T0
    for i in range(size):
        if shape == "one instant":
            east, north = two_r * rng.randint(-4, 4), two_r * rng.randint(-4, 4)
        elif shape == "steps of W":
            east, taken = rng.randint(-2, 2) * params.radius_m, T0 + window * rng.randint(0, 30)
        elif shape == "steps of 2R":
            north, taken = two_r * rng.randint(-25, 25), T0 + window * rng.randint(0, 2)
        elif shape == "chain":
            north += rng.choice([0.0, two_r, two_r * 1.01])
            taken += rng.choice([timedelta(0), window, window + timedelta(microseconds=1)])
        else:
            north, taken = two_r * 1.01 * i, T0 + window * rng.randint(0, 3)
        photos.append(PhotoPoint(f"p{i}", taken, *destination(*anchor, east, north)))
    if by_time:
        photos.sort(key=lambda p: p.taken_at)
    else:
        rng.shuffle(photos)
    count = rng.choice([1, 3, 40])
    sources, candidates = photos[:count], photos[count:]

    found = linked_through(sources, candidates, params)

    assert len(found) == len({p.photo_id for p in found})
    reach_m = geo.link_reach_m(params.radius_m)
    assert {p.photo_id for p in found} == _reachable_by_brute_force(
        sources, candidates, params, reach_m
    )


# --- search windows ----------------------------------------------------------------------


def test_window_spans_2r_in_latitude_and_more_than_planar_in_longitude():
    p = PhotoPoint("p", T0, 10.0, 60.0)
    (w,) = search_windows([p])
    reach_deg = math.degrees(100.0 / EARTH_RADIUS_M)
    # 2R plus the 1.1 mm link slack; longitude wider than the planar d / (R cos(lat)).
    assert reach_deg <= w.lat_max - 60.0 <= reach_deg * (1 + 2e-5)
    planar = reach_deg / math.cos(math.radians(60.0))
    assert planar <= w.lon_max - 10.0 <= planar * (1 + 2e-5)
    assert w.taken_from == T0 - timedelta(seconds=300) and w.taken_to == T0 + timedelta(seconds=300)


@pytest.mark.parametrize("lat", [0.0, 60.0, -89.0, 89.998, -89.9989])
def test_window_holds_the_whole_2r_cap_at_any_latitude(lat):
    # Near a pole (but not over it) the planar d / (R cos(lat)) is several percent too
    # narrow; the exact asin(sin(d/R) / cos(lat)) is not.
    p = PhotoPoint("p", T0, 30.0, lat)
    windows = search_windows([p])
    for bearing in range(0, 360, 2):
        east = 100.0 * math.sin(math.radians(bearing))
        north = 100.0 * math.cos(math.radians(bearing))
        q = PhotoPoint("q", T0, *destination(30.0, lat, east, north))
        assert any(inside(w, q) for w in windows), bearing


def test_window_across_the_antimeridian_is_split_in_two():
    p = PhotoPoint("p", T0, 179.9995, -10.0)
    half = math.degrees(100.0 / EARTH_RADIUS_M) / math.cos(math.radians(10.0))
    windows = sorted(search_windows([p]), key=lambda w: w.lon_min)
    assert [(w.lon_min, w.lon_max) for w in windows] == [
        (-180.0, pytest.approx(179.9995 + half - 360.0, abs=1e-6)),
        (pytest.approx(179.9995 - half, abs=1e-6), 180.0),
    ]
    across = PhotoPoint("q", T0, -179.9999, -10.0)
    assert linked(p, across) and any(inside(w, across) for w in windows)


def test_window_reaching_just_past_the_antimeridian_covers_a_photo_stored_at_minus_180():
    p = PhotoPoint("p", T0, 180.0 - math.degrees(100.0005 / EARTH_RADIUS_M), 0.0)
    on_line = PhotoPoint("q", T0, -180.0, 0.0)
    assert linked(p, on_line)
    assert any(inside(w, on_line) for w in search_windows([p]))


def test_window_touching_a_pole_takes_every_longitude():
    near_pole = PhotoPoint("p", T0, 45.0, 89.9995)  # 56 m from the pole
    (w,) = search_windows([near_pole])
    assert (w.lon_min, w.lon_max, w.lat_max) == (-180.0, 180.0, 90.0)
    opposite = PhotoPoint("q", T0, -135.0, 89.9995)  # 111 m away, across the pole
    assert not linked(near_pole, opposite)
    assert inside(w, PhotoPoint("r", T0, -135.0, 89.9999))


def test_photos_days_apart_or_kilometres_apart_get_separate_windows():
    photos = [photo("a", 0), photo("b", 86_400), photo("c", 0, east_m=50_000)]
    windows = search_windows(photos)
    assert len(windows) == 3
    for p in photos:
        assert sum(inside(w, p) for w in windows) == 1


def test_a_crowd_gets_one_window():
    crowd = [photo(f"p{i}", 20 * i, east_m=(i % 7) * 9, north_m=(i % 5) * 11) for i in range(200)]
    assert len(search_windows(crowd, ClusterParams())) == 1
