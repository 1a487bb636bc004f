"""A coarse latitude/longitude grid used to fetch a photo's neighbourhood with an ordinary
compound index ``(cell, takenAt)``, so that no database geo query is needed.

Cells are ``CELL_DEG`` degrees on a side (about 1.1 km of latitude). ``cells_near`` returns every
cell that holds a point within ``distance_m`` of the given one; longitude widens with 1/cos(lat)
and wraps at the antimeridian, and near the poles the whole latitude band is taken.
"""

from __future__ import annotations

import math

from snapmap_pipeline.clustering import EARTH_RADIUS_M

CELL_DEG = 0.01
_LON_CELLS = round(360 / CELL_DEG)
_LAT_CELLS = round(180 / CELL_DEG)


def cell_of(lon: float, lat: float) -> int:
    """The cell id of a point given in degrees."""
    lat_index = min(int((lat + 90.0) / CELL_DEG), _LAT_CELLS - 1)
    lon_index = int((lon + 180.0) / CELL_DEG) % _LON_CELLS
    return lat_index * _LON_CELLS + lon_index


def cells_near(lon: float, lat: float, distance_m: float) -> set[int]:
    """Every cell that may hold a point within ``distance_m`` metres of (lon, lat)."""
    dlat = math.degrees(distance_m / EARTH_RADIUS_M)
    lat_lo = max(lat - dlat, -90.0)
    lat_hi = min(lat + dlat, 90.0)
    widest = max(abs(lat_lo), abs(lat_hi))
    cos_lat = math.cos(math.radians(widest))
    dlon = 180.0 if cos_lat < 1e-9 else math.degrees(distance_m / (EARTH_RADIUS_M * cos_lat))
    lat_indexes = range(
        min(int((lat_lo + 90.0) / CELL_DEG), _LAT_CELLS - 1),
        min(int((lat_hi + 90.0) / CELL_DEG), _LAT_CELLS - 1) + 1,
    )
    if dlon >= 180.0:
        lon_indexes = range(_LON_CELLS)
    else:
        first = math.floor((lon - dlon + 180.0) / CELL_DEG)
        last = math.floor((lon + dlon + 180.0) / CELL_DEG)
        lon_indexes = [i % _LON_CELLS for i in range(first, last + 1)]
    return {la * _LON_CELLS + lo for la in lat_indexes for lo in lon_indexes}
