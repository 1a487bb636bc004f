"""Isolating a poison photo: a valid photo whose processing fails again and again.

A batch whose recluster fails with an error that is not an outage is split in halves and each
half retried, so the rest of the batch is applied. A single photo that still fails has its
attempt counted in ``poison_attempts``; below the limit the error propagates (the run fails and
Dagster retries it), at the limit the photo's message is dead-lettered with the error, the photo
is marked ``deadLettered`` and left out of every later closure.

A dead-lettered photo holds no event: if an earlier message of it had been applied, it is
released from that event (:func:`release_dead_lettered`), whose other photos are reclustered
without it; an event left with no photos is retired (photoCount 0, no ``mergedInto``). One of
those photos whose recluster fails is isolated the same way, and the release goes on without
it.

Attempts count failures since the photo last succeeded. A step *succeeds* for its seed photos
when it returns: under one hold of the clustering lease it loaded them (those not
dead-lettered), wrote their events and queued their link decisions. Each successful step then
deletes the attempt records of its seeds, in one ``$in`` per :data:`IDS_PER_QUERY` seeds (one
query for a micro-batch), except the records that must stay: a record marked ``deadLettered``
(its photo is dead-lettered; the sweeper finds the photos still linked to an event by these
records) and a record at the limit (its photo is being dead-lettered by the run that reached
it, and not marked yet, or it was dead-lettered before records were marked). The deletion is
not under the lease: a run whose step succeeded can delete an attempt another run counted
just after, for the photo's newer message; that only postpones the photo's dead letter by
one count, and it cannot delete a record at the limit, so a photo is never dead-lettered
without its record. The record is marked under the lease, before the photo is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import ConnectionFailure

from snapmap_pipeline.resources.kafka import KafkaUnavailable
from snapmap_pipeline.store.dead_letters import DeadLetter
from snapmap_pipeline.store.events import (
    WriteConflict,
    photos_linked_to,
    retire_emptied_events,
)
from snapmap_pipeline.store.lease import LeaseTimeout, clustering_lease
from snapmap_pipeline.store.recluster import ReclusterReport

log = logging.getLogger(__name__)

#: The most ids one query of this module names in an ``$in``, and the attempt records one page
#: of :func:`attempt_record_pages` holds.
IDS_PER_QUERY = 5000
# A photo to release may hold two events (its stored link and a queued one): this many photos
# at a time keep the events' ids within IDS_PER_QUERY too.
_RELEASED_PER_ROUND = IDS_PER_QUERY // 2

# Outages and races: retried as a whole (by the run's retry policy), never blamed on a photo.
TRANSIENT = (ConnectionFailure, KafkaUnavailable, LeaseTimeout, WriteConflict)


def recluster_isolating_poison(
    db: Database,
    seed_ids: Sequence[str],
    step: Callable[[Sequence[str]], ReclusterReport],
    dead_letter: Callable[[list[DeadLetter]], int],
    max_attempts: int,
) -> tuple[ReclusterReport, list[str]]:
    """Run ``step`` over ``seed_ids``, bisecting around photos that make it fail.

    The photos dead-lettered now are released together once the whole seed has been tried
    (an earlier message of one may have been applied): released one by one, the partners of
    a photo could still hold another photo of the seed that is dead-lettered later in the
    same run, and reclustering them would fail on it.

    A partner of theirs that fails the release is isolated in turn (see
    :func:`release_dead_lettered`); the photos it holds back are left to the sweeper and the
    run goes on: a retried run would not release them again (they are dead-lettered by then).

    Returns the merged report and the ids of the seed dead-lettered now."""
    isolation = _Isolation()
    outage = False
    try:
        report = _bisect(db, seed_ids, step, dead_letter, max_attempts, isolation)
        return report, isolation.poisoned
    except TRANSIENT:
        outage = True  # the retried run finds them dead-lettered; the sweeper releases them
        raise
    finally:
        if isolation.poisoned and not outage:
            release_dead_lettered(
                db, isolation.poisoned, step, dead_letter, max_attempts, isolation.failed
            )


@dataclass
class _Isolation:
    """The photos a bisection blamed: each one whose step failed alone (its attempt counted)
    with the error it failed with, and those of them dead-lettered now (at the limit, and
    marked)."""

    failed: list[str] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)
    poisoned: list[str] = field(default_factory=list)


def _bisect(
    db: Database,
    seed_ids: Sequence[str],
    step: Callable[[Sequence[str]], ReclusterReport],
    dead_letter: Callable[[list[DeadLetter]], int],
    max_attempts: int,
    isolation: _Isolation,
    counted: Collection[str] = frozenset(),
) -> ReclusterReport:
    """Run ``step`` over ``seed_ids``, bisecting around photos that make it fail; the photos
    blamed are appended to ``isolation``. A photo of ``counted`` that fails alone is blamed
    without a second count: its attempt in this run is counted already."""
    try:
        report = step(seed_ids)
    except TRANSIENT:
        raise
    except Exception as error:  # noqa: BLE001 - any other failure may be one photo's fault
        if len(seed_ids) == 1:
            isolation.failed.append(seed_ids[0])
            isolation.errors.append(error)
            if seed_ids[0] in counted:
                raise
            isolation.poisoned += _count_attempt(db, seed_ids[0], error, dead_letter, max_attempts)
            return ReclusterReport()
        log.warning("recluster of %d photos failed (%s); bisecting", len(seed_ids), error)
    else:
        _clear_attempts(db, seed_ids, max_attempts)
        return report
    middle = len(seed_ids) // 2
    report = ReclusterReport()
    failures: list[Exception] = []
    for half in (seed_ids[:middle], seed_ids[middle:]):
        try:
            report.merge(_bisect(db, half, step, dead_letter, max_attempts, isolation, counted))
        except TRANSIENT:
            raise
        except Exception as error:  # noqa: BLE001 - finish the other half, then fail the run
            failures.append(error)
    if failures:
        raise failures[0]
    return report


def _clear_attempts(db: Database, photo_ids: Sequence[str], max_attempts: int) -> None:
    """Delete the attempt records of photos whose step succeeded, but those of dead-lettered
    photos and those at the limit (see the module docstring)."""
    ids = sorted(set(photo_ids))
    for start in range(0, len(ids), IDS_PER_QUERY):
        db.poison_attempts.delete_many(
            {
                "_id": {"$in": ids[start : start + IDS_PER_QUERY]},
                "attempts": {"$lt": max_attempts},
                "deadLettered": {"$ne": True},
            }
        )


def _count_attempt(
    db: Database,
    photo_id: str,
    error: Exception,
    dead_letter: Callable[[list[DeadLetter]], int],
    max_attempts: int,
) -> list[str]:
    reason = f"{type(error).__name__}: {error}"
    record = db.poison_attempts.find_one_and_update(
        {"_id": photo_id},
        {"$inc": {"attempts": 1}, "$set": {"lastError": reason[:500]}},
        upsert=True,
        return_document=ReturnDocument.AFTER,
    )
    if record["attempts"] < max_attempts:
        log.warning(
            "photo %s failed processing (attempt %d of %d): %s",
            photo_id,
            record["attempts"],
            max_attempts,
            reason,
        )
        raise error
    photo = db.photos.find_one({"_id": photo_id}, {"source": 1, "sourceVersion": 1}) or {}
    source = photo.get("source") or {}
    letter = DeadLetter(
        topic=source.get("topic", "unknown"),
        partition=int(source.get("partition", -1)),
        offset=int(source.get("offset", -1)),
        code="processing_failed",
        reason=f"failed {record['attempts']} times: {reason}"[:500],
        key=photo_id.encode(),
        value=None,
        topic_id=source.get("topicId"),
    )
    dead_letter([letter])
    # Only with the message the letter names: a newer one stored meanwhile (another
    # partition's run) lets the photo back in, and its run tries the photo afresh. Under the
    # lease, like upsert_uploads' read and write, so a newer message is stored either before
    # the mark (which then fails) or after it (and clears it).
    with clustering_lease(db):
        # The record first, kept by every later success: it is how the sweeper finds the
        # photo. An upsert, and the attempts kept, should a run with a higher limit have
        # deleted the record after its own success.
        db.poison_attempts.update_one(
            {"_id": photo_id},
            {"$set": {"deadLettered": True}, "$max": {"attempts": record["attempts"]}},
            upsert=True,
        )
        marked = db.photos.update_one(
            {"_id": photo_id, "sourceVersion": photo.get("sourceVersion")},
            {"$set": {"deadLettered": True}},
        )
        # The newer message's photo starts afresh, unless that message's run dead-lettered it
        # meanwhile: then the record stays, for the sweeper to find the photo by.
        if (
            photo
            and not marked.matched_count
            and not db.photos.count_documents({"_id": photo_id, "deadLettered": True}, limit=1)
        ):
            db.poison_attempts.delete_one({"_id": photo_id})
    if photo and not marked.matched_count:
        log.warning(
            "photo %s: its message %s is dead-lettered, but a newer message was stored "
            "meanwhile; the photo is tried again with it",
            photo_id,
            letter.source_key,
        )
        return []
    log.error(
        "photo %s dead-lettered after %d failed attempts: %s", photo_id, record["attempts"], reason
    )
    return [photo_id]


def attempt_record_pages(db: Database) -> Iterator[list[str]]:
    """The ids of every ``poison_attempts`` record, in id order, at most :data:`IDS_PER_QUERY`
    per page (one bounded read each, resuming after the last id read). The records of
    dead-lettered photos are never deleted, so the whole list grows without bound."""
    after: str | None = None
    while True:
        query = {} if after is None else {"_id": {"$gt": after}}
        cursor = db.poison_attempts.find(query, {"_id": 1}).sort("_id", 1).limit(IDS_PER_QUERY)
        page = [doc["_id"] for doc in cursor]
        if page:
            yield page
        if len(page) < IDS_PER_QUERY:
            return
        after = page[-1]


@dataclass
class Release:
    """What :func:`release_dead_lettered` did."""

    #: Dead-lettered photos taken out of the events they linked to, and events retired.
    released: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    #: Partners whose recluster failed at the attempt limit: dead-lettered, and released too
    #: unless they wait.
    dead_lettered: list[str] = field(default_factory=list)
    #: Dead-lettered photos left linked because a partner of their event failed below the
    #: attempt limit (or was let back in meanwhile); a later call tries them again.
    waiting: list[str] = field(default_factory=list)
    #: Partners reclustered (their link decisions queued) or isolated.
    partners: int = 0

    def merge(self, other: Release) -> None:
        self.released += other.released
        self.retired += other.retired
        self.dead_lettered += other.dead_lettered
        self.waiting += other.waiting
        self.partners += other.partners


def release_dead_lettered(
    db: Database,
    photo_ids: Sequence[str],
    step: Callable[[Sequence[str]], ReclusterReport],
    dead_letter: Callable[[list[DeadLetter]], int],
    max_attempts: int,
    failed_already: Collection[str] = (),
) -> Release:
    """Take dead-lettered photos out of the events they still link to.

    The other photos of those events (their partners) are reclustered first (``step``; the
    dead-lettered ones are left out of every closure, so each event is changed or tombstoned
    as if they had never come). Then, under the clustering lease, the events no photo links
    to any more are retired and the photos' queued link decisions and ``eventId`` are
    removed, in that order. A crash anywhere before the last write leaves the photos linked,
    and the next call (the sweeper's) does it again: every part is idempotent. ``photo_ids``
    are taken a bounded number at a time, so no query names more than
    :data:`IDS_PER_QUERY` of them.

    A partner whose recluster fails is isolated as in a micro-batch: bisected out, its
    attempt counted, the other partners reclustered. Its event is not settled, so the
    photos that link to it stay linked: below the limit they wait for a later call (each of
    which counts one attempt); at the limit the partner is dead-lettered, and it and those
    photos are released in another round of this call. Outages still raise.

    ``failed_already`` are photos whose attempt the caller counted in this run: a partner
    among them that fails again is not counted again, and its event waits like a failing
    partner's."""
    release = Release()
    todo = sorted(set(photo_ids))
    while todo:
        batch, todo = todo[:_RELEASED_PER_ROUND], todo[_RELEASED_PER_ROUND:]
        # Each photo handed back is there because a partner was dead-lettered in this round,
        # which a photo can be once: the rounds end.
        todo += _release(db, batch, step, dead_letter, max_attempts, failed_already, release)
    return release


def _release(
    db: Database,
    photo_ids: list[str],
    step: Callable[[Sequence[str]], ReclusterReport],
    dead_letter: Callable[[list[DeadLetter]], int],
    max_attempts: int,
    failed_already: Collection[str],
    release: Release,
) -> list[str]:
    """One round of :func:`release_dead_lettered`, added to ``release``; returns the photos
    to release in another round."""
    query = {"_id": {"$in": photo_ids}, "deadLettered": True}
    dead = {doc["_id"]: doc.get("eventId") for doc in db.photos.find(query, {"eventId": 1})}
    queued = {
        doc["_id"]: doc["eventId"]
        for doc in db.pending_links.find({"_id": {"$in": list(dead)}}, {"eventId": 1})
    }
    held = {p: {e for e in (dead[p], queued.get(p)) if e is not None} for p in dead}
    former = set().union(*held.values())
    if not former:
        return []
    members = photos_linked_to(db, former)
    partners = sorted({p for ids in members.values() for p in ids})
    isolation = _Isolation()
    if partners:
        try:
            # A partner that failed earlier in this run (it may succeed now, without the
            # dead-lettered photos) is tried again, but its failure is not counted twice.
            _bisect(db, partners, step, dead_letter, max_attempts, isolation, set(failed_already))
        except TRANSIENT:
            raise
        except Exception as error:  # noqa: BLE001 - a partner's failure is counted, not raised
            if not any(error is blamed for blamed in isolation.errors):
                raise
    release.partners += len(partners)
    release.dead_lettered += isolation.poisoned

    # An event is settled when each of its partners' steps succeeded. Otherwise it waits for
    # a later call while a partner failed below the limit (or was let back in by a newer
    # message), or goes to another round when every failed partner is dead-lettered now.
    failed, poisoned = set(isolation.failed), set(isolation.poisoned)
    unsettled = {e for e, ids in members.items() if failed & set(ids)}
    stuck = {e for e in unsettled if not (failed & set(members[e])) <= poisoned}
    event_of = {p: e for e, ids in members.items() for p in ids}
    ready = sorted(p for p, events in held.items() if events and not events & unsettled)
    again = sorted(
        {p for p, events in held.items() if events & unsettled and not events & stuck}
        | {p for p in poisoned if event_of[p] not in stuck}
    )
    waiting = sorted(
        {p for p, events in held.items() if events & stuck}
        | {p for p in poisoned if event_of[p] in stuck}
    )
    release.waiting += waiting

    released: list[str] = []
    retired: list[str] = []
    if ready:
        with clustering_lease(db):
            # Read again under the lease: a photo let back in since (a newer message, or the
            # operator) may have been clustered again, and its new link must stay.
            query = {"_id": {"$in": ready}, "deadLettered": True}
            released = sorted(doc["_id"] for doc in db.photos.find(query, {"_id": 1}))
            # Retired first (a dead-lettered photo holds no event already, see
            # photos_linked_to), links last: the links are how the next call finds these
            # events again, so a run stopped between these writes leaves nothing that call
            # could not finish.
            retired = retire_emptied_events(db, set().union(*(held[p] for p in ready)))
            db.pending_links.delete_many({"_id": {"$in": released}})
            db.photos.update_many({"_id": {"$in": released}}, {"$unset": {"eventId": ""}})
    release.released += released
    release.retired += retired
    log.warning(
        "released %d dead-lettered photos from %d events (%d partners reclustered, %d "
        "retired); %d partners dead-lettered, %d photos wait for a failing partner",
        len(released),
        len(former),
        len(partners),
        len(retired),
        len(isolation.poisoned),
        len(waiting),
    )
    return again
