"""Streaming throughput (issue 7, part 2): publish the simulator's seeded day as fast as the
producer can, and measure photos per second from the first publish to the last
``photo.eventId`` written, through the real sensor and runs (see ``driver``).

The ceiling is measured in the same run, on the same data, right after: ``limit.one_run``.
Run: ``python -m bench.pipeline.stream --photos 20000 --repeat 3``.
"""

from __future__ import annotations

import argparse
import json
import time

from dagster import instance_for_test

from bench.pipeline import limit
from bench.pipeline.common import emit, isolated_stack, machine, median, upload_records
from bench.pipeline.driver import Driver, Publisher, run_overheads, stage_breakdown


def one_run(photos: int, seed: int, rate: float, batch: int) -> dict:
    records = upload_records(photos, seed)
    with isolated_stack(max_messages_per_run=batch) as stack, instance_for_test() as instance:
        publisher = Publisher(stack.kafka, stack.settings.uploads_topic, records, rate)
        driver = Driver(instance, stack.resources)
        publisher.start()
        expected = len(records)

        def done() -> bool:
            if publisher.is_alive() or len(publisher.produced_at) < expected:
                return False
            covered = sum(r.last - r.first + 1 for r in driver.runs)
            return covered >= expected

        driver.loop(done, deadline_s=3600)
        publisher.join()
        linked_at = max(r.linked_at for r in driver.runs)
        elapsed = linked_at - publisher.started_at
        db = stack.mongo.db()
        valid = len(publisher.valid_offsets)
        photos_linked = db.photos.count_documents({"eventId": {"$ne": None}})
        pipeline_s = linked_at - driver.runs[0].tick_started
    return {
        "messages": expected,
        "valid_messages": valid,
        "photos_linked": photos_linked,
        "runs": len(driver.runs),
        "publish_s": round(publisher.finished_at - publisher.started_at, 2),
        "publish_to_last_link_s": round(elapsed, 2),
        "photos_per_s": photos_linked / elapsed,
        "photos_per_s_from_first_tick": photos_linked / pipeline_s,
        "per_run_median_s": run_overheads(driver.runs),
        "mean_s_per_photo_by_stage": stage_breakdown(publisher, driver.runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s; 0: unthrottled")
    parser.add_argument("--batch", type=int, default=5000, help="max_messages_per_run")
    args = parser.parse_args()

    before = machine()
    runs = []
    for index in range(args.repeat):
        seed = args.seed + index
        started = time.time()
        run = one_run(args.photos, seed, args.rate, args.batch)
        run["limit"] = limit.one_run(args.photos, seed)
        run["ratio_to_limit"] = run["photos_per_s"] / run["limit"]["stream_limit_photos_per_s"]
        run["wall_s"] = round(time.time() - started, 1)
        print(json.dumps({"run": index + 1, **run}, default=str), flush=True)
        runs.append(run)
    emit(
        "stream",
        {
            "command": f"python -m bench.pipeline.stream --photos {args.photos} "
            f"--repeat {args.repeat} --seed {args.seed} --rate {args.rate:g} --batch {args.batch}",
            "machine_before": before,
            "machine_after": machine(),
            "median": {
                "photos_per_s": round(median([r["photos_per_s"] for r in runs]), 1),
                "stream_limit_photos_per_s": round(
                    median([r["limit"]["stream_limit_photos_per_s"] for r in runs]), 1
                ),
                "ratio_to_limit": round(median([r["ratio_to_limit"] for r in runs]), 3),
            },
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
