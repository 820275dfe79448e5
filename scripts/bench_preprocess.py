#!/usr/bin/env python3
"""Time request preprocessing: image decode, tiling, normalisation, tokenization, and the whole processor.

Defaults reproduce the seed request: tests/fixtures/images/vqa_1.jpg (5014×2004, 4×2 grid + global
view = 9 tiles) with the prompt "Describe each stage of this image in detail" and the realistic
tokenizer. Prints the median and minimum of several runs per stage, in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from PIL import Image  # noqa: E402

from deepseek_vl2 import Processor, build_messages  # noqa: E402
from deepseek_vl2.inputs.conversation import parse_conversation  # noqa: E402
from deepseek_vl2.inputs.tiling import choose_grids, image_token_count, normalize_tiles, render_tiles  # noqa: E402

FIXTURES = PROJECT_ROOT / "tests" / "fixtures"


def time_runs(step: Callable[[], object], runs: int) -> list[float]:
    """Wall-clock milliseconds of `runs` calls, after one untimed warm-up call."""
    step()
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        timings.append((time.perf_counter() - start) * 1e3)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image", type=Path, default=FIXTURES / "images" / "vqa_1.jpg")
    parser.add_argument("--tokenizer", type=Path, default=FIXTURES / "tokenizer", help="snapshot directory")
    parser.add_argument("--prompt", default="Describe each stage of this image in detail")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()

    processor = Processor.from_pretrained(args.tokenizer)
    config = processor.tiling

    def decode() -> Image.Image:
        # convert() copies even an RGB image (~20 ms at 10 MP), so only non-RGB files pay for it.
        image = Image.open(args.image)
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")

    image = decode()
    messages = build_messages(args.prompt, 1)
    grids = choose_grids([image.size], config)
    tiles = render_tiles([image], grids, config)
    token_counts = [image_token_count(grid, config.tokens_per_side) for grid in grids]

    stages: dict[str, Callable[[], object]] = {
        "decode (open + load)": decode,
        "tiling (grid + pad/resize + cut)": lambda: render_tiles(
            [image], choose_grids([image.size], config), config
        ),
        "normalise": lambda: normalize_tiles(tiles, config),
        "tokenize (layout ids + mask)": lambda: processor.layout_prompt(
            parse_conversation(messages), token_counts
        ),
        "processor call (decoded image)": lambda: processor(messages, [image]),
        "end to end (decode + processor)": lambda: processor(messages, [decode()]),
    }
    grid = grids[0]
    print(
        f"{args.image.name} {image.size[0]}×{image.size[1]} -> grid {grid.columns}×{grid.rows}, "
        f"{tiles.shape[0]} tiles, {token_counts[0]} image tokens; {args.runs} runs per stage"
    )
    print(f"{'stage':34s} {'median ms':>10s} {'min ms':>8s}")
    for name, step in stages.items():
        timings = time_runs(step, args.runs)
        print(f"{name:34s} {statistics.median(timings):10.2f} {min(timings):8.2f}")


if __name__ == "__main__":
    main()
