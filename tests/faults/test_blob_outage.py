"""Azurite (Blob Storage) is unavailable while a run writes its event manifests.

An Azure outage must never stop ingestion: the run succeeds and commits, the manifests stay
pending (``manifestPending``), and once storage is back the next run writes them, with the
content of the event as it is then. The sweeper's storage checks meet the same outage: they
report the service unreachable after the first failed connection instead of waiting out every
sampled photo or manifest, and never take an unanswered check for a missing blob.
"""

from __future__ import annotations

import json
import time

import pytest
from dagster import AssetCheckSeverity, instance_for_test

from snapmap_pipeline.clustering import ClusterParams
from snapmap_pipeline.definitions import build_definitions
from snapmap_pipeline.jobs import SWEEPER_JOB_NAME
from snapmap_pipeline.resources.blob import BlobStorageResource
from snapmap_pipeline.store.events import apply_pending_links
from snapmap_pipeline.store.outbox import write_pending_manifests
from snapmap_pipeline.store.recluster import recluster
from tests.faults.conftest import assert_end_state, changed, committed, stopped
from tests.integration.pipeline import Harness, live_events, publish, upload
from tests.integration.sweeper_data import backend_photo, evaluations

pytestmark = [pytest.mark.faults, pytest.mark.storage]


def manifests(blob: BlobStorageResource) -> dict[str, dict]:
    with blob.service() as client:
        container = client.get_container_client(blob.manifest_container)
        return {
            item.name.removesuffix(".json"): json.loads(
                container.download_blob(item.name).readall()
            )
            for item in container.list_blobs()
        }


def test_manifests_stay_pending_until_storage_is_back(resources, settings, kafka, mongo, blob):
    first = [
        upload(f"a-{i}", f"2026-05-01T18:0{i}:00Z", -3.7038 + i * 1e-5, 40.4168) for i in range(6)
    ]
    second = [upload("b-0", "2026-05-01T21:00:00Z", -3.6900, 40.4300)]
    publish(kafka, settings.uploads_topic, first, partition=0)
    db = mongo.db()
    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        with stopped("azurite"):
            (request,) = harness.tick()
            began = time.monotonic()
            result = harness.execute(request)
            assert result.success
            # The resource's default retries give up on a refused connection in seconds (the
            # storage SDK's own defaults held every run about 80 s).
            assert time.monotonic() - began < 60
            assert committed(kafka, settings.uploads_topic) == {0: len(first)}
            pending = {d["_id"] for d in db.events.find({"manifestPending": True})}
            assert pending == set(live_events(db))
            outbox = result.asset_materializations_for_node("event_updates")[0].metadata
            assert outbox["manifests_pending"].value == len(pending)
            assert outbox["manifests_written"].value == 0

        publish(kafka, settings.uploads_topic, second, partition=0)
        (later,) = harness.tick()
        assert harness.execute(later).success

    assert db.events.count_documents({"manifestPending": True}) == 0
    written = manifests(blob)
    events = live_events(db)
    assert set(written) == set(events)
    for event_id, event in events.items():
        members = {p["_id"] for p in db.photos.find({"eventId": event_id})}
        assert {p["photoId"] for p in written[event_id]["photos"]} == members
        assert written[event_id]["version"] == event["version"]
    assert_end_state(kafka, db, blob, settings)


SAMPLE = 50


def swept_with_azurite_stopped(job, instance, check_name: str):
    """Run the sweeper job with Azurite stopped; it must succeed within 60 s, and the check
    named must fail with a warning that says Blob Storage is unreachable. Returns its result."""
    with stopped("azurite"):
        began = time.monotonic()
        result = job.execute_in_process(instance=instance)
        took = time.monotonic() - began
        assert result.success, "an unreachable storage must not fail the sweeper"
        check = evaluations(result)[check_name]
    assert took < 60, f"the sweep took {took:.0f} s with Blob Storage down"
    assert not check.passed
    assert check.severity == AssetCheckSeverity.WARN
    assert "Blob Storage unreachable" in check.description
    assert check.metadata["storage_unreachable"].value is True
    return check


def test_storage_check_stops_at_an_unreachable_service_and_reports_it(
    resources, settings, mongo, blob
):
    """The sweeper's storage check with the resource's default retries, Azurite down and a full
    sample of 50 photos: one failed connection ends the sample within a minute, the check warns
    that storage is unreachable, nothing is marked missing and the sweeper run succeeds. Once
    Azurite is back the same check finds every blob."""
    db = mongo.db()
    container = f"photos-{blob.manifest_container}"
    photos = [
        backend_photo(
            f"s-{i:02d}",
            f"2026-05-02T10:{i:02d}:00Z",
            -3.70 + i * 0.01,
            40.41,
            uploaded_minutes_ago=1,  # not an orphan yet: the sweep heals nothing
            storage_url=f"azure://{container}/s-{i:02d}.jpg",
        )
        for i in range(SAMPLE)
    ]
    db.photos.insert_many(photos)
    with blob.service() as client:
        client.create_container(container)
        for photo in photos:
            client.get_blob_client(container, f"{photo['_id']}.jpg").upload_blob(b"jpeg")
    resources = {**resources, "settings": changed(settings, storage_sample_size=SAMPLE)}
    job = build_definitions(resources).resolve_job_def(SWEEPER_JOB_NAME)

    try:
        with instance_for_test() as instance:
            check = swept_with_azurite_stopped(job, instance, "storage_urls_exist")
            assert check.metadata["not_checked"].value == SAMPLE
            assert check.metadata["missing"].value == 0
            assert db.photos.count_documents({"blobStatus": {"$exists": True}}) == 0

            check = evaluations(job.execute_in_process(instance=instance))["storage_urls_exist"]
            assert check.passed, check.description
            assert check.metadata["present"].value == SAMPLE
            assert check.metadata["storage_unreachable"].value is False
    finally:
        with blob.service() as client:
            client.delete_container(container)


def test_manifest_check_reports_an_unreachable_service_and_repairs_nothing(
    resources, settings, mongo, blob
):
    """The sweeper's manifest check with Azurite down: the sweeper run succeeds, the check warns
    that storage is unreachable, no manifest is counted missing and no event is made pending
    (its recorded digest is kept). With Azurite back the same check finds every manifest."""
    db = mongo.db()
    db.photos.insert_many(
        [
            backend_photo(f"m-{i}", f"2026-05-03T10:0{i}:00Z", -3.70 + i * 0.01, 40.41)
            for i in range(4)
        ]
    )
    recluster(db, [f"m-{i}" for i in range(4)], ClusterParams())
    while apply_pending_links(db)[1]:
        pass
    assert write_pending_manifests(db, blob).manifests_pending == 0
    recorded = {e["_id"]: e["manifestSha256"] for e in db.events.find()}
    assert len(recorded) == 4
    job = build_definitions(resources).resolve_job_def(SWEEPER_JOB_NAME)

    with instance_for_test() as instance:
        check = swept_with_azurite_stopped(job, instance, "event_manifests_exist")
        assert check.metadata["not_checked"].value == len(recorded)
        assert check.metadata["missing"].value == 0
        assert check.metadata["repaired"].value == 0
        assert db.events.count_documents({"manifestPending": True}) == 0
        assert {e["_id"]: e["manifestSha256"] for e in db.events.find()} == recorded

        check = evaluations(job.execute_in_process(instance=instance))["event_manifests_exist"]
    assert check.passed, check.description
    assert check.metadata["present"].value == len(recorded)
