"""A map of one micro-batch for the Dagster UI: its photos coloured by event, and each event's
centroid with a circle of its radius.

The map is a PNG drawn on an Agg canvas (no pyplot global state) and travels as markdown with a
data URI in the ``events`` asset's metadata, so it must stay small: at most ``MAX_POINTS``
photos are drawn (an even sample in photo-id order), the PNG is stored with a colour palette,
and it is re-drawn at a lower resolution if it still exceeds ``MAX_IMAGE_BYTES``.

Axes are longitude and latitude in degrees. An event's radius in metres is an arc of
``radiusM / EARTH_RADIUS_M`` radians of latitude; along a parallel at latitude ``phi`` the same
distance spans ``radiusM / (EARTH_RADIUS_M * cos(phi))`` radians of longitude, so each circle is
drawn as an ellipse with those half-axes. The axes' aspect ratio is ``1 / cos(lat0)`` at the
batch's mean latitude, which makes a circle look round near that latitude.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from dagster import MetadataValue
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import EllipseCollection
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator
from PIL import Image
from pymongo.database import Database

from snapmap_pipeline.clustering import EARTH_RADIUS_M
from snapmap_pipeline.store.events import LIVE_EVENTS, effective_links

#: Batches with more photos than this get no map (reading them would cost the run too much).
MAX_BATCH_PHOTOS = 20_000
#: Photos and events drawn at most; more are sampled evenly.
MAX_POINTS = 3_000
#: The PNG's size limit before base64 (a third more once encoded).
MAX_IMAGE_BYTES = 110_000

_FIGURE_IN = (6.0, 4.5)
_DPIS = (80, 64, 48)
_PALETTE_COLOURS = 128
# cos(latitude) floor: at the poles a circle's longitude span is capped instead of infinite.
_MIN_COS_LAT = 1e-3
_IN_CHUNK = 5_000
_UNLINKED = "#9e9e9e"


@dataclass(frozen=True)
class MapEvent:
    """An event as drawn: centroid in degrees, radius in metres."""

    event_id: str
    lon: float
    lat: float
    radius_m: float
    photo_count: int


def event_map(db: Database, photo_ids: Sequence[str]) -> MetadataValue:
    """The map of a batch's photos and the events they are linked to (or queued to be linked
    to), as markdown metadata. Reads at most ``MAX_BATCH_PHOTOS`` photos and their events;
    a larger batch gets a line of text saying that the map was skipped."""
    if len(photo_ids) > MAX_BATCH_PHOTOS:
        count, limit = len(photo_ids), MAX_BATCH_PHOTOS
        return MetadataValue.md(f"Map skipped: {count:,} photos in the batch, over {limit:,}.")
    if not photo_ids:
        return MetadataValue.md("No map: the batch has no valid photos.")

    docs = _photo_docs(db, photo_ids)
    links = effective_links(db, docs)
    ids = sorted(docs)
    lon = np.array([docs[i]["location"]["coordinates"][0] for i in ids], dtype=float)
    lat = np.array([docs[i]["location"]["coordinates"][1] for i in ids], dtype=float)
    photo_events = [links.get(i) for i in ids]
    events = _live_events(db, {e for e in photo_events if e})
    return MetadataValue.md(render_event_map(lon, lat, photo_events, events))


def render_event_map(
    lon: np.ndarray,
    lat: np.ndarray,
    photo_events: Sequence[str | None],
    events: Mapping[str, MapEvent],
) -> str:
    """Markdown with the map as a PNG data URI. ``lon``/``lat``: shape ``(n,)``, degrees;
    ``photo_events``: each photo's event id (None: not linked); ``events``: by id."""
    title = f"{_count(len(lon), 'photo')}, {_count(len(events), 'event')}"
    picked = _even_sample(len(lon), MAX_POINTS)
    shown = sorted(events.values(), key=lambda e: (-e.photo_count, e.event_id))[:MAX_POINTS]
    if len(picked) < len(lon) or len(shown) < len(events):
        title += f" (drawn: {len(picked):,} photos, {len(shown):,} events)"

    mid_lon = _circular_mean_deg(lon)
    photo_lon = _unwrap(lon[picked], mid_lon)
    photo_lat = lat[picked]
    order = {event_id: rank for rank, event_id in enumerate(sorted(events))}
    colour_index = np.array([order.get(photo_events[i], -1) for i in picked])

    png = b""
    for dpi in _DPIS:
        png = _palette_png(_draw(photo_lon, photo_lat, colour_index, shown, mid_lon, title, dpi))
        if len(png) <= MAX_IMAGE_BYTES:
            break
    encoded = base64.b64encode(png).decode("ascii")
    return f"![event map: {title}](data:image/png;base64,{encoded})"


def circle_half_axes_deg(radius_m: float, lat_deg: float) -> tuple[float, float]:
    """Half-width (longitude) and half-height (latitude), in degrees, of a circle of
    ``radius_m`` metres centred at latitude ``lat_deg``."""
    dlat = math.degrees(radius_m / EARTH_RADIUS_M)
    cos_lat = max(math.cos(math.radians(lat_deg)), _MIN_COS_LAT)
    dlon = min(math.degrees(radius_m / (EARTH_RADIUS_M * cos_lat)), 180.0)
    return dlon, dlat


def _draw(
    lon: np.ndarray,
    lat: np.ndarray,
    colour_index: np.ndarray,
    events: Sequence[MapEvent],
    mid_lon: float,
    title: str,
    dpi: int,
) -> bytes:
    figure = Figure(figsize=_FIGURE_IN, dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    colours = _colours(colour_index)
    # Photos on top: a one-photo event's photo sits exactly on its centroid mark. Few photos
    # are drawn larger, so that they are seen at all beside the marks.
    axes.scatter(lon, lat, s=18 if len(lon) <= 500 else 6, c=colours, linewidths=0, zorder=5)

    if events:
        centre_lon = _unwrap(np.array([e.lon for e in events]), mid_lon)
        centre_lat = np.array([e.lat for e in events])
        axes_deg = [circle_half_axes_deg(e.radius_m, e.lat) for e in events]
        widths = np.array([2.0 * dlon for dlon, _ in axes_deg])
        heights = np.array([2.0 * dlat for _, dlat in axes_deg])
        circles = EllipseCollection(
            widths,
            heights,
            np.zeros(len(events)),
            units="xy",
            offsets=np.column_stack((centre_lon, centre_lat)),
            offset_transform=axes.transData,
            facecolors="none",
            edgecolors="#333333",
            linewidths=0.6,
            zorder=3,
        )
        axes.add_collection(circles)
        # Crowded maps get smaller centroid marks, so that the photos stay visible.
        size, width = (60, 0.8) if len(events) <= 200 else (4, 0.4)
        axes.scatter(centre_lon, centre_lat, s=size, marker="+", c="k", linewidths=width, zorder=4)
        all_lon = np.concatenate((lon, centre_lon - widths / 2, centre_lon + widths / 2))
        all_lat = np.concatenate((lat, centre_lat - heights / 2, centre_lat + heights / 2))
    else:
        all_lon, all_lat = lon, lat

    _frame(axes, all_lon, all_lat)
    axes.set_xlabel("longitude (°)")
    axes.set_ylabel("latitude (°)")
    axes.set_title(title, fontsize=9)
    axes.tick_params(labelsize=7)
    axes.xaxis.set_major_locator(MaxNLocator(4))
    axes.yaxis.set_major_locator(MaxNLocator(6))
    axes.xaxis.set_major_formatter(FuncFormatter(_lon_label))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.4f}"))
    axes.grid(True, linewidth=0.3, alpha=0.5)
    # Fixed margins: tight_layout would measure every label again and double the drawing time.
    figure.subplots_adjust(left=0.2, right=0.96, bottom=0.12, top=0.92)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _palette_png(png: bytes) -> bytes:
    """The PNG re-encoded with a palette of ``_PALETTE_COLOURS``: a dense scatter is about a
    quarter of its RGBA size, and the map has few distinct colours anyway."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    paletted = image.quantize(colors=_PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT)
    buffer = io.BytesIO()
    paletted.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _lon_label(value: float, _position: int) -> str:
    """Tick label of an unwrapped longitude, back in [-180, 180)."""
    return f"{(value + 180.0) % 360.0 - 180.0:.4f}"


def _frame(axes, lon: np.ndarray, lat: np.ndarray) -> None:
    """Limits around the drawn data with a margin, and the local equirectangular aspect."""
    lat_mid = float(np.mean(lat)) if len(lat) else 0.0
    cos_lat = max(math.cos(math.radians(lat_mid)), _MIN_COS_LAT)
    lon_lo, lon_hi = (float(lon.min()), float(lon.max())) if len(lon) else (-1.0, 1.0)
    lat_lo, lat_hi = (float(lat.min()), float(lat.max())) if len(lat) else (-1.0, 1.0)
    # At least ~100 m of frame, so that a single photo is not drawn on a zero-size axis.
    min_span = math.degrees(100.0 / EARTH_RADIUS_M)
    lon_pad = max((lon_hi - lon_lo) * 0.05, min_span / cos_lat)
    lat_pad = max((lat_hi - lat_lo) * 0.05, min_span)
    axes.set_xlim(lon_lo - lon_pad, lon_hi + lon_pad)
    axes.set_ylim(max(lat_lo - lat_pad, -90.0), min(lat_hi + lat_pad, 90.0))
    axes.set_aspect(1.0 / cos_lat, adjustable="box")


def _colours(colour_index: np.ndarray) -> list:
    """One colour per event, cycling by event-id rank through tab10's strong colours without
    its grey (none fades into the white background); grey is for photos without an event."""
    palette = [colour for n, colour in enumerate(colormaps["tab10"].colors) if n != 7]
    return [palette[int(i) % len(palette)] if i >= 0 else _UNLINKED for i in colour_index]


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def _even_sample(n: int, limit: int) -> np.ndarray:
    """Indices of at most ``limit`` of ``n`` items, evenly spaced (deterministic)."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def _circular_mean_deg(lon: np.ndarray) -> float:
    """Mean longitude on the circle (degrees): a batch across the antimeridian is drawn
    around it, not split at +-180."""
    if not len(lon):
        return 0.0
    rad = np.radians(lon)
    return float(np.degrees(np.arctan2(np.sin(rad).mean(), np.cos(rad).mean())))


def _unwrap(lon: np.ndarray, mid_lon: float) -> np.ndarray:
    """Longitudes shifted by whole turns into ``[mid_lon - 180, mid_lon + 180)``."""
    return (lon - mid_lon + 180.0) % 360.0 - 180.0 + mid_lon


def _photo_docs(db: Database, photo_ids: Sequence[str]) -> dict[str, dict]:
    ids = sorted(set(photo_ids))
    docs: dict[str, dict] = {}
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        for doc in db.photos.find({"_id": {"$in": chunk}}, {"location": 1, "eventId": 1}):
            docs[doc["_id"]] = doc
    return docs


def _live_events(db: Database, event_ids: set[str]) -> dict[str, MapEvent]:
    ids = sorted(event_ids)
    events: dict[str, MapEvent] = {}
    fields = {"centroid": 1, "radiusM": 1, "photoCount": 1, "mergedInto": 1}
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        for doc in db.events.find({"_id": {"$in": chunk}} | LIVE_EVENTS, fields):
            lon, lat = doc["centroid"]["coordinates"]
            events[doc["_id"]] = MapEvent(
                doc["_id"],
                float(lon),
                float(lat),
                float(doc.get("radiusM", 0.0)),
                int(doc.get("photoCount", 0)),
            )
    return events
