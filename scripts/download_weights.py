#!/usr/bin/env python3
"""Download a DeepSeek-VL2 checkpoint from the Hugging Face hub into weights/<variant>.

Usage: python scripts/download_weights.py --variant deepseek-vl2-tiny [--out DIR]

The predictor finds weights/<variant> on its own (select it with DEEPSEEK_VL2_VARIANT).
Sizes (bf16): tiny ~6.7 GB, small ~32 GB, base (deepseek-vl2) ~55 GB.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from deepseek_vl2.serving.weights import (
    DEFAULT_VARIANT, KNOWN_VARIANTS, WeightsNotFoundError, download_weights,
)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=KNOWN_VARIANTS, default=DEFAULT_VARIANT)
    parser.add_argument("--out", type=Path, help="target directory (default: weights/<variant>)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    destination = args.out or PROJECT_ROOT / "weights" / args.variant
    try:
        download_weights(args.variant, destination)
    except WeightsNotFoundError as error:
        logging.error("%s", error)
        return 1
    print(f"{args.variant} is ready in {destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
