"""The ``photo-uploads`` sensor: new offsets become micro-batch runs.

Each tick reads the partitions' watermarks (bounded calls, no consumption), compares them with
the cursor (JSON: next offset per partition) and requests one run per new offset range, capped
at ``max_messages`` per run and ``max_runs_per_tick`` per tick. A tick cut short by that cap
or by its time budget records where it stopped, and the next tick starts there, so a slow broker
or one partition's backlog cannot starve the other partitions. Runs carry the offset range,
never payloads, and ``run_key`` = topic/partition/first-last, so a re-evaluated tick launches
nothing twice. A partition without a cursor entry starts from the consumer group's committed
offset, else from the earliest offset (never "latest": cases.md #18). Offsets deleted by
retention before a run was requested are a visible gap: a log line, a run tag and an
observation on the ``photo_uploads`` asset.
"""

import json
import time
from dataclasses import dataclass

from dagster import (
    AssetObservation,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from snapmap_pipeline.jobs import INGEST_JOB_NAME, ingest_run_config
from snapmap_pipeline.resources.kafka import KafkaResource, OffsetRange
from snapmap_pipeline.settings import PipelineSettings

UPLOADS_ASSET = "photo_uploads"
# The cursor key, beside the partition ids, of the partition the next tick starts at.
RESUME_KEY = "resume_partition"


@dataclass(frozen=True)
class SensorCursor:
    """What a tick hands to the next one: the next offset per partition, and the partition
    to start at when the previous tick stopped before covering every partition.

    As JSON: ``{"0": 1200, "1": 900, "resume_partition": 1}``. ``resume_partition`` is written
    only by a tick that was cut short (by its time budget or by ``max_runs_per_tick``), so a
    cursor without it (every cursor written before it existed, or edited by an operator) is
    read as "start at the first partition".
    """

    offsets: dict[int, int]
    resume_partition: int | None = None

    @classmethod
    def parse(cls, text: str | None) -> "SensorCursor":
        values = json.loads(text or "{}")
        resume = values.pop(RESUME_KEY, None)
        offsets = {int(partition): int(offset) for partition, offset in values.items()}
        return cls(offsets, None if resume is None else int(resume))

    def to_json(self) -> str:
        values: dict[str, int] = {str(p): o for p, o in self.offsets.items()}
        if self.resume_partition is not None:
            values[RESUME_KEY] = self.resume_partition
        return json.dumps(values, sort_keys=True)


@dataclass(frozen=True)
class TickPlan:
    """What one tick decided: ranges to run, the next cursor, lag and retention gaps."""

    ranges: list[OffsetRange]
    cursor: SensorCursor
    lag: dict[int, int]
    gaps: dict[int, tuple[int, int]]


def rotated(partitions: list[int], first: int | None) -> list[int]:
    """``partitions`` (sorted ids) in cyclic order from ``first``, or from the next id above it
    when it is gone; from the lowest id when ``first`` is None."""
    if first is None:
        return partitions
    at = next((i for i, p in enumerate(partitions) if p >= first), 0)
    return partitions[at:] + partitions[:at]


def plan_tick(kafka: KafkaResource, settings: PipelineSettings, cursor: SensorCursor) -> TickPlan:
    """Decide the runs of one tick from the broker's watermarks and the cursor.

    Partitions are planned in cyclic order from the cursor's ``resume_partition``. A tick stops
    at its time budget (always after at least one partition, so a slow broker cannot stall
    the sensor) or at ``max_runs_per_tick``; the next tick then starts at the partition after
    the last one planned: with N partitions, each is planned at least once every N ticks.
    """
    deadline = time.monotonic() + settings.sensor_tick_budget_s
    ranges: list[OffsetRange] = []
    lag: dict[int, int] = {}
    gaps: dict[int, tuple[int, int]] = {}
    offsets = dict(cursor.offsets)
    with kafka.consumer() as consumer:
        partitions = kafka.partitions(consumer, settings.uploads_topic)
        unknown = [p for p in partitions if p not in offsets]
        committed = kafka.committed(consumer, settings.uploads_topic, unknown) if unknown else {}
        order = rotated(partitions, cursor.resume_partition)
        planned = 0
        cut_short = False
        for partition in order:
            out_of_time = planned > 0 and time.monotonic() > deadline
            if out_of_time or len(ranges) >= settings.max_runs_per_tick:
                cut_short = True
                break
            marks = kafka.watermarks(consumer, settings.uploads_topic, partition)
            start = offsets.get(partition, committed.get(partition, marks.low))
            if start < marks.low:
                gaps[partition] = (start, marks.low - 1)
                start = marks.low
            while start < marks.high and len(ranges) < settings.max_runs_per_tick:
                last = min(start + settings.max_messages_per_run, marks.high) - 1
                ranges.append(OffsetRange(settings.uploads_topic, partition, start, last))
                start = last + 1
            offsets[partition] = start
            lag[partition] = marks.high - start
            planned += 1
            cut_short = start < marks.high
    resume = order[planned % len(order)] if cut_short and order else None
    return TickPlan(ranges, SensorCursor(offsets, resume), lag, gaps)


def run_request_for(offsets: OffsetRange, gap: tuple[int, int] | None = None) -> RunRequest:
    tags = {
        "snapmap/topic": offsets.topic,
        "snapmap/partition": str(offsets.partition),
        "snapmap/offsets": f"{offsets.first}-{offsets.last}",
        "snapmap/batch_size": str(offsets.count),
    }
    if gap is not None:
        tags["snapmap/retention_gap"] = f"{gap[0]}-{gap[1]}"
    return RunRequest(run_key=offsets.key, run_config=ingest_run_config(offsets), tags=tags)


@sensor(
    job_name=INGEST_JOB_NAME,
    minimum_interval_seconds=5,
    default_status=DefaultSensorStatus.RUNNING,
    description="Turns new photo-uploads offsets into micro-batch runs (offset ranges only).",
)
def photo_uploads_sensor(
    context: SensorEvaluationContext, kafka: KafkaResource, settings: PipelineSettings
) -> SensorResult | SkipReason:
    plan = plan_tick(kafka, settings, SensorCursor.parse(context.cursor))

    observations = []
    for partition, (first, last) in plan.gaps.items():
        context.log.warning(
            "offsets %d-%d of %s/%d were deleted by retention before they were read",
            first,
            last,
            settings.uploads_topic,
            partition,
        )
        observations.append(
            AssetObservation(
                asset_key=UPLOADS_ASSET,
                metadata={
                    "retention_gap_partition": partition,
                    "retention_gap_offsets": last - first + 1,
                    "retention_gap_range": f"{first}-{last}",
                },
            )
        )
    requests = []
    for offsets in plan.ranges:
        gap = plan.gaps.pop(offsets.partition, None)
        requests.append(run_request_for(offsets, gap))

    lag_text = ", ".join(f"p{p}={n}" for p, n in sorted(plan.lag.items()))
    if requests:
        context.log.info(
            "requested %d runs: %s; lag after them: %s",
            len(requests),
            ", ".join(r.run_key for r in requests),
            lag_text,
        )
    cursor_json = plan.cursor.to_json()
    if not requests and not observations:
        context.update_cursor(cursor_json)
        return SkipReason(f"no new offsets in {settings.uploads_topic} (lag: {lag_text or 'none'})")
    return SensorResult(run_requests=requests, cursor=cursor_json, asset_events=observations)
