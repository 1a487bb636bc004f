"""The demo's end summary reads 'caught up' only when every photo has its event and nothing
waits in the pipeline's queues (links, event updates, manifests)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from snapmap_pipeline.cli import collect_stats
from snapmap_pipeline.simulator.__main__ import collect_summary, render_summary

pytestmark = pytest.mark.storage


def caught_up(db) -> bool:
    return collect_summary(db, collect_stats(db))["caughtUp"]


def test_caught_up_waits_for_the_queues_not_only_the_links(mongo):
    db = mongo.db()
    taken = datetime(2026, 1, 17, 13, 20, tzinfo=UTC)
    db.photos.insert_one(
        {
            "_id": "p-1",
            "location": {"type": "Point", "coordinates": [81.77, 25.43]},
            "takenAt": taken,
            "eventId": "evt-1",
            "source": {"partition": 0, "offset": 0},
        }
    )
    db.events.insert_one(
        {"_id": "evt-1", "photoCount": 1, "mergedInto": None, "manifestPending": True}
    )
    assert not caught_up(db), "a manifest still to write"
    db.events.update_one({"_id": "evt-1"}, {"$set": {"manifestPending": False}})
    db.events.update_one({"_id": "evt-1"}, {"$set": {"publishPending": True}})
    assert not caught_up(db), "an event update still to publish"
    db.events.update_one({"_id": "evt-1"}, {"$set": {"publishPending": False}})
    db.pending_links.insert_one({"_id": "p-1", "eventId": "evt-1", "token": 1})
    assert not caught_up(db), "a link still to apply"
    db.pending_links.delete_one({"_id": "p-1"})
    assert caught_up(db)
    db.photos.update_one({"_id": "p-1"}, {"$set": {"eventId": None}})
    assert not caught_up(db), "a photo without its event"


def test_the_summary_counts_retired_events_apart_from_live_ones_and_tombstones(mongo):
    """An event whose photos were all dead-lettered is retired (photoCount 0, no mergedInto):
    neither live nor a tombstone, and the summary says how many there are."""
    db = mongo.db()
    db.events.insert_many(
        [
            {"_id": "evt-live", "photoCount": 2, "mergedInto": None},
            {"_id": "evt-old", "photoCount": 0, "mergedInto": "evt-live"},
            {"_id": "evt-retired", "photoCount": 0, "mergedInto": None},
        ]
    )
    summary = collect_summary(db, collect_stats(db))
    assert {k: summary["events"][k] for k in ("live", "tombstones", "retired")} == {
        "live": 1,
        "tombstones": 1,
        "retired": 1,
    }
    assert "retired (their photos dead-lettered)" in render_summary(summary | {"database": "t"})
