"""A seeded, realistic stream of upload messages for one city, for the demo and soak tests.

One day in a city around ``(centre_lon, centre_lat)``, the day ending at ``StreamConfig.end``:

- dinners: about 6 photos at one table, over 30 to 90 minutes;
- weddings: hundreds of photos at one venue, over several hours, with a burst at the ceremony;
- one festival crowd: a large share of every photo (tens of thousands when ``photos`` is
  large), around a few hotspots a few hundred metres apart, busiest 9 and 4 hours before the
  end of the day;
- background photos anywhere in the city, fewer at night (local solar time).

Each photo is uploaded after a delay: seconds for most, minutes for some (poor signal), and for a
few the phone was offline for days, so the photo was taken days before its message is
published. Mixed in, at fixed rates: exact duplicate messages (a client retrying after a
timeout), malformed messages of several kinds (they must end as dead letters), and lost photos
whose message is never published although the backend stored the photo and its blob (the
sweeper must heal them).

Everything is derived from ``numpy.random.default_rng(seed)``: no clock, no I/O, so one config
always gives the same records. Positions are GeoJSON ``[lon, lat]`` in degrees; offsets are
drawn in metres east and north and converted with one Earth radius.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import numpy as np

from snapmap_pipeline.clustering.geo import EARTH_RADIUS_M
from snapmap_pipeline.contract.validation import parse_timestamp

METRES_PER_DEGREE = math.pi * EARTH_RADIUS_M / 180.0
DEFAULT_CONTAINER = "photos"
DAY = timedelta(days=1)

# Shares of all photos; the background takes the rest.
FESTIVAL_SHARE = 0.40
WEDDING_SHARE = 0.20
DINNER_SHARE = 0.12
WEDDING_MEAN_PHOTOS = 300
DINNER_MEAN_PHOTOS = 6

# Upload delay classes: shares of all photos (the rest upload within seconds).
MINUTES_LATE_SHARE = 0.08
DAYS_LATE_SHARE = 0.01


class RecordKind(StrEnum):
    """What a record is, so that counts read back from the pipeline can be explained."""

    VALID = "valid"
    DUPLICATE = "duplicate"
    MALFORMED = "malformed"
    LOST = "lost"


class Malformation(StrEnum):
    """The kinds of broken message the stream carries, each rejected by the contract."""

    NOT_JSON = "not_json"
    LONGITUDE_190 = "longitude_190"
    MISSING_TIMESTAMP = "missing_timestamp"
    BAD_STORAGE_URL = "bad_storage_url"
    NAIVE_TIMESTAMP = "naive_timestamp"


@dataclass(frozen=True)
class StreamConfig:
    """Size and shape of a simulated day. ``photos`` counts distinct photos taken (valid and
    lost); duplicates and malformed messages come on top. Rates are shares of ``photos``."""

    end: datetime
    photos: int = 3000
    seed: int = 0
    centre_lon: float = 81.8463
    centre_lat: float = 25.4358
    city_radius_m: float = 8000.0
    duplicate_rate: float = 0.005
    malformed_rate: float = 0.005
    lost_rate: float = 0.003
    container: str = DEFAULT_CONTAINER

    def __post_init__(self) -> None:
        if self.end.tzinfo is None or self.end.utcoffset() != timedelta(0):
            raise ValueError("end must be an aware UTC datetime")
        if self.photos < 1:
            raise ValueError("photos must be at least 1")
        if not (-180.0 <= self.centre_lon <= 180.0 and -80.0 <= self.centre_lat <= 80.0):
            raise ValueError("centre must be lon in [-180, 180] and lat in [-80, 80] degrees")
        for name in ("duplicate_rate", "malformed_rate", "lost_rate"):
            if not 0.0 <= getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5)")
        # Whole milliseconds, the precision MongoDB stores, so taken times survive a round trip.
        object.__setattr__(
            self, "end", self.end.replace(microsecond=self.end.microsecond // 1000 * 1000)
        )

    @property
    def lost_count(self) -> int:
        return round(self.photos * self.lost_rate)

    @property
    def duplicate_count(self) -> int:
        return min(round(self.photos * self.duplicate_rate), self.photos - self.lost_count)

    @property
    def malformed_count(self) -> int:
        return round(self.photos * self.malformed_rate)


@dataclass(frozen=True)
class Photo:
    """A photo as the upload backend stores it. ``taken_at`` is aware UTC, whole milliseconds."""

    photo_id: str
    taken_at: datetime
    lon: float
    lat: float
    gathering: str
    container: str = DEFAULT_CONTAINER

    @property
    def storage_url(self) -> str:
        return f"azure://{self.container}/{self.blob_name}"

    @property
    def blob_name(self) -> str:
        return f"{self.photo_id}.jpg"


@dataclass(frozen=True)
class UploadRecord:
    """One message of the stream, in publish order. ``key`` and ``value`` are the exact bytes
    to produce (for a lost record: what would have been produced). ``publish_at`` places the
    record in the simulated day; the broker stamps the real time when it is produced."""

    kind: RecordKind
    key: bytes
    value: bytes
    publish_at: datetime
    photo: Photo | None = None
    malformation: Malformation | None = None

    @property
    def is_published(self) -> bool:
        return self.kind is not RecordKind.LOST

    @property
    def stores_photo(self) -> bool:
        """Whether the backend writes the photo document and the blob for this record."""
        return self.kind in (RecordKind.VALID, RecordKind.LOST)


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds and ``Z``, as the mobile and web clients send it."""
    utc = moment.astimezone(UTC)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z"


def upload_message(photo: Photo, timestamp: str | None = None) -> bytes:
    """The contract's JSON message for ``photo``; ``timestamp`` overrides the formatted one
    (replay keeps the source's text)."""
    body = {
        "photoId": photo.photo_id,
        "timestamp": timestamp or format_timestamp(photo.taken_at),
        "location": [photo.lon, photo.lat],
        "storageUrl": photo.storage_url,
    }
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def photo_id_prefix(seed: int) -> str:
    """What every photo id of the stream of ``seed`` starts with (it selects one run's photos)."""
    return f"sim-{np.random.default_rng(seed).bytes(4).hex()}-"


def generate_stream(config: StreamConfig) -> Iterator[UploadRecord]:
    """Yield the day's records in publish order (ties keep generation order)."""
    rng = np.random.default_rng(config.seed)
    prefix = f"sim-{rng.bytes(4).hex()}-"
    photos, publish_s = _photos(config, rng, prefix)

    records: list[tuple[float, UploadRecord]] = []
    lost = set(rng.choice(len(photos), size=config.lost_count, replace=False).tolist())
    for index, photo in enumerate(photos):
        kind = RecordKind.LOST if index in lost else RecordKind.VALID
        record = _record(kind, photo, publish_s[index], config.end)
        records.append((publish_s[index], record))

    delivered = [i for i in range(len(photos)) if i not in lost]
    originals = rng.choice(delivered, size=config.duplicate_count, replace=False)
    retry_s = rng.lognormal(np.log(20.0), 0.7, size=len(originals))
    for original, retry in zip(originals.tolist(), retry_s.tolist(), strict=True):
        at = publish_s[original] + retry
        source = records[original][1]
        duplicate = UploadRecord(
            RecordKind.DUPLICATE, source.key, source.value, _moment(config.end, at), source.photo
        )
        records.append((at, duplicate))

    records += _malformed(config, rng, prefix)
    order = sorted(range(len(records)), key=lambda i: (records[i][0], i))
    for i in order:
        yield records[i][1]


def records_from_checkins(
    rows: Iterable[tuple[str, str, float, float]], container: str = DEFAULT_CONTAINER
) -> Iterator[UploadRecord]:
    """Turn real check-ins ``(photo_id, timestamp, lon, lat)`` into valid records that keep
    the original timestamp text; ``publish_at`` is the check-in time (the replay schedule)."""
    for photo_id, timestamp, lon, lat in rows:
        taken_at = parse_timestamp(timestamp)
        photo = Photo(photo_id, taken_at, float(lon), float(lat), "replay", container)
        yield UploadRecord(
            RecordKind.VALID, photo_id.encode(), upload_message(photo, timestamp), taken_at, photo
        )


def tally(records: Iterable[UploadRecord]) -> dict:
    """Counts that explain what the pipeline should end with: kinds, malformations, gathering
    kinds and sizes, and upload delays of the stored photos."""
    kinds: Counter[str] = Counter()
    malformed: Counter[str] = Counter()
    gatherings: Counter[str] = Counter()
    delays: Counter[str] = Counter()
    for record in records:
        kinds[record.kind.value] += 1
        if record.malformation is not None:
            malformed[record.malformation.value] += 1
        if record.stores_photo and record.photo is not None:
            gatherings[record.photo.gathering] += 1
            delays[_delay_class(record.publish_at - record.photo.taken_at)] += 1
    by_kind: Counter[str] = Counter()
    sizes: dict[str, list[int]] = {}
    for name, count in gatherings.items():
        kind = name.split("-", 1)[0]
        by_kind[kind] += count
        if kind not in ("background", "replay"):
            sizes.setdefault(kind, []).append(count)
    return {
        "records": sum(kinds.values()),
        "published": sum(n for k, n in kinds.items() if k != RecordKind.LOST),
        "kinds": dict(sorted(kinds.items())),
        "malformed": dict(sorted(malformed.items())),
        "photosStored": kinds[RecordKind.VALID] + kinds[RecordKind.LOST],
        "photosByGathering": dict(sorted(by_kind.items())),
        "gatherings": {k: len(v) for k, v in sorted(sizes.items())},
        "largestGathering": {k: max(v) for k, v in sorted(sizes.items())},
        "uploadDelay": dict(sorted(delays.items())),
    }


def _delay_class(delay: timedelta) -> str:
    if delay >= DAY:
        return "days"
    if delay >= timedelta(minutes=1):
        return "minutes"
    return "seconds"


def _photos(
    config: StreamConfig, rng: np.random.Generator, prefix: str
) -> tuple[list[Photo], np.ndarray]:
    """Every photo of the day and its publish time, in seconds relative to ``end``."""
    n = config.photos
    n_festival = round(n * FESTIVAL_SHARE)
    n_wedding = round(n * WEDDING_SHARE)
    n_dinner = round(n * DINNER_SHARE)
    n_background = n - n_festival - n_wedding - n_dinner

    parts = [
        _festival(config, rng, n_festival),
        *_weddings(config, rng, n_wedding),
        *_dinners(config, rng, n_dinner),
        _background(config, rng, n_background),
    ]
    east = np.concatenate([p[0] for p in parts])
    north = np.concatenate([p[1] for p in parts])
    taken_s = np.concatenate([p[2] for p in parts])
    labels = [label for p in parts for label in [p[3]] * len(p[2])]

    publish_s = taken_s + _upload_delays(rng, n)
    offline_s = _offline_delays(rng, labels)
    taken_s = np.where(offline_s > 0.0, publish_s - offline_s, taken_s)

    lon, lat = _to_degrees(config, east, north)
    taken_ms = np.round(taken_s * 1000.0).astype(np.int64)
    numbers = rng.permutation(n)
    photos = [
        Photo(
            f"{prefix}{numbers[i]:06d}",
            config.end + timedelta(milliseconds=int(taken_ms[i])),
            round(float(lon[i]), 7),
            round(float(lat[i]), 7),
            labels[i],
            config.container,
        )
        for i in range(n)
    ]
    return photos, publish_s


Part = tuple[np.ndarray, np.ndarray, np.ndarray, str]


def _festival(config: StreamConfig, rng: np.random.Generator, n: int) -> Part:
    """One crowd: five hotspots (ghats, stages) within a few hundred metres, busiest around 9
    and 4 hours before the end of the day."""
    site = _inside_disc(rng, 1, config.city_radius_m * 0.4)
    hotspots = site + rng.normal(0.0, 150.0, size=(5, 2))
    weights = rng.dirichlet(np.full(5, 2.0))
    which = rng.choice(5, size=n, p=weights)
    spread = rng.normal(0.0, 35.0, size=(n, 2))
    points = hotspots[which] + spread
    peaks = np.array([-9.0, -4.0]) * 3600.0
    peak = rng.choice(2, size=n, p=[0.4, 0.6])
    taken = _truncated_normal(rng, peaks[peak], 1.6 * 3600.0, -23.5 * 3600.0, -60.0)
    return points[:, 0], points[:, 1], taken, "festival"


def _weddings(config: StreamConfig, rng: np.random.Generator, n: int) -> list[Part]:
    """Weddings of a few hundred photos each, at venues anywhere in the city."""
    if n == 0:
        return []
    count = max(1, round(n / WEDDING_MEAN_PHOTOS))
    weights = rng.uniform(0.7, 1.3, size=count)
    sizes = rng.multinomial(n, weights / weights.sum())
    parts = []
    for number, size in enumerate(sizes.tolist(), start=1):
        venue = _inside_disc(rng, 1, config.city_radius_m * 0.8)[0]
        hours = rng.uniform(3.0, 6.0)
        start = rng.uniform(-23.0, -hours - 0.25) * 3600.0
        ceremony = start + rng.uniform(0.2, 0.4) * hours * 3600.0
        end = start + hours * 3600.0
        burst = rng.random(size) < 0.4
        taken = np.where(
            burst,
            _truncated_normal(rng, np.full(size, ceremony), 600.0, start, end),
            rng.uniform(start, end, size=size),
        )
        spread = rng.normal(0.0, 18.0, size=(size, 2))
        parts.append((venue[0] + spread[:, 0], venue[1] + spread[:, 1], taken, f"wedding-{number}"))
    return parts


def _dinners(config: StreamConfig, rng: np.random.Generator, n: int) -> list[Part]:
    """Dinners of about six photos at one table, over 30 to 90 minutes."""
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(min(3 + rng.poisson(DINNER_MEAN_PHOTOS - 3), n - sum(sizes))))
    parts = []
    for number, size in enumerate(sizes, start=1):
        table = _inside_disc(rng, 1, config.city_radius_m)[0]
        minutes = rng.uniform(30.0, 90.0)
        start = rng.uniform(-23.5 * 3600.0, -(minutes + 5.0) * 60.0)
        taken = np.sort(rng.uniform(start, start + minutes * 60.0, size=size))
        spread = rng.normal(0.0, 4.0, size=(size, 2))
        parts.append((table[0] + spread[:, 0], table[1] + spread[:, 1], taken, f"dinner-{number}"))
    return parts


def _background(config: StreamConfig, rng: np.random.Generator, n: int) -> Part:
    """Single photos anywhere in the city, weighted by local solar hour (few at night)."""
    points = _inside_disc(rng, n, config.city_radius_m)
    minutes = np.arange(-24 * 60, 0)
    end_local_h = (config.end.hour + config.end.minute / 60.0 + config.centre_lon / 15.0) % 24.0
    hour = (end_local_h + minutes / 60.0) % 24.0
    weights = 0.1 + np.clip(np.sin(np.pi * (hour - 6.0) / 18.0), 0.0, None)
    picked = rng.choice(minutes, size=n, p=weights / weights.sum())
    taken = np.minimum(picked * 60.0 + rng.uniform(0.0, 60.0, size=n), -1.0)
    return points[:, 0], points[:, 1], taken, "background"


def _upload_delays(rng: np.random.Generator, n: int) -> np.ndarray:
    """Seconds between taking and publishing: seconds for most, minutes for some."""
    delay = rng.lognormal(np.log(2.0), 0.8, size=n)
    minutes_late = rng.random(n) < MINUTES_LATE_SHARE
    delay[minutes_late] = rng.lognormal(np.log(300.0), 0.9, size=int(minutes_late.sum()))
    return np.clip(delay, 0.2, 4.0 * 3600.0)


def _offline_delays(rng: np.random.Generator, labels: list[str]) -> np.ndarray:
    """Seconds by which some background photos were taken before their upload, because the
    phone was offline for days (1 to 4); 0 for every other photo. Those photos keep their
    place in the day's publish order; their taken time moves days back."""
    background = np.flatnonzero(np.array([label == "background" for label in labels], bool))
    count = min(len(background), round(len(labels) * DAYS_LATE_SHARE))
    offline = np.zeros(len(labels))
    chosen = rng.choice(background, size=count, replace=False)
    offline[chosen] = rng.uniform(1.0, 4.0, size=count) * DAY.total_seconds()
    return offline


def _malformed(
    config: StreamConfig, rng: np.random.Generator, prefix: str
) -> list[tuple[float, UploadRecord]]:
    """Broken messages published at random moments; kinds in turn so that all appear."""
    kinds = list(Malformation)
    count = config.malformed_count
    points = _inside_disc(rng, count, config.city_radius_m)
    lon, lat = _to_degrees(config, points[:, 0], points[:, 1])
    publish = rng.uniform(-23.5 * 3600.0, 0.0, size=count)
    records = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        taken_at = _moment(config.end, publish[i] - 3.0)
        photo = Photo(
            f"{prefix}bad{i:04d}",
            taken_at,
            round(float(lon[i]), 7),
            round(float(lat[i]), 7),
            "malformed",
            config.container,
        )
        value = _break(kind, photo)
        record = UploadRecord(
            RecordKind.MALFORMED,
            photo.photo_id.encode(),
            value,
            _moment(config.end, publish[i]),
            None,
            kind,
        )
        records.append((float(publish[i]), record))
    return records


def _break(kind: Malformation, photo: Photo) -> bytes:
    body = json.loads(upload_message(photo))
    if kind is Malformation.NOT_JSON:
        whole = upload_message(photo)
        return whole[: len(whole) // 2]
    if kind is Malformation.LONGITUDE_190:
        body["location"] = [190.0, photo.lat]
    elif kind is Malformation.MISSING_TIMESTAMP:
        del body["timestamp"]
    elif kind is Malformation.BAD_STORAGE_URL:
        body["storageUrl"] = "azure://My_Bucket/x.jpg"
    elif kind is Malformation.NAIVE_TIMESTAMP:
        body["timestamp"] = photo.taken_at.strftime("%Y-%m-%dT%H:%M:%S")
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def _record(kind: RecordKind, photo: Photo, publish_s: float, end: datetime) -> UploadRecord:
    return UploadRecord(
        kind, photo.photo_id.encode(), upload_message(photo), _moment(end, publish_s), photo
    )


def _moment(end: datetime, seconds: float) -> datetime:
    """``end`` plus ``seconds`` (negative: before), cut to whole milliseconds."""
    return end + timedelta(milliseconds=round(seconds * 1000.0))


def _truncated_normal(
    rng: np.random.Generator, mean: np.ndarray, sd: float, low: float, high: float
) -> np.ndarray:
    """Normal draws around each ``mean``, redrawn until inside ``[low, high]`` (clipping would
    pile photos up on the bounds at one instant)."""
    values = rng.normal(mean, sd)
    outside = (values < low) | (values > high)
    while outside.any():
        values[outside] = rng.normal(mean[outside], sd)
        outside = (values < low) | (values > high)
    return values


def _inside_disc(rng: np.random.Generator, n: int, radius_m: float) -> np.ndarray:
    """``n`` points uniform in a disc, as metres east and north of the centre, shape (n, 2)."""
    r = radius_m * np.sqrt(rng.random(n))
    angle = rng.uniform(0.0, 2.0 * np.pi, size=n)
    return np.column_stack([r * np.cos(angle), r * np.sin(angle)])


def _to_degrees(
    config: StreamConfig, east_m: np.ndarray, north_m: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Metres east and north of the centre to longitude and latitude in degrees (local
    equirectangular: exact enough within a city)."""
    lat = config.centre_lat + north_m / METRES_PER_DEGREE
    metres_per_degree_east = METRES_PER_DEGREE * math.cos(math.radians(config.centre_lat))
    lon = config.centre_lon + east_m / metres_per_degree_east
    lon = (lon + 180.0) % 360.0 - 180.0
    return lon, lat
