"""``listDatabases`` answers from the databases the server has open. The library opened each
one anew for the answer, building every non-unique index again from all its documents; at a
million photos that took gigabytes, and beside another client's writes it failed with
"Chunk N not found" (2026-12-05)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.stack.mongo_server import own_server, stack_build

pytestmark = pytest.mark.stack

OPENED = "adding unique _id index for collection photos"


def opened(log: Path) -> int:
    """How many times the server has opened the ``photos`` collection of a database."""
    return log.read_text().count(OPENED)


def test_listing_databases_opens_none_again(tmp_path):
    log = tmp_path / "server.log"
    with own_server(stack_build(), tmp_path / "data", log) as client:
        client.alpha.photos.insert_many([{"_id": i, "cell": i % 7} for i in range(2_000)])
        client.alpha.photos.create_index("cell")
        client.beta.events.insert_one({"_id": 1})
        client.gamma.scratch.insert_one({"_id": 1})
        client.drop_database("gamma")
        before = opened(log)
        assert before == 1

        for _ in range(3):
            assert client.list_database_names() == ["alpha", "beta"]
        listed = client.admin.command("listDatabases")["databases"]

        assert listed == [{"name": "alpha", "empty": False}, {"name": "beta", "empty": False}]
        assert opened(log) == before, "listDatabases opened a database again"
        assert client.alpha.photos.count_documents({"cell": 3}) == len(range(3, 2_000, 7))
