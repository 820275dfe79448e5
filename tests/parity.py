"""Access to the official-implementation fixtures in tests/fixtures (see its README.md)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

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
