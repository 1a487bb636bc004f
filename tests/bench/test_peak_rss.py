"""The benchmarks' peak memory figure is the measured process's own, not its parent's."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest

from bench.pipeline.common import peak_rss_mb

pytestmark = pytest.mark.bench

BALLAST_MB = 600


def test_a_spawned_child_reports_its_own_peak_not_its_parents() -> None:
    ballast = bytearray(BALLAST_MB * 2**20)
    for offset in range(0, len(ballast), 4096):
        ballast[offset] = 1  # resident, not just reserved
    parent_peak = peak_rss_mb()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        child_peak = pool.submit(peak_rss_mb).result(timeout=120)
    del ballast
    assert parent_peak > BALLAST_MB
    # The child imports the benchmark's modules (Dagster among them) and holds no ballast.
    assert 0 < child_peak < BALLAST_MB / 2, (parent_peak, child_peak)
