"""scripts/env.sh and `stack.py env`: sourcing the settings says on stderr which stack folder
and ports they point at (a new shell without SNAPMAP_STACK_DIR and SNAPMAP_*_PORT silently got
the default stack), while standard output, which callers eval or parse, is unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]

# Below any usual ephemeral port range, and not the defaults.
PORTS = {
    "SNAPMAP_KAFKA_PORT": "18192",
    "SNAPMAP_KAFKA_CONTROLLER_PORT": "18193",
    "SNAPMAP_MONGO_PORT": "18117",
    "SNAPMAP_AZURITE_PORT": "18100",
    "SNAPMAP_POSTGRES_PORT": "18532",
}


def source_env(options: str = "-euo pipefail", **variables: str) -> subprocess.CompletedProcess:
    """Source scripts/env.sh as scripts/run-tests does (set -euo pipefail, unless ``options``
    says otherwise) in a shell that has none of the stack's variables, then print two of the
    settings it exported."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    script = (
        f"set {options}; source scripts/env.sh; "
        'echo "$KAFKA_BOOTSTRAP_SERVERS ${MONGODB_URI:-unset}"'
    )
    return subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env={**env, **variables},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_new_shell_is_told_it_got_the_default_stack():
    done = source_env()
    assert done.returncode == 0, done.stderr
    assert done.stdout == "127.0.0.1:29092 mongodb://127.0.0.1:27317/\n"
    assert done.stderr == (
        f"stack: settings for the stack in {ROOT / '.stack'}: kafka 127.0.0.1:29092, "
        "mongo 127.0.0.1:27317, azurite 127.0.0.1:30000, postgres 127.0.0.1:25432 "
        "(the default folder and ports)\n"
    )


def test_another_stack_is_named_with_its_ports(tmp_path):
    done = source_env(SNAPMAP_STACK_DIR=str(tmp_path), **PORTS)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "127.0.0.1:18192 mongodb://127.0.0.1:18117/\n"
    assert done.stderr == (
        f"stack: settings for the stack in {tmp_path.resolve()}: kafka 127.0.0.1:18192, "
        "mongo 127.0.0.1:18117, azurite 127.0.0.1:18100, postgres 127.0.0.1:18532\n"
    )


def test_quiet_leaves_the_line_out(tmp_path):
    done = source_env(SNAPMAP_QUIET="1", SNAPMAP_STACK_DIR=str(tmp_path), **PORTS)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "127.0.0.1:18192 mongodb://127.0.0.1:18117/\n"
    assert done.stderr == ""


def test_quiet_is_only_the_value_one(tmp_path):
    """``SNAPMAP_QUIET=0`` reads as "not quiet", as any other value but 1 does."""
    done = source_env(SNAPMAP_QUIET="0", SNAPMAP_STACK_DIR=str(tmp_path), **PORTS)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"stack: settings for the stack in {tmp_path.resolve()}:")


def test_a_bad_port_stops_the_shell_instead_of_leaving_the_settings_unset(tmp_path):
    """Sourced under ``set -e`` alone (no ``-u`` to catch an unset setting later), a setting
    stack.py refuses ends the shell with its reason; nothing runs on without the settings."""
    bad = {**PORTS, "SNAPMAP_MONGO_PORT": "99999"}
    done = source_env("-e", SNAPMAP_STACK_DIR=str(tmp_path), **bad)
    assert done.returncode != 0
    assert done.stdout == ""
    assert "SNAPMAP_MONGO_PORT='99999' is not a TCP port number" in done.stderr


def test_production_neither_points_at_a_stack_nor_names_one():
    done = source_env(SNAPMAP_PRODUCTION="1", KAFKA_BOOTSTRAP_SERVERS="broker.example:9092")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "broker.example:9092 unset\n"
    assert done.stderr == ""


@pytest.mark.parametrize("where", [False, True])
def test_env_prints_only_export_lines_on_stdout(tmp_path, where):
    """What `eval` and tests/conftest.py's parser read; the line of ``--where`` goes to stderr
    only, and plain ``env`` (tests/conftest.py) writes nothing there."""
    command = [sys.executable, str(ROOT / "localstack" / "stack.py"), "env"]
    env = {"PATH": os.environ.get("PATH", ""), "SNAPMAP_STACK_DIR": str(tmp_path), **PORTS}
    done = subprocess.run(
        command + (["--where"] if where else []),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split("=", 1)[0] for line in lines] == [
        "export KAFKA_BOOTSTRAP_SERVERS",
        "export MONGODB_URI",
        "export MONGODB_DATABASE",
        "export AZURE_STORAGE_CONNECTION_STRING",
        "export DAGSTER_POSTGRES_URL",
    ]
    assert (done.stderr.count("\n"), str(tmp_path) in done.stderr) == (
        (1, True) if where else (0, False)
    )


def test_a_shell_without_stderr_still_gets_the_settings():
    """A cron job or a daemon may run with standard error closed: the line for a person is
    then left out, and the settings are exported all the same."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    done = subprocess.run(
        [
            "bash",
            "-c",
            'set -euo pipefail; source scripts/env.sh 2>&-; echo "$KAFKA_BOOTSTRAP_SERVERS"',
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "127.0.0.1:29092\n"), done.stderr


def stack_env_with_stdout(stdout: str) -> subprocess.CompletedProcess:
    """``stack.py env --where`` run by bash with its standard output ``closed`` (``>&-``) or
    a pipe whose reader has ``gone``; prints the exit status bash saw."""
    stack = f"{sys.executable} localstack/stack.py env --where"
    script = {
        "closed": f"{stack} >&-; echo $?",
        # Descriptor 3 is a pipe whose reader (a process substitution) has already exited.
        "gone": f"exec 3> >(exit 0); sleep 1; {stack} >&3; echo $?",
    }[stdout]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **PORTS}
    return subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("stdout", ["closed", "gone"])
def test_env_fails_when_its_export_lines_cannot_be_written(stdout):
    """A caller that evaluates the output would get no settings and carry on with whatever
    its shell had: a closed standard output, or a reader that went away, is an error exit
    with a line on stderr, never 0."""
    done = stack_env_with_stdout(stdout)
    assert done.stdout.strip() == "1", done.stderr
    assert done.stderr.endswith(
        "stack: error: standard output is closed; the export lines were not written\n"
    ), done.stderr


@pytest.mark.parametrize("variable", sorted(PORTS))
def test_a_port_set_but_empty_is_an_error_naming_it(tmp_path, variable):
    """An empty port most likely comes from a broken env file: falling back to the default
    port could send this shell's traffic to another stack's server."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "SNAPMAP_STACK_DIR": str(tmp_path),
        **PORTS,
        variable: "",
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "localstack" / "stack.py"), "env", "--where"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (
        f"stack: error: {variable} is set but empty; unset it to use the default port, "
        "or set a port\n"
    )


@pytest.mark.parametrize("command", [["env", "--where"], ["status"]])
def test_a_stack_folder_set_but_empty_is_an_error_naming_it(command):
    """An empty SNAPMAP_STACK_DIR comes from a broken env file like an empty port: taken as
    unset, it would point this shell's `status`, `down` and `wipe` at the project's default
    stack folder, another stack's data and pid files."""
    env = {"PATH": os.environ.get("PATH", ""), **PORTS, "SNAPMAP_STACK_DIR": ""}
    done = subprocess.run(
        [sys.executable, str(ROOT / "localstack" / "stack.py"), *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout
    assert done.stdout == ""
    assert done.stderr == (
        "stack: error: SNAPMAP_STACK_DIR is set but empty; unset it to use the default folder, "
        "or set a folder\n"
    )
