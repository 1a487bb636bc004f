"""The local MongoDB-compatible server closes cursors that nobody reads, on time and under a
memory limit.

The server keeps the rest of a ``find`` or ``aggregate`` answer in its heap until a ``getMore``
asks for it (``localstack/mongo/.../ReplyBatches.java``). A client that dies mid-read leaves
that copy behind. Two ways it could pile up:

* an idle cursor was closed only when a later ``find`` or ``aggregate`` opened a new cursor, so
  abandoned cursors stayed open for good on a server nobody queried (five of them held about
  310 MB past their 10 minutes). Here the idle timeout is set to 2 s
  (``-Dsnapmap.mongo.cursorTimeoutMillis``) and nothing but ``serverStatus`` is sent: the
  cursor must be gone within seconds, counted in ``metrics.cursor.timedOut``, and its next
  ``getMore`` must fail with CursorNotFound (43);
* each abandoned ``aggregate`` with a computed field holds its own copy of the answer, so
  within the 10 minutes a few dozen of them filled the 2 GB heap. The open cursors may hold
  at most ``-Dsnapmap.mongo.cursorMemoryMiB`` (set to 24 MiB here) of documents, measured as
  BSON; a cursor that would go over closes the least recently used ones first. Here three
  cursors of about 10 MiB each are opened; the oldest-used one is closed, the other two read
  on to their end.

MongoDB has no such memory limit (it is a difference, documented in
docs/mongodb-compatible-server.md); the timeout is its ``cursorTimeoutMillis``.

It starts its own servers, on 127.0.0.1 and a free port, from the stack's build of the server
(built first if needed); it needs no running stack.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from tests.stack.mongo_server import own_server, stack_build

pytestmark = pytest.mark.stack

CURSOR_NOT_FOUND = 43
PAD = 128 * 1024
DOCUMENTS = 40  # of 128 KiB: with the computed copy, about 10 MiB in each aggregate's cursor
ADD_FIELD = [{"$addFields": {"p2": {"$concat": ["$pad", "y"]}}}]


@pytest.fixture(scope="module")
def build_dir() -> Path:
    return stack_build()


def server(build: Path, tmp_path: Path, properties: str):
    return own_server(build, tmp_path / "data", tmp_path / "server.log", properties)


def cursor_metrics(client: MongoClient) -> dict:
    return client.admin.command("serverStatus")["metrics"]["cursor"]


def open_aggregate(db, collection: str) -> int:
    """An aggregate with a computed field and a first batch of one document, left open as a
    client that died after its first document would leave it; returns its cursor id."""
    reply = db.command({"aggregate": collection, "pipeline": ADD_FIELD, "cursor": {"batchSize": 1}})
    assert len(reply["cursor"]["firstBatch"]) == 1
    assert reply["cursor"]["id"]
    return reply["cursor"]["id"]


def get_more(db, collection: str, cursor_id: int, batch_size: int = 0) -> list[dict]:
    command = {"getMore": cursor_id, "collection": collection}
    if batch_size:
        command["batchSize"] = batch_size
    return db.command(command)["cursor"]["nextBatch"]


def assert_closed(db, collection: str, cursor_id: int) -> None:
    with pytest.raises(OperationFailure) as refused:
        get_more(db, collection, cursor_id)
    assert refused.value.code == CURSOR_NOT_FOUND


def test_an_idle_cursor_is_closed_without_further_queries(build_dir, tmp_path):
    properties = "-Dsnapmap.mongo.cursorTimeoutMillis=2000"
    with server(build_dir, tmp_path, properties) as client:
        db = client.test
        db.photos.insert_many([{"_id": n} for n in range(300)])
        before = cursor_metrics(client)
        reply = db.command({"find": "photos", "filter": {}, "batchSize": 2})
        cursor_id = reply["cursor"]["id"]
        assert cursor_id
        assert cursor_metrics(client)["open"]["total"] == before["open"]["total"] + 1

        # Nothing but serverStatus from here on: no find or aggregate opens another cursor.
        deadline = time.monotonic() + 20
        while cursor_metrics(client)["open"]["total"] > before["open"]["total"]:
            assert time.monotonic() < deadline, "the idle cursor is still open after 20 s"
            time.sleep(0.5)

        assert cursor_metrics(client)["timedOut"] == before["timedOut"] + 1
        assert_closed(db, "photos", cursor_id)


def test_open_cursors_are_held_to_their_memory_limit(build_dir, tmp_path):
    properties = "-Dsnapmap.mongo.cursorMemoryMiB=24"
    with server(build_dir, tmp_path, properties) as client:
        db = client.test
        for n in range(DOCUMENTS):
            db.photos.insert_one({"_id": n, "pad": chr(ord("a") + n % 26) * PAD})

        first = open_aggregate(db, "photos")
        second = open_aggregate(db, "photos")
        # The first is read again, so the second is now the least recently used.
        assert [doc["_id"] for doc in get_more(db, "photos", first, batch_size=1)] == [1]
        third = open_aggregate(db, "photos")  # 30 MiB with the other two: over 24

        assert_closed(db, "photos", second)
        # The rest of each (under 16 MiB) comes in one more batch.
        rest = get_more(db, "photos", first)
        assert [doc["_id"] for doc in rest] == list(range(2, DOCUMENTS))
        assert all(doc["p2"] == doc["pad"] + "y" for doc in rest)
        rest = get_more(db, "photos", third)
        assert [doc["_id"] for doc in rest] == list(range(1, DOCUMENTS))
        assert cursor_metrics(client)["open"]["total"] == 0
