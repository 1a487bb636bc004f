"""Non-unique indexes answer the same as a scan. The local server keeps non-unique indexes
(``localstack/mongo/.../SecondaryIndex.java``) and uses them to choose which documents to match
a query on; a wrong index loses or invents documents without any error. Here two collections
hold the same documents and take the same writes, one with the pipeline's kinds of index (a
single key, a flag, a compound ``(cell, time)`` and ``(time, _id)``) and one without, and many
seeded random filters must give the same ``_id``s in the same order, the same sorted and
limited pages and the same counts from both. The values mix types (numbers of several kinds,
strings, dates, booleans, ObjectIds, null, missing, embedded documents and, rarely, arrays),
and the writes change indexed fields, remove them, delete and upsert documents. On a real
MongoDB this passes trivially; it pins the local server's index code."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest
from bson import Decimal128, Int64, ObjectId
from pymongo import ASCENDING, MongoClient
from pymongo.errors import OperationFailure

pytestmark = pytest.mark.storage

DOCUMENTS = 800
FILTERS_PER_ROUND = 100
BASE = datetime(2026, 1, 17)
OBJECT_IDS = [ObjectId(f"{i:024x}") for i in range(1, 9)]
INDEXES = [
    [("f", ASCENDING)],
    [("flag", ASCENDING)],
    [("event", ASCENDING)],
    [("cell", ASCENDING), ("at", ASCENDING)],
    [("at", ASCENDING), ("_id", ASCENDING)],
    [("sub.k", ASCENDING)],
]
FIELDS = ["f", "flag", "event", "cell", "at", "sub.k"]


def time(rng: random.Random) -> datetime:
    return BASE + timedelta(minutes=rng.randrange(0, 600))


def value(rng: random.Random, field: str):
    """A value for ``field``: mostly of the field's own kind, sometimes of another type."""
    roll = rng.random()
    if roll < 0.04:
        return None
    if roll < 0.07:
        return rng.choice([{"a": 1}, [rng.randrange(5), rng.randrange(5)], [], 2**40, -0.0])
    if roll < 0.12:
        return rng.choice([rng.randrange(20), f"s{rng.randrange(20)}", time(rng), True])
    if field == "f":
        return rng.choice(
            [
                rng.randrange(30),
                rng.randrange(30) + 0.5,
                float(rng.randrange(30)),
                f"s{rng.randrange(30)}",
                rng.choice(OBJECT_IDS),
                3_000_000_000 + rng.randrange(3),
            ]
        )
    if field == "flag":
        return rng.random() < 0.3
    if field == "event":
        return f"e{rng.randrange(60)}"
    if field == "cell":
        return f"c{rng.randrange(15)}"
    if field in ("at", "sub.k"):
        return time(rng)
    raise AssertionError(field)


def document(rng: random.Random, key: str) -> dict:
    doc: dict = {"_id": key, "n": rng.randrange(1000)}
    for field in FIELDS:
        if rng.random() < 0.08:
            continue  # missing
        if field == "sub.k":
            doc["sub"] = {"k": value(rng, field)} if rng.random() < 0.9 else "flat"
        else:
            doc[field] = value(rng, field)
    return doc


def condition(rng: random.Random, field: str):
    """A condition on one field, of the shapes the index answers and of some it does not."""
    shape = rng.random()
    if shape < 0.3:
        return value(rng, field)
    if shape < 0.4:
        return {"$eq": value(rng, field)}
    if shape < 0.6:
        return {"$in": [value(rng, field) for _ in range(rng.randrange(0, 6))]}
    if shape < 0.9:
        low, high = sorted(
            [value(rng, field), value(rng, field)], key=lambda v: (str(type(v)), str(v))
        )
        bounds: dict = {}
        if rng.random() < 0.8:
            bounds[rng.choice(["$gt", "$gte"])] = low
        if rng.random() < 0.8 or not bounds:
            bounds[rng.choice(["$lt", "$lte"])] = high
        return bounds
    return rng.choice([{"$ne": value(rng, field)}, {"$exists": rng.random() < 0.5}])


def query(rng: random.Random, depth: int = 0) -> dict:
    roll = rng.random()
    if roll < 0.15 and depth == 0:
        return {"$or": [query(rng, 1) for _ in range(rng.randrange(1, 4))]}
    if roll < 0.25 and depth == 0:
        return {"$and": [query(rng, 1), {"$or": [query(rng, 1), query(rng, 1)]}]}
    if roll < 0.45:
        return {"cell": condition(rng, "cell"), "at": condition(rng, "at")}
    filter_ = {rng.choice(FIELDS): None}
    filter_ = {field: condition(rng, field) for field in filter_}
    if rng.random() < 0.4:
        extra = rng.choice(FIELDS + ["n"])
        filter_[extra] = condition(rng, extra) if extra != "n" else {"$lt": rng.randrange(1000)}
    return filter_


def answers(collection, filter_: dict) -> tuple:
    ids = [d["_id"] for d in collection.find(filter_, {"_id": 1})]
    page = [d["_id"] for d in collection.find(filter_, {"_id": 1}).sort("n", -1).limit(7)]
    return ids, page, collection.count_documents(filter_)


def stored_value(doc: dict, field: str):
    return (
        doc.get("sub", {}).get("k")
        if field == "sub.k" and isinstance(doc.get("sub"), dict)
        else doc.get(field)
    )


def probes(plain, keys: list[str]) -> list[dict]:
    """Filters for the values the last 40 documents of ``keys`` hold now, each field by
    equality and by a range starting at the value: the values an index must have been told of."""
    filters = []
    for doc in plain.find({"_id": {"$in": keys[-40:]}}):
        for field in FIELDS:
            stored = stored_value(doc, field)
            if stored is None or isinstance(stored, (dict, list)):
                continue
            filters.append({field: stored})
            filters.append({field: {"$gte": stored, "$lte": stored}})
        if isinstance(doc.get("cell"), str) and "at" in doc:
            filters.append({"cell": doc["cell"], "at": {"$gte": doc["at"]}})
    return filters


def compare(indexed, plain, rng: random.Random, label: str, written: list[str]) -> int:
    """Asserts equal answers for FILTERS_PER_ROUND random filters and for probes of the values
    of the documents ``written``; returns how many of the random filters matched anything."""
    nonempty = 0
    for i in range(FILTERS_PER_ROUND):
        filter_ = query(rng)
        expected = answers(plain, filter_)
        assert answers(indexed, filter_) == expected, f"{label}, filter {i}: {filter_!r}"
        nonempty += bool(expected[0])
    for filter_ in probes(plain, written):
        assert answers(indexed, filter_) == answers(plain, filter_), f"{label}: {filter_!r}"
    return nonempty


def write(collections, rng: random.Random) -> list[str]:
    """The same random writes to both collections: indexed fields changed, unset, documents
    replaced, deleted and upserted. Returns the ``_id``s written to by key."""
    keys = []
    for _ in range(120):
        key = f"p{rng.randrange(DOCUMENTS + 100):04d}"
        keys.append(key)
        field = rng.choice(FIELDS)
        roll = rng.random()
        if roll < 0.4:
            update = {"$set": {field: value(rng, field)}}
            if field == "sub.k" and rng.random() < 0.5:
                update = {"$set": {"sub": {"k": value(rng, field)}}}
            upsert = rng.random() < 0.1
            for c in collections:
                c.update_one({"_id": key}, update, upsert=upsert)
        elif roll < 0.5:
            for c in collections:
                c.update_one({"_id": key}, {"$unset": {field: ""}})
        elif roll < 0.6:
            replacement = document(rng, key)
            for c in collections:
                c.replace_one({"_id": key}, replacement, upsert=True)
        elif roll < 0.7:
            filter_ = {field: condition(rng, field)}
            for c in collections:
                c.delete_many(filter_)
        else:
            filter_ = query(rng, 1)
            update = {"$set": {"event": value(rng, "event"), "flag": rng.random() < 0.5}}
            for c in collections:
                c.update_many(filter_, update)
    return keys


@pytest.fixture
def collections(mongo):
    client = MongoClient(mongo.uri, serverSelectionTimeoutMS=10_000)
    db = client[mongo.database]
    yield db["indexed"], db["plain"]
    client.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_indexed_and_scanned_answers_agree(collections, seed):
    indexed, plain = collections
    rng = random.Random(seed)
    for keys in INDEXES[:3]:
        indexed.create_index(keys)  # before the documents: kept up as they are inserted
    docs = [document(rng, f"p{i:04d}") for i in range(DOCUMENTS)]
    for c in collections:
        c.insert_many([dict(d) for d in docs])
    for keys in INDEXES[3:]:
        indexed.create_index(keys)  # after them: built from what is stored

    matched = compare(indexed, plain, rng, "after insert", [d["_id"] for d in docs[:100]])
    assert matched > FILTERS_PER_ROUND // 4, "the filters should match something"

    for round_ in range(3):
        written = write(collections, rng)
        compare(indexed, plain, rng, f"after writes {round_}", written)

    indexed.drop_index([("cell", ASCENDING), ("at", ASCENDING)])
    indexed.create_index([("cell", ASCENDING), ("at", ASCENDING)])
    written = write(collections, rng)
    compare(indexed, plain, rng, "after the index was dropped and created again", written)
    assert indexed.count_documents({}) == plain.count_documents({})


# ------------------------------------------------------------------ sorted pages from an index

# A sort whose first key leads an index, with a limit, is read in that index's order and stops
# at the page's end (IndexSafeH2Backend.pageInIndexOrder). That path is taken only when every
# indexed value of the first key sorts within one type, as the pipeline's fields do, so these
# documents keep each field to one type (numbers of several kinds are one type), with ties,
# missing values and -0.0; one step adds an array and takes it away again, which must send
# the same queries back to the scan and then to the index.
SORTS = [
    [("at", 1), ("_id", 1)],
    [("at", -1), ("_id", 1)],
    [("at", 1)],
    [("cell", 1), ("at", 1)],
    [("cell", -1), ("n", 1)],
    [("f", 1), ("n", -1)],
    [("event", -1)],
]


def typed_document(rng: random.Random, key: str) -> dict:
    doc: dict = {"_id": key, "n": rng.randrange(1000)}
    if rng.random() < 0.97:
        doc["at"] = BASE + timedelta(seconds=rng.randrange(0, 3600) * 10)
    if rng.random() < 0.95:
        doc["cell"] = f"c{rng.randrange(12)}"
    if rng.random() < 0.9:
        doc["f"] = rng.choice([rng.randrange(40), rng.randrange(40) + 0.5, -0.0, 0, 2**31 + 5])
    if rng.random() < 0.9:
        doc["event"] = f"e{rng.randrange(80)}"
    return doc


def typed_filter(rng: random.Random) -> dict:
    """Filters of the shapes the pipeline sends, and some that bound nothing."""
    at = BASE + timedelta(seconds=rng.randrange(0, 3600) * 10)
    later = at + timedelta(minutes=rng.randrange(1, 400))
    roll = rng.random()
    if roll < 0.25:  # the backfill's day page after its first
        return {
            "$and": [
                {"at": {"$gte": at, "$lt": later}},
                {
                    "$or": [
                        {"at": {"$gt": at}},
                        {"at": at, "_id": {"$gt": f"p{rng.randrange(900):04d}"}},
                    ]
                },
            ]
        }
    if roll < 0.4:
        return {"at": {rng.choice(["$gt", "$gte"]): at, rng.choice(["$lt", "$lte"]): later}}
    if roll < 0.5:
        return {"cell": {"$in": [f"c{rng.randrange(12)}" for _ in range(rng.randrange(0, 4))]}}
    if roll < 0.6:
        return {"f": {"$gte": rng.choice([-1, 0, 10.5, 2**31])}, "n": {"$lt": rng.randrange(1000)}}
    if roll < 0.7:
        return {"$or": [{"event": f"e{rng.randrange(80)}"}, {"at": {"$lte": at}}]}
    if roll < 0.8:
        return {"n": {"$lt": rng.randrange(1000)}}
    if roll < 0.9:
        return {"event": {"$gte": f"e{rng.randrange(80)}"}, "cell": f"c{rng.randrange(12)}"}
    return {}


def pages(collection, filter_: dict, sort: list, rng: random.Random) -> list:
    skip = rng.choice([0, 0, 3, 40])
    limit = rng.choice([1, 7, 50, 300])
    cursor = collection.find(filter_, {"_id": 1}).sort(sort).skip(skip).limit(limit)
    return [d["_id"] for d in cursor]


def compare_pages(indexed, plain, rng: random.Random, label: str, rounds: int = 120) -> int:
    """Asserts the same sorted pages from both collections; returns how many were not empty."""
    nonempty = 0
    for i in range(rounds):
        filter_, sort = typed_filter(rng), rng.choice(SORTS)
        state = rng.getstate()
        expected = pages(plain, filter_, sort, rng)
        rng.setstate(state)
        got = pages(indexed, filter_, sort, rng)
        assert got == expected, f"{label}, page {i}: {filter_!r} sorted by {sort}"
        nonempty += bool(expected)
    return nonempty


@pytest.mark.parametrize("seed", [3, 4])
def test_sorted_pages_read_in_index_order_agree_with_a_scan(collections, seed):
    indexed, plain = collections
    rng = random.Random(seed)
    for keys in INDEXES:
        indexed.create_index(keys)
    docs = [typed_document(rng, f"p{i:04d}") for i in range(DOCUMENTS)]
    for c in collections:
        c.insert_many([dict(d) for d in docs])
    assert compare_pages(indexed, plain, rng, "after insert") > 60

    for round_ in range(2):
        for _ in range(150):
            key = f"p{rng.randrange(DOCUMENTS + 50):04d}"
            replacement = typed_document(rng, key)
            if rng.random() < 0.2:
                for c in collections:
                    c.delete_one({"_id": key})
            else:
                for c in collections:
                    c.replace_one({"_id": key}, replacement, upsert=True)
        compare_pages(indexed, plain, rng, f"after writes {round_}")

    # An array on "at" sorts by its elements: the index no longer gives the order.
    for c in collections:
        c.update_one({"_id": "p0001"}, {"$set": {"at": [BASE, BASE + timedelta(hours=3)]}})
    compare_pages(indexed, plain, rng, "with an array", rounds=40)
    for c in collections:
        c.update_one({"_id": "p0001"}, {"$set": {"at": BASE + timedelta(minutes=5)}})
    compare_pages(indexed, plain, rng, "after the array was removed", rounds=40)


# The library's sort compares two numbers as truncated longs when either is a whole number of
# 2^31 or more in size: 3e9 and 3e9 + 0.5 tie, NaN counts as 0, -inf as -2^63. A double's order
# (the index's) then differs from the sort's, and reading the groups of equal values in the
# index's order returned the wrong ties; such numbers must send the page back to the sort.
NUMBERS_SORTED_AS_LONGS = [
    3_000_000_000.5,
    3_000_000_000,
    Int64(3_000_000_000),
    -3_000_000_000.5,
    -3_000_000_000,
    float("nan"),
    2**31,
    5,
    5.5,
    -0.0,
    float("inf"),
    float("-inf"),
    float(-(2**63)),
    1e19,
    Decimal128("3000000000.25"),
]


def test_sorted_pages_over_numbers_sorted_as_longs_agree_with_a_scan(collections):
    indexed, plain = collections
    indexed.create_index([("f", ASCENDING)])
    docs = [{"_id": f"p{i:04d}", "f": v} for i, v in enumerate(NUMBERS_SORTED_AS_LONGS)]
    for c in collections:
        c.insert_many([dict(d) for d in docs])

    for filter_ in ({}, {"f": {"$gte": 2}}, {"f": {"$lte": 0}}):
        for sort in ([("f", 1)], [("f", -1)], [("f", 1), ("_id", -1)]):
            for skip in range(0, len(docs), 3):
                for limit in (1, 2, 5):
                    pages = [
                        [d["_id"] for d in c.find(filter_).sort(sort).skip(skip).limit(limit)]
                        for c in (indexed, plain)
                    ]
                    assert pages[0] == pages[1], f"{filter_!r} sorted by {sort}, {skip}+{limit}"


# Values the library's sort compares inconsistently: a Decimal128 exactly with another one but
# as a double with other numbers (so 0.1 equals Decimal128 "0.1" and "0.10000000000000000001",
# which differ), and the numbers above on a later key of the sort. Sorting only the groups read
# from the index then gave another order than sorting every match, or failed where that did
# not; a page whose documents hold such values is left to the sort of every match. When the
# scan's own sort fails (the library's comparison breaks its contract), nothing is compared.
INCONSISTENT_FIRST = [
    Decimal128("0.1"),
    Decimal128("0.10000000000000000001"),
    Decimal128("0.09999999999999999999"),
    0.1,
    7,
    8.5,
]
INCONSISTENT_LATER = [3_000_000_000.5, 3_000_000_000, float("nan"), float("inf"), 5, 2**40]


def test_sorted_pages_over_numbers_compared_inconsistently_agree_with_a_scan(collections):
    indexed, plain = collections
    indexed.create_index([("f", ASCENDING)])
    rng = random.Random(5)
    compared = 0
    for round_ in range(12):
        for c in collections:
            c.delete_many({})
        docs = [
            {"_id": i, "f": rng.choice(INCONSISTENT_FIRST), "n": rng.choice(INCONSISTENT_LATER)}
            for i in range(rng.randrange(5, 80))
        ]
        for c in collections:
            c.insert_many([dict(d) for d in docs])
        for sort in ([("f", 1)], [("f", -1)], [("f", 1), ("n", 1)], [("f", -1), ("n", -1)]):
            for limit in (1, 3, 10):
                try:
                    expected = [d["_id"] for d in plain.find().sort(sort).limit(limit)]
                except OperationFailure:
                    continue
                got = [d["_id"] for d in indexed.find().sort(sort).limit(limit)]
                assert got == expected, f"round {round_}: sorted by {sort}, limit {limit}"
                compared += 1
    assert compared > 100, "the scan's sort should mostly succeed"


def test_an_index_refused_for_parallel_arrays_is_not_kept(collections):
    """A compound index over two arrays of one document is refused, as MongoDB refuses it, and
    leaves nothing behind: the next build of the same index, once that document is gone, holds
    every document."""
    indexed, _ = collections
    indexed.insert_many([{"_id": i, "a": i, "b": -i} for i in range(6)])
    indexed.insert_one({"_id": 99, "a": [1, 2], "b": [3, 4]})
    with pytest.raises(OperationFailure, match="parallel arrays"):
        indexed.create_index([("a", ASCENDING), ("b", ASCENDING)])
    assert sorted(indexed.index_information()) == ["_id_"]

    indexed.delete_one({"_id": 99})
    indexed.create_index([("a", ASCENDING), ("b", ASCENDING)])
    page = indexed.find({"a": {"$gte": 1}}, {"_id": 1}).sort("a", ASCENDING).limit(10)
    assert [d["_id"] for d in page] == [1, 2, 3, 4, 5]
