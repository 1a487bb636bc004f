"""What every pipeline benchmark shares: the machine record, isolated resources on the local
stack, a seeded upload stream, medians."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pymongo import MongoClient, UpdateOne

from snapmap_pipeline.resources.blob import BlobStorageResource
from snapmap_pipeline.resources.kafka import KafkaResource
from snapmap_pipeline.resources.mongo import MongoResource
from snapmap_pipeline.settings import PipelineSettings
from snapmap_pipeline.simulator.generator import StreamConfig, UploadRecord, generate_stream

ROOT = Path(__file__).resolve().parents[2]
UPLOAD_PARTITIONS = 3
# The simulated day ends here; takenAt values fall in the 24 hours before.
DAY_END = datetime(2026, 1, 18, tzinfo=UTC)


def machine() -> dict:
    """Cores, memory, load, date and versions: printed next to every figure."""
    with open("/proc/meminfo") as meminfo:
        total_kb = int(meminfo.readline().split()[1])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "memory_gib": round(total_kb / 2**20, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "commit": commit,
    }


def peak_rss_mb() -> float:
    """This process's own peak resident size in MB (``VmHWM``). Not ``ru_maxrss``: Linux keeps
    the high-water mark of the memory a child shared with its parent at fork, across exec, so a
    spawned child's ``ru_maxrss`` is never below what its parent held when it started."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        sys.exit(f"{name} is not set: run `source scripts/env.sh` for the bench stack first")
    return value


@dataclass
class Stack:
    """Isolated names on the local stack for one benchmark run."""

    resources: dict
    topics: dict[str, int]

    @property
    def kafka(self) -> KafkaResource:
        return self.resources["kafka"]

    @property
    def mongo(self) -> MongoResource:
        return self.resources["mongo"]

    @property
    def settings(self) -> PipelineSettings:
        return self.resources["settings"]


@contextmanager
def isolated_stack(
    max_messages_per_run: int = 5000, keep: bool = False, tag: str | None = None
) -> Iterator[Stack]:
    """Fresh topics, database, container and consumer group, removed on exit unless ``keep``;
    or, given the ``tag`` of a kept run, that run's."""
    tag = tag or uuid.uuid4().hex[:8]
    settings = PipelineSettings(
        uploads_topic=f"bench-uploads-{tag}",
        dead_letter_topic=f"bench-uploads-{tag}.dlq",
        event_updates_topic=f"bench-event-updates-{tag}",
        max_messages_per_run=max_messages_per_run,
    )
    kafka = KafkaResource(
        bootstrap_servers=env("KAFKA_BOOTSTRAP_SERVERS"),
        consumer_group=f"bench-{tag}",
        timeout_s=30.0,
    )
    mongo = MongoResource(uri=env("MONGODB_URI"), database=f"bench_{tag}", write_concern="1")
    blob = BlobStorageResource(
        connection_string=env("AZURE_STORAGE_CONNECTION_STRING"),
        manifest_container=f"bench-manifests-{tag}",
    )
    topics = {
        settings.uploads_topic: UPLOAD_PARTITIONS,
        settings.dead_letter_topic: 1,
        settings.event_updates_topic: 3,
    }
    kafka.ensure_topics(topics)
    stack = Stack({"kafka": kafka, "mongo": mongo, "blob": blob, "settings": settings}, topics)
    try:
        yield stack
    finally:
        if not keep:
            _remove(stack)


def _remove(stack: Stack) -> None:
    admin = stack.kafka.admin()
    for future in admin.delete_topics(list(stack.topics), operation_timeout=30).values():
        try:
            future.result(timeout=30)
        except Exception as error:  # a broker that went away leaves the topic; say so
            print(f"topic not deleted: {error}", file=sys.stderr)
    client = MongoClient(stack.mongo.uri, serverSelectionTimeoutMS=10_000)
    client.drop_database(stack.mongo.database)
    client.close()
    blob = stack.resources["blob"]
    try:
        with blob.service() as service:
            service.delete_container(blob.manifest_container)
    except Exception as error:  # no manifests were written, or Azurite is down
        print(f"container not deleted: {str(error).splitlines()[0][:120]}", file=sys.stderr)


def upload_records(photos: int, seed: int) -> list[UploadRecord]:
    """The simulator's seeded day: published records only (lost photos are never sent)."""
    config = StreamConfig(end=DAY_END, photos=photos, seed=seed)
    return [r for r in generate_stream(config) if r.is_published]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def emit(name: str, result: dict) -> None:
    """Print the result and keep a copy under bench/results/ (ignored by nothing: review it)."""
    document = {"bench": name, **result}
    text = json.dumps(document, indent=2, default=str)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    (out / f"{name}-{stamp}.json").write_text(text + "\n")


def event_upserts(result) -> list[UpdateOne]:
    """The event documents of a canonical pass as plain upserts: the ceiling's event writes."""
    return [
        UpdateOne(
            {"_id": e.event_id},
            {
                "$set": {
                    "centroid": {"type": "Point", "coordinates": [e.lon, e.lat]},
                    "radiusM": e.radius_m,
                    "startAt": e.start_at,
                    "endAt": e.end_at,
                    "photoCount": e.photo_count,
                    "firstPhotoId": e.first_photo_id,
                    "version": 1,
                }
            },
            upsert=True,
        )
        for e in result.events.values()
    ]
