"""Deterministic schedule exploration (schedules.py): each seed draws an engine, a workload and
its arrivals and cancellations, steps the scheduler from this thread, checks the invariants after
every step and every answer against the request run alone. CI runs the seeds below; `make soak`
runs many more (SEEDS=500, or SEEDS=a-b, or SEEDS=a,b,c to replay some)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import torch
from schedules import Stats, explore

CI_SEEDS = range(24)


def seeds(spec: str | None) -> list[int]:
    if not spec:
        return list(CI_SEEDS)
    if "," in spec:
        return [int(s) for s in spec.split(",")]
    if "-" in spec:
        first, last = spec.split("-")
        return list(range(int(first), int(last) + 1))
    return list(range(int(spec)))


TOTAL = Stats()


@pytest.fixture(scope="module", autouse=True)
def quiet_single_thread() -> Iterator[None]:
    """One intra-op thread (with other threads of the test process holding OpenMP worker pools,
    two threads run about 10x slower: engine_thread.py), and the engine's per-request INFO/WARNING
    lines off: thousands of requests."""
    threads, logger = torch.get_num_threads(), logging.getLogger("deepseek_vl2")
    level = logger.level
    torch.set_num_threads(1)
    logger.setLevel(logging.ERROR)
    yield
    torch.set_num_threads(threads)
    logger.setLevel(level)
    print(f"\nschedule exploration: {TOTAL}")


@pytest.mark.parametrize("seed", seeds(os.environ.get("SEEDS")))
def test_every_schedule_gives_each_request_its_solo_answer(seed):
    TOTAL.add(explore(seed))
