"""Long ``$in`` lists: the local server matches lists of strings or whole numbers by hash
lookups, and reads a unique key's ``$in`` (with other conditions) from its index. These tests
pin that every answer is the one of equalities matched one by one (``$or`` of ``{k: v}``, which
the server matches without hashing) and, for the type rules, MongoDB's: a string equals only
itself, 32- and 64-bit integers and doubles of one value are equal, an array matches when an
element does, and missing, null and sub-documents match no listed scalar. How much faster the
lists got is in docs/mongodb-compatible-server.md, not here."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from bson import Decimal128, ObjectId
from bson.int64 import Int64
from pymongo import MongoClient

pytestmark = pytest.mark.storage

# Values of every kind the rules tell apart, each stored under `k` (or absent).
STORED: list[object] = [
    "a",
    "b",
    "B",
    "7",
    7,
    Int64(7),
    7.0,
    7.5,
    Int64(2**40),
    float(2**40),
    2**40 + 1,
    True,
    None,
    ["a", "z"],
    [7, 8],
    [],
    {"a": 1},
    "",
]


@pytest.fixture
def things(mongo):
    client = MongoClient(mongo.uri, serverSelectionTimeoutMS=10_000)
    collection = client[mongo.database]["things"]
    documents = [{"_id": f"t{i:02d}", "k": value, "n": i} for i, value in enumerate(STORED)]
    documents.append({"_id": "t-missing", "n": -1})
    collection.insert_many(documents)
    collection.insert_many([{"_id": f"pad{i:04d}", "k": f"pad{i}", "n": i} for i in range(300)])
    collection.create_index("k")
    yield collection
    client.close()


def _ids(collection, query) -> set[str]:
    return {d["_id"] for d in collection.find(query, {"_id": 1})}


def _one_by_one(collection, key: str, values: list, extra: dict | None = None) -> set[str]:
    query: dict = {"$or": [{key: v} for v in values]}
    return _ids(collection, {**query, **(extra or {})})


FILLER = [f"none{i}" for i in range(20)]  # lengthens a list past the hashing threshold


@pytest.mark.parametrize(
    ("listed", "expected"),
    [
        (["a", "7"], {"t00", "t03", "t13"}),
        (["b", ""], {"t01", "t17"}),
        ([7], {"t04", "t05", "t06", "t14"}),
        ([Int64(2**40)], {"t08", "t09"}),
        ([2**40 + 1, 8], {"t10", "t14"}),
    ],
)
def test_a_long_list_answers_as_equalities_do(things, listed, expected):
    numbers = all(isinstance(v, int) for v in listed)
    values = listed + ([10_000 + i for i in range(20)] if numbers else FILLER)
    assert len(values) > 16
    assert _ids(things, {"k": {"$in": values}}) == expected
    assert _one_by_one(things, "k", values) == expected


def test_a_long_list_of_mixed_kinds_answers_as_equalities_do(things):
    values = [*FILLER, "a", 7, 7.5, None, True]
    found = _ids(things, {"k": {"$in": values}})
    assert found == _one_by_one(things, "k", values)
    assert {"t00", "t04", "t07", "t11", "t12", "t-missing"} <= found


def test_other_conditions_and_or_clauses_still_decide(things):
    strings = [*FILLER, "a", "b", "7", "pad3", "pad4"]
    query = {"k": {"$in": strings}, "n": {"$lt": 4}}
    assert (
        _ids(things, query)
        == {"t00", "t01", "t03", "pad0003"}
        == (_one_by_one(things, "k", strings, {"n": {"$lt": 4}}) & _ids(things, {"n": {"$lt": 4}}))
    )
    numbers = list(range(100, 120)) + [7]
    either = {"$or": [{"k": {"$in": strings}, "n": {"$gte": 1}}, {"k": {"$in": numbers}}]}
    assert _ids(things, either) == {
        "t01",
        "t03",
        "t04",
        "t05",
        "t06",
        "t13",
        "t14",
        "pad0003",
        "pad0004",
    }


def test_a_unique_key_list_with_other_conditions_reads_the_listed_documents(things):
    ids = [f"t{i:02d}" for i in range(len(STORED))] + [f"pad{i:04d}" for i in range(0, 300, 7)]
    ids += ["absent", 7, None]
    query = {"_id": {"$in": ids}, "n": {"$gte": 5, "$lt": 60}}
    expected = {f"t{i:02d}" for i in range(5, len(STORED))} | {
        f"pad{i:04d}" for i in range(7, 60, 7)
    }
    assert _ids(things, query) == expected
    assert _ids(things, {"_id": {"$in": []}, "n": 1}) == set()
    assert things.count_documents({"_id": {"$in": ids[:40]}}) == 40


# --- drawn lists over values of every kind, against MongoDB's equality rules ---------------

_MISSING = object()
_STRINGS = ["a", "A", "", "7", "é", "e\u0301", "s\x00t", "\U0001f600"]
_INTEGERS = [0, 1, -7, 7, 2**31 - 1, 2**31, Int64(7), Int64(2**53), Int64(2**53 + 1)]
_INTEGERS += [Int64(-(2**63)), Int64(2**63 - 1)]
_OTHERS = [7.0, 1.0, -0.0, float("nan"), float(2**53), 7.5, Decimal128("7"), Decimal128("-0")]
_OTHERS += [Decimal128("NaN"), True, False, None, {"a": 1}, ObjectId("5f0000000000000000000001")]


def _number(value):
    """A BSON number as an exact Decimal ("nan" for every NaN); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal128):
        value = value.to_decimal()
    if isinstance(value, float | int | Decimal):
        return "nan" if value != value else Decimal(value)
    return None


def _equal(a, b) -> bool:
    """MongoDB's equality of two scalars: numbers of any type by exact value (NaN equals
    NaN, -0 equals 0), a boolean only a boolean, a string only the same code points."""
    if _number(a) is not None or _number(b) is not None:
        return _number(a) is not None and _number(a) == _number(b)
    return type(a) is type(b) and a == b


def _in(value, listed: list) -> bool:
    if value is _MISSING:
        return any(v is None for v in listed)
    if isinstance(value, list):
        return any(_in(e, listed) for e in value)
    return any(_equal(value, v) for v in listed)


def test_drawn_long_lists_answer_as_mongodb_does(mongo):
    """Stored values of every kind (int32/int64 extremes, doubles and decimals of the same
    value, -0, NaN, booleans, unicode and NUL strings, arrays of them, missing) against drawn
    lists of 16 or more strings, integers or mixed values, in finds, counts, $or, $nor, $not,
    an aggregation's $match and distinct; the same lists asked from several threads at once."""
    rng = random.Random(20261205)

    def drawn():
        r = rng.random()
        if r < 0.75:
            return rng.choice([_STRINGS, _INTEGERS, _OTHERS][int(r * 4)])
        if r < 0.9:
            return [rng.choice(_STRINGS + _INTEGERS + _OTHERS) for _ in range(rng.randint(0, 3))]
        return _MISSING

    client = MongoClient(mongo.uri, serverSelectionTimeoutMS=10_000)
    collection = client[mongo.database]["drawn"]
    stored = []
    for i in range(300):
        document = {"_id": i, "n": i % 7}
        for field in ("k", "j"):
            value = drawn()
            if value is not _MISSING:
                document[field] = value
        stored.append(document)
    collection.insert_many(stored)

    def matching(field: str, listed: list) -> set[int]:
        return {d["_id"] for d in stored if _in(d.get(field, _MISSING), listed)}

    lists = []
    for _ in range(40):
        size = rng.randint(16, 40)
        pools = [_STRINGS + [f"x{i}" for i in range(30)], _INTEGERS + list(range(100, 130))]
        pools.append(_STRINGS + _INTEGERS + _OTHERS)
        drawn_from = rng.choice(pools)
        lists.append([rng.choice(drawn_from) for _ in range(size)])
    everyone = {d["_id"] for d in stored}
    try:
        for listed, other in zip(lists, lists[1:] + lists[:1], strict=True):
            k, j = matching("k", listed), matching("j", other)
            query = {"k": {"$in": listed}}
            assert _ids(collection, query) == k
            assert collection.count_documents(query) == len(k)
            assert _ids(collection, {**query, "n": {"$lt": 3}}) == {
                i for i in k if stored[i]["n"] < 3
            }
            assert _ids(collection, {**query, "j": {"$in": other}}) == k & j
            assert _ids(collection, {"$or": [query, {"j": {"$in": other}}]}) == k | j
            assert _ids(collection, {"$nor": [query]}) == everyone - k
            assert _ids(collection, {"k": {"$not": {"$in": listed}}}) == everyone - k
            matched = collection.aggregate([{"$match": query}, {"$project": {"_id": 1}}])
            assert {d["_id"] for d in matched} == k
            assert set(collection.distinct("n", query)) == {stored[i]["n"] for i in k}

        def ask(listed: list) -> bool:
            return _ids(collection, {"k": {"$in": listed}}) == matching("k", listed)

        with ThreadPoolExecutor(max_workers=6) as pool:
            assert all(pool.map(ask, lists * 3))
    finally:
        client.close()
