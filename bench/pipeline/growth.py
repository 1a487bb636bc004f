"""Growth (issue 7, part 5): the same backfill as ``bench.pipeline.backfill`` at several day
sizes; fits ``time = c * n**k`` by least squares on log-log medians and compares ``k`` with
the local slope of ``n log n`` over the same sizes (``1 + 1/ln n``, about 1.08).

Run: ``python -m bench.pipeline.growth --sizes 100000 300000 --repeat 1``.
"""

from __future__ import annotations

import argparse
import json
import math

from bench.pipeline import backfill
from bench.pipeline.common import emit, machine, median


def fitted_exponent(sizes: list[int], seconds: list[float]) -> float:
    xs = [math.log(n) for n in sizes]
    ys = [math.log(t) for t in seconds]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    numerator = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    return numerator / sum((x - mean_x) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=50_000)
    parser.add_argument(
        "--rerun", action="store_true", help="also time a second run of each stored day"
    )
    args = parser.parse_args()

    before = machine()
    table = []
    for size in args.sizes:
        runs = []
        for index in range(args.repeat):
            run = backfill.one_run(size, args.seed + index, args.chunk_size, rerun=args.rerun)
            print(json.dumps({"photos": size, "run": index + 1, **run}, default=str), flush=True)
            runs.append(run)
        table.append(
            {
                "photos": size,
                "backfill_s": median([r["backfill_s"] for r in runs]),
                "limit_s": median([r["limit"]["total_s"] for r in runs]),
                "peak_rss_mb": median([r["peak_rss_mb"] for r in runs]),
                **(
                    {"rerun_s": median([r["rerun"]["backfill_s"] for r in runs])}
                    if args.rerun
                    else {}
                ),
                "runs": runs,
            }
        )
    sizes = [row["photos"] for row in table]
    result = {
        "command": "python -m bench.pipeline.growth --sizes "
        + " ".join(str(s) for s in args.sizes)
        + f" --repeat {args.repeat} --seed {args.seed} --chunk-size {args.chunk_size}"
        + (" --rerun" if args.rerun else ""),
        "machine_before": before,
        "machine_after": machine(),
        "table": table,
    }
    if len(sizes) >= 2:
        result["exponent_backfill"] = round(
            fitted_exponent(sizes, [row["backfill_s"] for row in table]), 3
        )
        result["exponent_limit"] = round(
            fitted_exponent(sizes, [row["limit_s"] for row in table]), 3
        )
        if args.rerun:
            result["exponent_rerun"] = round(
                fitted_exponent(sizes, [row["rerun_s"] for row in table]), 3
            )
        result["exponent_n_log_n"] = round(
            fitted_exponent(sizes, [n * math.log(n) for n in sizes]), 3
        )
    emit("growth", result)


if __name__ == "__main__":
    main()
