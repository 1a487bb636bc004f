"""Filters that pin a unique key and add conditions (``{_id: X, version: 3}``): the pipeline's
conditional writes of events, outbox flags and leases. The local server answers them from the
unique index and then checks the other conditions on the document found; these tests pin that
the other conditions still decide, for reads, updates, upserts and deletes, and on a compound
unique index. How much faster that is than the scan it replaced is measured in
docs/mongodb-compatible-server.md, not here."""

from __future__ import annotations

import pytest
from pymongo import ASCENDING, DeleteOne, MongoClient, UpdateOne

pytestmark = pytest.mark.storage


@pytest.fixture
def events(mongo):
    client = MongoClient(mongo.uri, serverSelectionTimeoutMS=10_000)
    collection = client[mongo.database]["events"]
    collection.insert_many(
        [{"_id": f"e{i:04d}", "version": 1, "pending": True, "n": i} for i in range(500)]
    )
    yield collection
    client.close()


def test_extra_conditions_decide_reads(events):
    assert events.find_one({"_id": "e0007", "version": 1})["n"] == 7
    assert events.find_one({"_id": "e0007", "version": 2}) is None
    assert events.find_one({"_id": "e0007", "version": {"$gte": 1}, "pending": True})["n"] == 7
    assert events.find_one({"_id": "e0007", "pending": False}) is None
    assert events.find_one({"_id": "absent", "version": 1}) is None
    assert events.count_documents({"_id": "e0007", "$or": [{"n": 7}, {"n": 8}]}) == 1
    assert events.count_documents({"_id": "e0007", "$or": [{"n": 6}, {"n": 8}]}) == 0


def test_extra_conditions_decide_updates_and_deletes(events):
    requests = [
        UpdateOne({"_id": f"e{i:04d}", "version": 1 if i % 2 else 9}, {"$set": {"pending": False}})
        for i in range(100)
    ]
    result = events.bulk_write(requests, ordered=False)
    assert (result.matched_count, result.modified_count) == (50, 50)
    cleared = {d["_id"] for d in events.find({"pending": False}, {"_id": 1})}
    assert cleared == {f"e{i:04d}" for i in range(1, 100, 2)}

    deleted = events.bulk_write(
        [DeleteOne({"_id": "e0001", "pending": True}), DeleteOne({"_id": "e0002", "pending": True})]
    )
    assert deleted.deleted_count == 1
    assert events.find_one({"_id": "e0001"}) is not None
    assert events.find_one({"_id": "e0002"}) is None


def test_an_upsert_with_extra_conditions_inserts_only_when_nothing_matches(events):
    missed = events.update_one({"_id": "fresh", "version": 3}, {"$set": {"n": -1}}, upsert=True)
    assert missed.upserted_id == "fresh"
    assert events.find_one({"_id": "fresh"}) == {"_id": "fresh", "version": 3, "n": -1}

    hit = events.update_one({"_id": "e0003", "version": 1}, {"$inc": {"n": 100}}, upsert=True)
    assert (hit.matched_count, hit.upserted_id) == (1, None)
    assert events.find_one({"_id": "e0003"})["n"] == 103
    assert events.count_documents({}) == 501


def test_a_compound_unique_index_with_extra_conditions(mongo):
    client = MongoClient(mongo.uri, serverSelectionTimeoutMS=10_000)
    try:
        leases = client[mongo.database]["leases"]
        leases.create_index([("name", ASCENDING), ("shard", ASCENDING)], unique=True)
        leases.insert_many(
            [
                {"name": f"n{i}", "shard": s, "token": i * 10 + s}
                for i in range(50)
                for s in range(2)
            ]
        )
        assert leases.find_one({"name": "n4", "shard": 1, "token": 41})["token"] == 41
        assert leases.find_one({"name": "n4", "shard": 1, "token": 40}) is None
        changed = leases.update_one({"name": "n4", "shard": 0, "token": 40}, {"$set": {"token": 0}})
        assert changed.modified_count == 1
        assert leases.find_one({"name": "n4", "shard": 0})["token"] == 0
        assert leases.find_one({"name": "n4", "shard": 1})["token"] == 41
    finally:
        client.close()
