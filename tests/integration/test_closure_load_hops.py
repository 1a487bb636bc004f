"""The store's closure load grows through hundreds of stored photos hop by hop: more photos
than the in-memory step lists pair by pair, so each hop takes the time-sorted path of
``linked_through``. What it loads must be every stored photo linked to the seed, directly or
through other stored photos, and nothing else; the oracle is a brute-force reachability over
every stored photo (the test's own haversine, the link reach of ``clustering.geo``)."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from snapmap_pipeline.clustering import EARTH_RADIUS_M, ClusterParams
from snapmap_pipeline.clustering.geo import link_reach_m
from snapmap_pipeline.store.geocell import cell_of
from snapmap_pipeline.store.recluster import _ClosureLoad
from snapmap_pipeline.store.schema import ensure_schema

pytestmark = pytest.mark.storage

T0 = datetime(2026, 6, 6, 12, tzinfo=UTC)


def _metres(a: dict, b: dict) -> float:
    (lon1, lat1), (lon2, lat2) = a["location"]["coordinates"], b["location"]["coordinates"]
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    half = (
        math.sin((phi2 - phi1) / 2) ** 2
        + math.cos(phi1) * math.cos(phi2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(min(half, 1.0)))


def _reachable(seed: list[dict], stored: list[dict], params: ClusterParams) -> set[str]:
    """Ids of the stored photos connected to the seed by links, seed excluded."""
    reach, window = link_reach_m(params.radius_m), timedelta(seconds=params.window_s)
    by_time = sorted(stored, key=lambda d: d["takenAt"])
    reached = {d["_id"] for d in seed}
    queue = list(seed)
    while queue:
        photo = queue.pop()
        for other in by_time:
            if abs(other["takenAt"] - photo["takenAt"]) > window or other["_id"] in reached:
                continue
            if _metres(photo, other) <= reach:
                reached.add(other["_id"])
                queue.append(other)
    return reached - {d["_id"] for d in seed}


@pytest.mark.parametrize("lon, lat", [(2.2945, 48.8584), (179.9995, -33.5)])
def test_a_closure_over_hundreds_of_stored_photos_loads_every_linked_one(mongo, lon, lat):
    """Walks along a street with steps of just under 2R (and a little more) and gaps of
    exactly W (and a second more), crowds, and lone photos, 900 in all within 600 m and two
    hours; a few are dead-lettered (never loaded). Across the antimeridian too. The closure
    is grown from the seed alone (every photo fetched by neighbourhood queries), and with the
    photos of a time range known beforehand, as a day's chunk knows them."""
    db = mongo.db()
    ensure_schema(db)
    params = ClusterParams()
    rng = random.Random(f"{lon},{lat}")
    metre_deg = math.degrees(1 / EARTH_RADIUS_M)
    two_r, window = 2 * params.radius_m, timedelta(seconds=params.window_s)
    stored = []
    while len(stored) < 900:
        east, north, taken = rng.uniform(-300, 300), rng.uniform(-300, 300), T0
        taken += timedelta(seconds=rng.randrange(0, 2 * 3600, 60))
        kind = rng.choice(["walk", "crowd", "lone"])
        for _ in range(rng.randint(1, 60) if kind != "lone" else 1):
            photo_lon = (lon + 180.0 + east * metre_deg / math.cos(math.radians(lat))) % 360.0
            photo = {
                "_id": f"p{len(stored):03d}",
                "location": {
                    "type": "Point",
                    "coordinates": [photo_lon - 180.0, lat + north * metre_deg],
                },
                "takenAt": taken,
                "eventId": None,
            }
            photo["cell"] = cell_of(*photo["location"]["coordinates"])
            if rng.random() < 0.02:
                photo["deadLettered"] = True
            stored.append(photo)
            if kind == "walk":
                east += rng.choice([0.0, two_r * 0.999, two_r * 1.01])
                taken += rng.choice([timedelta(0), window, window + timedelta(seconds=1)])
            else:
                east, north = east + rng.uniform(-20, 20), north + rng.uniform(-20, 20)
    db.photos.insert_many(stored)
    stored = list(db.photos.find({}))  # times as the server keeps them (milliseconds)
    live = [d for d in stored if not d.get("deadLettered")]

    first, last = T0 + timedelta(minutes=20), T0 + timedelta(minutes=100)
    in_range = {d["_id"]: d for d in live if first < d["takenAt"] < last}
    for seed in (rng.sample(live, 1), rng.sample(live, 3)):
        expected = _reachable(seed, live, params)
        load = _ClosureLoad(db, params)
        assert set(load.grow({d["_id"]: d for d in seed})) == expected
        load = _ClosureLoad(db, params)
        load.know(dict(in_range), first, last)
        assert set(load.grow({d["_id"]: d for d in seed})) == expected


def _photo(i: int, lon: float, lat: float, taken: datetime) -> dict:
    lon = (lon + 180.0) % 360.0 - 180.0
    return {
        "_id": f"q{i:04d}",
        "location": {"type": "Point", "coordinates": [lon, lat]},
        "cell": cell_of(lon, lat),
        "takenAt": taken,
        "eventId": None,
    }


@pytest.mark.parametrize(
    "lon, lat", [(2.2945, 48.8584), (179.9990, 0.0), (-45.0, 89.9993), (10.0, -89.9996)]
)
def test_a_closure_that_stays_in_one_cell_then_jumps_loads_every_linked_one(mongo, lon, lat):
    """Shapes the reach's doubling depends on: a crowd that stays in one square for hours
    (rounds that need a longer time there, never a wider reach), then, at one instant, a
    street of photos just under 2R apart that leaves the cell; later a second square far off,
    reached through another one-instant street; and a photo just out of reach of each (one
    step of 2R and a little more, or W and a second). Near the antimeridian and at the poles
    (the street around the pole crosses every meridian), with the seed at either end."""
    db = mongo.db()
    ensure_schema(db)
    params = ClusterParams()
    metre_deg = math.degrees(1 / EARTH_RADIUS_M)
    window = timedelta(seconds=params.window_s)
    step_m = 2 * params.radius_m * 0.999
    stored: list[dict] = []

    def at(east_m: float, north_m: float, taken: datetime) -> None:
        """East along the seed's parallel, then north along that meridian."""
        cos = max(math.cos(math.radians(lat)), 1e-12)
        photo_lon, photo_lat = lon + east_m * metre_deg / cos, lat + north_m * metre_deg
        stored.append(_photo(len(stored), photo_lon, photo_lat, taken))

    taken = T0
    for _ in range(200):  # three hours in one square, a photo every 0.9 W
        at(len(stored) % 3, len(stored) % 5, taken)
        taken += window * 0.9
    at(0.0, 0.0, taken + window + timedelta(seconds=1))  # a second too late
    for k in range(1, 25):  # a street at one instant, out of the square and far away
        at(k * step_m, 0.0, taken)
    at(24 * step_m + 2.01 * params.radius_m, 0.0, taken)  # a little more than 2R
    far = 24 * step_m
    for k in range(1, 120):  # another square, for an hour and a half
        at(far, k % 4, taken + window * 0.75 * k)
    taken_far = taken + window * 0.75 * 119
    away = -1.0 if lat > 0 else 1.0  # away from the pole
    for k in range(1, 25):  # along a meridian, another one-instant street
        at(far, 2 + away * k * step_m, taken_far)
    db.photos.insert_many(stored)
    stored = list(db.photos.find({}))
    by_id = {d["_id"]: d for d in stored}

    for seed_id in (stored[0]["_id"], stored[-1]["_id"], stored[230]["_id"]):
        seed = [by_id[seed_id]]
        expected = _reachable(seed, stored, params)
        assert len(expected) > 300
        load = _ClosureLoad(db, params)
        assert set(load.grow({d["_id"]: d for d in seed})) == expected
