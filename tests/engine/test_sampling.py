"""Sampling controls with transformers' semantics, on hand-made logits."""

from __future__ import annotations

import pytest
import torch

from deepseek_vl2.engine.sampling import (
    Sampler, SamplingParams, apply_repetition_penalty, filter_top_k, filter_top_p,
)  # fmt: skip

NEG = float("-inf")


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_repetition_penalty_counts_each_id_once_and_covers_the_prompt():
    sampler = Sampler(SamplingParams(repetition_penalty=2.0), 4, torch.tensor([[0, 0, 0, 3]]))
    # Prompt ids 0 (three times) and 3 are penalised once each: 4/2 = 2 < 3, -1*2 = -2.
    assert sampler(torch.tensor([[4.0, 3.0, 0.0, -1.0]])).tolist() == [1]
    # The generated id 1 is now penalised too.
    assert sampler(torch.tensor([[4.0, 3.0, 2.5, -1.0]])).tolist() == [2]


def test_top_k_keeps_ties_with_the_kth():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    assert filter_top_k(logits, 2).tolist() == [[NEG, 3.0, 2.0, 2.0, NEG]]
    assert torch.equal(filter_top_k(logits, 0), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_top_p(logits, p))[0].tolist()
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.7) == [True, True, False, False]
    assert kept(0.9) == [True, True, True, False]
    assert kept(1e-9) == [True, False, False, False]  # never empty
    assert kept(1.0) == [True, True, True, True]


@pytest.mark.parametrize("k,p", [(50, 0.8), (3, 0.5), (1000, 0.95), (7, 0.999)])
def test_top_p_after_top_k_keeps_what_the_whole_vocabulary_rule_keeps(k, p):
    """top-p orders only the tokens top-k left: the kept set must be the rule's, applied by sorting
    the whole vocabulary (transformers' way)."""
    torch.manual_seed(k)
    logits = filter_top_k(torch.randn(2, 1000) * 3, k)
    ascending, order = logits.sort(dim=-1)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - p
    drop[..., -1] = False
    expected = logits.masked_fill(drop.scatter(-1, order, drop), NEG)
    assert torch.equal(filter_top_p(logits, p), expected)


def test_sampling_follows_the_distribution_and_the_seed():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    draws = lambda seed: [
        int(Sampler(SamplingParams(temperature=1.0, top_k=0, seed=seed + i), 3, torch.tensor([[0]]))(logits))
        for i in range(600)
    ]  # fmt: skip
    sample = draws(0)
    assert sample == draws(0)
    expected = logits.softmax(-1)[0]
    for token in range(3):
        assert sample.count(token) / len(sample) == pytest.approx(float(expected[token]), abs=0.06)


@pytest.mark.parametrize(
    "bad", [dict(temperature=-1), dict(top_p=1.5), dict(top_k=-1), dict(repetition_penalty=0)]
)
def test_invalid_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_a_draw_among_the_top_k_follows_their_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -5.0, 0.5]])
    sampler = lambda seed: Sampler(SamplingParams(temperature=1.0, top_k=2, seed=seed), 5, torch.tensor([[3]]))  # noqa: E731
    sample = [int(sampler(seed)(logits)) for seed in range(600)]
    assert set(sample) == {1, 2}
    expected = logits[0, [1, 2]].softmax(-1)
    assert sample.count(2) / len(sample) == pytest.approx(float(expected[1]), abs=0.06)
