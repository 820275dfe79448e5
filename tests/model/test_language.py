"""The decoder's building blocks that the model-level parity tests do not isolate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepseek_vl2.model.attention import cache_zeros


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc (Linux)")
def test_a_cpu_cache_is_zero_and_becomes_resident_only_where_written():
    shape, dtype = (4, 4096, 32, 128), torch.bfloat16
    row = 4096 * 32 * 128 * dtype.itemsize  # 32 MiB
    torch.count_nonzero(torch.zeros(64, 64))  # the kernels' own first-call allocations, before measuring
    before = resident_bytes()
    cache = cache_zeros(shape, torch.device("cpu"), dtype)
    assert cache.shape == shape and cache.dtype == dtype and cache.is_contiguous()
    assert not torch.count_nonzero(cache[:, ::64])  # reading never-written pages commits nothing
    assert resident_bytes() - before < row / 4
    cache[1].fill_(1.5)
    grown = resident_bytes() - before
    assert row * 0.9 < grown < row * 1.5
    assert torch.all(cache[1] == 1.5) and not torch.count_nonzero(cache[0]) and not torch.count_nonzero(cache[2:])


def test_an_empty_cache_and_other_devices_get_plain_zeros():
    empty = cache_zeros((0, 4096, 8), torch.device("cpu"), torch.float32)
    assert empty.shape == (0, 4096, 8)
    on_meta = cache_zeros((2, 16, 8), torch.device("meta"), torch.bfloat16)
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 16, 8)
