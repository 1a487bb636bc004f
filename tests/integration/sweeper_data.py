"""Photos written straight into MongoDB, as the upload backend does when its Kafka message never
arrives, and read-back helpers for the sweeper, backfill and command tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dagster import AssetCheckEvaluation, DagsterInstance, materialize

from snapmap_pipeline.assets.backfill import daily_events
from snapmap_pipeline.clustering import ClusterParams, ClusterResult, canonical_pass
from snapmap_pipeline.store.photos import to_point
from tests.conftest import ROOT, stack_setting


def at(moment: str) -> datetime:
    return datetime.fromisoformat(moment).astimezone(UTC)


def backend_photo(
    photo_id: str,
    taken_at: str,
    lon: float,
    lat: float,
    uploaded_minutes_ago: float = 60.0,
    storage_url: str | None = None,
) -> dict:
    """A ``photos`` document as the upload backend writes it: no cell, no source, no event."""
    return {
        "_id": photo_id,
        "location": {"type": "Point", "coordinates": [lon, lat]},
        "takenAt": at(taken_at),
        "uploadedAt": datetime.now(UTC) - timedelta(minutes=uploaded_minutes_ago),
        "storageUrl": storage_url or f"azure://photos/{photo_id}.jpg",
        "eventId": None,
    }


def three_days() -> list[dict]:
    """Three days of photos in one town: a lunch each day, a party that crosses midnight from
    June 6 to June 7 (one event), a pair that crosses June 5 to 6, and lone photos."""
    photos = []
    for day in ("05", "06", "07"):
        for i in range(4):
            photos.append(
                backend_photo(
                    f"lunch-{day}-{i}", f"2026-06-{day}T12:0{i}:00Z", 2.3522 + i * 1e-5, 48.8566
                )
            )
        photos.append(backend_photo(f"lone-{day}", f"2026-06-{day}T08:00:00Z", 2.30, 48.80))
    party = [
        "2026-06-06T23:52:00Z",
        "2026-06-06T23:56:30Z",
        "2026-06-06T23:59:59Z",
        "2026-06-07T00:03:00Z",
        "2026-06-07T00:07:30Z",
        "2026-06-07T00:11:00Z",
    ]
    for i, moment in enumerate(party):
        photos.append(backend_photo(f"party-{i}", moment, 2.3700 + i * 2e-5, 48.8700))
    photos.append(backend_photo("late-0", "2026-06-05T23:58:00Z", 2.3400, 48.8600))
    photos.append(backend_photo("late-1", "2026-06-06T00:01:00Z", 2.34001, 48.8600))
    return photos


def canonical(db, params: ClusterParams | None = None) -> ClusterResult:
    """One canonical pass over every photo stored: the oracle of reclustering."""
    return canonical_pass([to_point(d) for d in db.photos.find({})], params or ClusterParams())


def backfill(
    instance: DagsterInstance, resources: dict, days: Iterable[str], chunk_size: int = 50_000
) -> list:
    """Materialise ``daily_events`` for each day, in the given order, one run per day."""
    results = []
    for day in days:
        result = materialize(
            [daily_events],
            partition_key=day,
            resources=resources,
            instance=instance,
            run_config={"ops": {"daily_events": {"config": {"chunk_size": chunk_size}}}},
        )
        assert result.success
        results.append(result)
    return results


def stored_state(db, ignore_photo_fields: Sequence[str] = ()) -> tuple[list[dict], list[dict]]:
    """Photos and events as stored, minus the events' write times (``updatedAt``) and the
    photo fields named."""
    photos = [
        {k: v for k, v in d.items() if k not in ignore_photo_fields}
        for d in db.photos.find({}).sort("_id", 1)
    ]
    events = [
        {k: v for k, v in d.items() if k != "updatedAt"} for d in db.events.find({}).sort("_id", 1)
    ]
    return photos, events


def evaluations(result) -> dict[str, AssetCheckEvaluation]:
    """Check evaluations of a run, by check name."""
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def cli_env(database: str, **extra: str) -> dict[str, str]:
    """The environment `scripts/env.sh` gives the command, pointed at a test's database."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": stack_setting("KAFKA_BOOTSTRAP_SERVERS"),
        "MONGODB_URI": stack_setting("MONGODB_URI"),
        "AZURE_STORAGE_CONNECTION_STRING": stack_setting("AZURE_STORAGE_CONNECTION_STRING"),
        "MONGODB_DATABASE": database,
        "MONGODB_WRITE_CONCERN": "1",
        "SNAPMAP_CONSUMER_GROUP": "snapmap-pipeline",
        "SNAPMAP_UPLOADS_TOPIC": "photo-uploads",
        "SNAPMAP_DEAD_LETTER_TOPIC": "photo-uploads.dlq",
        "SNAPMAP_EVENT_UPDATES_TOPIC": "event-updates",
        "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
        "AZURE_STORAGE_ACCOUNT_URL": "",
        "AZURE_STORAGE_SAS": "",
    }
    for name in ("MECHANISM", "USERNAME", "PASSWORD"):
        env[f"KAFKA_SASL_{name}"] = ""
    env["KAFKA_SSL_CA_LOCATION"] = ""
    env.update(extra)
    return env


def snapmap(args: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the ``snapmap`` console script that ``make setup`` installs beside this Python."""
    command = Path(sys.executable).with_name("snapmap")
    assert command.is_file(), f"{command} is missing: install the project (make setup)"
    return subprocess.run(
        [str(command), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
