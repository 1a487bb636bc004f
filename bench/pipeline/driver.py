"""Drive the real pipeline the way the daemon does, in one process: tick the real
``photo_uploads_sensor`` no more often than its interval, execute each requested run with the
real ingest job (in-process executor), and time every stage from Dagster's own event log.

A publisher thread produces the seeded upload stream at a given rate and records, for every
delivered message, its partition, offset and the wall-clock time it was produced, so that each
photo's latency is ``(end of its run's photo_event_links step) - (produce time)``.

Runs execute one after another: the clustering lease serialises their clustering anyway, and
on two cores parallel runs would only compete for the same CPUs.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, Message
from dagster import DagsterEventType, DagsterInstance, build_sensor_context

from snapmap_pipeline.definitions import build_definitions
from snapmap_pipeline.jobs import INGEST_JOB_NAME
from snapmap_pipeline.sensors.kafka_sensor import photo_uploads_sensor
from snapmap_pipeline.simulator.generator import UploadRecord

SENSOR_INTERVAL_S = 5.0
STEPS = ("photo_uploads", "events", "photo_event_links", "event_updates", "consumer_offsets")


class Publisher(threading.Thread):
    """Produce ``records`` at ``rate`` messages/s (0: as fast as possible)."""

    def __init__(self, kafka, topic: str, records: list[UploadRecord], rate: float) -> None:
        super().__init__(daemon=True)
        self.kafka, self.topic, self.records, self.rate = kafka, topic, records, rate
        self.produced_at: dict[tuple[int, int], float] = {}
        self.valid_offsets: set[tuple[int, int]] = set()
        self.failures: list[str] = []
        self.started_at = 0.0
        self.finished_at = 0.0

    def run(self) -> None:
        self.started_at = time.time()
        with self.kafka.producer() as producer:
            for index, record in enumerate(self.records):
                if self.rate > 0:
                    due = self.started_at + index / self.rate
                    pause = due - time.time()
                    if pause > 0:
                        producer.poll(pause)
                sent = time.time()
                valid = record.kind.value == "valid"

                def delivered(error: KafkaError | None, message: Message, sent=sent, valid=valid):
                    if error is not None:
                        self.failures.append(str(error))
                        return
                    key = (message.partition(), message.offset())
                    self.produced_at[key] = sent
                    if valid:
                        self.valid_offsets.add(key)

                while True:
                    try:
                        producer.produce(
                            self.topic, value=record.value, key=record.key, on_delivery=delivered
                        )
                        break
                    except BufferError:
                        producer.poll(0.1)
                producer.poll(0)
        self.finished_at = time.time()


@dataclass
class RunTiming:
    """One micro-batch run: its range, the tick that requested it and its step times."""

    partition: int
    first: int
    last: int
    tick_started: float
    tick_ended: float
    run_started: float
    run_ended: float
    steps: dict[str, tuple[float, float]] = field(default_factory=dict)
    recluster_seconds: dict[str, float] = field(default_factory=dict)
    photos_valid: int = 0

    @property
    def linked_at(self) -> float:
        return self.steps["photo_event_links"][1]


@dataclass
class Driver:
    instance: DagsterInstance
    resources: dict
    interval_s: float = SENSOR_INTERVAL_S
    cursor: str | None = None
    runs: list[RunTiming] = field(default_factory=list)
    ticks: list[tuple[float, float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.job = build_definitions(self.resources).resolve_job_def(INGEST_JOB_NAME)

    def tick(self):
        with build_sensor_context(
            instance=self.instance, cursor=self.cursor, resources=self.resources
        ) as context:
            result = photo_uploads_sensor(context)
            requests = list(getattr(result, "run_requests", None) or [])
            self.cursor = getattr(result, "cursor", None) or context.cursor
        return requests

    def loop(self, done, deadline_s: float) -> None:
        """Tick and execute until ``done()`` or the deadline; ticks are at least the sensor
        interval apart, as the daemon spaces them."""
        give_up = time.time() + deadline_s
        last_tick = 0.0
        while not done():
            if time.time() > give_up:
                raise TimeoutError("the pipeline did not finish within the deadline")
            wait = last_tick + self.interval_s - time.time()
            if wait > 0:
                time.sleep(wait)
            tick_started = time.time()
            last_tick = tick_started
            requests = self.tick()
            tick_ended = time.time()
            self.ticks.append((tick_started, tick_ended, len(requests)))
            for request in requests:
                self.execute(request, tick_started, tick_ended)

    def execute(self, request, tick_started: float, tick_ended: float) -> None:
        config = request.run_config["ops"]["photo_uploads"]["config"]
        run_started = time.time()
        result = self.job.execute_in_process(
            run_config=request.run_config, instance=self.instance, tags=request.tags
        )
        run_ended = time.time()
        timing = RunTiming(
            config["partition"],
            config["first_offset"],
            config["last_offset"],
            tick_started,
            tick_ended,
            run_started,
            run_ended,
        )
        starts: dict[str, float] = {}
        for entry in self.instance.all_logs(result.run_id):
            event = entry.dagster_event
            if event is None or event.step_key is None:
                continue
            if event.event_type == DagsterEventType.STEP_START:
                starts[event.step_key] = entry.timestamp
            elif event.event_type == DagsterEventType.STEP_SUCCESS:
                timing.steps[event.step_key] = (starts[event.step_key], entry.timestamp)
            elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                metadata = event.event_specific_data.materialization.metadata
                if event.step_key == "events":
                    timing.recluster_seconds = {
                        k.removeprefix("seconds_"): v.value
                        for k, v in metadata.items()
                        if k.startswith("seconds_")
                    }
                elif event.step_key == "photo_uploads":
                    timing.photos_valid = int(metadata["photos_valid"].value)
        self.runs.append(timing)


def latencies(publisher: Publisher, runs: list[RunTiming]) -> list[float]:
    """Produce-to-linked seconds of every valid message that a run linked."""
    out = []
    for run in runs:
        linked = run.linked_at
        for offset in range(run.first, run.last + 1):
            key = (run.partition, offset)
            if key in publisher.valid_offsets:
                out.append(linked - publisher.produced_at[key])
    return out


def stage_breakdown(publisher: Publisher, runs: list[RunTiming]) -> dict[str, float]:
    """Mean seconds per valid photo spent in each stage between produce and link:
    waiting for a tick, the tick, waiting for earlier runs (queue) and this run's start-up,
    then the steps up to photo_event_links (events split into load/cluster/write)."""
    totals: dict[str, float] = {}
    count = 0
    for run in runs:
        first_step = run.steps["photo_uploads"][0]
        ingest = run.steps["photo_uploads"]
        events = run.steps["events"]
        links = run.steps["photo_event_links"]
        shared = {
            "sensor_tick": run.tick_ended - run.tick_started,
            "queued_behind_earlier_runs": run.run_started - run.tick_ended,
            "run_start_up": first_step - run.run_started,
            "read_validate_upsert": ingest[1] - ingest[0],
            "between_steps": (events[0] - ingest[1]) + (links[0] - events[1]),
            **{f"recluster_{k}": v for k, v in run.recluster_seconds.items()},
            "events_step_other": (events[1] - events[0]) - sum(run.recluster_seconds.values()),
            "link": links[1] - links[0],
        }
        for offset in range(run.first, run.last + 1):
            key = (run.partition, offset)
            if key not in publisher.valid_offsets:
                continue
            count += 1
            wait = run.tick_started - publisher.produced_at[key]
            totals["wait_for_tick"] = totals.get("wait_for_tick", 0.0) + wait
            for name, value in shared.items():
                totals[name] = totals.get(name, 0.0) + value
    return {k: round(v / count, 3) for k, v in totals.items()} if count else {}


def run_overheads(runs: list[RunTiming]) -> dict[str, float]:
    """Median seconds per run of each step and of what is outside the steps."""
    from statistics import median

    out: dict[str, float] = {}
    for step in STEPS:
        out[f"step_{step}"] = median(r.steps[step][1] - r.steps[step][0] for r in runs)
    out["run_total"] = median(r.run_ended - r.run_started for r in runs)
    out["outside_steps"] = median(
        (r.run_ended - r.run_started) - sum(b - a for a, b in r.steps.values()) for r in runs
    )
    return {k: round(v, 3) for k, v in out.items()}
