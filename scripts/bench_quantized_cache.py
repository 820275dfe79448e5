#!/usr/bin/env python3
"""Load time and peak memory of a quantized random-weight model, first start against second start
with the quantized cache (deepseek_vl2/model/quantized_cache.py).

Each start is a fresh process that only builds the model (benchmark.py's `random_model`: the
variant's real dimensions, random weights) and prints one JSON line: the cache's state, the seconds
until the weights were ready and the process's peak RSS. The first start finds an empty cache folder
(a miss: it draws, quantizes and writes the file), the second finds the file (a hit: it reads and
repacks it and draws only the other tensors). The cache's info lines (read, repack and write times)
are printed too.

Usage: python scripts/bench_quantized_cache.py [--variant tiny|small|base] [--quantize int4|int8]
       [--dtype bfloat16|float32] [--dir DIR (default: a new temporary folder, removed after)]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def child(variant: str, mode: str, dtype_name: str, directory: str) -> None:
    import torch

    from benchmark import TOKENIZER, config_for, random_model
    from deepseek_vl2 import Processor
    from deepseek_vl2.compute.quantized import QuantizeSpec
    from deepseek_vl2.engine.settings import DTYPES

    logging.basicConfig(level=logging.WARNING, format="    %(message)s")
    logging.getLogger("deepseek_vl2.model.quantized_cache").setLevel(logging.INFO)
    config = config_for(variant, Processor.from_pretrained(TOKENIZER))
    started = time.perf_counter()
    model = random_model(config, torch.device("cpu"), DTYPES[dtype_name], QuantizeSpec(mode), Path(directory))
    load_s = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"quantize_cache": model.quantized_cache, "load_s": round(load_s, 2), "peak_rss_gib": round(peak, 3)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["tiny", "small", "base"], default="tiny")
    parser.add_argument("--quantize", choices=["int8", "int4"], default="int4")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.variant, args.quantize, args.dtype, str(args.dir))
        return
    directory = args.dir or Path(tempfile.mkdtemp(prefix="qcache-bench-"))
    try:
        reports = []
        for start in ("first", "second"):
            command = [sys.executable, __file__, "--child", "--variant", args.variant, "--quantize", args.quantize,
                       "--dtype", args.dtype, "--dir", str(directory)]  # fmt: skip
            run = subprocess.run(command, capture_output=True, text=True, check=True)
            print(f"{start} start:")
            print(run.stderr.rstrip())
            reports.append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(f"    {reports[-1]}")
        first, second = reports
        print(
            f"{args.variant} {args.quantize}: load {first['load_s']:.1f} s ({first['quantize_cache']}) -> "
            f"{second['load_s']:.1f} s ({second['quantize_cache']}), {first['load_s'] / second['load_s']:.1f}x faster; "
            f"peak RSS {first['peak_rss_gib']:.2f} -> {second['peak_rss_gib']:.2f} GiB"
        )
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
