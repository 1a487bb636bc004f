"""Test worlds for the engine: hypothesis strategies, a simulated store, comparisons.

Worlds are built on a 7.3 m lattice of east/north offsets around an anchor (so identical
places, symmetric ties and chains are common), with times on a 30 s lattice (so identical
timestamps and gaps of exactly W = 300 s are common). 7.3 m keeps lattice distances away
from exactly R = 50 m. Anchors include the antimeridian, latitude 60, and points next to
and on both poles. Offsets become coordinates with the spherical destination formula, so
they stay correct at the poles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from hypothesis import strategies as st

from snapmap_pipeline.clustering import (
    Changes,
    ClusterParams,
    PhotoPoint,
    SearchWindow,
    StoredEvent,
    canonical_pass,
    closure,
    diff,
)

from .oracle import EARTH_RADIUS_M, great_circle_m, oracle_pass

T0 = datetime(2026, 1, 17, 13, 20, tzinfo=UTC)
STEP_M = 7.3
ANCHORS = [
    (81.772379, 25.4301623),  # Prayagraj, the cases' location
    (179.9997, 10.0),  # east of the antimeridian
    (-179.9998, -33.5),  # west of it
    (180.0, 0.0),  # on it
    (10.0, 60.0),  # cases.md #10 latitude
    (0.0, 89.9996),  # 44 m from the north pole
    (135.0, -89.9998),  # 22 m from the south pole
    (0.0, 90.0),  # on the north pole
]


def destination(lon: float, lat: float, east_m: float, north_m: float) -> tuple[float, float]:
    """The point reached from (lon, lat) degrees by moving hypot(east, north) metres along
    the initial bearing atan2(east, north); returns (lon, lat) degrees, lon in [-180, 180)."""
    distance = math.hypot(east_m, north_m) / EARTH_RADIUS_M
    if distance == 0.0:
        return lon, lat
    bearing = math.atan2(east_m, north_m)
    phi1, lam1 = math.radians(lat), math.radians(lon)
    sin_phi2 = math.sin(phi1) * math.cos(distance) + math.cos(phi1) * math.sin(distance) * math.cos(
        bearing
    )
    phi2 = math.asin(max(-1.0, min(1.0, sin_phi2)))
    lam2 = lam1 + math.atan2(
        math.sin(bearing) * math.sin(distance) * math.cos(phi1),
        math.cos(distance) - math.sin(phi1) * sin_phi2,
    )
    lon2 = (math.degrees(lam2) + 180.0) % 360.0 - 180.0
    return lon2, math.degrees(phi2)


@st.composite
def worlds(draw, max_photos: int = 36) -> list[PhotoPoint]:
    """A random world around one anchor: crowds, walks, stacks of identical photos,
    symmetric ties and sparse noise."""
    anchor = draw(st.sampled_from(ANCHORS))
    specs: list[tuple[int, int, int]] = []  # (east steps, north steps, time steps of 30 s)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["crowd", "walk", "stack", "noise", "tie", "tie"]))
        cx, cy = draw(st.integers(-20, 20)), draw(st.integers(-20, 20))
        ct = draw(st.integers(0, 40))
        size = draw(st.integers(1, 12))
        if kind == "crowd":
            for _ in range(size):
                specs.append(
                    (
                        cx + draw(st.integers(-8, 8)),
                        cy + draw(st.integers(-8, 8)),
                        ct + draw(st.integers(0, 24)),
                    )
                )
        elif kind == "walk":
            x, y, t = cx, cy, ct
            for _ in range(size):
                specs.append((x, y, t))
                x += draw(st.integers(-6, 6))
                y += draw(st.integers(-6, 6))
                t += draw(st.integers(0, 12))
        elif kind == "stack":
            specs.extend([(cx, cy, ct)] * min(size, 4))
        elif kind == "tie":
            # Two events more than R apart, then photos exactly half way: distance ties.
            k = draw(st.integers(4, 6))
            specs += [(cx - k, cy, ct), (cx + k, cy, ct)]
            specs += [(cx, cy, ct + draw(st.integers(0, 10))) for _ in range(min(size, 3))]
        else:
            for _ in range(size):
                specs.append(
                    (
                        draw(st.integers(-300, 300)),
                        draw(st.integers(-300, 300)),
                        draw(st.integers(0, 240)),
                    )
                )
    specs = specs[:max_photos]
    names = draw(st.permutations([f"{chr(97 + i % 26)}{i}" for i in range(len(specs))]))
    photos = []
    for name, (sx, sy, steps) in zip(names, specs, strict=True):
        lon, lat = destination(*anchor, sx * STEP_M, sy * STEP_M)
        photos.append(PhotoPoint(name, T0 + timedelta(seconds=30 * steps), lon, lat))
    return photos


params_strategy = st.sampled_from(
    [ClusterParams()] * 6 + [ClusterParams(20.0, 300.0), ClusterParams(120.0, 60.0)]
)


def as_tuples(photos: list[PhotoPoint]) -> list[tuple]:
    return [(p.photo_id, p.taken_at, p.lon, p.lat) for p in photos]


def oracle_for(photos: list[PhotoPoint], params: ClusterParams):
    return oracle_pass(as_tuples(photos), params.radius_m, params.window_s)


def inside(window: SearchWindow, photo: PhotoPoint) -> bool:
    """The test's own reading of a window (inclusive bounds), independent of the engine."""
    return (
        window.taken_from <= photo.taken_at <= window.taken_to
        and window.lon_min <= photo.lon <= window.lon_max
        and window.lat_min <= photo.lat <= window.lat_max
    )


def fetcher(world: dict[str, PhotoPoint], log: list | None = None):
    """A ``fetch`` callable over an in-memory store: every photo inside any window."""

    def fetch(windows: list[SearchWindow]) -> list[PhotoPoint]:
        if log is not None:
            log.append(windows)
        return [p for p in world.values() if any(inside(w, p) for w in windows)]

    return fetch


def exactly_linked(a: PhotoPoint, b: PhotoPoint, params: ClusterParams) -> bool:
    """The link relation without slack, computed by the oracle's own haversine."""
    close = great_circle_m(a.lon, a.lat, b.lon, b.lat) <= 2 * params.radius_m
    return close and abs(a.taken_at - b.taken_at) <= timedelta(seconds=params.window_s)


def assert_same_as_oracle(result, expected, note: str = "") -> None:
    """Engine result (events, assignment) equals the oracle's: ids, members, fields."""
    assert result.assignment == expected.assignment, note
    assert set(result.events) == set(expected.events), note
    for event_id, event in result.events.items():
        want = expected.events[event_id]
        assert event.photo_count == len(want.members), note
        assert event.first_photo_id == want.first_photo_id, note
        assert event.start_at == want.start_at and event.end_at == want.end_at, note
        lon, lat = want.centre()
        assert great_circle_m(event.lon, event.lat, lon, lat) < 1e-6, note
        assert abs(event.radius_m - want.radius_m()) < 1e-6, note


@dataclass
class Store:
    """An in-memory stand-in for the photos/events collections, applying ``Changes`` the
    way the pipeline does (versions bumped, tombstones keep their fields)."""

    params: ClusterParams
    photos: dict[str, PhotoPoint] = field(default_factory=dict)
    events: dict[str, StoredEvent] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)

    def ingest(self, batch: list[PhotoPoint]) -> Changes:
        """Upsert a batch, recluster its closure, apply the diff; returns the changes."""
        for photo in batch:
            self.photos[photo.photo_id] = photo
        members = closure(batch, fetcher(self.photos), self.params)
        result = canonical_pass(members, self.params)
        changes = diff(result, self.events, self.links)
        self.apply(changes)
        again = diff(result, self.events, self.links)
        assert again.is_empty, f"re-applying the same result is not a no-op: {again}"
        return changes

    def apply(self, changes: Changes) -> None:
        for event in changes.created:
            self.events[event.event_id] = self._stored(event, version=1)
        for event in changes.changed:
            old = self.events[event.event_id]
            self.events[event.event_id] = self._stored(event, version=old.version + 1)
        for old_id, new_id in changes.tombstoned.items():
            old = self.events[old_id]
            self.events[old_id] = replace(old, merged_into=new_id, version=old.version + 1)
        self.links.update(changes.links)

    @staticmethod
    def _stored(event, version: int) -> StoredEvent:
        return StoredEvent(
            event.event_id,
            version,
            event.photo_count,
            event.lon,
            event.lat,
            event.radius_m,
            event.start_at,
            event.end_at,
            event.first_photo_id,
            None,
        )

    def live(self) -> dict[str, StoredEvent]:
        return {k: e for k, e in self.events.items() if e.merged_into is None}

    def resolve(self, event_id: str) -> str:
        """Follow ``merged_into`` to a live event (fails on a cycle or a dangling id)."""
        seen = set()
        while self.events[event_id].merged_into is not None:
            assert event_id not in seen, f"tombstone cycle through {event_id}"
            seen.add(event_id)
            event_id = self.events[event_id].merged_into
        return event_id
