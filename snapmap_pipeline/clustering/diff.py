"""Compare a canonical pass with what is stored: what to create, update, tombstone, relink.

The result of a pass over a closure is the truth for every photo in it. Stored events are
*in scope* when a photo of the result is stored as linked to them or is their first photo;
events out of scope are never touched, so callers may pass more stored events or links
than the closure needs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from snapmap_pipeline.clustering.model import ClusterResult, Event

# Tolerances for "the stored event already says this": far below anything a person could
# see on a map, far above float noise between two passes over the same members.
LONLAT_TOLERANCE_DEG = 1e-9
RADIUS_TOLERANCE_M = 1e-6


@dataclass
class StoredEvent:
    """An event document as stored: fields compared with a fresh :class:`Event`, a version
    counter, and ``merged_into`` (the event id that replaced it) when it is a tombstone. A
    stored event with no photos and no successor (retired: its photos were dead-lettered) is
    treated as a tombstone too.
    ``lon``/``lat`` in degrees, ``radius_m`` in metres, datetimes timezone-aware."""

    event_id: str
    version: int
    photo_count: int
    lon: float
    lat: float
    radius_m: float
    start_at: datetime
    end_at: datetime
    first_photo_id: str
    merged_into: str | None = None

    @property
    def is_tombstone(self) -> bool:
        return self.merged_into is not None or self.photo_count == 0


@dataclass
class Changes:
    """What to write so that the store holds the result.

    ``created``: events that are not stored at all. ``changed``: stored events whose fields
    differ, and tombstones that come back to life. ``tombstoned``: old event id -> the id
    of the event it became (``mergedInto``). ``links``: photo id -> event id, for photos
    whose stored event id differs (or is missing). ``unchanged_events``: events already
    stored exactly. Lists are sorted by event id, so the same input gives the same writes.
    """

    created: list[Event] = field(default_factory=list)
    changed: list[Event] = field(default_factory=list)
    tombstoned: dict[str, str] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    unchanged_events: int = 0

    @property
    def is_empty(self) -> bool:
        """True when the store already holds the result (nothing to write)."""
        return not (self.created or self.changed or self.tombstoned or self.links)


def diff(
    result: ClusterResult,
    stored_events: Mapping[str, StoredEvent],
    stored_links: Mapping[str, str | None],
) -> Changes:
    """The writes that turn the stored state into ``result``.

    ``stored_events``: stored events by id, live or tombstone. ``stored_links``: photo id ->
    the event id stored on the photo (``None`` or absent: not linked yet).

    Rules: an event of the result that is not stored is created; a stored one whose fields
    differ (floats within :data:`LONLAT_TOLERANCE_DEG` / :data:`RADIUS_TOLERANCE_M`,
    datetimes, counts and first photo exactly) or that is a tombstone is changed. A live
    stored event in scope (see the module docstring) that the result does not have is
    tombstoned into the result event now holding most of its former photos (ties: smallest
    id), or, if none of them is known, into the event of its first photo; so is a retired
    stored event (see :class:`StoredEvent`) whose first photo is in the result. Applying the
    changes and diffing again gives empty changes.
    """
    changes = Changes()
    for event_id in sorted(result.events):
        event = result.events[event_id]
        old = stored_events.get(event_id)
        if old is None:
            changes.created.append(event)
        elif old.is_tombstone or not _same(event, old):
            changes.changed.append(event)
        else:
            changes.unchanged_events += 1

    former_photos: dict[str, Counter[str]] = {}
    for photo_id, event_id in result.assignment.items():
        old_id = stored_links.get(photo_id)
        if old_id != event_id:
            changes.links[photo_id] = event_id
        if old_id is not None:
            former_photos.setdefault(old_id, Counter())[event_id] += 1

    for old_id in sorted(stored_events):
        old = stored_events[old_id]
        # A retired event (no photos, no successor) holds no photo, but its first photo may
        # be back in another event: it then points there like any event renamed.
        if old.merged_into is not None or old_id in result.events:
            continue
        holders = former_photos.get(old_id)
        if holders:
            most = max(holders.values())
            changes.tombstoned[old_id] = min(e for e, n in holders.items() if n == most)
        elif old.first_photo_id in result.assignment:
            changes.tombstoned[old_id] = result.assignment[old.first_photo_id]
    return changes


def _same(event: Event, old: StoredEvent) -> bool:
    lon_gap = abs(event.lon - old.lon)
    lon_gap = min(lon_gap, 360.0 - lon_gap)  # -180 and 180 are one meridian
    return (
        event.photo_count == old.photo_count
        and event.first_photo_id == old.first_photo_id
        and event.start_at == old.start_at
        and event.end_at == old.end_at
        and lon_gap <= LONLAT_TOLERANCE_DEG
        and abs(event.lat - old.lat) <= LONLAT_TOLERANCE_DEG
        and abs(event.radius_m - old.radius_m) <= RADIUS_TOLERANCE_M
    )
