"""cases.md #40: a missing blob, a missing container and a 503 on ``get_blob_properties``.

The case's uploads go through Kafka and real runs; the sweeper's ``storage_urls_exist`` check
then asks Blob Storage about each photo's blob. Its requests pass through a small HTTP proxy in
front of Azurite (a real server on 127.0.0.1, no mock of the SDK) that answers 503 Server Busy
for chosen blobs: always for one, for the first two requests of another. A 404 (blob or
container) is recorded on the photo as ``blobStatus: "missing"``; a 503 is retried by the
resource's retry policy with backoff and never counted as missing; every photo keeps its event,
and no run fails.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from dagster import AssetCheckSeverity, instance_for_test

from snapmap_pipeline.definitions import build_definitions
from snapmap_pipeline.jobs import SWEEPER_JOB_NAME
from snapmap_pipeline.resources.blob import BlobStorageResource
from tests.integration.pipeline import Harness, photo_events, publish, upload
from tests.integration.sweeper_data import evaluations

pytestmark = [pytest.mark.storage, pytest.mark.sweeper]

BUSY_BODY = (
    b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code>'
    b"<Message>The server is busy.</Message></Error>"
)
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


class BusyProxy(ThreadingHTTPServer):
    """Forwards every request to Azurite, except that a path in ``busy`` is answered 503 as
    many times as its count says (None: always). Records each request's time by path."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.busy: dict[str, int | None] = {}
        self.seen: dict[str, list[float]] = defaultdict(list)
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def answer_busy(self, path: str) -> bool:
        with self.lock:
            self.seen[path].append(time.monotonic())
            if path not in self.busy:
                return False
            left = self.busy[path]
            if left is None:
                return True
            if left > 0:
                self.busy[path] = left - 1
                return True
            return False


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: BusyProxy

    def _forward(self) -> None:
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.server.answer_busy(path):
            self.send_response(503, "Server Busy")
            self.send_header("x-ms-error-code", "ServerBusy")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(BUSY_BODY)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(BUSY_BODY)
            return
        host, port = self.server.upstream
        upstream = http.client.HTTPConnection(host, port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            headers["Host"] = f"{host}:{port}"
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            payload = answer.read()
            self.send_response(answer.status, answer.reason)
            for key, value in answer.getheaders():
                if key.lower() not in HOP_HEADERS:
                    self.send_header(key, value)
            declared = answer.getheader("Content-Length")
            size = declared if self.command == "HEAD" and declared else str(len(payload))
            self.send_header("Content-Length", size)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
        finally:
            upstream.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass


@pytest.fixture
def busy_proxy(blob: BlobStorageResource) -> Iterator[BusyProxy]:
    endpoint = next(
        part.split("=", 1)[1]
        for part in blob.connection_string.split(";")
        if part.startswith("BlobEndpoint=")
    )
    proxy = BusyProxy(endpoint)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()


@pytest.fixture
def bucket(blob: BlobStorageResource, unique: str) -> Iterator[str]:
    """The case's container ``bucket``, without ``missing.jpg``; removed afterwards if this
    test made it, else only this test's blobs (named ``*-UNIQUE.jpg``) are."""
    with blob.service() as client:
        container = client.get_container_client("bucket")
        try:
            container.create_container()
            made = True
        except ResourceExistsError:
            made = False
        try:
            container.delete_blob("missing.jpg")
        except ResourceNotFoundError:
            pass
    yield "bucket"
    with blob.service() as client:
        container = client.get_container_client("bucket")
        if made:
            container.delete_container()
            return
        for item in container.list_blobs():
            if item.name.endswith(f"-{unique}.jpg"):
                container.delete_blob(item.name)


def test_missing_blob_and_container_are_recorded_and_503_is_retried_not_missing(
    resources, settings, kafka, mongo, blob, busy_proxy, bucket, unique
):
    """Seen failing with ``blob_status`` catching ``HttpResponseError`` as missing (the broad
    catch of the case): the busy photo is then marked missing."""
    busy_blob, flaky_blob = f"busy-{unique}.jpg", f"flaky-{unique}.jpg"
    with blob.service() as client:
        for name in (busy_blob, flaky_blob):
            client.get_blob_client(bucket, name).upload_blob(b"jpeg", overwrite=True)
    taken = "2026-01-17T13:20:00Z"
    values = [
        upload("gone", taken, 81.772379, 25.4301623, storageUrl=f"azure://{bucket}/missing.jpg"),
        upload(
            "no-container",
            taken,
            81.77238,
            25.4301623,
            storageUrl=f"azure://nothing-{unique}/a.jpg",
        ),
        upload("busy", taken, 81.772381, 25.4301623, storageUrl=f"azure://{bucket}/{busy_blob}"),
        upload("flaky", taken, 81.772382, 25.4301623, storageUrl=f"azure://{bucket}/{flaky_blob}"),
    ]
    publish(kafka, settings.uploads_topic, values, partition=0)
    db = mongo.db()
    account = "devstoreaccount1"
    busy_proxy.busy = {
        f"/{account}/{bucket}/{busy_blob}": None,
        f"/{account}/{bucket}/{flaky_blob}": 2,
    }
    proxied = BlobStorageResource(
        connection_string=blob.connection_string.replace(
            "{}:{}".format(*busy_proxy.upstream), f"127.0.0.1:{busy_proxy.port}"
        ),
        manifest_container=blob.manifest_container,
    )

    with instance_for_test() as instance:
        assert Harness(instance, resources).drain()
        clustered = photo_events(db)
        assert set(clustered) == {"gone", "no-container", "busy", "flaky"}
        assert None not in clustered.values(), "a photo without its blob still clusters"

        sweeper = build_definitions({**resources, "blob": proxied}).resolve_job_def(
            SWEEPER_JOB_NAME
        )
        result = sweeper.execute_in_process(instance=instance)
        assert result.success, "no storage answer fails the sweeper run"
        check = evaluations(result)["storage_urls_exist"]

    assert not check.passed
    assert check.severity == AssetCheckSeverity.WARN
    assert sorted(check.metadata["missing_examples"].value) == ["gone", "no-container"]
    assert check.metadata["present"].value == 1  # flaky, after two 503s
    assert check.metadata["errors"].value == 1  # busy: 503 after every retry
    (error,) = check.metadata["error_examples"].value
    assert error.startswith("busy: HTTP 503")
    assert check.metadata["storage_unreachable"].value is False
    status = {d["_id"]: d.get("blobStatus") for d in db.photos.find({}, {"blobStatus": 1})}
    assert status == {"gone": "missing", "no-container": "missing", "busy": None, "flaky": None}
    assert photo_events(db) == clustered, "the storage check changes no event"

    for path in busy_proxy.busy:
        times = busy_proxy.seen[path]
        assert len(times) == 1 + proxied.retries, (path, times)
        waits = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
        assert all(wait >= proxied.retry_backoff_s / 2 for wait in waits), (path, waits)
