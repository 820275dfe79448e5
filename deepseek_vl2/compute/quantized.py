"""Weight-only int8 / int4 quantization of the language model's linear weights (DEEPSEEK_VL2_QUANTIZE).

Decode reads every active weight once per token, so fewer bytes per weight is fewer seconds per
token. Activations stay in the model's dtype; only the stored weights shrink:

- int8: symmetric, one scale per output channel: w = q * s, q in [-127, 127].
- int4: group-wise along the input (`group_size` weights, 128 by default) with a scale and a zero
  point per group, in the convention of torch's int4 kernels: w = (q - 8) * s + z, q in [0, 15].

Both round to nearest from the checkpoint's weights, and every weight stays within half a step of
its original (the scale is rounded up to the stored dtype, so no weight is clipped).

The module swaps that put these formats into the model are model/quantized_modules.py; the
loading that quantizes a checkpoint as it is read is model/streaming_quantizer.py.

How a quantized product runs is `Execution.linear`'s choice: few rows call the weight's own kernel
(`QuantizedWeight.linear`, which streams the quantized bytes), many rows dequantize into a reused
buffer (`QuantizedWeight.dequantize`) and run a dense product.

Kernels (measurements: scripts/bench_quantize.py, README Performance):
- CPU int4: torch's `_weight_int4pack_mm_for_cpu` over `_convert_weight_to_int4pack_for_cpu`'s
  layout, which depends on the kernel level torch dispatches to (ATEN_CPU_CAPABILITY): blocks of S
  output rows, per block and input column S/2 bytes, each holding two rows. Measured with torch
  2.13: default S=32, byte b = rows 2b, 2b+1 (low, high nibble); avx2 S=32, rows b, b+16; avx512
  S=64, rows b, b+32. int4_layout.py learns it from the pack op itself (never assumed) for
  `dequantize`. Output rows are padded to a multiple of 64 (partial row blocks pack differently).
- CPU int8: torch's `_weight_int8pack_mm`.
- CUDA int4: `_weight_int4pack_mm` over `_convert_weight_to_int4pack` (tinygemm layout, 8 inner k
  tiles where the width allows), for every product (no dequantize path); bf16 only.
- CUDA int8: dequantize and multiply, which torch.compile can fuse in the compiled decode step.
- Both CUDA paths are UNVERIFIED: no GPU was available when they were written (README).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import int4_layout
from .int4_layout import INT4_ROW_BLOCK

MODES = ("none", "int8", "int4")
DEFAULT_GROUP_SIZE = 128
# The int4 kernels' smallest group; a group size that does not divide a matrix's input width is
# halved until it does, down to this.
MIN_GROUP_SIZE = 32
# Rows quantized at once, and the unit in which loading stages a matrix: bounds the memory a large
# matrix (the output head, 316 MiB in bf16 for tiny) takes in flight to a few MiB, with its fp32
# temporaries. A multiple of INT4_ROW_BLOCK.
QUANTIZE_CHUNK_ROWS = 2048


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight [*lead, out_features, in_features] stored in fewer bits. `lead` are stacked
    experts; indexing selects among them. `Execution.linear` takes one in place of a tensor.

    `data` holds the quantized values, `scale` the scales (and zero points) in `dtype`, the dtype
    of the products: the model's.
    """

    data: torch.Tensor
    scale: torch.Tensor
    out_features: int
    in_features: int

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def lead(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.lead, self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes

    def __getitem__(self, index: int | torch.Tensor) -> QuantizedWeight:
        """One expert (an int), or several stacked (a 1-D index tensor: a gather, no host sync)."""
        if isinstance(index, int):
            return self.experts[index]
        return dataclasses.replace(self, data=self.data[index], scale=self.scale[index])

    @functools.cached_property
    def experts(self) -> tuple[QuantizedWeight, ...]:
        """Each expert's weight, built once: the grouped path indexes them on every forward."""
        return tuple(
            dataclasses.replace(self, data=self.data[i], scale=self.scale[i]) for i in range(self.lead[0])
        )

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] @ weight^T (+ bias) by the weight's own kernel, which reads the quantized bytes:
        for products of a few rows (one weight, no lead)."""
        rows = x.reshape(-1, self.in_features)
        out = self._mm(rows)
        if bias is not None:
            out = out + bias
        return out.view(*x.shape[:-1], self.out_features)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def dense_numel(self) -> int:
        """Values `dequantize` writes (output rows padded to the storage's)."""
        return math.prod(self.shape)

    def dequantize(self, dtype: torch.dtype, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The weights [*lead, out, in] in `dtype`, written into `buffer` (1-D, at least
        `dense_numel` values) when given."""
        raise NotImplementedError

    def store(self, lead: tuple[int, ...], weight: torch.Tensor) -> None:
        """Quantize one matrix `weight` [out, in] into position `lead` of the storage."""
        for start in range(0, weight.shape[0], QUANTIZE_CHUNK_ROWS):
            self.store_rows(lead, start, weight[start : start + QUANTIZE_CHUNK_ROWS])

    def store_rows(self, lead: tuple[int, ...], start: int, rows: torch.Tensor) -> None:
        """Quantize rows start.. of the matrix at `lead` (int4: whole blocks of INT4_ROW_BLOCK
        rows, or the matrix's last rows)."""
        raise NotImplementedError


class Int8Weight(QuantizedWeight):
    """int8 [*lead, out, in] and one scale per output channel [*lead, out]."""

    @classmethod
    def empty(
        cls, lead: tuple[int, ...], out_features: int, in_features: int, dtype: torch.dtype, device: torch.device
    ) -> Int8Weight:
        data = torch.empty(*lead, out_features, in_features, dtype=torch.int8, device=device)
        scale = torch.empty(*lead, out_features, dtype=dtype, device=device)
        return cls(data, scale, out_features, in_features)

    @property
    def lead(self) -> tuple[int, ...]:
        return tuple(self.data.shape[:-2])

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            # A dequantize-and-multiply, which the compiled decode step may fuse (unverified).
            return F.linear(x, self.data.to(x.dtype)) * self.scale
        return torch._weight_int8pack_mm(x, self.data, self.scale)

    def dequantize(self, dtype: torch.dtype, buffer: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.scale.to(dtype)[..., None]
        if buffer is None:
            return self.data.to(dtype) * scale
        # One pass: the int8 values are converted as they are read.
        return torch.mul(self.data, scale, out=buffer[: self.dense_numel].view(self.shape))

    def store_rows(self, lead: tuple[int, ...], start: int, rows: torch.Tensor) -> None:
        w = rows.float()
        scale = round_up(w.abs().amax(dim=-1) / 127, self.dtype)
        stop = start + rows.shape[0]
        self.scale[lead][start:stop] = scale
        self.data[lead][start:stop] = (w / scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)


@dataclass(frozen=True)
class Int4Weight(QuantizedWeight):
    """int4 packed in the device's kernel layout, and [*lead, in / group, padded_out, 2] scales and
    zero points. Output rows are padded (with zero weights) to the kernel's row block."""

    group_size: int = DEFAULT_GROUP_SIZE

    @classmethod
    def empty(
        cls, lead: tuple[int, ...], out_features: int, in_features: int, dtype: torch.dtype,
        device: torch.device, group_size: int,
    ) -> Int4Weight:  # fmt: skip
        padded = -(-out_features // INT4_ROW_BLOCK) * INT4_ROW_BLOCK
        group = fitting_group_size(in_features, group_size)
        if device.type == "cuda":
            if dtype != torch.bfloat16:
                raise ValueError("int4 on CUDA needs bf16 weights (torch's kernel takes bf16 only)")
            tiles = cuda_inner_k_tiles(in_features)
            shape = (padded // 8, in_features // (16 * tiles), 32, tiles // 2)
            data = torch.empty(*lead, *shape, dtype=torch.int32, device=device)
            # No layout is learned for CUDA: its products all run on its kernel, which reads the bytes
            # its own pack op wrote, and `dequantize` refuses CUDA weights; `cpu_int4_layout`
            # describes only the CPU pack op.
        else:
            # Learned here, at load, so that a torch or CPU level whose packing is unknown fails
            # before any weight is stored rather than dequantizing garbage later.
            int4_layout.cpu_int4_layout(in_features)
            data = torch.empty(*lead, padded, in_features // 2, dtype=torch.uint8, device=device)
        scale = torch.empty(*lead, in_features // group, padded, 2, dtype=dtype, device=device)
        return cls(data, scale, out_features, in_features, group)

    @property
    def lead(self) -> tuple[int, ...]:
        return tuple(self.scale.shape[:-3])

    @property
    def padded_out(self) -> int:
        return self.scale.shape[-2]

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            out = torch._weight_int4pack_mm(x, self.data, self.group_size, self.scale)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.data, self.group_size, self.scale)
        return out[:, : self.out_features] if self.padded_out != self.out_features else out

    @property
    def dense_numel(self) -> int:
        return math.prod(self.lead) * self.padded_out * self.in_features

    def dequantize(self, dtype: torch.dtype, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The weights as a transposed view: the values are written as [*lead, in, out], the order
        in which the packed bytes hold them (per input column, a block's rows), so that the writes
        run along the output rows; a product takes the transposed weight as is. The packing is
        the one `cpu_int4_layout` learned from torch's pack op (at `empty`, so a lookup here)."""
        if self.device.type == "cuda":
            raise NotImplementedError("CUDA int4 runs every product with its kernel (Execution.for_device)")
        layout = int4_layout.cpu_int4_layout(self.in_features)
        lead, n, k, g = self.lead, self.padded_out, self.in_features, self.group_size
        rows, half = layout.block_rows, layout.block_rows // 2
        blocks, groups = n // rows, k // g
        if buffer is None:
            buffer = torch.empty(self.dense_numel, dtype=dtype, device=self.device)
        transposed = buffer[: self.dense_numel].view(*lead, k, n)
        nlead = len(lead)
        # The packed bytes as [*, block, group, column in group, byte].
        packed = self.data.view(*lead, blocks, groups, g, half)
        # w = q * s + (z - 8 s), with s and z per (group, row), in fp32 so that each weight is
        # rounded once, when it is written in `dtype`: [*, group, block, nibble, byte].
        scale = self.scale.float().view(*lead, groups, blocks, rows, 2)
        s = layout.by_nibble(scale[..., 0])
        offset = layout.by_nibble(scale[..., 1] - 8 * scale[..., 0])
        # [*, group, block, byte] -> [*, block, group, 1 (column in group), byte], as `packed`.
        as_packed = (*range(nlead), nlead + 1, nlead, nlead + 2)
        # The output [*, in, out] as [*, group, column, block, nibble, byte], reordered likewise.
        target = layout.by_nibble(transposed.view(*lead, groups, g, blocks, rows))
        target_as_packed = (*range(nlead), nlead + 2, nlead, nlead + 1, nlead + 3)
        for nibble, values in enumerate((packed & 15, packed >> 4)):
            torch.addcmul(
                offset[..., nibble, :].permute(as_packed)[..., None, :],
                values,
                s[..., nibble, :].permute(as_packed)[..., None, :],
                out=target[..., nibble, :].permute(target_as_packed),
            )
        return transposed.transpose(-1, -2)[..., : self.out_features, :]

    def store_rows(self, lead: tuple[int, ...], start: int, rows: torch.Tensor) -> None:
        # Whole row blocks: the last rows of the matrix come with the padding after them.
        stop = start + rows.shape[0]
        if start % INT4_ROW_BLOCK or (stop % INT4_ROW_BLOCK and stop != self.out_features):
            raise ValueError(f"int4 rows are stored in blocks of {INT4_ROW_BLOCK}, got rows {start}..{stop}")
        padded_stop = self.padded_out if stop == self.out_features else stop
        k, data, scale = self.in_features, self.data[lead], self.scale[lead]
        w = torch.zeros(padded_stop - start, k, dtype=torch.float32, device=rows.device)
        w[: rows.shape[0]] = rows
        q, s, z = quantize_int4(w, self.group_size, self.dtype)
        scale[:, start:padded_stop] = torch.stack([s, z], dim=-1).transpose(0, 1)
        if self.device.type == "cuda":
            nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            data[start // 8 : padded_stop // 8] = torch._convert_weight_to_int4pack(nibbles, cuda_inner_k_tiles(k))
        else:
            data[start:padded_stop] = int4_layout.pack_int4_cpu(q)


def cuda_inner_k_tiles(in_features: int) -> int:
    """The CUDA int4 layout's inner k tiles (of 16 columns): the most of 8, 4, 2 the width allows."""
    for tiles in (8, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"int4 on CUDA needs an input width that is a multiple of 32, got {in_features}")


def round_up(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`values` (fp32) in `dtype`, never smaller (so that a scale covers its weights), and at least
    the smallest normal number (so that an all-zero row divides)."""
    rounded = values.clamp(min=torch.finfo(dtype).tiny).to(dtype)
    smaller = rounded.float() < values
    return torch.where(smaller, torch.nextafter(rounded, torch.full_like(rounded, torch.inf)), rounded)


def quantize_int4(
    w: torch.Tensor, group_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest int4 of fp32 `w` [n, k]: q [n, k] int32 in [0, 15], and per group scales
    and zero points [n, k / group] in `dtype`, with w ~ (q - 8) * s + z.

    The zero point is rounded to `dtype` first and the scale then chosen (and rounded up) so that
    [z - 8.5 s, z + 7.5 s] covers the group: every weight is then within half a step of its value.
    """
    groups = w.view(w.shape[0], -1, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    zero = (low + 8.5 * (high - low) / 16).to(dtype)
    z = zero.float()
    scale = round_up(torch.maximum((high - z) / 7.5, (z - low) / 8.5), dtype)
    q = ((groups - z[..., None]) / scale.float()[..., None]).round_().add_(8).clamp_(0, 15)
    return q.view_as(w).to(torch.int32), scale, zero


def fitting_group_size(in_features: int, group_size: int) -> int:
    """`group_size`, halved until it divides the input width (a group never spans two rows)."""
    group = group_size
    while in_features % group:
        group //= 2
        if group < MIN_GROUP_SIZE:
            raise ValueError(f"no int4 group size of at least {MIN_GROUP_SIZE} divides the input width {in_features}")
    return group


@dataclass(frozen=True)
class QuantizeSpec:
    """A quantization mode and its setting; `name` goes into cache keys and logs."""

    mode: str = "none"
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"quantization must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.group_size < MIN_GROUP_SIZE or self.group_size & (self.group_size - 1):
            raise ValueError(f"int4 group size must be a power of two >= {MIN_GROUP_SIZE}, got {self.group_size}")

    @property
    def name(self) -> str:
        return f"int4-g{self.group_size}" if self.mode == "int4" else self.mode

    def empty(
        self, lead: tuple[int, ...], out_features: int, in_features: int, dtype: torch.dtype, device: torch.device
    ) -> QuantizedWeight:
        if self.mode == "int8":
            return Int8Weight.empty(lead, out_features, in_features, dtype, device)
        assert self.mode == "int4"
        return Int4Weight.empty(lead, out_features, in_features, dtype, device, self.group_size)
