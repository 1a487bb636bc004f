"""``diff``: created, changed, revived, tombstoned (and into what), relinked, and never more
than the closure's own events."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from snapmap_pipeline.clustering import (
    ClusterResult,
    Event,
    StoredEvent,
    diff,
)

from .worlds import T0

pytestmark = pytest.mark.engine


def event(event_id: str, first: str, count: int = 1, lon: float = 81.77) -> Event:
    return Event(event_id, lon, 25.43, 5.0, T0, T0 + timedelta(seconds=60), count, first)


def stored(e: Event, version: int = 1, merged_into: str | None = None) -> StoredEvent:
    return StoredEvent(
        e.event_id,
        version,
        e.photo_count,
        e.lon,
        e.lat,
        e.radius_m,
        e.start_at,
        e.end_at,
        e.first_photo_id,
        merged_into,
    )


def result(events: list[Event], assignment: dict[str, str]) -> ClusterResult:
    return ClusterResult({e.event_id: e for e in events}, assignment)


def test_new_events_are_created_and_every_photo_linked():
    e = event("ev-a", "a", 2)
    changes = diff(result([e], {"a": "ev-a", "b": "ev-a"}), {}, {"b": None})
    assert changes.created == [e] and not changes.changed and not changes.tombstoned
    assert changes.links == {"a": "ev-a", "b": "ev-a"}


def test_identical_state_gives_empty_changes():
    e = event("ev-a", "a", 2)
    changes = diff(
        result([e], {"a": "ev-a", "b": "ev-a"}), {"ev-a": stored(e)}, {"a": "ev-a", "b": "ev-a"}
    )
    assert changes.is_empty and changes.unchanged_events == 1


@pytest.mark.parametrize(
    "edit",
    [
        {"photo_count": 3},
        {"lon": 81.77 + 2e-9},
        {"radius_m": 5.0 + 2e-6},
        {"end_at": T0 + timedelta(seconds=61)},
        {"first_photo_id": "z"},
    ],
)
def test_a_field_beyond_tolerance_is_a_change(edit):
    e = event("ev-a", "a")
    changes = diff(result([e], {"a": "ev-a"}), {"ev-a": replace(stored(e), **edit)}, {"a": "ev-a"})
    assert changes.changed == [e] and not changes.links


def test_float_noise_and_the_two_names_of_the_antimeridian_are_not_changes():
    e = event("ev-a", "a", lon=180.0)
    old = replace(stored(e), lon=-180.0, lat=e.lat + 1e-12, radius_m=e.radius_m + 1e-9)
    assert diff(result([e], {"a": "ev-a"}), {"ev-a": old}, {"a": "ev-a"}).is_empty


def test_a_tombstone_that_comes_back_is_changed():
    e = event("ev-a", "a")
    changes = diff(
        result([e], {"a": "ev-a"}), {"ev-a": stored(e, 3, merged_into="ev-z")}, {"a": "ev-a"}
    )
    assert changes.changed == [e] and not changes.created


def test_a_merged_event_is_tombstoned_into_the_event_holding_most_of_its_photos():
    old = event("ev-old", "a", 3)
    big, small = event("ev-big", "b", 2), event("ev-small", "a", 1)
    assignment = {"a": "ev-small", "b": "ev-big", "c": "ev-big"}
    links = {"a": "ev-old", "b": "ev-old", "c": "ev-old"}
    changes = diff(result([big, small], assignment), {"ev-old": stored(old)}, links)
    assert changes.tombstoned == {"ev-old": "ev-big"}


def test_a_tombstone_tie_goes_to_the_smaller_event_id():
    old = event("ev-old", "a", 2)
    x, y = event("ev-y", "a"), event("ev-x", "b")
    changes = diff(
        result([x, y], {"a": "ev-y", "b": "ev-x"}),
        {"ev-old": stored(old)},
        {"a": "ev-old", "b": "ev-old"},
    )
    assert changes.tombstoned == {"ev-old": "ev-x"}


def test_without_known_photos_the_tombstone_follows_the_first_photo():
    old = event("ev-old", "a", 2)
    new = event("ev-new", "z", 3)
    changes = diff(
        result([new], {"a": "ev-new", "z": "ev-new"}), {"ev-old": stored(old)}, {"a": None}
    )
    assert changes.tombstoned == {"ev-old": "ev-new"}


def test_events_outside_the_closure_are_left_alone():
    mine, elsewhere = event("ev-a", "a"), event("ev-far", "far")
    changes = diff(
        result([mine], {"a": "ev-a"}),
        {"ev-a": stored(mine), "ev-far": stored(elsewhere)},
        {"a": "ev-a", "far": "ev-far"},
    )
    assert changes.is_empty


def test_an_event_still_in_the_result_is_never_tombstoned():
    e = event("ev-a", "a", 2)
    other = event("ev-b", "b")
    changes = diff(
        result([e, other], {"a": "ev-a", "b": "ev-b"}),
        {"ev-a": stored(e), "ev-b": stored(other)},
        {"a": "ev-a", "b": "ev-a"},
    )
    assert not changes.tombstoned and changes.links == {"b": "ev-b"}
    assert changes.changed == [] and changes.created == []
