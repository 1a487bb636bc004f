"""Simulated uploads for demos and soak tests: a seeded generator of a realistic day of upload
messages (``generator``), a stand-in for the upload backend that writes them to Blob Storage,
MongoDB and Kafka (``backend``), and a command line (``python -m snapmap_pipeline.simulator``)
that also replays real check-ins and summarises what the pipeline made of them."""

from snapmap_pipeline.simulator.generator import (
    Malformation,
    Photo,
    RecordKind,
    StreamConfig,
    UploadRecord,
    generate_stream,
    records_from_checkins,
    tally,
)

__all__ = [
    "Malformation",
    "Photo",
    "RecordKind",
    "StreamConfig",
    "UploadRecord",
    "generate_stream",
    "records_from_checkins",
    "tally",
]
