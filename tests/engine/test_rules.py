"""Unit tests of the canonical rule: boundaries, ties, renames, the cases.md inputs
(#2, #3, #4, #10), the antimeridian, the poles, and what the engine refuses."""

from __future__ import annotations

import hashlib
import itertools
import math
from datetime import datetime, timedelta, timezone

import pytest

from snapmap_pipeline.clustering import (
    EARTH_RADIUS_M,
    ClusterParams,
    PhotoPoint,
    canonical_pass,
    event_id_for,
    geo,
)

from .oracle import great_circle_m
from .worlds import T0, Store, destination

pytestmark = pytest.mark.engine

PRAYAGRAJ = (81.772379, 25.4301623)


def photo(photo_id: str, seconds: float, lon: float, lat: float) -> PhotoPoint:
    return PhotoPoint(photo_id, T0 + timedelta(seconds=seconds), lon, lat)


def groups(assignment: dict[str, str]) -> set[frozenset[str]]:
    by_event: dict[str, set[str]] = {}
    for photo_id, event_id in assignment.items():
        by_event.setdefault(event_id, set()).add(photo_id)
    return {frozenset(members) for members in by_event.values()}


# --- event ids ---------------------------------------------------------------------------


def test_event_id_is_the_documented_hash_of_the_first_photo():
    expected = "ev-" + hashlib.sha256(b"abc123").hexdigest()[:20]
    assert event_id_for("abc123") == expected
    assert (
        event_id_for("\u00e9t\u00e9")
        == "ev-" + hashlib.sha256("\u00e9t\u00e9".encode()).hexdigest()[:20]
    )


# --- boundaries --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gap_s", "joins"), [(299.999, True), (300.0, True), (300.001, False), (600.0, False)]
)
def test_window_boundary_is_inclusive(gap_s, joins):
    result = canonical_pass([photo("a", 0, *PRAYAGRAJ), photo("b", gap_s, *PRAYAGRAJ)])
    assert (result.assignment["a"] == result.assignment["b"]) is joins


def test_window_counts_from_the_events_last_photo_not_its_first():
    photos = [photo(f"p{i}", 250 * i, *PRAYAGRAJ) for i in range(5)]  # 1000 s in all
    assert len(canonical_pass(photos).events) == 1


@pytest.mark.parametrize(("north_m", "joins"), [(49.999, True), (50.001, False)])
def test_radius_boundary(north_m, joins):
    far = destination(*PRAYAGRAJ, 0.0, north_m)
    result = canonical_pass([photo("a", 0, *PRAYAGRAJ), photo("b", 10, *far)])
    assert great_circle_m(*PRAYAGRAJ, *far) == pytest.approx(north_m, abs=1e-6)
    assert (result.assignment["a"] == result.assignment["b"]) is joins


def test_parameters_are_honoured():
    far = destination(*PRAYAGRAJ, 0.0, 80.0)
    photos = [photo("a", 0, *PRAYAGRAJ), photo("b", 400, *far)]
    assert len(canonical_pass(photos).events) == 2
    assert len(canonical_pass(photos, ClusterParams(radius_m=100, window_s=600)).events) == 1


# --- nearest centroid and ties -----------------------------------------------------------


@pytest.mark.parametrize("names", [("west", "east"), ("east", "west")])
def test_exact_tie_goes_to_the_smaller_event_id(names):
    # Two events 60 m apart on the equator; a photo exactly half way, 30 m from both.
    step = math.degrees(30.0 / EARTH_RADIUS_M)
    west = photo(names[0], 0, 10.0 - step, 0.0)
    east = photo(names[1], 0, 10.0 + step, 0.0)
    middle = photo("middle", 60, 10.0, 0.0)
    result = canonical_pass([middle, east, west])
    assert len(result.events) == 2
    assert result.assignment["middle"] == min(event_id_for(names[0]), event_id_for(names[1]))


@pytest.mark.parametrize("names", [("a", "b"), ("b", "a")])
def test_the_nearest_centroid_wins_whatever_the_ids(names):
    # Events 60 m apart; the photo is 40 m from the first and 20 m from the second. With
    # one of the two namings the nearer event has the larger id.
    first = photo(names[0], 0, *PRAYAGRAJ)
    second = photo(names[1], 0, *destination(*PRAYAGRAJ, 60.0, 0.0))
    between = photo("c", 30, *destination(*PRAYAGRAJ, 40.0, 0.0))
    assert canonical_pass([first, second, between]).assignment["c"] == event_id_for(names[1])


def test_equal_timestamps_are_ordered_by_photo_id():
    # Same instant, 40 m apart: the photo with the smaller id founds the event.
    b = photo("b", 0, *PRAYAGRAJ)
    a = photo("a", 0, *destination(*PRAYAGRAJ, 40.0, 0.0))
    event = canonical_pass([b, a]).events[event_id_for("a")]
    assert (event.first_photo_id, event.photo_count) == ("a", 2)


# --- event fields ------------------------------------------------------------------------


def test_event_fields():
    second = destination(*PRAYAGRAJ, 0.0, 40.0)
    moment = datetime(2026, 1, 17, 14, 20, tzinfo=timezone(timedelta(hours=1)))
    photos = [PhotoPoint("a", moment, *PRAYAGRAJ), photo("b", 60, *second)]
    (event,) = canonical_pass(photos).events.values()
    middle = destination(*PRAYAGRAJ, 0.0, 20.0)
    assert event.event_id == event_id_for("a") and event.first_photo_id == "a"
    assert event.photo_count == 2
    assert great_circle_m(event.lon, event.lat, *middle) < 1e-3
    assert event.radius_m == pytest.approx(20.0, abs=1e-3)
    assert event.start_at == T0 and event.end_at == T0 + timedelta(seconds=60)
    assert event.start_at.tzinfo is not None and event.start_at.utcoffset() == timedelta(0)


def test_a_one_photo_event_sits_exactly_on_its_photo():
    (event,) = canonical_pass([photo("a", 0, -180.0, -90.0)]).events.values()
    assert (event.lon, event.lat, event.radius_m) == (-180.0, -90.0, 0.0)


# --- cases.md ----------------------------------------------------------------------------


def test_case_2_degrees_are_converted_to_radians():
    ten_a, ten_b = (81.772379, 25.4301623), (81.772379, 25.4302523)
    result = canonical_pass([photo("ten-a", 0, *ten_a), photo("ten-b", 0, *ten_b)])
    assert len(result.events) == 1

    tree = geo.build_tree(geo.latlon_radians([ten_a[0]], [ten_a[1]]))
    distance, _ = tree.query(geo.latlon_radians([ten_b[0]], [ten_b[1]]), k=1)
    assert 9.5 <= distance[0, 0] * EARTH_RADIUS_M <= 10.5


def test_case_3_far_and_kilometre_pairs_stay_apart():
    far = canonical_pass([photo("far-a", 0, *PRAYAGRAJ), photo("far-b", 0, -0.1278, 51.5074)])
    km = canonical_pass([photo("km-a", 0, *PRAYAGRAJ), photo("km-b", 0, 81.772379, 25.4391623)])
    assert len(far.events) == 2 and len(km.events) == 2


def test_case_3_and_10_east_west_pair_at_latitude_60_joins():
    # About 40 m east-west at latitude 60: d/R needs no cos(lat); a planar degree circle
    # of 50/111320 degrees would miss it.
    c_a, c_b = (10.0, 60.0), (10.0007186, 60.0)
    assert great_circle_m(*c_a, *c_b) == pytest.approx(40.0, abs=0.1)
    result = canonical_pass([photo("c-a", 0, *c_a), photo("c-b", 0, *c_b)])
    assert result.assignment["c-b"] == result.assignment["c-a"] == event_id_for("c-a")


WALK = [
    photo(str(i + 1), 60 * i, 81.772379, lat)
    for i, lat in enumerate([25.4301623, 25.430522, 25.4308817, 25.4312414, 25.4316011])
]
WALK_GROUPS = {frozenset({"1", "2"}), frozenset({"3", "4"}), frozenset({"5"})}


@pytest.mark.parametrize("order", list(itertools.permutations(range(5))))
def test_case_4_walk_is_not_chained_for_any_order(order):
    assert groups(canonical_pass([WALK[i] for i in order]).assignment) == WALK_GROUPS


@pytest.mark.parametrize(
    "batches",
    [
        [["1", "2"], ["3", "4", "5"]],
        [["5"], ["3"], ["1"], ["4"], ["2"]],
        [["3", "4", "5"], ["1", "2"]],
        [["2", "4"], ["1", "5"], ["3"], ["1", "2", "3"]],
    ],
)
def test_case_4_walk_in_batches(batches):
    by_id = {p.photo_id: p for p in WALK}
    store = Store(ClusterParams())
    for batch in batches:
        store.ingest([by_id[i] for i in batch])
    assert groups(store.links) == WALK_GROUPS
    assert store.links == canonical_pass(WALK).assignment


# --- late photos rename events -----------------------------------------------------------


def test_a_late_first_photo_renames_the_event_and_tombstones_the_old_id():
    a, b = photo("a", 60, *PRAYAGRAJ), photo("b", 120, *PRAYAGRAJ)
    late = photo("z", 0, *destination(*PRAYAGRAJ, 10.0, 0.0))
    store = Store(ClusterParams())
    store.ingest([a, b])
    assert set(store.live()) == {event_id_for("a")}

    changes = store.ingest([late])
    assert [e.event_id for e in changes.created] == [event_id_for("z")]
    assert changes.tombstoned == {event_id_for("a"): event_id_for("z")}
    assert changes.links == {"a": event_id_for("z"), "b": event_id_for("z"), "z": event_id_for("z")}
    assert store.resolve(event_id_for("a")) == event_id_for("z")


# --- antimeridian and poles --------------------------------------------------------------


def test_pair_across_the_antimeridian_joins():
    east, west = (179.99985, 0.0), (-179.99985, 0.0)
    assert great_circle_m(*east, *west) == pytest.approx(33.4, abs=0.1)
    result = canonical_pass([photo("e", 0, *east), photo("w", 30, *west)])
    (event,) = result.events.values()
    assert abs(abs(event.lon) - 180.0) < 1e-9 and abs(event.lat) < 1e-9
    assert event.radius_m == pytest.approx(16.7, abs=0.1)


def test_pair_across_the_antimeridian_far_from_the_equator_joins():
    east, west = (179.9999, -33.5), (-179.9999, -33.5)
    assert len(canonical_pass([photo("e", 0, *east), photo("w", 0, *west)]).events) == 1


def test_pair_across_the_north_pole_joins():
    # Opposite meridians, each 11 m from the pole: 22 m apart through it.
    a, b = (0.0, 89.9999), (180.0, 89.9999)
    assert great_circle_m(*a, *b) == pytest.approx(22.2, abs=0.1)
    (event,) = canonical_pass([photo("a", 0, *a), photo("b", 0, *b)]).events.values()
    assert event.lat == pytest.approx(90.0, abs=1e-9)


def test_photos_on_the_south_pole_with_any_longitude_are_one_place():
    photos = [photo(f"s{i}", i, lon, -90.0) for i, lon in enumerate([-180.0, -35.5, 0.0, 179.0])]
    (event,) = canonical_pass(photos).events.values()
    assert event.radius_m < 1e-6 and event.lat == -90.0


def test_pole_and_antimeridian_do_not_join_far_points():
    photos = [
        photo("n", 0, 0.0, 89.9995),
        photo("s", 0, 0.0, -89.9995),
        photo("e", 0, 179.999, 0.0),
        photo("w", 0, -179.999, 0.0),
    ]
    assert len(canonical_pass(photos).events) == 4


# --- what the engine refuses -------------------------------------------------------------


@pytest.mark.parametrize(
    ("lon", "lat", "message"),
    [
        (190.0, 25.43, r"'bad': longitude 190\.0 out of range \[-180, 180\]"),
        (-180.0001, 25.43, r"longitude -180\.0001 out of range"),
        (81.77, 95.0, r"'bad': latitude 95\.0 out of range \[-90, 90\]"),
        (81.77, -90.5, r"latitude -90\.5 out of range"),
        (math.nan, 25.43, r"'bad': non-finite longitude"),
        (81.77, math.inf, r"non-finite latitude"),
        ("81.772379", 25.43, r"'bad': longitude must be a real number, got '81\.772379'"),
        (81.77, None, r"latitude must be a real number, got None"),
    ],
)
def test_invalid_coordinates_are_rejected_not_clamped(lon, lat, message):
    with pytest.raises(ValueError, match=message):
        canonical_pass([photo("ok", 0, *PRAYAGRAJ), PhotoPoint("bad", T0, lon, lat)])


def test_naive_datetimes_are_rejected():
    naive = PhotoPoint("naive", datetime(2026, 1, 17, 13, 20), *PRAYAGRAJ)
    with pytest.raises(ValueError, match=r"'naive': taken_at must be a timezone-aware"):
        canonical_pass([photo("ok", 0, *PRAYAGRAJ), naive])


def test_one_id_with_two_different_photos_is_rejected_and_repeats_are_not():
    a = photo("a", 0, *PRAYAGRAJ)
    assert canonical_pass([a, a, photo("a", 0, *PRAYAGRAJ)]).assignment == {"a": event_id_for("a")}
    with pytest.raises(ValueError, match=r"photo_id 'a' given twice with different data"):
        canonical_pass([a, photo("a", 1, *PRAYAGRAJ)])


@pytest.mark.parametrize(
    ("radius_m", "window_s", "message"),
    [
        (0.0, 300.0, "radius_m"),
        (math.nan, 300.0, "radius_m"),
        (2e6, 300.0, "radius_m"),
        (50.0, -1.0, "window_s"),
        (50.0, math.inf, "window_s"),
    ],
)
def test_parameters_are_validated(radius_m, window_s, message):
    with pytest.raises(ValueError, match=message):
        ClusterParams(radius_m, window_s)


def test_empty_input_gives_an_empty_result():
    result = canonical_pass([])
    assert result.events == {} and result.assignment == {}
