"""The MongoDB-compatible server is stopped while a 2,000-message run is writing, then restarted.

The outage starts once the run has written its photos and events and queued its links (after
the clustering lease was released), so it lands in the link and publish steps. Whatever step
it hits, re-executing the same run request leaves one event per canonical event, every photo
in exactly one live event, right counts, each dead letter sent once and the offset committed.
"""

from __future__ import annotations

import threading
import time

import pytest
from dagster import instance_for_test
from pymongo import MongoClient

from tests.faults.conftest import (
    assert_end_state,
    changed,
    committed,
    error_classes,
    stack,
    stopped,
)
from tests.integration.pipeline import Harness, publish, upload

pytestmark = [pytest.mark.faults, pytest.mark.storage, pytest.mark.slow]

MESSAGES = 2000
BAD = [b"{broken", b"[]", b"", b'{"photoId": 1}', b"\xff"]
# pymongo's ConnectionFailure family: what a vanished server looks like to the run.
MONGO_OUTAGE = {"AutoReconnect", "ServerSelectionTimeoutError", "NetworkTimeout"}


def city(count: int) -> list[bytes]:
    """``count`` photos in bursts of 20 (10 s apart, a few metres wide) at spots 700 m apart:
    one event per burst."""
    values = []
    for i in range(count):
        spot, shot = divmod(i, 20)
        values.append(
            upload(
                f"m-{i:05d}",
                f"2026-04-02T{9 + spot // 20:02d}:{(spot % 20) * 3:02d}:{shot * 2:02d}Z",
                4.8950 + (spot % 10) * 0.01 + shot * 1e-5,
                52.3700 + (spot // 10) * 0.0063,
            )
        )
    return values


class StopWhenLinksQueued(threading.Thread):
    """Stops the server once the run has queued links and released the clustering lease."""

    def __init__(self, uri: str, database: str) -> None:
        super().__init__(daemon=True)
        self.client = MongoClient(uri, serverSelectionTimeoutMS=2000)
        self.db = self.client[database]
        self.fired = threading.Event()
        self.cancel = threading.Event()

    def run(self) -> None:
        try:
            while not self.cancel.is_set():
                lease = self.db.leases.find_one({"_id": "clustering"}) or {}
                if lease.get("holder") is None and self.db.pending_links.count_documents({}):
                    stack("stop", "mongo")
                    self.fired.set()
                    return
                time.sleep(0.02)
        finally:
            self.client.close()


def test_server_stopped_during_writes_then_restarted(resources, settings, kafka, mongo, blob):
    values = city(MESSAGES - len(BAD))
    for position, bad in zip((7, 400, 999, 1500, 1990), BAD, strict=True):
        values.insert(position, bad)
    publish(kafka, settings.uploads_topic, values, partition=0)
    one_run = changed(settings, max_messages_per_run=MESSAGES)
    resources = {**resources, "settings": one_run}

    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        (request,) = harness.tick()
        assert request.tags["snapmap/batch_size"] == str(MESSAGES)
        mongo.db()  # create the database and indexes before the watcher polls it

        with stopped("mongo", now=False):
            watcher = StopWhenLinksQueued(mongo.uri, mongo.database)
            watcher.start()
            try:
                first = harness.execute(request, raise_on_error=False)
            finally:
                watcher.cancel.set()
                watcher.join(timeout=60)
            assert watcher.fired.is_set(), "the run finished before the outage could start"
        if not first.success:
            assert MONGO_OUTAGE & set(error_classes(first)), error_classes(first)
            assert committed(kafka, settings.uploads_topic) == {}

        assert harness.execute(request).success

    db = mongo.db()
    assert committed(kafka, settings.uploads_topic) == {0: MESSAGES}
    assert db.photos.count_documents({}) == MESSAGES - len(BAD)
    assert db.dead_letters.count_documents({}) == len(BAD)
    assert_end_state(kafka, db, blob, one_run)
    assert db.events.count_documents({"manifestPending": True}) == 0
