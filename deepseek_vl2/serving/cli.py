"""Command line: ask DeepSeek-VL2 about one or more images and stream the answer.

    python -m deepseek_vl2 --weights weights/deepseek-vl2-tiny --image photo.jpg "What is this?"

The answer goes to stdout as it is generated; log messages go to stderr. With --save-boxes, a
grounding answer's boxes are drawn on the last image and saved as PNG.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from ..engine.engine import Engine
from ..engine.settings import DTYPES
from ..inputs.conversation import build_messages
from ..inputs.grounding import render_grounding
from ..inputs.images import ImageInputError, load_image
from ..inputs.tiling import IMAGE_DETAILS
from .weights import WeightsNotFoundError, is_checkpoint_dir, is_demo_checkpoint, resolve_weights

logger = logging.getLogger("deepseek_vl2.cli")

UNITS = {"vision": "tile", "prefill": "token"}


class ProgressBars:
    """A bar on stderr for each stage before the first token (vision tiles, prefill tokens): on a
    CPU the first token of an image question can take a minute. Called from the engine's thread."""

    def __init__(self) -> None:
        self._stage: str | None = None
        self._bar: tqdm | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self.close()
            self._stage = stage
            unit = UNITS.get(stage, "step")
            # Each update is a vision batch or a prefill chunk, seconds apart on a CPU: draw them all.
            self._bar = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr, leave=False, mininterval=0)
        assert self._bar is not None
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._stage, self._bar = None, None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_vl2",
        description="Ask DeepSeek-VL2 a question about images; the answer is streamed to stdout.",
    )
    parser.add_argument("question", help="the question; <image> tags are added if missing")
    parser.add_argument(
        "--image", action="append", required=True, type=Path, help="an image (repeat for more)"
    )
    parser.add_argument(
        "--weights",
        type=Path,
        help="checkpoint directory (default: $DEEPSEEK_VL2_WEIGHTS, then weights/<variant>)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--temperature", type=float, default=0.1, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=50, help="0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--image-detail",
        choices=IMAGE_DETAILS,
        default="auto",
        help="auto: high-resolution tiling for one or two images; low: one 384x384 view per image "
        "(421 tokens), a much faster first answer",
    )
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if found)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: $DEEPSEEK_VL2_DTYPE, else bfloat16")
    parser.add_argument(
        "--save-boxes",
        type=Path,
        metavar="OUT.png",
        help="save the grounding boxes drawn on the last image",
    )
    args = parser.parse_args(argv)
    if args.save_boxes is not None and args.save_boxes.suffix.lower() != ".png":
        parser.error("--save-boxes writes a PNG file: give it a .png name")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        weights = args.weights if args.weights is not None else resolve_weights()
        if not is_checkpoint_dir(weights):
            raise WeightsNotFoundError(f"{weights} is not a checkpoint directory (no config.json)")
        images = [
            load_image(path, f"--image {path}", allow_local_files=True) for path in args.image
        ]
    except (WeightsNotFoundError, ImageInputError) as error:
        logger.error("%s", error)
        return 2
    if is_demo_checkpoint(weights):
        logger.warning("%s is a random-weight DEMO checkpoint: the answer is noise.", weights)

    engine = Engine.from_pretrained(
        str(weights), device=args.device, dtype=DTYPES.get(args.dtype) if args.dtype else None
    )
    chunks, bars = [], ProgressBars()
    for chunk in engine.stream(
        build_messages(args.question, len(images)),
        images,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        progress=bars,
        image_detail=args.image_detail,
    ):
        bars.close()  # the answer has begun
        sys.stdout.write(chunk)
        sys.stdout.flush()
        chunks.append(chunk)
    sys.stdout.write("\n")

    if args.save_boxes is not None:
        drawn = render_grounding("".join(chunks), images[-1])
        if drawn is None:
            logger.warning("The answer holds no grounding boxes; %s not written.", args.save_boxes)
        else:
            drawn.save(args.save_boxes, format="PNG")
            logger.info("Saved the boxes to %s", args.save_boxes)
    return 0

