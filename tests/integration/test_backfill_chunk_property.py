"""Property: a day reclustered in chunks of any size ends with the canonical events, whether
its photos already have their cell (as ingestion leaves them) or not (as the upload backend
alone writes them), and whatever the store held before.

Chunks skip photos that an earlier chunk's closure reclustered (``recluster_day``); a photo
without a cell is not found by neighbourhood loads until it is a seed itself. Both are
exercised here: photos are drawn on a few places 30-60 m apart at a few minutes, so that
crowds link across chunk boundaries, and a drawn part of them has no cell. The oracle is one
canonical pass over every stored photo."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapmap_pipeline.assets.backfill import day_photo_chunks, recluster_day
from snapmap_pipeline.clustering import ClusterParams
from snapmap_pipeline.store import recluster as recluster_module
from snapmap_pipeline.store.geocell import cell_of
from snapmap_pipeline.store.recluster import recluster
from tests.integration.pipeline import live_events, photo_events
from tests.integration.sweeper_data import backend_photo, canonical

pytestmark = pytest.mark.sweeper

DAY = datetime(2026, 6, 6, tzinfo=UTC)
# About 40 m apart along a street, then one place far from the others.
PLACES = [(2.2945, 48.8584), (2.2950, 48.8584), (2.2955, 48.8584), (2.3100, 48.8700)]
LOG = logging.getLogger(__name__)

PHOTOS = st.lists(
    st.tuples(
        st.integers(0, 40),  # minute after 12:00
        st.integers(0, len(PLACES) - 1),
        st.booleans(),  # has its cell
    ),
    min_size=1,
    max_size=30,
)


def backfill_day(db, kafka, blob, settings, chunk_size: int):
    """``recluster_day`` of DAY with the default R and W, as the daily partition runs it."""
    return recluster_day(
        db,
        kafka,
        blob,
        ClusterParams(),
        settings.event_updates_topic,
        DAY,
        DAY + timedelta(days=1),
        LOG,
        chunk_size,
    )


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(photos=PHOTOS, chunk_size=st.integers(1, 12), streamed=st.sets(st.integers(0, 29)))
def test_any_chunk_size_leaves_the_canonical_events(
    photos, chunk_size, streamed, mongo, kafka, blob, settings
):
    db = mongo.db()
    db.photos.delete_many({})
    db.events.delete_many({})
    db.pending_links.delete_many({})
    documents = []
    for i, (minute, place, has_cell) in enumerate(photos):
        lon, lat = PLACES[place]
        taken = (DAY + timedelta(hours=12, minutes=minute)).strftime("%Y-%m-%dT%H:%M:%SZ")
        document = backend_photo(f"p{i:02d}", taken, lon, lat)
        if has_cell:
            document["cell"] = cell_of(lon, lat)
        documents.append(document)
    db.photos.insert_many(documents)
    # Some photos were clustered by streaming runs before the backfill, with what was
    # stored then: their events may be stale, which the backfill must correct.
    earlier = [f"p{i:02d}" for i in sorted(streamed) if i < len(photos)]
    if earlier:
        recluster(db, earlier, ClusterParams())

    report = backfill_day(db, kafka, blob, settings, chunk_size)

    expected = canonical(db)
    assert photo_events(db) == expected.assignment
    live = live_events(db)
    assert {e: d["photoCount"] for e, d in live.items()} == {
        e: ev.photo_count for e, ev in expected.events.items()
    }
    # Every photo was in a closure, so each has its cell now: later neighbourhood loads find
    # it, even if a chunk skipped it as a seed.
    assert db.photos.count_documents({"cell": {"$exists": False}}) == 0
    assert report.photos == len(photos)
    assert report.recluster.seed_photos + report.seed_photos_in_earlier_closures == len(photos)


def test_photos_sharing_a_chunk_boundary_instant_are_not_read_by_every_chunk(
    mongo, kafka, blob, settings, monkeypatch
):
    """A camera that stamps only the date gives many photos one ``takenAt``: the chunks that
    start or end on that instant must not each read all of them, or a chunk's memory and the
    day's reads grow with the number of such photos instead of the chunk size."""
    db = mongo.db()
    documents = []
    # 60 photos at midnight, far apart (each its own event); then 10 on a street at noon.
    for i in range(60):
        lon, lat = -170.0 + 5.5 * i, -60.0 + 2.0 * (i % 7)
        documents.append(backend_photo(f"m{i:02d}", "2026-06-06T00:00:00Z", lon, lat))
    for i in range(10):
        lon, lat = PLACES[i % 3]
        documents.append(backend_photo(f"n{i:02d}", f"2026-06-06T12:0{i}:00Z", lon, lat))
    for document in documents[::2]:
        lon, lat = document["location"]["coordinates"]
        document["cell"] = cell_of(lon, lat)
    db.photos.insert_many(documents)

    read_whole = recluster_module._photos_taken_between
    held: list[int] = []

    def counted(*args):
        docs = read_whole(*args)
        held.append(len(docs))
        return docs

    monkeypatch.setattr(recluster_module, "_photos_taken_between", counted)
    chunk_size = 7
    report = backfill_day(db, kafka, blob, settings, chunk_size)

    expected = canonical(db)
    assert photo_events(db) == expected.assignment
    assert report.chunks == 10
    assert held and max(held) <= chunk_size


# Milliseconds into the day: bursts on a few instants (ties), dense minutes, sparse hours, and
# photos just outside the day on either side.
TAKEN_MS = st.one_of(
    st.sampled_from([0, 1, 43_200_000, 86_399_999]),
    st.integers(43_200_000, 43_260_000),
    st.integers(0, 86_399_999),
    st.sampled_from([-1, 86_400_000]),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(taken=st.lists(TAKEN_MS, min_size=0, max_size=60), chunk_size=st.integers(1, 15))
def test_day_chunks_are_the_days_photos_in_order_and_full(taken, chunk_size, mongo):
    """Each chunk is its own query resuming after the photo the one before ended on
    (``day_photo_chunks``): whatever the density, ties and gaps, the chunks are the day's
    photos in ``(takenAt, _id)`` order, each once, all full but the last, with the times of
    their first and last photo."""
    db = mongo.db()
    db.photos.delete_many({})
    documents = [
        {"_id": f"p{i:02d}", "takenAt": DAY + timedelta(milliseconds=ms)}
        for i, ms in enumerate(taken)
    ]
    if documents:
        db.photos.insert_many(documents)
    in_day = sorted(
        (d["takenAt"], d["_id"]) for d in documents if DAY <= d["takenAt"] < DAY + timedelta(1)
    )

    chunks = list(day_photo_chunks(db, DAY, DAY + timedelta(days=1), chunk_size))

    assert [i for chunk in chunks for i in chunk.ids] == [i for _, i in in_day]
    assert all(len(chunk.ids) == chunk_size for chunk in chunks[:-1])
    assert all(0 < len(chunk.ids) <= chunk_size for chunk in chunks)
    by_id = {i: t for t, i in in_day}
    assert all(c.first == by_id[c.ids[0]] and c.last == by_id[c.ids[-1]] for c in chunks)
