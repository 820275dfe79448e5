#!/usr/bin/env python3
"""Benchmark the engine on a random-weight model with a released variant's real dimensions.

Prompts: the seed request (tests/fixtures/images/vqa_1.jpg, 5014x2004, tiled 4x2, "Describe each
stage of this image in detail") or, with --text-only, a short text question. Each concurrency level
sends that many identical requests at once (with --distinct and --text-only, each its own prompt)
and reports time to first token, inter-token latency and the aggregate decode rate; the first level
also gets a per-stage breakdown and a comparison of decode with its memory-bandwidth floor (bytes
one decode step reads, divided by the bandwidth measured in the same run, and that floor's fraction
of the decode time). The weights are random, so the text is noise; EOS is ignored so that every
request decodes the full length.

When the first level is 1, every other level's aggregate decode is compared with the expert-union
bound: the rate at which its steps would go if each read every weight once, as one row's step does
(the first level's rate, times the rows, times one row's step bytes over the batch's). Two unions of
routed experts: `uniform`, what rows routed independently would read (64 (1 - (58/64)^rows) for
tiny; README "Concurrent requests"), and `observed`, the distinct experts the routers actually chose
in the level's full-batch steps (identical requests, admitted one after another, are at different
tokens of the same answer in any one step, so they too route differently); `observed` is counted
for an eager decode only, not a compiled one.

With --repeat-image: two different questions about the seed image, one after the other; the
second reuses the first's image prefix from the prefix cache.

With --image-detail low: every image seen as one 384x384 view plus one 1x1 tile (421 tokens), as
the official processor does with more than two images; auto (the default) tiles the seed image 4x2.

With --quantize int8|int4: the language model's linear weights quantized (deepseek_vl2/compute/quantized.py),
built directly in quantized form one tensor at a time, so a variant too large for memory in bf16
still runs; one mode per run, to be compared with a run of another mode. The quantized weights
are kept in the quantized cache (--quantized-cache DIR, or DEEPSEEK_VL2_QUANTIZED_CACHE, default
~/.cache/deepseek_vl2/quantized; '' for none): a second run with the same variant, mode and dtype
reads them instead of quantizing. The JSON gains "load_s" (seconds until the weights were ready)
and "quantize_cache" ("hit", "miss" or "off").

Usage: python scripts/benchmark.py [--variant tiny|small|base] [--device cpu|cuda]
       [--dtype float32|bfloat16] [--concurrency 1,2,4,8] [--text-only] [--new-tokens 64]
       [--json PATH] [--repeat-image] [--execution auto|upcast|native|many=...,few=...,attention=...]
       [--quantize none|int8|int4] [--quantized-cache DIR] [--image-detail auto|low] [--distinct]

--execution says how the CPU runs its products (deepseek_vl2/execution.py): `auto` (the default)
calibrates on this machine, any other value forces that choice. The JSON report gains "execution"
(the resolved choice and the timings behind it), "stages" (vision, prefill and time to first
token of the first level's first request), "decode_floor" (the read and matrix-vector floors as
fractions of that request's decode time) and, per level, the union bounds and their fractions.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepseek_vl2 import DeepseekVL2, DeepseekVL2Config, Engine, GenerationResult, Processor  # noqa: E402
from deepseek_vl2.compute.quantized import MODES, QuantizeSpec  # noqa: E402
from deepseek_vl2.engine.calibration import choose_execution  # noqa: E402
from deepseek_vl2.engine.runner import cache_bytes_per_row  # noqa: E402
from deepseek_vl2.engine.settings import DTYPES, default_device, default_dtype, default_quantized_cache  # noqa: E402
from deepseek_vl2.inputs.tiling import IMAGE_DETAILS  # noqa: E402
from deepseek_vl2.model.moe import Gate  # noqa: E402
from deepseek_vl2.model.quantized_cache import fill_with_cache  # noqa: E402
from deepseek_vl2.model.quantized_modules import quantize_model, quantized_bytes  # noqa: E402
from deepseek_vl2.model.random_weights import random_weights_identity, randomize_  # noqa: E402

MANIFESTS = ROOT / "tests" / "fixtures" / "manifests"
TOKENIZER = ROOT / "deepseek_vl2" / "assets" / "tokenizer"
SEED_IMAGE = ROOT / "tests" / "fixtures" / "images" / "vqa_1.jpg"
SEED_PROMPT = "Describe each stage of this image in detail"
TEXT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
FOLLOW_UP_PROMPT = "Which stage comes last, and what happens in it?"

T = TypeVar("T")


def config_for(variant: str, processor: Processor) -> DeepseekVL2Config:
    config = DeepseekVL2Config.from_dict(json.loads((MANIFESTS / f"{variant}.json").read_text())["config"])
    if processor.tokenizer.image_id >= config.language.vocab_size:
        # small's own tokenizer (102400 ids) is not bundled: widen its vocabulary to the bundled one.
        language = dataclasses.replace(config.language, vocab_size=129280)
        config = dataclasses.replace(config, language=language)
        print("  (vocabulary widened to 129280 rows to fit the bundled tokenizer)")
    return config


def random_model(
    config: DeepseekVL2Config, device: torch.device, dtype: torch.dtype, quantize: QuantizeSpec | None = None,
    quantized_cache: Path | None = None,
) -> DeepseekVL2:  # fmt: skip
    """Random weights built directly on the device: no checkpoint on disk. Quantized weights are
    drawn one matrix at a time and stored quantized, or read from `quantized_cache` (a folder) when
    an earlier run left them there (`model.quantized_cache` says which: hit, miss or off)."""
    with torch.device("meta"):
        model = DeepseekVL2(config)
    quantize_model(model, quantize or QuantizeSpec())
    model.materialize(device, dtype)
    weights_id = random_weights_identity(config, 0, device)
    model.quantized_cache = fill_with_cache(
        model, weights_id, quantized_cache, lambda skip: randomize_(model, config, seed=0, skip_quantized=skip)
    )
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def on_own_thread(job: Callable[[], T]) -> T:
    """`job()` on a new thread, which exits when it is done."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(job).result()


def bytes_per_weight(quantize: QuantizeSpec, dtype: torch.dtype, in_features: int) -> float:
    """Bytes a linear weight of `in_features` inputs takes per value, scales included."""
    element = torch.finfo(dtype).bits // 8
    if quantize.mode == "int8":
        return 1 + element / in_features
    if quantize.mode == "int4":
        return 0.5 + 2 * element / quantize.group_size
    return element


def decode_bytes_per_token(
    config: DeepseekVL2Config, dtype: torch.dtype, context: int, quantize: QuantizeSpec | None = None,
    rows: int = 1, routed_experts: float | None = None,
) -> int:  # fmt: skip
    """Bytes one decode step of `rows` rows reads: all attention and dense weights, the router, the
    shared experts and `routed_experts` distinct routed experts a MoE layer (default: one row's
    top-k), the output head, each once; plus each row's KV cache up to `context`. With
    quantization, the linear weights at their quantized size (MLA's kv_b stays in `dtype`)."""
    c = config.language
    routed = c.num_experts_per_tok if routed_experts is None else routed_experts
    element = torch.finfo(dtype).bits // 8
    per_weight = bytes_per_weight(quantize or QuantizeSpec(), dtype, c.hidden_size)
    d = c.hidden_size
    if c.use_mla:
        q = d * c.num_attention_heads * c.qk_head_dim
        attention = q + d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * c.num_attention_heads * (
            c.qk_nope_head_dim + c.v_head_dim
        ) + c.num_attention_heads * c.v_head_dim * d
    else:
        kv = c.num_key_value_heads * c.head_dim
        attention = d * (d + 2 * kv) + d * d
    kept = c.kv_lora_rank * c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim) if c.use_mla else 0
    params = router = 0
    for i in range(c.num_hidden_layers):
        params += attention - kept
        if c.is_moe_layer(i):
            params += 3 * d * c.moe_intermediate_size * routed
            params += 3 * d * (c.shared_expert_width or 0)
            router += c.n_routed_experts * d * 4  # fp32
        else:
            params += 3 * d * c.intermediate_size
    params += c.vocab_size * d  # lm_head
    kept_bytes = kept * c.num_hidden_layers * element
    return int(params * per_weight + kept_bytes + router + rows * c.cache_values_per_token * context * element)


def expected_union(config: DeepseekVL2Config, rows: int) -> float:
    """Distinct routed experts a MoE layer reads for `rows` tokens routed independently and
    uniformly: E (1 - (1 - k/E)^rows); tiny, 4 rows: about 21 of 64."""
    c = config.language
    if not c.n_routed_experts:
        return 0.0
    return c.n_routed_experts * (1 - (1 - c.num_experts_per_tok / c.n_routed_experts) ** rows)


def union_bound(
    config: DeepseekVL2Config, dtype: torch.dtype, context: int, quantize: QuantizeSpec | None,
    single_rate: float, rows: int, routed_experts: float,
) -> float:  # fmt: skip
    """The aggregate decode rate of `rows` rows that read each weight of the step once: one row's
    measured rate scaled by rows, and by the step's bytes against one row's (the expert union)."""
    one = decode_bytes_per_token(config, dtype, context, quantize)
    many = decode_bytes_per_token(config, dtype, context, quantize, rows, routed_experts)
    return single_rate * rows * one / many


class RoutingCounter:
    """Counts the distinct routed experts each MoE layer chose in decode steps of a given batch
    (hooks on the routers): the union the step actually read. The hooks only keep the chosen
    indices, so the timed steps wait for no device; they are counted when asked. For an eager
    decode only: a compiled step would trace the hooks."""

    def __init__(self, model: DeepseekVL2) -> None:
        self.rows = 0
        self.chosen: list[torch.Tensor] = []
        gates = [m for m in model.modules() if isinstance(m, Gate)]
        self.handles = [gate.register_forward_hook(self._seen) for gate in gates]

    def _seen(self, _gate, inputs, output) -> None:
        if inputs[0].shape[0] == self.rows:
            self.chosen.append(output[1])

    def start(self, rows: int) -> None:
        self.rows, self.chosen = rows, []

    def counts(self) -> list[int]:
        """Distinct experts of each counted router call, in order."""
        return [int(indices.unique().numel()) for indices in self.chosen]

    def mean(self) -> float | None:
        counts = self.counts()
        return sum(counts) / len(counts) if counts else None

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def request(
    text_only: bool, question: str = SEED_PROMPT, index: int | None = None
) -> tuple[list[dict[str, str]], list[Image.Image]]:
    """The benchmark's prompt; with `index`, text-only prompts differ per request (their tokens,
    and so their experts, differ too)."""
    if text_only:
        text = TEXT_PROMPT if index is None else f"{TEXT_PROMPT} Make it story number {index + 1}."
        return [{"role": "user", "content": text}], []
    return [{"role": "user", "content": f"<image>\n{question}"}], [Image.open(SEED_IMAGE).convert("RGB")]


def run_level(
    engine: Engine, concurrency: int, text_only: bool, new_tokens: int, image_detail: str = "auto",
    distinct: bool = False,
) -> tuple[dict[str, Any], list[GenerationResult]]:  # fmt: skip
    """`concurrency` requests at once, identical or (`distinct`, text-only) each its own prompt;
    the JSON level record and the results."""

    def generate(index: int) -> GenerationResult:
        messages, images = request(text_only, index=index if distinct else None)
        return engine.generate(messages, images, max_new_tokens=new_tokens, temperature=0, image_detail=image_detail)

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(generate, range(concurrency)))
    first = [r.timings.started + r.timings.first_token_s for r in results]
    last = [r.timings.started + r.timings.token_times[-1] for r in results]
    decode_tokens = sum(r.timings.decode_tokens for r in results)
    gaps = [b - a for r in results for a, b in zip(r.timings.token_times, r.timings.token_times[1:])]
    ttfts = [r.timings.first_token_s for r in results]
    level = {
        "concurrency": concurrency,
        "aggregate_decode_tokens_per_s": decode_tokens / (max(last) - min(first)),
        "ttft_s_p50": percentile(ttfts, 50),
        "ttft_s_p95": percentile(ttfts, 95),
        "inter_token_s_p50": percentile(gaps, 50),
        "inter_token_s_p95": percentile(gaps, 95),
    }
    return level, results


def mean_context(result: GenerationResult) -> int:
    """The KV cache a decode step reads on average: the prompt plus half the answer."""
    return result.prompt_tokens + len(result.token_ids) // 2


def print_stages(
    result: GenerationResult, config: DeepseekVL2Config, dtype: torch.dtype, bandwidth: tuple[float, float],
    quantize: QuantizeSpec | None = None,
) -> dict[str, float]:  # fmt: skip
    """Prints the request's stages and its decode against the read floors; returns the floors'
    fractions (floor time / decode time: 1.0 would be decode at the measured bandwidth)."""
    t = result.timings
    print(f"single request: {result.prompt_tokens} prompt tokens, {len(result.token_ids)} new tokens")
    print(f"  preprocessing       {t.preprocess_s * 1000:9.1f} ms")
    print(f"  vision + projector  {t.vision_s * 1000:9.1f} ms")
    print(f"  prefill             {t.prefill_s * 1000:9.1f} ms  ({result.prompt_tokens / t.prefill_s:,.0f} tokens/s)")
    print(f"  time to first token {t.first_token_s * 1000:9.1f} ms")
    actual = t.decode_s / max(t.decode_tokens, 1)
    print(f"  decode              {t.decode_tokens_per_s:9.2f} tokens/s ({actual * 1000:.1f} ms/token)")
    per_token = decode_bytes_per_token(config, dtype, mean_context(result), quantize)
    mode = (quantize or QuantizeSpec()).name
    print(f"  bytes per token     {per_token / 2**30:9.2f} GiB (weights read, {mode}, + KV cache)")
    fractions = {}
    for label, bytes_per_s in zip(("read", "gemv"), bandwidth):
        floor = per_token / bytes_per_s
        fractions[f"{label}_floor_fraction"] = floor / actual
        print(
            f"  {label} floor          {floor * 1000:9.1f} ms/token at {bytes_per_s / 2**30:.1f} GiB/s "
            f"measured -> decode is {actual / floor:.2f}x this floor ({floor / actual:.0%} of its rate)"
        )
    return fractions


def print_union_bounds(
    records: list[dict[str, Any]], config: DeepseekVL2Config, dtype: torch.dtype, quantize: QuantizeSpec,
    context: int,
) -> None:  # fmt: skip
    """Each level's aggregate decode against the rate of reading each weight of a step once, from
    the first (1-request) level's rate: with the union of experts that independently routed rows
    would read (`expected_union`), and with the union the routers actually chose. Adds both to the
    records."""
    base = records[0]
    if base["concurrency"] != 1 or len(records) < 2 or not config.language.n_routed_experts:
        return
    print("  aggregate decode against reading each weight once per step (the expert-union bound):")
    for level in records[1:]:
        rows, rate = level["concurrency"], level["aggregate_decode_tokens_per_s"]
        unions = {"uniform": expected_union(config, rows), "observed": level.get("observed_routed_experts")}
        for name, experts in unions.items():
            if experts is None:
                continue
            bound = union_bound(config, dtype, context, quantize, base["aggregate_decode_tokens_per_s"], rows, experts)
            level[f"{name}_union_bound_tokens_per_s"] = bound
            level[f"{name}_union_bound_fraction"] = rate / bound
            print(
                f"    concurrency {rows}, {name:>8} union ({experts:4.1f} routed experts a layer): bound "
                f"{bound:6.2f} tokens/s, measured {rate:6.2f} = {rate / bound:.0%} of it"
            )


def repeat_image(engine: Engine, new_tokens: int, image_detail: str = "auto") -> None:
    """Two different questions about the seed image in a row."""
    results = []
    for question in (SEED_PROMPT, FOLLOW_UP_PROMPT):
        messages, images = request(False, question)
        results.append(
            engine.generate(messages, images, max_new_tokens=new_tokens, temperature=0, image_detail=image_detail)
        )
    first, second = results
    ratio = second.timings.first_token_s / first.timings.first_token_s
    print("repeat image: two questions about the seed image, one after the other")
    for label, r in (("first ", first), ("second", second)):
        print(
            f"  {label} question: time to first token {r.timings.first_token_s:8.3f} s "
            f"(vision {r.timings.vision_s:.3f} s, prefill {r.timings.prefill_s:.3f} s), "
            f"{r.cached_prompt_tokens} of {r.prompt_tokens} prompt tokens from the prefix cache"
        )
    print(f"  second / first time to first token: {ratio:.3%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["tiny", "small", "base"], default="tiny")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: $DEEPSEEK_VL2_DTYPE, else bfloat16")
    parser.add_argument("--concurrency", default="1", help="comma-separated levels, e.g. 1,2,4,8")
    parser.add_argument("--text-only", action="store_true", help="a short text prompt, no image")
    parser.add_argument("--repeat-image", action="store_true", help="two questions about one image in a row")
    parser.add_argument("--prefill-chunk", type=int, default=None)
    parser.add_argument("--compile", choices=["on", "off"], default=None, help="compiled decode (default: on for CUDA)")
    parser.add_argument("--json", type=Path, default=None, help="write the levels as JSON here")
    parser.add_argument("--execution", default="auto", help="auto (calibrate), upcast, native, or many=...,few=...,attention=...")
    parser.add_argument("--quantize", choices=MODES, default="none", help="the language model's linear weights (default none)")
    parser.add_argument(
        "--distinct", action="store_true",
        help="with --text-only: each concurrent request its own prompt, so rows route to different experts",
    )  # fmt: skip
    parser.add_argument("--image-detail", choices=IMAGE_DETAILS, default="auto", help="auto (4x2 tiles for the seed image) or low (one tile)")
    parser.add_argument(
        "--quantized-cache", default=None, metavar="DIR",
        help="folder of quantized weights kept between runs ('' for none; default: $DEEPSEEK_VL2_QUANTIZED_CACHE, "
        "else ~/.cache/deepseek_vl2/quantized)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.quantized_cache is None:
        quantized_cache = default_quantized_cache()
    else:
        quantized_cache = Path(args.quantized_cache).expanduser() if args.quantized_cache.strip() else None
    logging.basicConfig(level=logging.WARNING)

    device = torch.device(args.device) if args.device else default_device()
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype()
    levels = sorted({int(level) for level in args.concurrency.split(",")})
    processor = Processor.from_pretrained(TOKENIZER)
    config = config_for(args.variant, processor)
    dtype_name = str(dtype).removeprefix("torch.")
    quantize = QuantizeSpec(args.quantize)
    print(f"variant {args.variant}: random weights on {device} in {dtype_name}, quantization {quantize.name}")

    # Measured first, on a thread of its own that then exits: a thread that runs torch's parallel
    # kernels keeps its OpenMP workers, and a second set would slow the engine's (engine_thread.py).
    bandwidth = on_own_thread(lambda: measure_bandwidth(device, dtype))
    built: dict[str, Any] = {}

    def build() -> DeepseekVL2:  # on the engine's thread, like Engine.from_pretrained
        started = time.perf_counter()
        model = random_model(config, device, dtype, quantize, quantized_cache)
        built["seconds"] = time.perf_counter() - started
        built["decision"] = choose_execution(model, args.execution, rows=max(levels))
        return model

    compile_decode = None if args.compile is None else args.compile == "on"
    # The levels send identical requests: without --repeat-image the prefix cache is off, or every
    # level after the first would measure cache hits.
    engine = Engine(
        build, processor, max_batch=max(levels), prefill_chunk_size=args.prefill_chunk,
        compile_decode=compile_decode, prefix_cache_bytes=None if args.repeat_image else 0,
    )  # fmt: skip
    model, decision = engine.model, built["decision"]
    print(f"  weights ready in {built['seconds']:.1f} s (quantized cache: {model.quantized_cache})")
    if quantize.mode != "none":
        before, after = quantized_bytes(model)
        print(f"  quantized linear weights: {before / 2**30:.2f} GiB -> {after / 2**30:.2f} GiB")
    print(f"  execution ({decision.source}): {decision.summary()}")
    engine.scheduler.eos_id = -1  # random weights: never stop early, so every request decodes in full
    print(
        f"  KV cache: {max(levels)} rows, {cache_bytes_per_row(model) / 2**30:.3f} GiB per row "
        f"(4096 tokens); decode {'compiled' if engine.runner.decode_compiled else 'eager'}"
    )

    # Warm-up: first calls pay for kernel selection and thread pools.
    warm_messages, warm_images = request(args.text_only)
    engine.generate(warm_messages, [image.resize((384, 384)) for image in warm_images], max_new_tokens=4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    if args.repeat_image:
        repeat_image(engine, args.new_tokens, args.image_detail)
        engine.close()
        return

    prompt = "text-only" if args.text_only else "seed-image"
    records = []
    print(f"{prompt} prompt, image detail {args.image_detail}, {args.new_tokens} new tokens per request")
    print("  concurrency | aggregate decode tok/s | TTFT p50 / p95 (s) | inter-token p50 / p95 (ms)")
    routing = None if engine.runner.decode_compiled else RoutingCounter(model)
    for concurrency in levels:
        if routing is not None:
            routing.start(concurrency)
        level, results = run_level(
            engine, concurrency, args.text_only, args.new_tokens, args.image_detail, args.distinct and args.text_only
        )
        level["observed_routed_experts"] = routing.mean() if routing is not None else None
        records.append(level)
        print(
            f"  {concurrency:11d} | {level['aggregate_decode_tokens_per_s']:22.2f} | "
            f"{level['ttft_s_p50']:8.2f} / {level['ttft_s_p95']:7.2f} | "
            f"{level['inter_token_s_p50'] * 1000:10.1f} / {level['inter_token_s_p95'] * 1000:8.1f}"
        )
        if concurrency == levels[0]:
            single = results[0]
    base = records[0]
    for level in records[1:]:
        print(
            f"  concurrency {level['concurrency']} vs {base['concurrency']}: aggregate decode "
            f"{level['aggregate_decode_tokens_per_s'] / base['aggregate_decode_tokens_per_s']:.2f}x, "
            f"inter-token p50 {level['inter_token_s_p50'] / base['inter_token_s_p50']:.2f}x"
        )
    if routing is not None:
        routing.close()
    print_union_bounds(records, config, dtype, quantize, mean_context(single))
    floors = print_stages(single, config, dtype, bandwidth, quantize)
    peak_cuda = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    print(f"  peak RSS            {peak_rss_gib():9.2f} GiB")
    if peak_cuda is not None:
        print(f"  peak GPU memory     {peak_cuda:9.2f} GiB")
    engine.close()
    if args.json:
        report = {
            "variant": args.variant,
            "device": str(device),
            "dtype": dtype_name,
            "quantize": quantize.mode,
            "prompt": prompt,
            "image_detail": args.image_detail,
            "peak_rss_gib": peak_rss_gib(),
            "load_s": built["seconds"],
            "quantize_cache": model.quantized_cache,
            "peak_cuda_gib": peak_cuda,
            "levels": records,
            "execution": decision.as_json() | {"spec": decision.spec},
            "distinct_prompts": args.distinct and args.text_only,
            "decode_floor": floors,
            "stages": {
                "vision_s": single.timings.vision_s,
                "prefill_s": single.timings.prefill_s,
                "ttft_s": single.timings.first_token_s,
            },
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
