"""Command line of the upload simulator.

    python -m snapmap_pipeline.simulator simulate [--photos 3000] [--seed N] [--rate 200] ...
    python -m snapmap_pipeline.simulator replay [--csv PATH] [--limit N] [--speedup 0] ...
    python -m snapmap_pipeline.simulator summary [--json] [--expect REPORT] [--wait SECONDS]

``simulate`` publishes a generated day (see ``generator``) through the simulated upload backend;
``replay`` publishes real New York check-ins (E. Cho, S. A. Myers, J. Leskovec, "Friendship and
Mobility: User Movement in Location-Based Social Networks", KDD 2011) with their original
timestamps. Both can write a report (``--report``) of what they published, which ``summary
--expect`` compares with what the pipeline made of it in MongoDB. Connection settings come from
the environment that ``scripts/env.sh`` exports; ``--topic``, ``--database`` and
``--container`` point a run at its own topic, database and blob container.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from pymongo import DESCENDING, MongoClient
from pymongo.database import Database
from pymongo.errors import PyMongoError

from snapmap_pipeline.simulator.backend import (
    BackendError,
    BackendSettings,
    Schedule,
    UploadBackend,
    as_fast_as_possible,
    at_rate,
    at_speedup,
)
from snapmap_pipeline.simulator.generator import (
    DEFAULT_CONTAINER,
    StreamConfig,
    UploadRecord,
    generate_stream,
    photo_id_prefix,
    records_from_checkins,
    tally,
)

log = logging.getLogger("snapmap_pipeline.simulator")

DEFAULT_CHECKINS = (
    Path(__file__).resolve().parents[2].parent / "shared/data/gowalla_nyc_2009-04_2010-06.csv"
)
CHECKIN_COLUMNS = ("photo_id", "timestamp_utc_iso", "lon", "lat")
# Photos without an event whose message the pipeline never consumed (it sets ``source``).
_NEVER_CONSUMED = {"eventId": None, "source": {"$exists": False}, "deadLettered": {"$ne": True}}
SIZE_BUCKETS = ((1, 1), (2, 5), (6, 20), (21, 100), (101, 1000), (1001, None))
EXIT_NOT_CAUGHT_UP = 3


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The Azure SDK logs every HTTP request and response at INFO.
    logging.getLogger("azure").setLevel(logging.WARNING)
    try:
        return args.command(args)
    except (BackendError, PyMongoError, ValueError, OSError) as error:
        log.error("%s", error)
        return 1


def simulate(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    end = _parse_end(args.end)
    lon, lat = args.centre
    config = StreamConfig(
        end=end,
        photos=args.photos,
        seed=seed,
        centre_lon=lon,
        centre_lat=lat,
        container=args.container,
    )
    records = list(generate_stream(config))
    planned = tally(records)
    log.info(
        "generated %d records (seed %d, day ending %s): %s",
        len(records),
        seed,
        config.end.isoformat(),
        planned["kinds"],
    )
    report = {
        "mode": "simulate",
        "seed": seed,
        "end": config.end.isoformat(),
        "photos": args.photos,
        "photoIdPrefix": photo_id_prefix(seed),
        "stream": planned,
    }
    if args.dry_run:
        print(json.dumps(report, indent=2))
        return 0
    schedule = at_rate(args.rate) if args.rate else as_fast_as_possible
    return _publish(args, records, schedule, report)


def replay(args: argparse.Namespace) -> int:
    path = Path(args.csv)
    frame = pd.read_csv(path, nrows=args.limit, dtype={"photo_id": str, "timestamp_utc_iso": str})
    missing = [c for c in CHECKIN_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks the columns {', '.join(missing)}")
    frame = frame.sort_values("timestamp_utc_iso", kind="stable")
    rows = zip(*(frame[c].tolist() for c in CHECKIN_COLUMNS), strict=True)
    records = list(records_from_checkins(rows, container=args.container))
    if not records:
        raise ValueError(f"{path} has no rows to replay")
    log.info(
        "replaying %d check-ins from %s (%s to %s); data: Cho, Myers, Leskovec, KDD 2011",
        len(records),
        path.name,
        records[0].publish_at.isoformat(),
        records[-1].publish_at.isoformat(),
    )
    schedule = as_fast_as_possible
    if args.speedup:
        schedule = at_speedup(args.speedup, records[0].publish_at)
    ids = [r.photo.photo_id for r in records]
    report = {
        "mode": "replay",
        "csv": str(path),
        "rows": len(records),
        "photoIdPrefix": os.path.commonprefix(ids),
        "stream": tally(records),
    }
    return _publish(args, records, schedule, report)


def _publish(
    args: argparse.Namespace, records: list[UploadRecord], schedule: Schedule, report: dict
) -> int:
    settings = BackendSettings.from_environment(
        os.environ, topic=args.topic, database=args.database, container=args.container
    )
    with UploadBackend(settings, args.batch, args.progress_every) as backend:
        published = backend.publish(records, schedule, total=len(records))
    report |= {
        "topic": settings.topic,
        "topicId": backend.topic_id,
        "database": settings.database,
        "container": settings.container,
        "backend": published.as_dict(),
    }
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(_render_publish(report))
    return 0


def summary(args: argparse.Namespace) -> int:
    # The pipeline's own counts come with the code location; imported here so that simulate
    # and replay (a stand-in for another service) run without it.
    from snapmap_pipeline.cli import collect_stats

    expected = json.loads(Path(args.expect).read_text("utf-8")) if args.expect else None
    uri = os.environ.get("MONGODB_URI")
    if not uri:
        raise ValueError("MONGODB_URI not set: run `source scripts/env.sh` first")
    database = args.database or os.environ.get("MONGODB_DATABASE") or "snapmap"
    client = MongoClient(
        uri,
        tz_aware=True,
        serverSelectionTimeoutMS=10_000,
        connectTimeoutMS=10_000,
        socketTimeoutMS=30_000,
        appname="snapmap-simulator-summary",
    )
    try:
        db = client[database]
        found = collect_summary(db, collect_stats(db), expected)
        deadline = time.monotonic() + args.wait
        while not found["caughtUp"] and time.monotonic() < deadline:
            log.info("waiting for the pipeline: %s", _progress(found))
            time.sleep(min(args.poll, max(deadline - time.monotonic(), 0.0)))
            found = collect_summary(db, collect_stats(db), expected)
    finally:
        client.close()
    found["database"] = database
    if args.json:
        print(json.dumps(found, indent=2, default=_json_default))
    else:
        print(render_summary(found))
    if args.wait and not found["caughtUp"]:
        log.warning("the pipeline had not caught up after %g s: %s", args.wait, _progress(found))
        return EXIT_NOT_CAUGHT_UP
    return 0


def collect_summary(db: Database, stats: dict, expected: dict | None = None) -> dict:
    """The pipeline's counts (``stats``, from ``snapmap stats``) explained: photos without an
    event split by why, and the distribution of event sizes; with ``expected`` (a simulate or
    replay report) also that run's own photos and dead letters, and whether the pipeline has
    caught up with it."""
    unconsumed = db.photos.count_documents(_NEVER_CONSUMED)
    live = {"mergedInto": None, "photoCount": {"$gt": 0}}  # store.events.LIVE_EVENTS
    sizes = np.array(
        [int(d.get("photoCount", 0)) for d in db.events.find(live, {"photoCount": 1})], dtype=int
    )
    largest = list(
        db.events.find(
            live, {"photoCount": 1, "startAt": 1, "endAt": 1, "centroid": 1, "radiusM": 1}
        )
        .sort("photoCount", DESCENDING)
        .limit(5)
    )
    result = {
        "photos": {
            "stored": stats["photos"],
            "withEvent": stats["photos_with_event"],
            "withoutEvent": stats["photos"] - stats["photos_with_event"],
            "neverConsumed": unconsumed,
            "consumedNotLinked": stats["orphan_photos"] - unconsumed,
            "deadLettered": stats["dead_lettered_photos"],
        },
        "events": {
            "live": stats["live_events"],
            "tombstones": stats["tombstones"],
            "retired": stats["retired_events"],
            "sizes": _size_distribution(sizes),
            "largest": [_event_row(d) for d in largest],
        },
        "queues": {
            "pendingLinks": stats["pending_links"],
            "pendingPublishes": stats["pending_publishes"],
            "pendingManifests": stats["pending_manifests"],
        },
        "deadLetters": stats["dead_letters_by_code"],
    }
    result["run"] = _run_summary(db, expected) if expected else None
    result["caughtUp"] = _caught_up(result)
    return result


def _run_summary(db: Database, expected: dict) -> dict:
    """One run's photos (by id prefix) and dead letters (by the offsets it produced, of the
    topic id the report names).

    Records of another topic id at the same offsets are of a topic since deleted and created
    again under the same name, and so are records without an id: the pipeline has recorded
    every letter's topic id since before reports named it. A report without ``topicId``
    (written before it did) counts every record at its offsets, whatever topic it was of."""
    scope: dict = {}
    prefix = expected.get("photoIdPrefix") or ""
    if prefix:
        # Photo ids use only characters below 0x7f, so this range is exactly the prefix.
        scope = {"_id": {"$gte": prefix, "$lt": prefix + "\x7f"}}
    photos = db.photos.count_documents(scope)
    linked = db.photos.count_documents(scope | {"eventId": {"$ne": None}})
    unconsumed = db.photos.count_documents(scope | _NEVER_CONSUMED)
    poison = db.photos.count_documents(scope | {"eventId": None, "deadLettered": True})
    letters: Counter[str] = Counter()
    for partition, (first, last) in expected.get("backend", {}).get("offsets", {}).items():
        query = {
            "topic": expected.get("topic"),
            "partition": int(partition),
            "offset": {"$gte": first, "$lte": last},
        }
        if expected.get("topicId"):
            query["topicId"] = expected["topicId"]
        letters.update(d.get("code", "?") for d in db.dead_letters.find(query, {"code": 1}))
    stream = expected.get("stream", {})
    kinds = stream.get("kinds", {})
    return {
        "mode": expected.get("mode"),
        "photoIdPrefix": prefix,
        "expected": {
            "photosStored": stream.get("photosStored", 0),
            "lost": kinds.get("lost", 0),
            "duplicates": kinds.get("duplicate", 0),
            "deadLetters": kinds.get("malformed", 0),
            "malformed": stream.get("malformed", {}),
        },
        "found": {
            "photosStored": photos,
            "withEvent": linked,
            "neverConsumed": unconsumed,
            "deadLetteredPhotos": poison,
            "consumedNotLinked": photos - linked - unconsumed - poison,
            "deadLetters": sum(letters.values()),
            "deadLettersByCode": dict(letters.most_common()),
        },
    }


def _caught_up(result: dict) -> bool:
    """Every photo has its event except lost ones (no message) and dead-lettered ones, every
    malformed message of the run is a dead letter, and nothing waits in the pipeline's queues
    (links, event-updates, manifests). Offsets still in a run that has linked its photos but
    not finished are not seen here: ``snapmap accounting`` reads those from Kafka."""
    if any(result["queues"].values()):
        return False
    run = result["run"]
    if run is None:
        photos = result["photos"]
        return photos["neverConsumed"] == 0 and photos["consumedNotLinked"] == 0
    expected, found = run["expected"], run["found"]
    return (
        found["photosStored"] >= expected["photosStored"]
        and found["consumedNotLinked"] == 0
        and found["neverConsumed"] <= expected["lost"]
        and found["deadLetters"] >= expected["deadLetters"]
    )


def _progress(result: dict) -> str:
    queues = result["queues"]
    waiting = (
        f"; queued: {queues['pendingLinks']} links, {queues['pendingPublishes']} event updates, "
        f"{queues['pendingManifests']} manifests"
    )
    run = result["run"]
    if run is None:
        photos = result["photos"]
        return f"{photos['withEvent']} of {photos['stored']} photos have an event{waiting}"
    found, expected = run["found"], run["expected"]
    return (
        f"{found['withEvent']} of {found['photosStored']} photos have an event "
        f"({expected['lost']} lost ones wait for the sweeper), "
        f"{found['deadLetters']} of {expected['deadLetters']} dead letters{waiting}"
    )


def _size_distribution(sizes: np.ndarray) -> dict:
    if sizes.size == 0:
        return {"min": None, "median": None, "max": None, "buckets": {}}
    buckets = {}
    for low, high in SIZE_BUCKETS:
        inside = (sizes >= low) if high is None else ((sizes >= low) & (sizes <= high))
        label = f"{low}+" if high is None else (str(low) if low == high else f"{low}-{high}")
        buckets[label] = int(inside.sum())
    return {
        "min": int(sizes.min()),
        "median": float(np.median(sizes)),
        "max": int(sizes.max()),
        "buckets": buckets,
    }


def _event_row(document: dict) -> dict:
    lon, lat = (document.get("centroid") or {}).get("coordinates", [None, None])
    return {
        "eventId": document["_id"],
        "photos": document.get("photoCount"),
        "startAt": document.get("startAt"),
        "endAt": document.get("endAt"),
        "lon": lon,
        "lat": lat,
        "radiusM": document.get("radiusM"),
    }


def render_summary(found: dict) -> str:
    """The summary as a table for people."""
    photos, events = found["photos"], found["events"]
    sizes = events["sizes"]
    lines = [
        f"SnapMap pipeline summary (database {found.get('database', '?')})",
        "",
        "Photos",
        _row("stored", photos["stored"]),
        _row("with an event", photos["withEvent"]),
        _row("without an event (orphans)", photos["withoutEvent"]),
        _row("  not consumed yet (lost ones wait for the sweeper)", photos["neverConsumed"]),
        _row("  message consumed, not linked yet", photos["consumedNotLinked"]),
        _row("  dead-lettered after failed attempts", photos["deadLettered"]),
        "",
        "Events",
        _row("live", events["live"]),
        _row("tombstones (merged into another)", events["tombstones"]),
        _row("retired (their photos dead-lettered)", events["retired"]),
    ]
    if sizes["max"] is not None:
        lines.append(
            _row(
                "photos per live event",
                f"min {sizes['min']}  median {sizes['median']:g}  max {sizes['max']}",
            )
        )
        lines.append(
            _row("events by size", "  ".join(f"{k}: {v}" for k, v in sizes["buckets"].items()))
        )
        lines += ["", "Largest events", _largest_table(events["largest"])]
    queues = found["queues"]
    lines += [
        "",
        "Pipeline queues",
        _row("photo links not applied yet", queues["pendingLinks"]),
        _row("event updates not published yet", queues["pendingPublishes"]),
        _row("event manifests not written yet", queues["pendingManifests"]),
        "",
        "Dead letters by code",
    ]
    if found["deadLetters"]:
        lines += [_row(code, count) for code, count in found["deadLetters"].items()]
    else:
        lines.append(_row("(none)", 0))
    run = found.get("run")
    if run:
        expected, got = run["expected"], run["found"]
        lines += [
            "",
            f"This {run['mode']} run (photo ids {run['photoIdPrefix'] or '(all)'}*): "
            "expected / found",
            _row(
                "photos stored (valid + lost)",
                f"{expected['photosStored']} / {got['photosStored']}",
            ),
            _row(
                "lost: no message, waiting for the sweeper",
                f"{expected['lost']} / {got['neverConsumed']}",
            ),
            _row("photos without event otherwise", f"0 / {got['consumedNotLinked']}"),
            _row(
                "dead letters (malformed messages)",
                f"{expected['deadLetters']} / {got['deadLetters']}",
            ),
            _row("duplicate messages (absorbed by upserts)", expected["duplicates"]),
        ]
        if got["deadLettersByCode"]:
            codes = ", ".join(f"{k} {v}" for k, v in got["deadLettersByCode"].items())
            lines.append(_row("  dead letters by code", codes))
    lines += ["", f"caught up: {'yes' if found['caughtUp'] else 'no'}"]
    return "\n".join(lines)


def _largest_table(rows: list[dict]) -> str:
    header = f"  {'event':<28} {'photos':>7}  {'start (UTC)':<19}  {'end (UTC)':<19}  centre"
    lines = [header]
    for row in rows:
        lines.append(
            f"  {str(row['eventId'])[:28]:<28} {row['photos']:>7}  {_when(row['startAt']):<19}  "
            f"{_when(row['endAt']):<19}  {_where(row)}"
        )
    return "\n".join(lines)


def _render_publish(report: dict) -> str:
    stream, backend = report["stream"], report["backend"]
    lines = [
        f"Published ({report['mode']}) to topic {report['topic']}, database "
        f"{report['database']}, container {report['container']}",
        _row("records", stream["records"]),
    ]
    lines += [_row(f"  {kind}", count) for kind, count in stream["kinds"].items()]
    lines += [_row(f"    malformed: {k}", v) for k, v in stream["malformed"].items()]
    lines += [
        _row("photos stored (document and blob)", backend["photosStored"]),
        _row("messages acknowledged by the broker", backend["delivered"]),
    ]
    if report["mode"] == "simulate":
        lines += [
            _row("photos by gathering", _pairs(stream["photosByGathering"])),
            _row("gatherings", _pairs(stream["gatherings"])),
            _row("largest of each kind", _pairs(stream["largestGathering"])),
            _row("upload delay", _pairs(stream["uploadDelay"])),
        ]
    lines.append(_row("elapsed", f"{backend['elapsedS']:.1f} s"))
    return "\n".join(lines)


def _row(label: str, value: object) -> str:
    return f"  {label:<52} {value}"


def _pairs(values: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items()) or "-"


def _when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _where(row: dict) -> str:
    if row["lon"] is None:
        return "-"
    radius = f", r {row['radiusM']:.0f} m" if row.get("radiusM") is not None else ""
    return f"[{row['lon']:.5f}, {row['lat']:.5f}]{radius}"


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _parse_end(text: str | None) -> datetime:
    if not text:
        return datetime.now(UTC)
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"--end {text!r} needs a UTC offset or Z")
    return moment.astimezone(UTC)


def _centre(text: str) -> tuple[float, float]:
    try:
        lon, lat = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected LON,LAT in degrees") from None
    return lon, lat


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m snapmap_pipeline.simulator",
        description="Simulated uploads for the SnapMap pipeline, and a summary of its results.",
    )
    commands = parser.add_subparsers(required=True, metavar="simulate|replay|summary")

    def targets(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--topic", default="photo-uploads", help="Kafka topic to publish to")
        sub.add_argument("--database", help="MongoDB database (default: $MONGODB_DATABASE)")
        sub.add_argument("--container", default=DEFAULT_CONTAINER, help="blob container")
        sub.add_argument("--batch", type=int, default=200, help="photos per bulk write")
        sub.add_argument("--progress-every", type=int, default=1000, help="log every N records")
        sub.add_argument("--report", help="write what was published to this JSON file")

    sim = commands.add_parser("simulate", help="publish a generated day of uploads")
    sim.add_argument("--photos", type=int, default=3000, help="distinct photos (default 3000)")
    sim.add_argument("--seed", type=int, help="random seed (default: random, logged)")
    sim.add_argument("--end", help="end of the simulated day, ISO 8601 with offset (now)")
    sim.add_argument(
        "--centre",
        type=_centre,
        default=(81.8463, 25.4358),
        help="city centre LON,LAT in degrees (default Prayagraj: 81.8463,25.4358)",
    )
    sim.add_argument("--rate", type=float, default=0.0, help="records/s (0: as fast as possible)")
    sim.add_argument("--dry-run", action="store_true", help="print the plan, touch no server")
    targets(sim)
    sim.set_defaults(command=simulate)

    rep = commands.add_parser("replay", help="publish real check-ins from a CSV")
    rep.add_argument("--csv", default=str(DEFAULT_CHECKINS), help="check-ins CSV")
    rep.add_argument("--limit", type=int, help="take only the first N rows")
    rep.add_argument(
        "--speedup",
        type=float,
        default=0.0,
        help="replay N times faster than the original timeline (0: as fast as possible)",
    )
    targets(rep)
    rep.set_defaults(command=replay)

    summ = commands.add_parser("summary", help="what the pipeline holds in MongoDB")
    summ.add_argument("--database", help="MongoDB database (default: $MONGODB_DATABASE)")
    summ.add_argument("--json", action="store_true", help="print JSON instead of a table")
    summ.add_argument("--expect", help="a --report file: compare that run with what was found")
    summ.add_argument(
        "--wait",
        type=float,
        default=0.0,
        help="poll up to this many seconds until the pipeline has caught up (exit 3 if not)",
    )
    summ.add_argument("--poll", type=float, default=5.0, help="seconds between polls")
    summ.set_defaults(command=summary)
    return parser


if __name__ == "__main__":
    sys.exit(main())
