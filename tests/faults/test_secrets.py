"""Secrets reach Dagster only through ``EnvVar`` and never land in logs or run records.

The real ``production_resources()`` wiring runs one micro-batch against the test's own topics
and database, with recognisable secret values in the environment: a SASL password (unused by
PLAINTEXT Kafka, but handed to librdkafka) and a real SAS token for Azurite (used on every
Blob Storage request, so its signature travels in request URLs). Neither may appear in the
Dagster event log, the run's config, tags or snapshots, any file of the Dagster instance, or
anything the process printed or logged, at any level (urllib3's DEBUG request lines included:
the Blob resource redacts signatures and account keys from every log record).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote

import pytest
from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas
from dagster import build_sensor_context, instance_for_test, serialize_value

from snapmap_pipeline.definitions import build_definitions, production_resources
from snapmap_pipeline.jobs import INGEST_JOB_NAME
from snapmap_pipeline.resources.blob import BlobStorageResource
from snapmap_pipeline.sensors.kafka_sensor import photo_uploads_sensor
from tests.conftest import stack_setting
from tests.faults.conftest import assert_end_state
from tests.integration.pipeline import live_events, publish, upload

pytestmark = [pytest.mark.faults, pytest.mark.kafka, pytest.mark.storage]

AZURITE_URL = "http://127.0.0.1:{port}/devstoreaccount1"


def azurite_sas() -> tuple[str, str]:
    """An account SAS for Azurite, signed with its well-known key; and its account URL."""
    settings = dict(
        part.split("=", 1)
        for part in stack_setting("AZURE_STORAGE_CONNECTION_STRING").split(";")
        if "=" in part
    )
    sas = generate_account_sas(
        settings["AccountName"],
        settings["AccountKey"],
        ResourceTypes(service=True, container=True, object=True),
        AccountSasPermissions(read=True, write=True, create=True, list=True, add=True, delete=True),
        expiry=datetime.now(UTC) + timedelta(hours=1),
    )
    return sas, settings["BlobEndpoint"].rstrip("/")


def found(secrets: dict[str, str], where: str, text: str) -> list[str]:
    return [f"{name} in {where}" for name, value in secrets.items() if value in text]


def test_secrets_stay_out_of_logs_and_run_records(
    monkeypatch, caplog, capfd, tmp_path, settings, kafka, mongo, unique
):
    sas, account_url = azurite_sas()
    signature = unquote(dict(p.split("=", 1) for p in sas.split("&"))["sig"])
    secrets = {
        "KAFKA_SASL_PASSWORD": f"sasl-secret-{unique}-Kx7",
        "AZURE_STORAGE_SAS": sas,
        "SAS signature": signature,
        "SAS signature (URL-encoded)": dict(p.split("=", 1) for p in sas.split("&"))["sig"],
    }
    environment = {
        "KAFKA_BOOTSTRAP_SERVERS": stack_setting("KAFKA_BOOTSTRAP_SERVERS"),
        "SNAPMAP_CONSUMER_GROUP": kafka.consumer_group,
        "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "",
        "KAFKA_SASL_USERNAME": f"sasl-user-{unique}",
        "KAFKA_SASL_PASSWORD": secrets["KAFKA_SASL_PASSWORD"],
        "KAFKA_SSL_CA_LOCATION": "",
        "MONGODB_URI": stack_setting("MONGODB_URI"),
        "MONGODB_DATABASE": mongo.database,
        "MONGODB_WRITE_CONCERN": "1",
        "AZURE_STORAGE_CONNECTION_STRING": "",
        "AZURE_STORAGE_ACCOUNT_URL": account_url,
        "AZURE_STORAGE_SAS": sas,
        "SNAPMAP_UPLOADS_TOPIC": settings.uploads_topic,
        "SNAPMAP_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
        "SNAPMAP_EVENT_UPDATES_TOPIC": settings.event_updates_topic,
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    caplog.set_level("DEBUG")

    values = [
        upload(f"sec-{i}", f"2026-10-10T10:0{i}:00Z", 139.6917, 35.6895 + i * 1e-5)
        for i in range(5)
    ]
    publish(kafka, settings.uploads_topic, [*values, b"{not json"], partition=0)
    resources = production_resources()
    home = tmp_path / "dagster"
    home.mkdir()
    with instance_for_test(temp_dir=str(home)) as instance:
        with build_sensor_context(instance=instance, resources=resources) as context:
            result = photo_uploads_sensor(context)
        (request,) = result.run_requests
        job = build_definitions(resources).resolve_job_def(INGEST_JOB_NAME)
        run = job.execute_in_process(
            run_config=request.run_config, instance=instance, tags=request.tags
        )
        assert run.success

        record = instance.get_run_by_id(run.run_id)
        places = {
            "sensor result": json.dumps([request.run_config, request.tags, result.cursor]),
            "run config": json.dumps(record.run_config),
            "run tags": json.dumps(record.tags),
            "job snapshot": serialize_value(instance.get_job_snapshot(record.job_snapshot_id)),
            "execution plan": serialize_value(
                instance.get_execution_plan_snapshot(record.execution_plan_snapshot_id)
            ),
            "event log": "\n".join(serialize_value(e) for e in instance.all_logs(run.run_id)),
        }
        event_log_size = len(places["event log"])

    captured = capfd.readouterr()
    places["captured stdout"] = captured.out
    places["captured stderr"] = captured.err
    # Every logger at DEBUG, urllib3's request lines (which carry the SAS query) included.
    places["log records"] = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    for path in sorted(p for p in Path(home).rglob("*") if p.is_file()):
        places[f"instance file {path.relative_to(home)}"] = path.read_bytes().decode(
            "utf-8", errors="replace"
        )

    leaks = [leak for where, text in places.items() for leak in found(secrets, where, text)]
    assert leaks == []
    # The scan looked at real content: the run's own log lines are there.
    assert event_log_size > 10_000
    assert "dead-lettered" in places["event log"]

    # The SAS was really used: the manifests were written through it.
    blob = BlobStorageResource(account_url=account_url, sas_token=sas)
    db = mongo.db()
    assert db.events.count_documents({"manifestPending": True}) == 0
    with blob.service() as client:
        container = client.get_container_client(blob.manifest_container)
        for event_id in live_events(db):
            container.delete_blob(f"{event_id}.json")  # the shared container stays clean
    assert_end_state(kafka, db, blob, settings)


MANIFEST = {"eventId": "event-1", "version": 1, "photos": []}


def test_debug_logs_of_blob_calls_carry_no_signature_or_account_key(caplog, capfd, unique):
    """Every logger at DEBUG (urllib3 prints each request line with its query) while the Blob
    resource writes, reads and checks blobs through a SAS, then through the account key; and
    pipeline lines that mention a connection string or a SAS URL. No signature or key may be
    in any captured record, formatted line or stream."""
    sas, account_url = azurite_sas()
    raw_signature = dict(p.split("=", 1) for p in sas.split("&"))["sig"]
    connection_string = stack_setting("AZURE_STORAGE_CONNECTION_STRING")
    account_key = dict(p.split("=", 1) for p in connection_string.split(";") if "=" in p)[
        "AccountKey"
    ]
    secrets = {
        "SAS signature": unquote(raw_signature),
        "SAS signature (URL-encoded)": raw_signature,
        "account key": account_key,
    }
    root = logging.getLogger()
    printed = logging.StreamHandler()  # to stderr, as a deployment's console handler would
    printed.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root.addHandler(printed)
    caplog.set_level("DEBUG")
    try:
        container = f"secrets-{unique}"
        with_sas = BlobStorageResource(
            account_url=account_url, sas_token=sas, manifest_container=container
        )
        with with_sas.service() as client:
            with_sas.ensure_container(client)
            assert with_sas.put_manifest(client, "event-1", MANIFEST)
            url = f"azure://{container}/event-1.json"
            assert with_sas.blob_status(client, url).status == "present"
            assert with_sas.blob_status(client, f"azure://{container}/gone.jpg").status == "missing"
        with_key = BlobStorageResource(
            connection_string=connection_string, manifest_container=container
        )
        with with_key.service() as client:
            assert not with_key.put_manifest(client, "event-1", MANIFEST)
            client.delete_container(container)
        pipeline = logging.getLogger("snapmap_pipeline.resources.blob")
        pipeline.debug("connecting with %s", connection_string)
        pipeline.info("request to %s/%s/event-1.json?%s", account_url, container, sas)
        try:
            raise ConnectionError(f"GET {account_url}/{container}?{sas} failed")
        except ConnectionError:
            pipeline.exception("manifest write failed")
    finally:
        root.removeHandler(printed)

    captured = capfd.readouterr()
    places = {
        "log records": "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records),
        "formatted log": caplog.text,
        "stderr": captured.err,
        "stdout": captured.out,
    }
    leaks = [leak for where, text in places.items() for leak in found(secrets, where, text)]
    assert leaks == []
    # The scan saw the lines that used to carry the secrets, with the secret replaced.
    requests = [r.getMessage() for r in caplog.records if r.name == "urllib3.connectionpool"]
    assert len(requests) >= 6, requests
    assert all("sig=REDACTED" in line for line in requests if "sig=" in line)
    assert any("sig=REDACTED" in line for line in requests)
    assert "AccountKey=REDACTED" in places["formatted log"]
    assert "sig=REDACTED" in captured.err
