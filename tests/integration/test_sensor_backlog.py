"""The sensor under a backlog and after failures, on the real broker and a Dagster instance:
a partition with enough unfinished runs gets no more until they finish (then one larger run),
and a range whose every run failed is requested again after its backoff, so the partition's
commit never stops for good."""

from __future__ import annotations

import time

import pytest
from dagster import (
    DagsterRunStatus,
    SensorResult,
    build_sensor_context,
    instance_for_test,
)
from dagster._core.events import DagsterEvent, DagsterEventType

from snapmap_pipeline.definitions import build_definitions
from snapmap_pipeline.jobs import INGEST_JOB_NAME
from snapmap_pipeline.resources.kafka import OffsetRange
from snapmap_pipeline.sensors.kafka_sensor import photo_uploads_sensor, run_request_for
from tests.integration.pipeline import Harness, photo_events, publish, upload
from tests.integration.test_ingestion import changed, committed

pytestmark = [pytest.mark.sensor, pytest.mark.kafka]


def tick(instance, resources, cursor=None):
    with build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        result = photo_uploads_sensor(context)
    if isinstance(result, SensorResult):
        return list(result.run_requests or []), result.cursor
    return [], context.cursor


def add_run(instance, resources, request, status=None, ended_s_ago=None):
    """A run of the ingest job for ``request`` as the daemon would record it; optionally
    ended (FAILURE) ``ended_s_ago`` seconds ago."""
    job = build_definitions(resources).resolve_job_def(INGEST_JOB_NAME)
    run = instance.create_run_for_job(
        job_def=job, run_config=request.run_config, tags={**job.tags, **request.tags}
    )
    if ended_s_ago is not None:
        at = time.time() - ended_s_ago
        for event_type in (
            DagsterEventType.PIPELINE_STARTING,
            DagsterEventType.PIPELINE_START,
            DagsterEventType.PIPELINE_FAILURE,
        ):
            instance.report_dagster_event(
                DagsterEvent(event_type.value, job_name=job.name), run.run_id, timestamp=at
            )
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
    return run


def test_busy_partition_waits_then_gets_one_larger_run(resources, settings, kafka):
    for partition in range(3):
        publish(kafka, settings.uploads_topic, [b"{}"] * 10, partition=partition)
    resources = {**resources, "settings": changed(settings, max_pending_runs_per_partition=2)}
    topic = settings.uploads_topic
    with instance_for_test() as instance:
        earlier = run_request_for(OffsetRange(topic, 0, 0, 4))
        pending = [add_run(instance, resources, earlier) for _ in range(2)]
        requests, cursor = tick(instance, resources)
        assert sorted(r.tags["snapmap/partition"] for r in requests) == ["1", "2"]

        publish(kafka, settings.uploads_topic, [b"{}"] * 5, partition=0)
        requests, cursor = tick(instance, resources, cursor)
        assert requests == []  # still busy: nothing new for partition 0, nothing elsewhere

        for run in pending:
            instance.delete_run(run.run_id)
        requests, _ = tick(instance, resources, cursor)
        assert [(r.tags["snapmap/partition"], r.tags["snapmap/offsets"]) for r in requests] == [
            ("0", "0-14")
        ]


def test_range_whose_runs_all_failed_is_requested_again_after_its_backoff(
    resources, settings, kafka, mongo
):
    publish(
        kafka,
        settings.uploads_topic,
        [upload(f"p{i}", f"2026-05-01T12:0{i}:00Z", 2.35 + i * 1e-5, 48.85) for i in range(4)],
        partition=0,
    )
    publish(kafka, settings.uploads_topic, [b"{}"], partition=1)
    resources = {**resources, "settings": changed(settings, heal_after_s=120.0)}
    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        first = {r.tags["snapmap/partition"]: r for r in harness.tick()}
        # Partition 0's run failed an hour ago (retries spent); partition 1's a moment ago.
        add_run(instance, resources, first["0"], ended_s_ago=3600)
        add_run(instance, resources, first["1"], ended_s_ago=5)

        heal = harness.tick()
        assert [(r.run_key, r.tags["snapmap/heal_attempt"]) for r in heal] == [
            (f"{first['0'].run_key}#heal1", "1")
        ]
        assert heal[0].run_config == first["0"].run_config
        assert [r.run_key for r in harness.tick()] == [heal[0].run_key]  # same key again

        harness.execute(heal[0])
        assert harness.tick() == []  # applied: nothing left to heal on partition 0
    assert committed(kafka, settings.uploads_topic).get(0) == 4
    assert all(photo_events(mongo.db()).values())
