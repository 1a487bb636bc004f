"""cases.md #9 (``$maxDistance`` in metres for GeoJSON, radians for legacy pairs) in this
pipeline's terms.

Clustering never asks the database for neighbours: the engine's haversine BallTree takes the
join radius in metres and converts it once (``clustering.geo.metres_to_radians``). What the
case pins, two photos 100 m apart that a 50 m search must keep apart and a 150 m search must
join, is therefore asked of the pipeline's radius ``R``, through Kafka and real runs. The case's
own ``$near`` query is asked of the MongoDB-compatible server, beside the schema's 2dsphere
probe: the local server refuses ``$near`` outright (it must never answer it with everything or
nothing), and the probe reports that; a server that serves it must answer as the case expects.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from dagster import instance_for_test
from pymongo.errors import OperationFailure

from snapmap_pipeline.clustering.geo import haversine_m, latlon_radians
from snapmap_pipeline.store.schema import ensure_schema
from tests.integration.pipeline import Harness, groups, live_events, photo_events, publish, upload
from tests.integration.test_ingestion import changed

pytestmark = [pytest.mark.e2e, pytest.mark.storage]

P1 = (81.772379, 25.4301623)
P2 = (81.772379, 25.4310623)  # 100 m north of P1
TAKEN_AT = "2026-01-17T13:20:00Z"


def near(metres: float) -> dict:
    """The case's query: GeoJSON ``$near`` around P1 with ``$maxDistance`` in metres."""
    point = {"type": "Point", "coordinates": list(P1)}
    return {"location": {"$near": {"$geometry": point, "$maxDistance": metres}}}


def test_the_two_points_are_100_metres_apart():
    """The engine's own distance for the case's pair (degrees in, metres out)."""
    rows = latlon_radians(np.array([P1[0], P2[0]]), np.array([P1[1], P2[1]]))
    distance = haversine_m(rows[0, 0], rows[0, 1], rows[1, 0], rows[1, 1])
    assert 99.0 < distance < 101.0


@pytest.mark.parametrize(("radius_m", "expected"), [(50.0, 2), (150.0, 1)])
def test_radius_in_metres_splits_at_50_and_joins_at_150(
    resources, settings, kafka, mongo, radius_m, expected
):
    """p1 and p2 through Kafka and real runs: two events with R = 50 m, one with R = 150 m.

    Fails if distances and the radius are in different units. Seen failing with
    ``clustering.geo.EARTH_RADIUS_M`` set to 6371.0088 (kilometres taken for metres): one event
    at R = 50 m, and the distance test above fails too. (The tree's radius conversion alone
    cannot break it: the tree only proposes candidates, every join is decided in metres.)"""
    publish(
        kafka,
        settings.uploads_topic,
        [upload("p1", TAKEN_AT, *P1), upload("p2", TAKEN_AT, *P2)],
        partition=0,
    )
    with instance_for_test() as instance:
        harness = Harness(instance, {**resources, "settings": changed(settings, radius_m=radius_m)})
        assert harness.drain()

    db = mongo.db()
    assignment = photo_events(db)
    assert None not in assignment.values()
    assert len(groups(assignment)) == expected
    assert len(live_events(db)) == expected


def test_the_cases_near_query_is_refused_or_answered_in_metres(mongo, caplog):
    """The case's ``$near`` with ``$maxDistance`` 50 and 150 on the stack's server.

    ``ensure_schema``'s probe says whether the server serves 2dsphere queries on ``photos``.
    Where it does, 50 m returns p1 only and 150 m both. Where it does not (the local server),
    the query fails loudly and the probe's one warning line names ``photos.location``. Seen
    failing by making the probe return True without querying (the $near assertions then meet
    the server's refusal)."""
    db = mongo.db()
    db.photos.insert_many(
        [
            {"_id": "p1", "location": {"type": "Point", "coordinates": list(P1)}},
            {"_id": "p2", "location": {"type": "Point", "coordinates": list(P2)}},
        ]
    )
    caplog.set_level(logging.WARNING, logger="snapmap_pipeline.store.schema")
    geo = ensure_schema(db)

    if geo["photos"]:
        assert [d["_id"] for d in db.photos.find(near(50))] == ["p1"]
        assert sorted(d["_id"] for d in db.photos.find(near(150))) == ["p1", "p2"]
        return
    for metres in (50, 150):
        with pytest.raises(OperationFailure):
            list(db.photos.find(near(metres)))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "photos.location" in warnings[0]
    assert "clustering does not need them" in warnings[0]
