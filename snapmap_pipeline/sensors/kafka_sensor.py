"""The ``photo-uploads`` sensor: new offsets become micro-batch runs.

Each tick reads every partition's watermarks (bounded calls, no consumption), compares them with
the cursor (JSON: next offset per partition) and requests one run per new offset range, capped
at ``max_messages`` per run and ``max_runs_per_tick`` per tick. Runs carry the offset range,
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


@dataclass(frozen=True)
class TickPlan:
    """What one tick decided: ranges to run, the next cursor, lag and retention gaps."""

    ranges: list[OffsetRange]
    cursor: dict[str, int]
    lag: dict[int, int]
    gaps: dict[int, tuple[int, int]]


def plan_tick(kafka: KafkaResource, settings: PipelineSettings, cursor: dict[str, int]) -> TickPlan:
    """Decide the runs of one tick from the broker's watermarks and the cursor."""
    deadline = time.monotonic() + settings.sensor_tick_budget_s
    ranges: list[OffsetRange] = []
    lag: dict[int, int] = {}
    gaps: dict[int, tuple[int, int]] = {}
    next_cursor = dict(cursor)
    with kafka.consumer() as consumer:
        partitions = kafka.partitions(consumer, settings.uploads_topic)
        unknown = [p for p in partitions if str(p) not in cursor]
        committed = kafka.committed(consumer, settings.uploads_topic, unknown) if unknown else {}
        for partition in partitions:
            if time.monotonic() > deadline or len(ranges) >= settings.max_runs_per_tick:
                break
            marks = kafka.watermarks(consumer, settings.uploads_topic, partition)
            start = cursor.get(str(partition), committed.get(partition, marks.low))
            if start < marks.low:
                gaps[partition] = (start, marks.low - 1)
                start = marks.low
            while start < marks.high and len(ranges) < settings.max_runs_per_tick:
                last = min(start + settings.max_messages_per_run, marks.high) - 1
                ranges.append(OffsetRange(settings.uploads_topic, partition, start, last))
                start = last + 1
            next_cursor[str(partition)] = start
            lag[partition] = marks.high - start
    return TickPlan(ranges, next_cursor, lag, gaps)


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
    cursor = {k: int(v) for k, v in json.loads(context.cursor or "{}").items()}
    plan = plan_tick(kafka, settings, cursor)

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
    cursor_json = json.dumps(plan.cursor, sort_keys=True)
    if not requests and not observations:
        context.update_cursor(cursor_json)
        return SkipReason(f"no new offsets in {settings.uploads_topic} (lag: {lag_text or 'none'})")
    return SensorResult(run_requests=requests, cursor=cursor_json, asset_events=observations)
