"""scripts/gpu_check.py where no GPU is: it refuses at once, and its arithmetic, accounting and
reporting hold (its GPU results are checked by reading its report on a GPU host)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from parity import COMPILE_ENV, DEVICE_ENV
from script_modules import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
MANIFESTS = ROOT / "tests" / "fixtures" / "manifests"


gpu_check = load_script("gpu_check")


def test_without_cuda_it_exits_2_with_a_message_and_writes_nothing(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "OUT"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU even where one exists
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "no CUDA device: gpu-check needs an NVIDIA GPU; the CPU checks are `make test`" in done.stderr
    assert done.stdout == ""
    assert list(tmp_path.iterdir()) == []  # not even the report: it stopped before any work


def test_the_environment_names_are_those_the_parity_tests_read():
    assert gpu_check.TEST_DEVICE_ENV == DEVICE_ENV
    assert gpu_check.TEST_COMPILE_ENV == COMPILE_ENV


@pytest.mark.parametrize(
    "name,expected",
    [
        ("NVIDIA H100 80GB HBM3", 3.35e12),  # SXM5
        ("NVIDIA H100 PCIe", 2.0e12),
        ("NVIDIA H100 NVL", 3.9e12),
        ("NVIDIA H200", 4.8e12),
        ("NVIDIA GH200 480GB", None),  # contains "H200", but is not one
        ("NVIDIA A100-SXM4-80GB", None),
    ],
)
def test_nominal_hbm_bandwidth_by_device_name(name, expected):
    assert gpu_check.nominal_hbm_bandwidth(name) == expected


def test_floor_percent_is_the_floor_time_over_the_step_time():
    # 1.5 GB at 3 TB/s takes 0.5 ms: a 1 ms step runs at half the bandwidth, a 0.5 ms one at all of it.
    assert gpu_check.floor_percent(1.5e9, 1e-3, 3e12) == pytest.approx(50.0)
    assert gpu_check.floor_percent(1.5e9, 0.5e-3, 3e12) == pytest.approx(100.0)
    assert gpu_check.floor_percent(1.5e9, 1e-3, None) is None


@lru_cache
def _config(variant: str):
    return gpu_check.config_for(variant, gpu_check.Processor.from_pretrained(gpu_check.TOKENIZER))


def test_floor_fields_use_the_mean_context_and_the_decode_rate():
    config = _config("tiny")
    level = {"prompt_tokens": 1823, "new_tokens": 32, "aggregate_decode_tokens_per_s": 50.0}
    bandwidth = {"read_bytes_per_s": 3e12, "nominal_bytes_per_s": 3.35e12}
    fields = gpu_check.floor_fields(config, level, bandwidth)
    # Mid-answer context: the prompt plus half the new tokens; a step every 20 ms.
    step_bytes = gpu_check.decode_bytes_per_token(config, torch.bfloat16, 1823 + 16)
    assert fields["decode_step_ms"] == pytest.approx(20.0)
    assert fields["decode_step_gib"] == pytest.approx(step_bytes / 2**30)
    assert fields["floor_pct_measured"] == pytest.approx(100 * step_bytes / 3e12 / 0.02)
    assert fields["floor_pct_nominal"] == pytest.approx(100 * step_bytes / 3.35e12 / 0.02)


@pytest.mark.parametrize("variant", ["tiny", "base"])
def test_weight_bytes_match_the_official_manifest(variant):
    # Every checkpoint tensor but the unused attention-pool head, in bf16, except the routers (fp32).
    params = json.loads((MANIFESTS / f"{variant}.json").read_text())["parameters"]
    expected = sum(
        math.prod(shape) * (4 if name.endswith(("mlp.gate.weight", "e_score_correction_bias")) else 2)
        for name, shape in params.items()
        if not name.startswith("vision.attn_pool.")
    )
    assert gpu_check.weight_bytes(_config(variant), torch.bfloat16) == expected


def test_quantized_weight_bytes_count_the_quantized_linear_weights():
    bf16 = gpu_check.weight_bytes(_config("tiny"), torch.bfloat16)
    int8 = gpu_check.weight_bytes(_config("tiny"), torch.bfloat16, gpu_check.QuantizeSpec("int8"))
    int4 = gpu_check.weight_bytes(_config("tiny"), torch.bfloat16, gpu_check.QuantizeSpec("int4"))
    # tiny's 5.54 GB of language-model linear weights shrink to half (int8: a byte a weight and a
    # bf16 scale a row) and to 0.27 (int4: half a byte a weight, 4 bytes of scale and zero point per
    # 128); the other 1.17 GB (vision, projector, embeddings, norms, routers) stay in bf16.
    assert 0.58 * bf16 < int8 < 0.59 * bf16 and 0.39 * bf16 < int4 < 0.40 * bf16


def test_kv_cache_bytes_per_row_match_the_readme():
    # README: a row of the 4096-token context is 0.25 GB for tiny (MHA keys and values of 12 layers,
    # 10 heads of 128) and 0.14 GB for base (MLA: a 512 + 64 latent for each of 30 layers).
    assert gpu_check.kv_cache_bytes(_config("tiny"), 1, torch.bfloat16) == 4096 * 2 * 12 * 10 * 128 * 2
    assert gpu_check.kv_cache_bytes(_config("base"), 8, torch.bfloat16) == 8 * 4096 * 30 * (512 + 64) * 2


def _bench(record: dict, monkeypatch, free_gib: float) -> dict:
    """bench_config on the CPU, with the CUDA memory queries it makes stubbed."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    processor = gpu_check.Processor.from_pretrained(gpu_check.TOKENIZER)
    gpu_check.bench_config(record, processor, torch.device("cpu"), 32, {}, lambda level: None)
    return record


def test_a_variant_that_cannot_fit_is_skipped_before_anything_is_allocated(monkeypatch):
    def fail(*args):
        raise AssertionError("nothing may be built")

    monkeypatch.setattr(gpu_check, "random_model", fail)
    record = _bench({"variant": "base", "decode": "eager", "status": "running"}, monkeypatch, free_gib=40)
    assert record["status"] == "skipped: out of memory (weights and KV cache exceed the free memory)"
    # The numbers that say why: base's 51.2 GiB of bf16 weights and 8 cache rows against 40 GiB free.
    assert record["weights_gib"] == pytest.approx(54940486528 / 2**30)
    assert record["kv_cache_gib"] == pytest.approx(8 * 141557760 / 2**30)
    assert (record["free_gib"], record["total_gib"]) == (40, 80) and "levels" not in record


@pytest.mark.parametrize(
    "error,status",
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n..."),
         "skipped: out of memory"),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), "failed"),
    ],
)
def test_a_configuration_that_breaks_is_recorded_and_the_check_goes_on(monkeypatch, error, status):
    def build(*args):
        raise error

    monkeypatch.setattr(gpu_check, "random_model", build)
    record = _bench({"variant": "tiny", "decode": "compiled", "status": "running"}, monkeypatch, free_gib=70)
    assert record["status"] == status
    assert str(error).splitlines()[0] in record["error"]
    assert record["peak_gib"] == 0 and record["left_allocated_gib"] == 0


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests"><testsuite name="pytest" errors="1" failures="2" skipped="3" tests="10"
time="1.0"><testcase classname="t" name="a" time="0.1"/></testsuite></testsuites>"""


def test_junit_counts():
    assert gpu_check.junit_counts(JUNIT) == {"tests": 10, "failed": 2, "errors": 1, "skipped": 3, "passed": 4}


@pytest.mark.parametrize(
    "returncode,counts,status",
    [
        (0, {"tests": 3, "failed": 0, "errors": 0}, "passed"),
        (1, {"tests": 3, "failed": 1, "errors": 0}, "failed"),
        (1, {"tests": 3, "failed": 0, "errors": 1}, "failed"),
        (3, {"tests": 3, "failed": 0, "errors": 0}, "failed"),  # pytest itself failed
        (5, {"tests": 0, "failed": 0, "errors": 0}, "failed: no tests ran"),
        (4, None, "failed: pytest exited 4 without a report"),
        (None, None, "timed out"),
    ],
)
def test_parity_status(returncode, counts, status):
    assert gpu_check.parity_status(returncode, counts) == status


def test_a_parity_run_reports_pytests_counts_and_output(tmp_path):
    module = tmp_path / "test_demo.py"
    module.write_text(textwrap.dedent("""
        import os, pytest

        def test_sees_the_device():
            assert os.environ["DEEPSEEK_VL2_TEST_DEVICE"] == "cuda"
            assert os.environ["DEEPSEEK_VL2_TEST_COMPILE"] == "1"
            assert os.environ["DEEPSEEK_VL2_MAX_BATCH"] == "1"

        def test_fails():
            assert 1 == 2

        @pytest.mark.skip(reason="demo")
        def test_skipped():
            pass
    """))
    run = gpu_check.ParityRun("demo", "float32", True, (str(module),))
    record = gpu_check.run_parity(run, timeout_s=120)
    assert record["status"] == "failed" and record["returncode"] == 1
    assert (record["passed"], record["failed"], record["errors"], record["skipped"]) == (1, 1, 0, 1)
    assert record["decode"] == "compiled" and "assert 1 == 2" in record["output"]


def test_a_hung_parity_run_is_killed_at_its_timeout(tmp_path):
    module = tmp_path / "test_hang.py"
    module.write_text("import time\n\ndef test_hangs():\n    time.sleep(600)\n")
    record = gpu_check.run_parity(gpu_check.ParityRun("hang", "float32", False, (str(module),)), timeout_s=3)
    assert record["status"] == "timed out" and record["returncode"] is None
    assert record["seconds"] < 60 and "killed after 3 s" in record["output"]


def test_format_table_pads_columns():
    table = gpu_check.format_table(["name", "n"], [["tiny", "1"], ["b", "123"]])
    assert table.splitlines() == ["name    n", "----  ---", "tiny    1", "b     123"]


def test_bench_rows_one_per_level_or_the_status_alone():
    level = {
        "prompt": "seed-image", "concurrency": 1, "prompt_tokens": 1823, "ttft_s_p50": 0.1234,
        "aggregate_decode_tokens_per_s": 95.25, "floor_pct_measured": 41.04, "floor_pct_nominal": None,
    }  # fmt: skip
    configs = [
        {"variant": "tiny", "decode": "eager", "status": "ok", "peak_gib": 8.04, "levels": [level]},
        {"variant": "base", "decode": "compiled", "status": "skipped: time budget (90 s left)"},
        {"variant": "small", "decode": "eager", "quantize": "int4", "status": "failed"},
    ]
    assert gpu_check.bench_rows(configs) == [
        ["tiny", "eager", "seed-image", "1", "1823", "0.123", "95.2", "41.0", "-", "8.0", "ok"],
        ["base", "compiled", "-", "-", "-", "-", "-", "-", "-", "-", "skipped: time budget (90 s left)"],
        ["small", "eager int4", "-", "-", "-", "-", "-", "-", "-", "-", "failed"],
    ]
    assert all(len(row) == len(gpu_check.BENCH_HEADER) for row in gpu_check.bench_rows(configs))


def test_parity_rows_show_counts_or_dashes():
    runs = [
        {"run": "fp32 eager", "status": "passed", "passed": 40, "failed": 0, "errors": 0, "skipped": 0,
         "seconds": 31.26},
        {"run": "bf16 compiled", "status": "skipped: time budget (20 s left)"},
    ]
    assert gpu_check.parity_rows(runs) == [
        ["fp32 eager", "passed", "40", "0", "0", "0", "31.3"],
        ["bf16 compiled", "skipped: time budget (20 s left)", "-", "-", "-", "-", "-"],
    ]


def test_stage_and_variant_choices_keep_the_run_order():
    assert gpu_check.parse_choices("bench-compiled, parity-eager", gpu_check.STAGES) == [
        "parity-eager", "bench-compiled",
    ]  # fmt: skip
    with pytest.raises(argparse.ArgumentTypeError, match="choose from tiny, small, base"):
        gpu_check.parse_choices("tiny,huge", gpu_check.VARIANTS)
    args = gpu_check.parse_args([])
    assert args.only == list(gpu_check.STAGES) and args.variants == ["tiny", "small", "base"]
    assert args.new_tokens == 32 and args.json == Path("gpu_check.json")


def test_the_report_goes_to_json_and_to_out(tmp_path):
    out = tmp_path / "out"
    paths = gpu_check.report_paths(tmp_path / "report.json", str(out))
    assert paths == [tmp_path / "report.json", out / "report.json"]
    assert gpu_check.report_paths(out / "report.json", str(out)) == [out / "report.json"]
    assert gpu_check.report_paths(tmp_path / "report.json", None) == [tmp_path / "report.json"]
    report = gpu_check.Report(paths, {"parity": [{"run": "fp32 eager", "status": "running"}]})
    report.save()
    report.data["parity"][0]["status"] = "passed"
    report.save()
    for path in paths:
        assert json.loads(path.read_text()) == {"parity": [{"run": "fp32 eager", "status": "passed"}]}
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]  # no partial file left behind
