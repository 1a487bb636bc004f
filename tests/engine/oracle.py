"""A brute-force oracle for the canonical clustering rule (architecture.md, "Clustering
semantics"), written from the rule alone: plain Python and ``math``, no numpy, no
scikit-learn, nothing imported from the engine.

It walks the photos in ``(taken_at, photo_id)`` order and compares each one with every
event created so far, O(n^2). Photos are tuples ``(photo_id, taken_at, lon, lat)`` with an
aware datetime and GeoJSON-order degrees.

Floating-point distances carry about 1e-9 m of rounding, so a decision whose distance sits
within a micrometre of R, or of the tie threshold, could go either way in two correct
implementations. The oracle reports such decisions as ``fragile``; property tests discard
those (rare) worlds instead of asserting on a coin flip.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

EARTH_RADIUS_M = 6_371_008.8
TIE_M = 1e-6  # distances this close to the nearest count as equal (the rule's tie notion)
FRAGILE_M = 1e-6


def great_circle_m(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    """Haversine distance in metres between two points given in degrees."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    half_dlat = (p2 - p1) / 2
    half_dlon = math.radians(lon2 - lon1) / 2
    a = math.sin(half_dlat) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(half_dlon) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(min(1.0, a)))


def to_xyz(lon: float, lat: float) -> tuple[float, float, float]:
    lam, phi = math.radians(lon), math.radians(lat)
    return (math.cos(phi) * math.cos(lam), math.cos(phi) * math.sin(lam), math.sin(phi))


def to_lonlat(x: float, y: float, z: float) -> tuple[float, float]:
    return math.degrees(math.atan2(y, x)), math.degrees(math.atan2(z, math.hypot(x, y)))


def oracle_event_id(photo_id: str) -> str:
    return "ev-" + hashlib.sha256(photo_id.encode("utf-8")).hexdigest()[:20]


@dataclass
class OracleEvent:
    event_id: str
    first_photo_id: str
    start_at: datetime
    end_at: datetime
    members: list[tuple] = field(default_factory=list)
    total: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])

    def centre(self) -> tuple[float, float]:
        return to_lonlat(*self.total)

    def add(self, photo: tuple) -> None:
        self.members.append(photo)
        x, y, z = to_xyz(photo[2], photo[3])
        self.total = [self.total[0] + x, self.total[1] + y, self.total[2] + z]
        self.end_at = photo[1]

    def radius_m(self) -> float:
        lon, lat = self.centre()
        return max(great_circle_m(p[2], p[3], lon, lat) for p in self.members)


@dataclass
class OracleResult:
    events: dict[str, OracleEvent]
    assignment: dict[str, str]
    fragile: bool


def oracle_pass(photos: list[tuple], radius_m: float = 50.0, window_s: float = 300.0):
    """Cluster ``photos`` by the canonical rule; returns an :class:`OracleResult`."""
    unique = {p[0]: p for p in photos}
    ordered = sorted(unique.values(), key=lambda p: (p[1], p[0]))
    window = timedelta(seconds=window_s)
    events: list[OracleEvent] = []
    assignment: dict[str, str] = {}
    fragile = False
    for photo in ordered:
        scored = []
        for event in events:
            if photo[1] > event.end_at + window:
                continue
            lon, lat = event.centre()
            d = great_circle_m(photo[2], photo[3], lon, lat)
            if abs(d - radius_m) < FRAGILE_M:
                fragile = True
            if d <= radius_m:
                scored.append((d, event))
        if scored:
            nearest = min(d for d, _ in scored)
            if any(abs(d - nearest - TIE_M) < FRAGILE_M / 10 for d, _ in scored):
                fragile = True
            tied = [e for d, e in scored if d <= nearest + TIE_M]
            chosen = min(tied, key=lambda e: e.event_id)
        else:
            chosen = OracleEvent(oracle_event_id(photo[0]), photo[0], photo[1], photo[1])
            events.append(chosen)
        chosen.add(photo)
        assignment[photo[0]] = chosen.event_id
    return OracleResult({e.event_id: e for e in events}, assignment, fragile)
