"""Resolution choice, token-count formula, tile rendering and normalisation (SPEC §5, §6)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from parity import CHECKPOINTS, FIXTURES, IMAGES, processor_pixels
from PIL import Image, ImageOps

from deepseek_vl2.inputs.tiling import (
    TileGrid, TilingConfig, choose_grids, image_token_count, normalize_tiles, render_tiles, select_resolution,
)  # fmt: skip

CONFIG = TilingConfig.from_pretrained(FIXTURES / "tokenizer")
CANDIDATES = CONFIG.candidate_resolutions


def test_config_from_processor_config():
    assert len(CANDIDATES) == 23
    assert CANDIDATES[0] == (384, 384) and CANDIDATES[-1] == (1152, 1152)
    assert (CONFIG.tile_size, CONFIG.patch_size, CONFIG.downsample_ratio) == (384, 14, 2)
    assert CONFIG.tokens_per_side == 14
    assert CONFIG.pad_color == (127, 127, 127)


def test_config_falls_back_to_model_config(tmp_path):
    shutil.copy(CHECKPOINTS / "tiny-mha" / "config.json", tmp_path / "config.json")
    assert TilingConfig.from_pretrained(tmp_path) == TilingConfig.from_pretrained(CHECKPOINTS / "tiny-mha")


def test_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        TilingConfig.from_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"patch_size": 14}))
    with pytest.raises(ValueError, match="candidate_resolutions"):
        TilingConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="multiple of the tile size"):
        TilingConfig(candidate_resolutions=((384, 384), (500, 384)))


@pytest.mark.parametrize(
    ("tile", "patch", "downsample", "per_side"),
    [(384, 14, 2, 14), (448, 14, 2, 16), (384, 16, 2, 12), (384, 14, 3, 9)],
)
def test_tokens_per_side_is_derived(tile, patch, downsample, per_side):
    # ceil((tile // patch) / downsample): 384 // 14 = 27 patches, 27 / 2 rounds up to 14.
    config = TilingConfig(
        candidate_resolutions=((tile, tile),), patch_size=patch, downsample_ratio=downsample
    )
    assert config.tokens_per_side == per_side


# SPEC §5.3 worked examples, (W, H) -> chosen (w, h).
@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1920, 1080), (1536, 768)),
        ((1080, 1920), (768, 1536)),
        ((640, 480), (768, 768)),
        ((200, 100), (384, 384)),
        ((1000, 1000), (1152, 1152)),
        ((4000, 3000), (1152, 1152)),
        ((3000, 500), (2304, 384)),
        ((724, 1086), (768, 1152)),
        ((868, 1160), (1152, 1152)),
        ((1738, 1146), (1536, 768)),
        ((5014, 2004), (1536, 768)),
    ],
)
def test_select_resolution_spec_examples(size, expected):
    assert select_resolution(size, CANDIDATES) == expected


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        # Tiny images fit whole everywhere (kept = W·H); the least waste is the 384×384 canvas.
        ((1, 1), (384, 384)),
        ((20, 10), (384, 384)),
        # 3000×200: 3456×384 and 3072×384 both keep all 600000 pixels (s = 1.152, 1.024);
        # 3072·384 − 600000 = 579648 beats 3456·384 − 600000 = 727104.
        ((3000, 200), (3072, 384)),
        # 5000×5: s = 3456/5000 keeps 3456·trunc(3.456) = 10368 pixels, more than any other candidate.
        ((5000, 5), (3456, 384)),
        ((5, 5000), (384, 3456)),
        # 10000×1: the height truncates to 0 everywhere, all candidates keep 0 pixels; the first
        # candidate also wastes least.
        ((10000, 1), (384, 384)),
        ((1, 10000), (384, 384)),
        # 300×500 (fixture p_gray): 384×768 keeps all 150000 pixels with the least waste.
        ((300, 500), (384, 768)),
    ],
)
def test_select_resolution_tiny_and_extreme(size, expected):
    assert select_resolution(size, CANDIDATES) == expected


def test_select_resolution_exact_tie_keeps_first_candidate():
    # 1000×1000 into 768×384 or 384×768: s = 0.384 either way, 384·384 pixels kept, equal waste.
    assert select_resolution((1000, 1000), [(768, 384), (384, 768)]) == (768, 384)
    assert select_resolution((1000, 1000), [(384, 768), (768, 384)]) == (384, 768)


def test_select_resolution_equal_pixels_prefers_less_waste_even_later():
    # 200×100 fits whole in both; 384·384 − 20000 < 768·768 − 20000 although it comes second.
    assert select_resolution((200, 100), [(768, 768), (384, 384)]) == (384, 384)


def test_select_resolution_truncates_like_the_reference():
    # 775×1163 into 768×1152: s = 1152/1163, W·s = 767.67 truncates to 767 → 767·1152 = 883584 kept.
    # Into 768×1536: s = 768/775, H·s = 1152.50 → 768·1152 = 884736 kept, more, so it wins despite
    # the waste. (Rounding instead of truncating would keep 768·1152 in both and pick 768×1152.)
    assert select_resolution((775, 1163), CANDIDATES) == (768, 1536)


def test_cropping_only_for_at_most_two_images():
    sizes = [(1024, 701), (450, 308)]
    assert choose_grids(sizes, CONFIG) == [TileGrid(3, 2), TileGrid(2, 1)]
    assert choose_grids([*sizes, (1280, 720)], CONFIG) == [TileGrid(1, 1)] * 3
    assert choose_grids([], CONFIG) == []
    with pytest.raises(ValueError, match="empty size"):
        choose_grids([(0, 10)], CONFIG)


# SPEC §6 table: grid (columns × rows) -> tokens.
@pytest.mark.parametrize(
    ("columns", "rows", "tokens"),
    [
        (1, 1, 421),
        (1, 2, 631),
        (2, 1, 617),
        (1, 3, 841),
        (3, 1, 813),
        (1, 4, 1051),
        (4, 1, 1009),
        (2, 2, 1023),
        (1, 5, 1261),
        (5, 1, 1205),
        (1, 6, 1471),
        (6, 1, 1401),
        (2, 3, 1429),
        (3, 2, 1415),
        (1, 7, 1681),
        (7, 1, 1597),
        (1, 8, 1891),
        (8, 1, 1793),
        (2, 4, 1835),
        (4, 2, 1807),
        (1, 9, 2101),
        (9, 1, 1989),
        (3, 3, 2017),
    ],
)
def test_image_token_count_table(columns, rows, tokens):
    assert image_token_count(TileGrid(columns, rows), CONFIG.tokens_per_side) == tokens


def test_largest_span_is_the_one_by_nine_strip():
    # Over the real candidate list the tallest strip (1×9) costs the most: 2101 tokens.
    counts = [image_token_count(TileGrid(w // 384, h // 384), 14) for w, h in CANDIDATES]
    assert max(counts) == 2101


def test_render_tiles_layout():
    image = Image.open(IMAGES / "visual_grounding_1.jpeg").convert("RGB")  # 724×1086 -> 2×3 grid
    grid = TileGrid(2, 3)
    tiles = render_tiles([image], [grid], CONFIG)
    assert tiles.shape == (7, 3, 384, 384) and tiles.dtype == np.uint8
    expected_global = np.asarray(ImageOps.pad(image, (384, 384), color=(127, 127, 127))).transpose(2, 0, 1)
    np.testing.assert_array_equal(tiles[0], expected_global)
    local = np.asarray(ImageOps.pad(image, (768, 1152), color=(127, 127, 127))).transpose(2, 0, 1)
    for index in range(6):
        row, column = divmod(index, 2)  # row-major: top row first, left to right
        np.testing.assert_array_equal(
            tiles[1 + index], local[:, row * 384 : (row + 1) * 384, column * 384 : (column + 1) * 384]
        )


def test_single_tile_grid_repeats_the_global_view():
    tiles = render_tiles([Image.open(IMAGES / "tiny_20x10.png")], [TileGrid(1, 1)], CONFIG)
    assert tiles.shape == (2, 3, 384, 384)
    np.testing.assert_array_equal(tiles[0], tiles[1])


def test_pad_geometry_of_fixture_uses_round_half_even():
    # multi_image_1.jpeg is 1024×701: the global view holds a 384×263 picture (262.875 is rounded,
    # not truncated) at row offset round(60.5) = 60 (Python rounds half to even; half-up would give
    # 61). Rows 0..59 and 323.. are pad colour.
    global_view = processor_pixels()["p_two"][0]
    is_pad_row = (global_view == 127).all(axis=(0, 2))
    assert is_pad_row[:60].all() and not is_pad_row[60] and not is_pad_row[322] and is_pad_row[323:].all()


def test_normalize_matches_reference_formula_bit_for_bit():
    every_value = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16).repeat(3, axis=1)
    normalized = normalize_tiles(every_value, CONFIG)
    assert normalized.dtype == torch.float32
    reference = (every_value.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(normalized.numpy(), reference)
    assert normalized.min() == -1.0 and normalized.max() == 1.0
    restored = np.round((normalized.numpy() * 0.5 + 0.5) * 255).astype(np.uint8)
    np.testing.assert_array_equal(restored, every_value)
