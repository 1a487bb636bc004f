"""Every server of the local stack listens on 127.0.0.1 only (architecture: "Nothing listens on
any other address"): each stack port is bound, and only to the loopback address, and the
stack's own processes listen nowhere else."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.faults

STACK_PORTS = {
    "kafka": ("SNAPMAP_KAFKA_PORT", 29092),
    "kafka controller": ("SNAPMAP_KAFKA_CONTROLLER_PORT", 29093),
    "mongo": ("SNAPMAP_MONGO_PORT", 27317),
    "azurite": ("SNAPMAP_AZURITE_PORT", 30000),
    "postgres": ("SNAPMAP_POSTGRES_PORT", 25432),
}
# IPv4 loopback, also as an IPv4-mapped IPv6 address (the JVM binds dual-stack sockets so).
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}


def listening() -> list[tuple[str, int, int | None]]:
    """(address, port, pid) of every listening TCP socket (pid None when not ours to see)."""
    return [
        (c.laddr.ip, c.laddr.port, c.pid)
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    ]


def stack_pids() -> dict[str, int]:
    run_dir = Path(os.environ.get("SNAPMAP_STACK_DIR") or ROOT / ".stack") / "run"
    pids = {}
    for pid_file in run_dir.glob("*.pid"):
        fields = pid_file.read_text().split()  # the pid, then its start time in clock ticks
        if fields and fields[0].isdigit():
            pids[pid_file.stem] = int(fields[0])
    return pids


def test_stack_ports_are_bound_to_loopback_only():
    sockets = listening()
    for service, (variable, default) in STACK_PORTS.items():
        port = int(os.environ.get(variable, default))
        addresses = {address for address, bound, _ in sockets if bound == port}
        assert addresses, f"{service}: nothing listens on port {port} (is the stack up?)"
        assert addresses <= LOOPBACK, f"{service}: port {port} is bound to {addresses}"


def test_stack_processes_listen_nowhere_else():
    pids = stack_pids()
    assert set(pids) >= {"kafka", "mongo", "azurite", "postgres"}, pids
    owned: dict[int, str] = {}
    for service, pid in pids.items():
        try:
            process = psutil.Process(pid)
            family = [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            pytest.fail(f"{service}: pid {pid} from .stack/run is not running")
        owned |= {member.pid: service for member in family}
    sockets = listening()
    for address, port, pid in sockets:
        if pid in owned:
            assert address in LOOPBACK, f"{owned[pid]} (pid {pid}) listens on {address}:{port}"
    # The check saw the stack's own sockets (pids are visible), so it could have failed.
    ports = {int(os.environ.get(var, default)) for var, default in STACK_PORTS.values()}
    assert ports <= {port for _, port, pid in sockets if pid in owned}


def test_loopback_check_is_not_vacuous():
    """A socket on the wildcard address is seen, and would fail the checks above."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("0.0.0.0", 0))
        probe.listen(1)
        port = probe.getsockname()[1]
        seen = {(address, pid) for address, bound, pid in listening() if bound == port}
    assert seen == {("0.0.0.0", os.getpid())}
