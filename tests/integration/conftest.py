"""Resources bound to the real local stack, isolated per test."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from azure.core.exceptions import AzureError, ResourceNotFoundError
from pymongo import MongoClient

from snapmap_pipeline.resources.blob import BlobStorageResource
from snapmap_pipeline.resources.kafka import KafkaResource
from snapmap_pipeline.resources.mongo import MongoResource
from snapmap_pipeline.settings import PipelineSettings
from tests.conftest import drop_topics, stack_setting

log = logging.getLogger(__name__)


@pytest.fixture
def settings(unique: str) -> PipelineSettings:
    return PipelineSettings(
        uploads_topic=f"photo-uploads-{unique}",
        dead_letter_topic=f"photo-uploads-{unique}.dlq",
        event_updates_topic=f"event-updates-{unique}",
        max_messages_per_run=500,
    )


@pytest.fixture
def kafka(unique: str, settings: PipelineSettings) -> Iterator[KafkaResource]:
    resource = KafkaResource(
        bootstrap_servers=stack_setting("KAFKA_BOOTSTRAP_SERVERS"),
        consumer_group=f"snapmap-test-{unique}",
        timeout_s=10.0,
    )
    topics = {
        settings.uploads_topic: 3,
        settings.dead_letter_topic: 1,
        settings.event_updates_topic: 3,
    }
    resource.ensure_topics(topics)
    yield resource
    drop_topics(resource, list(topics))


@pytest.fixture
def mongo(unique: str) -> Iterator[MongoResource]:
    resource = MongoResource(
        uri=stack_setting("MONGODB_URI"), database=f"snapmap_test_{unique}", write_concern="1"
    )
    yield resource
    client = MongoClient(resource.uri, serverSelectionTimeoutMS=5000)
    client.drop_database(resource.database)
    client.close()


@pytest.fixture
def blob(unique: str) -> Iterator[BlobStorageResource]:
    resource = BlobStorageResource(
        connection_string=stack_setting("AZURE_STORAGE_CONNECTION_STRING"),
        manifest_container=f"manifests-{unique}",
    )
    yield resource
    # Left behind, every test's manifests would stay in Azurite's store for the stack's life.
    try:
        with resource.service() as client:
            client.delete_container(resource.manifest_container)
    except ResourceNotFoundError:
        pass  # the test wrote no manifest, or removed its container itself
    except AzureError as error:  # a stopped Azurite must not hide the test's own result
        log.warning("could not delete container %s: %s", resource.manifest_container, error)


@pytest.fixture
def resources(kafka, mongo, blob, settings) -> dict:
    return {"kafka": kafka, "mongo": mongo, "blob": blob, "settings": settings}


@pytest.fixture
def dagster_postgres_url(unique: str) -> Iterator[str]:
    """A database of its own on the stack's PostgreSQL, for a Dagster instance under test."""
    import psycopg2

    base = stack_setting("DAGSTER_POSTGRES_URL")
    name = f"dagster_test_{unique}"
    admin = psycopg2.connect(base, connect_timeout=10)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    yield base.rsplit("/", 1)[0] + "/" + name
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()
