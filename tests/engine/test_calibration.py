"""Execution choices per machine: forced, calibrated with a clear margin, remembered across
restarts, refused with a message when malformed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from parity import CHECKPOINTS

from deepseek_vl2 import DeepseekVL2, Engine
from deepseek_vl2.compute.execution import (
    CHOICES, DEQUANTIZE_MIN_ROWS_CPU, EXECUTION_ENV, MANY_ROWS, Execution, describe, native_attention_keeps_bounds,
    parse_choices, valid_choices,
)  # fmt: skip
from deepseek_vl2.engine import calibration, execution_memory
from deepseek_vl2.engine.calibration import MARGIN, calibrate, choose_execution
from deepseek_vl2.engine.execution_memory import machine_key
from deepseek_vl2.engine.settings import (
    CONCURRENCY_ENV, CPU_DEFAULT_MAX_BATCH, MAX_BATCH_ENV, planned_max_batch,
)  # fmt: skip

# Timings and chosen kernels depend on torch's CPU kernel level: `make test` reruns these under
# each ATEN_CPU_CAPABILITY.
pytestmark = pytest.mark.kernel_level


@pytest.fixture(scope="module")
def bf16_model() -> DeepseekVL2:
    return DeepseekVL2.from_pretrained(CHECKPOINTS / "tiny-mla", dtype=torch.bfloat16, execution="upcast")


@pytest.fixture(scope="module")
def fp32_model() -> DeepseekVL2:
    return DeepseekVL2.from_pretrained(CHECKPOINTS / "tiny-mha", dtype=torch.float32, execution="upcast")


@pytest.fixture
def native_attention(monkeypatch) -> None:
    """Native bf16 attention is a choice here, as on every AVX2 or AVX512 CPU: the tests that
    count on it are about other things, and must not change with the level they run at (the
    DEFAULT level's own rule has its test)."""
    level = torch.backends.cpu.get_cpu_capability()
    if level == "DEFAULT":
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")


def test_presets_and_lists_name_every_choice(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # native attention allowed
    assert parse_choices("auto", torch.bfloat16) is None and parse_choices("", torch.bfloat16) is None
    assert parse_choices("upcast", torch.bfloat16) == {"many": "upcast", "few": "plain", "attention": "fp32"}
    assert parse_choices("native", torch.bfloat16) == {"many": "native", "few": "plain", "attention": "native"}
    # fp32 weights keep their transposed few-row products unless told otherwise
    assert parse_choices("upcast", torch.float32)["few"] == "transposed"
    assert parse_choices(" many=native, few=transposed ", torch.bfloat16) == {
        "many": "native", "few": "transposed", "attention": "fp32",
    }  # fmt: skip
    assert parse_choices("few=upcast", torch.bfloat16) == {"many": "upcast", "few": "upcast", "attention": "fp32"}
    for bad in ("fast", "many=quick", "tiles=native", "many=upcast,attention=native"):
        with pytest.raises(ValueError, match=EXECUTION_ENV):
            parse_choices(bad, torch.bfloat16)
    with pytest.raises(ValueError, match="few=upcast needs bf16 weights"):
        parse_choices("few=upcast", torch.float32)


def test_every_valid_choice_maps_to_its_execution():
    # 2 x 3 x 2, less upcast products with native attention, and less native attention at the
    # DEFAULT kernel level, where torch's bf16 attention leaves the official bounds; fp32 weights
    # have no few-row upcast (2 x 2 x 2, less upcast products with native attention).
    assert len(valid_choices()) == (9 if native_attention_keeps_bounds() else 6)
    assert len(valid_choices(torch.float32)) == 6
    assert all(c["few"] != "upcast" for c in valid_choices(torch.float32))
    for choices in valid_choices():
        e = Execution.from_choices(choices)
        assert (e.upcast_min_rows > 0) == (choices["many"] == "upcast")
        assert (e.transposed_max_rows > 1) == (choices["few"] == "transposed")
        assert (e.few_upcast_max_rows > 1) == (choices["few"] == "upcast")
        assert e.fp32_attention == (choices["attention"] == "fp32")
        assert parse_choices(describe(choices), torch.bfloat16) == choices


def test_a_forced_choice_is_applied_to_every_module(bf16_model, native_attention):
    decision = choose_execution(bf16_model, "native")
    assert decision.source == "forced" and decision.choices["many"] == "native"
    experts = bf16_model.language.model.layers[-1].mlp.experts
    assert experts.execution == bf16_model.execution == decision.execution
    assert not decision.execution.upcast_min_rows and not decision.execution.fp32_attention
    choose_execution(bf16_model, "upcast")
    assert experts.execution.upcast_min_rows and experts.execution.fp32_attention


def test_calibration_times_every_option_on_the_model(bf16_model, fp32_model):
    decision = calibrate(bf16_model, rows=4, budget_s=30)
    assert decision.choices in valid_choices()
    # attention is measured only beside native products (see execution.py)
    measured = {"many", "few"} | ({"attention"} if decision.choices["many"] == "native" else set())
    assert set(decision.timings_ms) == measured
    for name, times in decision.timings_ms.items():
        assert set(times) == set(CHOICES[name]) and all(ms > 0 for ms in times.values())
    fp32 = calibrate(fp32_model, rows=4, budget_s=30)
    assert set(fp32.timings_ms) == {"few"} and fp32.choices["many"] == "native"
    assert set(fp32.timings_ms["few"]) == {"plain", "transposed"}  # nothing to upcast


QUICK = {
    "many": {"upcast": 10.0, "native": 80.0},
    "few": {"plain": 10.0, "transposed": 10.0, "upcast": 10.0},
    "attention": {"fp32": 10.0, "native": 10.0},
}


def fake_timings(monkeypatch, times: dict[str, dict[str, float]]) -> None:
    """Make each measurement report the given milliseconds per option."""
    def measured(runs, rounds=3):
        for name, options in times.items():
            if set(runs) == set(options):
                return dict(options)
        raise AssertionError(runs)

    # the three choices have different option names, so the options say which one is measured
    monkeypatch.setattr(calibration, "_interleaved_ms", measured)


def test_the_baseline_stays_unless_another_option_is_clearly_faster(bf16_model, monkeypatch):
    just_faster = 1 / MARGIN + 0.05  # faster, but within the margin
    fake_timings(monkeypatch, {
        "many": {"upcast": 100.0, "native": 100 / MARGIN - 1},  # clearly faster: switch
        "few": {"plain": 10.0, "transposed": 10 * just_faster, "upcast": 20.0},  # noise: stay
        "attention": {"fp32": 5.0, "native": 50.0},  # slower: stay
    })  # fmt: skip
    decision = calibrate(bf16_model, rows=4)
    assert decision.choices == {"many": "native", "few": "plain", "attention": "fp32"}


def test_few_row_products_upcast_where_that_is_clearly_faster(bf16_model, monkeypatch):
    # A CPU without bf16 units: its bf16 products of a few rows read the weight once per row.
    fake_timings(monkeypatch, {
        "many": {"upcast": 10.0, "native": 80.0},
        "few": {"plain": 87.0, "transposed": 170.0, "upcast": 40.0},
        "attention": {"fp32": 10.0, "native": 40.0},
    })  # fmt: skip
    decision = calibrate(bf16_model, rows=4)
    assert decision.choices == {"many": "upcast", "few": "upcast", "attention": "fp32"}
    execution = Execution.from_choices(decision.choices)
    assert execution.few_upcast_max_rows == MANY_ROWS - 1 and not execution.transposed_max_rows


def test_attention_is_not_measured_beside_upcast_products(bf16_model, monkeypatch):
    fake_timings(monkeypatch, {
        "many": {"upcast": 10.0, "native": 80.0},
        "few": {"plain": 10.0, "transposed": 1.0, "upcast": 2.0},
        "attention": {"fp32": 50.0, "native": 1.0},
    })  # fmt: skip
    decision = calibrate(bf16_model, rows=4)
    assert decision.choices == {"many": "upcast", "few": "transposed", "attention": "fp32"}
    assert "attention" not in decision.timings_ms


def test_native_bf16_attention_is_no_choice_at_the_default_kernel_level(bf16_model, monkeypatch):
    # torch's bf16 attention at DEFAULT leaves the official bf16 bounds (test_bf16 under make
    # test's level reruns): never forced, listed or calibrated there; fp32 attention of fp32
    # weights is unaffected.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert all(c["attention"] == "fp32" for c in valid_choices(torch.bfloat16))
    assert {"many": "native", "few": "transposed", "attention": "native"} in valid_choices(torch.float32)
    for forced in ("native", "many=native,attention=native"):
        with pytest.raises(ValueError, match="not available at CPU kernel level DEFAULT"):
            parse_choices(forced, torch.bfloat16)
    fake_timings(monkeypatch, {
        "many": {"upcast": 80.0, "native": 10.0},
        "few": {"plain": 10.0, "transposed": 10.0, "upcast": 10.0},
        "attention": {"fp32": 50.0, "native": 1.0},
    })  # fmt: skip
    decision = calibrate(bf16_model, rows=4)
    assert decision.choices == {"many": "native", "few": "plain", "attention": "fp32"}
    assert "attention" not in decision.timings_ms


def test_out_of_budget_choices_keep_their_baseline(bf16_model):
    decision = calibrate(bf16_model, rows=4, budget_s=0)
    assert decision.choices == {name: options[0] for name, options in CHOICES.items()}
    assert decision.timings_ms == {}


def test_a_calibrated_choice_is_remembered_across_restarts(bf16_model, monkeypatch, tmp_path, caplog, native_attention):
    store = tmp_path / "execution.json"
    monkeypatch.setenv(execution_memory.CACHE_ENV, str(store))
    monkeypatch.delenv(EXECUTION_ENV, raising=False)
    fake_timings(monkeypatch, {
        "many": {"upcast": 100.0, "native": 10.0},
        "few": {"plain": 10.0, "transposed": 5.0, "upcast": 6.0},
        "attention": {"fp32": 10.0, "native": 2.0},
    })  # fmt: skip
    with caplog.at_level(logging.INFO, logger="deepseek_vl2.engine.calibration"):
        first = choose_execution(bf16_model, rows=4)
    assert first.source == "calibrated"
    assert first.choices == {"many": "native", "few": "transposed", "attention": "native"}
    assert "many=native (upcast 100.0 ms, native 10.0 ms)" in caplog.text  # the log says why
    record = json.loads(store.read_text())[machine_key(bf16_model, 4)]
    assert record["choices"] == first.choices and record["torch"] == torch.__version__

    # The machine is now in another mood: the remembered decision stands, nothing is measured.
    monkeypatch.setattr(calibration, "_interleaved_ms", lambda *a, **k: pytest.fail("measured again"))
    again = choose_execution(bf16_model, rows=4)
    assert again.source == "remembered" and again.choices == first.choices
    assert again.execution == first.execution
    # Another batch size is another key: it would be measured.
    assert machine_key(bf16_model, 8) != machine_key(bf16_model, 4)


def test_an_unreadable_memory_is_measured_again(bf16_model, monkeypatch, tmp_path):
    store = tmp_path / "execution.json"
    store.write_text("{not json")
    monkeypatch.setenv(execution_memory.CACHE_ENV, str(store))
    decision = choose_execution(bf16_model, "auto", rows=4)
    assert decision.source == "calibrated"
    assert json.loads(store.read_text())[machine_key(bf16_model, 4)]["choices"] == decision.choices


def test_the_default_memory_follows_home_and_an_empty_setting_remembers_nothing(bf16_model, monkeypatch, tmp_path):
    # HOME is set after the module was imported: the default path must follow it.
    real = Path.home() / ".cache" / "deepseek_vl2" / "execution.json"  # the home at import
    untouched = real.read_bytes() if real.is_file() else None
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(execution_memory.CACHE_ENV, raising=False)
    fake_timings(monkeypatch, QUICK)
    expected = home / ".cache" / "deepseek_vl2" / "execution.json"
    assert execution_memory.cache_path() == expected
    assert choose_execution(bf16_model, "auto", rows=4).source == "calibrated"
    assert machine_key(bf16_model, 4) in json.loads(expected.read_text())
    assert {p.name for p in home.rglob("*") if p.is_file()} == {"execution.json", "execution.json.lock"}
    assert choose_execution(bf16_model, "auto", rows=4).source == "remembered"
    assert (real.read_bytes() if real.is_file() else None) == untouched  # and nowhere else

    # Set empty: nothing is remembered anywhere, not even under HOME.
    expected.unlink()
    monkeypatch.setenv(execution_memory.CACHE_ENV, "")
    assert execution_memory.cache_path() is None
    assert choose_execution(bf16_model, "auto", rows=4).source == "calibrated"
    assert not expected.exists()


def test_a_bad_setting_fails_loading_with_its_name(monkeypatch):
    monkeypatch.setenv(EXECUTION_ENV, "turbo")
    with pytest.raises(ValueError, match=f"{EXECUTION_ENV} must be auto, upcast, native"):
        Engine.from_pretrained(CHECKPOINTS / "tiny-mha", dtype=torch.bfloat16, prefix_cache_bytes=0)


def test_a_quantized_model_measures_only_its_dense_products():
    from deepseek_vl2.compute.quantized import QuantizeSpec

    model = DeepseekVL2.from_pretrained(
        CHECKPOINTS / "tiny-mla", dtype=torch.bfloat16, execution="upcast", quantize=QuantizeSpec("int8")
    )
    decision = calibrate(model, rows=4, budget_s=30)
    # Every language-model product is quantized (its own kernel): only the vision tower's many-row
    # products are left to choose for, and no dense stand-in for a quantized weight is made.
    assert "few" not in decision.timings_ms and decision.choices["few"] == "plain"
    assert set(decision.timings_ms["many"]) == {"upcast", "native"}
    # Its quantized products' crossing was measured, from the first row count timed.
    assert decision.dequantize_min_rows in (*calibration.DEQUANTIZE_ROWS_MEASURED, 2 * calibration.DEQUANTIZE_ROWS_MEASURED[-1])
    assert set(decision.timings_ms["dequantize"]) >= {"kernel 32", "dequantized 32"}


def test_quantized_products_dequantize_from_the_measured_crossing_which_is_remembered(monkeypatch, tmp_path, native_attention):
    from deepseek_vl2.compute.quantized import QuantizeSpec

    model = DeepseekVL2.from_pretrained(
        CHECKPOINTS / "tiny-mla", dtype=torch.bfloat16, execution="upcast", quantize=QuantizeSpec("int4")
    )
    monkeypatch.setenv(execution_memory.CACHE_ENV, str(tmp_path / "execution.json"))

    def measured(runs, rounds=3):  # the kernel is slower than dequantizing from 128 rows on
        if not all(name.startswith(("kernel ", "dequantized ")) for name in runs):
            return dict.fromkeys(runs, 1.0)
        rows = int(next(iter(runs)).split()[1])
        return {f"kernel {rows}": float(rows), f"dequantized {rows}": 100.0}

    monkeypatch.setattr(calibration, "_interleaved_ms", measured)
    decision = choose_execution(model, "auto", rows=4)
    assert decision.dequantize_min_rows == 128 and model.execution.dequantize_min_rows == 128
    assert "quantized products dequantize from 128 rows" in decision.summary()
    monkeypatch.setattr(calibration, "_interleaved_ms", lambda *a, **k: pytest.fail("measured again"))
    again = choose_execution(model, "auto", rows=4)
    assert again.source == "remembered" and again.execution == decision.execution
    # The same model unquantized is another key: its decision says nothing of quantized products.
    bf16 = DeepseekVL2.from_pretrained(CHECKPOINTS / "tiny-mla", dtype=torch.bfloat16, execution="upcast")
    assert machine_key(bf16, 4) != machine_key(model, 4)
    # Forced choices are not measured: quantized products take the default crossing.
    assert choose_execution(model, "native").execution.dequantize_min_rows == DEQUANTIZE_MIN_ROWS_CPU


def test_the_key_holds_the_kernel_level_the_attention_shapes_the_batch_and_the_scheme(bf16_model, fp32_model, monkeypatch):
    keys = {"mla": machine_key(bf16_model, 4), "mha": machine_key(fp32_model, 4)}
    assert machine_key(bf16_model, 16) != keys["mla"]
    # The same CPU running another kernel level (ATEN_CPU_CAPABILITY) is another key.
    level = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT" if level != "DEFAULT" else "AVX2")
    assert machine_key(bf16_model, 4) != keys["mla"]
    monkeypatch.undo()
    assert machine_key(bf16_model, 4) == keys["mla"]
    # So is a cap on oneDNN's or MKL's instructions (how tests/kernel_levels.py runs a lower level).
    for name in execution_memory.LIBRARY_ISA_ENVS:
        with monkeypatch.context() as m:
            m.setenv(name, "AVX2" if os.environ.get(name) != "AVX2" else "SSE41")
            assert machine_key(bf16_model, 4) != keys["mla"], name
    # Every shape the attention measurement depends on is in the key, MLA's and MHA's.
    mla = bf16_model.language.model.layers[0].self_attn
    for name in ("heads", "nope", "rope", "rank", "v_dim"):
        with monkeypatch.context() as m:
            m.setattr(mla, name, getattr(mla, name) * 2)
            assert machine_key(bf16_model, 4) != keys["mla"], name
    mha = fp32_model.language.model.layers[0].self_attn
    for name in ("heads", "kv_heads", "head_dim"):
        with monkeypatch.context() as m:
            m.setattr(mha, name, getattr(mha, name) * 2)
            assert machine_key(fp32_model, 4) != keys["mha"], name
    with monkeypatch.context() as m:
        m.setattr(execution_memory, "SCHEME_VERSION", execution_memory.SCHEME_VERSION + 1)
        assert machine_key(bf16_model, 4) != keys["mla"]


@pytest.mark.parametrize("scheme", [None, 1, "mixed"], ids=["no scheme", "older scheme", "scheme not a number"])
def test_a_record_of_another_scheme_is_measured_again(bf16_model, monkeypatch, tmp_path, caplog, scheme):
    store = tmp_path / "execution.json"
    monkeypatch.setenv(execution_memory.CACHE_ENV, str(store))
    fake_timings(monkeypatch, QUICK)
    first = choose_execution(bf16_model, "auto", rows=4)
    key = machine_key(bf16_model, 4)
    record = json.loads(store.read_text())[key]
    # The record says which scheme and kernel level it was measured under.
    assert record["scheme"] == execution_memory.SCHEME_VERSION
    assert record["level"] == execution_memory.kernel_level()
    assert record["level"].split()[0] == torch.backends.cpu.get_cpu_capability()
    assert choose_execution(bf16_model, "auto", rows=4).source == "remembered"
    # The same record, but written by another scheme (or one before schemes): not trusted.
    stale = {"choices": {"many": "native", "few": "transposed", "attention": "native"}, "timings_ms": {}}
    stale |= {} if scheme is None else {"scheme": scheme}
    store.write_text(json.dumps({key: stale}))
    caplog.clear()
    again = choose_execution(bf16_model, "auto", rows=4)
    assert again.source == "calibrated" and again.choices == first.choices
    # An older scheme is no fault (no warning); a scheme that is not a number is one warning.
    assert len(memory_problems(caplog)) == (1 if scheme == "mixed" else 0), caplog.text
    assert json.loads(store.read_text())[key]["scheme"] == execution_memory.SCHEME_VERSION


def spy_rows(monkeypatch) -> dict[str, list[int]]:
    """The rows calibration was asked for, and those its attention and few-row products ran at."""
    seen: dict[str, list[int]] = {"calibrate": [], "attention": [], "few": []}

    def spy(name, function, position):
        def wrapper(*args, **kwargs):
            seen[name].append(args[position])
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(calibration, "calibrate", spy("calibrate", calibration.calibrate, 1))
    monkeypatch.setattr(calibration, "_measure_attention", spy("attention", calibration._measure_attention, 2))
    products = calibration._measure_products
    monkeypatch.setattr(
        calibration, "_measure_products",
        lambda model, choices, name, few_rows: (seen["few"].append(few_rows) if name == "few" else None)
        or products(model, choices, name, few_rows),
    )  # fmt: skip
    return seen


def test_calibration_measures_at_the_batch_the_engine_runs(bf16_model, monkeypatch, native_attention):
    monkeypatch.setenv(execution_memory.CACHE_ENV, "")
    monkeypatch.delenv(MAX_BATCH_ENV, raising=False)
    monkeypatch.setenv(CONCURRENCY_ENV, "16")  # cog.yaml's concurrency: the engine runs 16 rows
    fake_timings(monkeypatch, {**QUICK, "many": {"upcast": 80.0, "native": 10.0}})  # attention is measured
    seen = spy_rows(monkeypatch)
    choose_execution(bf16_model, "auto")
    # Attention at the real batch; few-row products at it within their range (2..MANY_ROWS - 1).
    assert seen == {"calibrate": [16], "attention": [16], "few": [15]}

    seen = spy_rows(monkeypatch)
    monkeypatch.setenv(MAX_BATCH_ENV, "3")  # the engine's own setting wins over the concurrency
    choose_execution(bf16_model, "auto")
    assert seen == {"calibrate": [3], "attention": [3], "few": [3]}

    seen = spy_rows(monkeypatch)
    monkeypatch.delenv(MAX_BATCH_ENV)
    monkeypatch.delenv(CONCURRENCY_ENV)
    choose_execution(bf16_model, "auto")
    assert seen["calibrate"] == [CPU_DEFAULT_MAX_BATCH] == [planned_max_batch(cuda=False)]


def test_the_engine_runs_the_batch_its_model_was_calibrated_at(monkeypatch):

    monkeypatch.setenv(EXECUTION_ENV, "auto")
    monkeypatch.setenv(execution_memory.CACHE_ENV, "")
    monkeypatch.delenv(MAX_BATCH_ENV, raising=False)
    monkeypatch.setenv(CONCURRENCY_ENV, "16")
    asked: list[int] = []
    monkeypatch.setattr(calibration, "calibrate", lambda model, rows, budget_s=0: asked.append(rows) or calibrate(model, rows, 0))
    path = CHECKPOINTS / "tiny-mla"
    with Engine.from_pretrained(path, device="cpu", dtype=torch.float32, prefix_cache_bytes=0) as engine:
        assert asked == [16] and engine.max_batch == 16
    with Engine.from_pretrained(path, device="cpu", dtype=torch.float32, max_batch=2, prefix_cache_bytes=0) as engine:
        assert asked == [16, 2] and engine.max_batch == 2


def memory_problems(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "deepseek_vl2.engine.calibration" and r.levelno >= logging.WARNING]


BAD_MEMORIES = {
    "not JSON": "{not json",
    "not UTF-8": b"\xff\xfe{}",
    "a list": "[1, 2]",
    "a record not an object": "KEY: [1]",
    "choices a list": 'KEY: {"scheme": SCHEME, "choices": ["native"]}',
    "scheme a float": 'KEY: {"scheme": SCHEME.0, "choices": CHOICES}',
    "timings strings": 'KEY: {"scheme": SCHEME, "choices": CHOICES, "timings_ms": {"many": {"native": "fast"}}}',
    "timings a number": 'KEY: {"scheme": SCHEME, "choices": CHOICES, "timings_ms": 3}',
    "rows a string": 'KEY: {"scheme": SCHEME, "choices": CHOICES, "dequantize_min_rows": "128"}',
    "rows a bool": 'KEY: {"scheme": SCHEME, "choices": CHOICES, "dequantize_min_rows": true}',
}


@pytest.mark.parametrize("content", BAD_MEMORIES.values(), ids=BAD_MEMORIES.keys())
def test_a_memory_of_the_wrong_shape_costs_one_warning_and_a_measurement(bf16_model, monkeypatch, tmp_path, caplog, content):
    store = tmp_path / "execution.json"
    monkeypatch.setenv(execution_memory.CACHE_ENV, str(store))
    fake_timings(monkeypatch, QUICK)
    if isinstance(content, str):
        choices = json.dumps(calibration.baseline_choices(bf16_model.dtype))
        content = ("{%s}" % content if content.startswith("KEY") else content)
        content = content.replace("KEY", json.dumps(machine_key(bf16_model, 4)))
        content = content.replace("SCHEME", str(execution_memory.SCHEME_VERSION)).replace("CHOICES", choices).encode()
    store.write_bytes(content)
    with caplog.at_level(logging.INFO):
        decision = choose_execution(bf16_model, "auto", rows=4)
    assert decision.source == "calibrated"
    assert len(memory_problems(caplog)) == 1, caplog.text
    # The file is replaced by a good one: the next start remembers, with no warning.
    caplog.clear()
    assert choose_execution(bf16_model, "auto", rows=4).source == "remembered"
    assert memory_problems(caplog) == []


def test_an_unreadable_or_unusable_memory_costs_one_warning_and_a_measurement(bf16_model, monkeypatch, tmp_path, caplog):
    fake_timings(monkeypatch, QUICK)
    store = tmp_path / "execution.json"
    store.write_text("{}")
    monkeypatch.setenv(execution_memory.CACHE_ENV, str(store))
    read_text = Path.read_text

    def denied(self, *args, **kwargs):  # EACCES (the tests run as root, who may read anything)
        if self == store:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Path, "read_text", denied)
        caplog.clear()
        assert choose_execution(bf16_model, "auto", rows=4).source == "calibrated"
        assert len(memory_problems(caplog)) == 1, caplog.text
        assert "Permission denied" in caplog.text

    # The path is a directory: it cannot be read nor replaced; still one warning.
    directory = tmp_path / "a directory"
    directory.mkdir()
    monkeypatch.setenv(execution_memory.CACHE_ENV, str(directory))
    caplog.clear()
    assert choose_execution(bf16_model, "auto", rows=4).source == "calibrated"
    assert len(memory_problems(caplog)) == 1, caplog.text

    # No home directory known, or one that cannot hold a file.
    monkeypatch.delenv(execution_memory.CACHE_ENV)
    with monkeypatch.context() as m:
        m.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("Could not determine home directory"))))
        caplog.clear()
        assert choose_execution(bf16_model, "auto", rows=4).source == "calibrated"
        assert len(memory_problems(caplog)) == 1 and "home directory" in caplog.text
    monkeypatch.setenv("HOME", "relative/home")
    monkeypatch.chdir(tmp_path)
    caplog.clear()
    assert choose_execution(bf16_model, "auto", rows=4).source == "calibrated"
    assert len(memory_problems(caplog)) == 1 and not (tmp_path / "relative").exists()
    not_a_directory = tmp_path / "home-is-a-file"
    not_a_directory.write_text("")
    monkeypatch.setenv("HOME", str(not_a_directory))
    caplog.clear()
    assert choose_execution(bf16_model, "auto", rows=4).source == "calibrated"
    assert len(memory_problems(caplog)) == 1, caplog.text


WRITER = """
import sys, torch
from deepseek_vl2.engine import execution_memory
from deepseek_vl2.engine.execution_memory import Decision, remember
path, key = execution_memory.Path(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
original = execution_memory._records_on_disk

def slow_read(p):  # both writers read before either replaces, unless the lock orders them
    records = original(p)
    import time; time.sleep(0.5)
    return records

execution_memory._records_on_disk = slow_read
remember(path, key, Decision({"many": "native", "few": "plain", "attention": "native"}, "calibrated"))
"""


def test_two_processes_remembering_at_once_keep_both_records(tmp_path):
    store = tmp_path / "execution.json"
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(store), key])
        for key in ("first", "second")
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    records = json.loads(store.read_text())
    assert set(records) == {"first", "second"}
    assert all(r["scheme"] == execution_memory.SCHEME_VERSION for r in records.values())
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_two_threads_remembering_at_once_keep_both_records(tmp_path):
    store = tmp_path / "execution.json"
    decision = execution_memory.Decision({"many": "native", "few": "plain", "attention": "native"}, "calibrated")
    barrier = threading.Barrier(8)

    def write(key: str) -> None:
        barrier.wait()
        for round_ in range(5):
            execution_memory.remember(store, f"{key}/{round_}", decision)

    threads = [threading.Thread(target=write, args=(f"thread {i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(json.loads(store.read_text())) == {f"thread {i}/{r}" for i in range(8) for r in range(5)}


def test_the_dequantize_crossing_is_the_first_measured_row_count_where_dequantizing_is_no_slower(monkeypatch):
    from deepseek_vl2.compute.quantized import QuantizeSpec

    model = DeepseekVL2.from_pretrained(
        CHECKPOINTS / "tiny-mla", dtype=torch.bfloat16, execution="upcast", quantize=QuantizeSpec("int8")
    )
    layer = model.language.model.layers[-1]
    own = {layer.mlp.experts.w_gate_up.data.data_ptr(), layer.self_attn.o_proj.weight.data.data_ptr()}
    ran: list[tuple[int, int, int]] = []  # (rows, the weight's storage, the execution's crossing)
    linear = Execution.linear

    def recorded(self, x, w, *args, **kwargs):
        ran.append((x.shape[0], w.data.data_ptr(), self.dequantize_min_rows))
        return linear(self, x, w, *args, **kwargs)

    monkeypatch.setattr(Execution, "linear", recorded)
    choices = calibration.baseline_choices(model.dtype)

    def feed(kernel_ms):  # the dequantized product takes 10 ms at every row count
        def measured(runs, rounds=3):
            for run in runs.values():
                run()
            rows = int(next(iter(runs)).split()[1])
            return {f"kernel {rows}": kernel_ms(rows), f"dequantized {rows}": 10.0}

        monkeypatch.setattr(calibration, "_interleaved_ms", measured)

    feed(lambda rows: rows / 20)  # 6.4 ms at 128 rows, 12.8 ms at 256: the crossing is 256
    rows, timings = calibration._measure_dequantize(model, choices)
    assert rows == 256
    assert set(timings) == {f"{way} {r}" for way in ("kernel", "dequantized") for r in (32, 64, 128, 256)}
    # It ran the model's own quantized weights, at each measured row count, both ways.
    assert {p for _, p, _ in ran} == own
    assert {(r, c) for r, _, c in ran} == {(r, c) for r in (32, 64, 128, 256) for c in (0, 1)}

    feed(lambda rows: 10.0)  # as fast: dequantizing is no slower from the first count
    assert calibration._measure_dequantize(model, choices)[0] == 32
    feed(lambda rows: 1.0)  # the kernel always faster: it is used up to twice the last count
    rows, timings = calibration._measure_dequantize(model, choices)
    assert rows == 2 * calibration.DEQUANTIZE_ROWS_MEASURED[-1] == 1024 and len(timings) == 10
