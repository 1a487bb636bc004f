"""A run whose worker died stays STARTED in Dagster's storage; with the partition's concurrency
limit of one, that would hold the partition's later batches in the queue forever. The product's
dagster.yaml turns run monitoring on and the ingest job carries a maximum runtime, so Dagster's
own monitoring fails such a run (and run retries take it from there)."""

from __future__ import annotations

import logging
import shutil
import time

import pytest
from dagster import DagsterInstance, DagsterRunStatus
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.test_utils import create_test_daemon_workspace_context
from dagster._core.workspace.load_target import ModuleTarget
from dagster._daemon.monitoring.run_monitoring import execute_run_monitoring_iteration

from snapmap_pipeline.definitions import defs
from snapmap_pipeline.jobs import INGEST_JOB_NAME, ingest_run_config
from snapmap_pipeline.resources.kafka import OffsetRange
from tests.conftest import ROOT

pytestmark = [pytest.mark.faults]


def test_ingest_runs_have_a_maximum_runtime_far_above_a_batch():
    tags = defs.resolve_job_def(INGEST_JOB_NAME).tags
    assert 600 <= float(tags["dagster/max_runtime"]) <= 7200


def test_monitoring_fails_a_started_run_whose_worker_is_gone(
    tmp_path, dagster_postgres_url, monkeypatch
):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", dagster_postgres_url)
    with DagsterInstance.get() as instance:
        assert instance.run_monitoring_enabled
        job = defs.resolve_job_def(INGEST_JOB_NAME)
        run = instance.create_run_for_job(
            job_def=job,
            run_config=ingest_run_config(OffsetRange("photo-uploads", 0, 0, 9)),
            tags={**job.tags, "snapmap/partition": "0"},
        )
        # Its worker started it an hour ago and then died: nothing will report the run's end.
        an_hour_ago = time.time() - 3600
        for event_type in (DagsterEventType.PIPELINE_STARTING, DagsterEventType.PIPELINE_START):
            instance.report_dagster_event(
                DagsterEvent(event_type.value, job_name=job.name), run.run_id, timestamp=an_hour_ago
            )
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED

        target = ModuleTarget(
            module_name="snapmap_pipeline.definitions",
            attribute="defs",
            working_directory=str(ROOT),
            location_name="snapmap",
        )
        with create_test_daemon_workspace_context(target, instance) as context:
            list(execute_run_monitoring_iteration(context, logging.getLogger(__name__)))
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
