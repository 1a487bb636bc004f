"""Randomized soak of the streaming path (issue 4): thousands of upload messages with exact
duplicates, photos re-sent later, photos uploaded late and malformed messages, published over
three partitions while sensor ticks, run executions (some side by side in other processes),
re-executions and a cursor rewind happen in a random order with small batch caps.

Afterwards every offset is accounted for and the events equal one canonical pass over the
applied photos (``assert_end_state``); and the same messages in a second random order, other
batch boundaries and a fresh database give the same events and links.

Everything random derives from one seed, printed at the start. A failure is replayed with
``SNAPMAP_SOAK_SEED=<seed> .venv/bin/python -m pytest tests/soak``; without the variable each
run draws a new seed.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

import pytest
from dagster import DagsterInstance, RunRequest

from snapmap_pipeline.contract.storage_url import StorageUrlPolicy
from snapmap_pipeline.contract.validation import InvalidUpload, validate_upload
from snapmap_pipeline.resources.kafka import KafkaResource
from snapmap_pipeline.settings import PipelineSettings
from snapmap_pipeline.simulator.generator import (
    Photo,
    RecordKind,
    StreamConfig,
    generate_stream,
    upload_message,
)
from tests.faults.conftest import assert_end_state, read_all, request_key
from tests.integration.pipeline import (
    Harness,
    execute_in_subprocess,
    live_events,
    photo_events,
    resource_specs,
)
from tests.integration.test_ingestion import changed

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SEED_VARIABLE = "SNAPMAP_SOAK_SEED"
PARTITIONS = 3
# The simulated day ends here (before the wall clock, so no photo is in the future).
END = datetime(2026, 6, 1, 18, 0, tzinfo=UTC)
PHOTOS = 2700
DUPLICATE_RATE = 0.04
MALFORMED_RATE = 0.02
RESENT_SHARE = 0.03
LATE_SHARE = 0.03
EXTRA_MALFORMED_SHARE = 0.025


@dataclass(frozen=True)
class SoakMessage:
    """One message to publish: what it is (for the summary) and its exact bytes."""

    kind: str
    value: bytes


def resent_form(photo: Photo, rng: random.Random) -> tuple[str, bytes]:
    """The same photo sent again: the same bytes, or the same content in another accepted form
    (other key order and spacing, the time in another UTC offset, an unknown extra field)."""
    form = rng.randrange(3)
    if form == 0:
        return "resent-same-bytes", upload_message(photo)
    zone = timezone(timedelta(hours=rng.choice([-7, 2, 5]), minutes=rng.choice([0, 30])))
    body = {
        "storageUrl": photo.storage_url,
        "location": [photo.lon, photo.lat],
        "timestamp": photo.taken_at.astimezone(zone).isoformat(timespec="milliseconds"),
        "photoId": photo.photo_id,
    }
    if form == 2:
        body["client"] = {"app": "android", "retry": rng.randint(1, 5)}
    return f"resent-form-{form}", json.dumps(body).encode()


def broken_copy(photo: Photo, rng: random.Random) -> tuple[str, bytes]:
    """A malformed message, most of them carrying the id of a real photo (a corrupted re-send
    must not touch the photo its valid message stored)."""
    body = json.loads(upload_message(photo))
    kind = rng.choice(
        [
            "truncated",
            "array",
            "empty",
            "not_utf8",
            "duplicate_key",
            "latitude_95",
            "month_13",
            "far_future",
            "before_2000",
            "operator_id",
            "sas_url",
            "string_location",
        ]
    )
    if kind == "truncated":
        whole = upload_message(photo)
        return kind, whole[: rng.randint(1, len(whole) - 1)]
    if kind == "array":
        return kind, json.dumps(list(body.values())).encode()
    if kind == "empty":
        return kind, b""
    if kind == "not_utf8":
        return kind, upload_message(photo).replace(b'"photoId":"', b'"photoId":"\xff', 1)
    if kind == "duplicate_key":
        return kind, upload_message(photo).replace(b"{", b'{"photoId":"other",', 1)
    if kind == "latitude_95":
        body["location"] = [photo.lon, 95.0]
    elif kind == "month_13":
        body["timestamp"] = body["timestamp"][:5] + "13" + body["timestamp"][7:]
    elif kind == "far_future":
        body["timestamp"] = "2999-01-01T00:00:00Z"
    elif kind == "before_2000":
        body["timestamp"] = "1999-12-31T23:59:59.999Z"
    elif kind == "operator_id":
        body["photoId"] = {"$ne": None}
    elif kind == "sas_url":
        body["storageUrl"] = f"{photo.storage_url}?sv=2024-01-01&sig=abc"
    elif kind == "string_location":
        body["location"] = [str(photo.lon), str(photo.lat)]
    return kind, json.dumps(body).encode()


def soak_messages(seed: int, photos: int = PHOTOS) -> list[SoakMessage]:
    """The messages of one soak in publish order: the simulator's day (its duplicates, late
    uploads and malformed kinds included), plus photos re-sent much later, photos moved later
    in the stream, and corrupted copies of real photos."""
    rng = random.Random(seed)
    config = StreamConfig(
        end=END,
        photos=photos,
        seed=seed,
        duplicate_rate=DUPLICATE_RATE,
        malformed_rate=MALFORMED_RATE,
        lost_rate=0.0,
    )
    records = [r for r in generate_stream(config) if r.is_published]
    placed: list[tuple[float, SoakMessage]] = []
    for index, record in enumerate(records):
        kind = record.kind.value
        if record.malformation is not None:
            kind = f"malformed-{record.malformation.value}"
        placed.append((float(index), SoakMessage(kind, record.value)))

    valid = [i for i, r in enumerate(records) if r.kind is RecordKind.VALID]
    chosen = rng.sample(valid, round(len(valid) * (RESENT_SHARE + LATE_SHARE)))
    resent, late = chosen[: len(chosen) // 2], chosen[len(chosen) // 2 :]
    for index in resent:
        kind, value = resent_form(records[index].photo, rng)
        placed.append((index + rng.uniform(100, 1500), SoakMessage(kind, value)))
    for index in late:
        # Published hundreds to thousands of messages (minutes to hours of the day) after its
        # neighbours in time; the simulator's own offline photos are days late.
        _, message = placed[index]
        placed[index] = (index + rng.uniform(300, 3000), SoakMessage("late", message.value))
    for _ in range(round(photos * EXTRA_MALFORMED_SHARE)):
        kind, value = broken_copy(records[rng.choice(valid)].photo, rng)
        placed.append((rng.uniform(0, len(records)), SoakMessage(f"malformed-{kind}", value)))
    placed.sort(key=lambda item: item[0])
    return [message for _, message in placed]


def check_messages(messages: list[SoakMessage], policy: StorageUrlPolicy) -> set[str]:
    """The builder's own promise: malformed messages are rejected, every other one is valid,
    and every message of one photo has the same content. Returns the photo ids."""
    published = END + timedelta(days=1)
    content: dict[str, tuple] = {}
    for message in messages:
        if message.kind.startswith("malformed"):
            with pytest.raises(InvalidUpload):
                validate_upload(message.value, policy, published)
            continue
        upload = validate_upload(message.value, policy, published)
        seen = content.setdefault(upload.photo_id, (upload.taken_at, upload.lon, upload.lat))
        assert seen == (upload.taken_at, upload.lon, upload.lat), upload.photo_id
    return set(content)


@dataclass
class Soak:
    """One random interleaving of publishing, ticks and run executions on one set of
    resources. With ``workers``, runs of different partitions execute side by side, one in this
    process and the others in the worker processes, as the deployment's queue allows (its
    ``snapmap/partition`` tag limit is 1: runs of one partition never overlap); without, one
    run at a time."""

    harness: Harness
    rng: random.Random
    workers: ProcessPoolExecutor | None = None
    pending: list[RunRequest] = field(default_factory=list)
    executed: list[RunRequest] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    @property
    def kafka(self) -> KafkaResource:
        return self.harness.resources["kafka"]

    @property
    def settings(self) -> PipelineSettings:
        return self.harness.resources["settings"]

    def publish(self, messages: list[SoakMessage]) -> None:
        with self.kafka.producer() as producer:
            for message in messages:
                partition = self.rng.randrange(PARTITIONS)
                producer.produce(
                    self.settings.uploads_topic, value=message.value, partition=partition
                )
                producer.poll(0)
        self.counts["published"] += len(messages)

    def tick(self) -> None:
        requests = self.harness.tick()
        self.counts["ticks"] += 1
        self.counts["requested"] += len(requests)
        self.pending += requests

    def execute_some(self, replay: bool = False) -> None:
        """Execute one request, or with workers up to three side by side (at most one per
        partition), picked at random among the pending ones (so the ranges of a partition run
        out of order), or among the executed ones when ``replay`` (a re-execution)."""
        source = self.executed if replay else self.pending
        by_partition: dict[int, list[RunRequest]] = {}
        for request in source:
            by_partition.setdefault(request_key(request)[0], []).append(request)
        width = self.rng.choice([1, 2, 2, 3]) if self.workers is not None else 1
        if self.workers is not None and not self.counts["side_by_side"]:
            # Runs side by side are what the soak is for: the first chance is always taken, so
            # no seed can draw a play without them (one did: 21 runs, all alone).
            width = max(width, 2)
        partitions = self.rng.sample(sorted(by_partition), min(width, len(by_partition)))
        group = [self.rng.choice(by_partition[p]) for p in partitions]
        if not group:
            return
        if not replay:
            for request in group:
                self.pending.remove(request)

        instance: DagsterInstance = self.harness.instance
        specs = resource_specs(self.harness.resources)
        futures: list[Future] = []
        if self.workers is not None:
            futures = [
                self.workers.submit(
                    execute_in_subprocess, instance.get_ref(), specs, r.run_config, r.tags
                )
                for r in group[1:]
            ]
        local = self.harness.execute(group[0])
        assert local.success, request_key(group[0])
        for request, future in zip(group[1:], futures, strict=True):
            assert future.result(timeout=600), request_key(request)
        self.counts["runs"] += len(group)
        self.counts["side_by_side"] += len(group) - 1
        if replay:
            self.counts["replays"] += len(group)
        else:
            self.executed += group

    def rewind(self) -> None:
        """The operator replays one partition from an offset inside a range already applied:
        the sensor's cursor and the group's committed offset go back to it."""
        candidates = [r for r in self.executed if request_key(r)[2] > request_key(r)[1]]
        if not candidates:
            return
        partition, first, last = request_key(self.rng.choice(candidates))
        offset = self.rng.randint(first + 1, last)
        cursor = json.loads(self.harness.cursor)
        cursor[str(partition)] = offset
        self.harness.cursor = json.dumps(cursor)
        self.kafka.commit_offset(self.settings.uploads_topic, partition, offset)
        self.counts["rewinds"] += 1

    def play(self, messages: list[SoakMessage], rewinds: int) -> None:
        """Publish ``messages`` in random chunks with ticks, executions, re-executions and
        ``rewinds`` cursor rewinds interleaved at random; then drain until the sensor has
        nothing new and every request was executed, and re-execute a few runs once more."""
        position = 0
        rewind_at = sorted(self.rng.uniform(0.3, 0.9) for _ in range(rewinds))
        while position < len(messages):
            draw = self.rng.random()
            if draw < 0.3:
                size = self.rng.randint(100, 600)
                self.publish(messages[position : position + size])
                position += size
            elif draw < 0.5:
                self.tick()
            elif draw < 0.55 and self.executed:
                self.execute_some(replay=True)
            elif self.pending:
                self.execute_some()
            if rewind_at and position / len(messages) >= rewind_at[0]:
                rewind_at.pop(0)
                self.rewind()
        self.drain()
        # Re-executions after everything was applied must change nothing either.
        for _ in range(2):
            self.execute_some(replay=True)

    def drain(self) -> None:
        """Tick and execute, in random order, until the sensor has nothing new."""
        for _ in range(200):
            self.tick()
            if not self.pending:
                return
            while self.pending:
                self.execute_some()
        raise AssertionError("the sensor kept requesting runs")


def events_summary(db) -> dict[str, tuple]:
    """Live events by id: member count, first photo, time span, centroid and radius (the last
    two rounded: the spherical mean sums members in storage order)."""
    return {
        event_id: (
            doc["photoCount"],
            doc["firstPhotoId"],
            doc["startAt"],
            doc["endAt"],
            tuple(round(c, 9) for c in doc["centroid"]["coordinates"]),
            round(doc["radiusM"], 4),
        )
        for event_id, doc in live_events(db).items()
    }


def dead_letters_sent(kafka: KafkaResource, topic: str) -> Counter:
    """Original bytes and error code of every message on the dead-letter topic."""
    return Counter(
        (m.value() or b"", dict(m.headers())["snapmap.error.code"].decode())
        for m in read_all(kafka, topic)
    )


@pytest.fixture
def seed() -> int:
    chosen = os.environ.get(SEED_VARIABLE)
    value = int(chosen) if chosen else secrets.randbelow(2**31)
    print(f"soak seed {value} (replay: {SEED_VARIABLE}={value})")
    return value


def test_random_interleaving_ends_in_the_canonical_pass_and_is_order_independent(
    seed, resources, settings, kafka, mongo, blob, postgres_instance, workers, second_resources
):
    started = time.monotonic()
    messages = soak_messages(seed)
    photo_ids = check_messages(messages, blob.url_policy())
    kinds = Counter(m.kind.split("-", 1)[0] for m in messages)
    print(f"{len(messages)} messages: {dict(sorted(kinds.items()))}")

    rng = random.Random(seed + 1)
    small = changed(
        settings, max_messages_per_run=rng.randint(120, 200), max_runs_per_tick=rng.randint(2, 5)
    )
    first = Soak(Harness(postgres_instance, {**resources, "settings": small}), rng, workers)
    first.play(messages, rewinds=1)
    print(f"first order ({small.max_messages_per_run}/run): {dict(first.counts)}")

    db = mongo.db()
    assert_end_state(kafka, db, blob, small)
    assert {d["_id"] for d in db.photos.find({}, {"_id": 1})} == photo_ids
    assert first.counts["side_by_side"] > 0

    # The same messages in another random order over the partitions, with other batch
    # boundaries, in a fresh database, executed one run at a time: the same events and links.
    other = second_resources
    bigger = changed(other["settings"], max_messages_per_run=rng.randint(700, 1200))
    second = Soak(Harness(postgres_instance, {**other, "settings": bigger}), rng)
    second.publish(rng.sample(messages, len(messages)))
    second.drain()
    print(f"second order ({bigger.max_messages_per_run}/run): {dict(second.counts)}")

    other_db = other["mongo"].db()
    assert_end_state(other["kafka"], other_db, other["blob"], bigger)
    assert photo_events(other_db) == photo_events(db)
    assert events_summary(other_db) == events_summary(db)
    assert dead_letters_sent(other["kafka"], bigger.dead_letter_topic) == dead_letters_sent(
        kafka, small.dead_letter_topic
    )
    print(f"soak seed {seed}: {time.monotonic() - started:.0f} s")
