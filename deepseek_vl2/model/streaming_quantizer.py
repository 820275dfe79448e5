"""Quantizing a checkpoint as it is read.

Loading streams (`StreamingQuantizer`): each weight matrix is assembled in the model dtype from
its checkpoint tensors, quantized as soon as it is complete and released, so that memory holds
the quantized model plus one matrix in flight, never the whole bf16 model.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from ..compute.quantized import QUANTIZE_CHUNK_ROWS, QuantizedWeight, QuantizeSpec
from .quantized_modules import QuantizedModule


class StreamingQuantizer:
    """Receives checkpoint tensors for a model's quantized weights, one at a time.

    A matrix (a Linear's weight, one expert's gate_up or down) is staged in the model dtype by
    blocks of QUANTIZE_CHUNK_ROWS rows, whatever checkpoint tensors they come from; each block is
    quantized into the module's storage as soon as it is complete, and released. Memory holds the
    quantized model plus the blocks in flight: never a whole large matrix (the output head).
    """

    def __init__(self, model: nn.Module):
        self.weights: dict[str, QuantizedWeight] = {
            f"{module_name}.{name}": weight
            for module_name, module in model.named_modules()
            if isinstance(module, QuantizedModule)
            for name, weight in module.quantized_weights().items()
        }
        modules = [module for module in model.modules() if isinstance(module, QuantizedModule)]
        self.spec = modules[0].spec if modules else QuantizeSpec()
        # (param, lead, first row of the block) -> (the block's rows, which of them are filled)
        self._staged: dict[tuple[str, tuple[int, ...], int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._done: set[tuple[str, tuple[int, ...], int]] = set()  # blocks quantized
        self.seconds = 0.0  # spent quantizing

    def __contains__(self, param: str) -> bool:
        return param in self.weights

    def region_shape(self, param: str, index: tuple) -> tuple[int, ...]:
        """The shape of the rows that `index` of `param` addresses."""
        weight = self.weights[param]
        first, stop = self._rows(weight, index)
        return (stop - first, weight.in_features)

    def fill(self, param: str, index: tuple, read: Callable[[int, int], torch.Tensor]) -> None:
        """Fill the rows that `index` of `param` addresses; `read(a, b)` gives rows a..b-1 of that
        region. Read block by block; each block of the matrix is quantized once complete."""
        weight = self.weights[param]
        lead = tuple(index[: len(weight.lead)])
        first, stop = self._rows(weight, index)
        block_rows = QUANTIZE_CHUNK_ROWS
        for block in range(first // block_rows * block_rows, stop, block_rows):
            lo, hi = max(first, block), min(stop, block + block_rows)
            key = (param, lead, block)
            staged = self._staged.get(key)
            if key in self._done or (staged is not None and staged[1][lo - block : hi - block].any()):
                raise ValueError(f"rows {lo}..{hi - 1} of {param}{list(lead)} were already filled")
            if staged is None:
                rows = min(block_rows, weight.out_features - block)
                buffer = torch.empty(rows, weight.in_features, dtype=weight.dtype, device=weight.device)
                staged = self._staged[key] = (buffer, torch.zeros(rows, dtype=torch.bool))
            buffer, filled = staged
            with torch.no_grad():
                buffer[lo - block : hi - block] = read(lo - first, hi - first)
            filled[lo - block : hi - block] = True
            if filled.all():
                started = time.perf_counter()
                with torch.no_grad():
                    weight.store_rows(lead, block, buffer)
                self.seconds += time.perf_counter() - started
                del self._staged[key]
                self._done.add(key)

    @property
    def staged_bytes(self) -> int:
        """Bytes of the blocks in flight."""
        return sum(buffer.nbytes for buffer, _ in self._staged.values())

    def summary(self) -> str:
        """The mode, the bytes before (in the model dtype) and after, and the time spent quantizing."""
        before = sum(math.prod(w.shape) * w.scale.element_size() for w in self.weights.values())
        after = sum(w.nbytes for w in self.weights.values())
        return f"{self.spec.name}, {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB in {self.seconds:.1f} s"

    def incomplete(self) -> list[str]:
        """The quantized weights not (fully) filled."""
        done = Counter(param for param, _, _ in self._done)
        return [
            param
            for param, weight in self.weights.items()
            if done[param] != math.prod(weight.lead) * -(-weight.out_features // QUANTIZE_CHUNK_ROWS)
        ]

    @staticmethod
    def _rows(weight: QuantizedWeight, index: tuple) -> tuple[int, int]:
        """The matrix rows [first, stop) that `index` addresses after the weight's lead: all of
        them, or a slice of rows (fused projections, an expert's gate or up half)."""
        rest = index[len(weight.lead) :]
        if not rest:
            return 0, weight.out_features
        if len(rest) == 1 and isinstance(rest[0], slice) and rest[0].step in (None, 1):
            first, stop, _ = rest[0].indices(weight.out_features)
            return first, stop
        raise ValueError(f"a quantized weight is filled by whole rows, got index {index}")
