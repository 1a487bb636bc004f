"""Soak fixtures: the integration fixtures (own topics, database and container on the real
local stack), plus a second, independent set of them for a replay of the same messages in a
fresh database, a PostgreSQL-backed Dagster instance, and a pool of worker processes."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import uuid
from collections.abc import Iterator

import pytest
from dagster import DagsterInstance, instance_for_test
from pymongo import MongoClient

from snapmap_pipeline.resources.blob import BlobStorageResource
from snapmap_pipeline.resources.kafka import KafkaResource
from snapmap_pipeline.resources.mongo import MongoResource
from snapmap_pipeline.settings import PipelineSettings
from tests.conftest import drop_topics, stack_setting
from tests.integration.conftest import *  # noqa: F403


def isolated_resources(suffix: str) -> dict:
    """Kafka, MongoDB, Blob Storage and settings of their own (topics, group, database,
    container named after ``suffix``), as the integration fixtures build them."""
    settings = PipelineSettings(
        uploads_topic=f"photo-uploads-{suffix}",
        dead_letter_topic=f"photo-uploads-{suffix}.dlq",
        event_updates_topic=f"event-updates-{suffix}",
    )
    kafka = KafkaResource(
        bootstrap_servers=stack_setting("KAFKA_BOOTSTRAP_SERVERS"),
        consumer_group=f"snapmap-test-{suffix}",
        timeout_s=10.0,
    )
    mongo = MongoResource(
        uri=stack_setting("MONGODB_URI"), database=f"snapmap_test_{suffix}", write_concern="1"
    )
    blob = BlobStorageResource(
        connection_string=stack_setting("AZURE_STORAGE_CONNECTION_STRING"),
        manifest_container=f"manifests-{suffix}",
    )
    return {"kafka": kafka, "mongo": mongo, "blob": blob, "settings": settings}


def topics_of(settings: PipelineSettings) -> dict[str, int]:
    return {
        settings.uploads_topic: 3,
        settings.dead_letter_topic: 1,
        settings.event_updates_topic: 3,
    }


@pytest.fixture
def second_resources() -> Iterator[dict]:
    """A second isolated set of resources, for the same messages in another order."""
    resources = isolated_resources(uuid.uuid4().hex[:10])
    kafka, mongo = resources["kafka"], resources["mongo"]
    topics = topics_of(resources["settings"])
    kafka.ensure_topics(topics)
    yield resources
    drop_topics(kafka, list(topics))
    client = MongoClient(mongo.uri, serverSelectionTimeoutMS=5000)
    client.drop_database(mongo.database)
    client.close()


@pytest.fixture
def postgres_instance(dagster_postgres_url: str) -> Iterator[DagsterInstance]:
    """A Dagster instance whose storage is the test's own PostgreSQL database, so that runs
    executed in other processes at the same time share it."""
    overrides = {"storage": {"postgres": {"postgres_url": dagster_postgres_url}}}
    with instance_for_test(overrides=overrides) as instance:
        yield instance


@pytest.fixture
def workers() -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    """Two worker processes (spawned: no forked Kafka or MongoDB clients) for runs that execute
    beside the one in the test's own process."""
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=spawn) as pool:
        yield pool
