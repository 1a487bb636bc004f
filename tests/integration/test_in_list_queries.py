"""Long ``$in`` lists: the local server matches lists of strings or whole numbers by hash
lookups, and reads a unique key's ``$in`` (with other conditions) from its index. These tests
pin that every answer is the one of equalities matched one by one (``$or`` of ``{k: v}``, which
the server matches without hashing) and, for the type rules, MongoDB's: a string equals only
itself, 32- and 64-bit integers and doubles of one value are equal, an array matches when an
element does, and missing, null and sub-documents match no listed scalar. How much faster the
lists got is in docs/mongodb-compatible-server.md, not here."""

from __future__ import annotations

import pytest
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
