"""The local stack's rewrite of Azurite 3.35.0's blob lookups (localstack/azurite/lookup_order.py):
each lookup of one blob names the blob first, so that LokiJS starts from the name's index
instead of scanning every blob of the account, and keeps the same properties and values.

What this proves: the rewrite moves exactly the blob's own key to the front of the lookups
written the way 3.35.0 writes them, keeps every property and the object's syntax, leaves other
filters alone, and refuses a file that is not 3.35.0's; the stack's installed copy has been
rewritten. That the rewritten emulator still answers as before is
tests/integration/test_azurite_lookups.py; that lookups no longer slow down as blobs accumulate
is a speed figure, in BENCHMARKS.md (`bench.pipeline.blob_growth`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


lookup_order = _load("azurite_lookup_order", ROOT / "localstack" / "azurite" / "lookup_order.py")

# The two shapes 3.35.0 uses: a blob by name and snapshot, and a blob's blocks, one nested
# deeper; then a container lookup and a listing, which must stay as they are.
SOURCE = """\
        const blobDoc = coll.findOne({
            accountName: blob.accountName,
            containerName: blob.containerName,
            name: blob.name,
            snapshot: blob.snapshot
        });
            const existBlockDoc = coll.findOne({
                accountName: block.accountName,
                containerName: block.containerName,
                blobName: block.blobName
            });
        const doc = coll.findOne({ accountName: account, name: container });
        const docs = coll.find({
            accountName: account,
            containerName: container
        });
"""


def _properties(block: str) -> list[str]:
    return re.findall(r"^\s+(\w+): ", block, re.M)


def _entries(literal: str) -> list[str]:
    """The literal's "key: value" lines, commas and indentation dropped, sorted."""
    return sorted(line.strip().rstrip(",") for line in literal.splitlines()[1:-1])


def _literals(text: str) -> list[str]:
    return re.findall(r"\.find(?:One)?\(\{.*?\}\)", text, re.S)


def test_lookups_name_the_blob_first_and_keep_their_properties() -> None:
    rewritten, count = lookup_order.reorder(SOURCE)

    assert count == 2
    before, after = _literals(SOURCE), _literals(rewritten)
    assert len(before) == len(after) == 4
    assert _properties(after[0]) == ["name", "accountName", "containerName", "snapshot"]
    assert _properties(after[1]) == ["blobName", "accountName", "containerName"]
    for old, new in zip(before, after, strict=True):
        assert _entries(old) == _entries(new)
    # The last property of each literal has no trailing comma, the others have one.
    for literal in after[:2]:
        lines = literal.splitlines()[1:-1]
        assert all(line.endswith(",") for line in lines[:-1])
        assert not lines[-1].endswith(",")
    assert after[2:] == before[2:]


def test_a_file_other_than_3_35_0s_is_refused_and_left_alone(tmp_path: Path) -> None:
    store = tmp_path / lookup_order.STORE
    store.parent.mkdir(parents=True)
    store.write_text(SOURCE)

    with pytest.raises(lookup_order.LookupOrderError, match="not Azurite 3.35.0's"):
        lookup_order.apply(tmp_path)
    assert store.read_text() == SOURCE


def test_the_stacks_azurite_is_rewritten() -> None:
    stack = _load("snapmap_stack_for_azurite", ROOT / "localstack" / "stack.py")
    installed = stack.Config.from_env(dict(os.environ)).lib_dir / "azurite"
    text = (installed / lookup_order.STORE).read_text()

    assert lookup_order.reorder(text)[1] == 0, (
        "a lookup still starts with accountName: an Azurite installed before the rewrite is "
        "reinstalled by `scripts/stack stop` then `scripts/stack up`"
    )
    name_first = re.findall(
        r"\.find(?:One)?\(\{\n\s+(?:name|blobName): [^\n]+\n\s+accountName", text
    )
    assert len(name_first) == lookup_order.LOOKUPS


def test_up_says_when_a_running_azurite_runs_an_older_install(tmp_path: Path) -> None:
    stack = _load("snapmap_stack_for_azurite", ROOT / "localstack" / "stack.py")

    class RunningAzurite(stack.Azurite):
        """The stack's Azurite class over an install folder of this test, with a server
        that is up: `up` must not reinstall under it, only say so."""

        def running_pid(self) -> int:
            return os.getpid()

        def is_ready(self) -> bool:
            return True

    config = stack.Config.from_env({"SNAPMAP_STACK_DIR": str(tmp_path)})
    azurite = RunningAzurite(config)
    azurite.entry_point.parent.mkdir(parents=True)
    azurite.entry_point.write_text("")
    stamp = azurite.install_dir / ".lock-sha256"

    stamp.write_text(azurite._lock_digest() + "\n")
    assert "older install" not in stack.start_service(azurite)

    # The stamp of an install made before lookup_order.py was part of it.
    stamp.write_text(
        stack.file_digest(
            azurite.package_dir / "package.json", azurite.package_dir / "package-lock.json"
        )
        + "\n"
    )
    line = stack.start_service(azurite)
    assert line.startswith(f"azurite: up (pid {os.getpid()})")
    assert "older install: `scripts/stack stop` then `scripts/stack up`" in line
