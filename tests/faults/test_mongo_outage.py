"""The MongoDB-compatible server is stopped while a 2,000-message run is writing, then restarted.

The outage starts once the run has written its photos and events and queued its links (after
the clustering lease was released), so it lands in the link and publish steps. Whatever step
it hits, re-executing the same run request leaves one event per canonical event, every photo
in exactly one live event, right counts, each dead letter sent once and the offset committed.

The clustering lease under the same outage and under a killed holder: a release that fails
never replaces the holder's own error, and a holder that is gone (release lost, process
SIGKILLed) blocks the next recluster only until its short expiry, while a live holder keeps the
lease by heartbeat however long it works.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from dagster import instance_for_test
from pymongo import MongoClient

from snapmap_pipeline.store.lease import DEFAULT_TTL_S, LEASE_ID, LeaseTimeout, clustering_lease
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


class ReclusterFailed(RuntimeError):
    """The error a holder's own work raised; the caller must see it, not the release's."""


def acquire_time(db, wait_s: float = 120.0) -> tuple[int, float]:
    """Take the lease with the defaults as the next run would; (token, seconds waited)."""
    began = time.monotonic()
    with clustering_lease(db, wait_s=wait_s) as token:
        waited = time.monotonic() - began
    return token, waited


def test_release_during_an_outage_keeps_the_error_and_the_lease_expires_soon(mongo, caplog):
    db = mongo.db()
    with stopped("mongo", now=False):
        with pytest.raises(ReclusterFailed, match="closure of 40 photos"):
            with clustering_lease(db) as held:
                stack("stop", "mongo")
                raise ReclusterFailed("closure of 40 photos could not be written")
    released = [
        r for r in caplog.records if "could not release the clustering lease" in r.getMessage()
    ]
    assert released, "the failed release was not logged"
    assert released[0].levelname == "WARNING"

    # The failed holder's lease is still in the database, and blocks the next run only until
    # its short expiry: not for minutes.
    lease = db.leases.find_one({"_id": LEASE_ID})
    assert lease["holder"] is not None and lease["token"] == held
    assert lease["expiresAt"] < datetime.now(UTC) + timedelta(seconds=DEFAULT_TTL_S + 1)
    token, waited = acquire_time(db)
    assert token == held + 1
    assert waited < DEFAULT_TTL_S + 15


HOLD_UNTIL_KILLED = """
import sys, time
from pathlib import Path
from pymongo import MongoClient
from snapmap_pipeline.store.lease import clustering_lease
uri, database, ready = sys.argv[1:4]
db = MongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=5000)[database]
with clustering_lease(db) as token:
    Path(ready).write_text(str(token))
    time.sleep(600)
"""


def test_killed_holder_blocks_clustering_only_until_its_lease_expires(mongo, tmp_path):
    db = mongo.db()
    ready = tmp_path / "holding"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_UNTIL_KILLED, mongo.uri, mongo.database, str(ready)]
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert holder.poll() is None, "the holder exited before taking the lease"
            assert time.monotonic() < deadline, "the holder never took the lease"
            time.sleep(0.05)
        # Hold it across several heartbeats first: the lease must not expire while its holder
        # is alive, however long it works.
        time.sleep(DEFAULT_TTL_S * 1.5)
        with pytest.raises(LeaseTimeout):
            acquire_time(db, wait_s=1)
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.wait(30) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(30)

    token, waited = acquire_time(db)
    assert token == int(ready.read_text()) + 1
    assert waited < DEFAULT_TTL_S + 15


def test_heartbeat_keeps_a_long_recluster_holding_the_lease(mongo):
    db = mongo.db()
    ttl_s = 1.5
    with clustering_lease(db, ttl_s=ttl_s) as token:
        for _ in range(4):
            time.sleep(ttl_s)
            with pytest.raises(LeaseTimeout):
                with clustering_lease(db, ttl_s=ttl_s, wait_s=0.2):
                    pass
            assert db.leases.find_one({"_id": LEASE_ID})["token"] == token
    assert acquire_time(db, wait_s=5)[0] == token + 1
