"""A large result comes back in batches, as MongoDB sends it.

MongoDB puts at most 16 MiB of documents in one reply (and, unless the client asks for another
size, 101 documents in the first batch of a ``find`` or ``aggregate``); the rest follows through
``getMore`` on the cursor. pymongo refuses a reply larger than the server's maximum message size
(48 MB) with a ``ProtocolError``. The pipeline reads many collections whole without a
``batch_size`` (the sweeper's photos, the events), so a server that answers a ``find`` in one
reply fails them on a large day. Here about 51 MB of documents are read back with a plain
``find``, an ``aggregate``, a large ``batch_size`` and a ``limit``: every document must come back,
in the order of a scan, and no reply may carry more than 16 MiB of documents. On a real MongoDB
this passes trivially; it pins the local server's batching (``localstack/mongo``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import bson
import pytest
from pymongo import MongoClient, monitoring
from pymongo.errors import OperationFailure

pytestmark = pytest.mark.storage

MAX_BATCH_BYTES = 16 * 1024 * 1024
DEFAULT_FIRST_BATCH = 101
# 392 documents of 64 KiB and 8 of 3 MiB: about 51 MB in all, more than the 48 MB
# a reply may take, so that the 16 MiB limit falls inside the runs of documents.
SMALL_DOCS = 400
SMALL_PAD = 64 * 1024
LARGE_EVERY = 50
LARGE_PAD = 3 * 1024 * 1024
COLLECTION = "reply_batches"


@dataclass
class Batch:
    command: str
    documents: int
    document_bytes: int


@dataclass
class Replies(monitoring.CommandListener):
    """The batches the server sent: how many documents each held, and their BSON bytes."""

    batches: list[Batch] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.names[event.request_id] = event.command_name

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        name = self.names.pop(event.request_id, event.command_name)
        cursor = event.reply.get("cursor")
        if name not in ("find", "aggregate", "getMore") or not cursor:
            return
        documents = cursor.get("firstBatch", cursor.get("nextBatch", []))
        size = sum(len(bson.encode(doc)) for doc in documents)
        self.batches.append(Batch(name, len(documents), size))

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.names.pop(event.request_id, None)


def documents() -> list[dict]:
    docs = []
    for n in range(SMALL_DOCS):
        pad = LARGE_PAD if n % LARGE_EVERY == 7 else SMALL_PAD
        docs.append({"_id": f"p{n:05d}", "n": n, "pad": chr(ord("a") + n % 26) * pad})
    return docs


@pytest.fixture
def client_and_replies(mongo) -> Iterator[tuple[MongoClient, Replies]]:
    replies = Replies()
    client = MongoClient(mongo.uri, event_listeners=[replies], serverSelectionTimeoutMS=10_000)
    collection = client[mongo.database][COLLECTION]
    docs = documents()
    for start in range(0, len(docs), 50):
        collection.insert_many(docs[start : start + 50])
    replies.batches.clear()
    try:
        yield client, replies
    finally:
        collection.drop()
        client.close()


def check_batches(replies: Replies, first_batch_limit: int) -> None:
    assert replies.batches, "no reply was recorded"
    first, *rest = replies.batches
    assert first.command in ("find", "aggregate")
    assert first.documents <= first_batch_limit, first
    assert all(batch.command == "getMore" for batch in rest), replies.batches
    for batch in replies.batches:
        assert batch.document_bytes <= MAX_BATCH_BYTES, batch
        assert batch.documents >= 1 or batch is first or batch is replies.batches[-1], batch


def expected_ids(limit: int | None = None) -> list[str]:
    ids = [f"p{n:05d}" for n in range(SMALL_DOCS)]
    return ids[:limit] if limit is not None else ids


def test_a_find_without_batch_size_returns_every_document_in_batches(client_and_replies, mongo):
    client, replies = client_and_replies
    total = sum(len(bson.encode(doc)) for doc in documents())
    assert total > 48_000_000  # one reply could not hold them

    found = list(client[mongo.database][COLLECTION].find({}))

    assert [doc["_id"] for doc in found] == expected_ids()
    assert found == documents()
    check_batches(replies, DEFAULT_FIRST_BATCH)
    assert sum(batch.documents for batch in replies.batches) == SMALL_DOCS


def test_an_aggregate_returns_every_document_in_batches(client_and_replies, mongo):
    client, replies = client_and_replies
    pipeline = [{"$match": {"n": {"$gte": 0}}}, {"$project": {"pad": 1, "n": 1}}]

    found = list(client[mongo.database][COLLECTION].aggregate(pipeline))

    assert [doc["_id"] for doc in found] == expected_ids()
    assert [doc["pad"] for doc in found] == [doc["pad"] for doc in documents()]
    check_batches(replies, DEFAULT_FIRST_BATCH)


def test_a_large_batch_size_is_cut_at_16_mib(client_and_replies, mongo):
    client, replies = client_and_replies
    collection = client[mongo.database][COLLECTION]

    found = list(collection.find({}, batch_size=1000))

    assert [doc["_id"] for doc in found] == expected_ids()
    check_batches(replies, 1000)


def test_sorted_and_limited_finds_keep_their_answer(client_and_replies, mongo):
    client, replies = client_and_replies
    collection = client[mongo.database][COLLECTION]

    descending = [doc["_id"] for doc in collection.find({}, {"n": 1}).sort("n", -1)]
    assert descending == expected_ids()[::-1]
    replies.batches.clear()

    limited = list(collection.find({}).sort("_id", 1).skip(10).limit(250))
    assert [doc["_id"] for doc in limited] == expected_ids()[10:260]
    check_batches(replies, DEFAULT_FIRST_BATCH)
    replies.batches.clear()

    small = list(collection.find({}, batch_size=7).limit(20))
    assert [doc["_id"] for doc in small] == expected_ids(20)
    check_batches(replies, 7)


def test_an_abandoned_cursor_is_closed(client_and_replies, mongo):
    client, _ = client_and_replies
    collection = client[mongo.database][COLLECTION]

    def open_cursors() -> int:
        status = client.admin.command("serverStatus")
        return status["metrics"]["cursor"]["open"]["total"]

    before = open_cursors()
    cursor = collection.find({}, {"n": 1})
    assert next(cursor)["_id"] == "p00000"
    assert open_cursors() == before + 1
    cursor.close()
    assert open_cursors() == before


def test_a_get_more_must_name_the_cursors_own_collection(mongo):
    """MongoDB refuses (code 13) a ``getMore`` that names another collection than its cursor's;
    the local server gave that cursor's documents to whatever collection the request named."""
    client = MongoClient(mongo.uri, serverSelectionTimeoutMS=10_000)
    db = client[mongo.database]
    try:
        db.small.insert_many([{"_id": n} for n in range(10)])
        reply = db.command({"find": "small", "filter": {}, "sort": {"_id": 1}, "batchSize": 2})
        cursor_id = reply["cursor"]["id"]
        assert cursor_id

        with pytest.raises(OperationFailure) as refused:
            db.command({"getMore": cursor_id, "collection": "other", "batchSize": 3})
        assert refused.value.code == 13

        more = db.command({"getMore": cursor_id, "collection": "small", "batchSize": 3})
        assert [doc["_id"] for doc in more["cursor"]["nextBatch"]] == [2, 3, 4]
        db.command({"killCursors": "small", "cursors": [cursor_id]})
    finally:
        client.close()


def test_a_single_batch_find_keeps_to_its_batch_size(mongo):
    """``singleBatch`` (pymongo's negative ``limit``) closes the cursor after the first batch,
    and that batch holds ``batchSize`` documents, as on MongoDB: ``limit(-5)`` with
    ``batch_size=2`` returns 2 documents. The local server returned all 5, and every match of a
    ``singleBatch`` find with a ``batchSize`` and no limit."""
    client = MongoClient(mongo.uri, serverSelectionTimeoutMS=10_000)
    db = client[mongo.database]
    try:
        db.small.insert_many([{"_id": n} for n in range(10)])
        found = db.small.find({}, batch_size=2).sort("_id", 1).limit(-5)
        assert [doc["_id"] for doc in found] == [0, 1]

        reply = db.command({"find": "small", "filter": {}, "singleBatch": True, "batchSize": 3})
        assert len(reply["cursor"]["firstBatch"]) == 3
        assert reply["cursor"]["id"] == 0

        # Without a batchSize the single batch is cut by size only.
        assert len(list(db.small.find({}).limit(-10))) == 10
    finally:
        client.close()
