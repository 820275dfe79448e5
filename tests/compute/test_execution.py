"""Every device-specific branch, forced on the CPU: each computes what the plain path computes."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from deepseek_vl2.compute import execution as execution_module
from deepseek_vl2.compute.execution import Execution, Linear, upcast
from deepseek_vl2.model.moe import Experts

# Products, attention and routing differ in rounding between torch's CPU kernel levels (Makefile).
pytestmark = pytest.mark.kernel_level


def test_each_device_gets_its_branches():
    cuda = Execution.for_device(torch.device("cuda"), torch.bfloat16)
    assert cuda.sync_free_expert_tokens > 0 and not cuda.upcast_min_rows and not cuda.fp32_attention
    cpu32 = Execution.for_device(torch.device("cpu"), torch.float32)
    assert cpu32.transposed_max_rows > 1 and not cpu32.sync_free_expert_tokens
    cpu16 = Execution.for_device(torch.device("cpu"), torch.bfloat16)
    assert cpu16.upcast_min_rows > 0 and cpu16.fp32_attention
    with pytest.raises(ValueError, match="sync_free_experts"):
        Execution(sync_free_experts="sometimes")


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_products_equal_the_plain_product(rows, bias):
    torch.manual_seed(rows)
    layer = Linear(96, 300, bias=bias)
    x = torch.randn(rows, 1, 96)  # 3-D, as activations arrive
    expected = F.linear(x, layer.weight, layer.bias)
    layer.execution = Execution(transposed_max_rows=16)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        assert layer(x).shape == (rows, 1, 300)


@pytest.mark.parametrize("rows", [1, 3, 16, 64])
def test_bf16_weights_compute_large_products_in_fp32(rows):
    torch.manual_seed(0)
    weight = torch.randn(200, 64).bfloat16()
    x = torch.randn(rows, 64).bfloat16()
    execution = Execution(upcast_min_rows=16)
    got = execution.linear(x, weight)
    if rows >= 16:  # exactly an fp32 product of the bf16 values, rounded once
        torch.testing.assert_close(got, F.linear(x.float(), weight.float()).bfloat16(), rtol=0, atol=0)
    else:
        torch.testing.assert_close(got, F.linear(x, weight), rtol=0, atol=0)
    assert got.dtype == torch.bfloat16


@pytest.mark.parametrize("rows", [2, 5, 15])
@pytest.mark.parametrize("bias", [False, True])
def test_few_row_upcast_streams_the_weight_in_blocks_and_computes_the_fp32_product(rows, bias, monkeypatch):
    # Blocks of 3 weight rows over 200: 67 blocks, the last one partial.
    monkeypatch.setattr(execution_module, "FEW_UPCAST_BLOCK_VALUES", 3 * 64)
    torch.manual_seed(rows)
    weight, x = torch.randn(200, 64).bfloat16(), torch.randn(rows, 1, 64).bfloat16()
    b = torch.randn(200).bfloat16() if bias else None
    got = Execution(few_upcast_max_rows=15).linear(x, weight, b)
    assert got.shape == (rows, 1, 200) and got.dtype == torch.bfloat16
    # The fp32 product rounded once: within half a bf16 step of it (2^-8 relative), up to fp32's
    # summation order.
    exact = F.linear(x.float(), weight.float(), None if b is None else b.float())
    torch.testing.assert_close(got.float(), exact, rtol=2**-8, atol=1e-5)
    assert (got == exact.bfloat16()).float().mean() > 0.99


def test_few_row_upcast_takes_only_few_rows_of_low_precision_weights(monkeypatch):
    calls = []
    monkeypatch.setattr(execution_module, "upcast_blocks", lambda x, w, b=None: calls.append(x.shape[0]))
    torch.manual_seed(1)
    execution = Execution(few_upcast_max_rows=15)
    weight = torch.randn(200, 64).bfloat16()
    for rows in (1, 2, 15, 16):  # one row and many rows keep the plain bf16 product
        execution.linear(torch.randn(rows, 64).bfloat16(), weight)
    execution.linear(torch.randn(4, 64), torch.randn(200, 64))  # fp32: nothing to upcast
    Execution().linear(torch.randn(4, 64).bfloat16(), weight)  # not chosen
    assert calls == [2, 15]


def test_the_upcast_buffer_is_reused_and_grows():
    small, large = torch.randn(10, 4).bfloat16(), torch.randn(30, 8).bfloat16()
    first = upcast(small).clone()
    second = upcast(large)
    assert torch.equal(first, small.float()) and torch.equal(second, large.float())
    assert torch.equal(upcast(small), small.float())  # written into the grown buffer


def test_a_buffer_made_in_inference_mode_is_not_written_outside_it():
    weight, results = torch.randn(30, 8).bfloat16(), []

    def fresh_thread() -> None:  # the buffers are per thread: this one starts without any
        with torch.inference_mode():
            upcast(weight)
        results.append(torch.equal(upcast(weight), weight.float()))

    thread = threading.Thread(target=fresh_thread)
    thread.start()
    thread.join()
    assert results == [True]


def random_experts(n_experts: int, dim: int, width: int, seed: int) -> Experts:
    torch.manual_seed(seed)
    experts = Experts(n_experts, dim, width)
    experts.w_gate_up.data = torch.randn(n_experts, 2 * width, dim) / dim**0.5
    experts.w_down.data = torch.randn(n_experts, dim, width) / width**0.5
    return experts


LAYOUTS = [  # (experts, per token, tokens): the fixtures', tiny's, top-1, more tokens than experts
    (8, 3, 1), (8, 3, 5), (64, 6, 1), (64, 6, 4), (64, 6, 16), (16, 1, 7), (4, 2, 20),
]  # fmt: skip


@pytest.mark.parametrize("n_experts,k,tokens", LAYOUTS)
def test_sync_free_experts_equal_the_grouped_path(n_experts, k, tokens):
    experts = random_experts(n_experts, dim=32, width=16, seed=tokens)
    x = torch.randn(tokens, 32)
    indices = torch.stack([torch.randperm(n_experts)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k)
    grouped = experts.forward_grouped(x, weights, indices)
    for path in ("gathered", "dense", "auto"):
        experts.execution = Execution(sync_free_expert_tokens=64, sync_free_experts=path)
        torch.testing.assert_close(experts(x, weights, indices), grouped, rtol=1e-5, atol=1e-5)


def test_the_dense_path_mixes_only_selected_experts():
    experts = random_experts(6, dim=8, width=4, seed=2)
    poisoned = 5
    experts.w_gate_up.data[poisoned] = float("nan")
    experts.w_down.data[poisoned] = float("nan")
    x, weights = torch.randn(3, 8), torch.rand(3, 2)
    indices = torch.randint(0, poisoned, (3, 2))
    assert torch.isfinite(experts.forward_dense(x, weights, indices)).all()


def test_auto_gathers_for_a_few_tokens_and_runs_dense_for_many(monkeypatch):
    experts = random_experts(64, dim=8, width=4, seed=3)
    experts.execution = Execution(sync_free_expert_tokens=64)
    taken: list[str] = []
    for name in ("forward_gathered", "forward_dense", "forward_grouped"):
        original = getattr(experts, name)
        monkeypatch.setattr(experts, name, lambda *a, _n=name, _f=original: taken.append(_n) or _f(*a))
    for tokens in (1, 4, 65):  # 6 picks move less than all 64 experts; 24 picks do not; 65 > limit
        experts(torch.randn(tokens, 8), torch.rand(tokens, 6), torch.randint(0, 64, (tokens, 6)))
    assert taken == ["forward_gathered", "forward_dense", "forward_grouped"]


@pytest.mark.parametrize("causal", [False, True])
def test_fp32_attention_over_bf16_values_is_fp32_attention_rounded_once(causal):
    torch.manual_seed(4)
    q = torch.randn(2, 4, 7, 16).bfloat16()
    cache = torch.randn(2, 9, 4, 16).bfloat16()  # [B, S, heads, dim], read as [B, heads, S, dim]
    k, v = cache.transpose(1, 2), cache.flip(1).transpose(1, 2)
    mask = None if causal else torch.rand(2, 1, 7, 9) > 0.3
    got = Execution(fp32_attention=True).attention(q, k, v, mask, causal=causal, scale=0.2)
    expected = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal, scale=0.2
    ).bfloat16()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 15, 16, 64, 100, 129])
def test_native_products_padded_to_a_row_multiple_equal_the_plain_product(rows):
    torch.manual_seed(rows)
    weight, bias = torch.randn(70, 48).bfloat16(), torch.randn(70).bfloat16()
    x = torch.randn(rows, 1, 48).bfloat16()
    execution = Execution(native_row_multiple=64)
    got = execution.linear(x, weight, bias)
    assert got.shape == (rows, 1, 70) and got.dtype == torch.bfloat16
    # Each output row depends on its input row alone, padded or not (bf16's own tolerance: the
    # kernels for another row count may round a value the other way).
    torch.testing.assert_close(got, F.linear(x, weight, bias))
    assert Execution.from_choices({"many": "native", "few": "plain", "attention": "native"}).native_row_multiple
    assert not Execution.from_choices({"many": "upcast", "few": "plain", "attention": "fp32"}).native_row_multiple
