"""Index changes while another client writes: the pipeline creates its indexes at start, while
the upload backend may already be writing photos into the same collection."""

from __future__ import annotations

import threading

import pytest
from pymongo import ASCENDING, MongoClient, UpdateOne

pytestmark = pytest.mark.storage

ROUNDS = 20
BATCH = 100


def test_index_changes_never_break_concurrent_upserts(mongo):
    client = MongoClient(mongo.uri, serverSelectionTimeoutMS=10_000)
    collection = client[mongo.database]["photos"]
    collection.insert_one({"_id": "seed", "n": 0})
    errors: list[BaseException] = []
    done = threading.Event()

    def upsert_rounds() -> None:
        try:
            for round_ in range(ROUNDS):
                collection.bulk_write(
                    [
                        UpdateOne({"_id": f"p{round_}-{i}"}, {"$set": {"n": i}}, upsert=True)
                        for i in range(BATCH)
                    ],
                    ordered=False,
                )
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)
        finally:
            done.set()

    writer = threading.Thread(target=upsert_rounds)
    writer.start()
    changes = 0
    while not done.is_set():
        name = collection.create_index([(f"f{changes % 7}", ASCENDING)])
        collection.drop_index(name)
        changes += 1
    writer.join()
    client.close()

    assert not errors, errors[0]
    assert changes > 0, "no index change overlapped the writes"
    check = MongoClient(mongo.uri, serverSelectionTimeoutMS=10_000)
    assert check[mongo.database]["photos"].count_documents({}) == ROUNDS * BATCH + 1
    check.close()
