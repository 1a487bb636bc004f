"""Indexed blob lookups for the local stack's Azurite 3.35.0.

Azurite keeps blob metadata in LokiJS, whose ``find``/``findOne`` use an index only for the
first property of a filter object. Azurite 3.35.0 writes its lookups of one blob as
``{accountName, containerName, name, ...}``: every blob of the stack's single account shares
``accountName``, so each upload, read or properties call scans every blob the emulator holds.
Its cost per request grows with the number of blobs (8 ms of Azurite CPU per upload at 500
blobs, 21 ms at 10,000; near 35,000, during a 100,000-photo backfill, uploads slowed to 10 per
second with Azurite at 100 % of a core; see BENCHMARKS.md), which makes writing n manifests
quadratic on the local stack, unlike the real service.

Azurite 3.36.0 puts the name first, but it requires Node.js 21 or newer, and the machines this
stack targets have Node.js 20. So the stack keeps 3.35.0 and, after ``npm ci``, rewrites the
installed copy's ten ``find``/``findOne`` lookups of one blob (or of one blob's blocks) to
name the blob first. Not rewritten, because the pipeline does not use them: the ``count`` and
``findAndRemove`` filters of deleting a blob and of committing a block list still start with
``accountName`` and still scan. The filter
keeps the same properties and values, so Loki returns the same documents; only the index it
starts from changes. The rewrite checks the file's digest before and after, so another
Azurite version is refused loudly instead of being patched blindly.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

STORE = Path("node_modules/azurite/dist/src/blob/persistence/LokiBlobMetadataStore.js")
ORIGINAL_SHA256 = "53687005055d42a4ecbe4f4df13a4fce4ed5051b3d3c7fdba94e5dc5ed1a1951"
# Ten lookups of one blob or of one blob's blocks start with accountName, containerName.
LOOKUPS = 10

# `.findOne({` or `.find({`, then accountName and containerName, then the blob's own key.
_LOOKUP = re.compile(
    r"(?P<open>\.(?:findOne|find)\(\{\n)"
    r"(?P<account>[ ]+accountName: [^,\n]+,\n)"
    r"(?P<container>[ ]+containerName: [^,\n]+,?\n)"
    r"(?P<own>[ ]+(?:name|blobName): [^,\n]+)(?P<comma>,?)\n"
)


class LookupOrderError(Exception):
    """The installed Azurite is not the file this rewrite was written for."""


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _name_first(match: re.Match[str]) -> str:
    own = match["own"] + ",\n"
    container = match["container"].rstrip("\n").rstrip(",")
    # The last property keeps the original's trailing comma (or its absence).
    return match["open"] + own + match["account"] + container + match["comma"] + "\n"


def reorder(text: str) -> tuple[str, int]:
    """The store's source with its single-blob lookups naming the blob first, and how many
    lookups were rewritten."""
    return _LOOKUP.subn(_name_first, text)


def apply(install_dir: Path) -> None:
    """Rewrite the store of a fresh ``npm ci`` in place. Raises ``LookupOrderError`` when the
    file is not 3.35.0's."""
    path = install_dir / STORE
    text = path.read_text()
    digest = _digest(text)
    if digest != ORIGINAL_SHA256:
        raise LookupOrderError(
            f"{path} is not Azurite 3.35.0's (sha256 {digest}); the lookup-order rewrite in "
            f"{Path(__file__).name} was written for that file only: check whether the new "
            "version still needs it before updating ORIGINAL_SHA256"
        )
    rewritten, count = reorder(text)
    if count != LOOKUPS:
        raise LookupOrderError(f"{path}: expected {LOOKUPS} lookups to rewrite, found {count}")
    path.write_text(rewritten)
