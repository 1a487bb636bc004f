"""Backfill (issue 7, part 4): recluster one stored day through the daily partition
(``recluster_days`` job, partition 2026-01-17) and compare with the ceiling measured in the
same run on the same documents.

Per repetition, on a fresh database: the simulator's seeded day of ``--photos`` photos is
stored the way ingestion stores it (``insert_many``, not timed); then

- ``limit``: read every photo of the day (clustering projection, one range query streamed in
  batches of 10,000), write one document per event of the canonical result into a scratch
  collection and set a scratch field on every photo, in unordered bulks of 1,000: the same
  reads and writes of the same documents, with no pipeline around them (the clustering
  itself is not timed);
- ``backfill``: one run of the daily partition in a child process (its own Dagster instance),
  timed from launch to exit, with the child's own peak RSS (``VmHWM``), the run's seconds per
  step (Dagster's run step stats) and its materialization metadata;
- ``rerun`` (with ``--rerun``): the same partition once more in a new child process, on the
  day the first run left: the recluster of a day that already has its events, which is what a
  backfill of history usually is. Nothing changed, so it should write next to nothing.

``--keep`` leaves the day, its events and its topics in place (the run prints the database,
``bench_<tag>``); ``--again <tag>`` then measures the ceiling and the rerun once more on that
day, without storing and clustering it first, and removes it (unless ``--keep`` is given
again, to compare several versions of the code on one day). At 1,000,000 photos that is
about 20 minutes instead of 95, for comparing changes to the recluster of a day.

Run: ``python -m bench.pipeline.backfill --photos 100000 --repeat 3``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from datetime import timedelta

from pymongo import InsertOne, UpdateOne

from bench.pipeline.common import (
    DAY_END,
    emit,
    event_upserts,
    isolated_stack,
    machine,
    median,
    peak_rss_mb,
)
from snapmap_pipeline.clustering import ClusterParams, PhotoPoint, canonical_pass
from snapmap_pipeline.simulator.generator import StreamConfig, generate_stream
from snapmap_pipeline.store.geocell import cell_of

PARTITION = (DAY_END - timedelta(days=1)).date().isoformat()
BULK = 1000
PROJECTION = {"location": 1, "takenAt": 1, "eventId": 1, "cell": 1}


def store_day(db, photos: int, seed: int) -> int:
    """Store the day's photos as ingestion leaves them (no eventId yet)."""
    config = StreamConfig(end=DAY_END, photos=photos, seed=seed)
    documents = {}
    for record in generate_stream(config):
        if record.stores_photo and record.photo is not None:
            photo = record.photo
            documents[photo.photo_id] = {
                "_id": photo.photo_id,
                "location": {"type": "Point", "coordinates": [photo.lon, photo.lat]},
                "cell": cell_of(photo.lon, photo.lat),
                "takenAt": photo.taken_at,
                "storageUrl": photo.storage_url,
                "uploadedAt": record.publish_at,
                "eventId": None,
            }
    values = list(documents.values())
    for start in range(0, len(values), 5000):
        db.photos.bulk_write([InsertOne(d) for d in values[start : start + 5000]], ordered=False)
    return len(values)


def measure_limit(db) -> dict:
    start_day, end_day = DAY_END - timedelta(days=1), DAY_END
    started = time.perf_counter()
    # One range query, streamed in batches: the plain way to read a day. (Sorted pages of
    # 50,000 made the local server sort the rest of the day for each page until it read such
    # pages in index order: at 300,000 photos the first page outlasted the 30 s timeout.)
    query = {"takenAt": {"$gte": start_day, "$lt": end_day}}
    documents = list(db.photos.find(query, PROJECTION, batch_size=10_000))
    read_s = time.perf_counter() - started

    points = [PhotoPoint(d["_id"], d["takenAt"], *d["location"]["coordinates"]) for d in documents]
    result = canonical_pass(points, ClusterParams())

    started = time.perf_counter()
    events = event_upserts(result)
    for start in range(0, len(events), BULK):
        db.limit_events.bulk_write(events[start : start + BULK], ordered=False)
    event_s = time.perf_counter() - started

    started = time.perf_counter()
    links = [
        UpdateOne({"_id": photo_id}, {"$set": {"limitEventId": event_id}})
        for photo_id, event_id in result.assignment.items()
    ]
    for start in range(0, len(links), BULK):
        db.photos.bulk_write(links[start : start + BULK], ordered=False)
    link_s = time.perf_counter() - started
    db.limit_events.drop()
    total = read_s + event_s + link_s
    return {
        "photos": len(documents),
        "events": len(events),
        "read_s": round(read_s, 2),
        "event_write_s": round(event_s, 2),
        "photo_write_s": round(link_s, 2),
        # Unrounded: the ratios and the growth fit divide by it.
        "total_s": total,
        "photos_per_s": len(documents) / total,
    }


def _child(specs: dict, chunk_size: int, profile: str | None, pipe) -> None:
    """Run the daily partition in this process; report seconds, peak RSS and metadata."""
    from dagster import instance_for_test

    from snapmap_pipeline.definitions import build_definitions
    from snapmap_pipeline.jobs import RECLUSTER_JOB_NAME

    resources = {name: cls(**fields) for name, (cls, fields) in specs.items()}
    job = build_definitions(resources).resolve_job_def(RECLUSTER_JOB_NAME)
    config = {"ops": {"daily_events": {"config": {"chunk_size": chunk_size}}}}
    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.01)
        profiler.start()
    with instance_for_test() as instance:
        started = time.perf_counter()
        result = job.execute_in_process(
            run_config=config, instance=instance, partition_key=PARTITION
        )
        seconds = time.perf_counter() - started
        step_s = {
            stats.step_key: round(stats.end_time - stats.start_time, 2)
            for stats in instance.get_run_step_stats(result.run_id)
            if stats.start_time is not None and stats.end_time is not None
        }
        metadata = {}
        for event in result.get_asset_materialization_events():
            for key, value in event.materialization.metadata.items():
                if isinstance(value.value, int | float):
                    metadata[key] = value.value
    if profiler is not None:
        profiler.stop()
        with open(profile, "w") as out:
            out.write(profiler.output_text(unicode=False, color=False, show_all=False))
    pipe.send(
        {"run_s": seconds, "peak_rss_mb": peak_rss_mb(), "step_s": step_s, "metadata": metadata}
    )
    pipe.close()


def run_backfill(stack, chunk_size: int, profile: str | None = None) -> dict:
    specs = {name: (type(r), r.model_dump()) for name, r in stack.resources.items()}
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    started = time.perf_counter()
    child = context.Process(target=_child, args=(specs, chunk_size, profile, sender))
    child.start()
    sender.close()  # the child's copy is the only writer: a child that dies ends the read
    try:
        report = receiver.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"backfill child exited with {child.exitcode}, no report") from None
    child.join()
    report["launch_to_exit_s"] = time.perf_counter() - started
    if child.exitcode != 0:
        raise RuntimeError(f"backfill child exited with {child.exitcode}")
    return report


def _summary(report: dict, limit: dict) -> dict:
    return {
        "backfill_s": round(report["launch_to_exit_s"], 2),
        "backfill_run_s": round(report["run_s"], 2),
        "peak_rss_mb": round(report["peak_rss_mb"], 1),
        "ratio_to_limit": round(report["launch_to_exit_s"] / limit["total_s"], 2),
        "step_s": report["step_s"],
        "run_metadata": report["metadata"],
    }


def one_run(
    photos: int,
    seed: int,
    chunk_size: int,
    profile: str | None = None,
    rerun: bool = False,
    keep: bool = False,
) -> dict:
    with isolated_stack(keep=keep) as stack:
        db = stack.mongo.db()
        started = time.perf_counter()
        stored = store_day(db, photos, seed)
        store_s = time.perf_counter() - started
        limit = measure_limit(db)
        backfill = run_backfill(stack, chunk_size, profile)
        linked = db.photos.count_documents({"eventId": {"$ne": None}})
        again = run_backfill(stack, chunk_size) if rerun else None
    summary = {
        "kept": stack.mongo.database if keep else None,
        "photos_stored": stored,
        "store_s": round(store_s, 1),
        "limit": limit,
        "photos_linked": linked,
        **_summary(backfill, limit),
    }
    if again is not None:
        summary["rerun"] = _summary(again, limit)
    return summary


def rerun_kept(tag: str, chunk_size: int, profile: str | None = None, keep: bool = False) -> dict:
    """The partition run again on the day a ``--keep`` run left (database ``bench_<tag>``),
    with the ceiling measured again on it; the kept run's names are removed afterwards
    unless ``keep``."""
    with isolated_stack(keep=keep, tag=tag) as stack:
        db = stack.mongo.db()
        stored = db.photos.estimated_document_count()
        if not stored:
            sys.exit(f"no photos in {stack.mongo.database}: not a kept backfill run")
        # The rerun first: its figures stand even if the ceiling is cut short.
        again = run_backfill(stack, chunk_size, profile)
        print(json.dumps({"rerun_before_ceiling": again}, default=str), flush=True)
        limit = measure_limit(db)
    return {"photos_stored": stored, "limit": limit, "rerun": _summary(again, limit)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=50_000)
    parser.add_argument("--profile", help="write a pyinstrument text profile of the run here")
    parser.add_argument(
        "--rerun", action="store_true", help="run the partition a second time on the same day"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the day, its events and its names after the run, for --again",
    )
    parser.add_argument(
        "--again",
        metavar="TAG",
        help="run the partition again on the day a --keep run left (bench_TAG), then remove it "
        "unless --keep",
    )
    args = parser.parse_args()

    before = machine()
    if args.again:
        run = rerun_kept(args.again, args.chunk_size, args.profile, args.keep)
        emit(
            "backfill",
            {
                "command": f"python -m bench.pipeline.backfill --again {args.again} "
                f"--chunk-size {args.chunk_size}" + (" --keep" if args.keep else ""),
                "partition": PARTITION,
                "machine_before": before,
                "machine_after": machine(),
                "runs": [run],
            },
        )
        return
    runs = []
    for index in range(args.repeat):
        run = one_run(
            args.photos, args.seed + index, args.chunk_size, args.profile, args.rerun, args.keep
        )
        print(json.dumps({"run": index + 1, **run}, default=str), flush=True)
        runs.append(run)
    emit(
        "backfill",
        {
            "command": f"python -m bench.pipeline.backfill --photos {args.photos} "
            f"--repeat {args.repeat} --seed {args.seed} --chunk-size {args.chunk_size}"
            + (" --rerun" if args.rerun else "")
            + (" --keep" if args.keep else ""),
            "partition": PARTITION,
            "machine_before": before,
            "machine_after": machine(),
            "median": {
                "backfill_s": median([r["backfill_s"] for r in runs]),
                "limit_s": median([r["limit"]["total_s"] for r in runs]),
                "ratio_to_limit": median([r["ratio_to_limit"] for r in runs]),
                "peak_rss_mb": median([r["peak_rss_mb"] for r in runs]),
                **(
                    {"rerun_s": median([r["rerun"]["backfill_s"] for r in runs])}
                    if args.rerun
                    else {}
                ),
            },
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
