"""Pipeline settings shared by the sensor, the assets and the sweeper, as one resource so that
every run records the parameters it used (R and W go on run tags and metadata)."""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from snapmap_pipeline.clustering import ClusterParams


class PipelineSettings(ConfigurableResource):
    """Topics, batch caps and clustering parameters."""

    uploads_topic: str = Field(default="photo-uploads")
    dead_letter_topic: str = Field(default="photo-uploads.dlq")
    event_updates_topic: str = Field(default="event-updates")
    radius_m: float = Field(default=50.0, description="R: join distance to a centroid, metres.")
    window_s: float = Field(default=300.0, description="W: join gap after an event's end, s.")
    max_messages_per_run: int = Field(default=5000, description="Offsets per micro-batch run.")
    max_runs_per_tick: int = Field(default=20, description="Run requests per sensor tick.")
    max_pending_runs_per_partition: int = Field(
        default=2,
        ge=1,
        description=(
            "Unfinished ingest runs a partition may have before the sensor stops requesting "
            "more for it; its backlog then goes into one larger run when one finishes."
        ),
    )
    heal_after_s: float = Field(
        default=120.0,
        description=(
            "A range whose every run failed or was canceled is requested again after this "
            "long, doubling with each attempt (up to an hour)."
        ),
    )
    sensor_tick_budget_s: float = Field(
        default=20.0, description="A tick stops planning after this long (limit is 60 s)."
    )
    max_poison_attempts: int = Field(
        default=3, description="Failed attempts before a valid photo is dead-lettered."
    )
    orphan_grace_minutes: float = Field(
        default=15.0, description="Age after upload before a photo without event is an orphan."
    )
    sweep_limit: int = Field(default=20_000, description="Orphans healed per sweep at most.")
    storage_sample_size: int = Field(default=50, description="storageUrls checked per sweep.")
    manifest_sample_size: int = Field(
        default=50, description="Written event manifests checked per sweep."
    )

    def cluster_params(self) -> ClusterParams:
        return ClusterParams(radius_m=self.radius_m, window_s=self.window_s)
