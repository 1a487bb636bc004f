"""Kafka message to photo.eventId through the real sensor and real runs."""

from __future__ import annotations

import pytest
from dagster import instance_for_test

from snapmap_pipeline.clustering import ClusterParams, canonical_pass
from snapmap_pipeline.store.photos import to_point
from tests.integration.pipeline import Harness, groups, live_events, photo_events, publish, upload

pytestmark = pytest.mark.e2e


def wedding_and_dinner() -> list[bytes]:
    """A wedding of 12 photos within ~20 m over 11 minutes, a dinner 2 km away, and noise."""
    values = []
    for i in range(12):
        values.append(
            upload(f"wed-{i:02d}", f"2026-06-06T15:{i:02d}:00Z", 2.3522 + i * 1e-5, 48.8566)
        )
    for i in range(6):
        values.append(upload(f"din-{i}", f"2026-06-06T20:0{i}:30Z", 2.3700, 48.8700 + i * 1e-5))
    values.append(upload("lone-1", "2026-06-06T09:00:00Z", 2.30, 48.80))
    return values


def test_messages_become_events_and_offsets_commit(resources, settings, kafka, mongo):
    values = wedding_and_dinner()
    values.insert(5, b"{not json")
    values.insert(9, upload("oob-1", "2026-06-06T15:03:00Z", 190.0, 25.43))
    publish(kafka, settings.uploads_topic, values)

    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        requests = harness.drain()
    assert requests, "the sensor requested no run"

    db = mongo.db()
    assignment = photo_events(db)
    assert len(assignment) == 19
    assert all(assignment.values()), "every valid photo has an event"
    assert "oob-1" not in assignment

    points = [to_point(d) for d in db.photos.find({})]
    expected = canonical_pass(points, ClusterParams())
    assert groups(assignment) == groups(expected.assignment)
    assert assignment == expected.assignment
    assert set(live_events(db)) == set(expected.events)
    wedding = live_events(db)[assignment["wed-00"]]
    assert wedding["photoCount"] == 12

    letters = {d["_id"]: d for d in db.dead_letters.find({})}
    assert sorted(d["code"] for d in letters.values()) == ["not_json", "schema"]

    with kafka.consumer() as consumer:
        partitions = kafka.partitions(consumer, settings.uploads_topic)
        committed = kafka.committed(consumer, settings.uploads_topic, partitions)
        ends = {p: kafka.watermarks(consumer, settings.uploads_topic, p).high for p in partitions}
    assert committed == {p: end for p, end in ends.items() if end > 0}
    assert sum(ends.values()) == len(values)


def test_replayed_run_changes_nothing(resources, settings, kafka, mongo):
    publish(kafka, settings.uploads_topic, wedding_and_dinner(), partition=0)
    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        requests = harness.drain()
        db = mongo.db()
        before_photos = list(db.photos.find({}).sort("_id"))
        before_events = list(db.events.find({}).sort("_id"))
        for request in requests:
            harness.execute(request)
    after_photos = list(db.photos.find({}).sort("_id"))
    after_events = list(db.events.find({}).sort("_id"))
    assert after_photos == before_photos
    assert after_events == before_events
