"""Value types of the clustering engine and the checks made where photos enter it.

Coordinates follow the geo contract in :mod:`snapmap_pipeline.clustering.geo` (GeoJSON
``[lon, lat]`` degrees). Times are timezone-aware datetimes; inside the engine they become
int64 microseconds since the Unix epoch, the resolution of ``datetime``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import attrgetter

import numpy as np

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)

# Upper bounds that keep the locality maths meaningful: a link reach (2R) well under a
# quarter of the Earth's circumference, and a window that `timedelta` can represent.
MAX_RADIUS_M = 1_000_000.0
MAX_WINDOW_S = 366 * 86_400.0


@dataclass(frozen=True, slots=True)
class ClusterParams:
    """The canonical rule's parameters.

    ``radius_m``: R, the largest great-circle distance (metres) from a photo to an event's
    centroid for the photo to join it. ``window_s``: W, the largest gap (seconds) between an
    event's last photo and a joining photo; it is resolved to whole microseconds, the
    resolution of the timestamps it is compared with.
    """

    radius_m: float = 50.0
    window_s: float = 300.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.radius_m) and 0.0 < self.radius_m <= MAX_RADIUS_M):
            raise ValueError(f"radius_m must be in (0, {MAX_RADIUS_M:g}] m, got {self.radius_m!r}")
        if not (math.isfinite(self.window_s) and 0.0 <= self.window_s <= MAX_WINDOW_S):
            raise ValueError(f"window_s must be in [0, {MAX_WINDOW_S:g}] s, got {self.window_s!r}")

    @property
    def window(self) -> timedelta:
        """W as a ``timedelta`` (rounded to the microsecond like any ``timedelta``)."""
        return timedelta(seconds=self.window_s)

    @property
    def window_us(self) -> int:
        """W in whole microseconds."""
        return self.window // _ONE_US


@dataclass(frozen=True, slots=True)
class PhotoPoint:
    """One photo as the engine sees it: id, when it was taken (timezone-aware) and where
    (``lon``, ``lat`` in degrees, GeoJSON order)."""

    photo_id: str
    taken_at: datetime
    lon: float
    lat: float


@dataclass(frozen=True, slots=True)
class Event:
    """One event of the canonical result.

    ``lon``/``lat``: the spherical mean of the members (degrees). ``radius_m``: the largest
    great-circle distance from that centroid to a member (metres). ``start_at``/``end_at``:
    the earliest and latest ``taken_at`` of the members (UTC). ``first_photo_id``: the member
    that comes first in ``(taken_at, photo_id)`` order; ``event_id`` is derived from it.
    """

    event_id: str
    lon: float
    lat: float
    radius_m: float
    start_at: datetime
    end_at: datetime
    photo_count: int
    first_photo_id: str


@dataclass
class ClusterResult:
    """A canonical pass over a set of photos: events by id, and each photo's event id."""

    events: dict[str, Event]
    assignment: dict[str, str]


def event_id_for(photo_id: str) -> str:
    """The id of the event whose first photo is ``photo_id``: ``"ev-"`` and the first 20 hex
    digits (80 bits) of the SHA-256 of the UTF-8 photo id. The same everywhere, forever:
    stored events, links and tombstones depend on it."""
    return "ev-" + hashlib.sha256(photo_id.encode("utf-8")).hexdigest()[:20]


def unique_photos(photos: Iterable[PhotoPoint]) -> list[PhotoPoint]:
    """``photos`` without repeats of a ``photo_id``, in first-seen order.

    Identical repeats (replays) are dropped. Two different photos under one id raise
    ``ValueError``: no order-independent rule could choose between them, and the result
    must not depend on input order.
    """
    photos = list(photos)
    if len(set(map(attrgetter("photo_id"), photos))) == len(photos):
        return photos  # the usual case: no repeats, no per-photo dictionary work
    seen: dict[str, PhotoPoint] = {}
    for photo in photos:
        kept = seen.setdefault(photo.photo_id, photo)
        if kept is not photo and kept != photo:
            raise ValueError(
                f"photo_id {photo.photo_id!r} given twice with different data: "
                f"{kept!r} and {photo!r}"
            )
    return list(seen.values())


def to_utc(moment: datetime) -> datetime:
    """The same instant in UTC (no copy when it already is)."""
    return moment if moment.tzinfo is UTC else moment.astimezone(UTC)


def from_epoch_us(micros: int) -> datetime:
    """Microseconds since the Unix epoch to an aware UTC datetime."""
    return _EPOCH + timedelta(microseconds=int(micros))


@dataclass(frozen=True)
class PhotoColumns:
    """Validated photos as columns, in the caller's order.

    ``photo_ids``: list of n str. ``taken_at_us``: int64 (n,) microseconds since the epoch.
    ``lon``/``lat``: float64 (n,) degrees.
    """

    photo_ids: list[str]
    taken_at_us: np.ndarray
    lon: np.ndarray
    lat: np.ndarray


def photo_columns(photos: Sequence[PhotoPoint]) -> PhotoColumns:
    """Validate photos at the engine boundary and turn them into columns.

    Raises ``ValueError`` naming the photo for: an id that is not a non-empty str, a
    ``taken_at`` that is not a timezone-aware datetime, a coordinate that is not a real
    number (numeric strings are refused, not coerced), a non-finite coordinate, a longitude
    outside [-180, 180] or a latitude outside [-90, 90]. Nothing is clamped.
    """
    photo_ids = [p.photo_id for p in photos]
    for photo_id in photo_ids:
        if not isinstance(photo_id, str) or not photo_id:
            raise ValueError(f"photo_id must be a non-empty str, got {photo_id!r}")
    try:
        # Subtracting an aware epoch raises TypeError for naive datetimes and non-datetimes.
        micros = [(p.taken_at - _EPOCH) // _ONE_US for p in photos]
    except TypeError:
        for p in photos:
            epoch_us(p.taken_at, f"photo {p.photo_id!r}: taken_at")
        raise
    taken_at_us = np.array(micros, dtype=np.int64)
    lon = _coordinate_column(photos, "lon", photo_ids, 180.0, "longitude")
    lat = _coordinate_column(photos, "lat", photo_ids, 90.0, "latitude")
    return PhotoColumns(photo_ids, taken_at_us, lon, lat)


def epoch_us(moment: datetime, what: str = "datetime") -> int:
    """Microseconds since the Unix epoch of an aware datetime; ``ValueError`` (naming
    ``what``) for a naive datetime or anything that is not a datetime."""
    if not isinstance(moment, datetime) or moment.utcoffset() is None:
        raise ValueError(
            f"{what} must be a timezone-aware datetime, got naive or non-datetime {moment!r}"
        )
    return (moment - _EPOCH) // _ONE_US


def _coordinate_column(
    photos: Sequence[PhotoPoint], field: str, photo_ids: list[str], limit: float, name: str
) -> np.ndarray:
    raw = np.array(list(map(attrgetter(field), photos)))
    # Without a dtype numpy keeps strings as strings and None as object, so both are caught
    # here instead of being silently converted (as are columns of bools).
    if len(photos) and raw.dtype.kind not in "iuf":
        bad = next(i for i, p in enumerate(photos) if not _is_real(getattr(p, field)))
        raise ValueError(
            f"photo {photo_ids[bad]!r}: {name} must be a real number, "
            f"got {getattr(photos[bad], field)!r}"
        )
    column = raw.astype(np.float64)
    finite = np.isfinite(column)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"photo {photo_ids[bad]!r}: non-finite {name} {getattr(photos[bad], field)!r}"
        )
    outside = np.abs(column) > limit
    if outside.any():
        bad = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"photo {photo_ids[bad]!r}: {name} {getattr(photos[bad], field)!r} out of range "
            f"[{-limit:g}, {limit:g}]"
        )
    return column


def _is_real(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )
