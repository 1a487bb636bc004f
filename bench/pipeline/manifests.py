"""Manifest writes alone (issue 7, the cost of ``event_updates``): the outbox's former write
(``put_manifest``: read the blob's properties, then upload) against its current one
(``upload_manifest``: upload only, the digest is compared with the event's record), on the
same Azurite, the same manifests and the outbox's thread pool, in alternating rounds so that
both see the same load.

Each round writes ``--events`` manifests whose content is new (a round number in the body), so
every write uploads. Run: ``python -m bench.pipeline.manifests --events 300 --repeat 3``.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

from bench.pipeline.common import emit, isolated_stack, machine, median
from snapmap_pipeline.resources.blob import encode_manifest
from snapmap_pipeline.store.outbox import MANIFEST_WORKERS


def album(event_index: int, round_index: int) -> dict:
    """A manifest of the size the simulator's events have (a few photos)."""
    return {
        "eventId": f"ev-{event_index:06d}",
        "version": round_index,
        "photos": [
            {"photoId": f"p-{event_index}-{i}", "storageUrl": f"azure://photos/{i}.jpg"}
            for i in range(3)
        ],
    }


def write_round(blob, client, pool, name: str, events: int, round_index: int) -> float:
    """Seconds to write ``events`` manifests of new content the way ``name`` says."""
    albums = [album(i, round_index) for i in range(events)]
    bodies = [encode_manifest(a) for a in albums]
    began = time.perf_counter()
    if name == "read_then_upload":
        work = [pool.submit(blob.put_manifest, client, a["eventId"], a) for a in albums]
    else:
        work = [
            pool.submit(blob.upload_manifest, client, a["eventId"], *body)
            for a, body in zip(albums, bodies, strict=True)
        ]
    for future in work:
        future.result()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    before = machine()
    seconds: dict[str, list[float]] = {"read_then_upload": [], "upload_only": []}
    with isolated_stack() as stack:
        blob = stack.resources["blob"]
        with blob.service() as client, ThreadPoolExecutor(MANIFEST_WORKERS) as pool:
            blob.ensure_container(client)
            # Every blob exists before the first timed round, as it does for a changed event.
            write_round(blob, client, pool, "upload_only", args.events, 0)
            round_index = 0
            for _ in range(args.repeat):
                for name in seconds:
                    round_index += 1
                    took = write_round(blob, client, pool, name, args.events, round_index)
                    seconds[name].append(took)
                    print(json.dumps({"round": round_index, name: took}), flush=True)
    medians = {name: median(values) for name, values in seconds.items()}
    emit(
        "manifests",
        {
            "machine_before": before,
            "machine_after": machine(),
            "events": args.events,
            "workers": MANIFEST_WORKERS,
            "seconds": seconds,
            "median_s": medians,
            "median_ms_per_manifest": {k: 1000 * v / args.events for k, v in medians.items()},
            "ratio_upload_only_to_read_then_upload": medians["upload_only"]
            / medians["read_then_upload"],
        },
    )


if __name__ == "__main__":
    main()
