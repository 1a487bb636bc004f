"""Documents read back from the local server's file are the documents that were written.

The local MongoDB-compatible server stores each document as BSON in its H2 file
(``localstack/mongo/.../DocumentValueType.java``); an encoding that loses a type or a value
would show only once the server has read the document from the file again. Documents holding
every BSON type the wire protocol carries are written, read back raw (the server's own BSON
bytes), the server is restarted, and the bytes read back must be the same, as must a range
query's answer over them. On a real MongoDB this passes trivially.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from bson import Binary, Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient

from tests.faults.conftest import stopped

pytestmark = [pytest.mark.faults, pytest.mark.storage, pytest.mark.slow]

RAW = CodecOptions(document_class=RawBSONDocument)


def documents() -> list[dict]:
    taken = datetime(2026, 1, 17, 9, 30, 15, 123000, tzinfo=UTC)
    return [
        {
            "_id": "every-type",
            "double": 2.5,
            "negative_zero": -0.0,
            "nan": float("nan"),
            "infinity": float("-inf"),
            "int32": -7,
            "int64": Int64(2**53 + 1),
            "decimal": Decimal128("1234567890.123456789"),
            "string": "Prayagraj, Sangam Nose \u2014 \U0001f4f7",
            "empty": "",
            "bool": True,
            "null": None,
            "date": taken,
            "before_1970": datetime(1969, 7, 20, 20, 17, tzinfo=UTC),
            "object_id": ObjectId("6566d5f2a1b2c3d4e5f60718"),
            "binary": Binary(bytes(range(256))),
            "uuid": Binary.from_uuid(uuid.UUID("12345678-1234-5678-1234-567812345678")),
            "regex": Regex("^snap.*map$", "i"),
            "code": Code("function () { return 1; }"),
            "timestamp": Timestamp(1_700_000_000, 7),
            "min": MinKey(),
            "max": MaxKey(),
            "location": {"type": "Point", "coordinates": [81.8863, 25.4358]},
            "array": [1, "two", 3.0, None, {"four": [5, [6]]}, []],
            "nested": {"a": {"b": {"c": {"d": "deep"}}}, "order": {"z": 1, "a": 2, "m": 3}},
        },
        {"_id": ObjectId("6566d5f2a1b2c3d4e5f60719"), "takenAt": taken, "n": 1},
        {"_id": 42, "takenAt": taken, "n": Int64(-(2**62))},
        {"_id": {"compound": "id", "part": 2}, "takenAt": taken},
    ]


def read_raw(collection) -> list[bytes]:
    return [doc.raw for doc in collection.find({}).sort("n", 1)]


def test_documents_survive_a_restart_byte_for_byte(mongo):
    client = MongoClient(mongo.uri, serverSelectionTimeoutMS=10_000)
    collection = client[mongo.database].get_collection("stored_values", codec_options=RAW)
    client[mongo.database].stored_values.insert_many(documents())
    client[mongo.database].stored_values.create_index("takenAt")
    before = read_raw(collection)
    in_range_before = [d.raw for d in collection.find({"takenAt": {"$gte": datetime(2026, 1, 17)}})]
    assert len(before) == len(documents()) and len(in_range_before) == 3
    client.close()

    with stopped("mongo"):
        pass  # the server reads the documents from its file after the restart

    client = MongoClient(mongo.uri, serverSelectionTimeoutMS=60_000)
    collection = client[mongo.database].get_collection("stored_values", codec_options=RAW)
    try:
        assert read_raw(collection) == before
        in_range = [d.raw for d in collection.find({"takenAt": {"$gte": datetime(2026, 1, 17)}})]
        assert in_range == in_range_before
        # Written again after the restart (an update rewrites the stored document).
        collection.update_one({"_id": "every-type"}, {"$set": {"touched": True}})
        touched = collection.find_one({"_id": "every-type"})
        assert touched.raw != before[0] and touched["touched"] is True
    finally:
        client.close()


def test_a_document_grown_past_16_mb_survives_a_restart(mongo):
    """The library lets an update grow a document past BSON's 16 MB limit, which its decoder
    refuses: written as BSON, such a document could not be read again and the store would not
    open. It must read back after a restart, and so must the documents beside it."""
    client = MongoClient(mongo.uri, serverSelectionTimeoutMS=10_000)
    collection = client[mongo.database].get_collection("grown", codec_options=RAW)
    client[mongo.database].grown.insert_one({"_id": "grown", "a": "a" * (15 * 1024 * 1024)})
    client[mongo.database].grown.update_one({"_id": "grown"}, {"$set": {"b": "b" * 3 * 1024**2}})
    client[mongo.database].grown.insert_one({"_id": "beside", "n": 1})
    before = [doc.raw for doc in collection.find({}, batch_size=1)]
    assert len(before) == 2 and len(before[1]) > 16 * 1024 * 1024
    client.close()

    with stopped("mongo"):
        pass  # the server reads the documents from its file after the restart

    client = MongoClient(mongo.uri, serverSelectionTimeoutMS=60_000)
    collection = client[mongo.database].get_collection("grown", codec_options=RAW)
    try:
        assert [doc.raw for doc in collection.find({}, batch_size=1)] == before
    finally:
        client.close()
