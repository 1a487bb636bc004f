"""A cursor left open across a restart of the local server ends with CursorNotFound.

A ``find`` of more than 101 documents leaves a cursor on the server for the rest. The local
MongoDB-compatible server numbered its cursors 1, 2, 3... from each start, and its ``getMore``
did not look at the collection it names: a client still iterating a cursor of ``photos`` from
before a restart went on, without an error, with the cursor a new ``find`` of ``events`` had just
been given after the restart, and the owner of that cursor then found it gone. MongoDB's cursor
ids are random 64-bit numbers and a ``getMore`` must name its cursor's own namespace
(``localstack/mongo/.../ReplyBatches.java``). On a real MongoDB this passes trivially.
"""

from __future__ import annotations

import pytest
from pymongo import MongoClient
from pymongo.errors import CursorNotFound

from tests.faults.conftest import stopped

pytestmark = [pytest.mark.faults, pytest.mark.storage, pytest.mark.slow]

DOCUMENTS = 300


def test_a_cursor_from_before_a_restart_does_not_continue_another_one(mongo):
    setup = MongoClient(mongo.uri, serverSelectionTimeoutMS=10_000)
    db = setup[mongo.database]
    db.photos.insert_many([{"_id": f"photo-{n:03d}", "kind": "photo"} for n in range(DOCUMENTS)])
    db.events.insert_many([{"_id": f"event-{n:03d}", "kind": "event"} for n in range(DOCUMENTS)])
    setup.close()

    # Each client is made after a restart, so that its cursor is the first the server opens.
    with stopped("mongo"):
        pass
    old = MongoClient(mongo.uri, serverSelectionTimeoutMS=120_000)
    photos = old[mongo.database].photos.find({})
    assert next(photos)["kind"] == "photo"
    assert photos.cursor_id  # the rest waits on the server

    with stopped("mongo"):
        pass
    new = MongoClient(mongo.uri, serverSelectionTimeoutMS=120_000)
    try:
        events = new[mongo.database].events.find({})
        assert next(events)["kind"] == "event"

        read = []
        with pytest.raises(CursorNotFound):
            for document in photos:
                read.append(document)
        # Only what the first batch had already brought; nothing of another collection.
        assert {document["kind"] for document in read} <= {"photo"}
        assert len(read) < DOCUMENTS - 1

        rest = list(events)
        assert len(rest) == DOCUMENTS - 1
        assert {document["kind"] for document in rest} == {"event"}
    finally:
        old.close()
        new.close()
