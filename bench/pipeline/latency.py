"""Latency (issue 7, part 3): publish the seeded stream at a steady rate (200 photos/s) for a
while and report p50 and p95 of produce-to-``photo.eventId`` per valid photo, plus where the
time goes: waiting for the next sensor tick, the tick, waiting behind earlier runs, the run's
start-up, read/validate/upsert, the recluster's load/cluster/write and the link step.

Photos published in the first ``--warmup`` seconds are left out (the first run pays one-off
imports and schema creation). Run:
``python -m bench.pipeline.latency --rate 200 --seconds 60 --repeat 3``.
"""

from __future__ import annotations

import argparse
import json

from dagster import instance_for_test

from bench.pipeline.common import (
    emit,
    isolated_stack,
    machine,
    median,
    percentile,
    upload_records,
)
from bench.pipeline.driver import (
    SENSOR_INTERVAL_S,
    Driver,
    Publisher,
    latencies,
    run_overheads,
    stage_breakdown,
)


def one_run(rate: float, seconds: float, seed: int, warmup: float) -> dict:
    count = int(rate * seconds)
    records = upload_records(count, seed)[:count]
    with isolated_stack() as stack, instance_for_test() as instance:
        publisher = Publisher(stack.kafka, stack.settings.uploads_topic, records, rate)
        driver = Driver(instance, stack.resources)
        publisher.start()

        def done() -> bool:
            if publisher.is_alive():
                return False
            covered = sum(r.last - r.first + 1 for r in driver.runs)
            return covered >= len(publisher.produced_at)

        driver.loop(done, deadline_s=seconds * 20 + 600)
        publisher.join()
    cutoff = publisher.started_at + warmup
    kept = [
        run
        for run in driver.runs
        if publisher.produced_at.get((run.partition, run.first), 0.0) >= cutoff
    ]
    values = latencies(publisher, kept)
    return {
        "messages": len(records),
        "runs": len(driver.runs),
        "runs_measured": len(kept),
        "photos_measured": len(values),
        "achieved_rate_per_s": round(
            len(records) / (publisher.finished_at - publisher.started_at), 1
        ),
        "p50_s": round(percentile(values, 50), 2),
        "p95_s": round(percentile(values, 95), 2),
        "max_s": round(max(values), 2) if values else None,
        "mean_s_per_photo_by_stage": stage_breakdown(publisher, kept),
        "per_run_median_s": run_overheads(kept) if kept else {},
        "photos_per_run_median": median([r.last - r.first + 1 for r in kept]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()

    before = machine()
    runs = []
    for index in range(args.repeat):
        run = one_run(args.rate, args.seconds, args.seed + index, args.warmup)
        print(json.dumps({"run": index + 1, **run}, default=str), flush=True)
        runs.append(run)
    emit(
        "latency",
        {
            "command": f"python -m bench.pipeline.latency --rate {args.rate:g} "
            f"--seconds {args.seconds:g} --repeat {args.repeat} --seed {args.seed}",
            "sensor_interval_s": SENSOR_INTERVAL_S,
            "target_p95_s": SENSOR_INTERVAL_S + 10.0,
            "machine_before": before,
            "machine_after": machine(),
            "median": {
                "p50_s": median([r["p50_s"] for r in runs]),
                "p95_s": median([r["p95_s"] for r in runs]),
            },
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
