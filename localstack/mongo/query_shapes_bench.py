"""Times the pipeline's reads that are not by a unique key, on one server, as JSON.

    .venv/bin/python localstack/mongo/query_shapes_bench.py mongodb://127.0.0.1:PORT/ \
        [--photos N] [--repeat R]

It loads ``--photos`` photo-like documents into the database ``query_shapes`` (dropped first
and at the end; point it only at a server of your own) with the indexes of
``snapmap_pipeline/store/schema.py``, then times, ``--repeat`` times each (the median is
printed), the query shapes of ``snapmap_pipeline/store``: albums by ``eventId $in``, photos by a
list of 5,000 ids (alone, and with a further condition), a
recluster neighbourhood (``$or`` of ``cell $in`` plus a ``takenAt`` range), one hour of
``takenAt``, the backfill's day pages (the whole day sorted by ``(takenAt, _id)``, limit
50,000: the first page, and one from noon), pending flags sorted by ``_id`` with a limit, and
the sweeper's ``uploadedAt`` range. Run it against a server with
``-Dsnapmap.mongo.secondaryIndexes=library`` and one without to compare; each answer's size is
printed too, and must be the same on both.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from datetime import datetime, timedelta

from pymongo import ASCENDING, InsertOne, MongoClient

DAY = datetime(2026, 1, 17)
CELLS = 2000
EVENTS_PER_PHOTO = 1 / 8


def load(db, photos: int) -> None:
    rng = random.Random(7)
    db.photos.create_index([("cell", ASCENDING), ("takenAt", ASCENDING)])
    db.photos.create_index([("takenAt", ASCENDING), ("_id", ASCENDING)])
    db.photos.create_index([("uploadedAt", ASCENDING)])
    db.photos.create_index([("eventId", ASCENDING)])
    db.events.create_index([("publishPending", ASCENDING)])
    events = int(photos * EVENTS_PER_PHOTO)
    for start in range(0, photos, 5000):
        batch = []
        for i in range(start, min(photos, start + 5000)):
            taken = DAY + timedelta(seconds=rng.randrange(86_400))
            batch.append(
                InsertOne(
                    {
                        "_id": f"p{i:07d}",
                        "takenAt": taken,
                        "uploadedAt": taken + timedelta(seconds=rng.randrange(600)),
                        "cell": rng.randrange(CELLS),
                        "eventId": f"e{rng.randrange(events):07d}",
                        "location": {"type": "Point", "coordinates": [rng.random(), rng.random()]},
                        "storageUrl": f"https://example.invalid/p{i:07d}.jpg",
                    }
                )
            )
        db.photos.bulk_write(batch, ordered=False)
    for start in range(0, events, 5000):
        db.events.bulk_write(
            [
                InsertOne({"_id": f"e{i:07d}", "version": 1, "publishPending": i % 50 == 0})
                for i in range(start, min(events, start + 5000))
            ],
            ordered=False,
        )


def shapes(photos: int) -> dict:
    """Per shape: collection, filter, sort and limit (0: none)."""
    rng = random.Random(11)
    events = int(photos * EVENTS_PER_PHOTO)
    hour = DAY + timedelta(hours=13)
    day = {"takenAt": {"$gte": DAY, "$lt": DAY + timedelta(days=1)}}
    return {
        "albums: eventId $in 1,000": (
            "photos",
            {"eventId": {"$in": [f"e{rng.randrange(events):07d}" for _ in range(1000)]}},
            None,
            0,
        ),
        "photos by _id $in 5,000": (
            "photos",
            {"_id": {"$in": [f"p{rng.randrange(photos):07d}" for _ in range(5000)]}},
            None,
            0,
        ),
        "photos by _id $in 5,000 and a condition": (
            "photos",
            {
                "_id": {"$in": [f"p{rng.randrange(photos):07d}" for _ in range(5000)]},
                "deadLettered": {"$ne": True},
            },
            None,
            0,
        ),
        "neighbourhood: $or of cell $in + takenAt range": (
            "photos",
            {
                "$or": [
                    {
                        "cell": {"$in": [rng.randrange(CELLS) for _ in range(9)]},
                        "takenAt": {"$gte": hour, "$lte": hour + timedelta(minutes=30)},
                    }
                    for _ in range(4)
                ]
            },
            None,
            0,
        ),
        "one hour of takenAt, sorted": (
            "photos",
            {"takenAt": {"$gte": hour, "$lt": hour + timedelta(hours=1)}},
            [("takenAt", 1), ("_id", 1)],
            0,
        ),
        "day page 1: whole day sorted, limit 50,000": (
            "photos",
            day,
            [("takenAt", 1), ("_id", 1)],
            50_000,
        ),
        "day page from noon: $and with $or after the last photo, limit 50,000": (
            "photos",
            {
                "$and": [
                    day,
                    {
                        "$or": [
                            {"takenAt": {"$gt": hour}},
                            {"takenAt": hour, "_id": {"$gt": "p"}},
                        ]
                    },
                ]
            },
            [("takenAt", 1), ("_id", 1)],
            50_000,
        ),
        "publishPending: true, sorted by _id, limit 1,000": (
            "events",
            {"publishPending": True},
            [("_id", 1)],
            1000,
        ),
        "sweeper: uploadedAt < t, eventId null": (
            "photos",
            {"eventId": None, "uploadedAt": {"$lt": DAY + timedelta(minutes=20)}},
            [("uploadedAt", 1)],
            0,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("uri")
    parser.add_argument("--photos", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    client = MongoClient(args.uri, socketTimeoutMS=600_000)
    client.drop_database("query_shapes")
    db = client["query_shapes"]
    started = time.perf_counter()
    load(db, args.photos)
    result: dict = {"uri": args.uri, "photos": args.photos, "load_s": 0.0, "queries": {}}
    result["load_s"] = round(time.perf_counter() - started, 1)
    for name, (collection, filter_, sort, limit) in shapes(args.photos).items():
        times, found = [], 0
        for _ in range(args.repeat):
            cursor = db[collection].find(filter_, {"_id": 1})
            if sort:
                cursor = cursor.sort(sort)
            if limit:
                cursor = cursor.limit(limit)
            started = time.perf_counter()
            found = len(list(cursor))
            times.append(time.perf_counter() - started)
        result["queries"][name] = {
            "found": found,
            "median_s": round(statistics.median(times), 4),
            "each_s": [round(t, 4) for t in times],
        }
    client.drop_database("query_shapes")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
