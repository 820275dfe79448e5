"""Calibration: the CPU's execution choices (execution.py) measured on the machine that runs them.

Each choice is timed on products of the model's own shapes, with the same `Execution.linear` /
`attention` code the model runs, in a budget of about 3 s. The baseline option stays unless another
is faster by a clear margin (MARGIN), so that timing noise cannot flip a choice back and forth
between restarts; and the decision is remembered (DEEPSEEK_VL2_EXECUTION_CACHE) per CPU model and
feature flags, the kernel level torch runs (ATEN_CPU_CAPABILITY), torch version, thread count, dtype,
quantization, product and attention shapes, batch and calibration scheme (machine_key), so that a
restarted server makes the same choice without measuring again, and a seeded answer does not change
with the machine's mood. It measures at the batch the engine will run (settings.planned_max_batch).
A memory that cannot be read or written costs one warning and a fresh measurement, never the setup;
servers starting together each add their record to the file without losing the other's.

A quantized model also gets the row count from which its quantized products dequantize the weight
and run the chosen dense product instead of the weight's own kernel (which streams the quantized
bytes but does more work per row): the first of DEQUANTIZE_ROWS_MEASURED at which that is no slower.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..compute.execution import (
    CHOICES, EXECUTION_ENV, MANY_ROWS, Execution, baseline_choices, describe, parse_choices,
)  # fmt: skip
from .settings import planned_max_batch

if TYPE_CHECKING:
    from ..compute.quantized import QuantizedWeight
    from ..model.model import DeepseekVL2

log = logging.getLogger(__name__)

CACHE_ENV = "DEEPSEEK_VL2_EXECUTION_CACHE"
DEFAULT_CACHE_UNDER_HOME = Path(".cache") / "deepseek_vl2" / "execution.json"
# The calibration scheme: what is measured, on which shapes, and how it is decided. Bump it whenever
# any of that changes (the measured products or attention, their shapes or rows, MARGIN, the
# options, the record's fields, what machine_key holds), so that records of an older scheme are
# measured again instead of trusted. 2: kernel level, attention shapes and the engine's batch in
# the key; the scheme and level in the record.
SCHEME_VERSION = 2
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


@dataclass
class Decision:
    """What was chosen and why, for the setup log and the benchmark's report."""

    choices: dict[str, str]
    source: str  # "calibrated", "remembered", "forced", "gpu" or "fixed" (fp32 weights, no choice)
    timings_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # choice -> option -> ms
    seconds: float = 0.0
    # Quantized models: rows from which a quantized product dequantizes, where measured.
    dequantize_min_rows: int | None = None
    execution: Execution = field(default_factory=Execution)  # the setting these choices make

    def as_json(self) -> dict[str, Any]:
        record = {"choices": self.choices, "source": self.source, "timings_ms": self.timings_ms}
        return record | ({"dequantize_min_rows": self.dequantize_min_rows} if self.dequantize_min_rows else {})

    @property
    def spec(self) -> str:
        """The choices as DEEPSEEK_VL2_EXECUTION would force them."""
        return describe(self.choices) if self.choices else self.source

    def summary(self) -> str:
        parts = []
        for name, option in self.choices.items():
            times = self.timings_ms.get(name)
            measured = ", ".join(f"{o} {ms:.1f} ms" for o, ms in times.items()) if times else ""
            parts.append(f"{name}={option}" + (f" ({measured})" if measured else ""))
        if self.dequantize_min_rows:
            parts.append(f"quantized products dequantize from {self.dequantize_min_rows} rows")
        return "; ".join(parts)


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


def _options(choices: dict[str, str], name: str) -> dict[str, Execution]:
    return {option: Execution.from_choices(choices | {name: option}) for option in CHOICES[name]}


def _measure_products(model: DeepseekVL2, choices: dict[str, str], name: str, few_rows: int | None) -> dict[str, float]:
    products = _products(model, few_rows)
    if not products:  # every such product of this model is quantized: nothing to choose
        return {}

    def runner(execution: Execution) -> Callable[[], None]:
        return lambda: [execution.linear(x, w) for x, w in products]

    return _interleaved_ms({option: runner(e) for option, e in _options(choices, name).items()})


def _measure_attention(model: DeepseekVL2, choices: dict[str, str], rows: int) -> dict[str, float]:
    """A decode step's attention over DECODE_CONTEXT cached tokens for `rows` rows, plus one
    prefill chunk's, through the model's own first attention layer."""
    attention = model.language.model.layers[0].self_attn
    make = _mla_attention if model.config.language.use_mla else _mha_attention
    runs = {option: make(attention, execution, rows, model.dtype) for option, execution in _options(choices, "attention").items()}
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
            if name == "attention" and choices["many"] != "native":
                # bf16 attention is the faster one only where bf16 products are (bf16 units), and
                # beside fp32 products it leaves the official bf16 bounds (parse_choices).
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


# Caps on the instructions of the libraries behind torch's bf16 and fp32 products: like the kernel
# level, they change which kernels run (and how fast) on the same CPU.
LIBRARY_ISA_ENVS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def kernel_level() -> str:
    """The CPU kernel level torch dispatches to (DEFAULT, AVX2, AVX512, ...), with any cap set on
    oneDNN's or MKL's instructions: torch picks kernels per level, and ATEN_CPU_CAPABILITY changes
    it on the same CPU."""
    caps = [f"{name}={os.environ[name]}" for name in LIBRARY_ISA_ENVS if os.environ.get(name)]
    return " ".join([torch.backends.cpu.get_cpu_capability(), *caps])


def attention_shapes(model: DeepseekVL2) -> tuple[object, ...]:
    """The shapes `_measure_attention` runs with, from the attention layer it runs."""
    attention = model.language.model.layers[0].self_attn
    if model.config.language.use_mla:
        return ("mla", attention.heads, attention.nope, attention.rope, attention.rank, attention.v_dim)
    return ("mha", attention.heads, attention.kv_heads, attention.head_dim)


def machine_key(model: DeepseekVL2, rows: int) -> str:
    """What a remembered decision is valid for: the calibration scheme, this CPU (model and
    feature flags) and the kernel level torch runs on it, this torch, its thread count, the model's
    dtype, quantization, product and attention shapes, and the batch (`rows`) it was measured at."""
    cpu = _cpu_description()
    c, v = model.config.language, model.config.vision
    shapes = (c.hidden_size, c.vocab_size, c.moe_intermediate_size, c.intermediate_size, c.use_mla, v.width, v.mlp_hidden)
    parts = [
        f"scheme {SCHEME_VERSION}", cpu, kernel_level(), torch.__version__, str(torch.get_num_threads()),
        str(model.dtype), model.quantization.name, repr(shapes), repr(attention_shapes(model)), str(rows),
    ]  # fmt: skip
    return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()


def _cpu_description() -> str:
    """The processor's model name and feature flags (Linux /proc/cpuinfo), else what Python knows."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    model_name = fields.get("model name") or fields.get("CPU part") or platform.processor() or platform.machine()
    flags = fields.get("flags") or fields.get("Features") or ""
    return f"{model_name} [{hashlib.blake2b(flags.encode(), digest_size=8).hexdigest()}]"


def cpu_name() -> str:
    return _cpu_description().rsplit(" [", 1)[0]


def cache_path(problems: list[str] | None = None) -> Path | None:
    """Where decisions are remembered; None when DEEPSEEK_VL2_EXECUTION_CACHE is set empty, or
    when it is unset and there is no home directory (a problem, told to `problems`). The default
    follows HOME as it is now, not as it was when this module was imported."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return Path(value).expanduser() if value.strip() else None
    try:
        home = Path.home()
        if not home.is_absolute():  # HOME=relative: not a place to write beside the working directory
            raise RuntimeError(f"HOME is {str(home)!r}, not an absolute path")
    except (RuntimeError, KeyError, OSError) as error:  # RuntimeError: no home directory known
        _problem(problems, f"no home directory for the remembered decisions ({error}); set {CACHE_ENV}")
        return None
    return home / DEFAULT_CACHE_UNDER_HOME


def _problem(problems: list[str] | None, message: str) -> None:
    """A reason the memory could not be used: collected for choose_execution's one warning, or
    logged at once for a caller that collects none."""
    if problems is None:
        log.warning("execution calibration: %s", message)
    else:
        problems.append(message)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _malformed(record: object) -> str | None:
    """What is wrong with a stored record's fields, or None when each has the right type."""
    if not isinstance(record, dict):
        return f"a record is {type(record).__name__}, not an object"
    choices = record.get("choices")
    if not (isinstance(choices, dict) and set(choices) == set(CHOICES) and all(choices[n] in CHOICES[n] for n in CHOICES)):
        return f"its choices {choices!r} are not one option of each of {', '.join(CHOICES)}"
    timings = record.get("timings_ms", {})
    if not isinstance(timings, dict) or not all(
        isinstance(t, dict) and all(isinstance(o, str) and _is_number(ms) for o, ms in t.items()) for t in timings.values()
    ):
        return "its timings_ms are not milliseconds per option"
    rows = record.get("dequantize_min_rows")
    if rows is not None and not (_is_count(rows) and rows > 0):
        return f"its dequantize_min_rows {rows!r} is not a positive row count"
    if not isinstance(record.get("level", ""), str):
        return "its level is not a name"
    return None


def remembered(path: Path | None, key: str, problems: list[str] | None = None) -> Decision | None:
    """The decision remembered under `key`, or None: nothing remembered, a record of another
    calibration scheme (measured again, not trusted), or a memory that cannot be used (unreadable,
    not JSON, not the shape this module writes; told to `problems`)."""
    if path is None or not (path.exists() or path.is_symlink()):
        return None
    try:
        if not path.is_file():
            raise IsADirectoryError(f"{path} is not a file")
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
        _problem(problems, f"could not read the remembered decisions in {path} ({error}); measuring again")
        return None
    if not isinstance(records, dict):
        _problem(problems, f"{path} holds a JSON {type(records).__name__}, not decisions by key; measuring again")
        return None
    record = records.get(key)
    if record is None:
        return None
    scheme = record.get("scheme") if isinstance(record, dict) else SCHEME_VERSION
    if not (_is_count(scheme) and scheme == SCHEME_VERSION):
        if scheme is not None and not _is_count(scheme):
            _problem(problems, f"the decision in {path} has scheme {scheme!r}, not a number; measuring again")
        else:  # written before schemes, or by another: not trusted, and not a fault
            log.info("execution calibration: the decision in %s is of scheme %s, not %d; measuring again", path, scheme, SCHEME_VERSION)
        return None
    wrong = _malformed(record)
    if wrong is not None:
        _problem(problems, f"the decision in {path} is malformed ({wrong}); measuring again")
        return None
    return Decision(
        record["choices"], "remembered", record.get("timings_ms", {}), dequantize_min_rows=record.get("dequantize_min_rows")
    )


def _records_on_disk(path: Path) -> dict[str, Any]:
    """The records in `path` now, to keep beside a new one; what cannot be read is dropped (its
    problem was told when it was read for the decision)."""
    try:
        records = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def remember(path: Path | None, key: str, decision: Decision, problems: list[str] | None = None) -> None:
    """Add the decision under `key` to `path`, keeping the other records there. Servers starting
    together lose nothing: each takes an advisory lock (a sidecar file), re-reads the records just
    before replacing the file, and replaces it atomically from its own temporary file."""
    if path is None:
        return
    record = decision.as_json() | {
        "scheme": SCHEME_VERSION, "level": kernel_level(), "cpu": cpu_name(), "torch": torch.__version__,
    }  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            except OSError:  # a file system without locks: the merge below still narrows the race
                pass
            records = _records_on_disk(path)
            records[key] = record
            # Unique per process and thread: two writers never share (or remove) a temporary file.
            temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                temporary.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
                temporary.replace(path)  # atomic: a reader never sees half a file
            finally:
                temporary.unlink(missing_ok=True)
    except OSError as error:
        _problem(problems, f"could not remember the decision in {path} ({error})")


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
