"""Full scans right after bulk updates, with another collection written meanwhile: the load
under which the local server's H2 store answered "Chunk N not found" (the 100,000-photo
backfill, 2026-12-05). Prints one line per round and a last line ``RESULT PASS`` or
``RESULT FAIL`` with the first error.

    .venv/bin/python localstack/mongo/scan_under_writes.py mongodb://127.0.0.1:PORT/ [--seconds S]

It writes a database ``scan_under_writes`` (dropped first) on the given server; point it only at
a server of your own. On the build before automatic compaction was turned off it failed in its
first round (2026-12-05, 2-core machine under load); see BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from datetime import datetime, timedelta

from pymongo import InsertOne, MongoClient, UpdateOne
from pymongo.errors import PyMongoError

PHOTOS = 100_000
UPDATES_PER_ROUND = 20_000
DAY = datetime(2026, 1, 17)


def load(db) -> None:
    """Photo-like documents, about 250 bytes each, in bulks of 5,000."""
    for start in range(0, PHOTOS, 5000):
        batch = [
            InsertOne(
                {
                    "_id": f"p{i:06d}",
                    "takenAt": DAY + timedelta(seconds=i * 0.8),
                    "location": {
                        "type": "Point",
                        "coordinates": [random.random(), random.random()],
                    },
                    "cell": f"c{i % 997}",
                    "storageUrl": "https://example.invalid/" + "a" * 60,
                }
            )
            for i in range(start, min(PHOTOS, start + 5000))
        ]
        db.photos.bulk_write(batch, ordered=False)


def write_events(db, stop: float, errors: list[str]) -> None:
    """Upserts of 1,000 event-like documents at a time into another collection."""
    round_ = 0
    while time.time() < stop and not errors:
        batch = [
            UpdateOne(
                {"_id": f"e{(round_ * 1000 + j) % 20_000}"},
                {"$set": {"v": round_, "pad": "b" * 200}},
                upsert=True,
            )
            for j in range(1000)
        ]
        try:
            db.events.bulk_write(batch, ordered=False)
        except PyMongoError as error:  # any failure is the result
            errors.append(repr(error))
            return
        round_ += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("uri")
    parser.add_argument("--seconds", type=float, default=300.0, help="rounds start until then")
    args = parser.parse_args()

    client = MongoClient(args.uri, socketTimeoutMS=600_000)
    client.drop_database("scan_under_writes")
    db = client["scan_under_writes"]
    load(db)
    print(f"loaded {PHOTOS} photos", flush=True)

    stop = time.time() + args.seconds
    errors: list[str] = []
    writer = threading.Thread(target=write_events, args=(db, stop, errors))
    writer.start()
    rounds = 0
    while time.time() < stop and not errors:
        updated = random.sample(range(PHOTOS), UPDATES_PER_ROUND)
        try:
            db.photos.bulk_write(
                [
                    UpdateOne({"_id": f"p{i:06d}"}, {"$set": {"eventId": f"e{rounds}-{i % 500}"}})
                    for i in updated
                ],
                ordered=False,
            )
            scanned = len(list(db.photos.find({"takenAt": {"$gte": DAY}}, {"takenAt": 1})))
        except PyMongoError as error:  # any failure is the result
            errors.append(repr(error))
            break
        rounds += 1
        print(f"round {rounds}: updated {UPDATES_PER_ROUND}, scanned {scanned}", flush=True)
    writer.join()
    client.drop_database("scan_under_writes")
    print("RESULT", "FAIL" if errors else "PASS", f"after {rounds} rounds", *errors[:1], flush=True)


if __name__ == "__main__":
    main()
