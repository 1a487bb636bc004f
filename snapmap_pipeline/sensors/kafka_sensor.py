"""The ``photo-uploads`` sensor: new offsets become micro-batch runs.

Each tick reads the partitions' watermarks (bounded calls, no consumption), compares them with
the cursor (JSON: next offset per partition) and requests one run per new offset range, capped
at ``max_messages`` per run and ``max_runs_per_tick`` per tick. A tick cut short by that cap
or by its time budget records where it stopped, and the next tick starts there, so a slow broker
or one partition's backlog cannot starve the other partitions. Runs carry the offset range,
never payloads, and ``run_key`` = topic/partition/first-last@topic-id, so a re-evaluated tick
launches nothing twice. A partition without a cursor entry starts from the consumer group's
committed offset, else from the earliest offset (never "latest": cases.md #18). Offsets deleted by
retention before a run was requested are a visible gap: a log line, a run tag and an
observation on the ``photo_uploads`` asset.

The cursor also holds the topic's id. A topic deleted and created again under the same name
has a new id and starts again at offset 0, so the old cursor's offsets mean nothing there: the
tick logs an error and restarts every partition of the new topic as if it had no cursor entry
(the group's committed offset when it lies within the partition, else the earliest offset). A
cursor offset beyond a partition's end offset (a recreation the cursor cannot tell, a broker
that lost data) is restarted the same way, with a warning.
"""

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

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
from snapmap_pipeline.resources.kafka import KafkaResource, OffsetRange, Watermarks
from snapmap_pipeline.settings import PipelineSettings

UPLOADS_ASSET = "photo_uploads"
# The cursor keys, beside the partition ids: the partition the next tick starts at, and the
# id of the topic the offsets belong to.
RESUME_KEY = "resume_partition"
TOPIC_ID_KEY = "topic_id"


@dataclass(frozen=True)
class SensorCursor:
    """What a tick hands to the next one: the next offset per partition, the partition to
    start at when the previous tick stopped before covering every partition, and the id of the
    topic those offsets are of.

    As JSON: ``{"0": 1200, "1": 900, "resume_partition": 1, "topic_id": "..."}``.
    ``resume_partition`` is written only by a tick that was cut short (by its time budget or
    by ``max_runs_per_tick``), so a cursor without it (every cursor written before it existed,
    or edited by an operator) is read as "start at the first partition". A cursor without
    ``topic_id`` (written before it existed, or edited) is read as one of the current topic.
    """

    offsets: dict[int, int]
    resume_partition: int | None = None
    topic_id: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> "SensorCursor":
        values = json.loads(text or "{}")
        resume = values.pop(RESUME_KEY, None)
        topic_id = values.pop(TOPIC_ID_KEY, None)
        offsets = {int(partition): int(offset) for partition, offset in values.items()}
        return cls(offsets, None if resume is None else int(resume), topic_id)

    def to_json(self) -> str:
        values: dict[str, int | str] = {str(p): o for p, o in self.offsets.items()}
        if self.resume_partition is not None:
            values[RESUME_KEY] = self.resume_partition
        if self.topic_id is not None:
            values[TOPIC_ID_KEY] = self.topic_id
        return json.dumps(values, sort_keys=True)


@dataclass(frozen=True)
class TickPlan:
    """What one tick decided: ranges to run, the next cursor, lag and retention gaps.

    ``replaced_topic_id`` is the cursor's topic id when the topic now has another one (it was
    deleted and created again); ``restarts`` maps each partition whose cursor offset was
    dropped (for that reason, or because it lay beyond the partition's end offset) to that
    offset and the offset it restarted at."""

    ranges: list[OffsetRange]
    cursor: SensorCursor
    lag: dict[int, int]
    gaps: dict[int, tuple[int, int]]
    replaced_topic_id: str | None = None
    restarts: dict[int, tuple[int, int]] = field(default_factory=dict)


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
    busy: Callable[[str], frozenset[int]] = lambda _topic_id: frozenset(),
) -> TickPlan:
    """Decide the runs of one tick from the broker's watermarks and the cursor.

    Partitions are planned in cyclic order from the cursor's ``resume_partition``. A tick stops
    at its time budget (always after at least one partition, so a slow broker cannot stall
    the sensor) or at ``max_runs_per_tick``; the next tick then starts at the partition after
    the last one planned: with N partitions, each is planned at least once every N ticks.
    ``busy(topic_id)`` names the partitions that already have ``max_pending_runs_per_partition``
    unfinished runs of the topic with that id: they are left as they are, so their backlog goes
    into fewer, larger runs once those finish.

    When the topic's id is not the cursor's (the topic was recreated), the cursor's offsets
    and resume partition are dropped and every partition starts as one without a cursor
    entry. A cursor offset beyond its partition's end offset is dropped the same way.
    """
    deadline = time.monotonic() + settings.sensor_tick_budget_s
    topic = settings.uploads_topic
    ranges: list[OffsetRange] = []
    lag: dict[int, int] = {}
    gaps: dict[int, tuple[int, int]] = {}
    restarts: dict[int, tuple[int, int]] = {}
    with kafka.consumer() as consumer:
        partitions = kafka.partitions(consumer, topic)
        topic_id = kafka.topic_id(topic)
        waiting = busy(topic_id)
        replaced = cursor.topic_id if cursor.topic_id not in (None, topic_id) else None
        offsets = {} if replaced else dict(cursor.offsets)
        unknown = [p for p in partitions if p not in offsets]
        committed = kafka.committed(consumer, topic, unknown) if unknown else {}
        order = rotated(partitions, None if replaced else cursor.resume_partition)
        planned = 0
        position = 0
        cut_short = False
        for position, partition in enumerate(order):
            if partition in waiting:
                continue
            out_of_time = planned > 0 and time.monotonic() > deadline
            if out_of_time or len(ranges) >= settings.max_runs_per_tick:
                cut_short = True
                break
            marks = kafka.watermarks(consumer, topic, partition)
            start = offsets.get(partition)
            if start is not None and start > marks.high:
                # Offsets the partition never had: the old cursor names a vanished log.
                group = kafka.committed(consumer, topic, [partition]).get(partition)
                restarts[partition] = (start, restart_offset(group, marks))
                start = restarts[partition][1]
            elif start is None:
                start = restart_offset(committed.get(partition), marks)
                if replaced and cursor.offsets.get(partition, start) != start:
                    restarts[partition] = (cursor.offsets[partition], start)
            if start < marks.low:
                gaps[partition] = (start, marks.low - 1)
                start = marks.low
            while start < marks.high and len(ranges) < settings.max_runs_per_tick:
                last = min(start + settings.max_messages_per_run, marks.high) - 1
                ranges.append(OffsetRange(topic, partition, start, last, topic_id))
                start = last + 1
            offsets[partition] = start
            lag[partition] = marks.high - start
            planned += 1
            cut_short = start < marks.high
            if cut_short:
                position += 1
                break
    resume = order[position % len(order)] if cut_short and order else None
    cursor = SensorCursor(offsets, resume, topic_id)
    return TickPlan(ranges, cursor, lag, gaps, replaced, restarts)


def restart_offset(committed: int | None, marks: Watermarks) -> int:
    """Where a partition without a usable cursor offset starts: the group's committed offset
    when the partition has it (at or below its end offset), else the earliest offset."""
    if committed is None or committed > marks.high:
        return marks.low
    return committed


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


def busy_partitions(
    instance: DagsterInstance, settings: PipelineSettings, topic_id: str
) -> frozenset[int]:
    """Partitions with ``max_pending_runs_per_partition`` or more unfinished ingest runs.

    Runs planned on another ``topic_id`` (a topic since deleted and created again) do not
    count: they fail at their first topic-id check without retries, and the new topic's
    ranges must not wait for them. Runs without a topic id (planned before ids were recorded)
    count as the current topic's."""
    runs = instance.get_runs(
        RunsFilter(
            job_name=INGEST_JOB_NAME,
            statuses=UNFINISHED,
            tags={"snapmap/topic": settings.uploads_topic},
        )
    )
    pending = Counter(
        run.tags.get("snapmap/partition")
        for run in runs
        if run.tags.get("snapmap/topic_id") in (None, topic_id)
    )
    return frozenset(
        int(p)
        for p, n in pending.items()
        if p is not None and n >= settings.max_pending_runs_per_partition
    )


def ranges_to_heal(
    instance: DagsterInstance,
    settings: PipelineSettings,
    committed: dict[int, int],
    now: float,
    topic_id: str | None = None,
) -> list[tuple[OffsetRange, int]]:
    """Ranges not committed yet whose every run failed or was canceled (run retries included),
    the last one long enough ago: each with the number of attempts so far.

    Dagster's run retries handle a brief fault; after a longer one (a database down for
    several minutes) they are spent, and without this the range would stay unapplied and the
    partition's commit would stop there until someone re-executed it by hand. Ranges of
    another ``topic_id`` (a topic since deleted and created again) are not requested again:
    their messages are gone, and their offsets now name the new topic's messages."""
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
        if offsets.topic_id not in (None, topic_id):
            continue
        ended = record.end_time or record.update_timestamp.timestamp()
        known = candidates.get(offsets.key)
        candidates[offsets.key] = (offsets, max(ended, known[1] if known else 0.0))
    healed = []
    for _key, (offsets, last_end) in sorted(candidates.items()):
        runs = instance.get_runs(RunsFilter(job_name=INGEST_JOB_NAME, tags=range_tags(offsets)))
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
        partition = int(tags["snapmap/partition"])
    except (KeyError, ValueError):
        return None
    return OffsetRange(topic, partition, first, last, tags.get("snapmap/topic_id"))


def range_tags(offsets: OffsetRange) -> dict[str, str]:
    """The tags that name a range's runs (the topic id only when the range has one)."""
    tags = {
        "snapmap/topic": offsets.topic,
        "snapmap/partition": str(offsets.partition),
        "snapmap/offsets": f"{offsets.first}-{offsets.last}",
    }
    if offsets.topic_id is not None:
        tags["snapmap/topic_id"] = offsets.topic_id
    return tags


def run_request_for(
    offsets: OffsetRange, gap: tuple[int, int] | None = None, attempt: int = 0
) -> RunRequest:
    tags = {**range_tags(offsets), "snapmap/batch_size": str(offsets.count)}
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
    cursor = SensorCursor.parse(context.cursor)
    if instance is None:
        plan = plan_tick(kafka, settings, cursor)
    else:
        plan = plan_tick(
            kafka, settings, cursor, lambda topic_id: busy_partitions(instance, settings, topic_id)
        )
    heal = []
    if instance is not None:
        with kafka.consumer() as consumer:
            partitions = kafka.partitions(consumer, settings.uploads_topic)
            # A loading group coordinator fails the tick (nothing moves) rather than hold it.
            committed = kafka.committed(
                consumer, settings.uploads_topic, partitions, coordinator_retry_s=5.0
            )
        heal = ranges_to_heal(instance, settings, committed, time.time(), plan.cursor.topic_id)

    observations = []
    if plan.replaced_topic_id is not None:
        context.log.error(
            "%s was deleted and created again (topic id %s, was %s): the cursor's offsets "
            "belong to the deleted topic; every partition restarts at the group's committed "
            "offset if the new topic has it, else at its earliest offset",
            settings.uploads_topic,
            plan.cursor.topic_id,
            plan.replaced_topic_id,
        )
    for partition, (old, restart) in sorted(plan.restarts.items()):
        if plan.replaced_topic_id is None:
            context.log.warning(
                "cursor offset %d of %s/%d is beyond the partition's end offset (a topic "
                "recreated, or a broker that lost messages); restarting at offset %d",
                old,
                settings.uploads_topic,
                partition,
                restart,
            )
        observations.append(
            AssetObservation(
                asset_key=UPLOADS_ASSET,
                metadata={
                    "cursor_reset_partition": partition,
                    "cursor_reset_from": old,
                    "cursor_reset_to": restart,
                    "topic_id": plan.cursor.topic_id or "",
                },
            )
        )
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
