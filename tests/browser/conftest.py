"""A Dagster webserver of the test's own, on 127.0.0.1, over the test's own instance, topics and
database, and a headless Chromium (Debian's) to drive it.

The webserver and the test share one ``DAGSTER_HOME`` whose ``dagster.yaml`` points at the
test's PostgreSQL database, so runs the test executes in process show up in the UI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dagster import DagsterInstance

from snapmap_pipeline.resources.blob import BlobStorageResource
from snapmap_pipeline.resources.kafka import KafkaResource
from snapmap_pipeline.resources.mongo import MongoResource
from snapmap_pipeline.settings import PipelineSettings
from tests.conftest import ROOT
from tests.integration.conftest import *  # noqa: F403

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
READY_TIMEOUT_S = 90.0

INSTANCE_YAML = """\
storage:
  postgres:
    postgres_url:
      env: DAGSTER_POSTGRES_URL
telemetry:
  enabled: false
nux:
  enabled: false
"""


@pytest.fixture
def dagster_home(tmp_path: Path, dagster_postgres_url: str, monkeypatch) -> Path:
    """A ``DAGSTER_HOME`` on the test's PostgreSQL database (the URL stays in the environment)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(INSTANCE_YAML)
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", dagster_postgres_url)
    return home


@pytest.fixture
def dagster_instance(dagster_home: Path) -> Iterator[DagsterInstance]:
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        yield instance


@pytest.fixture
def code_location_env(
    dagster_home: Path,
    dagster_postgres_url: str,
    kafka: KafkaResource,
    mongo: MongoResource,
    blob: BlobStorageResource,
    settings: PipelineSettings,
) -> dict[str, str]:
    """Every variable the code location wires through ``EnvVar`` (see scripts/env.sh), pointing
    at the test's topics, consumer group and database."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(dagster_home)),
        "DAGSTER_HOME": str(dagster_home),
        "DAGSTER_POSTGRES_URL": dagster_postgres_url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "SNAPMAP_CONSUMER_GROUP": kafka.consumer_group,
        "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "",
        "KAFKA_SASL_USERNAME": "",
        "KAFKA_SASL_PASSWORD": "",
        "KAFKA_SSL_CA_LOCATION": "",
        "SNAPMAP_UPLOADS_TOPIC": settings.uploads_topic,
        "SNAPMAP_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
        "SNAPMAP_EVENT_UPDATES_TOPIC": settings.event_updates_topic,
        "MONGODB_URI": mongo.uri,
        "MONGODB_DATABASE": mongo.database,
        "MONGODB_WRITE_CONCERN": "1",
        "AZURE_STORAGE_CONNECTION_STRING": blob.connection_string,
        "AZURE_STORAGE_ACCOUNT_URL": "",
        "AZURE_STORAGE_SAS": "",
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Webserver:
    """A ``dagster-webserver`` process this test started, in a process group of its own."""

    process: subprocess.Popen
    url: str
    log: Path

    def wait_until_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until the server answers and the code location is loaded (GraphQL says so)."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"dagster-webserver exited: {self.log_tail()}")
            try:
                entries = self._location_entries()
            except (urllib.error.URLError, OSError, ValueError) as error:
                last = str(error)
            else:
                last = json.dumps(entries)[:1000]
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    kinds = {e["locationOrLoadError"]["__typename"] for e in entries}
                    if kinds != {"RepositoryLocation"}:
                        raise AssertionError(f"code location failed to load: {last}")
                    return
            time.sleep(0.5)
        raise AssertionError(f"webserver not ready in {timeout_s:g} s: {last}")

    def _location_entries(self) -> list[dict]:
        query = (
            "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
            "locationOrLoadError { __typename } } } } }"
        )
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": query}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            body = json.load(answer)
        return body["data"]["workspaceOrError"].get("locationEntries") or []

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the group this test started (the server and its code server), then
        SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


@pytest.fixture
def webserver(
    dagster_instance: DagsterInstance, code_location_env: dict[str, str], tmp_path: Path
) -> Iterator[Webserver]:
    """Started once the instance has created its tables (two processes creating them at once
    can collide), and not waited for: the test prepares its data while the code loads."""
    port = free_port()
    log = tmp_path / "webserver.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                str(ROOT / ".venv" / "bin" / "dagster-webserver"),
                *("-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"),
            ],
            cwd=ROOT,
            env=code_location_env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Webserver(process, f"http://127.0.0.1:{port}", log)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser_page(tmp_path: Path):
    """A page of a fresh headless Chromium profile (Debian's browser, no download)."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/run-tests does)")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1440, "height": 900},
        )
        try:
            context.set_default_timeout(20_000)
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
