"""The ``snapmap`` command against the real local stack, run as a separate process."""

from __future__ import annotations

import copy
import json
from datetime import timedelta

import pytest
from dagster import instance_for_test
from pymongo import MongoClient

from snapmap_pipeline.cli import merge_ranges, uncovered
from snapmap_pipeline.contract.validation import EARLIEST_TAKEN_AT
from snapmap_pipeline.definitions import build_definitions
from snapmap_pipeline.jobs import INGEST_JOB_NAME
from snapmap_pipeline.resources.kafka import OffsetRange
from snapmap_pipeline.resources.mongo import MongoResource
from snapmap_pipeline.sensors.kafka_sensor import run_request_for
from tests.integration.pipeline import Harness, photo_events, publish, upload
from tests.integration.sweeper_data import backfill, cli_env, snapmap, stored_state, three_days

pytestmark = pytest.mark.sweeper


@pytest.fixture
def second_mongo(mongo: MongoResource):
    """Another isolated database on the same server, for a second copy of the same photos."""
    resource = MongoResource(uri=mongo.uri, database=f"{mongo.database}_cli", write_concern="1")
    yield resource
    client = MongoClient(resource.uri, serverSelectionTimeoutMS=5000)
    client.drop_database(resource.database)
    client.close()


def test_ranges_merge_and_gaps_are_exact():
    assert merge_ranges([(5, 9), (0, 4), (12, 12), (11, 11)]) == [(0, 9), (11, 12)]
    assert uncovered(0, 15, [(0, 9), (11, 12)]) == [(10, 10), (13, 14)]
    assert uncovered(3, 3, [(0, 9)]) == []
    assert uncovered(20, 25, [(0, 9)]) == [(20, 24)]


def test_recluster_command_equals_the_daily_backfill(
    resources, mongo, second_mongo, settings, blob
):
    photos = three_days()
    mongo.db().photos.insert_many(copy.deepcopy(photos))
    with instance_for_test() as instance:
        backfill(instance, resources, ["2026-06-05", "2026-06-06", "2026-06-07"])

    second_mongo.db().photos.insert_many(copy.deepcopy(photos))
    done = snapmap(
        [
            "recluster",
            "--from",
            "2026-06-05",
            "--to",
            "2026-06-07",
            "--manifest-container",
            blob.manifest_container,
        ],
        cli_env(second_mongo.database, SNAPMAP_EVENT_UPDATES_TOPIC=settings.event_updates_topic),
    )
    assert done.returncode == 0, done.stderr
    assert "3/3" in done.stderr, "the progress bar reached the last day"
    assert "reclustered 3 days (R=50 m, W=300 s)" in done.stdout
    assert f"{len(photos)} photos" in done.stdout
    # linkToken is the clustering lease's grant counter when a photo took its link: it counts
    # how often the lease was granted before (checks, retries), not an outcome.
    ignored = ("linkToken",)
    assert stored_state(second_mongo.db(), ignored) == stored_state(mongo.db(), ignored)


def test_recluster_command_usage_and_configuration_errors_exit_2(mongo):
    env = cli_env(mongo.database)
    backwards = snapmap(["recluster", "--from", "2026-06-07", "--to", "2026-06-05"], env)
    assert backwards.returncode == 2
    assert "--to is before --from" in backwards.stderr
    assert snapmap(["recluster", "--from", "June 5th", "--to", "2026-06-05"], env).returncode == 2
    first = EARLIEST_TAKEN_AT.date()
    too_early = ["recluster", "--from", str(first - timedelta(days=1)), "--to", str(first)]
    before_first = snapmap(too_early, env)
    assert before_first.returncode == 2
    assert f"is before {first}, the first day" in before_first.stderr
    assert snapmap(["frobnicate"], env).returncode == 2

    no_uri = {k: v for k, v in env.items() if k != "MONGODB_URI"}
    unconfigured = snapmap(["stats"], no_uri)
    assert unconfigured.returncode == 2
    assert "MONGODB_URI" in unconfigured.stderr


def test_stats_counts_what_is_stored(mongo):
    db = mongo.db()
    db.photos.insert_many(three_days())
    db.dead_letters.insert_many(
        [
            {"_id": "t/0/1", "code": "schema"},
            {"_id": "t/0/2", "code": "schema"},
            {"_id": "t/1/7", "code": "not_json"},
        ]
    )
    done = snapmap(["stats", "--json"], cli_env(mongo.database))
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["photos"] == stats["orphan_photos"] == len(three_days())
    assert stats["photos_with_event"] == 0
    assert stats["live_events"] == stats["tombstones"] == 0
    assert stats["dead_letters_by_code"] == {"not_json": 1, "schema": 2}


def ingest_everything(resources: dict, instance) -> None:
    """Tick the real sensor and run every micro-batch it asks for, until it has none."""
    harness = Harness(instance, resources)
    job = build_definitions(resources).resolve_job_def(INGEST_JOB_NAME)
    for _ in range(20):
        requests = harness.tick()
        if not requests:
            return
        for request in requests:
            job.execute_in_process(
                run_config=request.run_config, instance=instance, tags=request.tags
            )
    raise AssertionError("the sensor kept requesting runs")


def test_accounting_is_clean_after_ingest_and_names_what_is_wrong(
    resources, settings, kafka, mongo
):
    values = [
        upload(f"acc-{i:02d}", f"2026-06-06T15:{i:02d}:00Z", 2.3522 + i * 1e-5, 48.8566)
        for i in range(12)
    ]
    values.insert(4, b"{not json")
    publish(kafka, settings.uploads_topic, values)
    with instance_for_test() as instance:
        ingest_everything(resources, instance)

    env = cli_env(mongo.database, SNAPMAP_CONSUMER_GROUP=kafka.consumer_group)
    args = ["accounting", "--topic", settings.uploads_topic]
    clean = snapmap(args, env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "every offset is accounted for" in clean.stdout
    rows = [line.split() for line in clean.stdout.splitlines()[2:5]]
    assert sum(int(row[4]) for row in rows) == len(values), "every offset applied"
    assert sum(int(row[6]) for row in rows) == 1, "one dead letter"

    db = mongo.db()
    assert all(photo_events(db).values())
    db.photos.update_one({"_id": "acc-03"}, {"$set": {"eventId": None}})
    unlinked = snapmap(args, env)
    assert unlinked.returncode == 1
    assert "have no eventId, e.g. acc-03" in unlinked.stdout

    db.photos.update_one({"_id": "acc-03"}, {"$set": {"eventId": photo_events(db)["acc-04"]}})
    forgotten = db.batches.find_one({"first": 0})
    db.batches.delete_one({"_id": forgotten["_id"]})
    unaccounted = snapmap(args, env)
    assert unaccounted.returncode == 1
    partition = forgotten["partition"]
    assert (
        f"UNACCOUNTED {settings.uploads_topic}/{partition} offsets 0-{forgotten['last']}"
        in unaccounted.stdout
    )

    # A range whose runs failed while later ones were applied: nothing is lost (it is pending),
    # but the commit waits for it, so the accounting says so and exits 3.
    kafka.commit_offset(settings.uploads_topic, partition, 0)
    with kafka.consumer() as consumer:
        high = kafka.watermarks(consumer, settings.uploads_topic, partition).high
    late = [upload(f"acc-late-{i}", f"2026-06-06T16:0{i}:00Z", 2.40, 48.85) for i in range(3)]
    publish(kafka, settings.uploads_topic, late, partition=partition)
    request = run_request_for(OffsetRange(settings.uploads_topic, partition, high, high + 2))
    job = build_definitions(resources).resolve_job_def(INGEST_JOB_NAME)
    with instance_for_test() as instance:
        assert job.execute_in_process(
            run_config=request.run_config, instance=instance, tags=request.tags
        ).success
    stalled = snapmap(args, env)
    assert stalled.returncode == 3, stalled.stdout + stalled.stderr
    assert (
        f"STALLED {settings.uploads_topic}/{partition} offsets 0-{high - 1}: pending while "
        "3 later offsets are applied" in stalled.stdout
    )
