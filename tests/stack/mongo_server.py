"""A MongoDB-compatible server of a test's own, started from the stack's build of the server
on 127.0.0.1 and a free port (tests that restart it or give it JVM properties need no running
stack), and stopped by SIGTERM, which closes its store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from tests.stack.test_pid_file import ROOT, stack

JAVA_OPTS = "-Xms64m -Xmx512m -XX:+UseSerialGC"


def stack_build() -> Path:
    """The stack's build of the server, brought up to date (a no-op when it is)."""
    mongo = stack.Mongo(stack.Config.from_env(dict(os.environ)))
    mongo.install()
    return mongo.build_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def own_server(
    build: Path, data_dir: Path, log: Path, properties: str = ""
) -> Iterator[MongoClient]:
    """The server on ``data_dir`` with these ``-D`` properties; yields a client and leaves the
    server's output in ``log``. Fails the test if it does not start within 60 s or stop
    within 30 s of SIGTERM."""
    port = free_port()
    env = dict(os.environ, MONGO_JAVA_OPTS=f"{JAVA_OPTS} {properties}".strip())
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bash", str(ROOT / "localstack" / "mongo" / "run.sh"), str(build), "127.0.0.1"]
            + [str(port), str(data_dir)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            # The suite's process ignores SIGTERM once a Dagster job has run in it (Dagster
            # copies SIGINT's disposition, ignored under CI); the JVM would inherit that.
            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL),
        )
    client = MongoClient(f"mongodb://127.0.0.1:{port}/", serverSelectionTimeoutMS=1000)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client.admin.command("ping")
                break
            except PyMongoError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the server did not start:\n{log.read_text()}")
                time.sleep(0.2)
        yield client
    finally:
        client.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"the server did not stop within 30 s of SIGTERM:\n{log.read_text()}")
