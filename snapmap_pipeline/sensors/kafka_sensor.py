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
from collections import Counter
from dataclasses import dataclass

from dagster import (
    AssetObservation,
    DagsterInstance,
    DagsterInvariantViolationError,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
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


def plan_tick(
    kafka: KafkaResource,
    settings: PipelineSettings,
    cursor: SensorCursor,
    busy: frozenset[int] = frozenset(),
) -> TickPlan:
    """Decide the runs of one tick from the broker's watermarks and the cursor.

    Partitions are planned in cyclic order from the cursor's ``resume_partition``. A tick stops
    at its time budget (always after at least one partition, so a slow broker cannot stall
    the sensor) or at ``max_runs_per_tick``; the next tick then starts at the partition after
    the last one planned: with N partitions, each is planned at least once every N ticks.
    ``busy`` partitions already have ``max_pending_runs_per_partition`` unfinished runs: they
    are left as they are, so their backlog goes into fewer, larger runs once those finish.
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
        position = 0
        cut_short = False
        for position, partition in enumerate(order):
            if partition in busy:
                continue
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
            if cut_short:
                position += 1
                break
    resume = order[position % len(order)] if cut_short and order else None
    return TickPlan(ranges, SensorCursor(offsets, resume), lag, gaps)


UNFINISHED = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]
GAVE_UP = [DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]
# Failed runs looked at per tick, newest first: far more than a partition's failures between
# two commits in practice; older ones are covered by the sweeper's orphan check.
HEAL_SCAN_LIMIT = 500
HEAL_BACKOFF_CAP_S = 3600.0


def busy_partitions(instance: DagsterInstance, settings: PipelineSettings) -> frozenset[int]:
    """Partitions with ``max_pending_runs_per_partition`` or more unfinished ingest runs."""
    runs = instance.get_runs(
        RunsFilter(
            job_name=INGEST_JOB_NAME,
            statuses=UNFINISHED,
            tags={"snapmap/topic": settings.uploads_topic},
        )
    )
    pending = Counter(run.tags.get("snapmap/partition") for run in runs)
    return frozenset(
        int(p)
        for p, n in pending.items()
        if p is not None and n >= settings.max_pending_runs_per_partition
    )


def ranges_to_heal(
    instance: DagsterInstance, settings: PipelineSettings, committed: dict[int, int], now: float
) -> list[tuple[OffsetRange, int]]:
    """Ranges not committed yet whose every run failed or was canceled (run retries included),
    the last one long enough ago: each with the number of attempts so far.

    Dagster's run retries handle a brief fault; after a longer one (a database down for
    several minutes) they are spent, and without this the range would stay unapplied and the
    partition's commit would stop there until someone re-executed it by hand."""
    gave_up = instance.get_run_records(
        RunsFilter(
            job_name=INGEST_JOB_NAME,
            statuses=GAVE_UP,
            tags={"snapmap/topic": settings.uploads_topic},
        ),
        limit=HEAL_SCAN_LIMIT,
    )
    candidates: dict[str, tuple[OffsetRange, float]] = {}
    for record in gave_up:
        offsets = offsets_of(record.dagster_run.tags, settings.uploads_topic)
        if offsets is None or offsets.last < committed.get(offsets.partition, 0):
            continue
        ended = record.end_time or record.update_timestamp.timestamp()
        known = candidates.get(offsets.key)
        candidates[offsets.key] = (offsets, max(ended, known[1] if known else 0.0))
    healed = []
    for _key, (offsets, last_end) in sorted(candidates.items()):
        runs = instance.get_runs(
            RunsFilter(
                job_name=INGEST_JOB_NAME,
                tags={
                    "snapmap/topic": offsets.topic,
                    "snapmap/partition": str(offsets.partition),
                    "snapmap/offsets": f"{offsets.first}-{offsets.last}",
                },
            )
        )
        if any(run.status not in GAVE_UP for run in runs):
            continue  # applied, or a run (a retry, a re-execution) is still on it
        attempts = len(runs)
        backoff = min(settings.heal_after_s * 2 ** max(attempts - 1, 0), HEAL_BACKOFF_CAP_S)
        if now - last_end >= backoff:
            healed.append((offsets, attempts))
    return healed


def instance_of(context: SensorEvaluationContext) -> DagsterInstance | None:
    """The instance the tick runs in; None for a context built without one (unit use)."""
    try:
        return context.instance
    except DagsterInvariantViolationError:
        return None


def offsets_of(tags: dict[str, str], topic: str) -> OffsetRange | None:
    if tags.get("snapmap/topic") != topic:
        return None
    try:
        first, last = (int(x) for x in tags["snapmap/offsets"].split("-"))
        return OffsetRange(topic, int(tags["snapmap/partition"]), first, last)
    except (KeyError, ValueError):
        return None


def run_request_for(
    offsets: OffsetRange, gap: tuple[int, int] | None = None, attempt: int = 0
) -> RunRequest:
    tags = {
        "snapmap/topic": offsets.topic,
        "snapmap/partition": str(offsets.partition),
        "snapmap/offsets": f"{offsets.first}-{offsets.last}",
        "snapmap/batch_size": str(offsets.count),
    }
    if gap is not None:
        tags["snapmap/retention_gap"] = f"{gap[0]}-{gap[1]}"
    run_key = offsets.key
    if attempt:
        # A new key per attempt: the range's earlier run keys are spent.
        tags["snapmap/heal_attempt"] = str(attempt)
        run_key = f"{offsets.key}#heal{attempt}"
    return RunRequest(run_key=run_key, run_config=ingest_run_config(offsets), tags=tags)


@sensor(
    job_name=INGEST_JOB_NAME,
    minimum_interval_seconds=5,
    default_status=DefaultSensorStatus.RUNNING,
    description="Turns new photo-uploads offsets into micro-batch runs (offset ranges only).",
)
def photo_uploads_sensor(
    context: SensorEvaluationContext, kafka: KafkaResource, settings: PipelineSettings
) -> SensorResult | SkipReason:
    instance = instance_of(context)
    busy = busy_partitions(instance, settings) if instance else frozenset()
    plan = plan_tick(kafka, settings, SensorCursor.parse(context.cursor), busy)
    heal = []
    if instance is not None:
        with kafka.consumer() as consumer:
            partitions = kafka.partitions(consumer, settings.uploads_topic)
            # A loading group coordinator fails the tick (nothing moves) rather than hold it.
            committed = kafka.committed(
                consumer, settings.uploads_topic, partitions, coordinator_retry_s=5.0
            )
        heal = ranges_to_heal(instance, settings, committed, time.time())

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
    for offsets, attempts in heal:
        context.log.warning(
            "%s: every run of it failed or was canceled (%d so far); requesting it again",
            offsets.key,
            attempts,
        )
        requests.append(run_request_for(offsets, attempt=attempts))

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
