"""Benchmark of the clustering engine against DBSCAN and a naive scan, on the same points.

    python bench/engine_bench.py --sizes 100000 1000000 --seed 7

For each size a seeded generator builds one city-day of photos (see :func:`city_day`) and
saves it to a temporary ``.npz``. Each method then runs in its own subprocess, so that peak
RSS (``VmHWM`` of the child) is the method's own and a method that runs out of memory or
time (``--mem-gb``, ``--timeout-s``) is recorded instead of killing the benchmark:

* ``canonical``: ``canonical_pass`` on ``PhotoPoint`` objects, returning ``Event`` objects
  and the photo -> event dict (the API the pipeline calls). Timed from the call to the
  returned result.
* ``canonical-columns``: ``cluster_columns`` on arrays (same algorithm, no objects).
* ``dbscan``: ``sklearn.cluster.DBSCAN(metric="haversine", algorithm="ball_tree",
  eps=50 m / EARTH_RADIUS_M, min_samples=1)`` on ``[lat, lon]`` radians. It ignores time.
* ``naive``: per photo, a numpy scan of every event still joinable (the obvious
  implementation of the canonical rule), run only up to ``--naive-max`` photos; larger
  sizes are extrapolated from its measured per-photo cost growth and marked as such.

Prints one Markdown table (the figures for BENCHMARKS.md) and the ratios the targets name.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from snapmap_pipeline.clustering import (  # noqa: E402  (after the path fix above)
    EARTH_RADIUS_M,
    ClusterParams,
    PhotoColumns,
    PhotoPoint,
    canonical_pass,
    cluster_columns,
    event_id_for,
)

DAY_START_US = int(datetime(2026, 1, 17, tzinfo=UTC).timestamp()) * 1_000_000
SANGAM = (81.8853, 25.4246)  # the festival ghat
CITY = (81.8463, 25.4358)  # city centre
CITY_RADIUS_M = 15_000.0
HOUR_US = 3_600 * 1_000_000


def city_day(n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` photos of one city over about 30 hours, seeded.

    * 5 % festival crowd at the ghat: Gaussian spread of 40 m, times around 08:00 (sd 1.5 h);
    * weddings and dinners (3 % of photos per 100k, "a few hundred" at 1M): 6 to 500 photos
      each (log-uniform), 15 m spread around a venue, spread over 1 to 5 hours;
    * the rest city-wide: 60 % uniform over a 15 km disc, 40 % around 200 landmarks
      (300 m spread), with more photos by day than by night.
    Returns ``photo_id`` (str), ``t_us`` (int64 microseconds), ``lon``/``lat`` (degrees),
    shuffled into arrival order.
    """
    rng = np.random.default_rng(seed)
    n_festival = n // 20
    east, north, t = [], [], []

    fx, fy = _offset_m(SANGAM)
    east.append(fx + rng.normal(0, 40, n_festival))
    north.append(fy + rng.normal(0, 40, n_festival))
    t.append(rng.normal(8 * HOUR_US, 1.5 * HOUR_US, n_festival))

    n_weddings = 0
    budget = int(n * 0.03)
    while budget > 0:
        size = min(budget, int(math.exp(rng.uniform(math.log(6), math.log(500)))))
        vx, vy = _disc(rng, 1, CITY_RADIUS_M)
        east.append(vx + rng.normal(0, 15, size))
        north.append(vy + rng.normal(0, 15, size))
        begin = rng.uniform(10, 22) * HOUR_US
        t.append(begin + rng.uniform(0, rng.uniform(1, 5) * HOUR_US, size))
        budget -= size
        n_weddings += 1

    rest = n - n_festival - sum(map(len, t[1:]))
    uniform = int(rest * 0.6)
    ux, uy = _disc(rng, uniform, CITY_RADIUS_M)
    lx, ly = _disc(rng, 200, CITY_RADIUS_M * 0.8)
    pick = rng.integers(0, 200, rest - uniform)
    east += [ux, lx[pick] + rng.normal(0, 300, rest - uniform)]
    north += [uy, ly[pick] + rng.normal(0, 300, rest - uniform)]
    # Daytime-heavy: a mix of a broad day peak and a flat floor, over 30 hours.
    day = rng.random(rest) < 0.8
    t.append(
        np.where(
            day, rng.normal(14 * HOUR_US, 4 * HOUR_US, rest), rng.uniform(0, 30 * HOUR_US, rest)
        )
    )

    east_m, north_m = np.concatenate(east), np.concatenate(north)
    lat = CITY[1] + np.degrees(north_m / EARTH_RADIUS_M)
    lon = CITY[0] + np.degrees(east_m / (EARTH_RADIUS_M * np.cos(np.radians(lat))))
    t_us = DAY_START_US + np.clip(np.concatenate(t), 0, 30 * HOUR_US).astype(np.int64)
    t_us -= t_us % 1_000_000  # phones record whole seconds: many equal timestamps
    ids = np.array([f"p{v:016x}" for v in rng.choice(2**62, size=n, replace=False)])
    shuffle = rng.permutation(n)
    return {
        "photo_id": ids[shuffle],
        "t_us": t_us[shuffle],
        "lon": lon[shuffle],
        "lat": lat[shuffle],
        "weddings": np.array(n_weddings),
    }


def _offset_m(point: tuple[float, float]) -> tuple[float, float]:
    lon, lat = point
    north = math.radians(lat - CITY[1]) * EARTH_RADIUS_M
    east = math.radians(lon - CITY[0]) * EARTH_RADIUS_M * math.cos(math.radians(lat))
    return east, north


def _disc(rng: np.random.Generator, k: int, radius_m: float) -> tuple[np.ndarray, np.ndarray]:
    r = radius_m * np.sqrt(rng.random(k))
    angle = rng.uniform(0, 2 * math.pi, k)
    return r * np.cos(angle), r * np.sin(angle)


def dense_crowd(n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` photos uniformly inside a 50 m disc at the ghat over 3 hours, seeded: the
    stress case for anything quadratic in local density."""
    rng = np.random.default_rng(seed)
    east, north = _disc(rng, n, 50.0)
    fx, fy = _offset_m(SANGAM)
    lat = CITY[1] + np.degrees((fy + north) / EARTH_RADIUS_M)
    lon = CITY[0] + np.degrees((fx + east) / (EARTH_RADIUS_M * np.cos(np.radians(lat))))
    t_us = DAY_START_US + 6 * HOUR_US + rng.integers(0, 3 * 3_600, n) * 1_000_000
    ids = np.array([f"c{v:016x}" for v in rng.choice(2**62, size=n, replace=False)])
    return {"photo_id": ids, "t_us": t_us, "lon": lon, "lat": lat, "weddings": np.array(0)}


# --- methods, each run in a child process -------------------------------------------------


def _timed(run, *args):
    """``run(*args)`` with its wall-clock and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def run_canonical(data: dict[str, np.ndarray]) -> tuple[float, float, int, np.ndarray]:
    ids = data["photo_id"].tolist()
    times = [datetime.fromtimestamp(v / 1e6, UTC) for v in data["t_us"].tolist()]
    photos = [
        PhotoPoint(i, t, lon, lat)
        for i, t, lon, lat in zip(
            ids, times, data["lon"].tolist(), data["lat"].tolist(), strict=True
        )
    ]
    canonical_pass(photos[:2000])  # warm-up: lazy imports and first-call set-up
    result, wall, cpu = _timed(canonical_pass, photos, ClusterParams())
    labels = np.array([result.assignment[i] for i in ids])
    return wall, cpu, len(result.events), labels


def run_columns(data: dict[str, np.ndarray]) -> tuple[float, float, int, np.ndarray]:
    ids = data["photo_id"].tolist()
    columns = PhotoColumns(ids, data["t_us"], data["lon"], data["lat"])
    cluster_columns(
        PhotoColumns(ids[:2000], data["t_us"][:2000], data["lon"][:2000], data["lat"][:2000])
    )  # warm-up
    table, wall, cpu = _timed(cluster_columns, columns, ClusterParams())
    labels = np.empty(len(table.order), dtype=np.int64)
    labels[table.order] = table.photo_event
    return wall, cpu, len(table.event_ids), labels


def run_dbscan(data: dict[str, np.ndarray]) -> tuple[float, float, int, np.ndarray]:
    from sklearn.cluster import DBSCAN

    latlon = np.radians(np.column_stack((data["lat"], data["lon"])))
    model = DBSCAN(
        eps=50.0 / EARTH_RADIUS_M, min_samples=1, metric="haversine", algorithm="ball_tree"
    )
    model.fit(latlon[:2000])  # warm-up
    labels, wall, cpu = _timed(lambda: model.fit(latlon).labels_)
    return wall, cpu, int(labels.max()) + 1, labels


def run_naive(data: dict[str, np.ndarray]) -> tuple[float, float, int, np.ndarray]:
    order = np.lexsort((data["photo_id"], data["t_us"]))
    (labels, events), wall, cpu = _timed(
        _naive_scan,
        data["photo_id"][order].tolist(),
        data["t_us"][order].tolist(),
        np.radians(data["lat"][order]),
        np.radians(data["lon"][order]),
    )
    out = np.empty(len(order), dtype=np.int64)
    out[order] = labels
    return wall, cpu, events, out


def _naive_scan(
    ids: list[str], t: list[int], lat: np.ndarray, lon: np.ndarray
) -> tuple[np.ndarray, int]:
    """The canonical rule the obvious way: each photo (in canonical order, radians) scans
    every event still joinable with numpy. Returns event labels and the event count."""
    radius_rad, window_us = 50.0 / EARTH_RADIUS_M, 300 * 1_000_000
    sums = np.zeros((0, 3))
    c_lat, c_lon = np.zeros(0), np.zeros(0)
    ends = np.zeros(0, dtype=np.int64)
    event_rows = np.zeros(0, dtype=np.int64)  # event row of each live slot
    first_ids: list[str] = []
    labels = np.empty(len(t), dtype=np.int64)
    for k in range(len(t)):
        live = ends >= t[k] - window_us
        if not live.all():  # drop events that can never be joined again
            sums, c_lat, c_lon = sums[live], c_lat[live], c_lon[live]
            ends, event_rows = ends[live], event_rows[live]
        h = (
            np.sin((c_lat - lat[k]) / 2) ** 2
            + np.cos(lat[k]) * np.cos(c_lat) * np.sin((c_lon - lon[k]) / 2) ** 2
        )
        d = 2 * np.arcsin(np.sqrt(np.minimum(h, 1.0)))
        near = np.flatnonzero(d <= radius_rad)
        vector = np.array(
            [
                math.cos(lat[k]) * math.cos(lon[k]),
                math.cos(lat[k]) * math.sin(lon[k]),
                math.sin(lat[k]),
            ]
        )
        if len(near):
            best = d[near].min() * EARTH_RADIUS_M + 1e-6
            tied = near[d[near] * EARTH_RADIUS_M <= best]
            slot = min(tied, key=lambda s: event_id_for(first_ids[event_rows[s]]))
            sums[slot] += vector
            x, y, z = sums[slot]
            c_lat[slot], c_lon[slot] = math.atan2(z, math.hypot(x, y)), math.atan2(y, x)
            ends[slot] = t[k]
            labels[k] = event_rows[slot]
        else:
            labels[k] = len(first_ids)
            first_ids.append(ids[k])
            sums = np.vstack((sums, vector))
            c_lat, c_lon = np.append(c_lat, lat[k]), np.append(c_lon, lon[k])
            ends = np.append(ends, t[k])
            event_rows = np.append(event_rows, labels[k])
    return labels, len(first_ids)


METHODS = {
    "canonical": run_canonical,
    "canonical-columns": run_columns,
    "dbscan": run_dbscan,
    "naive": run_naive,
}


def _peak_rss_mb() -> float:
    """This process's own peak RSS (``VmHWM``): a child's ``ru_maxrss`` would also hold the
    parent's resident size at fork, which Linux carries across exec."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def child(method: str, data_path: str, labels_path: str) -> None:
    """Run one method on one data file; print a JSON line with its figures."""
    with np.load(data_path) as stored:
        data = {key: stored[key] for key in stored.files}
    before = _peak_rss_mb()
    wall, cpu, events, labels = METHODS[method](data)
    np.save(labels_path, labels)
    peak = _peak_rss_mb()
    print(
        json.dumps(
            {
                "seconds": wall,
                "cpu_seconds": cpu,
                "events": events,
                "peak_rss_mb": peak,
                "rss_before_mb": before,
            }
        )
    )


def run_child(method: str, data_path: Path, mem_gb: float, timeout_s: float) -> dict:
    labels_path = data_path.with_suffix(f".{method}.npy")

    def limit_memory() -> None:
        cap = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    command = [sys.executable, __file__, "--child", method, str(data_path), str(labels_path)]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            preexec_fn=limit_memory,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"failed": f"killed after the {timeout_s:.0f} s time limit"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"failed": f"exit {done.returncode} under the {mem_gb:g} GB limit: {last}"}
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["labels"] = str(labels_path)
    return figures


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two labelings group the photos identically (label values may differ)."""
    pairs = np.unique(np.column_stack((a, b)), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--crowd",
        type=int,
        nargs="*",
        default=[50_000, 100_000],
        help="sizes of the dense-crowd stress case (all in a 50 m disc)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--mem-gb", type=float, default=16.0, help="address-space cap per run")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="time cap per run")
    parser.add_argument(
        "--naive-max", type=int, default=1_000_000, help="largest size the naive scan is run at"
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    print(
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"nproc={os.cpu_count()}, python {platform.python_version()}, "
        f"load average at start {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    cases = [("city day", n, city_day) for n in args.sizes]
    cases += [("dense crowd", n, dense_crowd) for n in args.crowd]
    rows: dict[tuple[str, int, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        for name, n, generate in cases:
            data = generate(n, args.seed)
            path = Path(tmp) / f"{name.replace(' ', '-')}-{n}.npz"
            np.savez(path, **data)
            print(f"## {name}, n={n}: {int(data['weddings'])} weddings/dinners", flush=True)
            for method in args.methods:
                if method == "naive" and n > args.naive_max:
                    rows[name, n, method] = {"failed": f"not run above {args.naive_max:,}"}
                    continue
                rows[name, n, method] = run_child(method, path, args.mem_gb, args.timeout_s)
                print(f"{method:>18}: {_brief(n, rows[name, n, method])}", flush=True)
            _check_agreement(name, n, rows)
    print(f"# load average at end {os.getloadavg()[0]:.2f}")
    _print_table(cases, args.methods, rows)


def _brief(n: int, figures: dict) -> str:
    if "failed" in figures:
        return figures["failed"]
    return (
        f"{figures['seconds']:.2f} s ({figures['cpu_seconds']:.2f} s CPU), "
        f"{n / figures['seconds']:,.0f} photos/s, {figures['events']} events, "
        f"peak RSS {figures['peak_rss_mb']:.0f} MB"
    )


def _check_agreement(name: str, n: int, rows: dict) -> None:
    """The two canonical entry points and the naive scan must produce one partition."""
    runs = {
        m: rows[name, n, m]
        for m in ("canonical", "canonical-columns", "naive")
        if (name, n, m) in rows and "labels" in rows[name, n, m]
    }
    names = list(runs)
    for other in names[1:]:
        agree = same_partition(np.load(runs[names[0]]["labels"]), np.load(runs[other]["labels"]))
        print(f"{names[0]} and {other} agree on every photo: {agree}", flush=True)
        if not agree:
            raise SystemExit(f"{names[0]} and {other} disagree on {name} n={n}")


def _print_table(cases: list, methods: list[str], rows: dict) -> None:
    print("\n| data | photos | method | wall s | CPU s | photos/s | events | peak RSS MB |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, n, _ in cases:
        for method in methods:
            f = rows.get((name, n, method), {"failed": "not run"})
            if "failed" in f:
                print(f"| {name} | {n:,} | {method} | - | - | - | - | {f['failed']} |")
            else:
                print(
                    f"| {name} | {n:,} | {method} | {f['seconds']:.2f} | "
                    f"{f['cpu_seconds']:.2f} | {n / f['seconds']:,.0f} | {f['events']:,} | "
                    f"{f['peak_rss_mb']:,.0f} |"
                )
    sizes = sorted(n for name, n, _ in cases if name == "city day")
    if not sizes:
        return
    small, large = sizes[0], sizes[-1]
    canon = rows.get(("city day", large, "canonical"), {})
    first = rows.get(("city day", small, "canonical"), {})
    for method in ("dbscan", "naive"):
        other = rows.get(("city day", large, method), {})
        if "seconds" in canon and "seconds" in other:
            print(
                f"{method} / canonical wall time at {large:,}: "
                f"{other['seconds'] / canon['seconds']:.1f}x"
            )
        else:
            print(f"{method} at {large:,}: {other.get('failed', 'not run')}")
    if "seconds" in canon and "seconds" in first and large != small:
        print(
            f"canonical wall time({large:,}) / time({small:,}): "
            f"{canon['seconds'] / first['seconds']:.1f} "
            f"(CPU {canon['cpu_seconds'] / first['cpu_seconds']:.1f})"
        )
    if "peak_rss_mb" in canon:
        print(f"canonical peak RSS at {large:,}: {canon['peak_rss_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
