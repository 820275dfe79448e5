#!/usr/bin/env python3
"""Micro-benchmark of the quantized products (deepseek_vl2/compute/quantized.py) on tiny's real shapes.

For each weight shape and row count: the bf16 product as the model runs it today
(`Execution.for_device`), each quantized weight's kernel, and the dequantize-then-dense path that
`Execution.linear` takes from `dequantize_min_rows` rows on. Also how long one dequantization
takes, and alternative int8 formulations. Best of --repeats, milliseconds; random weights.

Usage: python scripts/bench_quantize.py [--rows 1,4,8,16,32,64] [--repeats 5] [--shapes head,expert,...]
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepseek_vl2.compute.execution import Execution, scratch  # noqa: E402
from deepseek_vl2.compute.int4_layout import cpu_int4_layout  # noqa: E402
from deepseek_vl2.compute.quantized import QuantizeSpec  # noqa: E402

# (out, in) of tiny's language-model products.
SHAPES = {
    "head": (129280, 1280),
    "expert-gate-up": (1792, 1280),
    "expert-down": (1280, 896),
    "qkv": (3840, 1280),
    "dense-gate-up": (13696, 1280),
}


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    dtype = torch.bfloat16
    execution = Execution.for_device(torch.device("cpu"), dtype)
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}); model dtype bf16; {execution}")
    specs = {"int8": QuantizeSpec("int8"), "int4-g128": QuantizeSpec("int4", 128), "int4-g32": QuantizeSpec("int4", 32)}
    with torch.inference_mode():
        for shape_name in args.shapes.split(","):
            n, k = SHAPES[shape_name]
            dense = (torch.randn(n, k) / math.sqrt(k)).to(dtype)
            # What a load pays once per input width to learn the int4 packing (not cached here).
            cpu_int4_layout.cache_clear()
            started = time.perf_counter()
            layout = cpu_int4_layout(k)
            probe_ms = (time.perf_counter() - started) * 1000
            weights = {}
            for name, spec in specs.items():
                weights[name] = spec.empty((), n, k, dtype, torch.device("cpu"))
                weights[name].store((), dense)
            print(f"\n{shape_name} {n}x{k}: bf16 {dense.nbytes / 2**20:.1f} MiB, "
                  + ", ".join(f"{name} {w.nbytes / 2**20:.1f} MiB" for name, w in weights.items()))
            print(f"  int4 layout probe (width {k}): {probe_ms:.1f} ms, {layout}")
            for name, w in weights.items():
                for target in (dtype, torch.float32):
                    buffer = scratch(w.dense_numel, target, torch.device("cpu"))
                    ms = best_ms(lambda: w.dequantize(target, buffer), args.repeats)
                    print(f"  dequantize {name} -> {str(target).removeprefix('torch.')}: {ms:.2f} ms")
            header = ["rows", "bf16 (model)", *[f"{name} kernel" for name in weights],
                      *[f"{name} dequant" for name in weights], "int8 to(bf16)*s"]
            print("  " + " | ".join(f"{h:>15}" for h in header))
            q8 = weights["int8"]
            for rows in rows_list:
                x = torch.randn(rows, k).to(dtype)
                cells = [best_ms(lambda: execution.linear(x, dense), args.repeats)]
                cells += [best_ms(lambda: w.linear(x), args.repeats) for w in weights.values()]
                forced = Execution(**{**execution.__dict__, "dequantize_min_rows": 1})
                cells += [best_ms(lambda: forced.linear(x, w), args.repeats) for w in weights.values()]
                cells.append(best_ms(lambda: F.linear(x, q8.data.to(dtype)) * q8.scale, args.repeats))
                print("  " + " | ".join([f"{rows:>15}"] + [f"{c:>12.2f} ms" for c in cells]))


if __name__ == "__main__":
    main()
