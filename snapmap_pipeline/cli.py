"""The ``snapmap`` command: operator tools beside the Dagster code location.

- ``snapmap recluster --from DAY --to DAY``: the daily backfill (``recluster_day``, the code
  the ``daily_events`` partitions run) over UTC days, outside Dagster.
- ``snapmap stats``: what the database holds: photos, orphans, events, tombstones, outboxes.
- ``snapmap accounting``: where every offset of the uploads topic ended (applied,
  dead-lettered, lost to retention, pending), and whether each applied photo has its event.

Resources are the code location's own (``production_resources()``), resolved from the
environment by ``dagster.build_resources``, so the command reads the same variables as the
runs (``source scripts/env.sh`` locally). Exit codes: 0 ok, 1 failed or inconsistent, 2 usage
or configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pymongo.database import Database

    from snapmap_pipeline.assets.backfill import DayReport
    from snapmap_pipeline.clustering import ClusterParams
    from snapmap_pipeline.resources.blob import BlobStorageResource
    from snapmap_pipeline.resources.kafka import KafkaResource
    from snapmap_pipeline.resources.mongo import MongoResource
    from snapmap_pipeline.settings import PipelineSettings

# The pipeline's modules (Dagster, scikit-learn: seconds to import) load inside the commands,
# once the arguments are known to be valid, so that usage errors and --help answer at once.

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STALLED = 0, 1, 2, 3
EXAMPLES = 10
log = logging.getLogger("snapmap_pipeline.cli")


@dataclass
class Resources:
    mongo: MongoResource
    kafka: KafkaResource
    blob: BlobStorageResource
    settings: PipelineSettings


class ConfigProblem(RuntimeError):
    """The environment does not configure the resources; exit with the usage code."""


@contextmanager
def resources_from_env() -> Iterator[Resources]:
    """The code location's resources with their ``EnvVar``s resolved from the environment
    (their setup and teardown run as in a run, so clients are closed on exit)."""
    from dagster import DagsterInvalidConfigError, build_resources

    from snapmap_pipeline.definitions import production_resources

    with ExitStack() as stack:
        try:
            built = stack.enter_context(build_resources(production_resources()))
        except DagsterInvalidConfigError as error:
            raise ConfigProblem(
                f"{_config_reason(error)} (locally: source scripts/env.sh)"
            ) from error
        yield Resources(built.mongo, built.kafka, built.blob, built.settings)


def _config_reason(error: Exception) -> str:
    """The useful line of Dagster's config error: which variable is missing, if that is it."""
    missing = re.search(r'environment variable "([^"]+)" which is not set', str(error))
    if missing:
        return f"environment variable {missing.group(1)} is not set"
    return str(error).strip().splitlines()[0][:300]


# ---------------------------------------------------------------------------------- recluster


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD day: {text!r}") from error


def days_between(first: date, last: date) -> list[date]:
    """``first`` to ``last``, both included."""
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


class ProgressBar:
    """A one-line text bar on stderr, redrawn in place on a terminal and one line per step
    otherwise (logs, CI)."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total = max(total, 1)
        self.width = width
        self.interactive = sys.stderr.isatty()

    def show(self, done: int, label: str) -> None:
        filled = self.width * done // self.total
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {label}"
        if self.interactive:
            sys.stderr.write(f"\r{line[:120]:<120}")
            if done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


@dataclass
class ReclusterTotals:
    days: int = 0
    photos: int = 0
    created: int = 0
    changed: int = 0
    tombstoned: int = 0
    links_applied: int = 0
    event_updates: int = 0
    manifests_pending: int = 0

    def add(self, report: DayReport) -> None:
        self.days += 1
        self.photos += report.photos
        self.created += report.recluster.created
        self.changed += report.recluster.changed
        self.tombstoned += report.recluster.tombstoned
        self.links_applied += report.links_applied
        self.event_updates += report.event_updates_published
        self.manifests_pending = report.manifests_pending


def run_recluster(args: argparse.Namespace) -> int:
    from snapmap_pipeline.assets.backfill import DEFAULT_CHUNK_SIZE, recluster_day
    from snapmap_pipeline.clustering import ClusterParams
    from snapmap_pipeline.resources.blob import BlobStorageResource

    days = days_between(args.first, args.last)
    chunk_size = args.chunk_size or DEFAULT_CHUNK_SIZE
    with resources_from_env() as res:
        try:
            params = ClusterParams(
                radius_m=args.radius_m if args.radius_m is not None else res.settings.radius_m,
                window_s=args.window_s if args.window_s is not None else res.settings.window_s,
            )
        except ValueError as error:
            print(f"snapmap recluster: {error}", file=sys.stderr)
            return EXIT_USAGE
        topic = res.settings.event_updates_topic
        blob = res.blob
        if args.manifest_container:
            blob = BlobStorageResource(
                **{name: getattr(blob, name) for name in BlobStorageResource.model_fields}
                | {"manifest_container": args.manifest_container}
            )
        db = res.mongo.db()
        totals = ReclusterTotals()
        bar = ProgressBar(len(days))
        started = time.monotonic()
        bar.show(0, f"R={params.radius_m:g} m, W={params.window_s:g} s")
        for day in days:
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            try:
                report = recluster_day(
                    db,
                    res.kafka,
                    blob,
                    params,
                    topic,
                    start,
                    start + timedelta(days=1),
                    log,
                    chunk_size,
                )
            except Exception:
                log.exception("recluster of %s failed", day.isoformat())
                _print_totals(totals, params, time.monotonic() - started)
                print(
                    f"FAILED at {day.isoformat()} after {totals.days} days; days before it are "
                    f"done. Resume with --from {day.isoformat()}",
                )
                return EXIT_FAILED
            totals.add(report)
            bar.show(
                totals.days,
                f"{day.isoformat()}: {report.photos} photos, "
                f"{sum(report.event_sizes.values())} events start",
            )
        _print_totals(totals, params, time.monotonic() - started)
    return EXIT_OK


def _print_totals(totals: ReclusterTotals, params: ClusterParams, seconds: float) -> None:
    print(
        f"reclustered {totals.days} days (R={params.radius_m:g} m, W={params.window_s:g} s) in "
        f"{seconds:.1f} s: {totals.photos} photos; events {totals.created} created, "
        f"{totals.changed} changed, {totals.tombstoned} tombstoned; {totals.links_applied} "
        f"links applied; {totals.event_updates} event updates published; "
        f"{totals.manifests_pending} manifests pending"
    )


# -------------------------------------------------------------------------------------- stats


def collect_stats(db: Database) -> dict:
    """Counts of the collections the pipeline writes (exact, with one query each)."""
    from snapmap_pipeline.store.events import LIVE_EVENTS

    photos = db.photos
    dead_letter_codes = {
        d["_id"]: d["n"]
        for d in db.dead_letters.aggregate([{"$group": {"_id": "$code", "n": {"$sum": 1}}}])
    }
    return {
        "photos": photos.count_documents({}),
        "photos_with_event": photos.count_documents({"eventId": {"$ne": None}}),
        "orphan_photos": photos.count_documents({"eventId": None, "deadLettered": {"$ne": True}}),
        "dead_lettered_photos": photos.count_documents({"deadLettered": True}),
        "missing_blobs": photos.count_documents({"blobStatus": "missing"}),
        "live_events": db.events.count_documents(LIVE_EVENTS),
        "tombstones": db.events.count_documents({"mergedInto": {"$ne": None}}),
        "retired_events": db.events.count_documents({"mergedInto": None, "photoCount": 0}),
        "pending_links": db.pending_links.count_documents({}),
        "pending_publishes": db.events.count_documents({"publishPending": True}),
        "pending_manifests": db.events.count_documents({"manifestPending": True}),
        "dead_letters": sum(dead_letter_codes.values()),
        "dead_letters_by_code": dict(sorted(dead_letter_codes.items())),
    }


def run_stats(args: argparse.Namespace) -> int:
    with resources_from_env() as res:
        stats = collect_stats(res.mongo.db())
    if args.json:
        print(json.dumps(stats, sort_keys=True))
        return EXIT_OK
    by_code = stats.pop("dead_letters_by_code")
    for name, value in stats.items():
        print(f"{name:<22} {value:>12}")
    for code, count in by_code.items():
        print(f"  {code:<20} {count:>12}")
    return EXIT_OK


# --------------------------------------------------------------------------------- accounting


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive ranges merged where they overlap or touch, sorted."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def uncovered(low: int, end: int, covered: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The inclusive ranges of offsets in ``[low, end)`` outside the merged ``covered``."""
    gaps: list[tuple[int, int]] = []
    position = low
    for first, last in covered:
        if last < position:
            continue
        if first >= end:
            break
        if first > position:
            gaps.append((position, first - 1))
        position = max(position, last + 1)
    if position < end:
        gaps.append((position, end - 1))
    return gaps


def _size(ranges: Sequence[tuple[int, int]]) -> int:
    return sum(last - first + 1 for first, last in ranges)


def _inside(offset: int, covered: Sequence[tuple[int, int]]) -> bool:
    return any(first <= offset <= last for first, last in covered)


@dataclass
class PartitionAccount:
    """Where the offsets of one partition ended."""

    partition: int
    low: int
    high: int
    committed: int | None
    applied: int = 0
    valid: int = 0
    dead_lettered: int = 0
    lost_to_retention: int = 0
    pending: int = 0
    unaccounted: list[tuple[int, int]] = field(default_factory=list)
    photos_without_event: list[str] = field(default_factory=list)
    # Pending offsets at the committed offset while later ones are applied: a range whose
    # runs failed (the commit waits for it). Accounted for, but a reason to look.
    stalled: tuple[int, int] | None = None
    applied_after_stall: int = 0

    @property
    def ok(self) -> bool:
        return not self.unaccounted and not self.photos_without_event


def account_partition(
    db: Database,
    topic: str,
    partition: int,
    low: int,
    high: int,
    committed: int | None,
    topic_id: str | None = None,
) -> PartitionAccount:
    """Offsets in applied batches are applied; of the rest, those in ``[low, committed)`` are
    unaccounted (the group moved past them) and those in ``[committed, high)`` are pending.
    Every valid photo whose source offset is in an applied batch must have an event.

    With ``topic_id``, records of a deleted topic of the same name (another id) are left out;
    records without an id (written before ids were recorded) count as the current topic's."""
    account = PartitionAccount(partition, low, high, committed)
    of_topic = {} if topic_id is None else {"topicId": {"$in": [topic_id, None]}}
    batches = list(
        db.batches.find({"topic": topic, "partition": partition, "status": "applied", **of_topic})
    )
    covered = merge_ranges([(int(b["first"]), int(b["last"])) for b in batches])
    account.applied = _size(covered)
    account.valid = sum(int(b.get("valid", 0)) for b in batches)
    account.lost_to_retention = sum(int(b.get("lostToRetention", 0)) for b in batches)
    account.dead_lettered = db.dead_letters.count_documents(
        {"topic": topic, "partition": partition, **of_topic}
    )
    start = low if committed is None else max(low, committed)
    pending = uncovered(start, high, covered)
    account.pending = _size(pending)
    if pending:
        later = [(f, t) for f, t in covered if f > pending[0][1]]
        if later:
            account.stalled = pending[0]
            account.applied_after_stall = _size(later)
    if committed is not None:
        account.unaccounted = uncovered(low, committed, covered)
    unlinked = db.photos.find(
        {
            "eventId": None,
            "deadLettered": {"$ne": True},
            "source.topic": topic,
            "source.partition": partition,
            **({} if topic_id is None else {"source.topicId": {"$in": [topic_id, None]}}),
        },
        {"source": 1},
    )
    account.photos_without_event = sorted(
        p["_id"] for p in unlinked if _inside(int(p["source"]["offset"]), covered)
    )
    return account


def run_accounting(args: argparse.Namespace) -> int:
    with resources_from_env() as res:
        topic = args.topic or res.settings.uploads_topic
        kafka = res.kafka
        with kafka.consumer() as consumer:
            partitions = kafka.partitions(consumer, topic)
            marks = {p: kafka.watermarks(consumer, topic, p) for p in partitions}
            committed = kafka.committed(consumer, topic, partitions)
        topic_id = kafka.topic_id(topic)
        db = res.mongo.db()
        accounts = [
            account_partition(db, topic, p, marks[p].low, marks[p].high, committed.get(p), topic_id)
            for p in partitions
        ]
    print(f"topic {topic} (id {topic_id}), consumer group {kafka.consumer_group}")
    header = (
        "partition",
        "low",
        "high",
        "committed",
        "applied",
        "valid",
        "dead-lettered",
        "lost",
        "pending",
        "unaccounted",
        "no-event",
    )
    print("  ".join(f"{h:>13}" for h in header))
    for a in accounts:
        row = (
            a.partition,
            a.low,
            a.high,
            "-" if a.committed is None else a.committed,
            a.applied,
            a.valid,
            a.dead_lettered,
            a.lost_to_retention,
            a.pending,
            _size(a.unaccounted),
            len(a.photos_without_event),
        )
        print("  ".join(f"{v:>13}" for v in row))
    failed = False
    for a in accounts:
        for first, last in a.unaccounted[:EXAMPLES]:
            print(
                f"UNACCOUNTED {topic}/{a.partition} offsets {first}-{last}: below the "
                "committed offset, in no applied batch"
            )
        if a.photos_without_event:
            examples = ", ".join(a.photos_without_event[:EXAMPLES])
            print(
                f"NO EVENT {topic}/{a.partition}: {len(a.photos_without_event)} photos of "
                f"applied batches have no eventId, e.g. {examples}"
            )
        if a.stalled is not None:
            first, last = a.stalled
            print(
                f"STALLED {topic}/{a.partition} offsets {first}-{last}: pending while "
                f"{a.applied_after_stall} later offsets are applied; its runs have failed "
                "(see the runs tagged snapmap/partition in the UI); the commit waits for it"
            )
        failed = failed or not a.ok
    stalled = sum(1 for a in accounts if a.stalled is not None)
    if failed:
        print("accounting FAILED")
        return EXIT_FAILED
    if stalled:
        print(f"accounting ok, but {stalled} partition(s) STALLED: see the lines above")
        return EXIT_STALLED
    print("accounting ok: every offset is accounted for")
    return EXIT_OK


# ------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapmap", description="SnapMap event clustering: operator commands."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    recluster = commands.add_parser(
        "recluster", help="recluster UTC days of history by takenAt (the daily backfill)"
    )
    recluster.add_argument(
        "--from",
        dest="first",
        type=_day,
        required=True,
        metavar="DAY",
        help="first UTC day, YYYY-MM-DD",
    )
    recluster.add_argument(
        "--to", dest="last", type=_day, required=True, metavar="DAY", help="last UTC day, included"
    )
    recluster.add_argument("--radius-m", type=float, help="R in metres (default: settings)")
    recluster.add_argument("--window-s", type=float, help="W in seconds (default: settings)")
    recluster.add_argument(
        "--chunk-size", type=int, help="seed photos per recluster step (default: as daily_events)"
    )
    recluster.add_argument("--manifest-container", help="Blob container of event manifests")
    recluster.set_defaults(handler=run_recluster)

    stats = commands.add_parser("stats", help="counts of photos, events and outboxes")
    stats.add_argument("--json", action="store_true", help="one JSON object")
    stats.set_defaults(handler=run_stats)

    accounting = commands.add_parser(
        "accounting", help="where every offset of the uploads topic ended"
    )
    accounting.add_argument("--topic", help="uploads topic (default: settings, photo-uploads)")
    accounting.set_defaults(handler=run_accounting)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "recluster":
        from snapmap_pipeline.contract.validation import EARLIEST_TAKEN_AT

        first_day = EARLIEST_TAKEN_AT.date()
        if args.first < first_day:
            parser.error(
                f"--from {args.first} is before {first_day}, the first day of daily_events "
                "(no photo the upload contract accepts is taken earlier)"
            )
        if args.last < args.first:
            parser.error("--to is before --from")
        if args.chunk_size is not None and args.chunk_size <= 0:
            parser.error("--chunk-size must be positive")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from snapmap_pipeline.resources.kafka import KafkaUnavailable, TopicMissing

    try:
        return args.handler(args)
    except ConfigProblem as problem:
        print(f"snapmap: configuration error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except TopicMissing as error:
        # The broker answered: naming an outage here would send the reader the wrong way.
        print(f"snapmap: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KafkaUnavailable as error:
        print(f"snapmap: Kafka unavailable: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
