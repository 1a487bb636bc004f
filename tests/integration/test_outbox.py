"""The manifest outbox on the real MongoDB-compatible server and Azurite: one request per
manifest written, none for a manifest whose content has not changed, and a rewrite when it
has. Requests are counted by the storage SDK's request hook, on the wire to Azurite."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from azure.storage.blob import BlobServiceClient
from pydantic import PrivateAttr
from pymongo import MongoClient, monitoring

from snapmap_pipeline.clustering import ClusterParams, PhotoPoint, canonical_pass, diff
from snapmap_pipeline.resources.blob import BlobStorageResource
from snapmap_pipeline.store.events import load_stored_events, write_events
from snapmap_pipeline.store.lease import held_lease
from snapmap_pipeline.store.outbox import BATCH, MANIFESTS_LEASE_ID, write_pending_manifests
from tests.conftest import stack_setting

pytestmark = pytest.mark.storage

T0 = datetime(2026, 5, 1, 18, 0, tzinfo=UTC)
PARAMS = ClusterParams()


class CountedBlob(BlobStorageResource):
    """The Blob resource with every HTTP request its clients send recorded as
    ``(method, blob path)`` (retries included)."""

    _requests: list[tuple[str, str]] = PrivateAttr(default_factory=list)

    @property
    def requests(self) -> list[tuple[str, str]]:
        return self._requests

    @contextmanager
    def service(self, **client_options) -> Iterator[BlobServiceClient]:
        with super().service(raw_request_hook=self._record, **client_options) as client:
            yield client

    def _record(self, request) -> None:
        url = request.http_request.url.split("?", 1)[0]
        self._requests.append((request.http_request.method, url.rsplit("/", 1)[-1]))


def photo(photo_id: str, minutes: int, lon: float, lat: float) -> PhotoPoint:
    return PhotoPoint(photo_id, T0 + timedelta(minutes=minutes), lon, lat)


def store(db, photos: list[PhotoPoint]) -> dict[str, str]:
    """Cluster ``photos`` against the stored events, write the events and the photos' links
    as the pipeline leaves them; returns each photo's event id."""
    result = canonical_pass(photos, PARAMS)
    stored = load_stored_events(db, result.events)
    ids = [p.photo_id for p in photos]
    links = dict.fromkeys(ids) | {
        d["_id"]: d["eventId"] for d in db.photos.find({"_id": {"$in": ids}}, {"eventId": 1})
    }
    write_events(db, diff(result, stored, links), stored, PARAMS)
    for p in photos:
        db.photos.update_one(
            {"_id": p.photo_id},
            {
                "$set": {
                    "takenAt": p.taken_at,
                    "storageUrl": f"azure://photos/{p.photo_id}.jpg",
                    "eventId": result.assignment[p.photo_id],
                }
            },
            upsert=True,
        )
    return result.assignment


def blob_state(blob: BlobStorageResource, event_id: str) -> tuple[str, dict]:
    """The blob's etag and its JSON content, read with a client of its own."""
    with BlobStorageResource(
        connection_string=blob.connection_string, manifest_container=blob.manifest_container
    ).service() as client:
        stored = client.get_blob_client(blob.manifest_container, f"{event_id}.json")
        download = stored.download_blob()
        return download.properties.etag, json.loads(download.readall())


@pytest.fixture
def counted(blob: BlobStorageResource) -> Iterator[CountedBlob]:
    resource = CountedBlob(
        connection_string=blob.connection_string, manifest_container=blob.manifest_container
    )
    with resource.service() as client:
        resource.ensure_container(client)
    resource.requests.clear()
    yield resource
    with blob.service() as client:
        client.delete_container(blob.manifest_container)


def test_each_new_manifest_costs_one_request(mongo, counted):
    db = mongo.db()
    assignment = store(
        db,
        [photo("a-0", 0, -3.7038, 40.4168), photo("a-1", 1, -3.7038, 40.4168)]
        + [photo("b-0", 0, 2.3522, 48.8566)],
    )
    events = sorted(set(assignment.values()))
    assert len(events) == 2

    report = write_pending_manifests(db, counted)

    assert report.manifests_written == 2
    assert report.manifests_pending == 0
    assert sorted(counted.requests) == [("PUT", f"{e}.json") for e in events]
    for event_id in events:
        _etag, manifest = blob_state(counted, event_id)
        members = sorted(p for p, e in assignment.items() if e == event_id)
        assert sorted(p["photoId"] for p in manifest["photos"]) == members
        document = db.events.find_one({"_id": event_id})
        assert document["manifestPending"] is False
        assert len(document["manifestSha256"]) == 64


def test_an_unchanged_manifest_is_not_sent_and_a_changed_one_is_rewritten(mongo, counted):
    db = mongo.db()
    madrid = [photo("a-0", 0, -3.7038, 40.4168)]
    paris = [photo("b-0", 0, 2.3522, 48.8566)]
    assignment = store(db, madrid + paris)
    unchanged_id, changed_id = assignment["a-0"], assignment["b-0"]
    write_pending_manifests(db, counted)
    unchanged_etag, _ = blob_state(counted, unchanged_id)
    changed_etag, before = blob_state(counted, changed_id)
    counted.requests.clear()

    # A second pass over both: the Madrid event is pending again with the same content (as
    # after a replay); the Paris event grew a photo.
    db.events.update_one({"_id": unchanged_id}, {"$set": {"manifestPending": True}})
    store(db, paris + [photo("b-1", 2, 2.3522, 48.8566)])
    assert db.events.find_one({"_id": changed_id})["manifestPending"] is True

    report = write_pending_manifests(db, counted)

    assert (report.manifests_written, report.manifests_unchanged) == (1, 1)
    assert report.manifests_pending == 0
    assert counted.requests == [("PUT", f"{changed_id}.json")]
    assert blob_state(counted, unchanged_id)[0] == unchanged_etag
    etag, after = blob_state(counted, changed_id)
    assert etag != changed_etag
    assert after["version"] == before["version"] + 1
    assert [p["photoId"] for p in after["photos"]] == ["b-0", "b-1"]


def test_an_upload_whose_digest_was_not_recorded_is_written_again(mongo, counted):
    """The state a crash leaves between the upload and the MongoDB write that clears
    ``manifestPending``: the blob holds the content, the event is still pending without the
    digest. The next pass writes the same content again, once, and clears the flag."""
    db = mongo.db()
    (event_id,) = set(store(db, [photo("a-0", 0, -3.7038, 40.4168)]).values())
    write_pending_manifests(db, counted)
    _etag, first = blob_state(counted, event_id)
    db.events.update_one(
        {"_id": event_id}, {"$set": {"manifestPending": True}, "$unset": {"manifestSha256": ""}}
    )
    counted.requests.clear()

    report = write_pending_manifests(db, counted)

    assert report.manifests_written == 1
    assert counted.requests == [("PUT", f"{event_id}.json")]
    assert blob_state(counted, event_id)[1] == first
    document = db.events.find_one({"_id": event_id})
    assert document["manifestPending"] is False
    assert "manifestSha256" in document


class GatedBlob(BlobStorageResource):
    """The Blob resource whose uploads wait at a gate until the test opens it."""

    _entered: threading.Event = PrivateAttr(default_factory=threading.Event)
    _gate: threading.Event = PrivateAttr(default_factory=threading.Event)

    def upload_manifest(self, client, event_id, body, digest) -> None:
        self._entered.set()
        assert self._gate.wait(60), "the test never opened the gate"
        super().upload_manifest(client, event_id, body, digest)


def test_a_pass_that_read_an_older_version_never_overwrites_a_later_pass(mongo, counted):
    """Pass A reads version 1 of an event and stalls in its upload; the event gets a second
    photo (version 2) and pass B starts. Without one pass at a time, B uploaded version 2 and
    A then overwrote it with version 1, while the event was marked written."""
    db = mongo.db()
    (event_id,) = set(store(db, [photo("a-0", 0, -3.7038, 40.4168)]).values())
    slow = GatedBlob(
        connection_string=counted.connection_string,
        manifest_container=counted.manifest_container,
    )
    reports: dict[str, object] = {}
    first = threading.Thread(target=lambda: reports.update(a=write_pending_manifests(db, slow)))
    first.start()
    try:
        assert slow._entered.wait(60)
        assert set(
            store(
                db, [photo("a-0", 0, -3.7038, 40.4168), photo("a-1", 1, -3.7038, 40.4168)]
            ).values()
        ) == {event_id}
        assert db.events.find_one({"_id": event_id})["version"] == 2
        second = threading.Thread(
            target=lambda: reports.update(b=write_pending_manifests(db, counted))
        )
        second.start()
        second.join(5)  # without the lease, B is done by now
    finally:
        slow._gate.set()
        first.join(60)
    second.join(60)

    assert reports["a"].manifests_written == 1 and reports["b"].manifests_written == 1
    _etag, manifest = blob_state(counted, event_id)
    assert manifest["version"] == 2
    assert [p["photoId"] for p in manifest["photos"]] == ["a-0", "a-1"]
    assert db.events.find_one({"_id": event_id})["manifestPending"] is False


def test_events_waiting_for_links_never_hide_the_settled_ones_behind_them(mongo, counted):
    """A pass reads at most ``limit`` events. When the first ``limit`` pending events (in id
    order) all had link decisions queued, the pass wrote nothing, however many others were
    settled."""
    db = mongo.db()
    places = [photo(f"p-{i}", 0, -3.7 + i, 40.4) for i in range(6)]
    events = sorted(set(store(db, places).values()))
    assert len(events) == 6
    for event_id in events[:4]:
        db.pending_links.insert_one({"_id": f"queued-for-{event_id}", "eventId": event_id})

    report = write_pending_manifests(db, counted, limit=2)

    assert report.manifests_written == 2
    assert report.manifests_waiting_for_links == 4
    assert sorted(name for _method, name in counted.requests) == [f"{e}.json" for e in events[4:]]
    assert report.manifests_pending == 4


class ReturnedIds(monitoring.CommandListener):
    """The ``_id`` of every document a client's reads get back, by collection."""

    def __init__(self) -> None:
        self.ids: dict[str, list] = {}

    def started(self, event) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        cursor = event.reply.get("cursor")
        if cursor:
            documents = cursor.get("firstBatch", cursor.get("nextBatch", []))
            collection = cursor["ns"].split(".", 1)[1]
            self.ids.setdefault(collection, []).extend(d.get("_id") for d in documents)

    def failed(self, event) -> None:
        pass


def test_a_pass_asks_the_queue_only_about_the_events_it_writes(mongo, counted):
    """After a backfill the queue can hold hundreds of thousands of link decisions. A pass
    asks it only about the events it is about to write: links queued between other events
    neither hold back an unrelated event's manifest nor come back to the pass, nor do the
    photos they move."""
    db = mongo.db()
    madrid = [photo("a-0", 0, -3.7038, 40.4168), photo("a-1", 1, -3.7038, 40.4168)]
    (event_id,) = set(store(db, madrid).values())
    queued = [f"q-{i:05d}" for i in range(2 * BATCH + 10)]
    db.photos.insert_many([{"_id": q, "eventId": f"other-{i % 7}"} for i, q in enumerate(queued)])
    db.pending_links.insert_many(
        [{"_id": q, "eventId": f"other-{(i + 1) % 7}", "token": 1} for i, q in enumerate(queued)]
    )

    returned = ReturnedIds()
    client = MongoClient(
        stack_setting("MONGODB_URI"), event_listeners=[returned], w=1, tz_aware=True
    )
    try:
        report = write_pending_manifests(client[mongo.database], counted)
    finally:
        client.close()

    assert report.manifests_written == 1 and report.manifests_waiting_for_links == 0
    assert counted.requests == [("PUT", f"{event_id}.json")]
    assert returned.ids.get("pending_links", []) == []
    assert sorted(returned.ids["photos"]) == ["a-0", "a-1"]
    assert db.pending_links.count_documents({}) == len(queued)


def test_an_event_a_queued_link_takes_a_photo_out_of_is_held_back(mongo, counted):
    """A queued link moves a photo out of a pending event to an event whose manifest is
    written: the album of the event the photo leaves would still list it, so that event
    waits, and the others are written."""
    db = mongo.db()
    places = [photo("a-0", 0, -3.7038, 40.4168), photo("a-1", 1, -3.7038, 40.4168)]
    assignment = store(db, places + [photo("b-0", 0, 2.3522, 48.8566)])
    leaving, settled = assignment["a-0"], assignment["b-0"]
    db.pending_links.insert_one({"_id": "a-1", "eventId": "written-elsewhere", "token": 1})

    report = write_pending_manifests(db, counted)

    assert report.manifests_written == 1 and report.manifests_waiting_for_links == 1
    assert counted.requests == [("PUT", f"{settled}.json")]
    assert db.events.find_one({"_id": leaving})["manifestPending"] is True


def test_a_pass_that_cannot_get_the_lease_writes_nothing_and_says_so(mongo, counted):
    db = mongo.db()
    store(db, [photo("a-0", 0, -3.7038, 40.4168)])
    with held_lease(db, MANIFESTS_LEASE_ID):
        report = write_pending_manifests(db, counted, wait_s=0.5)
    assert report.busy and report.manifests_written == 0 and report.manifests_pending == 1
    assert counted.requests == []
