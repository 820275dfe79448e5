#!/usr/bin/env python3
"""Logit drift of int8 and int4 against bf16 on a released variant's real dimensions (random weights).

Builds the bf16 model, takes its greedy answer to a text prompt, then builds each quantized model
from the same random weights (the same seed, drawn in bf16 and quantized matrix by matrix) and runs
the same tokens through it (teacher forced): max and mean |logit difference| at every step, and how
often the quantized model's top-1 token is bf16's. One model in memory at a time.

Random weights give noise for text, so this measures how far quantization moves the logits of a
model of this shape, not answer quality (which needs the real weights).

Usage: python scripts/quantize_drift.py [--variant tiny] [--steps 32]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quantize import cpu_name  # noqa: E402
from benchmark import TEXT_PROMPT, TOKENIZER, config_for, random_model  # noqa: E402

from deepseek_vl2 import DeepseekVL2, Processor  # noqa: E402
from deepseek_vl2.compute.quantized import QuantizeSpec  # noqa: E402


def logits_at_every_position(model: DeepseekVL2, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, V] of a text-only sequence, one forward without cache."""
    with torch.inference_mode():
        language = model.language
        embeds = language.model.embed_tokens(ids)[None]
        hidden = language(embeds, language.context(torch.arange(ids.shape[0])[None]))
        return language.logits(hidden)[0]


def greedy(model: DeepseekVL2, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The prompt followed by `steps` greedy tokens (one full forward per step: short sequences)."""
    ids = prompt
    for _ in range(steps):
        ids = torch.cat([ids, logits_at_every_position(model, ids)[-1].argmax()[None]])
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["tiny", "small", "base"], default="tiny")
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    processor = Processor.from_pretrained(TOKENIZER)
    config = config_for(args.variant, processor)
    prompt = processor([{"role": "user", "content": TEXT_PROMPT}], []).input_ids[0]
    print(f"{args.variant}, random weights, bf16; CPU: {cpu_name()}")
    print(f"{prompt.numel()}-token prompt, {args.steps} greedy steps")

    started = time.perf_counter()
    model = random_model(config, torch.device("cpu"), torch.bfloat16)
    ids = greedy(model, prompt, args.steps)
    steps = slice(prompt.numel() - 1, ids.numel() - 1)  # the positions that chose each new token
    reference = logits_at_every_position(model, ids)[steps]
    del model
    gc.collect()
    top2 = reference.topk(2, dim=-1).values
    print(
        f"bf16 ({time.perf_counter() - started:.0f} s): logits' std {float(reference.std()):.2f}, "
        f"top-1 margin median {float((top2[:, 0] - top2[:, 1]).median()):.2f}"
    )
    print(f"{'mode':10} {'max |dlogit|':>12} {'mean |dlogit|':>13} {'worst step mean':>15} {'top-1':>6}")
    for mode in ("int8", "int4"):
        model = random_model(config, torch.device("cpu"), torch.bfloat16, QuantizeSpec(mode))
        logits = logits_at_every_position(model, ids)[steps]
        del model
        gc.collect()
        diff = (logits - reference).abs()
        same = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
        print(
            f"{QuantizeSpec(mode).name:10} {float(diff.max()):12.3f} {float(diff.mean()):13.4f} "
            f"{float(diff.mean(-1).max()):15.4f} {float(same):6.1%}"
        )


if __name__ == "__main__":
    main()
