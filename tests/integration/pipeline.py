"""Drive the real pipeline from tests: publish uploads, tick the real sensor, execute the runs it
requests on a Dagster test instance, and read back what the database holds."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dagster import DagsterInstance, RunRequest, SensorResult, build_sensor_context

from snapmap_pipeline.definitions import build_definitions
from snapmap_pipeline.jobs import INGEST_JOB_NAME
from snapmap_pipeline.resources.kafka import KafkaResource
from snapmap_pipeline.sensors.kafka_sensor import photo_uploads_sensor
from snapmap_pipeline.store.events import LIVE_EVENTS


def upload(photo_id: str, taken_at: str, lon: float, lat: float, **extra) -> bytes:
    body = {
        "photoId": photo_id,
        "timestamp": taken_at,
        "location": [lon, lat],
        "storageUrl": f"azure://photos/{photo_id}.jpg",
        **extra,
    }
    return json.dumps(body).encode()


def publish(
    kafka: KafkaResource, topic: str, values: Iterable[bytes], partition: int | None = None
) -> None:
    """Publish raw values, keyed by position so they spread over partitions unless one is named."""
    with kafka.producer() as producer:
        for index, value in enumerate(values):
            if partition is None:
                producer.produce(topic, value=value, key=str(index).encode())
            else:
                producer.produce(topic, value=value, partition=partition)


@dataclass
class Harness:
    instance: DagsterInstance
    resources: dict
    cursor: str | None = None

    @property
    def definitions(self):
        return build_definitions(self.resources)

    def tick(self) -> list[RunRequest]:
        with build_sensor_context(
            instance=self.instance, cursor=self.cursor, resources=self.resources
        ) as context:
            result = photo_uploads_sensor(context)
            if isinstance(result, SensorResult):
                self.cursor = result.cursor
                return list(result.run_requests or [])
            self.cursor = context.cursor
            return []

    def execute(self, request: RunRequest, raise_on_error: bool = True):
        job = self.definitions.resolve_job_def(INGEST_JOB_NAME)
        return job.execute_in_process(
            run_config=request.run_config,
            instance=self.instance,
            tags=request.tags,
            raise_on_error=raise_on_error,
        )

    def drain(self, max_ticks: int = 20) -> list[RunRequest]:
        """Tick and execute until the sensor has nothing new; returns every request made."""
        done: list[RunRequest] = []
        for _ in range(max_ticks):
            requests = self.tick()
            if not requests:
                return done
            for request in requests:
                self.execute(request)
            done += requests
        raise AssertionError("the sensor kept requesting runs")


def photo_events(db) -> dict[str, str | None]:
    return {d["_id"]: d.get("eventId") for d in db.photos.find({}, {"eventId": 1})}


def live_events(db) -> dict[str, dict]:
    return {d["_id"]: d for d in db.events.find(LIVE_EVENTS)}


def groups(assignment: dict[str, str | None]) -> set[frozenset[str]]:
    """Membership as a set of photo-id sets, independent of event ids."""
    by_event: dict[str | None, set[str]] = {}
    for photo_id, event_id in assignment.items():
        by_event.setdefault(event_id, set()).add(photo_id)
    return {frozenset(members) for members in by_event.values()}


def sorted_ids(values: Sequence[str]) -> list[str]:
    return sorted(values)


def resource_specs(resources: dict) -> dict:
    """Resources as (class, fields): what a child process needs to rebuild them."""
    return {name: (type(r), r.model_dump()) for name, r in resources.items()}


def execute_in_subprocess(instance_ref, specs: dict, run_config: dict, tags: dict) -> bool:
    """Execute one micro-batch run in this (child) process; for runs that must overlap."""
    instance = DagsterInstance.from_ref(instance_ref)
    resources = {name: cls(**fields) for name, (cls, fields) in specs.items()}
    job = build_definitions(resources).resolve_job_def(INGEST_JOB_NAME)
    return job.execute_in_process(run_config=run_config, instance=instance, tags=tags).success
