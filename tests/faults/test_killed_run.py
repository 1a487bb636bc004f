"""The run's process is SIGKILLed after its writes but before the consumer group's commit, then
the same run request is executed again.

The child process runs the real job (``execute_in_subprocess``) with a Kafka resource whose
commit waits at a gate, so the kill always lands before the offset moves. It is killed twice:
once as soon as events exist (links or publishing under way), once at the commit itself (every
write done, the batch recorded as applied). The re-executed run must leave no duplicate event,
no double count, each dead letter sent once, and commit the offset once.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
from dagster import instance_for_test
from pymongo import MongoClient

from snapmap_pipeline.resources.kafka import KafkaResource
from tests.faults.conftest import (
    assert_end_state,
    committed,
    event_updates_by_event,
)
from tests.integration.pipeline import (
    Harness,
    execute_in_subprocess,
    live_events,
    publish,
    resource_specs,
    upload,
)

pytestmark = [pytest.mark.faults, pytest.mark.kafka, pytest.mark.storage, pytest.mark.slow]


class CommitGate(KafkaResource):
    """Announces that the run reached its commit (a file), then holds it until killed."""

    gate: str

    def commit_offset(self, topic: str, partition: int, next_offset: int) -> None:
        Path(self.gate).write_text(f"{topic}/{partition}@{next_offset}")
        time.sleep(300)
        raise AssertionError("the test should have killed this run at its commit")


def execute_after(go: str, *args) -> bool:
    """Child process: imports done (spawn imports this module first), wait for ``go`` to exist,
    then execute the run. Lets the next child load while the previous one runs."""
    while not Path(go).exists():
        time.sleep(0.05)
    return execute_in_subprocess(*args)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wedding(count: int) -> list[bytes]:
    return [
        upload(
            f"w-{i:03d}",
            f"2026-06-20T16:{i // 3:02d}:{(i % 3) * 20:02d}Z",
            -9.1393 + (i % 4) * 2e-5,
            38.7223 + (i % 5) * 2e-5,
        )
        for i in range(count)
    ]


def test_killed_before_commit_then_rerun(
    resources, settings, kafka, mongo, blob, dagster_postgres_url, tmp_path
):
    values = wedding(40)
    values[13:13] = [b"{half a message", upload("late-oob", "2026-06-20T16:05:00Z", 200, 0)]
    values += [upload("dinner", "2026-06-20T21:00:00Z", -9.1500, 38.7100)]
    publish(kafka, settings.uploads_topic, values, partition=0)
    db = mongo.db()
    watcher = MongoClient(mongo.uri, serverSelectionTimeoutMS=5000)[mongo.database]

    overrides = {"storage": {"postgres": {"postgres_url": dagster_postgres_url}}}
    spawn = multiprocessing.get_context("spawn")
    with instance_for_test(overrides=overrides) as instance:
        harness = Harness(instance, resources)
        (request,) = harness.tick()

        def child(gate: Path, go: Path):
            gated = CommitGate(**kafka.model_dump(), gate=str(gate))
            specs = resource_specs({**resources, "kafka": gated})
            args = (str(go), instance.get_ref(), specs, request.run_config, request.tags)
            process = spawn.Process(target=execute_after, args=args, daemon=True)
            process.start()
            return process

        def lease_free() -> bool:
            lease = watcher.leases.find_one({"_id": "clustering"}) or {}
            return lease.get("holder") is None

        # Both children start now; the second loads while the first runs, and runs when the
        # first was killed.
        first = child(tmp_path / "gate-1", tmp_path / "go-1")
        gate = tmp_path / "gate-2"
        second = child(gate, tmp_path / "go-2")
        try:
            # Kill 1: events are written and the clustering lease is released; links, event
            # updates and manifests may or may not be done.
            (tmp_path / "go-1").touch()
            wait_for(
                lambda: watcher.events.count_documents({}) > 0 and lease_free(),
                120,
                "events written by the first child",
            )
            first.kill()
            first.join(30)
            assert first.exitcode == -9
            assert committed(kafka, settings.uploads_topic) == {}

            # Kill 2: every write is done and the batch is recorded; the commit is next.
            (tmp_path / "go-2").touch()
            wait_for(gate.exists, 120, "the second child's commit")
            second.kill()
            second.join(30)
            assert second.exitcode == -9
        finally:
            for process in (first, second):
                if process.is_alive():
                    process.kill()
                    process.join(30)
        assert committed(kafka, settings.uploads_topic) == {}
        assert db.batches.count_documents({"status": "applied"}) == 1
        events_before_rerun = sorted(db.events.find({}), key=lambda e: e["_id"])

        result = harness.execute(request)
        assert result.success
        commit = result.asset_materializations_for_node("consumer_offsets")[0].metadata
        assert commit["committed_offset"].value == len(values)

    assert committed(kafka, settings.uploads_topic) == {0: len(values)}
    # The rerun found everything applied: no event changed, nothing was published again.
    assert sorted(db.events.find({}), key=lambda e: e["_id"]) == events_before_rerun
    assert_end_state(kafka, db, blob, settings)
    assert db.dead_letters.count_documents({}) == 2
    announced = event_updates_by_event(kafka, settings.event_updates_topic)
    for event_id, event in live_events(db).items():
        assert announced[event_id][-1] == event["version"]
    watcher.client.close()
