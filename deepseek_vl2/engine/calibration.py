"""Calibration: the CPU's execution choices (execution.py) measured on the machine that runs them.

Each choice is timed on products of the model's own shapes, with the same `Execution.linear` /
`attention` code the model runs, in a budget of about 3 s. The baseline option stays unless another
is faster by a clear margin (MARGIN), so that timing noise cannot flip a choice back and forth
between restarts. The decision is remembered for the machine (execution_memory.py). It measures at
the batch the engine will run (settings.planned_max_batch).

A quantized model also gets the row count from which its quantized products dequantize the weight
and run the chosen dense product instead of the weight's own kernel (which streams the quantized
bytes but does more work per row): the first of DEQUANTIZE_ROWS_MEASURED at which that is no slower.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..compute.execution import (
    CHOICES, EXECUTION_ENV, MANY_ROWS, Execution, baseline_choices, parse_choices, valid_choices,
)  # fmt: skip
from .execution_memory import Decision, cache_path, cpu_name, machine_key, remember, remembered
from .settings import planned_max_batch

if TYPE_CHECKING:
    from ..compute.quantized import QuantizedWeight
    from ..model.model import DeepseekVL2

log = logging.getLogger(__name__)

# Another option replaces the baseline only when it takes at most 1/MARGIN of its time.
MARGIN = 1.25
BUDGET_S = 3.0
# Shapes of the measured products: rows of a compute-bound product (a share of a vision batch or a
# prefill chunk), rows an expert gets in a prefill chunk, and the cached tokens decode attends over.
MANY_ROWS_MEASURED = 256
EXPERT_ROWS_MEASURED = 64
DECODE_CONTEXT = 2048
PREFILL_QUERIES = 256
# Row counts at which quantized products are timed both ways (their kernel, dequantized): up to a
# prefill chunk's 512 rows. Where even 512 rows favour the kernel, it is used up to twice that.
DEQUANTIZE_ROWS_MEASURED = (32, 64, 128, 256, 512)


def _interleaved_ms(runs: dict[str, Callable[[], object]], rounds: int = 3) -> dict[str, float]:
    """Each option's best time in milliseconds, the options taking turns so that a busy moment of
    the machine spoils one round of every option rather than all rounds of one."""
    for run in runs.values():
        run()  # first call: kernel selection, buffer growth
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for option, run in runs.items():
            started = time.perf_counter()
            run()
            best[option] = min(best[option], (time.perf_counter() - started) * 1000)
    return best


def _plain(weight: object, dtype: torch.dtype) -> torch.Tensor | None:
    """The model's own weight when its products take the dense path that is being chosen: a plain
    tensor in the model's dtype (a quantized one runs its own kernel, whatever the choice)."""
    return weight if isinstance(weight, torch.Tensor) and weight.dtype == dtype else None


def _products(model: DeepseekVL2, few_rows: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, weight) pairs over the model's own weights, with no copy: with `few_rows`, a decode
    step's output head, an expert and an attention projection; else a vision batch's MLP product,
    a prefill chunk's attention projection and an expert's share of the chunk."""
    dtype, layer = model.dtype, model.language.model.layers[-1]
    expert = layer.mlp.experts.w_gate_up[0] if hasattr(layer.mlp, "experts") else layer.mlp.gate_up.weight
    projection = layer.self_attn.o_proj.weight
    if few_rows is not None:
        weights = [(few_rows, model.language.lm_head.weight), (few_rows, expert), (few_rows, projection)]
    else:
        fc1 = model.vision.blocks[0].mlp.fc1.weight
        weights = [(MANY_ROWS_MEASURED, fc1), (MANY_ROWS_MEASURED, projection), (EXPERT_ROWS_MEASURED, expert)]
    return [
        (torch.randn(rows, w.shape[1]).to(dtype), w)
        for rows, w in ((rows, _plain(w, dtype)) for rows, w in weights)
        if w is not None
    ]


def _options(choices: dict[str, str], name: str, dtype: torch.dtype) -> dict[str, Execution]:
    """Each option of choice `name` that is valid beside the other `choices` for weights of
    `dtype` (fp32 weights have no few-row upcast), as the execution that makes it."""
    valid = valid_choices(dtype)
    return {
        option: Execution.from_choices(choices | {name: option})
        for option in CHOICES[name]
        if choices | {name: option} in valid
    }


def _measure_products(model: DeepseekVL2, choices: dict[str, str], name: str, few_rows: int | None) -> dict[str, float]:
    products = _products(model, few_rows)
    if not products:  # every such product of this model is quantized: nothing to choose
        return {}

    def runner(execution: Execution) -> Callable[[], None]:
        return lambda: [execution.linear(x, w) for x, w in products]

    return _interleaved_ms({option: runner(e) for option, e in _options(choices, name, model.dtype).items()})


def _measure_attention(model: DeepseekVL2, choices: dict[str, str], rows: int) -> dict[str, float]:
    """A decode step's attention over DECODE_CONTEXT cached tokens for `rows` rows, plus one
    prefill chunk's, through the model's own first attention layer."""
    attention = model.language.model.layers[0].self_attn
    make = _mla_attention if model.config.language.use_mla else _mha_attention
    options = _options(choices, "attention", model.dtype)
    runs = {option: make(attention, execution, rows, model.dtype) for option, execution in options.items()}
    return _interleaved_ms(runs)


def _mha_attention(attention, execution: Execution, rows: int, dtype: torch.dtype) -> Callable[[], None]:
    heads, kv_heads, dim = attention.heads, attention.kv_heads, attention.head_dim
    # Keys and values as the cache holds them, [rows, S, kv_heads, dim], read head-major.
    cache = torch.randn(rows, DECODE_CONTEXT, kv_heads, dim).to(dtype).transpose(1, 2)
    q_decode = torch.randn(rows, heads, 1, dim).to(dtype)
    q_prefill = torch.randn(1, heads, PREFILL_QUERIES, dim).to(dtype)
    mask = torch.ones(rows, 1, 1, DECODE_CONTEXT, dtype=torch.bool)
    prefill_mask = torch.ones(1, 1, PREFILL_QUERIES, DECODE_CONTEXT, dtype=torch.bool).tril(DECODE_CONTEXT - PREFILL_QUERIES)
    gqa = heads != kv_heads
    attend = execution.attention

    def run() -> None:
        attend(q_decode, cache, cache, mask, scale=attention.scale, enable_gqa=gqa)
        attend(q_prefill, cache[:1], cache[:1], prefill_mask, scale=attention.scale, enable_gqa=gqa)

    return run


def _mla_attention(attention, execution: Execution, rows: int, dtype: torch.dtype) -> Callable[[], None]:
    heads, nope, rope, rank = attention.heads, attention.nope, attention.rope, attention.rank
    latent = torch.randn(rows, DECODE_CONTEXT, rank).to(dtype)
    k_pe = torch.randn(rows, DECODE_CONTEXT, rope).to(dtype)
    q_nope, q_pe = torch.randn(rows, heads, 1, nope).to(dtype), torch.randn(rows, heads, 1, rope).to(dtype)
    mask = torch.ones(rows, 1, 1, DECODE_CONTEXT, dtype=torch.bool)

    def run() -> None:
        # The absorbed decode reads its choice from the module: lend it this one for the call.
        saved, attention.execution = attention.execution, execution
        try:
            attention._attend_absorbed(q_nope, q_pe, latent, k_pe, mask)
        finally:
            attention.execution = saved

    return run


def _quantized_weights(model: DeepseekVL2) -> list[QuantizedWeight]:
    """The last layer's quantized routed expert (gate and up) and attention output projection:
    the products a prefill chunk runs most of, by bytes."""
    layer = model.language.model.layers[-1]
    experts = getattr(layer.mlp, "experts", None)
    weights = [getattr(experts, "w_gate_up", None), getattr(layer.self_attn.o_proj, "weight", None)]
    found = [w for w in weights if w is not None and not isinstance(w, torch.Tensor)]
    return [w[0] if w.lead else w for w in found]


def _measure_dequantize(model: DeepseekVL2, choices: dict[str, str]) -> tuple[int, dict[str, float]]:
    """The fewest rows (of DEQUANTIZE_ROWS_MEASURED) at which dequantizing the model's own
    quantized weights and running a dense product is no slower than their kernel, and the times."""
    weights = _quantized_weights(model)
    chosen = Execution.from_choices(choices)
    kernel = dataclasses.replace(chosen, dequantize_min_rows=0)  # 0: always the weight's kernel
    dequantized = dataclasses.replace(chosen, dequantize_min_rows=1)
    timings: dict[str, float] = {}
    for rows in DEQUANTIZE_ROWS_MEASURED:
        products = [(torch.randn(rows, w.in_features).to(model.dtype), w) for w in weights]
        runs = {
            f"{name} {rows}": (lambda e=execution: [e.linear(x, w) for x, w in products])
            for name, execution in (("kernel", kernel), ("dequantized", dequantized))
        }
        measured = _interleaved_ms(runs)
        timings |= measured
        if measured[f"dequantized {rows}"] <= measured[f"kernel {rows}"]:
            return rows, timings
    return 2 * DEQUANTIZE_ROWS_MEASURED[-1], timings


def calibrate(model: DeepseekVL2, rows: int, budget_s: float = BUDGET_S) -> Decision:
    """Time every option of every choice that applies to the model's dtype, and keep each
    baseline unless another option is clearly faster. Choices not reached within `budget_s` keep
    their baseline. `rows`: the batch a decode step will have; attention is measured at it, the
    few-row products at it within their range (2 .. MANY_ROWS - 1)."""
    started = time.perf_counter()
    choices = baseline_choices(model.dtype)
    few_rows = max(2, min(rows, MANY_ROWS - 1))
    batch = max(1, rows)
    measures: dict[str, Callable[[], dict[str, float]]] = {
        "few": lambda: _measure_products(model, choices, "few", few_rows)
    }
    if model.dtype != torch.float32:  # fp32 weights: nothing to upcast, attention is fp32 already
        measures = {
            "many": lambda: _measure_products(model, choices, "many", None),
            **measures,
            "attention": lambda: _measure_attention(model, choices, batch),
        }
    timings: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for name, measure in measures.items():
            if time.perf_counter() - started > budget_s:
                log.warning("execution calibration: out of its %.1f s budget; %s keeps %s", budget_s, name, choices[name])
                continue
            if name == "attention" and choices | {"attention": "native"} not in valid_choices(model.dtype):
                # bf16 attention is the faster one only where bf16 products are (bf16 units); beside
                # fp32 products, or at the DEFAULT kernel level, it leaves the official bf16 bounds
                # (compute/execution.py, valid_choices).
                continue
            measured = measure()
            if not measured:
                continue
            timings[name] = measured
            baseline = timings[name][choices[name]]
            best = min(timings[name], key=timings[name].__getitem__)
            if timings[name][best] * MARGIN <= baseline:
                choices[name] = best
        # After the choices: the dense product it is weighed against is the chosen one.
        dequantize_min_rows = None
        if _quantized_weights(model):
            dequantize_min_rows, timings["dequantize"] = _measure_dequantize(model, choices)
    return Decision(choices, "calibrated", timings, time.perf_counter() - started, dequantize_min_rows)


def choose_execution(model: DeepseekVL2, spec: str | None = None, rows: int | None = None) -> Decision:
    """Choose how the model's products run, and set it on the model: forced by `spec` (default:
    DEEPSEEK_VL2_EXECUTION), or on the CPU with `auto` remembered for this machine, else calibrated
    and remembered. `rows`
    is the batch a decode step will have (default: settings.planned_max_batch, the engine's rule:
    DEEPSEEK_VL2_MAX_BATCH, else COG_MAX_CONCURRENCY, else the CPU default)."""
    spec = os.environ.get(EXECUTION_ENV, "") if spec is None else spec
    forced = parse_choices(spec, model.dtype)  # raises on a bad setting, on every device
    if model.device.type == "cuda":
        if forced is not None:
            log.warning("%s=%s applies to the CPU only; the GPU's execution is fixed", EXECUTION_ENV, spec)
        decision = Decision({}, "gpu", execution=Execution.for_device(model.device, model.dtype))
        model.set_execution(decision.execution)
        return decision
    if forced is not None:
        decision = Decision(forced, "forced")
    else:
        if rows is None:
            rows = planned_max_batch(cuda=False)  # the engine's rule: the rows it will run
        problems: list[str] = []
        path = cache_path(problems)
        key = machine_key(model, rows)
        decision = remembered(path, key, problems)
        if decision is None:
            decision = calibrate(model, rows)
            remember(path, key, decision, problems)
        if problems:  # one warning, whatever went wrong with the memory: the setup goes on
            log.warning("execution calibration: %s", "; ".join(problems))
    decision.execution = Execution.from_choices(decision.choices, decision.dequantize_min_rows)
    model.set_execution(decision.execution)
    log.info(
        "execution on %s (%s): %s%s", cpu_name(), decision.source, decision.summary(),
        f"; measured in {decision.seconds:.1f} s" if decision.source == "calibrated" else "",
    )  # fmt: skip
    return decision
