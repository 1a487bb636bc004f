"""Azure Blob Storage resource: event manifests and photo existence checks.

Built on ``azure-storage-blob`` directly rather than ``dagster-azure``'s resource: that one has
no connection-string form (what Azurite and many deployments use), no timeouts or retry
settings, and its package pulls in azure-ai-ml and dozens of other packages. See
docs/blob-storage.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.storage.blob import BlobServiceClient, ContentSettings, ExponentialRetry
from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field

from snapmap_pipeline.contract.storage_url import StorageUrlPolicy

MANIFEST_CONTAINER = "event-manifests"

# What must never reach a log line: a SAS token's signature (in request URLs and SAS strings)
# and the account key or SAS of a connection string. The rest of a SAS (version, expiry,
# permissions) is kept: it tells an operator which token was used.
_SECRETS = re.compile(r"(?i)\b(sig|AccountKey|SharedAccessSignature)=([^&;\s'\"]+)")
REDACTED = "REDACTED"
_redaction_lock = threading.Lock()
_redaction_installed = False


def redact(text: str) -> str:
    """``text`` with every SAS signature and account key replaced by ``REDACTED``."""
    return _SECRETS.sub(lambda m: f"{m.group(1)}={REDACTED}", text)


def install_secret_redaction() -> None:
    """Make every log record of this process free of storage secrets, whatever its logger
    (urllib3's DEBUG request lines carry the SAS query) and whatever handler formats it.

    Done in the record factory, not as a filter on one logger: a logger's filters do not see
    records propagated from its children, and handlers are added by Dagster, pytest or the
    deployment. Only records that mention a secret are rewritten. Idempotent."""
    global _redaction_installed
    with _redaction_lock:
        if _redaction_installed:
            return
        make_record = logging.getLogRecordFactory()

        def redacting_factory(*args, **kwargs) -> logging.LogRecord:
            return _redacted(make_record(*args, **kwargs))

        logging.setLogRecordFactory(redacting_factory)
        _redaction_installed = True


def _redacted(record: logging.LogRecord) -> logging.LogRecord:
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed call is the logging module's to report
        return record
    if _SECRETS.search(message):
        record.msg, record.args = redact(message), None
    if record.exc_info and record.exc_info[1] is not None:
        if _SECRETS.search(str(record.exc_info[1])):
            formatted = logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, redact(formatted)
    return record


def encode_manifest(manifest: dict) -> tuple[bytes, str]:
    """A manifest's bytes (compact JSON, sorted keys) and their SHA-256 as hex: the same
    content always gives the same bytes and digest."""
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str).encode()
    return body, hashlib.sha256(body).hexdigest()


class BlobConfigError(ValueError):
    """The Blob Storage settings cannot work; raised at start, not per photo."""


@dataclass(frozen=True)
class BlobStatus:
    """Outcome of one existence check: ``present``, ``missing`` or ``error`` (auth, throttling,
    outage: never reported as missing). ``sha256``: the blob's ``sha256`` metadata when it is
    present (manifests carry it, photos need not)."""

    url: str
    status: str
    detail: str = ""
    sha256: str | None = None


class BlobStorageResource(ConfigurableResource):
    """Either ``connection_string`` (Azurite, or an account key), or ``account_url`` with a SAS
    token or, when neither secret is set, ``DefaultAzureCredential`` (managed identity)."""

    connection_string: str | None = Field(
        default=None, description="Secret (EnvVar AZURE_STORAGE_CONNECTION_STRING)."
    )
    account_url: str | None = Field(
        default=None, description="https://ACCOUNT.blob.core.windows.net (with a credential)."
    )
    sas_token: str | None = Field(default=None, description="Secret (EnvVar AZURE_STORAGE_SAS).")
    manifest_container: str = Field(default=MANIFEST_CONTAINER)
    timeout_s: int = Field(default=20, description="Read timeout of each request, seconds.")
    connect_timeout_s: int = Field(
        default=5, description="Connection timeout of each request, seconds."
    )
    retries: int = Field(
        default=2,
        description="SDK retries of a request (throttling, 5xx answers, refused connections).",
    )
    retry_backoff_s: float = Field(
        default=0.5,
        description=(
            "Wait before the first retry; retry n waits this plus 2^n s. With the defaults a "
            "request to an unreachable service gives up after about 3 s, not 80 s."
        ),
    )

    def setup_for_execution(self, context: InitResourceContext) -> None:
        """Refuse a connection string the SDK cannot use when the run starts, so a bad setting
        fails every run at once with one clear error instead of photo by photo."""
        self._settings()

    def _retry_policy(self) -> ExponentialRetry:
        """The SDK's exponential retry with small waits: its defaults (15 s, then 15 + 3^n s)
        hold every call about 80 s while the service is down."""
        return ExponentialRetry(
            initial_backoff=self.retry_backoff_s,
            increment_base=2,
            retry_total=self.retries,
            random_jitter_range=self.retry_backoff_s / 2,
        )

    def _settings(self) -> dict[str, str]:
        if not self.connection_string:
            return {}
        if self.connection_string.strip().rstrip(";") == "UseDevelopmentStorage=true":
            raise BlobConfigError(
                "AZURE_STORAGE_CONNECTION_STRING=UseDevelopmentStorage=true is not understood by "
                "the Python SDK; give the explicit Azurite string (see `scripts/stack env`)"
            )
        pairs = (part.split("=", 1) for part in self.connection_string.split(";") if "=" in part)
        return {key: value for key, value in pairs}

    def url_policy(self) -> StorageUrlPolicy:
        """Which storageUrls this account accepts (see contract/storage_url.py)."""
        settings = self._settings()
        account = settings.get("AccountName")
        endpoint = settings.get("BlobEndpoint")
        if self.account_url:
            host = self.account_url.split("//", 1)[-1].split("/", 1)[0]
            account = host.split(".", 1)[0]
        is_emulator = endpoint is not None and ".blob.core.windows.net" not in endpoint
        return StorageUrlPolicy(
            account_name=account, emulator_endpoint=endpoint if is_emulator else None
        )

    @contextmanager
    def service(self, **client_options: Any) -> Iterator[BlobServiceClient]:
        """A client with this resource's timeouts and retries, closed on exit.
        ``client_options`` go to the SDK client as well (for example ``raw_request_hook``, a
        callback on every request sent)."""
        install_secret_redaction()
        options = {
            "connection_timeout": self.connect_timeout_s,
            "read_timeout": self.timeout_s,
            "retry_policy": self._retry_policy(),
            **client_options,
        }
        if self.connection_string:
            self._settings()
            client = BlobServiceClient.from_connection_string(self.connection_string, **options)
        elif self.account_url:
            credential: object = self.sas_token
            if not credential:
                try:
                    from azure.identity import DefaultAzureCredential
                except ImportError as missing:
                    raise BlobConfigError(
                        "no SAS token and azure-identity is not installed for a managed identity"
                    ) from missing
                credential = DefaultAzureCredential()
            client = BlobServiceClient(self.account_url, credential=credential, **options)
        else:
            raise BlobConfigError(
                "set AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT_URL"
            )
        try:
            yield client
        finally:
            client.close()

    def put_manifest(self, client: BlobServiceClient, event_id: str, manifest: dict) -> bool:
        """Write ``event-manifests/EVENT_ID.json``; returns False when the same content is
        already there (idempotent: same content, same blob, no new write).

        Two requests: the blob's properties (its ``sha256`` metadata), then the upload. A
        caller that records the digest it wrote (the outbox keeps it on the event) compares
        with that instead and calls ``upload_manifest``: one request."""
        body, digest = encode_manifest(manifest)
        blob = client.get_blob_client(self.manifest_container, f"{event_id}.json")
        try:
            if blob.get_blob_properties().metadata.get("sha256") == digest:
                return False
        except ResourceNotFoundError:
            pass
        self.upload_manifest(client, event_id, body, digest)
        return True

    def upload_manifest(
        self, client: BlobServiceClient, event_id: str, body: bytes, digest: str
    ) -> None:
        """Write ``event-manifests/EVENT_ID.json`` unconditionally, in one request (three the
        first time, when the container is missing); ``digest`` (``encode_manifest``) goes into
        the blob's ``sha256`` metadata."""
        blob = client.get_blob_client(self.manifest_container, f"{event_id}.json")
        options = {
            "overwrite": True,
            "metadata": {"sha256": digest},
            "content_settings": ContentSettings(content_type="application/json"),
        }
        try:
            blob.upload_blob(body, **options)
        except ResourceNotFoundError:
            self.ensure_container(client)
            blob.upload_blob(body, **options)

    def ensure_container(self, client: BlobServiceClient) -> None:
        try:
            client.create_container(self.manifest_container)
        except ResourceExistsError:
            pass

    def blob_status(self, client: BlobServiceClient, url: str) -> BlobStatus:
        """Whether the photo behind ``url`` exists. 404 (blob or container) is ``missing``;
        403 and other failures are ``error`` and never counted as missing (cases.md #40, #41)."""
        location = self.url_policy().parse(url)
        return _status(client, location.container, location.blob_name, url)

    def manifest_status(self, client: BlobServiceClient, event_id: str) -> BlobStatus:
        """Whether ``event-manifests/EVENT_ID.json`` exists, with its ``sha256`` metadata; the
        same outcomes as ``blob_status``, in one request."""
        name = f"{event_id}.json"
        return _status(client, self.manifest_container, name, f"{self.manifest_container}/{name}")


def _status(client: BlobServiceClient, container: str, name: str, url: str) -> BlobStatus:
    blob = client.get_blob_client(container, name)
    try:
        properties = blob.get_blob_properties()
    except ResourceNotFoundError:
        return BlobStatus(url, "missing")
    except ClientAuthenticationError as error:
        return BlobStatus(url, "error", f"authentication failed: {error.reason}")
    except HttpResponseError as error:
        return BlobStatus(url, "error", f"HTTP {error.status_code}: {error.reason}")
    return BlobStatus(url, "present", sha256=(properties.metadata or {}).get("sha256"))
