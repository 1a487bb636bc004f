"""Job names and run config shapes shared by the sensor, the assets and the definitions."""

from __future__ import annotations

from snapmap_pipeline.resources.kafka import OffsetRange

INGEST_JOB_NAME = "ingest_photo_uploads"
RECLUSTER_JOB_NAME = "recluster_days"
SWEEPER_JOB_NAME = "sweeper"


def ingest_run_config(offsets: OffsetRange) -> dict:
    """Run config of one micro-batch: the offset range (with its topic's id when known) and
    nothing else."""
    config: dict = {
        "topic": offsets.topic,
        "partition": offsets.partition,
        "first_offset": offsets.first,
        "last_offset": offsets.last,
    }
    if offsets.topic_id is not None:
        config["topic_id"] = offsets.topic_id
    return {"ops": {"photo_uploads": {"config": config}}}
