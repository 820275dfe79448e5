"""`image_detail`: "low" is the official processor's own no-tiling path (its >2-images rule), for
any number of images; "auto" is the official rule itself. Checked against the official fixtures."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest
import torch
from parity import FIXTURES, IMAGES, processor_pixels
from PIL import Image

from deepseek_vl2 import IMAGE_DETAILS, Processor, ProcessorOutput
from deepseek_vl2.inputs.tiling import SINGLE_TILE, TileGrid, TilingConfig, choose_grids

LOW_IMAGE_TOKENS = 421  # 14 x 15 global rows + 1 separator + 14 x 15 local rows


@lru_cache
def _processor() -> Processor:
    return Processor.from_pretrained(FIXTURES / "tokenizer")


@lru_cache
def _case(name: str) -> dict:
    cases = json.loads((FIXTURES / "processor_cases.json").read_text(encoding="utf-8"))["cases"]
    return next(case for case in cases if case["name"] == name)


def _images(case: dict) -> list[Image.Image]:
    return [Image.open(IMAGES / name) for message in case["messages"] for name in message["images"]]


def _run(case: dict, image_detail: str, images: list[Image.Image] | None = None) -> ProcessorOutput:
    messages = [
        {"role": message["role"], "content": content}
        for message, content in zip(case["messages"], case["conversation_content"], strict=True)
    ]
    return _processor()(messages, _images(case) if images is None else images, image_detail)


def _official_tiles(name: str) -> torch.Tensor:
    """The fixture's uint8 tiles normalised as the processor does: (u8 / 255 - 0.5) / 0.5."""
    u8 = processor_pixels()[name]
    return torch.from_numpy((u8.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5))


def _first_tiles(case: dict) -> list[int]:
    """Index of each image's first (global) tile in the case's tile list."""
    starts, start = [], 0
    for columns, rows in case["images_spatial_crop"]:
        starts.append(start)
        start += 1 + columns * rows
    return starts


def test_with_three_images_low_and_auto_are_the_official_output():
    case = _case("p_three")
    assert case["cropping"] is False  # the official processor turned tiling off itself
    auto, low = _run(case, "auto"), _run(case, "low")
    assert low.input_ids[0].tolist() == auto.input_ids[0].tolist() == case["input_ids"]
    assert torch.equal(low.images_seq_mask, auto.images_seq_mask)
    assert low.images_spatial_crop[0].tolist() == case["images_spatial_crop"] == [[1, 1]] * 3
    assert low.image_token_counts == case["num_image_tokens"] == [LOW_IMAGE_TOKENS] * 3
    assert torch.equal(low.pixel_values[0], _official_tiles("p_three"))
    assert torch.equal(low.pixel_values, auto.pixel_values)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_one_image_at_low_detail_is_that_image_in_the_official_three_image_request(index):
    three = _case("p_three")
    image = _images(three)[index]
    alone = _processor()([{"role": "user", "content": "<image>\nWhat is this?"}], [image], "low")
    assert alone.images_spatial_crop[0].tolist() == [[1, 1]]
    assert alone.image_token_counts == [LOW_IMAGE_TOKENS]
    assert int(alone.images_seq_mask.sum()) == LOW_IMAGE_TOKENS
    # Its global view and its one local tile, pixel for pixel the official ones in the 3-image request.
    assert torch.equal(alone.pixel_values[0], _official_tiles("p_three")[2 * index : 2 * index + 2])


def test_the_seed_image_at_low_detail_is_its_official_global_view_and_a_shorter_span():
    case = _case("p_seed")
    auto, low = _run(case, "auto"), _run(case, "low")
    assert auto.input_ids[0].tolist() == case["input_ids"]  # 1823 tokens, a 4x2 grid
    [(start, end)] = case["images_seq_mask_runs"]
    ids = case["input_ids"]
    assert low.input_ids[0].tolist() == ids[:start] + ids[start : start + LOW_IMAGE_TOKENS] + ids[end:]
    assert low.input_ids.shape[1] == case["seq_len"] - case["num_image_tokens"][0] + LOW_IMAGE_TOKENS == 437
    assert low.images_spatial_crop[0].tolist() == [[1, 1]] and auto.images_spatial_crop[0].tolist() == [[4, 2]]
    global_view = _official_tiles("p_seed")[0]
    assert torch.equal(low.pixel_values[0], torch.stack([global_view, global_view]))


def test_two_images_at_low_detail_keep_their_official_global_views():
    case = _case("p_two")
    low = _run(case, "low")
    official = _official_tiles("p_two")
    expected = torch.stack([official[start] for start in _first_tiles(case) for _ in range(2)])
    assert low.images_spatial_crop[0].tolist() == [[1, 1], [1, 1]]
    assert low.image_token_counts == [LOW_IMAGE_TOKENS] * 2
    assert torch.equal(low.pixel_values[0], expected)


def test_an_image_auto_already_sees_whole_is_unchanged_at_low_detail():
    case = _case("p_tiny")  # 20x10: the official processor picks a 1x1 grid itself
    low = _run(case, "low")
    assert low.input_ids[0].tolist() == case["input_ids"]
    assert torch.equal(low.pixel_values[0], _official_tiles("p_tiny"))


def test_low_takes_the_official_no_cropping_path_for_any_number_of_images():
    config = TilingConfig(candidate_resolutions=((384, 384), (768, 384), (1536, 768)))
    sizes = [(5014, 2004), (800, 400)]
    assert choose_grids(sizes, config) == [TileGrid(4, 2), TileGrid(4, 2)]  # both tiled
    assert choose_grids(sizes, config, "low") == [SINGLE_TILE, SINGLE_TILE]
    assert choose_grids(sizes[:1], config, "low") == [SINGLE_TILE]
    assert choose_grids(sizes * 2, config, "auto") == [SINGLE_TILE] * 4  # the official rule


@pytest.mark.parametrize("value", ["high", "LOW", "", None, 1])
def test_another_detail_is_refused_with_the_value_and_the_choices(value):
    tiny = Image.open(IMAGES / "tiny_20x10.png")
    for messages, images in (([{"role": "user", "content": "<image>\nHi"}], [tiny]), ([{"role": "user", "content": "Hi"}], [])):
        with pytest.raises(ValueError, match=rf"image_detail must be one of auto, low; got {value!r}"):
            _processor()(messages, images, value)
    assert IMAGE_DETAILS == ("auto", "low")
