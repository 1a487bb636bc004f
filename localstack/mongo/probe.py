"""Check a MongoDB-compatible server for exactly what the SnapMap pipeline relies on.

Usage:
    python localstack/mongo/probe.py mongodb://127.0.0.1:27317 [--docs 100000] [--ops 10000]
        [--db snapmap_probe] [--json results.json]

Each check runs against its own collection in a throwaway database (dropped at the start
and at the end) and is judged against MongoDB 6 behaviour: PASS means the server behaved
as MongoDB 6 does, FAIL says how it differed (exception class and message, or what came
back). Checks marked "required" are the ones the pipeline code depends on; the others
(2dsphere, explain, out-of-range longitude) are recorded so that the difference is known.
The speed rows time a collection of --docs documents with --ops operations each.

Exit status: 0 when every required check passed, 1 otherwise, 2 when the server could not
be reached at all.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import pymongo
from pymongo import ASCENDING, DESCENDING, MongoClient, ReturnDocument, UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import AutoReconnect, BulkWriteError, DuplicateKeyError, PyMongoError

MAX_BATCH = 1000
"""Largest bulk_write sent at once; --max-batch lowers it for servers that choke on big ones."""

BASE_TIME = datetime(2010, 4, 1, 12, 0, 0)
"""A tz-naive UTC instant; pymongo reads BSON dates back as tz-naive UTC by default."""


@dataclass
class Result:
    """One row of the report."""

    name: str
    required: bool
    status: str  # PASS, FAIL or TIME
    detail: str


class CheckFailed(Exception):
    """A server answered, but not as MongoDB 6 would."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def describe(exc: BaseException) -> str:
    """Exception class and the first line of its message, for the report."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:300]}"


# --- correctness checks -------------------------------------------------------------------
# Each takes the probe database and returns a short detail string, or raises.


def check_unique_index(db: Database) -> str:
    coll = db.unique_index
    coll.create_index([("photoKey", ASCENDING)], unique=True, name="photoKey_unique")
    coll.insert_one({"_id": 1, "photoKey": "a"})
    try:
        coll.insert_one({"_id": 2, "photoKey": "a"})
    except DuplicateKeyError as exc:
        expect(exc.code == 11000, f"duplicate rejected with code {exc.code}, not 11000")
        expect(coll.count_documents({}) == 1, "the duplicate was stored anyway")
        return "second insert rejected with E11000"
    raise CheckFailed("duplicate value accepted despite the unique index")


def check_upsert_set_on_insert(db: Database) -> str:
    coll = db.upsert
    first = coll.update_one(
        {"_id": "p1"},
        {"$set": {"storageUrl": "u1"}, "$setOnInsert": {"firstSeenAt": BASE_TIME}},
        upsert=True,
    )
    expect(first.upserted_id == "p1", f"upserted_id is {first.upserted_id!r}, not 'p1'")

    second = coll.update_one(
        {"_id": "p1"},
        {"$set": {"storageUrl": "u2"}, "$setOnInsert": {"firstSeenAt": BASE_TIME + timedelta(1)}},
        upsert=True,
    )
    expect(second.upserted_id is None, "second upsert inserted again")
    expect(second.matched_count == 1, f"second upsert matched {second.matched_count}")

    doc = coll.find_one({"_id": "p1"})
    expect(doc["storageUrl"] == "u2", f"$set not applied: {doc!r}")
    expect(doc["firstSeenAt"] == BASE_TIME, f"$setOnInsert applied on update: {doc!r}")
    expect(coll.count_documents({}) == 1, "more than one document after two upserts")
    return "insert then update; $setOnInsert kept the first value"


def check_types_round_trip(db: Database) -> str:
    coll = db.types
    with_millis = BASE_TIME.replace(microsecond=678000)
    with_micros = BASE_TIME.replace(microsecond=678901)
    coll.insert_one(
        {
            "_id": 1,
            "flag": False,
            "count": 7,
            "ratio": 0.25,
            "takenAt": with_millis,
            "fineAt": with_micros,
            "lonLat": [-73.98, 40.75],
        }
    )
    coll.update_one({"_id": 1}, {"$set": {"flag": True, "tombstone": False}})
    doc = coll.find_one({"_id": 1})

    problems = []
    for field, kind in (
        ("flag", bool),
        ("tombstone", bool),
        ("count", int),
        ("ratio", float),
        ("takenAt", datetime),
        ("fineAt", datetime),
    ):
        if type(doc.get(field)) is not kind:
            problems.append(
                f"{field} read back as {type(doc.get(field)).__name__} {doc.get(field)!r}"
            )
    if problems:
        raise CheckFailed("; ".join(problems))

    expect(doc["flag"] is True, f"$set True read back as {doc['flag']!r}")
    expect(doc["takenAt"].tzinfo is None, "datetime came back tz-aware")
    expect(doc["takenAt"] == with_millis, f"millisecond datetime changed: {doc['takenAt']}")
    expect(
        doc["fineAt"] == with_micros.replace(microsecond=678000),
        f"microseconds not truncated to ms as BSON does: {doc['fineAt']}",
    )
    expect(doc["lonLat"] == [-73.98, 40.75], f"array changed: {doc['lonLat']!r}")
    return "bool, int, float, naive UTC datetime (ms) and arrays round-trip"


def check_inc_min_max_numbers(db: Database) -> str:
    coll = db.numbers
    coll.insert_one({"_id": 1, "photoCount": 1, "radiusM": 50.0, "minLat": 40.7, "maxLat": 40.7})
    coll.update_one(
        {"_id": 1},
        {
            "$inc": {"photoCount": 2, "radiusM": 0.5},
            "$min": {"minLat": 40.6},
            "$max": {"maxLat": 40.9},
        },
    )
    coll.update_one({"_id": 1}, {"$min": {"minLat": 40.65}, "$max": {"maxLat": 40.8}})
    coll.update_one({"_id": 2}, {"$inc": {"photoCount": 1}}, upsert=True)
    doc, fresh = coll.find_one({"_id": 1}), coll.find_one({"_id": 2})

    expect(
        doc["photoCount"] == 3 and type(doc["photoCount"]) is int,
        f"$inc int gave {doc['photoCount']!r}",
    )
    expect(
        doc["radiusM"] == 50.5 and type(doc["radiusM"]) is float,
        f"$inc float gave {doc['radiusM']!r}",
    )
    expect(doc["minLat"] == 40.6, f"$min gave {doc['minLat']!r}")
    expect(doc["maxLat"] == 40.9, f"$max gave {doc['maxLat']!r}")
    expect(fresh == {"_id": 2, "photoCount": 1}, f"$inc upsert gave {fresh!r}")
    return "int stays int, float stays float, $min/$max keep the extreme"


def check_min_max_datetimes(db: Database) -> str:
    coll = db.datetimes
    early, late = BASE_TIME, BASE_TIME + timedelta(hours=3, milliseconds=250)
    coll.update_one(
        {"_id": "e1"}, {"$min": {"startAt": late}, "$max": {"endAt": early}}, upsert=True
    )
    coll.update_one({"_id": "e1"}, {"$min": {"startAt": early}, "$max": {"endAt": late}})
    coll.update_one({"_id": "e1"}, {"$min": {"startAt": late}, "$max": {"endAt": early}})
    doc = coll.find_one({"_id": "e1"})

    for field, want in (("startAt", early), ("endAt", late)):
        got = doc.get(field)
        expect(type(got) is datetime, f"{field} read back as {type(got).__name__} {got!r}")
        expect(got == want, f"{field} is {got}, expected {want}")
    return "$min/$max on absent field (upsert) and on dates keep datetime type"


def bulk_upsert(coll: Collection, ops: list[UpdateOne]) -> dict[str, int]:
    """Unordered bulk_write in batches of at most MAX_BATCH; summed counts."""
    totals = {"upserted": 0, "matched": 0, "modified": 0}
    for i in range(0, len(ops), MAX_BATCH):
        result = coll.bulk_write(ops[i : i + MAX_BATCH], ordered=False)
        totals["upserted"] += result.upserted_count
        totals["matched"] += result.matched_count
        totals["modified"] += result.modified_count
    return totals


def check_bulk_upsert_1000(db: Database) -> str:
    coll = db.bulk
    ops = [UpdateOne({"_id": f"p{i}"}, {"$set": {"n": i}}, upsert=True) for i in range(1000)]
    first = bulk_upsert(coll, ops)
    expect(first["upserted"] == 1000, f"first pass upserted {first['upserted']}")

    ops = [UpdateOne({"_id": f"p{i}"}, {"$set": {"n": i + 1}}, upsert=True) for i in range(1000)]
    second = bulk_upsert(coll, ops)
    expect(second["upserted"] == 0, f"second pass upserted {second['upserted']}")
    expect(second["matched"] == 1000, f"second pass matched {second['matched']}")
    expect(second["modified"] == 1000, f"second pass modified {second['modified']}")
    expect(coll.count_documents({}) == 1000, "wrong document count after two passes")
    batches = "" if MAX_BATCH >= 1000 else f" (in batches of {MAX_BATCH})"
    return f"1000 upserted, then 1000 matched and modified{batches}"


def check_bulk_unordered_duplicate(db: Database) -> str:
    coll = db.bulk_dup
    coll.create_index([("photoKey", ASCENDING)], unique=True)
    coll.insert_one({"_id": "taken", "photoKey": "k-dup"})
    ops = [
        UpdateOne({"_id": f"p{i}"}, {"$set": {"photoKey": f"k{i}"}}, upsert=True) for i in range(10)
    ]
    ops[4] = UpdateOne({"_id": "p4"}, {"$set": {"photoKey": "k-dup"}}, upsert=True)
    try:
        coll.bulk_write(ops, ordered=False)
    except BulkWriteError as exc:
        details = exc.details
        errors = details.get("writeErrors", [])
        expect(len(errors) == 1, f"{len(errors)} write errors reported, expected 1")
        expect(errors[0].get("code") == 11000, f"error code {errors[0].get('code')}")
        expect(errors[0].get("index") == 4, f"error at op index {errors[0].get('index')}")
        expect(details.get("nUpserted") == 9, f"nUpserted reported {details.get('nUpserted')}")
        stored = coll.count_documents({"_id": {"$regex": "^p"}})
        expect(stored == 9, f"{stored} of the other 9 upserts stored")
        return "one E11000 at index 4, nUpserted 9, the other 9 stored"
    raise CheckFailed("no BulkWriteError for the duplicate key")


def check_optimistic_concurrency(db: Database) -> str:
    coll = db.lease
    coll.insert_one({"_id": "cell-1", "version": 1, "owner": None})
    update = {"$set": {"owner": "run-a"}, "$inc": {"version": 1}}
    winner = coll.find_one_and_update(
        {"_id": "cell-1", "version": 1}, update, return_document=ReturnDocument.AFTER
    )
    loser = coll.find_one_and_update(
        {"_id": "cell-1", "version": 1},
        {"$set": {"owner": "run-b"}, "$inc": {"version": 1}},
        return_document=ReturnDocument.AFTER,
    )
    expect(
        winner is not None and winner["version"] == 2 and winner["owner"] == "run-a",
        f"winner got {winner!r}",
    )
    expect(loser is None, f"loser got {loser!r} instead of None")
    expect(coll.find_one({"_id": "cell-1"})["owner"] == "run-a", "loser's write applied")
    return "winner sees version 2 (AFTER), loser gets None"


def check_update_many_ne(db: Database) -> str:
    coll = db.update_many
    coll.insert_many(
        [
            {"_id": 1, "eventId": "e1"},
            {"_id": 2, "eventId": "e2"},
            {"_id": 3, "eventId": "e1"},
            {"_id": 4},
        ]
    )
    result = coll.update_many({"eventId": {"$ne": "e1"}}, {"$set": {"eventId": "e1"}})
    expect(
        result.matched_count == 2,
        f"$ne matched {result.matched_count}, expected 2 "
        "(one with another value, one without the field)",
    )
    expect(result.modified_count == 2, f"modified {result.modified_count}")
    expect(coll.count_documents({"eventId": "e1"}) == 4, "not all documents moved to e1")
    return "$ne matched the other value and the missing field"


def make_photos(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """Photos a minute apart around Manhattan, with GeoJSON and flat coordinates."""
    rng = random.Random(seed)
    photos = []
    for i in range(count):
        lon, lat = round(rng.uniform(-74.05, -73.90), 6), round(rng.uniform(40.65, 40.85), 6)
        photos.append(
            {
                "_id": f"ph{i:07d}",
                "takenAt": BASE_TIME + timedelta(minutes=i),
                "location": {"type": "Point", "coordinates": [lon, lat]},
                "lon": lon,
                "lat": lat,
                "cell": i % 7,
                "eventId": None,
            }
        )
    return photos


def check_datetime_range(db: Database) -> str:
    coll = db.photos_small
    coll.insert_many(make_photos(200))
    start, end = BASE_TIME + timedelta(minutes=20), BASE_TIME + timedelta(minutes=60)
    cursor = coll.find({"takenAt": {"$gte": start, "$lt": end}}).sort("takenAt", DESCENDING)
    got = [doc["_id"] for doc in cursor.limit(5)]
    want = [f"ph{i:07d}" for i in range(59, 54, -1)]
    expect(got == want, f"got {got}")
    expect(
        coll.count_documents({"takenAt": {"$gte": start, "$lt": end}}) == 40,
        "range count is not 40",
    )
    return "$gte/$lt on dates, sort desc, limit 5 as expected"


def check_bounding_box(db: Database) -> str:
    coll = db.photos_small
    if coll.estimated_document_count() == 0:
        coll.insert_many(make_photos(200))
    photos = list(coll.find())
    box = {"west": -74.0, "east": -73.95, "south": 40.70, "north": 40.78}
    want = sorted(
        p["_id"]
        for p in photos
        if box["west"] <= p["lon"] <= box["east"] and box["south"] <= p["lat"] <= box["north"]
    )
    flat = sorted(
        d["_id"]
        for d in coll.find(
            {
                "lon": {"$gte": box["west"], "$lte": box["east"]},
                "lat": {"$gte": box["south"], "$lte": box["north"]},
            },
            {"_id": 1},
        )
    )
    geo = sorted(
        d["_id"]
        for d in coll.find(
            {
                "location.coordinates.0": {"$gte": box["west"], "$lte": box["east"]},
                "location.coordinates.1": {"$gte": box["south"], "$lte": box["north"]},
            },
            {"_id": 1},
        )
    )
    expect(flat == want, f"lon/lat fields: {len(flat)} found, {len(want)} expected")
    expect(geo == want, f"location.coordinates.0/1: {len(geo)} found, {len(want)} expected")
    return f"both forms found the {len(want)} expected photos"


def check_in_10000(db: Database) -> str:
    coll = db.in_ids
    coll.insert_many([{"_id": f"id{i}"} for i in range(6000)])
    ids = [f"id{i}" for i in range(0, 10000)]
    found = coll.count_documents({"_id": {"$in": ids}})
    listed = sum(1 for _ in coll.find({"_id": {"$in": ids}}, {"_id": 1}))
    expect(found == 6000 and listed == 6000, f"count {found}, find {listed}, expected 6000")
    return "10,000 ids (6,000 present): count and find agree"


def check_aggregate(db: Database) -> str:
    coll = db.photos_small
    if coll.estimated_document_count() == 0:
        coll.insert_many(make_photos(200))
    start, end = BASE_TIME + timedelta(minutes=10), BASE_TIME + timedelta(minutes=150)
    pipeline = [
        {"$match": {"takenAt": {"$gte": start, "$lt": end}}},
        {
            "$group": {
                "_id": "$cell",
                "photos": {"$sum": 1},
                "firstAt": {"$min": "$takenAt"},
                "lastAt": {"$max": "$takenAt"},
                "meanLat": {"$avg": "$lat"},
            }
        },
        {"$sort": {"_id": 1}},
    ]
    got = list(coll.aggregate(pipeline))
    minutes = range(10, 150)
    want = []
    for cell in range(7):
        mine = [m for m in minutes if m % 7 == cell]
        want.append(
            (
                cell,
                len(mine),
                BASE_TIME + timedelta(minutes=min(mine)),
                BASE_TIME + timedelta(minutes=max(mine)),
            )
        )
    expect(len(got) == 7, f"{len(got)} groups, expected 7 (did $match on a date match?)")
    for row, (cell, count, first, last) in zip(got, want, strict=True):
        expect(
            row["_id"] == cell and row["photos"] == count,
            f"group {row['_id']} has {row['photos']}, expected cell {cell} with {count}",
        )
        expect(
            type(row["firstAt"]) is datetime and row["firstAt"] == first,
            f"$min of dates gave {row['firstAt']!r}",
        )
        expect(
            type(row["lastAt"]) is datetime and row["lastAt"] == last,
            f"$max of dates gave {row['lastAt']!r}",
        )
    return "7 groups with right counts; $min/$max of dates are datetimes"


def check_count_documents(db: Database) -> str:
    coll = db.photos_small
    if coll.estimated_document_count() == 0:
        coll.insert_many(make_photos(200))
    total, some = coll.count_documents({}), coll.count_documents({"cell": 3})
    expect(total == 200, f"count_documents({{}}) gave {total}")
    expect(some == len([i for i in range(200) if i % 7 == 3]), f"filtered count gave {some}")
    skipped = coll.count_documents({"cell": 3}, skip=5, limit=10)
    expect(skipped == 10, f"count with skip/limit gave {skipped}")
    return "total, filtered and skip/limit counts right"


def check_compound_index(db: Database) -> str:
    coll = db.photos_small
    name = coll.create_index([("takenAt", ASCENDING), ("lon", ASCENDING)])
    info = coll.index_information()
    expect(name in info, f"index {name} not listed: {sorted(info)}")
    expect(info[name]["key"] == [("takenAt", 1), ("lon", 1)], f"keys {info[name]['key']}")
    coll.create_index([("takenAt", ASCENDING), ("lon", ASCENDING)])  # idempotent
    return f"created and listed as {name}; re-create is a no-op"


def check_2dsphere(db: Database) -> str:
    coll = db.geo
    coll.insert_one({"_id": 1, "location": {"type": "Point", "coordinates": [-73.98, 40.75]}})
    try:
        coll.create_index([("location", "2dsphere")])
    except PyMongoError as exc:
        raise CheckFailed(f"create_index raised {describe(exc)}") from exc
    listed = [v["key"] for v in coll.index_information().values()]
    try:
        near = list(
            coll.find(
                {
                    "location": {
                        "$nearSphere": {
                            "$geometry": {"type": "Point", "coordinates": [-73.98, 40.75]},
                            "$maxDistance": 100,
                        }
                    }
                }
            )
        )
    except PyMongoError as exc:
        raise CheckFailed(
            f"create_index returned without error (indexes now {listed}), "
            f"then $nearSphere raised {describe(exc)}"
        ) from exc
    expect(len(near) == 1, f"$nearSphere found {len(near)}")
    return "index created; $nearSphere works"


def check_lon_190(db: Database) -> str:
    coll = db.geo
    bad = {"_id": "bad", "location": {"type": "Point", "coordinates": [190.0, 40.0]}}
    keys = [str(v.get("key")) for v in coll.index_information().values()]
    try:
        coll.insert_one(bad)
    except PyMongoError as exc:
        return f"rejected: {describe(exc)}"
    stored = coll.find_one({"_id": "bad"})
    raise CheckFailed(
        f"accepted and stored {stored['location']['coordinates']} "
        f"(indexes on the collection: {', '.join(keys)})"
    )


def check_explain(db: Database) -> str:
    coll = db.photos_small
    coll.create_index([("takenAt", ASCENDING)])
    plan = coll.find(
        {"takenAt": {"$gte": BASE_TIME, "$lt": BASE_TIME + timedelta(hours=1)}}
    ).explain()
    text = json.dumps(plan, default=str)
    for marker in ("IXSCAN", "takenAt_1", "USING INDEX", "pushdown"):
        if marker in text:
            snippet = text[max(0, text.find(marker) - 80) : text.find(marker) + 80]
            if marker == "pushdown":
                return f"no IXSCAN; FerretDB-style plan: ...{snippet}..."
            return f"index visible ({marker})"
    raise CheckFailed(f"explain answered but shows no index use: {text[:200]}")


def check_drop_database(db: Database) -> str:
    client, name = db.client, db.name + "_drop"
    client[name].things.insert_one({"_id": 1})
    expect(name in client.list_database_names(), "database not listed after insert")
    client.drop_database(name)
    expect(name not in client.list_database_names(), "database still listed after drop")
    expect(client[name].things.count_documents({}) == 0, "data survived the drop")
    return "listed, dropped, gone"


CHECKS: list[tuple[str, bool, Callable[[Database], str]]] = [
    ("unique index", True, check_unique_index),
    ("_id upsert with $set/$setOnInsert", True, check_upsert_set_on_insert),
    ("types round-trip (bool, datetime ms)", True, check_types_round_trip),
    ("$inc/$min/$max on numbers", True, check_inc_min_max_numbers),
    ("$min/$max on datetimes", True, check_min_max_datetimes),
    ("bulk_write 1000 UpdateOne upserts", True, check_bulk_upsert_1000),
    ("bulk_write unordered, one E11000", True, check_bulk_unordered_duplicate),
    ("find_one_and_update version check", True, check_optimistic_concurrency),
    ("update_many with $ne", True, check_update_many_ne),
    ("datetime range + sort + limit", True, check_datetime_range),
    ("lat/lon bounding box (2 forms)", True, check_bounding_box),
    ("$in with 10,000 ids", True, check_in_10000),
    ("aggregate $match/$group/$sort", True, check_aggregate),
    ("count_documents", True, check_count_documents),
    ("compound index (takenAt, lon)", True, check_compound_index),
    ("drop_database", True, check_drop_database),
    ("2dsphere index + $nearSphere", False, check_2dsphere),
    ("GeoJSON lon 190 rejected", False, check_lon_190),
    ("explain shows index use", False, check_explain),
]


# --- speed --------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def measure_speed(db: Database, docs: int, ops: int, rows: list[Result]) -> None:
    """Load `docs` photos, then time `ops` upserts, `ops` finds by _id and range queries.

    Appends one row per step to `rows` as it goes, so a step that fails or hangs shows where.
    """
    coll = db.speed
    photos = make_photos(docs, seed=11)
    rng = random.Random(3)
    targets = rng.sample(range(docs), ops)
    ids = [f"ph{i:07d}" for i in targets]
    upserts = [
        UpdateOne(
            {"_id": pid},
            {"$set": {"eventId": f"ev{i % 97}"}, "$max": {"seenAt": BASE_TIME}},
            upsert=True,
        )
        for i, pid in zip(targets, ids, strict=True)
    ]
    span = min(5000, docs)
    first = BASE_TIME + timedelta(minutes=docs // 3)
    window = {"takenAt": {"$gte": first, "$lt": first + timedelta(minutes=span)}}

    def load() -> str:
        for i in range(0, docs, 5000):
            coll.insert_many(photos[i : i + 5000], ordered=False)
        coll.create_index([("takenAt", ASCENDING)])
        return f"{docs:,} docs"

    steps: list[tuple[str, Callable[[], str]]] = [
        (f"load {docs:,} docs (insert_many 5k)", load),
        (
            f"{ops:,} upserts (bulk_write x{MAX_BATCH})",
            lambda: f"matched {bulk_upsert(coll, upserts)['matched']:,}",
        ),
        (
            f"{ops:,} find_one by _id",
            lambda: f"found {sum(coll.find_one({'_id': pid}) is not None for pid in ids):,}",
        ),
        (
            f"date range returning {span:,} docs",
            lambda: f"got {len(list(coll.find(window).sort('takenAt', ASCENDING))):,}",
        ),
        (
            f"find $in with {ops:,} ids on {docs:,} docs",
            lambda: f"found {sum(1 for _ in coll.find({'_id': {'$in': ids}}, {'_id': 1})):,}",
        ),
    ]
    for name, step in steps:
        try:
            secs, outcome = timed(step)
        except Exception as exc:  # noqa: BLE001 - record where the server gave up, then stop
            rows.append(Result(name, False, "FAIL", describe(exc)))
            return
        count = docs if name.startswith("load") else ops
        rate = f", {count / secs:,.0f}/s" if "returning" not in name else ""
        rows.append(Result(name, False, "TIME", f"{secs:.2f} s{rate}, {outcome}"))


# --- report -------------------------------------------------------------------------------


def run_checks(db: Database) -> list[Result]:
    results: list[Result] = []
    hung_in = None
    for name, required, check in CHECKS:
        if hung_in:
            results.append(Result(name, required, "FAIL", f"not run: server hung in '{hung_in}'"))
            continue
        try:
            results.append(Result(name, required, "PASS", check(db)))
        except CheckFailed as exc:
            results.append(Result(name, required, "FAIL", str(exc)))
        except AutoReconnect as exc:  # includes timeouts: the server stopped answering
            hung_in = name
            results.append(Result(name, required, "FAIL", describe(exc)))
        except Exception as exc:  # noqa: BLE001 - the report records how the server failed
            results.append(Result(name, required, "FAIL", describe(exc)))
    return results


def print_table(server: str, results: list[Result]) -> None:
    width = max(len(r.name) for r in results)
    print(f"server: {server}")
    print(f"{'check'.ljust(width)}  req  result  detail")
    print(f"{'-' * width}  ---  ------  ------")
    for r in results:
        req = "yes" if r.required else "no "
        print(f"{r.name.ljust(width)}  {req}  {r.status:<6}  {r.detail}")


def server_description(client: MongoClient) -> str:
    info = client.admin.command("buildInfo")
    ferret = info.get("ferretdbVersion") or info.get("ferretdb", {})
    suffix = f" ferretdb={ferret}" if ferret else ""
    return f"buildInfo.version={info.get('version')}{suffix}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("uri", help="mongodb:// connection string")
    parser.add_argument("--db", default="snapmap_probe", help="throwaway database name")
    parser.add_argument("--docs", type=int, default=100_000, help="speed collection size")
    parser.add_argument("--ops", type=int, default=10_000, help="operations per speed row")
    parser.add_argument("--skip-speed", action="store_true", help="correctness checks only")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=1000,
        help="split bulk_write calls into batches of at most this many",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for any one server reply"
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    global MAX_BATCH
    MAX_BATCH = args.max_batch
    client = MongoClient(
        args.uri,
        serverSelectionTimeoutMS=5000,
        connectTimeoutMS=5000,
        socketTimeoutMS=int(args.timeout * 1000),
    )
    try:
        server = server_description(client)
    except PyMongoError as exc:
        print(f"cannot reach {args.uri}: {describe(exc)}", file=sys.stderr)
        return 2

    client.drop_database(args.db)
    db = client[args.db]
    results = run_checks(db)
    if any("server hung" in r.detail for r in results):
        args.skip_speed = True
    if not args.skip_speed:
        measure_speed(db, args.docs, min(args.ops, args.docs), results)
    print_table(f"{server} (pymongo {pymongo.version})", results)
    try:
        client.drop_database(args.db)
    except PyMongoError as exc:  # a wedged server should not hide the table above
        print(f"could not drop {args.db} afterwards: {describe(exc)}", file=sys.stderr)
    client.close()

    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"server": server, "results": [asdict(r) for r in results]}, out, indent=1)
    failed = [r.name for r in results if r.required and r.status != "PASS"]
    print(
        f"\n{len(results) - len(failed)} ok, {len(failed)} required failed"
        + (f": {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
