"""Access to the official-implementation fixtures in tests/fixtures (see its README.md)."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINTS = FIXTURES / "checkpoints"
IMAGES = FIXTURES / "images"

DEVICE_ENV = "DEEPSEEK_VL2_TEST_DEVICE"
COMPILE_ENV = "DEEPSEEK_VL2_TEST_COMPILE"


def _compile_decode(value: str) -> bool | None:
    if value not in ("", "0", "1"):
        raise ValueError(f"{COMPILE_ENV} must be 0, 1 or unset, got {value!r}")
    return None if value == "" else value == "1"


# Where the parity tests load their models and engines: the CPU unless DEEPSEEK_VL2_TEST_DEVICE says
# otherwise (scripts/gpu_check.py runs them with "cuda"). The assertions are the same on every device.
DEVICE = torch.device(os.environ.get(DEVICE_ENV, "cpu"))
# Whether their engines compile the decode step: "1" or "0"; unset, the engine's own default
# (compiled on CUDA, eager on the CPU). gpu_check runs both, so a compiler fault shows apart from a
# model fault.
COMPILE_DECODE = _compile_decode(os.environ.get(COMPILE_ENV, ""))

if DEVICE.type == "cuda":
    # The official fixtures were computed in IEEE fp32 (and bf16) on the CPU. On CUDA, cuDNN runs
    # fp32 convolutions (the vision tower's patch embedding) in TF32 by default: inputs rounded to
    # a 10-bit mantissa, relative error up to 2^-11 (about 5e-4), coarser than test_model's
    # tolerances. fp32 matmuls (the fp32 model, the bf16 model's fp32 router) default to IEEE
    # already; pinned as well, so that no global setting changes what is compared. Products in
    # bf16 are unaffected by either setting.
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"


@lru_cache
def model_cases() -> tuple[dict, ...]:
    with open(FIXTURES / "model_cases.json", encoding="utf-8") as f:
        return tuple(json.load(f)["cases"])


@lru_cache
def processor_pixels() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "processor_pixels.npz"))


@lru_cache
def model_logits() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "model_logits.npz"))


@lru_cache
def model_cases_bf16() -> dict[str, dict]:
    """The official model run in bf16 (fixture README section 8), keyed "<checkpoint>/<name>".

    These records hold outputs only; the inputs are those of the fp32 case with the same key.
    """
    with open(FIXTURES / "model_cases_bf16.json", encoding="utf-8") as f:
        return json.load(f)["cases"]


@lru_cache
def model_logits_bf16() -> dict[str, np.ndarray]:
    """`<key>/at_positions`: official bf16 logits (as float32) at the case's logit_positions."""
    return dict(np.load(FIXTURES / "model_logits_bf16.npz"))


# The predictor removes these from an answer and keeps every other special token (README: Outputs).
SPECIAL_TOKENS_REMOVED = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>")


def served_answer(run: dict) -> str:
    """The service's text_out for an official generation run."""
    text = run["text_with_special"]
    for token in SPECIAL_TOKENS_REMOVED:
        text = text.replace(token, "")
    return text


def case(key: str) -> dict:
    return next(c for c in model_cases() if c["key"] == key)


def model_inputs(c: dict) -> dict[str, torch.Tensor]:
    """The reference processor's outputs for a model case, as our model's forward takes them."""
    ids = torch.tensor([c["input_ids"]])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for start, end in c["images_seq_mask_runs"]:
        mask[0, start:end] = True
    if c["pixels_key"]:
        u8 = torch.from_numpy(processor_pixels()[c["pixels_key"]])
        pixels = (u8.float() / 255 - 0.5) / 0.5  # the fixture README's bit-exact recipe
        crops = torch.tensor([c["images_spatial_crop"]])
    else:
        pixels = torch.zeros(0, 3, 384, 384)
        crops = torch.zeros(1, 0, 2, dtype=torch.long)
    return dict(input_ids=ids, pixel_values=pixels[None], images_seq_mask=mask, images_spatial_crop=crops)


def conversation(c: dict) -> tuple[list[dict], list[Image.Image]]:
    """A model case as the engine takes it: the exact content strings the reference processor got,
    and every image of every message in order, opened like the reference (no EXIF rotation)."""
    messages = [
        {"role": message["role"], "content": content}
        for message, content in zip(c["messages"], c["conversation_content"])
    ]
    images = [
        Image.open(IMAGES / name).convert("RGB")
        for message in c["messages"]
        for name in message["images"]
    ]
    return messages, images
