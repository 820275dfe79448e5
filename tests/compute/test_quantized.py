"""Weight-only int8 / int4 quantization (deepseek_vl2/compute/quantized.py).

The kernel tests run on the CPU; the model tests on DEEPSEEK_VL2_TEST_DEVICE (tests/parity.py), so
that gpu_check's parity-quantized stage runs them on CUDA.

- Storage: quantize then dequantize stays within half a step of every weight.
- int4 packing: the layout `dequantize` follows is the one torch's CPU kernel reads, at every
  kernel level this machine has (ATEN_CPU_CAPABILITY: the module is level-sensitive, so it runs
  under each; one test also starts each level in a subprocess, so that any one run covers them
  all), and a packing no layout describes stops the load.
- Kernels: every quantized product (the few-row kernel, the many-row dequantize path, the grouped,
  gathered and dense experts) equals the same product with the dequantized weights, to the
  rounding of a bf16 product.
- Model: which modules are swapped, streaming load (equal to quantizing the loaded bf16 weights,
  one matrix in flight at a time), the knob, and cache keys.
- Drift: logits of int8 and int4 against the bf16 model on every fixture case, at every step of
  bf16's greedy run (printed; run with -s); int8 must reproduce bf16's greedy tokens on every
  firm step.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_levels import level_settings, native_level, supported_levels
from parity import CHECKPOINTS, DEVICE, conversation, model_cases, model_inputs

from deepseek_vl2 import DeepseekVL2, Engine, Processor
from deepseek_vl2.compute import int4_layout
from deepseek_vl2.compute import quantized as quantize
from deepseek_vl2.compute.execution import Execution, Linear
from deepseek_vl2.compute.quantized import (
    Int4Weight, Int8Weight, QuantizedWeight, QuantizeSpec, fitting_group_size,
)  # fmt: skip
from deepseek_vl2.engine.settings import QUANTIZE_ENV, QUANTIZE_GROUP_ENV, default_quantize
from deepseek_vl2.model import streaming_quantizer
from deepseek_vl2.model.moe import Experts, Gate
from deepseek_vl2.model.quantized_modules import (
    QuantizedExperts, QuantizedLinear, quantize_model, quantized_bytes,
)  # fmt: skip
from deepseek_vl2.model.streaming_quantizer import StreamingQuantizer

# The int4 layout depends on torch's CPU kernel level: run this module under each.
pytestmark = pytest.mark.kernel_level

CPU = torch.device("cpu")
SPECS = {"int8": QuantizeSpec("int8"), "int4": QuantizeSpec("int4", 128), "int4-g32": QuantizeSpec("int4", 32)}
# bf16 rounds to 8 significant bits: a product accumulated in fp32 from bf16 (or bf16-rounded)
# weights and rounded once is within 2^-7 of the sum of its terms' magnitudes.
BF16_PRODUCT = 2.0**-7
# Steps whose top-1/top-2 gap in bf16 is at least this decide a token (as in test_bf16.py).
FIRM_MARGIN = 0.5
GREEDY_STEPS = 24
# int8 may change a firmly chosen token (bf16 margin >= FIRM_MARGIN) in one fixture case of the
# fifteen: a router near-tie upstream can flip one expert choice and move the logits by several
# units, as test_bf16 allows bf16 itself once. Measured: on tiny-mla-noaux/m_text, step 1 (margin 2.7),
# layer 1's router separates its 3rd and 4th experts by 0.0096; int8's rounding, summed over the
# five matrices before it (undoing any one restores the choice), swaps them and moves the logits
# by 4.4. int8 is absmax round-to-nearest per channel, as specified: no freedom is left in it.
MAY_FLIP = 1


def quantized(spec: QuantizeSpec, weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """`weight` [*lead, out, in] quantized, matrix by matrix, on its device."""
    *lead, n, k = weight.shape
    q = spec.empty(tuple(lead), n, k, dtype, weight.device)
    for index in itertools.product(*map(range, lead)):
        q.store(index, weight[index])
    return q


def awkward_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random weights with the awkward cases: an all-zero row, a constant row, an all-positive
    row far from zero, and an outlier."""
    torch.manual_seed(seed)
    w = torch.randn(n, k) / math.sqrt(k)
    w[0] = 0
    w[1] = 0.25
    w[2] = 3.0 + torch.rand(k) * 0.01
    w[3, 5] = 40.0
    return w


def steps(weight: QuantizedWeight) -> torch.Tensor:
    """The quantization step of every weight [*lead, out, in], in fp32."""
    if isinstance(weight, Int8Weight):
        return weight.scale.float()[..., None].expand(weight.shape)
    assert isinstance(weight, Int4Weight)
    s = weight.scale[..., : weight.out_features, 0].float().transpose(-1, -2)  # [*, out, groups]
    return s.repeat_interleave(weight.group_size, dim=-1)


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 128), (608, 64), (130, 96), (2, 70, 160)])
def test_dequantized_weights_are_within_half_a_step(name, dtype, shape):
    spec = SPECS[name]
    if spec.mode == "int8" and len(shape) == 3:
        shape = (2, 70, 161)  # int8 has no group: any width
    w = awkward_weight(math.prod(shape[:-1]), shape[-1]).view(shape).to(dtype)
    q = quantized(spec, w, dtype)
    assert q.shape == shape
    for target in (torch.float32, dtype):
        restored = q.dequantize(target).float()
        assert restored.shape == shape
        error = (restored - w.float()).abs()
        # Plus the rounding of the dequantized value itself when it is written in bf16.
        rounding = restored.abs() * 2.0**-8 if target == torch.bfloat16 else 1e-6 * restored.abs()
        assert bool((error <= steps(q) / 2 * (1 + 1e-5) + rounding + 1e-30).all()), float(
            (error - steps(q) / 2).max()
        )
    # Zero rows stay zero, whatever the format.
    assert not q.dequantize(torch.float32).reshape(-1, shape[-1])[0].any()


def kernel_view(q: Int4Weight) -> torch.Tensor:
    """The weights [*lead, out, in] as torch's CPU int4 kernel reads them: its product with the
    identity, exact (each output is one weight times 1, accumulated in fp32), in the weights' dtype."""
    eye = torch.eye(q.in_features, dtype=q.dtype)
    views = [
        torch.ops.aten._weight_int4pack_mm_for_cpu(eye, q.data[index], q.group_size, q.scale[index]).T
        for index in itertools.product(*map(range, q.lead))
    ]
    return torch.stack(views).view(*q.lead, q.padded_out, q.in_features)[..., : q.out_features, :]


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("shape", [(64, 128), (608, 64), (130, 256), (2, 70, 256), (3, 2, 192, 128)])
def test_int4_dequantizes_exactly_the_weights_the_kernel_reads(shape, group):
    q = quantized(QuantizeSpec("int4", group), awkward_weight(math.prod(shape[:-1]), shape[-1]).view(shape).bfloat16())
    kernel = kernel_view(q)
    assert torch.equal(q.dequantize(torch.bfloat16), kernel)
    # In fp32 too: bf16 scales and zero points make every weight exact in fp32.
    assert torch.equal(q.dequantize(torch.float32).bfloat16(), kernel)
    # With fp32 scales the weights are not exact in fp32: the kernel computes (q - 8) s + z, rounded
    # once (avx2, avx512: a fused multiply-add) or twice (default), dequantize q s + (z - 8 s), which
    # rounds z - 8 s too. The roundings differ, the layout must not: within fp32 roundings of the
    # terms' magnitudes, where a weight in the wrong place would be off by whole steps.
    w32 = awkward_weight(math.prod(shape[:-1]), shape[-1], seed=1).view(shape)
    q32 = quantized(QuantizeSpec("int4", group), w32, torch.float32)
    s = steps(q32)
    z = q32.scale[..., : q32.out_features, 1].float().transpose(-1, -2).repeat_interleave(q32.group_size, dim=-1)
    kernel = kernel_view(q32)
    error = (q32.dequantize(torch.float32) - kernel).abs()
    assert bool((error <= 2.0**-23 * (2 * kernel.abs() + z.abs() + 24 * s)).all())


# Run in a fresh process per kernel level: quantize a few weights (stacked experts among them) and
# compare `dequantize` with the kernel's own view, exactly; print the level and the verdict.
LEVEL_CHECK = """
import itertools, sys, torch
from deepseek_vl2.compute.quantized import QuantizeSpec
torch.manual_seed(0)
wrong = []
for shape, group in (((2, 130, 256), 128), ((192, 96), 32)):
    *lead, n, k = shape
    q = QuantizeSpec("int4", group).empty(tuple(lead), n, k, torch.bfloat16, torch.device("cpu"))
    w = torch.randn(shape).bfloat16()
    for index in itertools.product(*map(range, lead)):
        q.store(index, w[index])
    dense = q.dequantize(torch.bfloat16)
    eye = torch.eye(k, dtype=torch.bfloat16)
    for index in itertools.product(*map(range, lead)):
        kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, q.data[index], q.group_size, q.scale[index]).T
        if not torch.equal(dense[index], kernel[:n]):
            wrong.append(shape)
print(torch.backends.cpu.get_cpu_capability(), "wrong: %s" % wrong if wrong else "ok")
"""
def test_every_kernel_level_of_this_cpu_dequantizes_as_its_kernel():
    """A layout that is right for one level only passes a run under that level: this checks every
    level this CPU has (tests/kernel_levels.py: default and avx2 on any x86-64 with AVX2, avx512
    where the CPU has it), each in a subprocess, whatever level this run was given."""
    root = Path(__file__).resolve().parents[2]
    native = native_level()
    levels = supported_levels(native)
    # One thread each: the check is small, and the processes run side by side.
    base = {name: value for name, value in os.environ.items() if name != "ATEN_CPU_CAPABILITY"}
    base["OMP_NUM_THREADS"] = "1"
    runs = {
        level: subprocess.Popen(
            [sys.executable, "-c", LEVEL_CHECK], env=base | level_settings(level, native),
            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for level in levels
    }
    outputs = {level: run.communicate(timeout=300)[0].strip() for level, run in runs.items()}
    for level, run in runs.items():
        report = outputs[level].splitlines()[-1] if outputs[level] else ""
        assert run.returncode == 0 and report.endswith(" ok"), (level, outputs[level])
        assert report.split()[0].lower() == level, (level, report)  # the level really ran


def swapped_block_pair(q: torch.Tensor) -> torch.Tensor:
    """Rows 64-127 and 128-191 swapped (the first row block as torch packs it)."""
    order = torch.arange(q.shape[0])
    if q.shape[0] >= 192:
        order[64:192] = torch.cat([order[128:192], order[64:128]])
    return q[order]


def swapped_last_columns(q: torch.Tensor) -> torch.Tensor:
    order = torch.arange(q.shape[1])
    order[-2:] = order[-2:].flip(0)
    return q[:, order]


# Packings that no Int4Layout describes, as torch's pack op after a permutation of its input: rows
# in reverse (the fit fails), the first row block right but not the repetition (only the 192-row
# probe sees it), the first columns right but not the last two (only the whole map sees it).
UNKNOWN_PACKINGS = {
    "reversed-rows": lambda q: q.flip(0),
    "swapped-blocks": swapped_block_pair,
    "swapped-last-columns": swapped_last_columns,
}


@pytest.fixture
def fresh_layouts():
    """No layout learned yet (the test patches the pack op), nor left behind."""
    learned = int4_layout.cpu_int4_layout  # the test may patch it too
    learned.cache_clear()
    yield
    learned.cache_clear()


@pytest.mark.parametrize("packing", UNKNOWN_PACKINGS)
def test_an_unknown_int4_packing_stops_the_load(monkeypatch, fresh_layouts, packing):
    pack = int4_layout.pack_int4_cpu
    monkeypatch.setattr(int4_layout, "pack_int4_cpu", lambda q: pack(UNKNOWN_PACKINGS[packing](q).contiguous()))
    with pytest.raises(RuntimeError, match=r"int4 packing of torch .* at CPU kernel level .* is unknown"):
        SPECS["int4"].empty((2,), 130, 256, torch.bfloat16, CPU)
    if packing == "reversed-rows":  # a whole load, too: before any weight is stored
        with pytest.raises(RuntimeError, match="int4 packing .* is unknown"):
            DeepseekVL2.from_pretrained(CHECKPOINTS / "tiny-mha", CPU, torch.bfloat16, quantize=SPECS["int4"])
    # CUDA weights never ask (no layout is learned for them): CUDA int4 runs on its own kernel.
    monkeypatch.setattr(int4_layout, "cpu_int4_layout", lambda k: pytest.fail("a CPU layout asked for CUDA"))
    if torch.cuda.is_available():
        SPECS["int4"].empty((2,), 130, 256, torch.bfloat16, torch.device("cuda"))


def test_the_learned_layout_is_the_pack_ops_whole_map(fresh_layouts):
    """The layout reproduces where every nibble of a probe went (checked at load; here for a width
    the model tests do not use), and int8 asks for none."""
    layout = int4_layout.cpu_int4_layout(6848)  # tiny's dense down projection
    for n in int4_layout.INT4_PROBE_ROWS:
        rows, columns = int4_layout.probe_int4_pack(n, 6848)
        expected_rows, expected_columns = layout.positions(n, 6848)
        shape = (n // layout.block_rows, 6848, layout.block_rows // 2, 2)
        assert torch.equal(rows.view(shape), expected_rows.expand(shape))
        assert torch.equal(columns.view(shape), expected_columns.expand(shape))
    assert int4_layout.cpu_int4_layout.cache_info().currsize == 1


def test_int4_groups_fit_the_input_width():
    assert fitting_group_size(1280, 128) == 128
    assert fitting_group_size(6848, 128) == 64  # tiny's dense down projection
    assert fitting_group_size(96, 128) == 32
    with pytest.raises(ValueError, match="group"):
        fitting_group_size(40, 128)
    with pytest.raises(ValueError, match="power of two"):
        QuantizeSpec("int4", 48)
    with pytest.raises(ValueError, match="quantization"):
        QuantizeSpec("int3")


def reference_product(x: torch.Tensor, weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """x @ dequantized^T in fp64, and the tolerance of a bf16 product: BF16_PRODUCT times the sum of
    the terms' magnitudes."""
    w = weight.dequantize(torch.float32).double()
    x64 = x.double().reshape(-1, x.shape[-1])
    return x64 @ w.T, BF16_PRODUCT * (x64.abs() @ w.abs().T) + 1e-6


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("shape", [(608, 64), (192, 160), (64, 1280)])
@pytest.mark.parametrize("rows", [1, 3, 8, 15])
def test_the_kernel_product_equals_the_dequantized_product(name, shape, rows):
    torch.manual_seed(rows)
    q = quantized(SPECS[name], awkward_weight(*shape, seed=rows).bfloat16())
    x = torch.randn(rows, 1, shape[1]).bfloat16()
    got = Execution(dequantize_min_rows=16).linear(x, q)
    assert got.shape == (rows, 1, shape[0]) and got.dtype == torch.bfloat16
    expected, tolerance = reference_product(x, q)
    assert bool(((got.double().view(rows, -1) - expected).abs() <= tolerance).all())


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("upcast", [True, False])
@pytest.mark.parametrize("rows", [16, 40])
def test_many_rows_dequantize_and_compute_in_the_executions_dtype(name, upcast, rows):
    torch.manual_seed(rows)
    q = quantized(SPECS[name], awkward_weight(608, 96, seed=rows).bfloat16())
    x = torch.randn(rows, 96).bfloat16()
    bias = torch.randn(608).bfloat16()
    execution = Execution(upcast_min_rows=16 if upcast else 0, dequantize_min_rows=16)
    got = execution.linear(x, q, bias)
    expected, tolerance = reference_product(x, q)
    expected = expected + bias.double()
    assert got.dtype == torch.bfloat16
    assert bool(((got.double() - expected).abs() <= tolerance + expected.abs() * 2.0**-8).all())
    if upcast:  # exactly the fp32 product of the dequantized weights, rounded once
        dense = q.dequantize(torch.float32)
        torch.testing.assert_close(got, F.linear(x.float(), dense, bias.float()).bfloat16(), rtol=0, atol=0)


def test_the_dequantize_buffer_starts_cold_then_is_reused_and_grown():
    small = quantized(SPECS["int4"], awkward_weight(64, 64).bfloat16())
    large = quantized(SPECS["int8"], awkward_weight(640, 128, seed=1).bfloat16())
    execution = Execution(dequantize_min_rows=1)
    errors: list[BaseException] = []

    def products() -> None:
        try:
            # A new thread has no buffer yet (they are per thread): the first product allocates
            # it, the second grows it, the third reuses the grown one.
            for weight in (small, large, small):
                x = torch.randn(20, weight.in_features).bfloat16()
                expected, tolerance = reference_product(x, weight)
                error = (execution.linear(x, weight).double() - expected).abs()
                assert bool((error <= tolerance + expected.abs() * 2.0**-8).all())
        except BaseException as error:  # reported by the test's thread
            errors.append(error)

    thread = threading.Thread(target=products)
    thread.start()
    thread.join()
    assert errors == []


def test_fp32_models_use_the_kernels_too():
    q = quantized(SPECS["int4"], awkward_weight(128, 128).float(), torch.float32)
    x = torch.randn(2, 128)
    expected = x.double() @ q.dequantize(torch.float32).double().T
    torch.testing.assert_close(q.linear(x).double(), expected, rtol=1e-4, atol=1e-4)


def expert_fixture(name: str) -> tuple[QuantizedExperts, Experts, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantized experts, the same experts with the dequantized weights in fp32, and a routed batch."""
    torch.manual_seed(1)
    n_experts, dim, width = 6, 64, 96
    with torch.device("meta"):
        plain = Experts(n_experts, dim, width)
    experts = QuantizedExperts(plain, SPECS[name])
    experts.allocate(CPU, torch.bfloat16)
    for expert in range(n_experts):
        experts.w_gate_up.store((expert,), (torch.randn(2 * width, dim) / 8).bfloat16())
        experts.w_down.store((expert,), (torch.randn(dim, width) / 10).bfloat16())
    reference = Experts(n_experts, dim, width)
    with torch.no_grad():
        reference.w_gate_up.copy_(experts.w_gate_up.dequantize(torch.float32))
        reference.w_down.copy_(experts.w_down.dequantize(torch.float32))
    tokens = 5
    x = torch.randn(tokens, dim).bfloat16()
    weights = torch.rand(tokens, 2).softmax(-1)
    indices = torch.stack([torch.randperm(n_experts)[:2] for _ in range(tokens)])
    return experts, reference, x, weights, indices


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize(
    "execution",
    [
        Execution(dequantize_min_rows=16),  # grouped, the kernel (few tokens per expert)
        Execution(dequantize_min_rows=1),  # grouped, dequantized
        Execution(sync_free_expert_tokens=64, sync_free_experts="gathered"),
        Execution(sync_free_expert_tokens=64, sync_free_experts="dense"),
    ],
    ids=["grouped-kernel", "grouped-dequantized", "gathered", "dense"],
)
def test_every_expert_path_equals_the_dequantized_experts(name, execution):
    experts, reference, x, weights, indices = expert_fixture(name)
    experts.execution = execution
    with torch.inference_mode():
        got = experts(x, weights, indices).float()
        expected = reference(x.float(), weights, indices)
    # Two bf16 products and a bf16 intermediate: within a few bf16 roundings of the output's scale.
    torch.testing.assert_close(got, expected, rtol=0, atol=4 * 2.0**-8 * float(expected.abs().max()))


@pytest.mark.parametrize("paths", ["gathered", "dense"])
def test_sync_free_expert_paths_never_sync(monkeypatch, paths):
    experts, _, x, weights, indices = expert_fixture("int4")
    experts.execution = Execution(sync_free_expert_tokens=64, sync_free_experts=paths)

    def host_sync(*args, **kwargs):
        raise AssertionError("host sync in a sync-free expert path")

    for method in ("item", "tolist", "__bool__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, host_sync)
    with torch.inference_mode():
        experts(x, weights, indices)


@pytest.fixture(scope="module")
def bf16_models() -> dict[str, DeepseekVL2]:
    names = sorted({c["checkpoint"] for c in model_cases()})
    return {name: DeepseekVL2.from_pretrained(CHECKPOINTS / name, DEVICE, torch.bfloat16) for name in names}


@pytest.fixture(scope="module")
def quantized_models() -> dict[tuple[str, str], DeepseekVL2]:
    names = sorted({c["checkpoint"] for c in model_cases()})
    return {
        (mode, name): DeepseekVL2.from_pretrained(CHECKPOINTS / name, DEVICE, torch.bfloat16, quantize=SPECS[mode])
        for mode in ("int8", "int4")
        for name in names
    }


def test_only_the_language_models_linear_weights_are_quantized(bf16_models, quantized_models):
    model = quantized_models[("int4", "tiny-mla")]
    swapped = {name for name, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))}
    assert swapped and all(name.startswith("language.") for name in swapped)
    assert "language.lm_head" in swapped
    layer = model.language.model.layers[1]
    assert isinstance(layer.mlp.experts, QuantizedExperts)
    assert isinstance(layer.mlp.shared_experts.gate_up, QuantizedLinear)
    assert isinstance(layer.self_attn.q_proj, QuantizedLinear) and isinstance(layer.self_attn.o_proj, QuantizedLinear)
    assert isinstance(model.language.model.layers[0].mlp.down_proj, QuantizedLinear)
    # Kept in the model dtype: MLA's kv_b (read whole by the absorbed decode), the vision tower,
    # the projector, embeddings, norms; routers in fp32.
    assert type(layer.self_attn.kv_b_proj) is Linear and layer.self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    assert isinstance(layer.mlp.gate, Gate) and layer.mlp.gate.weight.dtype == torch.float32
    kept = [p for name, p in model.named_parameters() if not name.startswith("language.")]
    assert kept and all(p.dtype == torch.bfloat16 for p in kept)
    assert model.language.model.embed_tokens.weight.dtype == torch.bfloat16
    before, after = quantized_bytes(model)
    assert after < before / 3  # int4 plus scales, against bf16
    assert model.quantization.name == "int4-g128"


def test_loading_quantizes_the_checkpoints_weights_a_block_of_rows_at_a_time(bf16_models, monkeypatch):
    # 64 rows, in the formats and in the loader that stages blocks for them: the head has 10 blocks.
    for module in (quantize, streaming_quantizer):
        monkeypatch.setattr(module, "QUANTIZE_CHUNK_ROWS", quantize.INT4_ROW_BLOCK)
    in_flight: list[int] = []
    original = StreamingQuantizer.fill

    def recording_fill(self, param, index, read):
        def recorded_read(a, b):
            rows = read(a, b)
            in_flight.append(self.staged_bytes)
            return rows

        original(self, param, index, recorded_read)

    monkeypatch.setattr(StreamingQuantizer, "fill", recording_fill)
    loaded = DeepseekVL2.from_pretrained(CHECKPOINTS / "tiny-mha", DEVICE, torch.bfloat16, quantize=SPECS["int4"])
    bf16 = bf16_models["tiny-mha"]
    # Never a whole large matrix in flight: at most two blocks (q/k/v and an expert's gate and up
    # come as separate tensors), each of 64 rows.
    widest = max(p.shape[1] for p in bf16.language.parameters() if p.dim() == 2)
    head = bf16.language.lm_head.weight
    assert in_flight and max(in_flight) <= 2 * 64 * widest * 2 < head.nbytes
    # The same as quantizing the bf16 model's (loaded) weights directly.
    direct = quantized(SPECS["int4"], bf16.language.model.layers[2].mlp.experts.w_gate_up)
    assert torch.equal(loaded.language.model.layers[2].mlp.experts.w_gate_up.data, direct.data)
    assert torch.equal(loaded.language.model.layers[2].mlp.experts.w_gate_up.scale, direct.scale)
    head = quantized(SPECS["int4"], bf16.language.lm_head.weight)
    assert torch.equal(loaded.language.lm_head.weight.data, head.data)
    assert torch.equal(loaded.language.lm_head.weight.scale, head.scale)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_streamed_blocks_in_any_order_give_the_matrix_quantized_whole(name, monkeypatch):
    for module in (quantize, streaming_quantizer):  # the formats, and the loader that stages blocks for them
        monkeypatch.setattr(module, "QUANTIZE_CHUNK_ROWS", 64)
    weight = awkward_weight(200, 256)  # 200 rows: blocks of 64, 64, 64 and 8 (int4 pads to 256)
    model = torch.nn.Module()
    model.language = torch.nn.Module()
    model.language.head = Linear(256, 200, bias=False)
    quantize_model(model, SPECS[name])
    model.language.head.allocate(torch.device("cpu"), torch.bfloat16)
    streaming = StreamingQuantizer(model)
    param = "language.head.weight"
    source = weight.bfloat16()
    # The region of rows 100..199 first, read in two pieces, then rows 0..99: blocks complete out of order.
    streaming.fill(param, (slice(100, 200),), lambda a, b: source[100 + a : 100 + b])
    assert streaming.incomplete() == [param] and streaming.staged_bytes == 64 * 256 * 2  # the block at 64
    with pytest.raises(ValueError, match="already filled"):
        streaming.fill(param, (slice(150, 160),), lambda a, b: source[150 + a : 150 + b])
    streaming.fill(param, (slice(0, 100),), lambda a, b: source[a:b])
    assert streaming.incomplete() == [] and streaming.staged_bytes == 0
    whole = quantized(SPECS[name], source)
    stored = model.language.head.weight
    assert torch.equal(stored.data, whole.data) and torch.equal(stored.scale, whole.scale)
    with pytest.raises(ValueError, match="whole rows"):
        streaming.region_shape(param, (slice(0, 10), slice(0, 5)))


def test_the_knob(monkeypatch):
    monkeypatch.delenv(QUANTIZE_ENV, raising=False)
    monkeypatch.delenv(QUANTIZE_GROUP_ENV, raising=False)
    assert default_quantize() == QuantizeSpec("none")
    assert default_quantize({QUANTIZE_ENV: "int4"}) == QuantizeSpec("int4", 128)
    assert default_quantize({QUANTIZE_ENV: "int4", QUANTIZE_GROUP_ENV: "64"}).name == "int4-g64"
    with pytest.raises(ValueError, match=QUANTIZE_ENV):
        default_quantize({QUANTIZE_ENV: "fp8"})
    with pytest.raises(ValueError, match=QUANTIZE_GROUP_ENV):
        default_quantize({QUANTIZE_ENV: "int4", QUANTIZE_GROUP_ENV: "100"})
    monkeypatch.setenv(QUANTIZE_ENV, "int8")
    engine = Engine.from_pretrained(CHECKPOINTS / "tiny-mha", device="cpu", dtype=torch.bfloat16, prefix_cache_bytes=0)
    try:
        assert engine.model.quantization.mode == "int8"
        assert isinstance(engine.model.language.lm_head, QuantizedLinear)
    finally:
        engine.close()


def test_prefix_cache_keys_include_the_mode(bf16_models, quantized_models):
    identities = set()
    for model in [bf16_models["tiny-mha"]] + [quantized_models[(mode, "tiny-mha")] for mode in ("int8", "int4")]:
        model_id = model.weights_id
        engine = Engine(model, Processor.from_pretrained(CHECKPOINTS / "tiny-mha"), prefix_cache_bytes=0)
        engine.close()
        assert model_id in engine._cache_identity
        identities.add(engine._cache_identity)
    assert len(identities) == 3


@pytest.fixture(scope="module")
def bf16_greedy(bf16_models) -> dict[str, list[int]]:
    """bf16's greedy run of every fixture case, through the engine as served."""
    runs = {}
    for name, model in bf16_models.items():
        engine = Engine(model, Processor.from_pretrained(CHECKPOINTS / name), prefix_cache_bytes=0)
        for c in model_cases():
            if c["checkpoint"] == name:
                messages, images = conversation(c)
                result = engine.generate(
                    messages, images, max_new_tokens=GREEDY_STEPS, temperature=0, repetition_penalty=1.0
                )
                runs[c["key"]] = result.token_ids
        engine.close()
    return runs


def image_spans(model: DeepseekVL2, c: dict) -> list[torch.Tensor]:
    """The case's image embeddings: the vision tower and projector are never quantized, so one
    model's serve every mode."""
    inputs = model_inputs(c)
    with torch.inference_mode():
        return model.encode_images(inputs["pixel_values"].to(model.device), inputs["images_spatial_crop"])


def step_logits(model: DeepseekVL2, c: dict, tokens: list[int], spans: list[torch.Tensor]) -> torch.Tensor:
    """fp32 logits [steps, V] that chose each token of `tokens` after the case's prompt (teacher
    forced: the prompt and the tokens before it), one forward without cache."""
    inputs = model_inputs(c)
    prompt = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"][0], torch.tensor(tokens[:-1], dtype=torch.long)])
    mask = torch.cat([inputs["images_seq_mask"][0], torch.zeros(len(tokens) - 1, dtype=torch.bool)])
    with torch.inference_mode():
        embeds = model.embed_prompt(ids, mask, spans)[None]
        language = model.language
        hidden = language(embeds, language.context(torch.arange(ids.shape[0], device=model.device)[None]))
        return language.logits(hidden)[0, prompt - 1 :]


def test_logit_drift_against_bf16(bf16_models, quantized_models, bf16_greedy):
    print(f"\n{'case':24} {'mode':5} {'steps':>5} {'firm':>4} {'max|dlogit|':>11} {'mean|dlogit|':>12} {'top-1':>6}")
    totals: dict[str, list[float]] = {"int8": [], "int4": []}
    agree: dict[str, list[bool]] = {"int8": [], "int4": []}
    firm_disagreements: list[str] = []
    for c in model_cases():
        tokens = bf16_greedy[c["key"]]
        spans = image_spans(bf16_models[c["checkpoint"]], c)
        reference = step_logits(bf16_models[c["checkpoint"]], c, tokens, spans)
        top2 = reference.topk(2, dim=-1).values
        firm = (top2[:, 0] - top2[:, 1]) >= FIRM_MARGIN
        for mode in ("int8", "int4"):
            logits = step_logits(quantized_models[(mode, c["checkpoint"])], c, tokens, spans)
            diff = (logits - reference).abs()
            same = logits.argmax(-1) == reference.argmax(-1)
            totals[mode].append(float(diff.max()))
            agree[mode] += same.tolist()
            print(
                f"{c['key']:24} {mode:5} {len(tokens):5d} {int(firm.sum()):4d} {float(diff.max()):11.3f} "
                f"{float(diff.mean()):12.4f} {float(same.float().mean()):6.1%}"
            )
            if mode == "int8" and not bool(same[firm].all()):
                firm_disagreements.append(c["key"])
    for mode in totals:
        agreement = sum(agree[mode]) / len(agree[mode])
        print(f"{mode}: max |dlogit| {max(totals[mode]):.3f}, top-1 agreement {agreement:.1%}")
    print(f"int8 changes a firmly chosen token in: {firm_disagreements or 'no case'}")
    assert len(firm_disagreements) <= MAY_FLIP, "int8 changes tokens that bf16 chose by a firm margin"
    # int4 drifts more than int8, but it must still be the same model.
    assert max(totals["int8"]) < max(totals["int4"])
    assert sum(agree["int4"]) / len(agree["int4"]) > 0.5


def test_int8_greedy_reproduces_bf16_on_its_firm_steps(bf16_models, quantized_models, bf16_greedy):
    """Served greedy answers, int8 against bf16, up to the first step bf16 decided by less than a
    firm margin: equal in every case but at most MAY_FLIP."""
    flipped = []
    for c in model_cases():
        tokens = bf16_greedy[c["key"]]
        model = bf16_models[c["checkpoint"]]
        top2 = step_logits(model, c, tokens, image_spans(model, c)).topk(2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
        firm = next((i for i, m in enumerate(margins) if m < FIRM_MARGIN), len(margins))
        processor = Processor.from_pretrained(CHECKPOINTS / c["checkpoint"])
        engine = Engine(quantized_models[("int8", c["checkpoint"])], processor, prefix_cache_bytes=0)
        try:
            messages, images = conversation(c)
            result = engine.generate(
                messages, images, max_new_tokens=GREEDY_STEPS, temperature=0, repetition_penalty=1.0
            )
        finally:
            engine.close()
        print(f"\n{c['key']}: {firm} leading firm steps, int8 {result.token_ids}, bf16 {tokens}")
        if result.token_ids[:firm] != tokens[:firm]:
            flipped.append(c["key"])
    print(f"int8 greedy leaves bf16's firm tokens in: {flipped or 'no case'}")
    assert len(flipped) <= MAY_FLIP, flipped
