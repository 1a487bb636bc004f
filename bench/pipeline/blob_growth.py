"""Manifest uploads as blobs accumulate (issue 7): milliseconds per upload at each checkpoint
while one container fills up, with the outbox's upload call and thread pool.

On the real service the cost of an upload does not depend on how many blobs exist. On the
local stack it did: Azurite 3.35.0 scanned every blob for each lookup, until the stack rewrote
those lookups (localstack/azurite/lookup_order.py). This measures whether the cost stays flat.

Run: ``python -m bench.pipeline.blob_growth --blobs 20000 --every 2500``.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

from bench.pipeline.common import emit, isolated_stack, machine
from snapmap_pipeline.resources.blob import encode_manifest
from snapmap_pipeline.store.outbox import MANIFEST_WORKERS

BATCH = 500


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blobs", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=2_500)
    args = parser.parse_args()
    if args.blobs < 1 or args.every < 1:
        parser.error("--blobs and --every must be at least 1")

    before = machine()
    checkpoints = []
    with isolated_stack() as stack:
        blob = stack.resources["blob"]
        with blob.service() as client, ThreadPoolExecutor(MANIFEST_WORKERS) as pool:
            blob.ensure_container(client)
            written = 0
            while written < args.blobs:
                # A batch ends at the next checkpoint or at --blobs, whichever comes first, so
                # every multiple of --every (and the last upload) is a row of its own.
                next_checkpoint = (written // args.every + 1) * args.every
                size = min(BATCH, next_checkpoint - written, args.blobs - written)
                bodies = [
                    (f"ev-{i:07d}", *encode_manifest({"eventId": f"ev-{i:07d}", "photos": []}))
                    for i in range(written, written + size)
                ]
                began = time.perf_counter()
                for future in [pool.submit(blob.upload_manifest, client, *b) for b in bodies]:
                    future.result()
                took = time.perf_counter() - began
                written += size
                if written == size or written % args.every == 0 or written == args.blobs:
                    row = {
                        "blobs": written,
                        "batch": size,
                        "ms_per_upload": round(1000 * took / size, 2),
                    }
                    print(json.dumps(row), flush=True)
                    checkpoints.append(row)
    emit(
        "blob-growth",
        {
            "command": f"python -m bench.pipeline.blob_growth --blobs {args.blobs} "
            f"--every {args.every}",
            "machine_before": before,
            "machine_after": machine(),
            "workers": MANIFEST_WORKERS,
            "checkpoints": checkpoints,
        },
    )


if __name__ == "__main__":
    main()
