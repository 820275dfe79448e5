"""Access to the official-implementation fixtures in tests/fixtures (see its README.md)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINTS = FIXTURES / "checkpoints"
IMAGES = FIXTURES / "images"


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
