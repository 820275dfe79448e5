#!/usr/bin/env python3
"""GPU check (`make gpu-check`): the parity tests on CUDA, then the benchmark on random weights with
the released variants' real dimensions, in one run meant to fit a 10-minute limit on one H100.

Stages, in this order (cheapest and most telling first, so that a run cut short still holds them):

  stage            what                                                         planned time
  parity-eager     pytest on CUDA with eager decode: fp32 tests/model/test_model.py    1-2 min
                   and tests/engine/test_engine.py, then bf16 tests/model/test_bf16.py
  bench-eager      tiny, small, base in bf16, decode eager: seed-image and       about 2 min
                   text-only prompts at concurrency 1 and 8
  parity-compiled  pytest on CUDA with the decode step compiled (batch 1):       2-3 min
                   fp32 tests/engine/test_engine.py, then the bf16 greedy tests
  bench-compiled   as bench-eager with the decode step compiled: one CUDA graph  2-3 min a variant
                   per batch bucket (1, 2, 4, 8), compiled when the engine starts
  parity-quantized pytest on CUDA, eager decode: tests/compute/test_quantized.py (int8 and  1-2 min
                   int4 logit drift and int8 greedy against bf16 on the fixtures)
  bench-quantized  as bench-eager with the language model's linear weights in   about 2 min a mode
                   int8, then int4 (DEEPSEEK_VL2_QUANTIZE; compute/quantized.py)

The planned times are estimates: none of this had run on a GPU when it was written. A step (one
pytest run, one variant's configuration) starts only while enough time is left before --deadline-s
(MIN_LEFT_S); otherwise it is recorded as skipped, and a second call runs it, e.g.
`--only bench-compiled --variants small,base`.

The parity runs are the fixture tests, unchanged, with DEEPSEEK_VL2_TEST_DEVICE=cuda (tests/parity.py
then also turns TF32 off, since the fixtures are IEEE fp32). The benchmark reuses scripts/benchmark.py
(config_for, random_model, run_level, request, decode_bytes_per_token, measure_bandwidth), builds each
model directly on the GPU, closes each engine before the next and frees each model before the next
variant. Decode bandwidth: the bytes a batch-1 decode step reads divided by the HBM bandwidth (the
floor), as a percentage of the measured step time (100% = decode at the bandwidth limit), against the
bandwidth measured here and the card's nominal one.

The JSON report (--json, and a copy in $OUT when that is set) is rewritten after every step; a step
still marked "running" is the one a kill interrupted. Exit status: 0 when every parity run that ran
passed and no benchmark configuration failed (skips are not failures), 1 otherwise, 2 without CUDA.

Usage: python scripts/gpu_check.py [--json PATH] [--only STAGE,...] [--variants tiny,small,base]
       [--new-tokens 32] [--deadline-s 540]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import (  # noqa: E402
    ROOT,
    TOKENIZER,
    config_for,
    decode_bytes_per_token,
    measure_bandwidth,
    random_model,
    request,
    run_level,
)  # fmt: skip

from deepseek_vl2 import DeepseekVL2, DeepseekVL2Config, Engine, Processor  # noqa: E402
from deepseek_vl2.compute.quantized import QuantizeSpec  # noqa: E402
from deepseek_vl2.engine.settings import MAX_BATCH_ENV  # noqa: E402
from deepseek_vl2.model.quantized_modules import quantize_model, quantized_bytes  # noqa: E402

NO_CUDA_MESSAGE = "no CUDA device: gpu-check needs an NVIDIA GPU; the CPU checks are `make test`"
EXIT_NO_CUDA = 2

STAGES = ("parity-eager", "bench-eager", "parity-compiled", "bench-compiled", "parity-quantized", "bench-quantized")
VARIANTS = ("tiny", "small", "base")
PROMPTS = (("seed-image", False), ("text-only", True))  # (name, text_only) as run_level takes it
CONCURRENCY = (1, 8)
MAX_BATCH = 8
BENCH_DTYPE = torch.bfloat16

# Minimum time (s) left before the deadline for a step to start. Estimates of a step's length, not
# measurements: a step that overruns is cut by the caller's limit, and the report shows it running.
MIN_LEFT_S = {"parity": 60.0, "bench-eager": 60.0, "bench-compiled": 150.0, "bench-quantized": 60.0}
# The modes bench-quantized runs, each variant in each (eager decode: compiling the quantized experts'
# sync-free loops is untried).
QUANTIZED_MODES = ("int8", "int4")
PARITY_TIMEOUT_S = 240.0  # one pytest run; a hang must not take the whole budget
OUTPUT_TAIL_CHARS = 20_000  # of each pytest run's output, kept in the report

# Read by tests/parity.py (test_gpu_check checks that the names agree).
TEST_DEVICE_ENV = "DEEPSEEK_VL2_TEST_DEVICE"
TEST_COMPILE_ENV = "DEEPSEEK_VL2_TEST_COMPILE"

# Nominal HBM bandwidth in bytes/s (vendor datasheets), matched in this order against
# torch.cuda.get_device_name; the first key contained in the name wins.
NOMINAL_HBM = (
    ("GH200", None),  # Grace Hopper: 4.0 or 4.9 TB/s depending on its HBM; the name does not say
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # SXM5, named "NVIDIA H100 80GB HBM3"
)


def nominal_hbm_bandwidth(device_name: str) -> float | None:
    """The card's nominal HBM bandwidth in bytes/s, or None for a card not in NOMINAL_HBM."""
    return next((bandwidth for key, bandwidth in NOMINAL_HBM if key in device_name), None)


def floor_percent(step_bytes: float, step_s: float, bandwidth: float | None) -> float | None:
    """The bandwidth floor of a decode step (its bytes / bandwidth) as a percentage of its measured
    time: 100 means decode streams its bytes at `bandwidth`."""
    if bandwidth is None:
        return None
    return 100.0 * step_bytes / bandwidth / step_s


# ---- parity -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParityRun:
    name: str
    dtype: str  # what the modules compute in (they choose it; a label for the report)
    compile_decode: bool
    modules: tuple[str, ...]
    select: str = ""  # a pytest -k expression; empty: every test in the modules

    def command(self, junit: Path) -> list[str]:
        command = [
            sys.executable, "-m", "pytest", "-q", "-rfEP", "-W", "ignore::DeprecationWarning",
            f"--junitxml={junit}", *self.modules,
        ]  # fmt: skip
        return command + (["-k", self.select] if self.select else [])

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        env = base | {
            TEST_DEVICE_ENV: "cuda",
            TEST_COMPILE_ENV: "1" if self.compile_decode else "0",
            "PYTHONUNBUFFERED": "1",
        }
        if self.compile_decode:
            # The tests generate one request at a time: a batch of 1 compiles one graph per engine
            # (3 checkpoints: 3 graphs), where the default batch would compile 5 buckets each and
            # pass Dynamo's limit of 8 compilations of the decode step within the process.
            env[MAX_BATCH_ENV] = "1"
        return env


PARITY_RUNS = {
    "parity-eager": (
        ParityRun("fp32 eager", "float32", False, ("tests/model/test_model.py", "tests/engine/test_engine.py")),
        ParityRun("bf16 eager", "bfloat16", False, ("tests/model/test_bf16.py",)),
    ),
    "parity-compiled": (
        ParityRun("fp32 compiled", "float32", True, ("tests/engine/test_engine.py",)),
        # Only the engine's tests: the logits test runs no decode step.
        ParityRun("bf16 compiled", "bfloat16", True, ("tests/model/test_bf16.py",), select="greedy"),
    ),
    "parity-quantized": (ParityRun("int8/int4 eager", "bfloat16", False, ("tests/compute/test_quantized.py",)),),
}


def junit_counts(xml_text: str) -> dict[str, int]:
    """passed / failed / errors / skipped / tests from a pytest --junitxml report."""
    root = ElementTree.fromstring(xml_text)
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    for suite in root.iter("testsuite"):
        counts["tests"] += int(suite.get("tests", 0))
        counts["failed"] += int(suite.get("failures", 0))
        counts["errors"] += int(suite.get("errors", 0))
        counts["skipped"] += int(suite.get("skipped", 0))
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return counts


def parity_status(returncode: int | None, counts: dict[str, int] | None) -> str:
    """"passed" only when pytest ran tests, none failed or errored, and it exited 0."""
    if returncode is None:
        return "timed out"
    if counts is None:
        return f"failed: pytest exited {returncode} without a report"
    if counts["tests"] == 0:
        return "failed: no tests ran"
    if counts["failed"] or counts["errors"] or returncode != 0:
        return "failed"
    return "passed"


def run_captured(command: list[str], env: dict[str, str], timeout_s: float) -> tuple[str, int | None]:
    """(stdout and stderr together, exit status or None on timeout). On timeout the whole process
    group is killed: pytest's compile workers must not outlive it."""
    with subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    ) as child:  # fmt: skip
        try:
            output, _ = child.communicate(timeout=timeout_s)
            return output, child.returncode
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            try:
                output, _ = child.communicate(timeout=10)
            except subprocess.TimeoutExpired:  # a grandchild outside the group holds the pipe
                output = ""
            return output + f"\n[gpu_check: killed after {timeout_s:.0f} s]\n", None


def run_parity(run: ParityRun, timeout_s: float) -> dict[str, Any]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        output, returncode = run_captured(run.command(junit), run.environment(dict(os.environ)), timeout_s)
        counts = junit_counts(junit.read_text()) if junit.exists() else None
    return {
        "run": run.name,
        "status": parity_status(returncode, counts),
        "dtype": run.dtype,
        "decode": "compiled" if run.compile_decode else "eager",
        "modules": list(run.modules),
        "select": run.select or None,
        **(counts or {}),
        "returncode": returncode,
        "seconds": time.perf_counter() - started,
        "output": output[-OUTPUT_TAIL_CHARS:],
    }


# ---- benchmark ----------------------------------------------------------------------------------


def weight_bytes(config: DeepseekVL2Config, dtype: torch.dtype, quantize: QuantizeSpec | None = None) -> int:
    """The weights' bytes in `dtype` (routers stay fp32; quantized weights at their quantized size,
    on CUDA's layout), from a model on the meta device."""
    with torch.device("meta"):
        model = DeepseekVL2(config)
    quantize_model(model, quantize or QuantizeSpec())
    model.materialize(torch.device("meta"), dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters()) + quantized_bytes(model)[1]


def kv_cache_bytes(config: DeepseekVL2Config, rows: int, dtype: torch.dtype) -> int:
    """`rows` cache rows of the whole context; on CUDA the cache is in the weights' dtype."""
    c = config.language
    return rows * c.cache_values_per_token * c.max_position_embeddings * (torch.finfo(dtype).bits // 8)


def compile_counters() -> dict[str, int]:
    """Process-wide compiler counters (a private API), for differences around one configuration:
    graphs Dynamo compiled (one per batch bucket is expected), CUDA-graph skips (a bucket that runs
    without a CUDA graph), and inputs recorded as non-static (copied into the graph on every replay)."""
    from torch._dynamo.utils import counters

    return {
        "graphs": counters["stats"]["unique_graphs"],
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        "cudagraph_recorded_non_static_inputs": counters["inductor"]["cudagraph_recorded_non_static_inputs"],
    }


def release_memory() -> None:
    """Free what the last configuration left: its compiled graphs (and CUDA graph pools) with Dynamo's
    caches, which also resets Dynamo's count of decode-step compilations toward its limit of 8."""
    gc.collect()
    torch.compiler.reset()
    gc.collect()
    torch.cuda.empty_cache()


def floor_fields(
    config: DeepseekVL2Config, level: dict[str, Any], bandwidth: dict[str, Any], quantize: QuantizeSpec | None = None
) -> dict[str, Any]:
    """Decode against its bandwidth floor, for a concurrency-1 level (decode_bytes_per_token counts
    a batch-1 step)."""
    context = level["prompt_tokens"] + level["new_tokens"] // 2  # mid-answer
    step_bytes = decode_bytes_per_token(config, BENCH_DTYPE, context, quantize)
    step_s = 1 / level["aggregate_decode_tokens_per_s"]
    return {
        "decode_step_gib": step_bytes / 2**30,
        "decode_step_ms": step_s * 1000,
        "floor_pct_measured": floor_percent(step_bytes, step_s, bandwidth["read_bytes_per_s"]),
        "floor_pct_nominal": floor_percent(step_bytes, step_s, bandwidth["nominal_bytes_per_s"]),
    }


def bench_config(
    record: dict[str, Any],
    processor: Processor,
    device: torch.device,
    new_tokens: int,
    bandwidth: dict[str, Any],
    on_level: Callable[[dict[str, Any]], None],
) -> None:
    """Fill `record` (variant, decode) with one configuration's results; never raises."""
    compile_decode = record["decode"] == "compiled"
    quantize = QuantizeSpec(record.get("quantize", "none"))
    config = config_for(record["variant"], processor)
    weights, kv = weight_bytes(config, BENCH_DTYPE, quantize), kv_cache_bytes(config, MAX_BATCH, BENCH_DTYPE)
    free, total = torch.cuda.mem_get_info(device)
    record.update(
        weights_gib=weights / 2**30, kv_cache_gib=kv / 2**30, free_gib=free / 2**30, total_gib=total / 2**30
    )
    if weights + kv > free:
        record["status"] = "skipped: out of memory (weights and KV cache exceed the free memory)"
        return
    torch.cuda.reset_peak_memory_stats(device)
    counters_before = compile_counters()
    model = engine = None
    try:
        started = time.perf_counter()

        def build() -> DeepseekVL2:  # on the engine's thread, like Engine.from_pretrained
            built = random_model(config, device, BENCH_DTYPE, quantize)
            torch.cuda.synchronize(device)
            record["build_s"] = time.perf_counter() - started
            return built

        # The prefix cache stays off: run_level sends identical requests, which would otherwise
        # reuse the first one's prefill and hide the cost of a new image.
        engine = Engine(
            build, processor, max_batch=MAX_BATCH, compile_decode=compile_decode, prefix_cache_bytes=0
        )
        model = engine.model
        # Includes compiling every bucket.
        record["engine_start_s"] = time.perf_counter() - started - record["build_s"]
        # The runner falls back to eager decode, with a warning, when compiling fails.
        record["decode_compiled_at_start"] = engine.runner.decode_compiled
        engine.scheduler.eos_id = -1  # random weights: never stop early, every request decodes in full
        # First calls pay for kernel selection and library set-up.
        messages, images = request(False)
        engine.generate(messages, [image.resize((384, 384)) for image in images], max_new_tokens=4)
        record["levels"] = []
        for prompt, text_only in PROMPTS:
            for concurrency in CONCURRENCY:
                level, results = run_level(engine, concurrency, text_only, new_tokens)
                level.update(
                    prompt=prompt,
                    prompt_tokens=results[0].prompt_tokens,
                    new_tokens=min(len(r.token_ids) for r in results),
                    cached_prompt_tokens=sum(r.cached_prompt_tokens for r in results),
                )
                if concurrency == 1:
                    level.update(floor_fields(config, level, bandwidth, quantize))
                record["levels"].append(level)
                on_level(level)
        record["decode_compiled_at_end"] = engine.runner.decode_compiled
        record["status"] = "ok"
        if compile_decode and not engine.runner.decode_compiled:
            record["status"] = "failed: compiled decode fell back to eager"
    except torch.cuda.OutOfMemoryError as error:
        record["status"] = "skipped: out of memory"
        record["error"] = str(error).split("\n", 1)[0]  # the rest is allocator advice
    except Exception:
        record["status"] = "failed"
        record["error"] = traceback.format_exc()[-4000:]
    finally:
        record["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if compile_decode:
            record["compile_counters"] = {k: v - counters_before[k] for k, v in compile_counters().items()}
        if engine is not None:
            engine.close()
        engine = model = None
        release_memory()
        record["left_allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30


def measure_bandwidths(device: torch.device) -> dict[str, Any]:
    read, gemv = measure_bandwidth(device, BENCH_DTYPE)
    release_memory()
    nominal = nominal_hbm_bandwidth(torch.cuda.get_device_name(device))
    return {"read_bytes_per_s": read, "gemv_bytes_per_s": gemv, "nominal_bytes_per_s": nominal}


# ---- report -------------------------------------------------------------------------------------


def report_paths(json_path: Path, out_dir: str | None) -> list[Path]:
    """Where the report goes: --json, and $OUT (whose files the remote runner returns) when set."""
    paths = [json_path]
    if out_dir:
        copy = Path(out_dir) / json_path.name
        if copy.resolve() != json_path.resolve():
            paths.append(copy)
    return paths


class Report:
    """The JSON report, rewritten whole after every step."""

    def __init__(self, paths: list[Path], data: dict[str, Any]) -> None:
        self.paths, self.data = paths, data

    def save(self) -> None:
        text = json.dumps(self.data, indent=2) + "\n"
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            partial.write_text(text)
            partial.replace(path)  # a kill mid-write leaves the previous report, never half of one


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([cells[0].ljust(widths[0]), *rest]).rstrip()

    return "\n".join([line(header), line(["-" * width for width in widths]), *map(line, rows)])


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _tera(bytes_per_s: float | None) -> float | None:
    return None if bytes_per_s is None else bytes_per_s / 1e12


PARITY_HEADER = ("parity run", "status", "passed", "failed", "errors", "skipped", "seconds")
BENCH_HEADER = (
    "variant", "decode", "prompt", "conc", "prompt tok", "TTFT p50 s", "decode tok/s", "floor % meas",
    "floor % nominal", "peak GiB", "status",
)  # fmt: skip


def parity_rows(runs: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [
        [r["run"], r["status"], *(str(r.get(key, "-")) for key in ("passed", "failed", "errors", "skipped")),
         _number(r.get("seconds"), 1)]
        for r in runs
    ]  # fmt: skip


def bench_rows(configs: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One row per measured level; a configuration without levels gets one row with its status."""
    rows = []
    for c in configs:
        decode = c["decode"] if c.get("quantize", "none") == "none" else f"{c['decode']} {c['quantize']}"
        head, peak = [c["variant"], decode], _number(c.get("peak_gib"), 1)
        if not c.get("levels"):
            rows.append(head + ["-"] * 7 + [peak, c["status"]])
            continue
        for level in c["levels"]:
            rows.append(head + [
                level["prompt"], str(level["concurrency"]), str(level["prompt_tokens"]),
                _number(level["ttft_s_p50"], 3), _number(level["aggregate_decode_tokens_per_s"], 1),
                _number(level.get("floor_pct_measured"), 1), _number(level.get("floor_pct_nominal"), 1),
                peak, c["status"],
            ])  # fmt: skip
    return rows


# ---- driver -------------------------------------------------------------------------------------


def parse_choices(text: str, allowed: Sequence[str]) -> list[str]:
    """A comma-separated subset of `allowed`, returned in `allowed`'s order."""
    chosen = {item.strip() for item in text.split(",") if item.strip()}
    unknown = chosen - set(allowed)
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (got {text!r})")
    return [item for item in allowed if item in chosen]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--json", type=Path, default=Path("gpu_check.json"), help="report path (also copied into $OUT)"
    )
    parser.add_argument(
        "--only", type=lambda text: parse_choices(text, STAGES), default=list(STAGES), help="stages to run"
    )
    parser.add_argument("--variants", type=lambda text: parse_choices(text, VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--new-tokens", type=int, default=32, help="per request (at least 2: decode needs one step)"
    )
    parser.add_argument("--deadline-s", type=float, default=540.0, help="no step starts after this")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    return args


class Clock:
    def __init__(self, deadline_s: float) -> None:
        self.started, self.deadline_s = time.perf_counter(), deadline_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.deadline_s - self.elapsed()

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {text}", flush=True)


def device_info(device: torch.device) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gib": props.total_memory / 2**30,
        "nominal_hbm_tb_per_s": _tera(nominal_hbm_bandwidth(props.name)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def run_parity_stage(stage: str, report: Report, clock: Clock) -> None:
    for run in PARITY_RUNS[stage]:
        if clock.left() < MIN_LEFT_S["parity"]:
            record = {"run": run.name, "status": f"skipped: time budget ({clock.left():.0f} s left)"}
            report.data["parity"].append(record)
            report.save()
            clock.say(f"{stage}: {run.name} {record['status']}")
            continue
        report.data["parity"].append({"run": run.name, "status": "running"})
        report.save()
        clock.say(f"{stage}: {run.name}: pytest {' '.join(run.modules)}")
        record = run_parity(run, min(PARITY_TIMEOUT_S, clock.left()))
        report.data["parity"][-1] = record
        report.save()
        keys = ("passed", "failed", "errors", "skipped")
        counts = " ".join(f"{key} {record[key]}" for key in keys if key in record)
        clock.say(f"{stage}: {run.name}: {record['status']} ({counts}) in {record['seconds']:.1f} s")
        if record["status"] != "passed":
            print(record["output"][-3000:], flush=True)


def run_bench_stage(
    stage: str, variants: Sequence[str], new_tokens: int, device: torch.device, report: Report, clock: Clock
) -> None:
    processor = Processor.from_pretrained(TOKENIZER)
    # bench-quantized: each variant in each quantized mode, decode eager.
    quantized = stage == "bench-quantized"
    decode = "eager" if quantized else stage.removeprefix("bench-")
    modes = QUANTIZED_MODES if quantized else ("none",)

    def on_level(level: dict[str, Any]) -> None:
        report.save()
        clock.say(
            f"  {level['prompt']} x{level['concurrency']}: {level['prompt_tokens']} prompt tokens, "
            f"TTFT p50 {level['ttft_s_p50']:.3f} s, "
            f"decode {level['aggregate_decode_tokens_per_s']:.1f} tokens/s"
        )

    for variant, mode in [(variant, mode) for variant in variants for mode in modes]:
        record: dict[str, Any] = {"variant": variant, "decode": decode, "quantize": mode, "status": "running"}
        report.data["bench"].append(record)
        if clock.left() < MIN_LEFT_S[stage]:
            record["status"] = f"skipped: time budget ({clock.left():.0f} s left)"
        else:
            if report.data["bandwidth"] is None:  # once, before the first configuration that runs
                bandwidth = report.data["bandwidth"] = measure_bandwidths(device)
                clock.say(
                    f"HBM bandwidth measured: read {_tera(bandwidth['read_bytes_per_s']):.2f} TB/s, gemv "
                    f"{_tera(bandwidth['gemv_bytes_per_s']):.2f} TB/s; nominal "
                    f"{_number(_tera(bandwidth['nominal_bytes_per_s']), 2)} TB/s"
                )
            report.save()
            levels = len(PROMPTS) * len(CONCURRENCY)
            clock.say(f"{stage}: {variant} ({mode}): building on the GPU, then {levels} levels")
            started = time.perf_counter()
            bench_config(record, processor, device, new_tokens, report.data["bandwidth"], on_level)
            record["seconds"] = time.perf_counter() - started
        report.save()
        clock.say(f"{stage}: {variant} ({mode}): {record['status']}")
        if "error" in record:
            print(record["error"], flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return EXIT_NO_CUDA
    # The runner's warnings say when a compiled decode falls back to eager.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    clock = Clock(args.deadline_s)
    device = torch.device("cuda", torch.cuda.current_device())
    data: dict[str, Any] = {
        "device": device_info(device),
        "deadline_s": args.deadline_s,
        "new_tokens": args.new_tokens,
        "stages": {},
        "parity": [],
        "bandwidth": None,
        "bench": [],
    }
    report = Report(report_paths(args.json, os.environ.get("OUT")), data)
    report.save()
    info = data["device"]
    clock.say(f"{info['name']} ({info['memory_gib']:.0f} GiB), torch {info['torch']}, CUDA {info['cuda']}")

    for stage in args.only:
        data["stages"][stage] = {"status": "running"}
        report.save()
        started = time.perf_counter()
        if stage.startswith("parity"):
            run_parity_stage(stage, report, clock)
        else:
            run_bench_stage(stage, args.variants, args.new_tokens, device, report, clock)
        data["stages"][stage] = {"status": "done", "seconds": time.perf_counter() - started}
        report.save()
        clock.say(f"{stage} done in {data['stages'][stage]['seconds']:.1f} s")

    data["elapsed_s"] = clock.elapsed()
    report.save()
    print()
    if data["parity"]:
        print(format_table(PARITY_HEADER, parity_rows(data["parity"])))
        print()
    if data["bench"]:
        print(format_table(BENCH_HEADER, bench_rows(data["bench"])))
        print(
            "floor %: the bytes a batch-1 decode step reads / HBM bandwidth, as a share of the measured "
            "step time (measured read bandwidth, and the card's nominal one); concurrency 1 only"
        )
    print(f"\nwrote {', '.join(map(str, report.paths))} after {clock.elapsed():.0f} s")
    failed = [r for r in data["parity"] if r["status"] != "passed" and not r["status"].startswith("skipped")]
    failed += [c for c in data["bench"] if c["status"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
