"""A dead-lettered photo holds no event: an event it was linked to is reclustered without it,
or retired when no photo is left; the sweeper finishes what a stopped run left."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import pytest
from dagster import instance_for_test
from pymongo import MongoClient, monitoring
from pymongo.collection import Collection
from pymongo.errors import AutoReconnect

from snapmap_pipeline.assets import events as events_asset
from snapmap_pipeline.checks import sweeper
from snapmap_pipeline.clustering import ClusterParams, canonical_pass
from snapmap_pipeline.contract.validation import PhotoUpload
from snapmap_pipeline.definitions import build_definitions
from snapmap_pipeline.jobs import SWEEPER_JOB_NAME
from snapmap_pipeline.store import poison
from snapmap_pipeline.store.dead_letters import send_dead_letters
from snapmap_pipeline.store.events import LIVE_EVENTS, apply_pending_links, queue_links
from snapmap_pipeline.store.lease import clustering_lease
from snapmap_pipeline.store.outbox import manifest, publish_pending, write_pending_manifests
from snapmap_pipeline.store.photos import to_point, upsert_uploads
from snapmap_pipeline.store.poison import recluster_isolating_poison
from snapmap_pipeline.store.recluster import recluster
from tests.conftest import stack_setting
from tests.faults.conftest import assert_end_state, read_all
from tests.integration.pipeline import Harness, photo_events, publish, upload
from tests.integration.sweeper_data import at, backend_photo, backfill, evaluations
from tests.integration.test_ingestion import changed
from tests.integration.test_manifest_race import manifest_photos

pytestmark = pytest.mark.sweeper

LUNCH = backend_photo("a-lunch", "2026-06-06T12:00:00Z", 2.3522, 48.8566)
DINNER = backend_photo("b-dinner", "2026-06-06T19:00:00Z", 2.2900, 48.8600)
# Ten metres from the lunch photo a minute later: the same event, whose first photo is a-lunch.
SECOND = backend_photo("c-second", "2026-06-06T12:01:00Z", 2.35233, 48.8566)
# Ten metres further a minute later: the lunch event's third photo.
THIRD = backend_photo("d-third", "2026-06-06T12:02:00Z", 2.35246, 48.8566)
# Ten metres from the dinner photo a minute later: the dinner event's second photo.
DESSERT = backend_photo("f-dessert", "2026-06-06T19:01:00Z", 2.29013, 48.8600)


def clustered(db, photos: list[dict]) -> None:
    db.photos.insert_many([dict(p) for p in photos])
    recluster(db, [p["_id"] for p in photos], ClusterParams())
    while apply_pending_links(db)[1]:
        pass


def fail_on(db, *photo_ids: str):
    """The recluster step of a run in which ``photo_ids`` cannot be processed."""

    def step(seed):
        if failing := sorted(set(photo_ids) & set(seed)):
            raise ValueError(f"cannot cluster {', '.join(failing)}")
        return recluster(db, seed, ClusterParams())

    return step


def dead_letter_for(db, kafka, settings):
    def dead_letter(letters):
        return send_dead_letters(db, kafka, settings.dead_letter_topic, letters)

    return dead_letter


def live_counts(db) -> dict[str, int]:
    return {d["_id"]: d["photoCount"] for d in db.events.find(LIVE_EVENTS)}


def canonical_counts(db) -> dict[str, int]:
    """The oracle: one canonical pass over the photos that are not dead-lettered."""
    kept = [to_point(d) for d in db.photos.find({}) if not d.get("deadLettered")]
    result = canonical_pass(kept, ClusterParams())
    return {event_id: event.photo_count for event_id, event in result.events.items()}


def sweep(resources: dict) -> dict:
    with instance_for_test() as instance:
        job = build_definitions(resources).resolve_job_def(SWEEPER_JOB_NAME)
        result = job.execute_in_process(instance=instance)
    assert result.success
    return evaluations(result)


def test_an_event_whose_only_photo_is_dead_lettered_is_retired(resources, mongo, kafka, settings):
    db = mongo.db()
    clustered(db, [LUNCH, DINNER])
    lunch_event = photo_events(db)["a-lunch"]
    while publish_pending(db, kafka, settings.event_updates_topic):
        pass

    _, poisoned = recluster_isolating_poison(
        db, ["a-lunch"], fail_on(db, "a-lunch"), dead_letter_for(db, kafka, settings), 1
    )

    assert poisoned == ["a-lunch"]
    assert photo_events(db)["a-lunch"] is None, "a dead-lettered photo holds no event"
    assert live_counts(db) == canonical_counts(db) == {photo_events(db)["b-dinner"]: 1}
    retired = db.events.find_one({"_id": lunch_event})
    assert (retired["photoCount"], retired["mergedInto"], retired["version"]) == (0, None, 2)
    assert manifest(db, retired)["photos"] == []

    publish_pending(db, kafka, settings.event_updates_topic)
    updates = [json.loads(m.value()) for m in read_all(kafka, settings.event_updates_topic)]
    (last,) = [u for u in updates if u["eventId"] == lunch_event and u["version"] == 2]
    assert (last["action"], last["mergedInto"], last["photoCount"]) == ("tombstoned", None, 0)

    checks = sweep(resources)
    assert checks["event_photo_counts"].passed
    assert checks["orphan_photos"].metadata["dead_lettered_released"].value == 0

    with instance_for_test() as instance:
        backfill(instance, resources, ["2026-06-06"])
    assert live_counts(db) == canonical_counts(db), "a backfill keeps the event retired"
    assert db.events.find_one({"_id": lunch_event})["version"] == 2


def test_the_partners_of_a_dead_lettered_photo_are_reclustered_without_it(mongo, kafka, settings):
    db = mongo.db()
    clustered(db, [LUNCH, SECOND])
    shared = photo_events(db)["a-lunch"]
    assert photo_events(db)["c-second"] == shared

    recluster_isolating_poison(
        db, ["a-lunch"], fail_on(db, "a-lunch"), dead_letter_for(db, kafka, settings), 1
    )
    while apply_pending_links(db)[1]:
        pass

    assert live_counts(db) == canonical_counts(db)
    (remaining,) = live_counts(db)
    assert photo_events(db) == {"a-lunch": None, "c-second": remaining}
    assert db.events.find_one({"_id": shared})["mergedInto"] == remaining


def test_two_photos_of_one_event_dead_lettered_in_one_run_are_released_together(
    mongo, kafka, settings
):
    """Released one at a time, the first photo's partners would still hold the second one,
    not dead-lettered yet, and reclustering them would fail the run on it."""
    db = mongo.db()
    clustered(db, [LUNCH, SECOND, THIRD])
    shared = photo_events(db)["a-lunch"]
    assert set(photo_events(db).values()) == {shared}

    _, poisoned = recluster_isolating_poison(
        db,
        ["c-second", "d-third"],
        fail_on(db, "c-second", "d-third"),
        dead_letter_for(db, kafka, settings),
        1,
    )
    while apply_pending_links(db)[1]:
        pass

    assert sorted(poisoned) == ["c-second", "d-third"]
    assert photo_events(db) == {"a-lunch": shared, "c-second": None, "d-third": None}
    assert live_counts(db) == canonical_counts(db) == {shared: 1}


def test_a_queued_link_of_a_dead_lettered_photo_is_not_applied(mongo):
    db = mongo.db()
    clustered(db, [LUNCH])
    event_id = photo_events(db)["a-lunch"]
    db.photos.update_one({"_id": "a-lunch"}, {"$set": {"eventId": None, "deadLettered": True}})
    queue_links(db, {"a-lunch": event_id}, token=10**9)

    assert apply_pending_links(db) == (0, 1)
    assert photo_events(db)["a-lunch"] is None


def test_the_sweeper_releases_what_a_stopped_run_left_and_revives_a_photo_let_back_in(
    resources, mongo
):
    """A run stopped between dead-lettering a photo and releasing it (or a store written before
    photos were released) leaves the photo linked; the next sweep releases it. When the operator
    lets the photo back in (docs/operator-guide.md), the sweep after that clusters it again and
    the retired event comes back to life."""
    db = mongo.db()
    clustered(db, [LUNCH, DINNER])
    lunch_event = photo_events(db)["a-lunch"]
    db.photos.update_one({"_id": "a-lunch"}, {"$set": {"deadLettered": True}})
    db.poison_attempts.insert_one({"_id": "a-lunch", "attempts": 3, "lastError": "ValueError"})

    orphans = sweep(resources)["orphan_photos"].metadata
    assert (orphans["dead_lettered_released"].value, orphans["events_retired"].value) == (1, 1)
    # The checks of one sweep may run in any order: the counts are read in the next one.
    assert sweep(resources)["event_photo_counts"].passed
    assert photo_events(db)["a-lunch"] is None
    assert live_counts(db) == canonical_counts(db)

    db.photos.update_one({"_id": "a-lunch"}, {"$unset": {"deadLettered": ""}})
    db.poison_attempts.delete_one({"_id": "a-lunch"})
    assert sweep(resources)["orphan_photos"].metadata["orphans_healed"].value == 1
    assert photo_events(db)["a-lunch"] == lunch_event
    revived = db.events.find_one({"_id": lunch_event})
    assert (revived["photoCount"], revived["version"]) == (1, 3)
    assert live_counts(db) == canonical_counts(db)


def test_an_album_never_lists_a_dead_lettered_photo_its_stopped_release_left_linked(
    resources, mongo, blob, monkeypatch
):
    """A run stopped after reclustering the partners, before unsetting the photo's link: the
    event already counts one photo when the next run writes its manifest, and the sweep's
    release changes no event, so nothing would rewrite an album that listed the photo."""
    db = mongo.db()
    clustered(db, [LUNCH, SECOND])
    shared = photo_events(db)["a-lunch"]
    write_pending_manifests(db, blob)
    assert manifest_photos(blob, shared) == ["a-lunch", "c-second"]

    taken = []

    def stopped(db):
        taken.append(db)
        if len(taken) == 2:  # the first marks the photo, the second is the release's
            raise RuntimeError("run stopped before the lease")
        return clustering_lease(db)

    monkeypatch.setattr(poison, "clustering_lease", stopped)
    with pytest.raises(RuntimeError, match="stopped"):
        recluster_isolating_poison(db, ["c-second"], fail_on(db, "c-second"), lambda _: 1, 1)
    monkeypatch.undo()
    assert photo_events(db)["c-second"] == shared, "left linked by the stopped run"
    assert db.events.find_one({"_id": shared})["photoCount"] == 1
    # The retried run's link and event_updates steps (or any other run's).
    while apply_pending_links(db)[1]:
        pass
    write_pending_manifests(db, blob)
    assert manifest_photos(blob, shared) == ["a-lunch"]

    orphans = sweep(resources)["orphan_photos"].metadata
    assert (orphans["dead_lettered_released"].value, orphans["events_retired"].value) == (1, 0)
    assert photo_events(db) == {"a-lunch": shared, "c-second": None}
    assert live_counts(db) == canonical_counts(db) == {shared: 1}
    assert manifest_photos(blob, shared) == ["a-lunch"]


@pytest.mark.parametrize("stop_at", ["retire", "dequeue", "unlink"])
def test_an_outage_at_any_write_of_the_release_leaves_the_sweeper_able_to_finish(
    resources, mongo, monkeypatch, stop_at
):
    """The release's writes under the lease: the event retired, the photo's queued decision
    removed, its eventId unset. An outage before the last one must leave the photo linked, or
    nothing would find its event again and a live event without photos would stay forever."""
    db = mongo.db()
    clustered(db, [LUNCH, DINNER])
    lunch_event = photo_events(db)["a-lunch"]
    queue_links(db, {"a-lunch": lunch_event}, token=10**9)  # a decision still queued, too

    def lost(*args, **kwargs):
        raise AutoReconnect("connection lost")

    def failing(method: str, collection: str):
        real = getattr(Collection, method)

        def call(self, *args, **kwargs):
            return (lost if self.name == collection else real)(self, *args, **kwargs)

        return call

    if stop_at == "retire":
        monkeypatch.setattr(poison, "retire_emptied_events", lost)
    elif stop_at == "dequeue":
        monkeypatch.setattr(Collection, "delete_many", failing("delete_many", "pending_links"))
    else:
        monkeypatch.setattr(Collection, "update_many", failing("update_many", "photos"))
    with pytest.raises(AutoReconnect):
        recluster_isolating_poison(db, ["a-lunch"], fail_on(db, "a-lunch"), lambda _: 1, 1)
    monkeypatch.undo()

    sweep(resources)
    # The checks of one sweep may run in any order: the counts are read in the next one.
    assert sweep(resources)["event_photo_counts"].passed
    assert photo_events(db)["a-lunch"] is None
    assert db.pending_links.count_documents({}) == 0
    assert live_counts(db) == canonical_counts(db)
    assert db.events.find_one({"_id": lunch_event})["photoCount"] == 0


def test_a_retired_event_points_to_the_event_its_first_photo_joins_when_let_back_in(
    mongo, kafka, settings
):
    """Let back in after a photo taken just before it arrived nearby, the retired event's first
    photo joins that photo's event: the retired id then points there, as the id of an event
    whose first photo changes does (docs/event-updates.md), instead of staying retired."""
    db = mongo.db()
    clustered(db, [LUNCH, DINNER])
    lunch_event = photo_events(db)["a-lunch"]
    recluster_isolating_poison(
        db, ["a-lunch"], fail_on(db, "a-lunch"), dead_letter_for(db, kafka, settings), 1
    )
    assert db.events.find_one({"_id": lunch_event})["photoCount"] == 0

    db.photos.update_one({"_id": "a-lunch"}, {"$unset": {"deadLettered": ""}})
    db.poison_attempts.delete_one({"_id": "a-lunch"})
    clustered(db, [backend_photo("0-early", "2026-06-06T11:59:30Z", 2.35221, 48.8566)])

    holder = photo_events(db)["0-early"]
    assert photo_events(db)["a-lunch"] == holder != lunch_event
    assert live_counts(db) == canonical_counts(db)
    retired = db.events.find_one({"_id": lunch_event})
    assert (retired["mergedInto"], retired["photoCount"], retired["version"]) == (holder, 0, 3)


def test_a_partner_that_fails_the_release_is_isolated_and_the_sweeps_succeed(
    resources, mongo, monkeypatch
):
    """The sweep's release reclusters the partners of photos stopped runs left linked. A
    partner whose recluster fails is isolated as in a micro-batch: its attempt is counted and
    the photo of its event waits, linked, while the other release and the orphans' healing go
    on and the sweep succeeds; at the attempt limit the partner is dead-lettered with its
    reason and released together with the photo that waited."""
    db = mongo.db()
    clustered(db, [LUNCH, SECOND, DINNER, DESSERT])
    lunch_event, dinner_event = photo_events(db)["a-lunch"], photo_events(db)["b-dinner"]
    assert photo_events(db)["c-second"] == lunch_event
    assert photo_events(db)["f-dessert"] == dinner_event
    for photo_id in ("c-second", "f-dessert"):  # dead-lettered by runs stopped before release
        db.photos.update_one({"_id": photo_id}, {"$set": {"deadLettered": True}})
        db.poison_attempts.insert_one({"_id": photo_id, "attempts": 3, "deadLettered": True})
    db.photos.insert_one(backend_photo("e-orphan", "2026-06-07T09:00:00Z", 2.30, 48.80))
    monkeypatch.setattr(sweeper, "recluster", lambda db, ids, params: fail_on(db, "a-lunch")(ids))

    for attempt in (1, 2):
        orphans = sweep(resources)["orphan_photos"].metadata  # each sweep succeeds
        assert db.poison_attempts.find_one({"_id": "a-lunch"})["attempts"] == attempt
        assert orphans["dead_lettered_released"].value == (1 if attempt == 1 else 0)
        assert orphans["release_waiting"].value == 1
        assert photo_events(db)["c-second"] == lunch_event, "waits for its failing partner"
    assert photo_events(db)["f-dessert"] is None, "released past the failing partner"
    assert photo_events(db)["e-orphan"] is not None, "the orphan is healed all the same"

    orphans = sweep(resources)["orphan_photos"].metadata
    assert db.photos.find_one({"_id": "a-lunch"})["deadLettered"] is True
    (letter,) = db.dead_letters.find({"code": "processing_failed"})
    assert letter["reason"] == "failed 3 times: ValueError: cannot cluster a-lunch"
    assert (orphans["dead_lettered_released"].value, orphans["events_retired"].value) == (2, 1)
    assert orphans["partners_dead_lettered"].value == 1
    assert {p: photo_events(db)[p] for p in ("a-lunch", "c-second")} == {
        "a-lunch": None,
        "c-second": None,
    }
    assert db.events.find_one({"_id": lunch_event})["photoCount"] == 0
    assert live_counts(db) == canonical_counts(db)

    monkeypatch.undo()
    sweep(resources)
    assert sweep(resources)["event_photo_counts"].passed
    assert live_counts(db) == canonical_counts(db)


def test_a_release_that_fails_otherwise_does_not_stop_the_sweep_healing_orphans(
    resources, mongo, monkeypatch
):
    """A release failure no partner is blamed for (here its retiring write): the orphans
    elsewhere are still healed before the check fails, and a later sweep releases the photo."""
    db = mongo.db()
    clustered(db, [LUNCH, DINNER])
    lunch_event = photo_events(db)["a-lunch"]
    db.photos.update_one({"_id": "a-lunch"}, {"$set": {"deadLettered": True}})
    db.poison_attempts.insert_one({"_id": "a-lunch", "attempts": 3, "deadLettered": True})
    db.photos.insert_one(backend_photo("e-orphan", "2026-06-07T09:00:00Z", 2.30, 48.80))

    def broken(db, event_ids):
        raise RuntimeError("retiring failed")

    monkeypatch.setattr(poison, "retire_emptied_events", broken)
    with instance_for_test() as instance:
        job = build_definitions(resources).resolve_job_def(SWEEPER_JOB_NAME)
        assert not job.execute_in_process(instance=instance, raise_on_error=False).success
    assert photo_events(db)["e-orphan"] is not None, "the orphan is healed all the same"
    assert photo_events(db)["a-lunch"] == lunch_event, "left for a later sweep"

    monkeypatch.undo()
    assert sweep(resources)["orphan_photos"].metadata["dead_lettered_released"].value == 1
    assert photo_events(db)["a-lunch"] is None
    assert live_counts(db) == canonical_counts(db)


def test_a_partner_that_fails_a_runs_release_is_dead_lettered_in_turn(mongo, kafka, settings):
    """A micro-batch dead-letters a photo whose partner fails the release's recluster too: the
    partner is isolated (at a limit of one attempt, dead-lettered with its reason) and both
    are released in the same run, which returns instead of failing on the partner."""
    db = mongo.db()
    clustered(db, [LUNCH, SECOND, DINNER])
    shared = photo_events(db)["a-lunch"]

    _, poisoned = recluster_isolating_poison(
        db,
        ["c-second"],
        fail_on(db, "c-second", "a-lunch"),
        dead_letter_for(db, kafka, settings),
        1,
    )
    while apply_pending_links(db)[1]:
        pass

    assert poisoned == ["c-second"]
    assert db.photos.find_one({"_id": "a-lunch"})["deadLettered"] is True
    reasons = {d["reason"] for d in db.dead_letters.find({"code": "processing_failed"})}
    assert "failed 1 times: ValueError: cannot cluster a-lunch" in reasons
    assert (photo_events(db)["a-lunch"], photo_events(db)["c-second"]) == (None, None)
    assert db.events.find_one({"_id": shared})["photoCount"] == 0
    assert live_counts(db) == canonical_counts(db) == {photo_events(db)["b-dinner"]: 1}


class InLists(monitoring.CommandListener):
    """The longest ``$in`` list in any command a client sends, and its reads of
    ``poison_attempts`` with no limit or a limit above ``poison.IDS_PER_QUERY``."""

    def __init__(self) -> None:
        self.longest = 0
        self.unbounded_pages: list[dict] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        body = dict(event.command)
        self._walk(body)
        if event.command_name == "find" and body.get("find") == "poison_attempts":
            if not 0 < body.get("limit", 0) <= poison.IDS_PER_QUERY:
                self.unbounded_pages.append(body)

    def _walk(self, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "$in" and isinstance(item, list):
                    self.longest = max(self.longest, len(item))
                self._walk(item)
        elif isinstance(value, list):
            for item in value:
                self._walk(item)

    def succeeded(self, event) -> None:
        pass

    def failed(self, event) -> None:
        pass


def test_the_sweeper_reads_a_backlog_of_attempt_records_in_bounded_pages(
    mongo, kafka, blob, settings
):
    """Every photo ever dead-lettered keeps its attempt record, so the sweeper's list of them
    grows without bound: it is read a page at a time, and no query names more than
    ``poison.IDS_PER_QUERY`` ids, while a photo past the first page is still released."""
    db = mongo.db()
    clustered(db, [LUNCH, SECOND])
    shared = photo_events(db)["a-lunch"]
    backlog = [f"0-gone-{i:05d}" for i in range(poison.IDS_PER_QUERY + 10)]  # released long ago
    db.photos.insert_many([{"_id": i, "eventId": None, "deadLettered": True} for i in backlog])
    db.poison_attempts.insert_many([{"_id": i, "attempts": 3} for i in backlog])
    db.photos.update_one({"_id": "c-second"}, {"$set": {"deadLettered": True}})  # left linked
    db.poison_attempts.insert_one({"_id": "c-second", "attempts": 3, "deadLettered": True})

    commands = InLists()
    client = MongoClient(
        stack_setting("MONGODB_URI"), event_listeners=[commands], w=1, tz_aware=True
    )
    try:
        done = sweeper.sweep_orphans(
            client[mongo.database], kafka, blob, settings, datetime.now(UTC)
        )
    finally:
        client.close()

    assert (done.released, done.retired) == (1, 0)
    assert photo_events(db)["c-second"] is None
    assert db.photos.find_one({"_id": "a-lunch"})["eventId"] == shared
    assert live_counts(db) == canonical_counts(db) == {shared: 1}
    assert 0 < commands.longest <= poison.IDS_PER_QUERY
    assert commands.unbounded_pages == []


def assert_canonical_links(db) -> None:
    """Every photo's link and every live event equal one canonical pass over the photos that
    are not dead-lettered; dead-lettered photos hold no event."""
    docs = list(db.photos.find({}))
    result = canonical_pass(
        [to_point(d) for d in docs if not d.get("deadLettered")], ClusterParams()
    )
    links = {d["_id"]: d.get("eventId") for d in docs}
    assert links == {d["_id"]: result.assignment.get(d["_id"]) for d in docs}
    assert live_counts(db) == {i: e.photo_count for i, e in result.events.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_photos_dead_lettered_across_runs_then_let_back_in_keep_the_canonical_pass(
    resources, mongo, kafka, settings, seed
):
    """A crowd of events that chain into each other; five photos dead-lettered in two runs
    (batches with healthy photos too), a sweep, a backfill, three photos let back in and a
    sweep. Links and live events equal the canonical pass at every stage, the backfill writes
    no event, and the last event-updates message of each event is its stored state."""
    rng = random.Random(seed)
    db = mongo.db()
    crowd = []
    for i in range(60):
        second = rng.randrange(40 * 60)
        crowd.append(
            backend_photo(
                f"p{i:02d}",
                f"2026-06-06T12:{second // 60:02d}:{second % 60:02d}Z",
                2.3522 + rng.uniform(0, 0.0015),
                48.8566 + rng.uniform(0, 0.001),
            )
        )
    clustered(db, crowd)
    ids = sorted(p["_id"] for p in crowd)
    bad = rng.sample(ids, 5)
    for run in (bad[:3], bad[3:]):
        batch = sorted(set(run) | set(rng.sample(ids, 4)))
        step = fail_on(db, *(p for p in run if p in batch))
        recluster_isolating_poison(db, batch, step, dead_letter_for(db, kafka, settings), 1)
        while apply_pending_links(db)[1]:
            pass
        assert_canonical_links(db)
    sweep(resources)
    versions = {d["_id"]: d["version"] for d in db.events.find({})}
    with instance_for_test() as instance:
        backfill(instance, resources, ["2026-06-06"])
    assert_canonical_links(db)
    assert {d["_id"]: d["version"] for d in db.events.find({})} == versions

    db.photos.update_many({"_id": {"$in": bad[:3]}}, {"$unset": {"deadLettered": ""}})
    db.poison_attempts.delete_many({"_id": {"$in": bad[:3]}})
    assert sweep(resources)["orphan_photos"].metadata["orphans_healed"].value == 3
    assert_canonical_links(db)
    assert sweep(resources)["event_photo_counts"].passed

    last: dict[str, dict] = {}
    for message in read_all(kafka, settings.event_updates_topic):
        update = json.loads(message.value())
        if update["version"] >= last.get(update["eventId"], {}).get("version", 0):
            last[update["eventId"]] = update
    for event in db.events.find({}):
        update = last[event["_id"]]
        live = event["photoCount"] > 0 and event.get("mergedInto") is None
        assert (update["version"], update["photoCount"], update["mergedInto"]) == (
            event["version"],
            event["photoCount"],
            event.get("mergedInto"),
        )
        assert (update["action"] == "tombstoned") == (not live)


def test_a_newer_message_of_a_dead_lettered_photo_lets_it_back_in(
    resources, mongo, kafka, blob, settings, monkeypatch
):
    """A linked photo is dead-lettered by a later message's run, then sent again, valid. The
    newer message must end applied (or dead-lettered itself): kept out, the photo would leave
    it neither. A replay of the dead-lettered range keeps the photo out."""
    one_try = changed(settings, max_poison_attempts=1)
    resources = {**resources, "settings": one_try}
    topic = one_try.uploads_topic
    db = mongo.db()
    lunch = upload("a-lunch", "2026-06-06T12:00:00Z", 2.3522, 48.8566)
    second = upload("c-second", "2026-06-06T12:01:00Z", 2.35233, 48.8566)
    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        publish(kafka, topic, [lunch, second], partition=0)
        harness.drain()
        shared = photo_events(db)["a-lunch"]

        def failing(db, ids, *args):
            if "a-lunch" in ids:
                raise ValueError("cannot cluster a-lunch")
            return recluster(db, ids, *args)

        monkeypatch.setattr(events_asset, "recluster", failing)
        publish(kafka, topic, [lunch], partition=0)
        (dead_lettering,) = harness.drain()
        monkeypatch.undo()
        assert photo_events(db)["a-lunch"] is None
        harness.execute(dead_lettering)
        assert db.photos.find_one({"_id": "a-lunch"})["deadLettered"], "a replay keeps it out"

        publish(kafka, topic, [upload("a-lunch", "2026-06-06T12:00:30Z", 2.3522, 48.8566)], 0)
        harness.drain()
    assert "deadLettered" not in db.photos.find_one({"_id": "a-lunch"})
    assert db.poison_attempts.count_documents({}) == 0
    assert photo_events(db) == {"a-lunch": shared, "c-second": shared}
    assert_end_state(kafka, db, blob, one_try)


def test_a_photo_let_back_in_while_it_is_being_released_keeps_its_new_link(mongo):
    """A release reads the dead-lettered photos, reclusters their partners, then unlinks them
    under the lease. A photo let back in between (a newer message's run, or the operator) and
    clustered again must keep the link that run decided."""
    db = mongo.db()
    clustered(db, [LUNCH, SECOND])
    db.photos.update_one({"_id": "a-lunch"}, {"$set": {"deadLettered": True}})  # left linked

    def let_back_in_meanwhile(partners):
        db.photos.update_one({"_id": "a-lunch"}, {"$unset": {"deadLettered": ""}})
        recluster(db, ["a-lunch"], ClusterParams())
        return recluster(db, partners, ClusterParams())

    poison.release_dead_lettered(db, ["a-lunch"], let_back_in_meanwhile, lambda _: 1, 1)
    while apply_pending_links(db)[1]:
        pass

    assert photo_events(db)["a-lunch"] == photo_events(db)["c-second"] is not None
    assert live_counts(db) == canonical_counts(db)


def test_a_photo_whose_newer_message_is_stored_while_it_is_dead_lettered_stays_in(
    mongo, kafka, settings
):
    """Another partition's run stores a newer message of the photo between the attempt that
    reaches the limit and the photo's mark: the letter names the older message, and the photo
    stays in for the newer one's run, which would otherwise find it dead-lettered and leave
    that message neither applied nor dead-lettered."""
    db = mongo.db()
    clustered(db, [LUNCH, SECOND])
    newer = PhotoUpload("a-lunch", at("2026-06-06T12:00:20Z"), 2.3522, 48.8566, "azure://p/a.jpg")
    source = {"topic": settings.uploads_topic, "partition": 1, "offset": 0, "topicId": None}
    sent = dead_letter_for(db, kafka, settings)

    def newer_message_stored_meanwhile(letters):
        upsert_uploads(db, [(newer, source, None)])
        return sent(letters)

    _, poisoned = recluster_isolating_poison(
        db, ["a-lunch"], fail_on(db, "a-lunch"), newer_message_stored_meanwhile, 1
    )

    assert poisoned == []
    assert "deadLettered" not in db.photos.find_one({"_id": "a-lunch"})
    assert db.poison_attempts.count_documents({}) == 0
    assert db.dead_letters.count_documents({}) == 1
    recluster(db, ["a-lunch"], ClusterParams())  # the newer message's run
    while apply_pending_links(db)[1]:
        pass
    assert photo_events(db)["a-lunch"] == photo_events(db)["c-second"] is not None
    assert live_counts(db) == canonical_counts(db)


def test_a_photo_the_newer_messages_run_dead_letters_meanwhile_keeps_its_record(
    resources, mongo, kafka, settings
):
    """Between the attempt that reaches the limit and the photo's mark, another partition's
    run stores a newer message of the photo, fails on it at the limit too, marks the photo and
    stops before releasing it (an outage while it reclusters the partners). The first run's
    mark then fails (the version moved on), and it must leave the attempt record alone: the
    record is how the sweeper finds the photo, still linked to its event, to release it."""
    db = mongo.db()
    clustered(db, [LUNCH, SECOND])
    shared = photo_events(db)["a-lunch"]
    newer = PhotoUpload("a-lunch", at("2026-06-06T12:00:20Z"), 2.3522, 48.8566, "azure://p/a.jpg")
    source = {"topic": settings.uploads_topic, "partition": 1, "offset": 0, "topicId": None}
    sent = dead_letter_for(db, kafka, settings)

    def stopped_while_releasing(seed):
        if "c-second" in seed:
            raise AutoReconnect("connection lost while reclustering the partners")
        return fail_on(db, "a-lunch")(seed)

    def newer_message_dead_lettered_meanwhile(letters):
        result = sent(letters)
        upsert_uploads(db, [(newer, source, None)])
        with pytest.raises(AutoReconnect):
            recluster_isolating_poison(db, ["a-lunch"], stopped_while_releasing, sent, 1)
        assert db.photos.find_one({"_id": "a-lunch"})["deadLettered"] is True
        assert photo_events(db)["a-lunch"] == shared, "the stopped run left it linked"
        return result

    _, poisoned = recluster_isolating_poison(
        db, ["a-lunch"], fail_on(db, "a-lunch"), newer_message_dead_lettered_meanwhile, 1
    )

    assert poisoned == []
    assert db.photos.find_one({"_id": "a-lunch"})["deadLettered"] is True
    assert db.poison_attempts.find_one({"_id": "a-lunch"}) is not None
    sweep(resources)
    assert photo_events(db)["a-lunch"] is None, "the sweep released the dead-lettered photo"
    assert live_counts(db) == canonical_counts(db)


def test_a_seed_that_failed_in_the_run_is_not_counted_again_by_its_release(mongo, kafka, settings):
    """Two photos of one event fail in the same micro-batch: one reaches the limit and is
    dead-lettered, the other fails its first attempt. The release of the first reclusters its
    partners, the second among them: that failure is the same attempt, already counted. Counted
    twice, the photo would reach a limit of three in its second run instead of its third."""
    db = mongo.db()
    clustered(db, [LUNCH, SECOND])
    shared = photo_events(db)["a-lunch"]
    db.poison_attempts.insert_one({"_id": "a-lunch", "attempts": 2, "lastError": "ValueError"})
    sent = dead_letter_for(db, kafka, settings)
    step = fail_on(db, "a-lunch", "c-second")

    with pytest.raises(ValueError, match="c-second"):
        recluster_isolating_poison(db, ["a-lunch", "c-second"], step, sent, 3)

    assert db.photos.find_one({"_id": "a-lunch"})["deadLettered"] is True
    assert db.poison_attempts.find_one({"_id": "c-second"})["attempts"] == 1
    assert photo_events(db)["a-lunch"] == shared, "waits for its failing partner"
    # The retried run: the second attempt, not the limit.
    with pytest.raises(ValueError, match="c-second"):
        recluster_isolating_poison(db, ["c-second"], step, sent, 3)
    assert "deadLettered" not in db.photos.find_one({"_id": "c-second"})
    assert db.poison_attempts.find_one({"_id": "c-second"})["attempts"] == 2


def test_a_seed_that_failed_only_beside_the_dead_lettered_photo_is_tried_again_by_the_release(
    mongo, kafka, settings
):
    """A photo whose data breaks every recluster that loads it also fails its partner's step,
    tried first, while it is in the closure. Once it is dead-lettered, the release tries the
    partner again (not counted twice): the partner succeeds without it, its attempt record is
    gone, and the photo is released in the same run instead of waiting, linked, for the
    sweeper."""
    db = mongo.db()
    clustered(db, [LUNCH, SECOND])
    db.poison_attempts.insert_one({"_id": "a-lunch", "attempts": 2, "lastError": "ValueError"})

    def step(seed):
        lunch_in = not db.photos.find_one({"_id": "a-lunch"}).get("deadLettered")
        if "a-lunch" in seed or (lunch_in and "c-second" in seed):
            raise ValueError("cannot cluster a closure holding a-lunch")
        return recluster(db, seed, ClusterParams())

    with pytest.raises(ValueError):
        recluster_isolating_poison(
            db, ["c-second", "a-lunch"], step, dead_letter_for(db, kafka, settings), 3
        )
    while apply_pending_links(db)[1]:
        pass

    assert db.photos.find_one({"_id": "a-lunch"})["deadLettered"] is True
    assert photo_events(db)["a-lunch"] is None, "released in the same run"
    assert photo_events(db)["c-second"] is not None
    assert db.poison_attempts.find_one({"_id": "c-second"}) is None
    assert live_counts(db) == canonical_counts(db)
