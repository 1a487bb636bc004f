"""The data layer on the real MongoDB-compatible server and Azurite: indexes, conditional
writes that lose cleanly, idempotent manifests."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from snapmap_pipeline.clustering import ClusterParams, PhotoPoint, canonical_pass, diff
from snapmap_pipeline.store.events import WriteConflict, load_stored_events, write_events
from snapmap_pipeline.store.schema import ensure_schema

pytestmark = pytest.mark.storage


def test_indexes_exist_after_start_and_geo_gap_is_one_plain_line(mongo, caplog):
    """cases.md #11: the bootstrap creates every index, 2dsphere on both GeoJSON fields."""
    db = mongo.db()
    # A server without geo queries may still answer them on an empty collection.
    db.photos.insert_one({"_id": "g", "location": {"type": "Point", "coordinates": [1.0, 2.0]}})
    db.events.insert_one({"_id": "e", "centroid": {"type": "Point", "coordinates": [1.0, 2.0]}})
    caplog.set_level(logging.WARNING, logger="snapmap_pipeline.store.schema")
    geo = ensure_schema(db)

    photo_keys = [dict(i["key"]) for i in db.photos.list_indexes()]
    event_keys = [dict(i["key"]) for i in db.events.list_indexes()]
    for wanted in (
        {"cell": 1, "takenAt": 1},
        {"takenAt": 1, "_id": 1},
        {"uploadedAt": 1},
        {"eventId": 1},
    ):
        assert wanted in photo_keys
    assert {"endAt": 1} in event_keys
    assert {"location": "2dsphere"} in photo_keys
    assert {"centroid": "2dsphere"} in event_keys
    lines = [r.getMessage() for r in caplog.records]
    refused = [collection for collection, served in geo.items() if not served]
    assert len(lines) == (1 if refused else 0)  # one line for every refused index
    for line in lines:
        assert "clustering does not need them" in line
        assert all(f"{collection}." in line for collection in refused)


def test_a_concurrent_writer_on_the_same_event_loses_cleanly(mongo):
    db = mongo.db()
    params = ClusterParams()
    taken = datetime(2026, 1, 17, 13, 20, tzinfo=UTC)
    photos = [PhotoPoint(f"w-{i}", taken, 81.77 + i * 1e-5, 25.43) for i in range(3)]
    first = canonical_pass(photos[:2], params)
    write_events(db, diff(first, {}, {}), {}, params)

    stored = load_stored_events(db, first.events)
    grown = canonical_pass(photos, params)
    changes = diff(grown, stored, dict.fromkeys(p.photo_id for p in photos[:2]))
    assert changes.changed
    write_events(db, changes, stored, params)  # the winner
    (event_id,) = first.events
    version = db.events.find_one({"_id": event_id})["version"]

    with pytest.raises(WriteConflict, match="changed under us"):
        write_events(db, changes, stored, params)  # the loser read version 1
    assert db.events.find_one({"_id": event_id})["version"] == version
    assert db.events.find_one({"_id": event_id})["photoCount"] == 3


def test_manifests_are_written_once_and_rewritten_only_on_change(mongo, blob):
    with blob.service() as client:
        blob.ensure_container(client)
        body = {"eventId": "ev-1", "photos": [{"photoId": "a"}]}
        assert blob.put_manifest(client, "ev-1", body) is True
        assert blob.put_manifest(client, "ev-1", body) is False
        assert blob.put_manifest(client, "ev-1", body | {"photoCount": 2}) is True
        stored = client.get_blob_client(blob.manifest_container, "ev-1.json")
        assert b'"photoCount":2' in stored.download_blob().readall()
        client.delete_container(blob.manifest_container)
