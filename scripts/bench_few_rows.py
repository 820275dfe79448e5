#!/usr/bin/env python3
"""Routes for a few rows' product with bf16 weights (batched decode), on one decode step's weights.

The step: every linear weight one decode step reads when its rows route to the same experts (the
benchmark's identical requests do): attention projections, the dense MLP, shared experts, the six
routed experts of each MoE layer and the output head, with a variant's real shapes (random values;
tiny: 573M parameters, 1.07 GiB in bf16, far more than any cache). Each route multiplies every
weight of the step by the same rows, weight after weight, as the model does.

Reading the weights once for all rows is the goal, so every route's time is compared with one row's
plain product (`x @ W^T`, a bf16 matrix-vector pass per weight): the step's read-once time. Routes:

- plain: `x @ W^T` in bf16 (what torch does: on a CPU without bf16 units, one pass per row);
- transposed: `W @ x^T` in bf16;
- upcast blocks of N: the weight converted to fp32 N values at a time into a reused buffer, each
  block multiplied by all rows while in cache (`few=upcast`, compute/execution.py);
- upcast whole: the whole weight converted into a reused buffer, then one fp32 product;
- compiled: with --compiled, torch.compile of one `sum(W * x[row], -1)` per row, which inductor
  fuses into one loop that converts each weight vector once in registers for all rows (needs a C++
  compiler, else the route is reported unavailable; the first call of each shape and row count
  compiles, untimed; seconds each).

Usage: python scripts/bench_few_rows.py [--variant tiny] [--rows 1,2,4,8] [--repeats 3] [--compiled]
Best of --repeats, milliseconds. Run it alone: two benchmarks at once spoil each other.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepseek_vl2.compute.execution import FEW_UPCAST_BLOCK_VALUES, scratch, upcast_blocks  # noqa: E402
from deepseek_vl2.engine.execution_memory import cpu_name  # noqa: E402
from deepseek_vl2.model.config import DeepseekVL2Config  # noqa: E402

MANIFESTS = ROOT / "tests" / "fixtures" / "manifests"


def step_shapes(config: DeepseekVL2Config) -> list[tuple[int, int]]:
    """(out, in) of each linear weight one decode step reads for rows that route alike."""
    c = config.language
    d = c.hidden_size
    if c.use_mla:
        q = c.num_attention_heads * c.qk_head_dim
        attention = [(q, d), (c.kv_lora_rank + c.qk_rope_head_dim, d), (d, c.num_attention_heads * c.v_head_dim)]
    else:
        attention = [(d + 2 * c.num_key_value_heads * c.head_dim, d), (d, d)]
    shapes: list[tuple[int, int]] = []
    for layer in range(c.num_hidden_layers):
        shapes += attention
        if c.is_moe_layer(layer):
            widths = [c.shared_expert_width or 0] + [c.moe_intermediate_size] * c.num_experts_per_tok
        else:
            widths = [c.intermediate_size]
        shapes += [shape for width in widths if width for shape in ((2 * width, d), (d, width))]
    return shapes + [(c.vocab_size, d)]


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def upcast_whole(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    converted = scratch(weight.numel(), torch.float32, x.device).view(weight.shape).copy_(weight)
    return F.linear(x.float(), converted).to(x.dtype)


def compiled_route() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One reduction per row over the same converted weight: inductor fuses them into one loop
    that loads and converts each weight vector once and multiplies it by every row (its C++ shows
    it); the rows arrive in fp32. A graph per weight shape and row count."""

    def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        converted = weight.float()
        return torch.stack([(converted * x[row]).sum(-1) for row in range(x.shape[0])], -1)

    compiled = torch.compile(product, dynamic=False)
    return lambda x, weight: compiled(x.float(), weight).T.to(x.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["tiny", "small", "base"], default="tiny")
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compiled", action="store_true", help="also time a torch.compile'd route")
    args = parser.parse_args()
    config = DeepseekVL2Config.from_dict(json.loads((MANIFESTS / f"{args.variant}.json").read_text())["config"])
    torch.manual_seed(0)
    weights = [torch.randn(shape).bfloat16() for shape in step_shapes(config)]
    params = sum(w.numel() for w in weights)
    print(
        f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}); {args.variant}'s decode step: {len(weights)} weights, "
        f"{params / 1e6:.0f}M parameters, {params * 2 / 2**30:.2f} GiB in bf16"
    )
    routes: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "plain": lambda x, w: F.linear(x, w),
        "transposed": lambda x, w: torch.mm(w, x.T).T,
    }
    for values in sorted({FEW_UPCAST_BLOCK_VALUES // 4, FEW_UPCAST_BLOCK_VALUES, FEW_UPCAST_BLOCK_VALUES * 4}):
        name = f"upcast blocks of {values * 4 / 2**20:g} MiB" + (" (used)" if values == FEW_UPCAST_BLOCK_VALUES else "")
        routes[name] = functools.partial(upcast_blocks, block_values=values)
    routes["upcast whole"] = upcast_whole
    if args.compiled:
        torch._dynamo.config.cache_size_limit = 1024  # a graph per weight shape and row count
        routes["compiled"] = compiled_route()
    rows_list = [int(r) for r in args.rows.split(",")]
    with torch.inference_mode():
        xs = {rows: torch.randn(rows, max(w.shape[1] for w in weights)).bfloat16() for rows in {1, *rows_list}}

        def step(route: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], rows: int) -> Callable[[], None]:
            return lambda: [route(xs[rows][:, : w.shape[1]], w) for w in weights]

        read_once = best_ms(step(routes["plain"], 1), args.repeats)
        print(f"read-once time (1 row, plain): {read_once:.1f} ms = {params * 2 / read_once / 1e6:.1f} GB/s")
        print("  route" + " " * 30 + "".join(f"{f'{rows} rows':>22}" for rows in rows_list))
        for name, route in routes.items():
            cells = []
            try:
                for rows in rows_list:
                    ms = best_ms(step(route, rows), args.repeats)
                    cells.append(f"{ms:8.1f} ms ({ms / read_once:4.2f}x)")
            except Exception as error:  # the compiled route without a C++ compiler, for one
                print(f"  {name:<34}  unavailable here: {type(error).__name__}: {str(error).splitlines()[0]}")
                continue
            print(f"  {name:<34}" + "".join(f"{cell:>22}" for cell in cells), flush=True)
    print("(x: the step's time against the read-once time; 1.00x reads each weight once at full speed)")


if __name__ == "__main__":
    main()
