"""The Dagster daemon is SIGKILLed while a backfill of ``daily_events`` is half done, then
started again.

Everything is real: a Dagster instance on the stack's PostgreSQL (a database of its own) with
the product's ``dagster.yaml`` (queued run coordinator, run retries), the product's code
location (``workspace.yaml``, resources wired through ``EnvVar`` to the test's own database and
topics), the backfill launched with the UI's ``launchPartitionBackfill`` GraphQL mutation, and a
``dagster-daemon run`` process that this test starts, kills by its PID and starts again. Photos
of several days, with events crossing midnight, are stored as the upload backend stores them.

After the restart the backfill must finish on its own: every day materialized, a day run twice
never to a different result (the later run changes no event), and the events equal one
canonical pass over the photos, with no duplicate event.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.execution.backfill import BulkActionStatus

from snapmap_pipeline.resources.blob import BlobStorageResource
from tests.conftest import ROOT, stack_setting
from tests.faults.conftest import assert_canonical
from tests.integration.sweeper_data import backend_photo, cli_env

pytestmark = [pytest.mark.faults, pytest.mark.sweeper, pytest.mark.slow]

DAYS = [f"2026-03-{day:02d}" for day in range(1, 9)]
BACKFILL_TIMEOUT_S = 600
# Terminal states of a backfill (FAILING and CANCELING still have runs in flight).
FINISHED = {
    BulkActionStatus.COMPLETED_SUCCESS,
    BulkActionStatus.COMPLETED_FAILED,
    BulkActionStatus.FAILED,
    BulkActionStatus.CANCELED,
}
LAUNCH_BACKFILL = """
mutation($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on PartitionKeysNotFoundError { message }
  }
}
"""


def history() -> list[dict]:
    """Eight days in one city: per day a morning market (12 photos), a lunch (6) and a lone
    photo; a party from each evening past midnight into the next day (8); and a pair split by
    midnight. Uploaded a minute ago, so the sweeper never takes them for orphans."""
    photos = []

    def add(photo_id: str, taken_at: str, lon: float, lat: float) -> None:
        photos.append(backend_photo(photo_id, taken_at, lon, lat, uploaded_minutes_ago=1))

    for day in DAYS:
        d = day[-2:]
        for i in range(12):
            add(f"market-{d}-{i}", f"{day}T09:{i * 2:02d}:00Z", 2.3522 + i * 1e-5, 48.8566)
        for i in range(6):
            add(f"lunch-{d}-{i}", f"{day}T12:{i:02d}:30Z", 2.3600, 48.8600 + i * 1e-5)
        add(f"lone-{d}", f"{day}T16:00:00Z", 2.30 + int(d) * 0.01, 48.80)
        if day != DAYS[-1]:
            following = f"2026-03-{int(d) + 1:02d}"
            for i in range(4):
                add(f"party-{d}-{i}", f"{day}T23:{46 + i * 4:02d}:00Z", 2.3700 + i * 2e-5, 48.87)
            for i in range(4):
                add(f"party-{d}-{4 + i}", f"{following}T00:{i * 4:02d}:00Z", 2.3701, 48.87)
            add(f"pair-{d}-0", f"{day}T23:58:00Z", 2.3400, 48.8600)
            add(f"pair-{d}-1", f"{following}T00:01:00Z", 2.34001, 48.8600)
    return photos


@contextmanager
def dagster_home(tmp_path: Path, postgres_url: str, database: str, settings) -> Iterator[dict]:
    """A DAGSTER_HOME with the product's dagster.yaml, and the environment of every Dagster
    process of the test (the product's EnvVar wiring pointed at the test's database/topics)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = cli_env(
        database,
        DAGSTER_HOME=str(home),
        DAGSTER_POSTGRES_URL=postgres_url,
        SNAPMAP_UPLOADS_TOPIC=settings.uploads_topic,
        SNAPMAP_DEAD_LETTER_TOPIC=settings.dead_letter_topic,
        SNAPMAP_EVENT_UPDATES_TOPIC=settings.event_updates_topic,
        SNAPMAP_CONSUMER_GROUP=f"snapmap-{database}",
    )
    yield env


class Daemon:
    """A ``dagster-daemon run`` process of this test, in a session of its own, so that what it
    started (code server, run workers) can be ended with it at the end of the test."""

    def __init__(self, env: dict, log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).with_name("dagster-daemon")), "run"],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.process.pid

    def crash(self) -> None:
        """SIGKILL the daemon itself, by PID; what it launched is left running, as after a
        crash of the daemon's process."""
        os.kill(self.pid, signal.SIGKILL)
        assert self.process.wait(30) == -signal.SIGKILL

    def end_session(self) -> None:
        """At the end of the test: end every process left in this daemon's session."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.process.poll() is None:
            self.process.wait(30)


def launch_backfill(env: dict, tmp_path: Path) -> str:
    """The mutation the UI sends for "Materialize" over a range of partitions of one asset."""
    variables = {
        "backfillParams": {
            "assetSelection": [{"path": ["daily_events"]}],
            "partitionNames": DAYS,
            "fromFailure": False,
        }
    }
    output = tmp_path / "backfill.json"
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("dagster-graphql")),
            "-w",
            str(ROOT / "workspace.yaml"),
            "-t",
            LAUNCH_BACKFILL,
            "-v",
            json.dumps(variables),
            "-o",
            str(output),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(output.read_text())["data"]["launchPartitionBackfill"]
    assert answer["__typename"] == "LaunchBackfillSuccess", answer
    return answer["backfillId"]


def backfill_run_records(instance: DagsterInstance, backfill_id: str) -> list:
    return list(instance.get_run_records(RunsFilter(tags={"dagster/backfill": backfill_id})))


def recluster_changes(instance: DagsterInstance, run_id: str) -> dict[str, int]:
    """Events created, changed and tombstoned by the ``daily_events`` run ``run_id``."""
    (materialization,) = [
        e.dagster_event.step_materialization_data.materialization
        for e in instance.all_logs(run_id)
        if e.dagster_event and e.dagster_event.is_step_materialization
    ]
    return {
        name: materialization.metadata[name].value
        for name in ("events_created", "events_changed", "events_tombstoned")
    }


def materialized_days(instance: DagsterInstance) -> set[str]:
    return set(instance.get_materialized_partitions(AssetKey("daily_events")))


def wait_for(condition, timeout_s: float, what: str, daemon: Daemon) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert daemon.process.poll() is None, f"the daemon exited; see {daemon.log}"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; see {daemon.log}")
        time.sleep(0.2)


def test_daemon_killed_mid_backfill_then_restarted(
    tmp_path, monkeypatch, mongo, kafka, settings, dagster_postgres_url
):
    db = mongo.db()
    db.photos.insert_many(history())
    with dagster_home(tmp_path, dagster_postgres_url, mongo.database, settings) as env:
        for name in ("DAGSTER_HOME", "DAGSTER_POSTGRES_URL"):
            monkeypatch.setenv(name, env[name])
        instance = DagsterInstance.get()
        daemons: list[Daemon] = []
        try:
            backfill_id = launch_backfill(env, tmp_path)
            daemons.append(Daemon(env, tmp_path / "daemon-1.log"))
            half = len(DAYS) // 2
            wait_for(
                lambda: len(materialized_days(instance)) >= half,
                BACKFILL_TIMEOUT_S,
                f"{half} days materialized",
                daemons[0],
            )
            daemons[0].crash()
            done_at_kill = materialized_days(instance)
            at_kill = Counter(
                r.dagster_run.status.value for r in backfill_run_records(instance, backfill_id)
            )
            assert len(done_at_kill) < len(DAYS), "the backfill finished before the kill"

            daemons.append(Daemon(env, tmp_path / "daemon-2.log"))
            wait_for(
                lambda: instance.get_backfill(backfill_id).status in FINISHED,
                BACKFILL_TIMEOUT_S,
                "the backfill to finish",
                daemons[1],
            )
            backfill = instance.get_backfill(backfill_id)
            records = backfill_run_records(instance, backfill_id)
        finally:
            for daemon in daemons:
                daemon.end_session()

        statuses = Counter(r.dagster_run.status.value for r in records)
        # For the record of a run (pytest -rP): how far the backfill was when the daemon died.
        print(f"at the kill: {len(done_at_kill)} days materialized, runs {dict(at_kill)}")
        print(f"at the end: runs {dict(statuses)}")
        assert backfill.status == BulkActionStatus.COMPLETED_SUCCESS, (backfill.status, statuses)
        assert materialized_days(instance) == set(DAYS)

        # A day run more than once (a run relaunched after the crash) must have found nothing
        # to change the second time.
        by_day: dict[str, list[str]] = {}
        for record in sorted(records, key=lambda r: r.create_timestamp):
            if record.dagster_run.status == DagsterRunStatus.SUCCESS:
                by_day.setdefault(record.dagster_run.tags["dagster/partition"], []).append(
                    record.dagster_run.run_id
                )
        assert set(by_day) == set(DAYS), statuses
        for day, run_ids in by_day.items():
            for later in run_ids[1:]:
                changes = recluster_changes(instance, later)
                assert not any(changes.values()), (day, later, changes)
        instance.dispose()

    assert_canonical(db, settings.cluster_params())
    _delete_manifests(db)


def _delete_manifests(db) -> None:
    """The product writes manifests to its default container: remove this test's."""
    blob = BlobStorageResource(connection_string=stack_setting("AZURE_STORAGE_CONNECTION_STRING"))
    with blob.service() as client:
        container = client.get_container_client(blob.manifest_container)
        for event in db.events.find({}, {"_id": 1}):
            try:
                container.delete_blob(f"{event['_id']}.json")
            except Exception:  # noqa: BLE001 - a tombstone has no manifest
                pass
