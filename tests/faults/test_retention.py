"""Retention deletes offsets nobody has read yet (``AdminClient.delete_records``).

Two gaps: one opens between ticks (the sensor sees its cursor below the low watermark), one
between a tick and its run (the run finds the start of its range gone). Both are recorded (the
run tag ``snapmap/retention_gap`` and an observation; the batch's ``lostToRetention``), the
rest is applied, and the committed offset moves past both gaps.
"""

from __future__ import annotations

import pytest
from confluent_kafka import TopicPartition
from dagster import build_sensor_context, instance_for_test

from snapmap_pipeline.resources.kafka import OffsetRange
from snapmap_pipeline.sensors.kafka_sensor import photo_uploads_sensor
from tests.faults.conftest import assert_end_state, committed, request_key
from tests.integration.pipeline import Harness, photo_events, publish, upload

pytestmark = [pytest.mark.faults, pytest.mark.kafka, pytest.mark.sensor]


def delete_before(kafka, topic: str, partition: int, offset: int) -> None:
    admin = kafka.admin()
    futures = admin.delete_records([TopicPartition(topic, partition, offset)])
    for future in futures.values():
        future.result(timeout=15)


def photos(prefix: str, count: int) -> list[bytes]:
    return [
        upload(f"{prefix}-{i}", f"2026-08-01T12:{i:02d}:00Z", 151.2093, -33.8688 + i * 1e-3)
        for i in range(count)
    ]


def test_deleted_offsets_are_recorded_and_passed(resources, settings, kafka, mongo, blob):
    topic = settings.uploads_topic
    publish(kafka, topic, photos("read", 4), partition=0)
    db = mongo.db()
    with instance_for_test() as instance:
        harness = Harness(instance, resources)
        harness.drain()
        assert committed(kafka, topic) == {0: 4}

        # Offsets 4-13 arrive; retention deletes 4-9 before any tick saw them.
        publish(kafka, topic, photos("gone", 6) + photos("kept", 4), partition=0)
        delete_before(kafka, topic, 0, 10)
        with build_sensor_context(
            instance=instance, cursor=harness.cursor, resources=resources
        ) as context:
            result = photo_uploads_sensor(context)
        (request,) = result.run_requests
        assert request_key(request) == (0, 10, 13)
        assert request.tags["snapmap/retention_gap"] == "4-9"
        (observation,) = result.asset_events
        assert observation.metadata["retention_gap_range"].value == "4-9"
        assert observation.metadata["retention_gap_offsets"].value == 6

        # Between the tick and its run, retention takes 10-11 as well.
        delete_before(kafka, topic, 0, 12)
        run = harness.execute(request)
        assert run.success
        assert instance.get_run_by_id(run.run_id).tags["snapmap/retention_gap"] == "4-9"
        ingest = run.asset_materializations_for_node("photo_uploads")[0].metadata
        assert ingest["lost_to_retention"].value == 2
        assert ingest["messages_read"].value == 2

    assert committed(kafka, topic) == {0: 14}
    batch = db.batches.find_one({"_id": request.run_key})
    assert (batch["lostToRetention"], batch["read"]) == (2, 2)
    assert set(photo_events(db)) == {f"read-{i}" for i in range(4)} | {"kept-2", "kept-3"}
    assert_end_state(kafka, db, blob, settings, lost={0: (4, 11)})


@pytest.mark.parametrize(
    ("first", "last", "expected"),
    [(0, 4, ([], 5)), (0, 11, ([], 12)), (10, 13, ([12, 13], 2)), (12, 11, ([], 0))],
)
def test_a_range_counts_as_lost_only_its_own_deleted_offsets(
    settings, kafka, first, last, expected
):
    """Retention may pass a range's end before its run reads it (a backlog held up by an
    outage): the range lost its own offsets, not every offset below the low watermark."""
    topic = settings.uploads_topic
    publish(kafka, topic, photos("r", 20), partition=0)
    delete_before(kafka, topic, 0, 12)

    messages, lost = kafka.read_range(OffsetRange(topic, 0, first, last))

    assert ([m.offset() for m in messages], lost) == expected
