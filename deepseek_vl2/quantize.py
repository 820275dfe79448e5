"""Weight-only int8 / int4 quantization of the language model's linear weights (DEEPSEEK_VL2_QUANTIZE).

Decode reads every active weight once per token, so fewer bytes per weight is fewer seconds per
token. Activations stay in the model's dtype; only the stored weights shrink:

- int8: symmetric, one scale per output channel: w = q * s, q in [-127, 127].
- int4: group-wise along the input (`group_size` weights, 128 by default) with a scale and a zero
  point per group, in the convention of torch's int4 kernels: w = (q - 8) * s + z, q in [0, 15].

Both round to nearest from the checkpoint's weights, and every weight stays within half a step of
its original (the scale is rounded up to the stored dtype, so no weight is clipped).

What is quantized (`quantize_model`): the language model's `Linear`s (attention projections, dense
and shared MLPs, the output head) and the stacked routed experts. What is not: the vision tower,
the projector, embeddings, norms, routers, and MLA's `kv_b_proj` (small and base), whose weight
the absorbed decode reads whole, per head, and converts to fp32 every step. Measured on small's
4096x512: that conversion takes 0.25 ms a layer; dequantizing an int4 copy 1.47 ms (int8 0.59 ms),
for 3 MB (2 MB) fewer bytes read, about 0.15 ms: quantized it would cost 9-33 ms a token in all for
113 MB saved (1.3% of small in int4).

How a quantized product runs is `Execution.linear`'s choice: few rows call the weight's own kernel
(`QuantizedWeight.linear`, which streams the quantized bytes), many rows dequantize into a reused
buffer (`QuantizedWeight.dequantize`) and run a dense product.

Kernels (measurements: scripts/bench_quantize.py, README Performance):
- CPU int4: torch's `_weight_int4pack_mm_for_cpu` over `_convert_weight_to_int4pack_for_cpu`'s
  layout, which depends on the kernel level torch dispatches to (ATEN_CPU_CAPABILITY): blocks of S
  output rows, per block and input column S/2 bytes, each holding two rows. Measured with torch
  2.13: default S=32, byte b = rows 2b, 2b+1 (low, high nibble); avx2 S=32, rows b, b+16; avx512
  S=64, rows b, b+32. `cpu_int4_layout` learns it from the pack op itself (never assumed) for
  `dequantize`. Output rows are padded to a multiple of 64 (partial row blocks pack differently).
- CPU int8: torch's `_weight_int8pack_mm`.
- CUDA int4: `_weight_int4pack_mm` over `_convert_weight_to_int4pack` (tinygemm layout, 8 inner k
  tiles where the width allows), for every product (no dequantize path); bf16 only.
- CUDA int8: dequantize and multiply, which torch.compile can fuse in the compiled decode step.
- Both CUDA paths are UNVERIFIED: no GPU was available when they were written (README).

Loading streams (`StreamingQuantizer`): each weight matrix is assembled in the model dtype from
its checkpoint tensors, quantized as soon as it is complete and released, so that memory holds
the quantized model plus one matrix in flight, never the whole bf16 model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .execution import Execution, Linear
from .language import Experts

MODES = ("none", "int8", "int4")
DEFAULT_GROUP_SIZE = 128
# The int4 kernels' smallest group; a group size that does not divide a matrix's input width is
# halved until it does, down to this.
MIN_GROUP_SIZE = 32
# The CPU int4 kernel packs output rows in blocks of 64 (and CUDA's in blocks of 8).
INT4_ROW_BLOCK = 64
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
            cpu_int4_layout(in_features)
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
        layout = cpu_int4_layout(self.in_features)
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
            data[start:padded_stop] = pack_int4_cpu(q)


# The row counts of the probe matrices: one row block of INT4_ROW_BLOCK and three, so that the
# repetition of blocks is checked as well as the inside of one.
INT4_PROBE_ROWS = (64, 192)


@dataclass(frozen=True)
class Int4Layout:
    """Where torch's CPU int4 pack op puts the weights of a matrix [n, k]: the rows come in blocks
    of `block_rows` (S), each block stored as [k, S/2] bytes (a byte per pair of rows, for each
    input column in turn), and byte b of a column holds the block's row `byte_stride * b` in its low
    nibble and row `byte_stride * b + nibble_stride` in its high one.

    Two such forms tile a block: halves (1, S/2), rows b and b + S/2, and neighbours (2, 1), rows
    2b and 2b + 1; anything else is not a layout."""

    block_rows: int
    byte_stride: int
    nibble_stride: int

    def __post_init__(self) -> None:
        half = self.block_rows // 2
        if (
            self.block_rows < 2
            or self.block_rows % 2
            or INT4_ROW_BLOCK % self.block_rows  # the padding must give whole blocks
            or (self.byte_stride, self.nibble_stride) not in ((1, half), (2, 1))
        ):
            raise ValueError(f"not an int4 layout: {self}")

    def positions(self, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (row, column) this layout gives each nibble of a packed [n, k] matrix, as tensors that
        broadcast to the packed bytes' order [block, column, byte, nibble] (that is [n / S, k, S / 2, 2])."""
        half = self.block_rows // 2
        block = torch.arange(n // self.block_rows, dtype=torch.int32).view(-1, 1, 1, 1) * self.block_rows
        pair = torch.arange(half, dtype=torch.int32).view(1, 1, -1, 1) * self.byte_stride
        nibble = torch.arange(2, dtype=torch.int32) * self.nibble_stride
        return block + pair + nibble, torch.arange(k, dtype=torch.int32).view(1, -1, 1, 1)

    def by_nibble(self, rows: torch.Tensor) -> torch.Tensor:
        """A view of `rows`, whose last dimension is a block's rows, as [..., nibble, byte]."""
        half = self.block_rows // 2
        if self.byte_stride == 1:
            return rows.unflatten(-1, (2, half))
        return rows.unflatten(-1, (half, 2)).transpose(-1, -2)


def pack_int4_cpu(q: torch.Tensor) -> torch.Tensor:
    """torch's CPU int4 pack op over int32 values [n, k] in [0, 15]: the one function that both the
    stores and the probe call, so that the layout learned is the layout stored."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)


def probe_int4_pack(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where `_convert_weight_to_int4pack_for_cpu` puts each weight of an [n, k] matrix: the (row,
    column) of every nibble of its packed bytes, as two [n k / 2, 2] tensors (byte, nibble).

    Each pass packs a matrix whose values are one 4-bit digit of every weight's row (or column)
    index, and reads that digit back from wherever each nibble went: a handful of packs of a small
    matrix, and no knowledge of torch's kernels is assumed."""
    found = []
    for index, count in ((torch.arange(n, dtype=torch.int32)[:, None], n), (torch.arange(k, dtype=torch.int32), k)):
        decoded = torch.zeros(n, k // 2, 2, dtype=torch.int32)
        for shift in range(0, (count - 1).bit_length(), 4):
            packed = pack_int4_cpu((index >> shift & 15).expand(n, k).contiguous())
            if packed.dtype != torch.uint8 or tuple(packed.shape) != (n, k // 2):
                raise RuntimeError(
                    f"torch's int4 CPU pack op gave {packed.dtype} {tuple(packed.shape)} for an [{n}, {k}] "
                    f"matrix, not uint8 ({n}, {k // 2}): {unknown_int4_packing()}"
                )
            decoded[..., 0] |= (packed & 15).int() << shift
            decoded[..., 1] |= (packed >> 4).int() << shift
        found.append(decoded.view(-1, 2))
    return found[0], found[1]


def unknown_int4_packing() -> str:
    return (
        f"the int4 packing of torch {torch.__version__} at CPU kernel level "
        f"{torch.backends.cpu.get_cpu_capability()} is unknown, and int4 would compute wrong weights "
        "(int8 does not depend on it; ATEN_CPU_CAPABILITY selects another level)"
    )


@functools.cache
def cpu_int4_layout(in_features: int) -> Int4Layout:
    """The layout in which torch's CPU int4 pack op stores matrices of `in_features` columns, learned
    from the op itself and checked against everything it did; a RuntimeError if no `Int4Layout`
    reproduces it.

    Why a probe: the layout is not part of torch's API. It differs by the kernel level torch
    dispatches to (ATEN_CPU_CAPABILITY, chosen per process from the CPU: see the module's
    docstring) and may change with torch's version; a table keyed by level would compute garbage
    silently on the first level or version it misses, where a probe either finds the layout or
    stops the load. Per width, since nothing promises the layout does not depend on it (measured:
    it does not, 32 to 6848), and cached, since the level is fixed for a process.

    Cost, once per width: 2 to 6 packs of [64, k] and [192, k] matrices and their decoding. Measured
    on a Xeon (model 167, AVX512/AMX) at one thread, loaded by other work: the fixtures' widths
    (32, 64, 160) 3 ms in all; tiny's (896, 1280, 1792, 6848) 62-150 ms in all by level, most of
    it 6848's; at two threads on the loaded machine up to seconds (OpenMP on small tensors)."""
    probed = {n: probe_int4_pack(n, in_features) for n in INT4_PROBE_ROWS}
    rows, columns = probed[INT4_PROBE_ROWS[0]]
    # Fit on the first bytes: a block's half of rows is the bytes before column 1 starts; the
    # strides are those of row 0's neighbours. Then the whole map must agree, for both probes.
    later = (columns[:, 0] != 0).nonzero()
    try:
        if int(rows[0, 0]) != 0 or int(columns[0, 0]) != 0:
            raise ValueError("the first byte does not hold row 0 of column 0")
        if not len(later):
            raise ValueError("no byte holds column 1")
        half = int(later[0])
        layout = Int4Layout(2 * half, int(rows[1, 0]) if half > 1 else 1, int(rows[0, 1]))
    except ValueError as error:
        raise RuntimeError(f"{unknown_int4_packing()}: {error}") from None
    for n, (rows, columns) in probed.items():
        expected_rows, expected_columns = layout.positions(n, in_features)
        shape = (n // layout.block_rows, in_features, layout.block_rows // 2, 2)
        if n % layout.block_rows or not bool(
            (rows.view(shape) == expected_rows).all() and (columns.view(shape) == expected_columns).all()
        ):
            raise RuntimeError(f"{unknown_int4_packing()}: an [{n}, {in_features}] matrix is not packed as {layout}")
    return layout


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


class QuantizedModule(nn.Module):
    """A module whose weights (named in `quantized`) are QuantizedWeights. Their tensors are buffers
    `<name>_data` / `<name>_scale`, part of the module's state, allocated by `allocate` once the
    device and dtype are known (materialisation); `module.<name>` is the QuantizedWeight over them."""

    quantized: dict[str, tuple[int, ...]]  # weight name -> its shape, [*lead, out, in]

    def __init__(self, spec: QuantizeSpec):
        nn.Module.__init__(self)  # not super(): QuantizedExperts also derives from Experts
        self.spec = spec
        self._templates: dict[str, QuantizedWeight] = {}

    def allocate(self, device: torch.device, dtype: torch.dtype) -> None:
        for name, (*lead, out_features, in_features) in self.quantized.items():
            weight = self.spec.empty(tuple(lead), out_features, in_features, dtype, device)
            self._templates[name] = weight
            self.register_buffer(f"{name}_data", weight.data)
            self.register_buffer(f"{name}_scale", weight.scale)

    def __getattr__(self, name: str):
        templates = self.__dict__.get("_templates", {})
        if name in templates:
            # Over the current buffers, so the weight follows them if the module is moved; rebuilt
            # only then (with its cached per-expert views).
            weight, buffers = templates[name], self.__dict__["_buffers"]
            data, scale = buffers[f"{name}_data"], buffers[f"{name}_scale"]
            if weight.data is not data or weight.scale is not scale:
                weight = templates[name] = dataclasses.replace(weight, data=data, scale=scale)
            return weight
        return super().__getattr__(name)

    def quantized_weights(self) -> dict[str, QuantizedWeight]:
        return {name: getattr(self, name) for name in self._templates}


class QuantizedLinear(QuantizedModule):
    """A `Linear` with a quantized weight; the bias (if any) stays in the model dtype."""

    execution = Execution()

    def __init__(self, linear: nn.Linear, spec: QuantizeSpec):
        super().__init__(spec)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quantized = {"weight": (linear.out_features, linear.in_features)}
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.execution.linear(x, self.weight, self.bias)


class QuantizedExperts(QuantizedModule, Experts):
    """Stacked routed experts with quantized weights. The grouped path (prefill) is `Experts`'s:
    one product per expert that has tokens, on that expert's QuantizedWeight. The sync-free paths
    (decode, CUDA graphs) run every product with the weight's kernel, without a host sync: `dense`
    each expert on every token; `gathered` each (token, expert) pair on its expert's quantized bytes,
    gathered by a device index."""

    def __init__(self, experts: Experts, spec: QuantizeSpec):
        QuantizedModule.__init__(self, spec)
        self.quantized = {"w_gate_up": tuple(experts.w_gate_up.shape), "w_down": tuple(experts.w_down.shape)}

    def forward_gathered(self, x, weights, indices) -> torch.Tensor:
        linear = self.execution.linear
        k = indices.shape[-1]
        flat = indices.flatten()
        w_gate_up, w_down = self.w_gate_up, self.w_down
        outputs = []
        for pair in range(flat.numel()):
            expert = flat[pair : pair + 1]  # a one-element index tensor gathers; an int would sync
            gate, up = linear(x[pair // k : pair // k + 1], w_gate_up[expert][0]).chunk(2, -1)
            outputs.append(linear(F.silu(gate) * up, w_down[expert][0]))
        return self._combine(torch.cat(outputs), weights, x.dtype)

    def forward_dense(self, x, weights, indices) -> torch.Tensor:
        linear = self.execution.linear
        w_gate_up, w_down = self.w_gate_up, self.w_down
        outputs = []
        for expert in range(w_gate_up.lead[0]):
            gate, up = linear(x, w_gate_up[expert]).chunk(2, -1)
            outputs.append(linear(F.silu(gate) * up, w_down[expert]))
        selected = torch.stack(outputs, dim=1)[torch.arange(x.shape[0], device=x.device)[:, None], indices]
        return self._combine(selected.flatten(0, 1), weights, x.dtype)


# Linears that stay in the model dtype: MLA's kv_b_proj, read whole by the absorbed decode (above).
KEPT_LINEARS = ("kv_b_proj",)


def quantize_model(model: nn.Module, spec: QuantizeSpec) -> None:
    """Swap the language model's Linears (except KEPT_LINEARS) and routed experts for quantized
    modules, before materialisation (the model is still on the meta device): nothing is allocated
    in the model dtype for them. `model.quantization` records the spec."""
    model.quantization = spec
    if spec.mode == "none":
        return
    for name, module in list(model.language.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if isinstance(module, Linear) and child not in KEPT_LINEARS:
            replacement: nn.Module = QuantizedLinear(module, spec)
        elif isinstance(module, Experts) and not isinstance(module, QuantizedExperts):
            replacement = QuantizedExperts(module, spec)
        else:
            continue
        setattr(model.language.get_submodule(parent_name), child, replacement)


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


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the quantized weights would take in the model dtype, bytes they take)."""
    before = after = 0
    for module in model.modules():
        if isinstance(module, QuantizedModule):
            for weight in module.quantized_weights().values():
                before += math.prod(weight.shape) * weight.scale.element_size()
                after += weight.nbytes
    return before, after
