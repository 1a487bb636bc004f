"""The clustering lease: one holder at a time reclusters, so two runs whose photos share a
neighbourhood never interleave their reads and writes.

The lease is a document with an expiry and a fencing token that grows with every grant. Event
writes are also conditional on each event's ``version``, and link decisions carry the token, so
a holder that outlived its lease (a paused or killed process) can never overwrite newer work.

The expiry is short (``ttl_s``, 30 s) and a heartbeat thread pushes it forward every third of
that while the holder works, however long the work takes. A holder that dies (SIGKILL, a lost
machine) or cannot release (the database unreachable at that moment) therefore blocks the
others for at most ``ttl_s``, not for the length of the longest recluster. Renewal never
changes the token: only a new grant does.

The same mechanism, under another ``_id``, serialises a partition's offset commits
(``offsets_lease_id``).

Known limit: the clustering lease is global, so reclustering is serial across the whole
map. Runs still read and validate in parallel; if clustering time ever dominates, split the
lease by region (the cells a closure touches, taken in sorted order).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

LEASE_ID = "clustering"
DEFAULT_TTL_S = 30.0
log = logging.getLogger(__name__)


class LeaseTimeout(RuntimeError):
    """The lease stayed held by someone else for longer than the wait allowed."""


def clustering_lease(
    db: Database, ttl_s: float = DEFAULT_TTL_S, wait_s: float = 600.0
) -> contextlib.AbstractContextManager[int]:
    """Hold the clustering lease; yields its fencing token (see ``held_lease``)."""
    return held_lease(db, LEASE_ID, ttl_s, wait_s)


def offsets_lease_id(topic: str, partition: int) -> str:
    """The lease that serialises one partition's offset commits (``store/batches.py``)."""
    return f"offsets:{topic}:{partition}"


@contextmanager
def held_lease(
    db: Database, lease_id: str, ttl_s: float = DEFAULT_TTL_S, wait_s: float = 600.0
) -> Iterator[int]:
    """Hold the lease ``lease_id`` (one document of ``leases``); yields its fencing token.

    ``ttl_s``: how long the lease outlives its holder's last heartbeat (renewed every
    ``ttl_s / 3`` while the block runs). ``wait_s``: how long to wait for another holder.
    A failed release is logged and never replaces the block's own exception; the lease then
    expires by itself within ``ttl_s``.
    """
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        token = _try_acquire(db, lease_id, holder, ttl_s)
        if token is not None:
            break
        if time.monotonic() > deadline:
            current = db.leases.find_one({"_id": lease_id}) or {}
            raise LeaseTimeout(
                f"{_title(lease_id)} held by {current.get('holder')} until "
                f"{current.get('expiresAt')}; waited {wait_s:.0f} s"
            )
        time.sleep(delay)
        delay = min(delay * 2, 1.0)

    heartbeat = _Heartbeat(db, lease_id, holder, token, ttl_s)
    heartbeat.start()
    try:
        yield token
    finally:
        heartbeat.stop()
        _release(db, lease_id, holder, token, ttl_s)


def lease_held(db: Database, lease_id: str, token: int) -> bool:
    """Whether the grant ``token`` of ``lease_id`` is still the current one and unexpired: a
    holder checks it right before a write that nothing else fences (a Kafka offset commit)."""
    current = db.leases.find_one({"_id": lease_id}, {"token": 1, "expiresAt": 1})
    return (
        current is not None
        and current.get("token") == token
        and current["expiresAt"] > datetime.now(UTC)
    )


def _title(lease_id: str) -> str:
    return "clustering lease" if lease_id == LEASE_ID else f"lease {lease_id}"


def _try_acquire(db: Database, lease_id: str, holder: str, ttl_s: float) -> int | None:
    now = datetime.now(UTC)
    expires = now + timedelta(seconds=ttl_s)
    granted = db.leases.find_one_and_update(
        {"_id": lease_id, "expiresAt": {"$lt": now}},
        {"$set": {"holder": holder, "expiresAt": expires}, "$inc": {"token": 1}},
        return_document=ReturnDocument.AFTER,
    )
    if granted is not None:
        return int(granted["token"])
    try:
        db.leases.insert_one({"_id": lease_id, "holder": holder, "expiresAt": expires, "token": 1})
    except DuplicateKeyError:
        return None
    return 1


def _release(db: Database, lease_id: str, holder: str, token: int, ttl_s: float) -> None:
    """Give the lease up. Called from ``finally``: it logs instead of raising, so that the
    error that ended the block (often the same outage) is the one the caller sees."""
    try:
        db.leases.update_one(
            {"_id": lease_id, "holder": holder},
            {"$set": {"expiresAt": datetime(1970, 1, 1, tzinfo=UTC), "holder": None}},
        )
    except PyMongoError as error:
        log.warning(
            "could not release the %s (token %d): %s: %s; it expires by itself within %g s",
            _title(lease_id),
            token,
            type(error).__name__,
            error,
            ttl_s,
        )


class _Heartbeat(threading.Thread):
    """Pushes the lease's expiry ``ttl_s`` ahead every ``ttl_s / 3`` until stopped. A renewal
    that fails (outage) is retried on the next beat; one that finds the lease taken by someone
    else (this holder was paused past its expiry) is logged and ends the heartbeat: from then
    on the token and the version checks keep this holder's late writes harmless."""

    def __init__(self, db: Database, lease_id: str, holder: str, token: int, ttl_s: float) -> None:
        super().__init__(name=f"lease-{lease_id}-{token}", daemon=True)
        self.db = db
        self.lease_id = lease_id
        self.holder = holder
        self.token = token
        self.ttl_s = ttl_s
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()
        # A renewal blocked on an unreachable server ends with the client's own timeout; the
        # thread is a daemon and never renews after ``stop``, so do not wait for it long.
        self.join(timeout=1.0)

    def run(self) -> None:
        while not self._stopped.wait(self.ttl_s / 3):
            try:
                renewed = self.db.leases.update_one(
                    {"_id": self.lease_id, "holder": self.holder, "token": self.token},
                    {"$set": {"expiresAt": datetime.now(UTC) + timedelta(seconds=self.ttl_s)}},
                )
            except PyMongoError as error:
                log.warning(
                    "%s (token %d) not renewed: %s: %s; retrying in %g s",
                    _title(self.lease_id),
                    self.token,
                    type(error).__name__,
                    error,
                    self.ttl_s / 3,
                )
                continue
            if renewed.matched_count == 0 and not self._stopped.is_set():
                log.warning(
                    "%s (token %d) was taken over after it expired; this holder's "
                    "remaining writes are fenced by its token",
                    _title(self.lease_id),
                    self.token,
                )
                return
