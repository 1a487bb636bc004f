"""Fixtures shared by every test: the local stack's addresses, and isolated names.

Integration tests talk to the real servers started by `scripts/stack up` (`make test` starts
them). Each test gets its own MongoDB database, its own topics and its own manifest container,
so tests never see each other's data. A test that needs the stack fails with a clear message
when it is down; it is never skipped.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import uuid
from functools import cache
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)


@cache
def _stack_env() -> dict[str, str]:
    """The local stack's connection settings, as `scripts/stack env` prints them."""
    printed = subprocess.run(
        [sys.executable, str(ROOT / "localstack" / "stack.py"), "env"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    settings = {}
    for line in printed.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        if key:
            settings[key.strip()] = shlex.split(value)[0] if value else ""
    return settings


def stack_setting(name: str) -> str:
    """A connection setting: the environment first, else the local stack's."""
    if os.environ.get(name):
        return os.environ[name]
    value = _stack_env().get(name)
    if value is None:
        raise RuntimeError(f"{name} is not set; start the local stack: scripts/stack up")
    return value


@pytest.fixture
def unique() -> str:
    """A short unique suffix for names of databases, topics and containers."""
    return uuid.uuid4().hex[:10]


def drop_topics(kafka, topics: list[str]) -> None:
    """Delete a test's topics; left behind, every partition makes each later broker stop and
    start slower. A topic already gone is fine; any other failure is logged, never raised, so
    cleanup does not hide the test's own result. The admin client stays referenced until its
    futures resolve (a client collected early fails them with "Handle is terminating")."""
    admin = kafka.admin()
    try:
        futures = admin.delete_topics(list(topics), operation_timeout=10)
        for name, future in futures.items():
            try:
                future.result(timeout=15)
            except KafkaException as error:
                if error.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                    log.warning("could not delete test topic %s: %s", name, error)
    except Exception as error:  # noqa: BLE001 - a stopped broker must not hide the result
        log.warning("could not delete test topics %s: %s", topics, error)
