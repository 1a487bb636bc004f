"""The one place where a photo's ``storageUrl`` is parsed.

Accepted forms (anything else is rejected with a reason, and the pipeline never fetches an
arbitrary URL):

- ``azure://CONTAINER/PATH`` (account implied: the configured one);
- ``https://ACCOUNT.blob.core.windows.net/CONTAINER/PATH`` for the configured account only;
- the configured emulator endpoint in path style, e.g.
  ``http://127.0.0.1:30000/devstoreaccount1/CONTAINER/PATH`` (Azurite).

Container names follow Azure's rules (3-63 characters of lowercase letters, digits and single
dashes, starting and ending with a letter or digit), even against Azurite, which is laxer than
the real service. Blob paths may not hold ``.``/``..`` segments, empty segments, backslashes,
control characters, percent-escapes, queries (SAS tokens) or fragments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048
MAX_BLOB_NAME_LENGTH = 1024

_CONTAINER = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")
_BLOB_CHARS = re.compile(r"^[A-Za-z0-9!$&'()*+,;=:@._~/ -]+$")
_PUBLIC_SUFFIX = ".blob.core.windows.net"


class StorageUrlError(ValueError):
    """A storageUrl outside the accepted forms; the message says which rule it broke."""


@dataclass(frozen=True)
class BlobLocation:
    """Where a photo (or a manifest) lives in Blob Storage."""

    container: str
    blob_name: str

    @property
    def canonical_url(self) -> str:
        return f"azure://{self.container}/{self.blob_name}"


@dataclass(frozen=True)
class StorageUrlPolicy:
    """Which account a storageUrl may name.

    ``account_name`` is the configured storage account; ``emulator_endpoint`` (for example
    ``http://127.0.0.1:30000/devstoreaccount1``) is accepted in path style when set.
    """

    account_name: str | None = None
    emulator_endpoint: str | None = None

    def parse(self, url: object) -> BlobLocation:
        """Return the container and blob name of ``url`` or raise ``StorageUrlError``."""
        if not isinstance(url, str):
            raise StorageUrlError(f"storageUrl must be a string, not {type(url).__name__}")
        if not url or len(url) > MAX_URL_LENGTH:
            raise StorageUrlError(f"storageUrl must have 1 to {MAX_URL_LENGTH} characters")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
            raise StorageUrlError("storageUrl contains control characters")

        if url.startswith("azure://"):
            container, _, blob = url[len("azure://") :].partition("/")
            return _location(container, blob)

        parts = urlsplit(url)
        if parts.query or parts.fragment or "?" in url or "#" in url:
            raise StorageUrlError("storageUrl may not carry a query (SAS token) or fragment")
        if parts.username or parts.password:
            raise StorageUrlError("storageUrl may not carry credentials")

        if parts.scheme == "https" and (parts.hostname or "").endswith(_PUBLIC_SUFFIX):
            account = parts.hostname[: -len(_PUBLIC_SUFFIX)]
            if not _ACCOUNT.match(account):
                raise StorageUrlError(f"storageUrl names an invalid account {account!r}")
            if self.account_name is None or account != self.account_name:
                raise StorageUrlError(f"storageUrl names another storage account {account!r}")
            if parts.port not in (None, 443):
                raise StorageUrlError("storageUrl names a non-standard port")
            container, _, blob = parts.path.lstrip("/").partition("/")
            return _location(container, blob)

        if self.emulator_endpoint:
            prefix = self.emulator_endpoint.rstrip("/") + "/"
            if url.startswith(prefix):
                container, _, blob = url[len(prefix) :].partition("/")
                return _location(container, blob)

        scheme = parts.scheme or "none"
        raise StorageUrlError(
            f"storageUrl scheme or host not allowed ({scheme}://{parts.hostname or ''}): use "
            "azure://container/path or the configured account's blob endpoint"
        )


def _location(container: str, blob: str) -> BlobLocation:
    if not _CONTAINER.match(container):
        raise StorageUrlError(
            f"invalid container name {container[:70]!r}: 3-63 lowercase letters, digits and "
            "single dashes"
        )
    if not blob:
        raise StorageUrlError("storageUrl has no blob path after the container")
    if len(blob) > MAX_BLOB_NAME_LENGTH:
        raise StorageUrlError(f"blob path longer than {MAX_BLOB_NAME_LENGTH} characters")
    if "%" in blob:
        raise StorageUrlError("blob path may not contain percent-escapes")
    if "\\" in blob or not _BLOB_CHARS.match(blob):
        raise StorageUrlError("blob path contains characters outside the allowed set")
    segments = blob.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise StorageUrlError("blob path may not contain empty, '.' or '..' segments")
    return BlobLocation(container=container, blob_name=blob)
