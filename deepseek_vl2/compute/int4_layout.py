"""The layout of torch's CPU int4 packed weights, learned from torch's own pack op.

`_convert_weight_to_int4pack_for_cpu` packs differently for each kernel level torch dispatches to
(ATEN_CPU_CAPABILITY): blocks of S output rows, per block and input column S/2 bytes, each holding
two rows. Measured with torch 2.13: default S=32, byte b = rows 2b, 2b+1 (low, high nibble); avx2
S=32, rows b, b+16; avx512 S=64, rows b, b+32. `cpu_int4_layout` learns it from the op itself for
`Int4Weight.dequantize` (quantized.py), never assumed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# The CPU int4 kernel packs output rows in blocks of 64 (and CUDA's in blocks of 8); weights are
# padded to whole blocks of this many rows, since partial blocks pack differently.
INT4_ROW_BLOCK = 64

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
