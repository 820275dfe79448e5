#!/usr/bin/env python3
"""Regenerate `.cog/openapi_schema.json` from the Predictor signature in predict.py.

coglet validates HTTP inputs only when this file exists (normally `cog build` writes it). Run
`make schema` after changing predict()'s inputs or output; tests/serving/test_schema.py fails when the
committed file is stale. `--check` only compares and exits 1 on a difference.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = PROJECT_ROOT / ".cog" / "openapi_schema.json"
sys.path.insert(0, str(PROJECT_ROOT))

from deepseek_vl2.serving.openapi import build_openapi_schema, render  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()

    # cog warns that BasePredictor/predict() are deprecated names; they still work in 0.23.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        text = render(build_openapi_schema("predict", "Predictor"))

    if args.check:
        current = SCHEMA_PATH.read_text(encoding="utf-8") if SCHEMA_PATH.is_file() else ""
        if current != text:
            print(f"{SCHEMA_PATH} is stale: run `make schema`", file=sys.stderr)
            return 1
        print(f"{SCHEMA_PATH} is up to date")
        return 0
    SCHEMA_PATH.parent.mkdir(exist_ok=True)
    SCHEMA_PATH.write_text(text, encoding="utf-8")
    print(f"Wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
