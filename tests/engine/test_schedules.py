"""Deterministic schedule exploration (schedules.py): each seed draws an engine, a workload and
its arrivals and cancellations, steps the scheduler from this thread, checks the invariants after
every step and every answer against the request run alone. CI runs the seeds below; `make soak`
runs many more (SEEDS=500, or SEEDS=a-b, or SEEDS=a,b,c to replay some)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
from schedules import Arrival, Job, Solo, Stats, Tracked, check_sampling_flip, explore

from deepseek_vl2 import SamplingParams
from deepseek_vl2.engine.request import Event
from deepseek_vl2.engine.sampling import Sampler
from deepseek_vl2.engine.scheduler import RequestCancelled

# Seed 107: a row move fails while requests that just finished still hold their rows (it found
# finished requests left in the batch after the failure).
CI_SEEDS = [*range(24), 107]


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


# ---- the oracle itself: a sampling flip must be a real divergence, not an answer cut short ----

EOS, VOCAB = 0, 6
FLIP_PARAMS = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=3)


def peaked(*tokens: int) -> torch.Tensor:
    """Logits that leave a draw only `tokens` (one: certain; two: a tie, settled by the seed)."""
    logits = torch.full((VOCAB,), -40.0)
    logits[list(tokens)] = 10.0
    return logits


def drawn(logits: list[torch.Tensor]) -> list[int]:
    sampler = Sampler(FLIP_PARAMS, VOCAB, torch.tensor([[1]]))
    return [int(sampler(step[None])[0]) for step in logits]


def flip_case(
    logits: list[torch.Tensor], tokens: list[int], end: Event, alone: list[int], max_new_tokens: int
) -> tuple[Tracked, Solo]:
    """A request given `logits` that answered `tokens` then `end`; its solo run answered `alone`
    from the same logits (those after the divergence are never compared)."""
    job = Job("tiny-mha", "m_text", "as-is", max_new_tokens, FLIP_PARAMS)
    request = SimpleNamespace(inputs=SimpleNamespace(input_ids=torch.tensor([[1]])), max_new_tokens=max_new_tokens)
    t = Tracked(Arrival(job, 0), request, events=[*tokens, end], logits=logits[: len(tokens)])  # type: ignore[arg-type]
    return t, Solo(tuple(alone), tuple(logits), EOS)


def test_the_flip_oracle_accepts_a_real_flip_and_rejects_answers_cut_short():
    # Token 2 is a tie (3 or 4, whichever the seed draws); the solo run drew the other one.
    logits = [peaked(1), peaked(2), peaked(3, 4), peaked(1), peaked(2)]
    tokens = drawn(logits)
    alone = tokens[:2] + [7 - tokens[2], 5, 5]
    assert tokens[:2] == [1, 2] and tokens[2] in (3, 4)

    t, solo_run = flip_case(logits, tokens, None, alone, max_new_tokens=5)
    check_sampling_flip(0, t, solo_run)
    assert t.flipped
    # A flip that then drew EOS stops early; one cancelled after the flip has the cancel's length.
    eos_logits = logits[:3] + [peaked(EOS)]
    check_sampling_flip(0, *flip_case(eos_logits, drawn(eos_logits), None, alone, max_new_tokens=5))
    cancelled = RequestCancelled("cancelled")
    check_sampling_flip(0, *flip_case(logits, tokens[:3], cancelled, alone, max_new_tokens=5))

    rejected = {
        "only a prefix": (tokens[:2], None, "no token differs"),
        "empty": ([], None, "no token differs"),
        "a flip cut short without EOS": (tokens[:3], None, "stopped after 3 of 5 tokens without EOS"),
        "a cancel before the flip": (tokens[:2], cancelled, "no token differs"),
    }
    for name, (answer, end, message) in rejected.items():
        t, solo_run = flip_case(logits, answer, end, alone, max_new_tokens=5)
        with pytest.raises(AssertionError, match=message):
            check_sampling_flip(0, t, solo_run)
        assert not t.flipped, name
