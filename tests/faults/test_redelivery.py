"""The same messages delivered twice, out of order, in shuffled batches, then replayed from an
old offset: the final state is the one canonical pass over the photos, whatever the order.

One late photo is taken a minute before the first photo of an event that is already stored:
the event must move to its canonical id and the old document become a tombstone pointing at it.
"""

from __future__ import annotations

import json
import random

import pytest
from dagster import instance_for_test

from snapmap_pipeline.clustering import event_id_for
from tests.faults.conftest import assert_end_state, changed, committed, request_key
from tests.integration.pipeline import Harness, live_events, photo_events, publish, upload

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


def scene() -> dict[str, bytes]:
    """A concert (16 photos), a market 300 m away (8), a lone photo, by photo id."""
    photos = {}
    for i in range(16):
        photos[f"concert-{i:02d}"] = upload(
            f"concert-{i:02d}", f"2026-07-04T21:{i:02d}:00Z", 2.1734 + (i % 4) * 3e-5, 41.3851
        )
    for i in range(8):
        photos[f"market-{i}"] = upload(
            f"market-{i}", f"2026-07-04T21:{i * 2:02d}:30Z", 2.1770, 41.3860 + (i % 2) * 3e-5
        )
    photos["lone"] = upload("lone", "2026-07-04T23:00:00Z", 2.2000, 41.4000)
    return photos


def test_duplicates_shuffles_and_replay_equal_one_canonical_pass(
    resources, settings, kafka, mongo, blob
):
    photos = scene()
    late = upload("concert-early", "2026-07-04T20:59:00Z", 2.17342, 41.38501)
    rng = random.Random(20260704)
    shuffled = list(photos.values())
    rng.shuffle(shuffled)
    # Partition 2 holds the concert's first photos, partition 1 the rest plus duplicates of
    # half of everything, partition 0 the late photo (executed last) and more duplicates.
    concert_start = [photos[f"concert-{i:02d}"] for i in range(4)]
    rest = [v for v in shuffled if v not in concert_start]
    publish(kafka, settings.uploads_topic, concert_start, partition=2)
    publish(kafka, settings.uploads_topic, rest + shuffled[::2], partition=1)
    publish(kafka, settings.uploads_topic, [late, *shuffled[1::3], *concert_start], partition=0)

    small = changed(settings, max_messages_per_run=20)
    db = mongo.db()
    with instance_for_test() as instance:
        harness = Harness(instance, {**resources, "settings": small})
        requests = harness.tick()
        assert len(requests) == 4
        # Newest ranges first: every partition's commit waits for its first range.
        for request in reversed(requests):
            assert harness.execute(request).success
        assert harness.tick() == []

        first_event = event_id_for("concert-00")
        tombstone = db.events.find_one({"_id": first_event})
        assert tombstone["mergedInto"] == event_id_for("concert-early")
        assert photo_events(db)["concert-00"] == event_id_for("concert-early")
        settled = (photo_events(db), {k: v["version"] for k, v in live_events(db).items()})

        # Replay partition 1 from an old offset: the operator rewinds the group and the sensor
        # (to an offset inside an earlier range: identical ranges would be identical run keys,
        # which the daemon never launches twice; docs/operator-guide.md says so).
        cursor = json.loads(harness.cursor)
        cursor["1"] = 15
        harness.cursor = json.dumps(cursor)
        kafka.commit_offset(settings.uploads_topic, 1, 15)
        replays = harness.drain()
        end = len(rest) + len(shuffled[::2])
        assert [request_key(r) for r in replays] == [(1, 15, end - 1)]

    assert (photo_events(db), {k: v["version"] for k, v in live_events(db).items()}) == settled
    assert committed(kafka, settings.uploads_topic) == {
        0: 1 + len(shuffled[1::3]) + 4,
        1: end,
        2: 4,
    }
    assert len(photo_events(db)) == len(photos) + 1
    assert_end_state(kafka, db, blob, small)
