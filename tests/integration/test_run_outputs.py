"""Runs hand step outputs over through their own directory: a run re-executed from failure after
another micro-batch ran in between still loads its own batch.

With an IO manager that stores an asset's output under the asset's name alone, the second run
overwrites the first one's batch; the re-executed step then records and commits the other
run's offsets, and the first batch is never recorded as applied.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
from dagster import (
    DagsterInstance,
    ReexecutionOptions,
    execute_job,
    instance_for_test,
    reconstructable,
)

from snapmap_pipeline.definitions import build_definitions
from snapmap_pipeline.jobs import INGEST_JOB_NAME
from snapmap_pipeline.resources.kafka import KafkaResource
from tests.integration.pipeline import Harness, photo_events, publish, resource_specs, upload
from tests.integration.test_ingestion import committed

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]

SPECS_VAR = "SNAPMAP_TEST_RUN_OUTPUT_RESOURCES"


class CommitRefusedWhileMarked(KafkaResource):
    """Fails the consumer-group commit while the marker file exists: the run's last step."""

    marker: str

    def commit_offset(self, topic: str, partition: int, offset: int) -> None:
        if Path(self.marker).exists():
            raise RuntimeError("commit refused while the test's marker exists")
        super().commit_offset(topic, partition, offset)


def ingest_job():
    """The ingest job with the resources the test put in the environment (for execute_job,
    which rebuilds the job from this module-level function)."""
    resources = {}
    for name, (path, fields) in json.loads(os.environ[SPECS_VAR]).items():
        module, _, cls = path.rpartition(".")
        resources[name] = getattr(importlib.import_module(module), cls)(**fields)
    return build_definitions(resources).resolve_job_def(INGEST_JOB_NAME)


def run(instance: DagsterInstance, request=None, reexecute_from: str | None = None):
    options = ReexecutionOptions.from_failure(reexecute_from, instance) if reexecute_from else None
    with execute_job(
        reconstructable(ingest_job),
        instance=instance,
        run_config=None if options else request.run_config,
        tags=None if options else request.tags,
        reexecution_options=options,
        raise_on_error=False,
    ) as result:
        return result.success, result.run_id


def test_run_reexecuted_from_failure_loads_its_own_batch(
    resources, settings, kafka, mongo, tmp_path, monkeypatch
):
    marker = tmp_path / "refuse-commit"
    failing = CommitRefusedWhileMarked(**kafka.model_dump(), marker=str(marker))
    specs = resource_specs({**resources, "kafka": failing})
    as_paths = {name: (f"{c.__module__}.{c.__qualname__}", f) for name, (c, f) in specs.items()}
    monkeypatch.setenv(SPECS_VAR, json.dumps(as_paths))
    # Two micro-batches far apart (so their clustering is independent), one per partition.
    for partition, lon in ((0, 13.40), (1, 2.35)):
        values = [
            upload(f"p{partition}-{i}", f"2026-05-01T12:0{i}:00Z", lon + i * 1e-4, 48.85)
            for i in range(4)
        ]
        publish(kafka, settings.uploads_topic, values, partition=partition)

    with instance_for_test() as instance:
        requests = {r.tags["snapmap/partition"]: r for r in Harness(instance, resources).tick()}
        assert set(requests) == {"0", "1"}, requests

        marker.touch()
        first_ok, first_id = run(instance, requests["0"])
        assert not first_ok, "the commit step should have failed while the marker exists"
        marker.unlink()
        assert run(instance, requests["1"])[0]
        assert run(instance, reexecute_from=first_id)[0]

    db = mongo.db()
    applied = {d["_id"] for d in db.batches.find({"status": "applied"})}
    assert applied == {requests[p].run_key for p in ("0", "1")}
    group = committed(kafka, settings.uploads_topic)
    assert (group.get(0), group.get(1), group.get(2, 0)) == (4, 4, 0), group
    assert all(event for event in photo_events(db).values()), photo_events(db)
