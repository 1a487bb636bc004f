"""The clustering lease: one holder at a time reclusters, so two runs whose photos share a
neighbourhood never interleave their reads and writes.

The lease is a document with an expiry and a fencing token that grows with every grant. Event
writes are also conditional on each event's ``version``, and link decisions carry the token, so
a holder that outlived its lease (a paused or killed process) can never overwrite newer work.

Known limit: the lease is global, so reclustering is serial across the whole map. Runs still
read, validate and upsert in parallel; if clustering time ever dominates, split the lease by
region (the cells a closure touches, taken in sorted order).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

LEASE_ID = "clustering"


class LeaseTimeout(RuntimeError):
    """The lease stayed held by someone else for longer than the wait allowed."""


@contextmanager
def clustering_lease(db: Database, ttl_s: float = 300.0, wait_s: float = 600.0) -> Iterator[int]:
    """Hold the clustering lease; yields its fencing token."""
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        token = _try_acquire(db, holder, ttl_s)
        if token is not None:
            break
        if time.monotonic() > deadline:
            current = db.leases.find_one({"_id": LEASE_ID}) or {}
            raise LeaseTimeout(
                f"clustering lease held by {current.get('holder')} until "
                f"{current.get('expiresAt')}; waited {wait_s:.0f} s"
            )
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    try:
        yield token
    finally:
        db.leases.update_one(
            {"_id": LEASE_ID, "holder": holder},
            {"$set": {"expiresAt": datetime(1970, 1, 1, tzinfo=UTC), "holder": None}},
        )


def _try_acquire(db: Database, holder: str, ttl_s: float) -> int | None:
    now = datetime.now(UTC)
    expires = now + timedelta(seconds=ttl_s)
    granted = db.leases.find_one_and_update(
        {"_id": LEASE_ID, "expiresAt": {"$lt": now}},
        {"$set": {"holder": holder, "expiresAt": expires}, "$inc": {"token": 1}},
        return_document=ReturnDocument.AFTER,
    )
    if granted is not None:
        return int(granted["token"])
    try:
        db.leases.insert_one({"_id": LEASE_ID, "holder": holder, "expiresAt": expires, "token": 1})
    except DuplicateKeyError:
        return None
    return 1
