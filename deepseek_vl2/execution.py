"""How the model's products run on its device: one explicit setting per model, chosen from the
device and the weights' dtype, so that every device-specific branch can be forced and tested on
the CPU.

The choices, and the measurements behind them (2-core AVX2 CPU without bf16 units, torch 2.13):
- A product with a few rows (batched decode) is fastest on the CPU in fp32 as `W @ x^T`: MKL then
  streams the weight once for all rows (129280x1280 head: 1 row 39 ms, 4 rows 34 ms), whereas
  `x @ W^T` repacks the weight (4 rows 129 ms).
- bf16 products stream a matrix-vector product twice as fast as fp32 (half the bytes) but run
  matrix-matrix products about 8x slower, with no amortisation over rows. With bf16 weights on
  the CPU, products of many rows (vision tower, prefill chunks) are therefore computed in fp32
  from the bf16 weights, one weight at a time, and rounded back to bf16.
- Attention with bf16 values on the CPU runs over fp32 copies (`fp32_attention`): 1.3-1.6x faster
  than the bf16 kernels at 1824 cached tokens.
- Experts: on CUDA the decode step is captured in a CUDA graph, which forbids the host sync of the
  grouped path, so few tokens use a sync-free path (`Experts` picks gathered or dense by cost).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .quantize import QuantizedWeight

# Quantized products of this many rows or more dequantize. Measured against products in fp32 (the
# upcast path), 2-core Sapphire Rapids (scripts/bench_quantize.py, README Performance): the int4
# kernel and the dequantized product cross at about 200 rows for tiny's experts and projections and
# 500 for its dense MLP and output head (int8: 64-256). Prefill's routed experts get about 50 rows
# each (kernel), its other products a whole chunk (dequantized). With products in native bf16 the
# crossing moves lower.
DEQUANTIZE_MIN_ROWS_CPU = 256


@dataclass(frozen=True)
class Execution:
    # Experts for batches of at most this many tokens run without a host sync (0: never), by
    # "gathered" or "dense" products, or "auto": whichever moves fewer bytes.
    sync_free_expert_tokens: int = 0
    sync_free_experts: str = "auto"
    # Products with 2..this many rows run as W @ x^T (0: never).
    transposed_max_rows: int = 0
    # With low-precision weights, products of at least this many rows compute in fp32 (0: never).
    upcast_min_rows: int = 0
    # Attention over fp32 copies of low-precision queries, keys and values, the output rounded
    # back: the CPU's bf16 attention is 2.5-4x slower than its fp32 (decode over 1824 cached
    # tokens: 3.2-4.9 ms a layer against 1.25 ms). It also keeps MLA's latent-space output
    # unrounded until the value projection, where the reference rounds the attention output once.
    # Not on CUDA, where copying the cache every step would cost more than it saves.
    fp32_attention: bool = False
    # Products of at least this many rows with a quantized weight (quantize.py) dequantize it into a
    # reused buffer and run a dense product in `compute_dtype`; fewer rows run the weight's own
    # kernel, which streams the quantized bytes (0: always the kernel).
    dequantize_min_rows: int = 0

    @classmethod
    def for_device(cls, device: torch.device, dtype: torch.dtype) -> Execution:
        if device.type == "cuda":
            return cls(sync_free_expert_tokens=64)
        if dtype == torch.float32:
            return cls(transposed_max_rows=16, dequantize_min_rows=DEQUANTIZE_MIN_ROWS_CPU)
        return cls(upcast_min_rows=16, fp32_attention=True, dequantize_min_rows=DEQUANTIZE_MIN_ROWS_CPU)

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
            bias = None if bias is None else bias.to(dtype)
            return F.linear(x.to(dtype), dense, bias).to(x.dtype)
        dtype = self.compute_dtype(rows, weight.dtype)
        if dtype != weight.dtype:
            bias = None if bias is None else bias.to(dtype)
            return F.linear(x.to(dtype), upcast(weight), bias).to(x.dtype)
        if 1 < rows <= self.transposed_max_rows:
            out = torch.mm(weight, x.reshape(rows, -1).T).T
            if bias is not None:
                out = out + bias
            return out.reshape(*x.shape[:-1], weight.shape[0])
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


_scratch = threading.local()


def upcast(tensor: torch.Tensor, slot: int = 0) -> torch.Tensor:
    """`tensor` in fp32, written into this thread's reusable buffer number `slot`,
    valid until the next call with that slot: 0 for weights, 1 and 2 for attention's keys and values.

    Fresh fp32 memory for every product costs 3-6x the conversion itself (page faults): 64
    expert matrices convert in 24 ms into one buffer, 83 ms into new ones.
    """
    buffers = _scratch.__dict__.setdefault("buffers", {})
    # Per device, and per inference mode: an inference tensor cannot be written outside it.
    key = (tensor.device, torch.is_inference_mode_enabled(), slot)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < tensor.numel():
        buffer = buffers[key] = torch.empty(tensor.numel(), dtype=torch.float32, device=tensor.device)
    # Dense, in the source's order of dimensions: a copy that also transposes (a cache row read
    # head-major) would cost more than the conversion.
    strides = torch.empty_like(tensor, dtype=torch.float32, device="meta").stride()
    return buffer[: tensor.numel()].as_strided(tensor.shape, strides).copy_(tensor)


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's reusable 1-D buffer of at least `numel` values of `dtype`, valid until the next
    call: quantized weights dequantize into it (fresh memory per product faults pages, see upcast)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (device, torch.is_inference_mode_enabled(), dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


class Linear(nn.Linear):
    """nn.Linear whose product follows the model's `Execution` (set by `DeepseekVL2.set_execution`)."""

    execution = Execution()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.execution.linear(x, self.weight, self.bias)
