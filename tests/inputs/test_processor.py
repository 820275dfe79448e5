"""End-to-end processor parity with the official processor (processor and model fixtures)."""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from parity import CHECKPOINTS, FIXTURES, IMAGES, model_cases, processor_pixels
from PIL import Image

from deepseek_vl2 import Processor, ProcessorOutput


def _processor_cases() -> list[dict]:
    with open(FIXTURES / "processor_cases.json", encoding="utf-8") as f:
        return json.load(f)["cases"]


@lru_cache
def _processor(directory: Path) -> Processor:
    return Processor.from_pretrained(directory)


@lru_cache
def _model_pixels() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "model_pixels.npz"))


def _reference_pixels(key: str) -> np.ndarray:
    if key.startswith("model:"):
        return _model_pixels()[key.removeprefix("model:")]
    return processor_pixels()[key]


def _run(processor: Processor, case: dict) -> ProcessorOutput:
    # Images go in as the files decode (RGBA, L, ...): the processor's own RGB conversion must match
    # the reference's Image.convert("RGB").
    images = [Image.open(IMAGES / name) for message in case["messages"] for name in message["images"]]
    messages = [
        {"role": message["role"], "content": content}
        for message, content in zip(case["messages"], case["conversation_content"], strict=True)
    ]
    return processor(messages, images)


def _assert_matches(output: ProcessorOutput, case: dict, pixels_key: str | None) -> None:
    assert output.input_ids.dtype == torch.long and output.input_ids.shape == (1, case["seq_len"])
    assert output.input_ids[0].tolist() == case["input_ids"]

    expected_mask = torch.zeros(case["seq_len"], dtype=torch.bool)
    for start, end in case["images_seq_mask_runs"]:
        expected_mask[start:end] = True
    assert output.images_seq_mask.dtype == torch.bool
    assert torch.equal(output.images_seq_mask[0], expected_mask)
    assert output.image_token_counts == case["num_image_tokens"]

    n_images = len(case["num_image_tokens"])
    assert output.images_spatial_crop.dtype == torch.long
    assert output.images_spatial_crop.shape == (1, n_images, 2)
    if n_images:
        assert output.images_spatial_crop[0].tolist() == case["images_spatial_crop"]
    else:
        assert case["images_spatial_crop"] == [[0, 0]]  # the reference's dummy row, which we omit

    assert output.pixel_values.dtype == torch.float32
    assert output.pixel_values.shape == (1, case["n_tiles"], 3, 384, 384)
    if pixels_key is None:
        return
    reference_u8 = _reference_pixels(pixels_key)
    pixels = output.pixel_values[0].numpy()
    # Bit-exact against the README's recipe, and the README's inverse gives back the stored bytes.
    expected = (reference_u8.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(pixels, expected)
    np.testing.assert_array_equal(np.round((pixels * 0.5 + 0.5) * 255).astype(np.uint8), reference_u8)


@pytest.mark.parametrize("case", _processor_cases(), ids=lambda case: case["name"])
def test_processor_case(case):
    output = _run(_processor(FIXTURES / "tokenizer"), case)
    _assert_matches(output, case, case["name"] if case["n_tiles"] else None)


@pytest.mark.parametrize("case", model_cases(), ids=lambda case: case["key"])
def test_model_case_processor_fields(case):
    output = _run(_processor(CHECKPOINTS / case["checkpoint"]), case)
    _assert_matches(output, case, case["pixels_key"])


def test_image_spans_hold_the_image_id():
    processor = _processor(FIXTURES / "tokenizer")
    case = next(case for case in _processor_cases() if case["name"] == "p_two")
    output = _run(processor, case)
    span_ids = output.input_ids[output.images_seq_mask]
    assert span_ids.numel() == sum(output.image_token_counts)
    assert (span_ids == processor.tokenizer.image_id).all()
    assert not (output.input_ids[~output.images_seq_mask] == processor.tokenizer.image_id).any()


def test_text_only_shapes():
    output = _processor(FIXTURES / "tokenizer")([{"role": "user", "content": "Hello"}])
    assert output.pixel_values.shape == (1, 0, 3, 384, 384) and output.pixel_values.dtype == torch.float32
    assert output.images_spatial_crop.shape == (1, 0, 2) and output.images_spatial_crop.dtype == torch.long
    assert output.image_token_counts == []
    assert not output.images_seq_mask.any()


def test_trailing_empty_assistant_is_optional():
    processor = _processor(FIXTURES / "tokenizer")
    image = Image.open(IMAGES / "tiny_20x10.png")
    ends_with_user = processor([{"role": "user", "content": "<image>\nHi"}], [image])
    with_slot = processor(
        [{"role": "<|User|>", "content": "<image>\nHi"}, {"role": "assistant", "content": ""}], [image]
    )
    assert torch.equal(ends_with_user.input_ids, with_slot.input_ids)
    assert torch.equal(ends_with_user.pixel_values, with_slot.pixel_values)


def test_system_message_follows_bos():
    processor = _processor(FIXTURES / "tokenizer")
    tokenizer = processor.tokenizer
    output = processor([{"role": "system", "content": " You are terse. "}, {"role": "user", "content": "Hi"}])
    expected = [
        tokenizer.bos_id,
        *tokenizer.encode("You are terse."),
        *tokenizer.encode("<|User|>: Hi\n\n<|Assistant|>:"),
    ]
    assert output.input_ids[0].tolist() == expected


@pytest.mark.parametrize(
    ("content", "n_images"), [("<image>\nTwo?", 2), ("<image><image>One?", 1), ("None?", 1)]
)
def test_tag_count_mismatch(content, n_images):
    images = [Image.open(IMAGES / "tiny_20x10.png")] * n_images
    with pytest.raises(ValueError, match=r"tag\(s\) but .* image\(s\)"):
        _processor(FIXTURES / "tokenizer")([{"role": "user", "content": content}], images)


def test_decode_keeps_grounding_tags_and_drops_eos():
    processor = _processor(FIXTURES / "tokenizer")
    text = "<|ref|>The giraffe at the back.<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>"
    ids = [*processor.tokenizer.encode(text), processor.tokenizer.eos_id]
    assert processor.decode(ids) == text
    assert (
        processor.decode(torch.tensor(ids), skip_special_tokens=True)
        == "The giraffe at the back.[[580, 270, 999, 900]]"
    )


def test_from_pretrained_falls_back_to_model_config(tmp_path):
    source = CHECKPOINTS / "tiny-mla"
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(source / name, tmp_path / name)
    fallback = Processor.from_pretrained(tmp_path)
    assert fallback.tiling == _processor(source).tiling
    case = next(case for case in model_cases() if case["key"] == "tiny-mla/m_two")
    _assert_matches(_run(fallback, case), case, case["pixels_key"])
