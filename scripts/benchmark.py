#!/usr/bin/env python3
"""Benchmark the seed request on a random-weight model with a released variant's real dimensions.

Request: tests/fixtures/images/vqa_1.jpg (5014x2004, tiled 4x2), "Describe each stage of this
image in detail", 64 new tokens, greedy. Prints per-stage times and compares decode with its
memory-bandwidth floor: the bytes of weights (and KV cache) one decode step must read, divided by
the bandwidth measured on this machine in the same run. The weights are random, so the text is
noise and EOS may come at any time; generation is forced to the full length by ignoring EOS.

Usage: python scripts/benchmark.py [--variant tiny|small|base] [--new-tokens 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import resource
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepseek_vl2 import DeepseekVL2, DeepseekVL2Config, Engine, Processor  # noqa: E402
from deepseek_vl2.engine import default_device_and_dtype  # noqa: E402
from deepseek_vl2.random_weights import randomize_  # noqa: E402

MANIFESTS = ROOT / "tests" / "fixtures" / "manifests"
TOKENIZER = ROOT / "deepseek_vl2" / "assets" / "tokenizer"
SEED_IMAGE = ROOT / "tests" / "fixtures" / "images" / "vqa_1.jpg"
SEED_PROMPT = "Describe each stage of this image in detail"


def _best_time(fn, device: torch.device, repeats: int = 5) -> float:
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(device: torch.device, dtype: torch.dtype, gib: float = 1.0) -> tuple[float, float]:
    """Bytes/s of (a) a streaming read (sum) and (b) a matrix-vector product over a 1 GiB matrix.

    (a) is the memory system's limit; (b) is what decode's matmuls can actually stream on this
    device (on a 2-core CPU it is well below (a)). Both give a floor for decode.
    """
    rows = int(gib * 2**30) // (4096 * (torch.finfo(dtype).bits // 8))
    matrix = torch.ones(rows, 4096, device=device, dtype=dtype)
    vector = torch.ones(1, 4096, device=device, dtype=dtype)
    nbytes = matrix.numel() * matrix.element_size()
    read = nbytes / _best_time(lambda: matrix.sum(), device)
    gemv = nbytes / _best_time(lambda: torch.nn.functional.linear(vector, matrix), device)
    return read, gemv


def decode_bytes_per_token(config: DeepseekVL2Config, dtype: torch.dtype, context: int) -> int:
    """Weights one decode step reads: all attention and dense weights, the router, only the
    selected (and shared) experts, the output head; plus the KV cache up to `context`."""
    c = config.language
    element = torch.finfo(dtype).bits // 8
    d = c.hidden_size
    if c.use_mla:
        q = d * c.num_attention_heads * c.qk_head_dim
        attention = q + d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * c.num_attention_heads * (
            c.qk_nope_head_dim + c.v_head_dim
        ) + c.num_attention_heads * c.v_head_dim * d
        cache_per_token = c.kv_lora_rank + c.qk_rope_head_dim
    else:
        kv = c.num_key_value_heads * c.head_dim
        attention = d * (d + 2 * kv) + d * d
        cache_per_token = 2 * kv
    params = 0
    for i in range(c.num_hidden_layers):
        params += attention
        if c.is_moe_layer(i):
            params += 3 * d * c.moe_intermediate_size * c.num_experts_per_tok
            params += 3 * d * (c.shared_expert_width or 0)
            params += 2 * c.n_routed_experts * d  # router (fp32)
        else:
            params += 3 * d * c.intermediate_size
    params += c.vocab_size * d  # lm_head
    cache = c.num_hidden_layers * cache_per_token * context
    return (params + cache) * element


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["tiny", "small", "base"], default="tiny")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    default_device, default_dtype = default_device_and_dtype()
    device = torch.device(args.device) if args.device else default_device
    dtype = default_dtype if device.type == default_device.type else torch.float32
    config = DeepseekVL2Config.from_dict(json.loads((MANIFESTS / f"{args.variant}.json").read_text())["config"])
    processor = Processor.from_pretrained(TOKENIZER)
    if processor.tokenizer.image_id >= config.language.vocab_size:
        # small's own tokenizer (102400 ids) is not bundled: widen its vocabulary to the bundled one.
        language = dataclasses.replace(config.language, vocab_size=129280)
        config = dataclasses.replace(config, language=language)
        print("  (vocabulary widened to 129280 rows to fit the bundled tokenizer)")
    print(f"variant {args.variant}: building random weights on {device} in {str(dtype).removeprefix('torch.')}")

    started = time.perf_counter()
    with torch.device("meta"):
        model = DeepseekVL2(config)
    model.materialize(device, dtype)
    randomize_(model, config, seed=0)
    model.eval()
    print(f"  weights ready in {time.perf_counter() - started:.1f} s")

    engine = Engine(model, processor, prefill_chunk_size=args.prefill_chunk)
    engine.eos_id = -1  # random weights: never stop early, so every run decodes the same length

    image = Image.open(SEED_IMAGE).convert("RGB")
    messages = [{"role": "user", "content": f"<image>\n{SEED_PROMPT}"}]
    # Warm-up: first calls pay for kernel selection, thread pools and (CUDA) compilation.
    engine.generate(messages, [image.resize((384, 384))], max_new_tokens=4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    result = engine.generate(messages, [image], max_new_tokens=args.new_tokens, temperature=0)
    t = result.timings
    read_bandwidth, gemv_bandwidth = measure_bandwidth(device, dtype)
    mean_context = result.prompt_tokens + len(result.token_ids) // 2
    per_token = decode_bytes_per_token(config, dtype, mean_context)
    actual = t.decode_s / max(t.decode_tokens, 1)

    print(f"request: {image.width}x{image.height} image, {result.prompt_tokens} prompt tokens, {len(result.token_ids)} new tokens")
    print(f"  preprocessing       {t.preprocess_s * 1000:9.1f} ms")
    print(f"  vision + projector  {t.vision_s * 1000:9.1f} ms")
    print(f"  prefill             {t.prefill_s * 1000:9.1f} ms  ({result.prompt_tokens / t.prefill_s:,.0f} tokens/s)")
    print(f"  time to first token {t.first_token_s * 1000:9.1f} ms")
    print(f"  decode              {t.decode_tokens_per_s:9.2f} tokens/s ({actual * 1000:.1f} ms/token)")
    print(f"  bytes per token     {per_token / 2**30:9.2f} GiB (weights read + KV cache)")
    for label, bandwidth in (("read", read_bandwidth), ("gemv", gemv_bandwidth)):
        floor = per_token / bandwidth
        print(
            f"  {label} floor          {floor * 1000:9.1f} ms/token at {bandwidth / 2**30:.1f} GiB/s "
            f"measured -> decode is {actual / floor:.2f}x this floor"
        )
    print(f"  peak RSS            {peak_rss_gib():9.2f} GiB")
    if device.type == "cuda":
        print(f"  peak GPU memory     {torch.cuda.max_memory_allocated(device) / 2**30:9.2f} GiB")


if __name__ == "__main__":
    main()
