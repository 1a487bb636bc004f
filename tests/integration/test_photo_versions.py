"""A photo re-sent with changed content: the newest message wins whatever order the runs apply
them in, so a late run (or a replay of an old range) cannot bring back the old content."""

from __future__ import annotations

import json

import pytest
from dagster import instance_for_test

from tests.integration.pipeline import Harness, photo_events, upload

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.storage]

T0 = 1_777_640_400_000  # 2026-05-01T13:00Z: publish times (ms) of the two messages: T0, T0 + 60 s
OLD = (2.3500, 48.8500)  # where the first message put the photo
NEW = (2.3600, 48.8600)  # the correction, published a minute later


def produce(kafka, topic: str, partition: int, value: bytes, timestamp_ms: int) -> None:
    with kafka.producer() as producer:
        producer.produce(topic, value=value, partition=partition, timestamp=timestamp_ms)


@pytest.mark.parametrize("first_applied", ["newer", "older"])
def test_newest_message_about_a_photo_wins_in_any_run_order(
    first_applied, resources, settings, kafka, mongo
):
    topic = settings.uploads_topic
    taken = "2026-05-01T12:00:00Z"
    produce(kafka, topic, 0, upload("edited", taken, *OLD), T0)
    produce(kafka, topic, 1, upload("edited", taken, *NEW), T0 + 60_000)
    # A neighbour of each place, so each location has its own event.
    produce(kafka, topic, 2, upload("near-old", taken, OLD[0] + 1e-5, OLD[1]), T0)
    produce(kafka, topic, 2, upload("near-new", taken, NEW[0] + 1e-5, NEW[1]), T0)

    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        # A new topic's partitions can take a tick or two to show their messages.
        requests: dict = {}
        for _ in range(5):
            requests |= {r.tags["snapmap/partition"]: r for r in harness.tick()}
            if len(requests) == 3:
                break
        assert set(requests) == {"0", "1", "2"}
        order = ["1", "0"] if first_applied == "newer" else ["0", "1"]
        for partition in [*order, "2"]:
            harness.execute(requests[partition])
        harness.execute(requests["0"])  # a replay of the old range, last of all

    db = mongo.db()
    photo = db.photos.find_one({"_id": "edited"})
    assert tuple(photo["location"]["coordinates"]) == NEW, json.dumps(photo, default=str)
    events = photo_events(db)
    assert events["edited"] == events["near-new"] != events["near-old"], events


def test_a_new_storage_url_for_a_linked_photo_rewrites_its_events_manifest(
    resources, settings, kafka, mongo, blob
):
    """The URL does not move the photo, so no recluster changes its event; the album must
    still follow the newest message (found by the breaker: the old URL stayed for good)."""
    topic = settings.uploads_topic
    taken = "2026-05-01T12:00:00Z"
    produce(kafka, topic, 0, upload("shot", taken, *OLD), T0)
    produce(kafka, topic, 0, upload("shot-2", taken, OLD[0] + 1e-5, OLD[1]), T0)
    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        harness.drain()
        event_id = mongo.db().photos.find_one({"_id": "shot"})["eventId"]
        assert album_urls(blob, event_id)["shot"] == "azure://photos/shot.jpg"

        moved = json.loads(upload("shot", taken, *OLD))
        moved["storageUrl"] = "azure://photos/shot-reupload.jpg"
        produce(kafka, topic, 0, json.dumps(moved).encode(), T0 + 60_000)
        harness.drain()

    assert mongo.db().photos.find_one({"_id": "shot"})["eventId"] == event_id
    assert album_urls(blob, event_id)["shot"] == "azure://photos/shot-reupload.jpg"


def album_urls(blob, event_id: str) -> dict[str, str]:
    with blob.service() as client:
        stored = client.get_blob_client(blob.manifest_container, f"{event_id}.json")
        album = json.loads(stored.download_blob().readall())
    return {p["photoId"]: p["storageUrl"] for p in album["photos"]}
