"""Where a run's steps hand their outputs to each other: a directory of the run's own.

Dagster's default filesystem IO manager stores an asset's output at a path named after the
asset alone. Micro-batch runs of the same assets run side by side, so one run could load the
batch another run had just written and then cluster, link and commit the wrong offsets. Here
every output is pickled under the id of the run that produced it; a downstream step loads from
the run that produced its input, which for a re-execution from the UI is the parent run.

The outputs are small (ids and counts, never payloads). Run directories older than
``retention_days`` are removed when a run starts; re-executing such an old run from failure
then fails with a clear error, and re-executing all of its steps works as usual.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from dagster import (
    ConfigurableIOManagerFactory,
    InitResourceContext,
    InputContext,
    IOManager,
    OutputContext,
)
from pydantic import Field

RUNS_DIR = "snapmap-run-outputs"


class RunScopedIOManager(ConfigurableIOManagerFactory):
    """Pickles each step output under ``<base_dir>/<run id>/<step>/<output>``."""

    base_dir: str = Field(
        default="",
        description="Empty: the Dagster instance's storage directory (under DAGSTER_HOME).",
    )
    retention_days: float = Field(default=7.0, gt=0)

    def create_io_manager(self, context: InitResourceContext) -> RunScopedPickles:
        if self.base_dir:
            base = Path(self.base_dir)
        elif context.instance is not None:
            base = Path(context.instance.storage_directory())
        else:
            raise ValueError("RunScopedIOManager needs base_dir outside a Dagster instance")
        root = base / RUNS_DIR
        prune_older_than(root, self.retention_days * 86_400, keep=context.run_id)
        return RunScopedPickles(root)


class RunScopedPickles(IOManager):
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, context: OutputContext) -> Path:
        # run id (the producing run's), step key, output name; nothing shared between runs.
        return self.root.joinpath(*context.get_identifier())

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        path = self.path(context)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole or not at all: a killed step never leaves half a pickle to load.
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as handle:
            pickle.dump(obj, handle, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(handle.name, path)

    def load_input(self, context: InputContext) -> Any:
        path = self.path(context.upstream_output)
        if not path.exists():
            raise FileNotFoundError(
                f"output {path.relative_to(self.root)} is gone (older than the retention, or "
                "written on another machine); re-execute all steps of the run instead"
            )
        with path.open("rb") as handle:
            return pickle.load(handle)  # noqa: S301 - written by this pipeline under DAGSTER_HOME


def prune_older_than(root: Path, age_s: float, keep: str | None = None) -> int:
    """Remove run directories not modified for ``age_s`` seconds; returns how many."""
    if not root.is_dir():
        return 0
    cutoff = time.time() - age_s
    removed = 0
    for entry in os.scandir(root):
        if entry.name == keep or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
        except FileNotFoundError:
            pass  # another run pruned it first
    return removed
