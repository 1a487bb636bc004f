"""Fault tests: the integration fixtures (own topics, database and container per test on the
real local stack), plus what every fault test checks at its end.

``stopped(NAME)`` stops one server of the shared local stack for the length of a ``with``
block and always starts it again, so a failing test never leaves the stack broken for others.
``assert_end_state`` checks the pipeline's promise after a fault: every offset of the uploads
topic is applied (its photo has a live event), dead-lettered with its reason, or lost to
retention where the test says so, and the group has committed the end of every partition; and
the events equal one canonical pass over the applied photos, with no duplicate events and no
double counts.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from dagster import RunRequest

from snapmap_pipeline.assets.ingest import published_at
from snapmap_pipeline.cli import account_partition
from snapmap_pipeline.clustering import ClusterParams, canonical_pass
from snapmap_pipeline.contract.validation import InvalidUpload, validate_upload
from snapmap_pipeline.resources.blob import BlobStorageResource
from snapmap_pipeline.resources.kafka import KafkaResource, KafkaUnavailable, OffsetRange
from snapmap_pipeline.settings import PipelineSettings
from snapmap_pipeline.store.photos import to_point
from tests.conftest import ROOT
from tests.integration.conftest import *  # noqa: F403
from tests.integration.pipeline import live_events, photo_events
from tests.integration.test_ingestion import changed, committed  # noqa: F401 - for tests

STACK = ROOT / "scripts" / "stack"
SOURCE_HEADERS = ("topic", "partition", "offset")


def stack(*args: str, timeout: float = 300.0) -> str:
    """Run ``scripts/stack ARGS``; returns its output, fails the test when it fails."""
    done = subprocess.run(
        [str(STACK), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"scripts/stack {' '.join(args)} failed: {done.stderr or done.stdout}")
    return done.stdout


def service_up(name: str, within_s: float = 60.0) -> bool:
    """Whether the server is up, asked again for ``within_s``: on a loaded machine a server
    restarted by the previous test can take a while to answer its readiness request."""
    deadline = time.monotonic() + within_s
    while True:
        done = subprocess.run(
            [str(STACK), "status", "--only", name], capture_output=True, text=True, timeout=60
        )
        if done.returncode == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(2)


@contextmanager
def stopped(name: str, now: bool = True) -> Iterator[None]:
    """Stop one server of the local stack inside the block (at once, or later by the test when
    ``now`` is false); it is always started again when the block ends."""
    if not service_up(name):
        pytest.fail(f"{name} is not up before the fault test; run scripts/stack up")
    try:
        if now:
            stack("stop", name)
        yield
    finally:
        start(name)


def start(name: str) -> None:
    """Start a stopped server and wait until it answers.

    Retried for up to 5 minutes: a loaded machine can make a restart slow (Kafka reloading
    many partitions), and a later test must never find the shared stack down.
    """
    deadline = time.monotonic() + 300
    while True:
        try:
            stack("start", name)
            return
        except (RuntimeError, subprocess.TimeoutExpired):
            if time.monotonic() > deadline:
                raise
            time.sleep(10)


def wait_for_group_coordinator(kafka: KafkaResource, topic: str, timeout_s: float = 60) -> None:
    """Wait until the restarted broker answers committed-offset requests.

    ``scripts/stack start kafka`` itself waits for a group coordinator, and
    ``KafkaResource.committed`` retries coordinator errors for ``coordinator_retry_s``; this
    wait keeps the outage test's own checks independent of both."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            committed(kafka, topic)
            return
        except KafkaUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def read_all(kafka: KafkaResource, topic: str) -> list:
    """Every message still in ``topic`` (all partitions, offset order per partition)."""
    messages = []
    with kafka.consumer() as consumer:
        partitions = kafka.partitions(consumer, topic)
        marks = {p: kafka.watermarks(consumer, topic, p) for p in partitions}
    for partition, mark in marks.items():
        if mark.high > mark.low:
            read, _ = kafka.read_range(OffsetRange(topic, partition, mark.low, mark.high - 1))
            messages += read
    return messages


def request_key(request: RunRequest) -> tuple[int, int, int]:
    config = request.run_config["ops"]["photo_uploads"]["config"]
    return config["partition"], config["first_offset"], config["last_offset"]


def error_classes(result) -> list[str]:
    """Class names of the step failures of a run and of their causes, outermost first."""
    names = []
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        while error is not None:
            names.append(error.cls_name)
            error = error.cause
    return names


def assert_end_state(
    kafka: KafkaResource,
    db,
    blob: BlobStorageResource,
    settings: PipelineSettings,
    *,
    lost: dict[int, tuple[int, int]] | None = None,
) -> None:
    """The state the pipeline promises after any fault, once the runs it was asked for are done.

    ``lost``: first and last offset, per partition, that the test deleted by retention before
    a run read them: they must be below the low watermark and passed by the commit.
    """
    lost = lost or {}
    topic = settings.uploads_topic
    with kafka.consumer() as consumer:
        partitions = kafka.partitions(consumer, topic)
        marks = {p: kafka.watermarks(consumer, topic, p) for p in partitions}
        group = kafka.committed(consumer, topic, partitions)
    for partition, mark in marks.items():
        # The product's own accounting (`snapmap accounting`): no offset below the committed
        # one outside an applied batch, no photo of an applied batch without an event.
        account = account_partition(db, topic, partition, mark.low, mark.high, group.get(partition))
        assert account.ok, account
        assert group.get(partition, 0) == mark.high, (partition, group, marks)
        if partition in lost:
            # Deleted before any run read them: below the low watermark now, and passed.
            assert mark.low > lost[partition][1]
            assert group[partition] > lost[partition][1]

    policy = blob.url_policy()
    photos = {d["_id"]: d for d in db.photos.find({})}
    letters = {d["_id"]: d for d in db.dead_letters.find({})}
    for message in read_all(kafka, topic):
        partition, offset = message.partition(), message.offset()
        source = f"{topic}/{partition}/{offset}"
        try:
            upload = validate_upload(message.value(), policy, published_at(message))
        except InvalidUpload as invalid:
            assert source in letters, f"{source} is invalid ({invalid.code}) but not dead-lettered"
            assert letters[source]["code"] == invalid.code
            assert letters[source]["reason"]
            continue
        photo = photos.get(upload.photo_id)
        assert photo is not None, f"{source}: photo {upload.photo_id} was never stored"
        if photo.get("deadLettered"):
            assert f"{topic}/{photo['source']['partition']}/{photo['source']['offset']}" in letters
        else:
            assert photo.get("eventId"), f"{source}: photo {upload.photo_id} has no event"
    sent = Counter(
        "/".join(dict(m.headers())[f"snapmap.source.{k}"].decode() for k in SOURCE_HEADERS)
        for m in read_all(kafka, settings.dead_letter_topic)
    )
    assert all(n == 1 for n in sent.values()), f"dead letters sent more than once: {sent}"
    assert set(sent) == set(letters)

    assert_canonical(db, settings.cluster_params())


def assert_canonical(db, params: ClusterParams) -> None:
    """Events and links equal one canonical pass over the applied photos: no duplicate event,
    every photo in exactly one live event (a dead-lettered one in none), every count right,
    tombstones resolving to a live or a retired event."""
    applied = list(db.photos.find({"deadLettered": {"$ne": True}}))
    expected = canonical_pass([to_point(d) for d in applied], params)
    assignment = photo_events(db)
    for photo_id in [d["_id"] for d in db.photos.find({"deadLettered": True})]:
        assert assignment.pop(photo_id) is None, f"dead-lettered {photo_id} holds an event"
    assert assignment == expected.assignment

    live = live_events(db)
    assert set(live) == set(expected.events), "live events differ from the canonical pass"
    members = Counter(assignment.values())
    for event_id, doc in live.items():
        event = expected.events[event_id]
        assert doc["photoCount"] == event.photo_count == members[event_id], event_id
        assert (doc["startAt"], doc["endAt"]) == (event.start_at, event.end_at), event_id
        assert doc["firstPhotoId"] == event.first_photo_id
    assert db.pending_links.count_documents({}) == 0, "link decisions left unapplied"
    for tombstone in db.events.find({"mergedInto": {"$ne": None}}):
        target = tombstone["mergedInto"]
        while target is not None and target not in live:  # None: a retired event ends it
            target = db.events.find_one({"_id": target})["mergedInto"]
        assert tombstone["photoCount"] == 0


def event_updates_by_event(kafka: KafkaResource, topic: str) -> dict[str, list[int]]:
    """Versions announced on ``event-updates`` per event id, in the order they were sent."""
    versions: dict[str, list[int]] = {}
    for message in read_all(kafka, topic):
        body = json.loads(message.value())
        versions.setdefault(body["eventId"], []).append(body["version"])
    return versions
