"""scripts/demo's stop path: Ctrl-C stops the Dagster it started within seconds.

`dagster dev` maps SIGTERM to whatever handles SIGINT when it starts. Started in the
background by a script, it inherits SIGINT ignored (bash ignores SIGINT in the background
commands of a shell without job control), so it ignored the demo's SIGTERM too, and every stop
waited 90 s before killing the process group.

The demo runs here in a copy of the project with stand-ins: no stack, no simulator, and in
place of `dagster dev` a small HTTP server that sets up its signals with Dagster's own
`setup_interrupt_handlers`, as `dagster dev` does, and runs until interrupted."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]

FAKE_DAGSTER = """#!{python}
import http.server
import os
import sys

from dagster._utils.interrupts import setup_interrupt_handlers

setup_interrupt_handlers()  # what `dagster dev` does first: SIGTERM handled as SIGINT is
port = int(sys.argv[sys.argv.index("-p") + 1])
with open(os.environ["DAGSTER_HOME"] + "/fake-dagster.pid", "w") as out:
    out.write(str(os.getpid()))


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{{}}")

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", port), Handler)
try:
    server.serve_forever()
except KeyboardInterrupt:
    print("fake dagster: interrupted, stopping", flush=True)
"""

# The demo's python: the port check runs for real, the simulator's commands do nothing.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "${{1:-}}" = -m ] && [ "${{2:-}}" = snapmap_pipeline.simulator ]; then
  echo "fake simulator: $3"
  exit 0
fi
exec {python} "$@"
"""

FAKE_ENV = """export DAGSTER_HOME="{home}"
export MONGODB_DATABASE=snapmap
export SNAPMAP_CONSUMER_GROUP=snapmap-pipeline
"""


def executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def end_leftovers(demo: subprocess.Popen, fake_pid: int | None) -> None:
    """Whatever of this test's demo and stand-in Dagster is still running, ended by pid."""
    if demo.poll() is None:
        demo.kill()
        demo.wait()
    if fake_pid is not None:
        try:
            os.killpg(fake_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def project(tmp_path):
    """A copy of scripts/demo beside stand-ins for everything it starts."""
    root = tmp_path / "project"
    home = tmp_path / "dagster-home"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "demo", root / "scripts" / "demo")
    executable(root / "scripts" / "stack", "#!/bin/sh\nexit 0\n")
    (root / "scripts" / "env.sh").write_text(FAKE_ENV.format(home=home))
    (root / "dagster.yaml").write_text("")
    executable(root / ".venv" / "bin" / "dagster", FAKE_DAGSTER.format(python=sys.executable))
    executable(root / ".venv" / "bin" / "python", FAKE_PYTHON.format(python=sys.executable))
    return root, home


def test_ctrl_c_stops_dagster_within_seconds(project):
    root, home = project
    demo = subprocess.Popen(
        ["scripts/demo", "replay", "--keep-running", "--port", str(free_port())],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As from a terminal: a suite started in the background (nohup, a CI runner) passes
        # SIGINT down ignored, and bash can neither trap nor reset a signal ignored on entry.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in demo.stdout:
            lines.append(line)
            if "press Ctrl-C" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    fake_pid = None
    try:
        assert ready.wait(60), "the demo did not reach --keep-running:\n" + "".join(lines)
        fake_pid = int((home / "fake-dagster.pid").read_text())
        started = time.monotonic()
        demo.send_signal(signal.SIGINT)
        try:
            code = demo.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("the demo was still stopping Dagster 30 s after Ctrl-C:\n" + "".join(lines))
        elapsed = time.monotonic() - started
        reader.join(5)
        output = "".join(lines)
        assert code == 130, output
        assert "did not stop within" not in output
        assert elapsed < 20, output
        with pytest.raises(ProcessLookupError):
            os.kill(fake_pid, 0)
        log = (home / "demo-dagster.log").read_text()
        assert "fake dagster: interrupted, stopping" in log
    finally:
        end_leftovers(demo, fake_pid)


def test_ctrl_c_stops_dagster_when_the_demo_output_pipe_is_gone(project):
    """`scripts/demo ... | tee demo.log`, then Ctrl-C: the terminal's SIGINT reaches tee too,
    which exits first, so every line the demo's cleanup writes meets a closed pipe. A write to
    it must not end the cleanup before Dagster is stopped."""
    root, home = project
    read_end, write_end = os.pipe()
    demo = subprocess.Popen(
        ["scripts/demo", "replay", "--keep-running", "--port", str(free_port())],
        cwd=root,
        stdout=write_end,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(write_end)
    fake_pid = None
    try:
        seen = b""
        deadline = time.monotonic() + 60
        while b"press Ctrl-C" not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            chunk = os.read(read_end, 4096)
            assert chunk, "the demo ended before --keep-running:\n" + seen.decode()
            seen += chunk
        fake_pid = int((home / "fake-dagster.pid").read_text())
        os.close(read_end)  # tee is gone
        read_end = None
        demo.send_signal(signal.SIGINT)
        demo.wait(30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(fake_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("Dagster was still running 20 s after the demo's Ctrl-C")
        assert not (home / "demo-dagster.pid").exists()
    finally:
        if read_end is not None:
            os.close(read_end)
        end_leftovers(demo, fake_pid)


def test_a_demo_started_with_sigint_ignored_still_stops_dagster_within_seconds(project):
    """A demo started in the background by another script (``make demo &``, nohup, a CI step)
    inherits SIGINT ignored, which bash can neither trap nor reset. Its Dagster inherited it
    too, and `dagster dev` then ignores SIGTERM as well: every such demo waited 90 s after its
    summary and killed Dagster's process group, runs in progress included."""
    root, home = project
    demo = subprocess.Popen(
        ["scripts/demo", "replay", "--port", str(free_port())],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        try:
            output, _ = demo.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            demo.kill()
            output, _ = demo.communicate()
            pytest.fail("the demo was still stopping Dagster after 45 s:\n" + output)
        assert demo.returncode == 0, output
        assert "stopping Dagster" in output
        assert "did not stop within" not in output
        log = (home / "demo-dagster.log").read_text()
        assert "fake dagster: interrupted, stopping" in log
    finally:
        fake_pid_file = home / "fake-dagster.pid"
        fake_pid = int(fake_pid_file.read_text()) if fake_pid_file.exists() else None
        end_leftovers(demo, fake_pid)
