"""scripts/benchmark.py's arithmetic: the bytes a decode step reads, the expert-union bound that
batched decode is measured against, and the routing it observes."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from parity import CHECKPOINTS
from script_modules import load_script

from deepseek_vl2 import DeepseekVL2

benchmark = load_script("benchmark")


@lru_cache
def _config(variant: str):
    return benchmark.config_for(variant, benchmark.Processor.from_pretrained(benchmark.TOKENIZER))


def test_the_expert_union_of_independently_routed_rows():
    config = _config("tiny")  # 6 of 64 experts a token
    assert benchmark.expected_union(config, 1) == pytest.approx(6)
    assert benchmark.expected_union(config, 4) == pytest.approx(64 * (1 - (58 / 64) ** 4))
    unions = [benchmark.expected_union(config, rows) for rows in range(1, 64)]
    assert all(a < b for a, b in zip(unions, unions[1:])) and unions[-1] < 64


def test_a_step_of_several_rows_reads_each_weight_once_and_each_rows_cache():
    config = _config("tiny")
    c = config.language
    one = benchmark.decode_bytes_per_token(config, torch.bfloat16, 100)
    assert benchmark.decode_bytes_per_token(config, torch.bfloat16, 100, None, 1, c.num_experts_per_tok) == one
    four = benchmark.decode_bytes_per_token(config, torch.bfloat16, 100, None, 4, 20)
    moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    extra_experts = (20 - c.num_experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size * moe_layers * 2
    extra_cache = 3 * c.cache_values_per_token * 100 * 2
    assert four - one == extra_experts + extra_cache


@pytest.mark.parametrize(("rows", "gain"), [(4, 2.02), (8, 2.75)])
def test_the_union_bound_of_tiny_is_the_issues(rows, gain):
    # Issue 23: reading the weights once bounds tiny's aggregate gain at 2.02x for 4 rows, 2.75x for 8.
    config = _config("tiny")
    union = benchmark.expected_union(config, rows)
    bound = benchmark.union_bound(config, torch.bfloat16, 0, None, 10.0, rows, union)
    assert bound == pytest.approx(10.0 * gain, rel=0.005)
    # Rows that route alike read one row's experts: the bound is then the rows times one row's rate.
    alike = benchmark.union_bound(config, torch.bfloat16, 0, None, 10.0, rows, config.language.num_experts_per_tok)
    assert alike == pytest.approx(10.0 * rows)


def test_the_routing_counter_counts_distinct_experts_of_full_batch_steps_only():
    model = DeepseekVL2.from_pretrained(CHECKPOINTS / "tiny-mha", dtype=torch.float32)
    moe = next(layer.mlp for layer in model.language.model.layers if hasattr(layer.mlp, "gate"))
    counter = benchmark.RoutingCounter(model)
    counter.start(3)
    torch.manual_seed(0)
    hidden = model.config.language.hidden_size
    with torch.inference_mode():
        three = torch.randn(3, hidden)
        expected = moe.gate(three)[1].unique().numel()  # counted too: a 3-row call
        moe.gate(torch.randn(5, hidden))  # another batch: not counted
    assert counter.counts() == [expected] and counter.mean() == expected
    counter.close()
    with torch.inference_mode():
        moe.gate(three)
    assert counter.counts() == [expected]  # removed hooks count nothing
