"""How the model's products run on its device: one explicit setting per model, so that every
device-specific branch can be forced and tested on the CPU.

On a GPU the setting is fixed (sync-free experts for the captured decode step). On the CPU the
fastest way to run a product depends on the processor, by large factors, so three choices are made
per machine (`choose_execution`: calibrated by timing the model's own shapes, see calibration.py,
or forced with DEEPSEEK_VL2_EXECUTION):

- `many`: products of at least MANY_ROWS rows (vision tower, prefill chunks) with bf16 weights run
  `native`ly in bf16, or are `upcast`: computed in fp32 from the bf16 weights, converted one weight
  at a time into a reused buffer, and rounded back. CPUs with bf16 units (avx512_bf16, AMX) run the
  native product 2-8x faster than fp32; without them (AVX2) it is about 8x slower.
- `few`: products of 2..MANY_ROWS-1 rows (batched decode) run `plain` as `x @ W^T`, or `transposed`
  as `W @ x^T`, which some BLAS kernels stream once for all rows instead of repacking the weight
  (fp32 on an AVX2 CPU, 129280x1280 head: 4 rows 34 ms against 129 ms), or, with bf16 weights,
  `upcast`: the weight converted to fp32 a cache-sized block at a time, each block multiplied by
  all rows while it is in cache. A CPU without bf16 units multiplies a few bf16 rows one
  matrix-vector pass per row, reading the weight once per row; this reads it once for all rows.
- `attention`: with bf16 values, attention runs `native`ly or over `fp32` copies (faster where the
  CPU's bf16 attention kernels are slow: 2.5-4x on an AVX2 CPU without bf16 units). Native
  attention goes only with native products: beside fp32 products it leaves the official bf16
  bounds on two fixture cases, and a CPU whose bf16 products are slow has slow bf16 attention too.

Experts: on CUDA the decode step is captured in a CUDA graph, which forbids the host sync of the
grouped path, so few tokens use a sync-free path (`Experts` picks gathered or dense by cost).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

EXECUTION_ENV = "DEEPSEEK_VL2_EXECUTION"

# Products of at least this many rows are "many-row" (compute-bound); 2 up to it "few-row".
MANY_ROWS = 16
NATIVE_ROW_MULTIPLE = 64  # see Execution.native_row_multiple
# fp32 values of one block of a weight that few-row `upcast` products convert at a time (2 MiB):
# small enough to stay in the cache of a desktop CPU until all rows have used it, large enough that
# Python's cost per block (about 15 us) stays small beside the block's conversion. tiny's decode step
# at 4 rows against one row's plain step, AVX2 kernels forced on a 2-core AVX512 Xeon
# (scripts/bench_few_rows.py): blocks of 0.5 MiB 2.40x, 2 MiB 1.88x, 8 MiB 2.11x.
FEW_UPCAST_BLOCK_VALUES = 2**19

# Each CPU choice and its options, the first being the baseline: what the CPU did before choices
# were made per machine, kept unless a measurement shows another option clearly faster.
CHOICES: dict[str, tuple[str, ...]] = {
    "many": ("upcast", "native"),
    "few": ("plain", "transposed", "upcast"),
    "attention": ("fp32", "native"),
}
# fp32 weights have nothing to upcast; their few-row products were transposed before.
FP32_BASELINE = {"many": "native", "few": "transposed", "attention": "native"}
PRESETS: dict[str, dict[str, str]] = {
    "upcast": {"many": "upcast", "attention": "fp32"},  # the CPU's bf16 mode as first tuned (AVX2)
    "native": {"many": "native", "attention": "native"},  # for CPUs with bf16 units
}


def baseline_choices(dtype: torch.dtype) -> dict[str, str]:
    if dtype == torch.float32:
        return dict(FP32_BASELINE)
    return {name: options[0] for name, options in CHOICES.items()}


def parse_choices(spec: str, dtype: torch.dtype) -> dict[str, str] | None:
    """A forced choice: a preset name (`upcast`, `native`) or `many=...,few=...,attention=...`
    (unnamed ones keep the baseline); None for `auto`. Raises ValueError naming the setting."""
    spec = spec.strip().lower() or "auto"
    if spec == "auto":
        return None
    choices = baseline_choices(dtype)
    if spec in PRESETS:
        return _valid(choices | PRESETS[spec], spec, dtype)
    for part in spec.split(","):
        name, _, option = (piece.strip() for piece in part.partition("="))
        if option not in CHOICES.get(name, ()):
            raise ValueError(
                f"{EXECUTION_ENV} must be auto, {', '.join(PRESETS)} or a list such as "
                f"'many=native,few=transposed,attention=native' with "
                + "; ".join(f"{n} one of {'/'.join(o)}" for n, o in CHOICES.items())
                + f"; got {spec!r}"
            )
        choices[name] = option
    return _valid(choices, spec, dtype)


def _valid(choices: dict[str, str], spec: str, dtype: torch.dtype) -> dict[str, str]:
    if choices in valid_choices(dtype):
        return choices
    if choices["few"] == "upcast":
        raise ValueError(
            f"{EXECUTION_ENV}: few=upcast needs bf16 weights (fp32 ones have nothing to upcast); got {spec!r}"
        )
    if choices["many"] == "upcast":
        raise ValueError(
            f"{EXECUTION_ENV}: attention=native needs many=native (fp32 products with bf16 "
            f"attention leave the official bf16 bounds on two fixture cases); got {spec!r}"
        )
    raise ValueError(
        f"{EXECUTION_ENV}: attention=native is not available at CPU kernel level "
        f"{torch.backends.cpu.get_cpu_capability()}, whose bf16 attention leaves the official bf16 "
        f"bounds; use attention=fp32; got {spec!r}"
    )


def native_attention_keeps_bounds() -> bool:
    """Whether torch's bf16 attention at the kernel level in use stays within the official bf16
    bounds. At DEFAULT (CPUs without AVX2, and oneDNN without its AVX2 kernels) two of the fifteen
    fixture cases leave them with native attention, with native or transposed few-row products
    alike; at AVX2 and AVX512 none do (measured with torch 2.13, tests/model/test_bf16.py)."""
    return torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def valid_choices(dtype: torch.dtype = torch.bfloat16) -> list[dict[str, str]]:
    """Every combination of options that can be chosen or forced for weights of `dtype`."""
    combinations: list[dict[str, str]] = [{}]
    for name, options in CHOICES.items():
        combinations = [c | {name: option} for c in combinations for option in options]
    native_attention = dtype == torch.float32 or native_attention_keeps_bounds()
    return [
        c for c in combinations
        if not (c["attention"] == "native" and (c["many"] == "upcast" or not native_attention))
        and not (c["few"] == "upcast" and dtype == torch.float32)  # nothing to upcast
    ]  # fmt: skip


def describe(choices: dict[str, str]) -> str:
    return ",".join(f"{name}={choices[name]}" for name in CHOICES)


if TYPE_CHECKING:
    from .quantized import QuantizedWeight

# Quantized products of this many rows or more dequantize, unless calibration measured where the
# weight's kernel and the dequantized product cross on this CPU (calibration.py). The crossing
# depends on the CPU and the mode: 2-core AVX512/AMX Xeon (scripts/bench_quantize.py, README
# Performance), tiny's experts and projections: against fp32 products (upcast) about 200 rows for
# int4 and 64-256 for int8; against native bf16 products about 128 for int4 and 64 for int8.
DEQUANTIZE_MIN_ROWS_CPU = 256


@dataclass(frozen=True)
class Execution:
    # Experts for batches of at most this many tokens run without a host sync (0: never), by
    # "gathered" or "dense" products, or "auto": whichever moves fewer bytes.
    sync_free_expert_tokens: int = 0
    sync_free_experts: str = "auto"
    # Products with 2..this many rows run as W @ x^T (0: never).
    transposed_max_rows: int = 0
    # Products with 2..this many rows and low-precision weights run in fp32, the weight converted a
    # block of FEW_UPCAST_BLOCK_VALUES at a time and each block multiplied by all rows (0: never).
    few_upcast_max_rows: int = 0
    # With low-precision weights, products of at least this many rows compute in fp32 (0: never).
    upcast_min_rows: int = 0
    # Attention over fp32 copies of low-precision queries, keys and values, the output rounded
    # back. It also keeps MLA's latent-space output unrounded until the value projection, where the
    # reference rounds the attention output once. Not on CUDA, where copying the cache every step
    # would cost more than it saves.
    fp32_attention: bool = False
    # Native low-precision products of at least MANY_ROWS rows pad their rows up to a multiple of
    # this (0: never). oneDNN's bf16 (AMX) kernels are made per shape and slow on ragged row counts,
    # and every expert of a prefill chunk gets its own count: padding makes them a few shapes (the
    # seed prompt's prefill, tiny, 2-core AMX Xeon: 3.7-4.0 s -> 2.2-2.6 s; multiples of 16: 2.6-2.8 s).
    native_row_multiple: int = 0
    # Products of at least this many rows with a quantized weight (quantized.py) dequantize it into a
    # reused buffer and run a dense product in `compute_dtype`; fewer rows run the weight's own
    # kernel, which streams the quantized bytes (0: always the kernel).
    dequantize_min_rows: int = 0

    @classmethod
    def for_device(cls, device: torch.device, dtype: torch.dtype) -> Execution:
        """The setting before any choice is made: the GPU's, or the CPU's baseline."""
        if device.type == "cuda":
            return cls(sync_free_expert_tokens=64)
        return cls.from_choices(baseline_choices(dtype))

    @classmethod
    def from_choices(cls, choices: dict[str, str], dequantize_min_rows: int | None = None) -> Execution:
        """The CPU setting that makes these choices (see the module's summary); quantized products
        dequantize from `dequantize_min_rows` rows (default DEQUANTIZE_MIN_ROWS_CPU)."""
        return cls(
            transposed_max_rows=MANY_ROWS - 1 if choices["few"] == "transposed" else 0,
            few_upcast_max_rows=MANY_ROWS - 1 if choices["few"] == "upcast" else 0,
            upcast_min_rows=MANY_ROWS if choices["many"] == "upcast" else 0,
            fp32_attention=choices["attention"] == "fp32",
            native_row_multiple=NATIVE_ROW_MULTIPLE if choices["many"] == "native" else 0,
            dequantize_min_rows=dequantize_min_rows or DEQUANTIZE_MIN_ROWS_CPU,
        )

    def __post_init__(self) -> None:
        if self.sync_free_experts not in ("auto", "gathered", "dense"):
            raise ValueError(f"sync_free_experts must be auto, gathered or dense, got {self.sync_free_experts!r}")

    def compute_dtype(self, rows: int, weight_dtype: torch.dtype) -> torch.dtype:
        if self.upcast_min_rows and rows >= self.upcast_min_rows and weight_dtype != torch.float32:
            return torch.float32
        return weight_dtype

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if not isinstance(weight, torch.Tensor):
            if not self.dequantize_min_rows or rows < self.dequantize_min_rows:
                return weight.linear(x, bias)
            dtype = self.compute_dtype(rows, weight.dtype)
            dense = weight.dequantize(dtype, scratch(weight.dense_numel, dtype, x.device))
            if dtype == x.dtype:  # a native product: the dense path below (row padding)
                return self.linear(x, dense, bias)
            bias = None if bias is None else bias.to(dtype)
            return F.linear(x.to(dtype), dense, bias).to(x.dtype)
        dtype = self.compute_dtype(rows, weight.dtype)
        if dtype != weight.dtype:
            bias = None if bias is None else bias.to(dtype)
            return F.linear(x.to(dtype), upcast(weight), bias).to(x.dtype)
        if 1 < rows <= self.few_upcast_max_rows and weight.dtype != torch.float32:
            return upcast_blocks(x, weight, bias)
        if 1 < rows <= self.transposed_max_rows:
            out = torch.mm(weight, x.reshape(rows, -1).T).T
            if bias is not None:
                out = out + bias
            return out.reshape(*x.shape[:-1], weight.shape[0])
        multiple = self.native_row_multiple
        if multiple and rows >= MANY_ROWS and rows % multiple and weight.dtype != torch.float32:
            flat = x.reshape(rows, -1)
            padded = torch.cat([flat, flat.new_zeros(multiple - rows % multiple, flat.shape[1])])
            return F.linear(padded, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight, bias)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        """Scaled dot-product attention (see fp32_attention)."""
        options = dict(attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=enable_gqa)
        if self.fp32_attention and q.dtype != torch.float32:
            out = F.scaled_dot_product_attention(q.float(), upcast(k, slot=1), upcast(v, slot=2), **options)
            return out.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, **options)


def upcast_blocks(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, block_values: int | None = None
) -> torch.Tensor:
    """`x @ weight^T (+ bias)` computed in fp32 and rounded once to x's dtype, reading the weight
    once for all of x's rows: each block of the weight's rows (about `block_values` values, default
    FEW_UPCAST_BLOCK_VALUES) is converted into this thread's reused buffer (slot 0) and multiplied
    by every row while it is in cache. Each output value is one block's dot product, so it equals
    the whole fp32 product's up to the BLAS kernel's order."""
    rows, width = x.numel() // x.shape[-1], weight.shape[1]
    flat = x.reshape(rows, width).float()
    block = max(1, (block_values or FEW_UPCAST_BLOCK_VALUES) // width)
    buffer = scratch(min(block, weight.shape[0]) * width, torch.float32, x.device)
    # Transposed, so that each block writes whole rows of the result.
    out = torch.empty(weight.shape[0], rows, dtype=torch.float32, device=x.device)
    for start in range(0, weight.shape[0], block):
        part = weight[start : start + block]
        converted = buffer[: part.numel()].view(part.shape).copy_(part)
        torch.mm(converted, flat.T, out=out[start : start + block])
    if bias is not None:
        out += bias.float()[:, None]
    return out.T.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


_scratch = threading.local()


def upcast(tensor: torch.Tensor, slot: int = 0) -> torch.Tensor:
    """`tensor` in fp32, written into this thread's reusable buffer number `slot` (`scratch`),
    valid until the next call with that slot: 0 for weights, 1 and 2 for attention's keys and values.

    Fresh fp32 memory for every product costs 3-6x the conversion itself (page faults): 64
    expert matrices convert in 24 ms into one buffer, 83 ms into new ones.
    """
    buffer = scratch(tensor.numel(), torch.float32, tensor.device, slot)
    # Dense, in the source's order of dimensions: a copy that also transposes (a cache row read
    # head-major) would cost more than the conversion.
    strides = torch.empty_like(tensor, dtype=torch.float32, device="meta").stride()
    return buffer.as_strided(tensor.shape, strides).copy_(tensor)


def scratch(numel: int, dtype: torch.dtype, device: torch.device, slot: int = 0) -> torch.Tensor:
    """This thread's reusable 1-D buffer number `slot` of at least `numel` values of `dtype`, valid
    until the next call with that slot: weights are upcast (slot 0) or dequantized into it, never
    both for one product. Fresh memory per product would fault its pages (see upcast)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    # Per device, and per inference mode: an inference tensor cannot be written outside it.
    key = (device, torch.is_inference_mode_enabled(), dtype, slot)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


class Linear(nn.Linear):
    """nn.Linear whose product follows the model's `Execution` (set by `DeepseekVL2.set_execution`)."""

    execution = Execution()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.execution.linear(x, self.weight, self.bias)
