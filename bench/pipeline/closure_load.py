"""Time the closure load of each chunk of a stored day, as a backfill's chunks load them, and
optionally profile one chunk.

    python -m bench.pipeline.closure_load bench_<tag> [--profile FILE [--profile-chunk N]]

Reads only: the database of a ``backfill --keep`` run (or any database holding the simulated
day 2026-01-17), on the server ``MONGODB_URI`` names. Per chunk of 50,000 photos in
``(takenAt, _id)`` order it reads the chunk's time range, then grows the seed's closure
(``store.recluster._ClosureLoad``), leaving out the photos an earlier chunk's closure held, as
``recluster_day`` does; nothing is clustered or written. Prints one line per chunk: seed,
closure, seconds to read the range and to grow, rounds, queries and photos fetched; then the
day's totals. ``--profile`` alone profiles the whole day (chunk queries included).
"""

from __future__ import annotations

import argparse
import time
from datetime import timedelta

from pymongo import MongoClient

from bench.pipeline.common import DAY_END, env
from snapmap_pipeline.assets.backfill import DEFAULT_CHUNK_SIZE, day_photo_chunks
from snapmap_pipeline.clustering import ClusterParams
from snapmap_pipeline.store import recluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("database")
    parser.add_argument("--profile-chunk", type=int, help="profile this chunk (1 is the first)")
    parser.add_argument("--profile", help="write a pyinstrument text profile here")
    args = parser.parse_args()
    whole_day = None
    if args.profile and args.profile_chunk is None:
        from pyinstrument import Profiler

        whole_day = Profiler(interval=0.01)
        whole_day.start()

    db = MongoClient(env("MONGODB_URI"), tz_aware=True)[args.database]
    params = ClusterParams()
    reclustered: set[str] = set()
    totals = {"closure": 0, "rounds": 0, "queries": 0, "fetched": 0}
    day_started = time.perf_counter()
    chunks = day_photo_chunks(db, DAY_END - timedelta(days=1), DAY_END, DEFAULT_CHUNK_SIZE)
    for number, chunk in enumerate(chunks, start=1):
        profiler = None
        if number == args.profile_chunk:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.01)
            profiler.start()
        seed = [photo_id for photo_id in chunk.ids if photo_id not in reclustered]
        started = time.perf_counter()
        load = recluster._ClosureLoad(db, params)
        known = recluster._photos_taken_between(db, chunk.first, chunk.last)
        load.know(known, chunk.first, chunk.last)
        docs = {photo_id: known[photo_id] for photo_id in seed if photo_id in known}
        docs.update(recluster._photos_by(db, "_id", [i for i in seed if i not in known]))
        read_s = time.perf_counter() - started
        docs.update(load.grow(docs))
        grow_s = time.perf_counter() - started - read_s
        if profiler is not None:
            profiler.stop()
            with open(args.profile or "closure-load-profile.txt", "w") as out:
                out.write(profiler.output_text(unicode=False, color=False, show_all=False))
        reclustered.update(docs)
        for name, value in (
            ("closure", len(docs)),
            ("rounds", load.rounds),
            ("queries", load.queries),
            ("fetched", load.photos_fetched),
        ):
            totals[name] += value
        print(
            f"chunk {number}: seed {len(seed)}, closure {len(docs)}, range read {read_s:.1f} s, "
            f"grow {grow_s:.1f} s, {load.rounds} rounds, {load.queries} queries, "
            f"{load.photos_fetched} photos fetched",
            flush=True,
        )
    print(
        f"day: {time.perf_counter() - day_started:.1f} s, closures {totals['closure']}, "
        f"{totals['rounds']} rounds, {totals['queries']} queries, {totals['fetched']} photos "
        "fetched",
        flush=True,
    )
    if whole_day is not None:
        whole_day.stop()
        with open(args.profile, "w") as out:
            out.write(whole_day.output_text(unicode=False, color=False, show_all=False))


if __name__ == "__main__":
    main()
