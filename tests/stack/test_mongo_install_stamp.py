"""`scripts/stack up` with the MongoDB-compatible server already running says when the server's
build is older than the pom and Java sources in localstack/mongo/, as it does for Kafka and
Azurite: a restarted `up` then rebuilds it. Before, a running server built from older sources
was reported as up with no word, and the changes to it silently did not apply."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]


def _stack_module():
    spec = importlib.util.spec_from_file_location(
        "snapmap_stack_for_mongo", ROOT / "localstack" / "stack.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_stamp_is_the_one_a_build_of_the_sources_records() -> None:
    """install.sh --stamp prints what install.sh writes to BUILD_STAMP for these sources: the
    stack's own build (made before this test by `scripts/stack up`) carries it."""
    stack = _stack_module()
    build = stack.Mongo(stack.Config.from_env(dict(os.environ))).build_dir
    done = subprocess.run(
        ["bash", str(ROOT / "localstack" / "mongo" / "install.sh"), "--stamp"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (build / "BUILD_STAMP").read_text().strip()


def test_up_says_when_a_running_server_runs_an_older_build(tmp_path: Path) -> None:
    stack = _stack_module()

    class RunningMongo(stack.Mongo):
        """The stack's Mongo class over a build folder of this test, with a server that is
        up: `up` must not rebuild under it, only say so."""

        def running_pid(self) -> int:
            return os.getpid()

        def is_ready(self) -> bool:
            return True

    mongo = RunningMongo(stack.Config.from_env({"SNAPMAP_STACK_DIR": str(tmp_path)}))
    mongo.build_dir.mkdir(parents=True)
    current = stack.mongo_source_stamp(mongo.scripts)
    stamp = mongo.build_dir / "BUILD_STAMP"

    stamp.write_text(current + "\n")
    assert "older install" not in stack.start_service(mongo)

    for older in ("0" * 16 + "\n", None):
        if older is None:
            stamp.unlink()
        else:
            stamp.write_text(older)
        line = stack.start_service(mongo)
        assert line.startswith(f"mongo: up (pid {os.getpid()})")
        assert "older install: `scripts/stack stop` then `scripts/stack up`" in line


@pytest.mark.parametrize("changed", ["run.sh", "install.sh", "pom.xml", "src/Extra.java"])
def test_the_stamp_changes_with_what_builds_or_starts_the_server(tmp_path: Path, changed) -> None:
    """The heap is set in run.sh and the build in install.sh: a change to either is a server
    the running one is not, as much as a change to the pom or a source."""
    copy = tmp_path / "mongo"
    shutil.copytree(ROOT / "localstack" / "mongo", copy)

    stack = _stack_module()
    before = stack.mongo_source_stamp(copy)
    with (copy / changed).open("a") as out:
        out.write("\n")
    assert stack.mongo_source_stamp(copy) != before
