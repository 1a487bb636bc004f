"""The local MongoDB-compatible server's unique indexes: a store written with the library's own
key comparison works with the server's cached one, and the other way round.

The server compares unique-index keys by their Java-serialised bytes, as the library does, but
keeps each key's bytes instead of serialising both keys at every comparison (IndexKeyType.java).
The store format and the key order are meant to be unchanged, so that existing stores open. The
server's `-Dsnapmap.mongo.indexKeys=library` leaves the index maps to the library's own code, so
here one data dir is written that way, then opened by turns with the cached comparison and the
library's. Each time every document is found by `_id` and by its unique `code`, and a duplicate
of each of its three unique keys (`_id`, `code`, and the pair `group`, `seq`; 2,700 keys at the
end) is refused with E11000. Were the orders different, a key written under one would be
searched for on the wrong side of the B-tree under the other: it would not be found, and its
duplicate would be accepted.

What this proves: compatibility in both directions, for the key kinds made here (strings of
several lengths and scripts, 32- and 64-bit integers of both signs, doubles, datetimes,
ObjectIds, embedded documents, and two-field compound keys), across restarts, for lookups,
updates, upserts and inserts. What it does not prove: the same for kinds not made here (regular
expressions, binary, Decimal128, ...), which rests on the order being the library's by
construction (the same two library functions decide it); nor the speed-up, which
docs/mongodb-compatible-server.md measures. The old server fails here only because it does not
report the cached comparison, which the test asserts is in use.

It starts its own servers, on 127.0.0.1 and a free port, from the stack's build of the server
(built first if needed); it needs no running stack.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from bson import ObjectId
from pymongo import ASCENDING, UpdateOne
from pymongo.errors import BulkWriteError

from tests.stack.mongo_server import own_server, stack_build

pytestmark = pytest.mark.stack

KEYS = 600  # documents to begin with (900 at the end); each has three unique keys
CACHED_LOG_LINE = "unique index keys are compared by their cached serialised form"
SLOW_WARNING = "compares its keys the library's slow way"


@pytest.fixture(scope="module")
def build_dir() -> Path:
    return stack_build()


def server(build: Path, data_dir: Path, index_keys: str, log: Path):
    """The server on `data_dir`, comparing index keys the `index_keys` way."""
    return own_server(build, data_dir, log, f"-Dsnapmap.mongo.indexKeys={index_keys}")


def mixed_value(i: int) -> object:
    """The i-th of a run of distinct values of mixed BSON types (no two equal in MongoDB)."""
    kind, n = i % 8, i // 8
    if kind == 0:
        return "p" * (n % 17) + str(n)
    if kind == 1:
        return n if n % 2 else -n - 1
    if kind == 2:
        return (n + 1) * 10_000_000_007 * (1 if n % 2 else -1)  # 64-bit
    if kind == 3:
        return (n + 0.25) * (1 if n % 3 else -1)
    if kind == 4:
        return datetime(2021, 3, 1) + timedelta(milliseconds=n * 86_400_123)
    if kind == 5:
        return ObjectId(f"{n * 7919:024x}")
    if kind == 6:
        return {"cell": n, "tag": f"t{n % 5}"}
    return f"événement-{n:05d}-{'å' * (n % 5)}"


def document(i: int) -> dict:
    """Three unique keys: `_id`, `code` and the pair (`group`, `seq`)."""
    return {
        "_id": mixed_value(i),
        "code": mixed_value(i + 7 * KEYS),  # a different value, and often a different kind
        "group": mixed_value(i % 40 + 3 * KEYS),
        "seq": i // 40,
        "n": i,
    }


def without_id(doc: dict) -> dict:
    return {key: value for key, value in doc.items() if key != "_id"}


def assert_all_found(collection, docs: list[dict]) -> None:
    for doc in docs:
        by_id = collection.find_one({"_id": doc["_id"]})
        assert by_id is not None and by_id["n"] == doc["n"], f"_id {doc['_id']!r} not found"
        by_code = collection.find_one({"code": doc["code"]}, {"n": 1})
        assert by_code is not None and by_code["n"] == doc["n"], f"code {doc['code']!r} lost"
    assert collection.count_documents({}) == len(docs)


def assert_duplicates_refused(collection, docs: list[dict]) -> None:
    """Each document again three times, each time with one of its unique keys and new values
    for the others: all refused."""
    fresh = iter(document(i) for i in range(10 * KEYS, 20 * KEYS))
    duplicates = []
    for doc in docs:
        duplicates.append({**next(fresh), "_id": doc["_id"]})
        duplicates.append({**next(fresh), "code": doc["code"]})
        duplicates.append({**next(fresh), "group": doc["group"], "seq": doc["seq"]})
    with pytest.raises(BulkWriteError) as refused:
        collection.insert_many(duplicates, ordered=False)
    # Not details["nInserted"]: this server counts the refused documents in it too.
    codes = [error["code"] for error in refused.value.details["writeErrors"]]
    assert codes == [11000] * len(duplicates)
    assert collection.count_documents({}) == len(docs)


def test_a_store_written_with_library_key_order_works_both_ways(build_dir, tmp_path):
    data_dir = tmp_path / "data"
    docs = [document(i) for i in range(KEYS)]

    with server(build_dir, data_dir, "library", tmp_path / "library-1.log") as client:
        photos = client.snapmap.photos
        photos.create_index("code", unique=True)
        photos.create_index([("group", ASCENDING), ("seq", ASCENDING)], unique=True)
        photos.insert_many(docs[: KEYS // 2])
        for doc in docs[KEYS // 2 :]:
            photos.insert_one(doc)

    log = tmp_path / "cached-1.log"
    with server(build_dir, data_dir, "cached", log) as client:
        photos = client.snapmap.photos
        assert_all_found(photos, docs)
        assert_duplicates_refused(photos, docs)
        by_id = photos.bulk_write(
            [UpdateOne({"_id": d["_id"]}, {"$set": {"seen": 1}}) for d in docs], ordered=False
        )
        assert by_id.matched_count == KEYS
        by_code = photos.bulk_write(
            [
                UpdateOne({"code": d["code"]}, {"$inc": {"n": 0, "hits": 1}}, upsert=True)
                for d in docs
            ],
            ordered=False,
        )
        assert (by_code.matched_count, by_code.upserted_count) == (KEYS, 0)
        # New documents by upsert, except those with an embedded-document _id: the library
        # (with either comparison) can lose track of such a document upserted into a collection
        # whose _ids are of several types, until it restarts. Those are inserted instead.
        more = [document(KEYS + i) for i in range(KEYS // 3)]
        upserts = [d for d in more if not isinstance(d["_id"], dict)]
        upserted = photos.bulk_write(
            [
                UpdateOne({"_id": d["_id"]}, {"$setOnInsert": without_id(d)}, upsert=True)
                for d in upserts
            ],
            ordered=False,
        )
        assert (upserted.matched_count, upserted.upserted_count) == (0, len(upserts))
        photos.insert_many([d for d in more if isinstance(d["_id"], dict)])
        docs += more
        assert_all_found(photos, docs)
    assert CACHED_LOG_LINE in log.read_text(), "the server does not compare keys the cached way"
    assert SLOW_WARNING not in log.read_text()

    with server(build_dir, data_dir, "library", tmp_path / "library-2.log") as client:
        photos = client.snapmap.photos
        assert_all_found(photos, docs)
        assert_duplicates_refused(photos, docs)
        assert photos.count_documents({"seen": 1, "hits": 1}) == KEYS
        last = [document(2 * KEYS + i) for i in range(100)]
        photos.insert_many(last)
        docs += last

    with server(build_dir, data_dir, "cached", tmp_path / "cached-2.log") as client:
        photos = client.snapmap.photos
        assert_all_found(photos, docs)
        assert_duplicates_refused(photos, docs)
