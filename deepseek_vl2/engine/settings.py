"""The service's settings from the environment (README, Knobs), each refused with a message naming
it when it cannot be used."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..compute.quantized import DEFAULT_GROUP_SIZE, MODES, QuantizeSpec

MAX_BATCH_ENV = "DEEPSEEK_VL2_MAX_BATCH"
GPU_MAX_BATCH_CAP = 16  # larger batches help little more per step and each bucket compiles
CPU_DEFAULT_MAX_BATCH = 4
CONCURRENCY_ENV = "COG_MAX_CONCURRENCY"  # the Cog server's limit on predictions at once
PREFILL_CHUNK_ENV = "DEEPSEEK_VL2_PREFILL_CHUNK"
PREFIX_CACHE_ENV = "DEEPSEEK_VL2_PREFIX_CACHE_GB"
DTYPE_ENV = "DEEPSEEK_VL2_DTYPE"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANTIZE_ENV = "DEEPSEEK_VL2_QUANTIZE"
QUANTIZE_GROUP_ENV = "DEEPSEEK_VL2_QUANTIZE_GROUP"
QUANTIZED_CACHE_ENV = "DEEPSEEK_VL2_QUANTIZED_CACHE"
QUANTIZED_CACHE_UNDER_HOME = Path(".cache") / "deepseek_vl2" / "quantized"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype() -> torch.dtype:
    """bf16 unless DEEPSEEK_VL2_DTYPE names another: the production dtype on a GPU, and on the CPU
    1.7-2.2x fp32's decode speed at 0.54-0.57x its memory, for a time to first token within 4%
    (README, Performance)."""
    name = os.environ.get(DTYPE_ENV, "").strip() or "bfloat16"
    if name not in DTYPES:
        raise ValueError(f"{DTYPE_ENV} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def default_quantize(environ: Mapping[str, str] = os.environ) -> QuantizeSpec:
    """The language model's weight quantization: DEEPSEEK_VL2_QUANTIZE (none, int8 or int4; none
    unless set) and, for int4, DEEPSEEK_VL2_QUANTIZE_GROUP (weights per scale, 128 unless set)."""
    mode = environ.get(QUANTIZE_ENV, "").strip() or "none"
    if mode not in MODES:
        raise ValueError(f"{QUANTIZE_ENV} must be one of {', '.join(MODES)}, got {mode!r}")
    group = env_int(QUANTIZE_GROUP_ENV, environ) or DEFAULT_GROUP_SIZE
    try:
        return QuantizeSpec(mode, group)
    except ValueError as error:
        raise ValueError(f"{QUANTIZE_GROUP_ENV}: {error}") from None


def default_quantized_cache(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The folder of quantized weights kept between starts (model/quantized_cache.py):
    DEEPSEEK_VL2_QUANTIZED_CACHE, None (no cache) when it is set empty; unset, ~/.cache/deepseek_vl2/
    quantized under HOME as it is now, or None when there is no absolute home."""
    value = environ.get(QUANTIZED_CACHE_ENV)
    if value is not None:
        return Path(value).expanduser() if value.strip() else None
    home = environ.get("HOME", "")
    if not home or not os.path.isabs(home):
        return None
    return Path(home) / QUANTIZED_CACHE_UNDER_HOME


def env_int(name: str, environ: Mapping[str, str] = os.environ) -> int | None:
    """A positive integer setting, or None when unset."""
    value = environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def env_gib(name: str) -> int | None:
    """A size in GiB, as bytes; None when unset."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        gib = float(value)
    except ValueError:
        gib = -1.0
    if not gib >= 0:
        raise ValueError(f"{name} must be a number of GiB >= 0, got {value!r}")
    return int(gib * 2**30)


def planned_max_batch(cuda: bool, environ: Mapping[str, str] = os.environ) -> int:
    """The batch size to plan for before a model is loaded, by the engine's rule: DEEPSEEK_VL2_MAX_BATCH,
    else as many rows as the server admits predictions (COG_MAX_CONCURRENCY), else the GPU cap or
    the CPU default. The CPU engine runs exactly this many rows (and calibration measures at it);
    on a GPU the engine may find room for fewer rows, and the surplus requests wait in its queue."""
    return (
        env_int(MAX_BATCH_ENV, environ)
        or env_int(CONCURRENCY_ENV, environ)
        or (GPU_MAX_BATCH_CAP if cuda else CPU_DEFAULT_MAX_BATCH)
    )
