"""Property: the photo stored from a set of messages does not depend on how the messages are
split into batches nor on the order the batches are applied; it is the message with the
greatest (publish time, partition, offset), checked against that brute-force oracle.

Messages are built in memory (no broker: the property is about ``split_batch`` and
``upsert_uploads``); the writes go to the real MongoDB-compatible server."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapmap_pipeline.assets.ingest import split_batch
from snapmap_pipeline.store.photos import upsert_uploads
from tests.integration.pipeline import upload

pytestmark = pytest.mark.storage

TOPIC = "photo-uploads-property"
T0 = 1_777_640_400_000  # 2026-05-01T13:00Z
TAKEN = "2026-05-01T12:00:00Z"
PLACES = [(2.3500, 48.8500), (2.3550, 48.8550), (2.3600, 48.8600)]

# (photo, partition, publish time in ms after T0, place): few values, so that publish times
# tie, go backwards within a partition and differ across partitions.
SENDS = st.lists(
    st.tuples(
        st.sampled_from("ab"),
        st.integers(0, 2),
        st.sampled_from([0, 1, 1_000, 60_000]),
        st.integers(0, len(PLACES) - 1),
    ),
    min_size=1,
    max_size=12,
)


def messages_of(sends: list[tuple[str, int, int, int]]) -> list[Message]:
    """Kafka messages in publish order, each partition's offsets counting from 0."""
    offsets = {0: 0, 1: 0, 2: 0}
    messages = []
    for photo, partition, after_ms, place in sends:
        messages.append(
            Message(
                topic=TOPIC,
                partition=partition,
                offset=offsets[partition],
                timestamp=(TIMESTAMP_CREATE_TIME, T0 + after_ms),
                value=upload(photo, TAKEN, *PLACES[place]),
            )
        )
        offsets[partition] += 1
    return messages


def oracle(messages: list[Message]) -> dict[str, tuple[float, float]]:
    """Each photo's place from its message with the greatest (time, partition, offset)."""
    newest: dict[str, tuple[tuple[int, int, int], tuple[float, float]]] = {}
    for message in messages:
        photo_id, place = parse(message.value())
        order = (message.timestamp()[1], message.partition(), message.offset())
        if photo_id not in newest or order > newest[photo_id][0]:
            newest[photo_id] = (order, place)
    return {photo_id: place for photo_id, (_, place) in newest.items()}


def parse(value: bytes) -> tuple[str, tuple[float, float]]:
    body = json.loads(value)
    return body["photoId"], tuple(body["location"])


def apply(db, blob, batches: list[list[Message]]) -> dict[str, tuple[tuple[float, float], str]]:
    """Apply ``batches`` in order to an empty ``photos``; the stored place and version."""
    db.photos.delete_many({})
    read_at = datetime(2026, 5, 1, 13, 5, tzinfo=UTC)
    for batch in batches:
        valid, rejected = split_batch(batch, blob, "topic-id", read_at)
        assert not rejected
        upsert_uploads(db, list(valid.values()))
    return {
        d["_id"]: (tuple(d["location"]["coordinates"]), d["sourceVersion"])
        for d in db.photos.find({})
    }


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(sends=SENDS, data=st.data())
def test_any_split_and_order_of_batches_stores_the_newest_message(sends, data, mongo, blob):
    messages = messages_of(sends)
    db = mongo.db()

    # Runs read one partition each: split every partition's messages into contiguous
    # batches at drawn offsets, then apply all batches in a drawn order.
    batches: list[list[Message]] = []
    for partition in range(3):
        own = [m for m in messages if m.partition() == partition]
        if not own:
            continue
        cuts = data.draw(st.sets(st.integers(1, len(own) - 1)) if len(own) > 1 else st.just(set()))
        bounds = [0, *sorted(cuts), len(own)]
        batches += [own[first:last] for first, last in zip(bounds, bounds[1:], strict=False)]
    order = data.draw(st.permutations(range(len(batches))))

    in_one_batch = apply(db, blob, [messages])
    split = apply(db, blob, [batches[i] for i in order])
    assert split == in_one_batch
    assert {photo_id: place for photo_id, (place, _) in split.items()} == oracle(messages)
