"""The geo contract of the clustering engine, and every unit conversion it makes.

This module is the only place where degrees become radians, metres become radians, or a
``BallTree`` is built. Everything else in ``clustering`` calls the helpers below.

The contract:

* Photos, events and search windows carry coordinates in GeoJSON order ``[lon, lat]``, in
  degrees, with lon in [-180, 180] and lat in [-90, 90].
* ``sklearn.neighbors.BallTree(metric="haversine")`` takes rows ``[lat, lon]`` in *radians*
  and measures, and answers in, great-circle angles in radians on the unit sphere.
* One constant, :data:`EARTH_RADIUS_M`, converts between metres and radians: an arc of ``d``
  metres spans ``d / EARTH_RADIUS_M`` radians at every latitude. Great-circle distances
  need no ``cos(lat)`` factor. Only the longitude span of a bounding box does, and
  :func:`cap_lon_halfwidth_deg` computes that one exactly.

Internally the engine keeps latitude and longitude in radians (arrays of shape ``(n,)``)
and unit vectors on the sphere for centroids (a spherical mean is the normalised sum of the
members' unit vectors).
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.neighbors import BallTree

#: Mean Earth radius (IUGG), metres. Arc length in metres = angle in radians * this.
EARTH_RADIUS_M = 6_371_008.8

# Relative and absolute slack added to a distance bound when a tree query must return a
# superset of the exact answer: far above float noise (about 1e-9 m here), far below GPS
# precision. Exact decisions are always re-made with `arc_m` / `haversine_m`.
_SLACK_REL = 1e-6
_SLACK_ABS_M = 1e-3

# BallTree leaf size: small leaves pay off because every haversine evaluation costs several
# trigonometric calls (measured on 5k-point trees: leaves of 3 to 8 answer radius queries
# about twice as fast as the default 40, and 8 builds faster than 3).
_LEAF_SIZE = 8


def with_slack(distance_m: float) -> float:
    """``distance_m`` widened by 1e-6 relative plus 1 mm, for superset queries (metres)."""
    return distance_m * (1.0 + _SLACK_REL) + _SLACK_ABS_M


def link_reach_m(radius_m: float) -> float:
    """The link distance for join radius ``radius_m``: 2R plus slack, in metres.

    Two photos farther apart than 2R can never influence each other's event decisions
    (see :mod:`snapmap_pipeline.clustering.locality`); the slack keeps float noise from ever
    dropping a real link.
    """
    return with_slack(2.0 * radius_m)


def metres_to_radians(distance_m: float) -> float:
    """Great-circle arc in metres to the angle in radians that the haversine tree uses."""
    return distance_m / EARTH_RADIUS_M


def latlon_radians(lon_deg: np.ndarray, lat_deg: np.ndarray) -> np.ndarray:
    """GeoJSON-order degrees to tree rows: returns ``(n, 2)`` float64 ``[lat, lon]`` radians."""
    return np.column_stack((np.radians(lat_deg), np.radians(lon_deg)))


def degrees(angle_rad: np.ndarray) -> np.ndarray:
    """Radians to degrees (element-wise), for coordinates leaving the engine."""
    return np.degrees(angle_rad)


def build_tree(latlon_rad: np.ndarray) -> BallTree:
    """A haversine BallTree over ``(n, 2)`` rows of ``[lat, lon]`` in radians."""
    return BallTree(latlon_rad, leaf_size=_LEAF_SIZE, metric="haversine")


def pairs_within(
    tree: BallTree, latlon_rad: np.ndarray, distance_m: float
) -> tuple[np.ndarray, np.ndarray]:
    """All (query row, tree row) pairs whose great-circle distance is <= ``distance_m``.

    ``latlon_rad`` is ``(q, 2)`` ``[lat, lon]`` radians. Returns two int64 arrays of equal
    length: query row indexes in ascending order, and the matching tree row indexes. The
    tree applies its own float rounding at the boundary; callers pass a bound with slack and
    re-check exactly where it matters.
    """
    if len(latlon_rad) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    hits = tree.query_radius(latlon_rad, r=metres_to_radians(distance_m))
    counts = np.fromiter(map(len, hits), np.int64, len(hits))
    rows = np.repeat(np.arange(len(hits), dtype=np.int64), counts)
    cols = np.concatenate(hits).astype(np.int64, copy=False)
    return rows, cols


def haversine_m(
    lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray
) -> np.ndarray:
    """Great-circle distance in metres between points given in radians (broadcasting)."""
    sin_dlat = np.sin((lat2 - lat1) * 0.5)
    sin_dlon = np.sin((lon2 - lon1) * 0.5)
    h = sin_dlat * sin_dlat + np.cos(lat1) * np.cos(lat2) * sin_dlon * sin_dlon
    return 2.0 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.minimum(h, 1.0)))


def arc_m(
    lat1: float, lon1: float, cos_lat1: float, lat2: float, lon2: float, cos_lat2: float
) -> float:
    """Scalar :func:`haversine_m` for the engine's sequential loop (radians in, metres out).

    The cosines are passed in because the caller already holds them for both points.
    """
    sin_dlat = math.sin((lat2 - lat1) * 0.5)
    sin_dlon = math.sin((lon2 - lon1) * 0.5)
    h = sin_dlat * sin_dlat + cos_lat1 * cos_lat2 * sin_dlon * sin_dlon
    return 2.0 * EARTH_RADIUS_M * math.asin(math.sqrt(min(h, 1.0)))


def unit_vectors(lat_rad: np.ndarray, lon_rad: np.ndarray) -> np.ndarray:
    """Points on the unit sphere: ``(n, 3)`` float64 Cartesian ``[x, y, z]``."""
    cos_lat = np.cos(lat_rad)
    return np.column_stack((cos_lat * np.cos(lon_rad), cos_lat * np.sin(lon_rad), np.sin(lat_rad)))


def vector_latlon(x: float, y: float, z: float) -> tuple[float, float]:
    """Direction of a non-zero Cartesian vector as ``(lat, lon)`` radians.

    The vector need not be normalised (a sum of unit vectors is fine). ``atan2`` keeps full
    precision near the poles, where ``asin(z)`` would not; at a pole the longitude is 0.
    """
    return math.atan2(z, math.hypot(x, y)), math.atan2(y, x)


def cap_lat_bounds_deg(lat_deg: np.ndarray, reach_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Latitude range (degrees, clipped to [-90, 90]) of spherical caps of ``reach_m`` metres
    around points at ``lat_deg``; shapes follow ``lat_deg``."""
    reach_deg = math.degrees(metres_to_radians(reach_m))
    return np.maximum(lat_deg - reach_deg, -90.0), np.minimum(lat_deg + reach_deg, 90.0)


def cap_lon_halfwidth_deg(lat_deg: np.ndarray, reach_m: float) -> np.ndarray:
    """Half the longitude span (degrees) of a cap of ``reach_m`` metres around each point.

    For a cap of angular radius ``a`` centred at latitude ``phi`` that does not contain a
    pole, the widest longitude offset of its points is ``asin(sin(a) / cos(phi))``. That is
    slightly more than the planar ``a / cos(phi)``, so the planar formula would miss a sliver.
    Where the cap contains a pole every longitude is in it: the result is ``inf`` there.
    """
    a = metres_to_radians(reach_m)
    lat_rad = np.radians(np.asarray(lat_deg, dtype=np.float64))
    touches_pole = np.abs(lat_rad) + a >= math.pi / 2
    cos_lat = np.where(touches_pole, 1.0, np.cos(lat_rad))
    ratio = np.minimum(math.sin(a) / cos_lat, 1.0)
    halfwidth = np.degrees(np.arcsin(ratio))
    # A tiny widening so that rounding in the caller's comparison never drops a boundary point.
    halfwidth = halfwidth * (1.0 + 1e-9) + 1e-12
    return np.where(touches_pole, np.inf, halfwidth)
