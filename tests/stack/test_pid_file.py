"""The stack's pid files: a running server is recognised whatever the wall clock does, and a
process that merely reuses its pid is not taken for it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]


def load_stack():
    spec = importlib.util.spec_from_file_location("snapmap_stack", ROOT / "localstack" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


stack = load_stack()


@pytest.fixture
def service(tmp_path):
    cfg = stack.Config.from_env({"SNAPMAP_STACK_DIR": str(tmp_path)})
    cfg.run_dir.mkdir(parents=True)
    return stack.Azurite(cfg)  # any service: only its pid file is used


@pytest.fixture
def leader():
    """A process that leads its own session, as every server of the stack does."""
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def test_a_running_server_survives_a_clock_step_either_way(service, leader):
    service.record_pid(leader.pid)
    assert service.running_pid() == leader.pid
    now = time.time()
    for shifted in (now - 3600, now + 3600):  # the pid file's times are wall-clock times
        os.utime(service.pid_file, (shifted, shifted))
        assert service.running_pid() == leader.pid


def test_another_process_under_the_recorded_pid_is_not_the_server(service, leader):
    service.record_pid(leader.pid)
    pid, ticks = service.pid_file.read_text().split()
    service.pid_file.write_text(f"{pid} {int(ticks) - 1}\n")
    assert service.running_pid() is None


def test_a_process_that_does_not_lead_its_session_is_not_the_server(service):
    with subprocess.Popen(["sleep", "120"]) as follower:
        try:
            service.record_pid(follower.pid)
            assert service.running_pid() is None
        finally:
            follower.kill()


def test_an_exited_server_is_not_running(service, leader):
    service.record_pid(leader.pid)
    leader.kill()
    leader.wait()
    assert service.running_pid() is None


def test_a_pid_file_from_an_older_stack_still_finds_its_server(service, leader):
    service.pid_file.write_text(f"{leader.pid}\n")
    assert service.running_pid() == leader.pid


def test_a_pid_file_from_an_older_stack_does_not_adopt_a_later_session_leader(service, leader):
    # An older stack wrote the pid alone, long before this process started: its server died
    # and the pid now belongs to another session leader (a shell, another stack's server).
    # `down` must not signal that process's group.
    service.pid_file.write_text(f"{leader.pid}\n")
    long_ago = time.time() - 2 * 86400
    os.utime(service.pid_file, (long_ago, long_ago))
    assert service.running_pid() is None
