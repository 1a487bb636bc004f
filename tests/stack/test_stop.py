"""Stopping the stack's servers when its records or its rights fall short: a pid file that
holds no pid while its server runs, a server this user may not signal, and a server started by
a process that ignores SIGTERM (as a test process does after Dagster ran a job in it)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.stack.test_pid_file import ROOT, stack

pytestmark = pytest.mark.stack

STACK_PY = ROOT / "localstack" / "stack.py"


def free_port() -> int:
    """A port nothing listens on, below the ephemeral range (the stack refuses those)."""
    low, _ = stack._ephemeral_range()
    for port in range(18500, min(low, 18900)):
        with socket.socket() as probe:
            try:
                probe.bind((stack.HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 18500-18900")


def run_stack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(STACK_PY), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def installed_azurite() -> Path:
    """Azurite as `scripts/stack up` installed it for this checkout's stack (run-tests runs
    `up` first); a test stack links to it instead of running npm again."""
    cfg = stack.Config.from_env({k: v for k, v in os.environ.items() if k == "SNAPMAP_STACK_DIR"})
    svc = stack.Azurite(cfg)
    if not svc._installed():
        pytest.fail(f"Azurite is not installed in {cfg.lib_dir}; run scripts/stack up first")
    return svc.install_dir


def test_a_pid_file_without_a_pid_does_not_orphan_its_running_server(tmp_path):
    env = {"SNAPMAP_STACK_DIR": str(tmp_path / "stack"), "SNAPMAP_AZURITE_PORT": str(free_port())}
    cfg = stack.Config.from_env(env)
    stack.prepare_root(cfg)
    cfg.lib_dir.joinpath("azurite").symlink_to(installed_azurite())
    azurite = stack.Azurite(cfg)
    port = cfg.azurite_port

    started = run_stack(env, "up", "--only", "azurite")
    assert started.returncode == 0, started.stderr
    original = azurite.pid_file.read_text()
    pid = int(original.split()[0])
    try:
        azurite.pid_file.write_text("\x00garbage\n")  # a disk error, an editor, a bad merge

        down = run_stack(env, "down", "--only", "azurite")
        assert down.returncode == 1
        assert "holds no pid" in down.stderr and f"sport = :{port}" in down.stderr
        assert azurite.pid_file.read_text() == "\x00garbage\n", "the only record was deleted"
        assert stack.process_identity(pid) is not None and azurite.is_ready()

        up = run_stack(env, "up", "--only", "azurite")
        assert up.returncode == 1
        assert "holds no pid" in up.stderr
        status = run_stack(env, "status", "--only", "azurite")
        assert status.returncode == 1 and "unknown" in status.stdout
        for command in (["wipe", "--only", "azurite"], ["stop", "azurite"]):
            refused = run_stack(env, *command)
            assert refused.returncode == 1, (command, refused.stdout)
        assert (cfg.root / "azurite").is_dir(), "wipe deleted the data of a running server"
        assert stack.process_identity(pid) is not None and azurite.is_ready()
    finally:
        azurite.pid_file.write_text(original)
        stopped = run_stack(env, "down", "--only", "azurite")
    assert stopped.returncode == 0, stopped.stderr
    assert stack.process_identity(pid) is None and not stack.port_open(port)

    # A pid file without a pid and nothing on the port is stale: `up` goes ahead.
    azurite.pid_file.write_text("garbage\n")
    again = run_stack(env, "up", "--only", "azurite")
    try:
        assert again.returncode == 0, again.stderr
    finally:
        assert run_stack(env, "down", "--only", "azurite").returncode == 0


class Sleeper(stack.Service):
    """A stand-in server: `sleep`, which keeps whatever signal dispositions it inherits."""

    name = "sleeper"
    start_timeout = 10.0

    def __init__(self, cfg, port: int, folder: Path):
        super().__init__(cfg)
        self.port = port
        self.folder = folder

    @property
    def ports(self) -> list[int]:
        return [self.port]

    @property
    def data_paths(self) -> list[Path]:
        return []

    def launch(self) -> stack.Launch:
        return stack.Launch(argv=["sleep", "600"], cwd=self.folder)

    def is_ready(self) -> bool:
        return True


def sigterm_ignored(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    raise AssertionError(f"no SigIgn line for pid {pid}")


def test_a_server_started_by_a_process_ignoring_sigterm_still_stops_on_sigterm(
    tmp_path, monkeypatch, capsys
):
    """Dagster copies SIGINT's disposition to SIGTERM in a process that ran a job, and a suite
    started in the background has SIGINT ignored: the fault tests then restarted Kafka with
    SIGTERM ignored, and `down` met a broker that only SIGKILL could end."""
    cfg = stack.Config.from_env({"SNAPMAP_STACK_DIR": str(tmp_path / "stack")})
    sleeper = Sleeper(cfg, free_port(), tmp_path)
    monkeypatch.setattr(stack, "STOP_TIMEOUT", 5.0)
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert stack.cmd_up(cfg, [sleeper], print_env=False) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    pid = sleeper.running_pid()
    assert pid is not None
    try:
        assert not sigterm_ignored(pid), "the server inherited SIGTERM ignored"
        capsys.readouterr()
        assert stack.cmd_down(cfg, [sleeper]) == 0
        out = capsys.readouterr().out
        assert "killing it" not in out and f"stopped (pid {pid})" in out
    finally:
        if stack.process_identity(pid) is not None:
            os.killpg(pid, signal.SIGKILL)
        stack.reap(pid)


@contextmanager
def stack_folder_of_root(lock_mode: int) -> Iterator[tuple[object, Path]]:
    """A stack folder made by root, and a copy of stack.py that the user `nobody` can run
    (pytest's tmp_path is private to root). ``lock_mode`` 0o666 lets `nobody` take the stack
    lock; 0o644 is what a real `sudo` start leaves. Skips unless run as root."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the stack script as another user against root's stack")
    if shutil.which("python3", path="/usr/bin:/bin") is None:
        pytest.skip("no system python3 that the user nobody can run")
    root = Path(tempfile.mkdtemp(prefix="stack-eperm-"))
    try:
        root.chmod(0o755)
        cfg = stack.Config.from_env({"SNAPMAP_STACK_DIR": str(root / "stack")})
        stack.prepare_root(cfg)
        cfg.root.chmod(0o777 if lock_mode & 0o002 else 0o755)
        (cfg.root / "stack.lock").touch(lock_mode)
        (cfg.root / "stack.lock").chmod(lock_mode)
        shutil.copy(STACK_PY, root / "stack.py")
        (root / "stack.py").chmod(0o644)
        yield cfg, root
    finally:
        shutil.rmtree(root)


def stack_as_nobody(cfg, root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [shutil.which("python3", path="/usr/bin:/bin"), str(root / "stack.py"), *args],
        env={"SNAPMAP_STACK_DIR": str(cfg.root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        user="nobody",
        cwd=root,
    )


def test_a_server_this_user_may_not_signal_is_reported_and_left_alone():
    """A server run by root, stopped by an ordinary user (a stack started with sudo): the OS
    refuses the signal with EPERM, and `down` says so instead of crashing, keeps the pid file
    and signals nothing else. Only root can set this up honestly (start a process as itself
    and run `down` as `nobody`); as another user the test would need a process it cannot
    signal that also passes the pid file's checks, which it cannot create."""
    with stack_folder_of_root(0o666) as (cfg, root):
        azurite = stack.Azurite(cfg)  # any service: only its pid file is used
        with subprocess.Popen(["sleep", "120"], start_new_session=True) as server:
            try:
                azurite.record_pid(server.pid)
                down = stack_as_nobody(cfg, root, "down", "--only", "azurite")
                assert "Traceback" not in down.stderr, down.stderr
                assert down.returncode == 1
                assert (
                    f"not permitted to signal pid {server.pid}, which runs as root" in down.stdout
                )
                assert "still running" in down.stdout
                assert server.poll() is None
                assert azurite.running_pid() == server.pid, "the pid file was not kept"
            finally:
                server.kill()


def test_a_stack_started_by_root_is_refused_to_another_user_in_one_line():
    """As a real `sudo` start leaves it: the stack folder and its lock file belong to root and
    only root may write them. `down` by another user stops at the lock with one line naming
    the owner (found by the breaker: a traceback, before the signal handling was reached)."""
    with stack_folder_of_root(0o644) as (cfg, root):
        down = stack_as_nobody(cfg, root, "down")
        assert "Traceback" not in down.stderr, down.stderr
        assert down.returncode != 0
        output = down.stdout + down.stderr
        assert f"not permitted to open {cfg.root / 'stack.lock'} (owned by root)" in output
