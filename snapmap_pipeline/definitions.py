"""The one code location: assets, jobs, the Kafka sensor, the sweeper and its schedule.

Every secret and address comes from the environment through ``EnvVar`` at run time; nothing is
read from the environment at import.
"""

from __future__ import annotations

from dagster import (
    AssetSelection,
    Definitions,
    EnvVar,
    define_asset_job,
    in_process_executor,
)

from snapmap_pipeline.assets.backfill import daily_events, recluster_days_job
from snapmap_pipeline.assets.events import (
    consumer_offsets,
    event_updates,
    events,
    photo_event_links,
)
from snapmap_pipeline.assets.ingest import photo_uploads
from snapmap_pipeline.checks import SWEEPER_CHECKS, sweeper_job, sweeper_schedule
from snapmap_pipeline.checks.batch_links import batch_photos_linked
from snapmap_pipeline.io_manager import RunScopedIOManager
from snapmap_pipeline.jobs import INGEST_JOB_NAME
from snapmap_pipeline.resources.blob import BlobStorageResource
from snapmap_pipeline.resources.kafka import KafkaResource
from snapmap_pipeline.resources.mongo import MongoResource
from snapmap_pipeline.sensors.kafka_sensor import photo_uploads_sensor
from snapmap_pipeline.settings import PipelineSettings

STREAMING_ASSETS = [photo_uploads, events, photo_event_links, event_updates, consumer_offsets]

ingest_job = define_asset_job(
    INGEST_JOB_NAME,
    # The batch's own blocking check, not the sweeper's (those scan whole collections).
    selection=AssetSelection.assets(*STREAMING_ASSETS).without_checks()
    | AssetSelection.checks(batch_photos_linked),
    description="One micro-batch of photo-uploads, from its offset range to committed offsets.",
    # dagster/max_runtime: run monitoring (dagster.yaml) fails a run still going after 30 min,
    # far beyond a 5,000-message batch, so a run whose worker died never holds its partition.
    tags={"snapmap/kind": "ingest", "dagster/max_runtime": "1800"},
    # One process per run, not per step: a micro-batch's steps are short, and a process per
    # step would cost more start-up than work.
    executor_def=in_process_executor,
)


def production_resources() -> dict:
    """Resources wired to the environment (values resolved when a run or tick starts)."""
    return {
        "kafka": KafkaResource(
            bootstrap_servers=EnvVar("KAFKA_BOOTSTRAP_SERVERS"),
            consumer_group=EnvVar("SNAPMAP_CONSUMER_GROUP"),
            security_protocol=EnvVar("KAFKA_SECURITY_PROTOCOL"),
            sasl_mechanism=EnvVar("KAFKA_SASL_MECHANISM"),
            sasl_username=EnvVar("KAFKA_SASL_USERNAME"),
            sasl_password=EnvVar("KAFKA_SASL_PASSWORD"),
            ssl_ca_location=EnvVar("KAFKA_SSL_CA_LOCATION"),
        ),
        "mongo": MongoResource(
            uri=EnvVar("MONGODB_URI"),
            database=EnvVar("MONGODB_DATABASE"),
            write_concern=EnvVar("MONGODB_WRITE_CONCERN"),
        ),
        "blob": BlobStorageResource(
            connection_string=EnvVar("AZURE_STORAGE_CONNECTION_STRING"),
            account_url=EnvVar("AZURE_STORAGE_ACCOUNT_URL"),
            sas_token=EnvVar("AZURE_STORAGE_SAS"),
        ),
        "settings": PipelineSettings(
            uploads_topic=EnvVar("SNAPMAP_UPLOADS_TOPIC"),
            dead_letter_topic=EnvVar("SNAPMAP_DEAD_LETTER_TOPIC"),
            event_updates_topic=EnvVar("SNAPMAP_EVENT_UPDATES_TOPIC"),
        ),
    }


def build_definitions(resources: dict) -> Definitions:
    """The code location with the given resources (tests pass their own isolated ones).

    Steps hand outputs over through a directory per run, in tests too: Dagster's default IO
    manager would share one file per asset between concurrent micro-batch runs, and
    ``execute_in_process`` would swap it for an in-memory one that hides that.
    """
    resources = {"io_manager": RunScopedIOManager(), **resources}
    return Definitions(
        assets=[*STREAMING_ASSETS, daily_events],
        asset_checks=[*SWEEPER_CHECKS, batch_photos_linked],
        jobs=[ingest_job, recluster_days_job, sweeper_job],
        schedules=[sweeper_schedule],
        sensors=[photo_uploads_sensor],
        resources=resources,
    )


defs = build_definitions(production_resources())
