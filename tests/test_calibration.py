"""Execution choices per machine: forced, calibrated with a clear margin, remembered across
restarts, refused with a message when malformed."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from deepseek_vl2 import DeepseekVL2
from deepseek_vl2 import calibration
from deepseek_vl2.calibration import MARGIN, calibrate, choose_execution, machine_key
from deepseek_vl2.execution import (
    CHOICES, DEQUANTIZE_MIN_ROWS_CPU, EXECUTION_ENV, Execution, describe, parse_choices, valid_choices,
)  # fmt: skip
from parity import CHECKPOINTS


@pytest.fixture(scope="module")
def bf16_model() -> DeepseekVL2:
    return DeepseekVL2.from_pretrained(CHECKPOINTS / "tiny-mla", dtype=torch.bfloat16, execution="upcast")


@pytest.fixture(scope="module")
def fp32_model() -> DeepseekVL2:
    return DeepseekVL2.from_pretrained(CHECKPOINTS / "tiny-mha", dtype=torch.float32, execution="upcast")


def test_presets_and_lists_name_every_choice():
    assert parse_choices("auto", torch.bfloat16) is None and parse_choices("", torch.bfloat16) is None
    assert parse_choices("upcast", torch.bfloat16) == {"many": "upcast", "few": "plain", "attention": "fp32"}
    assert parse_choices("native", torch.bfloat16) == {"many": "native", "few": "plain", "attention": "native"}
    # fp32 weights keep their transposed few-row products unless told otherwise
    assert parse_choices("upcast", torch.float32)["few"] == "transposed"
    assert parse_choices(" many=native, few=transposed ", torch.bfloat16) == {
        "many": "native", "few": "transposed", "attention": "fp32",
    }  # fmt: skip
    for bad in ("fast", "many=quick", "tiles=native", "many=upcast,attention=native"):
        with pytest.raises(ValueError, match=EXECUTION_ENV):
            parse_choices(bad, torch.bfloat16)


def test_every_valid_choice_maps_to_its_execution():
    assert len(valid_choices()) == 6  # 2 x 2 x 2, less upcast products with native attention
    for choices in valid_choices():
        e = Execution.from_choices(choices)
        assert (e.upcast_min_rows > 0) == (choices["many"] == "upcast")
        assert (e.transposed_max_rows > 1) == (choices["few"] == "transposed")
        assert e.fp32_attention == (choices["attention"] == "fp32")
        assert parse_choices(describe(choices), torch.bfloat16) == choices


def test_a_forced_choice_is_applied_to_every_module(bf16_model):
    decision = bf16_model.choose_execution("native")
    assert decision.source == "forced" and decision.choices["many"] == "native"
    experts = bf16_model.language.model.layers[-1].mlp.experts
    assert experts.execution == bf16_model.execution == decision.execution
    assert not decision.execution.upcast_min_rows and not decision.execution.fp32_attention
    bf16_model.choose_execution("upcast")
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
        "few": {"plain": 10.0, "transposed": 10 * just_faster},  # noise: stay
        "attention": {"fp32": 5.0, "native": 50.0},  # slower: stay
    })  # fmt: skip
    decision = calibrate(bf16_model, rows=4)
    assert decision.choices == {"many": "native", "few": "plain", "attention": "fp32"}


def test_attention_is_not_measured_beside_upcast_products(bf16_model, monkeypatch):
    fake_timings(monkeypatch, {
        "many": {"upcast": 10.0, "native": 80.0},
        "few": {"plain": 10.0, "transposed": 1.0},
        "attention": {"fp32": 50.0, "native": 1.0},
    })  # fmt: skip
    decision = calibrate(bf16_model, rows=4)
    assert decision.choices == {"many": "upcast", "few": "transposed", "attention": "fp32"}
    assert "attention" not in decision.timings_ms


def test_out_of_budget_choices_keep_their_baseline(bf16_model):
    decision = calibrate(bf16_model, rows=4, budget_s=0)
    assert decision.choices == {name: options[0] for name, options in CHOICES.items()}
    assert decision.timings_ms == {}


def test_a_calibrated_choice_is_remembered_across_restarts(bf16_model, monkeypatch, tmp_path, caplog):
    store = tmp_path / "execution.json"
    monkeypatch.setenv(calibration.CACHE_ENV, str(store))
    monkeypatch.delenv(EXECUTION_ENV, raising=False)
    fake_timings(monkeypatch, {
        "many": {"upcast": 100.0, "native": 10.0},
        "few": {"plain": 10.0, "transposed": 5.0},
        "attention": {"fp32": 10.0, "native": 2.0},
    })  # fmt: skip
    with caplog.at_level(logging.INFO, logger="deepseek_vl2.calibration"):
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
    monkeypatch.setenv(calibration.CACHE_ENV, str(store))
    decision = choose_execution(bf16_model, "auto", rows=4)
    assert decision.source == "calibrated"
    assert json.loads(store.read_text())[machine_key(bf16_model, 4)]["choices"] == decision.choices


def test_an_empty_cache_setting_remembers_nothing(bf16_model, monkeypatch, tmp_path):
    monkeypatch.setenv(calibration.CACHE_ENV, "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert calibration.cache_path() is None
    assert choose_execution(bf16_model, "auto", rows=4).source == "calibrated"
    assert list(tmp_path.iterdir()) == []


def test_a_bad_setting_fails_loading_with_its_name(monkeypatch):
    monkeypatch.setenv(EXECUTION_ENV, "turbo")
    with pytest.raises(ValueError, match=f"{EXECUTION_ENV} must be auto, upcast, native"):
        DeepseekVL2.from_pretrained(CHECKPOINTS / "tiny-mha", dtype=torch.bfloat16)


def test_a_quantized_model_measures_only_its_dense_products():
    from deepseek_vl2.quantize import QuantizeSpec

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


def test_quantized_products_dequantize_from_the_measured_crossing_which_is_remembered(monkeypatch, tmp_path):
    from deepseek_vl2.quantize import QuantizeSpec

    model = DeepseekVL2.from_pretrained(
        CHECKPOINTS / "tiny-mla", dtype=torch.bfloat16, execution="upcast", quantize=QuantizeSpec("int4")
    )
    monkeypatch.setenv(calibration.CACHE_ENV, str(tmp_path / "execution.json"))

    def measured(runs, rounds=3):  # the kernel is slower than dequantizing from 128 rows on
        if not all(name.startswith(("kernel ", "dequantized ")) for name in runs):
            return dict.fromkeys(runs, 1.0)
        rows = int(next(iter(runs)).split()[1])
        return {f"kernel {rows}": float(rows), f"dequantized {rows}": 100.0}

    monkeypatch.setattr(calibration, "_interleaved_ms", measured)
    decision = model.choose_execution("auto", rows=4)
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
