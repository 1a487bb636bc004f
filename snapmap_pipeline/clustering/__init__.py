"""The clustering engine: photos to events by the canonical rule. Pure (numpy and
scikit-learn only): no Dagster, no database, no I/O.

* :func:`canonical_pass` clusters a set of photos; the result depends only on the set.
* :func:`closure` (with :func:`search_windows`) finds the photos needed to recluster some
  photos exactly; :mod:`.locality` proves why that is enough.
* :func:`diff` turns a result and the stored state into the writes to make.
* :mod:`.geo` states the coordinate contract once (GeoJSON ``[lon, lat]`` degrees outside,
  ``[lat, lon]`` radians in the haversine BallTree, :data:`EARTH_RADIUS_M` in between).
"""

from snapmap_pipeline.clustering.diff import Changes, StoredEvent, diff
from snapmap_pipeline.clustering.engine import (
    TIE_TOLERANCE_M,
    EventTable,
    canonical_order,
    canonical_pass,
    cluster_columns,
)
from snapmap_pipeline.clustering.geo import EARTH_RADIUS_M, link_reach_m
from snapmap_pipeline.clustering.locality import (
    SearchWindow,
    closure,
    linked,
    linked_to,
    search_windows,
)
from snapmap_pipeline.clustering.model import (
    ClusterParams,
    ClusterResult,
    Event,
    PhotoColumns,
    PhotoPoint,
    event_id_for,
    photo_columns,
)

__all__ = [
    "EARTH_RADIUS_M",
    "TIE_TOLERANCE_M",
    "Changes",
    "ClusterParams",
    "ClusterResult",
    "Event",
    "EventTable",
    "PhotoColumns",
    "PhotoPoint",
    "SearchWindow",
    "StoredEvent",
    "canonical_order",
    "canonical_pass",
    "closure",
    "cluster_columns",
    "diff",
    "event_id_for",
    "link_reach_m",
    "linked",
    "linked_to",
    "photo_columns",
    "search_windows",
]
