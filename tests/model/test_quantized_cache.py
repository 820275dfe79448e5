"""Quantized weights kept on disk (deepseek_vl2/model/quantized_cache.py).

- A hit gives the weights a fresh quantization gives, bit for bit (int8 and int4), and skips
  quantizing; a miss writes the file.
- An unusable file (corrupt, truncated, foreign, another format) is one warning, then the weights
  are quantized again and the file rewritten.
- The knob: unset follows HOME, empty turns the cache off.
- int4 is stored in a level-free order: a file written at one CPU kernel level loads right at the
  others (subprocesses), and the stored order is the documented one.
- Writes are atomic: a failed write leaves nothing, two processes starting at once both come up
  right, and temporaries of dead writers are cleared.
- Random weights (benchmarks) have an identity and use the cache too.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kernel_levels import level_settings, native_level, supported_levels
from parity import CHECKPOINTS

from deepseek_vl2 import DeepseekVL2, Engine
from deepseek_vl2.compute import quantized as quantized_module
from deepseek_vl2.compute.quantized import Int4Weight, QuantizeSpec, quantize_int4
from deepseek_vl2.engine.settings import QUANTIZED_CACHE_ENV, default_quantized_cache
from deepseek_vl2.model import quantized_cache
from deepseek_vl2.model.checkpoint import checkpoint_identity
from deepseek_vl2.model.config import DeepseekVL2Config
from deepseek_vl2.model.quantized_cache import cache_file, cache_key, canonical_int4, fill_with_cache
from deepseek_vl2.model.quantized_modules import quantize_model
from deepseek_vl2.model.random_weights import random_weights_identity, randomize_

# int4 is packed per CPU kernel level: run this module under each.
pytestmark = pytest.mark.kernel_level

CHECKPOINT = CHECKPOINTS / "tiny-mla"
MODES = ("int8", "int4")
WORKER = Path(__file__).with_name("quantized_cache_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def load(mode: str, directory: Path | None, checkpoint: Path = CHECKPOINT) -> DeepseekVL2:
    return DeepseekVL2.from_pretrained(
        checkpoint, dtype=torch.bfloat16, quantize=QuantizeSpec(mode), quantized_cache=directory
    )


def assert_same_weights(a: DeepseekVL2, b: DeepseekVL2) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [name for name in sa if not torch.equal(sa[name], sb[name])]
    assert not different, different[:5]


def the_file(mode: str, directory: Path, checkpoint: Path = CHECKPOINT) -> Path:
    return cache_file(directory, checkpoint_identity(checkpoint), QuantizeSpec(mode).name, torch.bfloat16)


@pytest.fixture
def stores(monkeypatch) -> list[int]:
    """Counts the quantizer's stores (each block of rows quantized), int8 and int4."""
    calls = [0]
    for cls in (quantized_module.Int8Weight, quantized_module.Int4Weight):
        original = cls.store_rows

        def counting(self, *args, original=original):
            calls[0] += 1
            return original(self, *args)

        monkeypatch.setattr(cls, "store_rows", counting)
    return calls


@pytest.mark.parametrize("mode", MODES)
def test_a_hit_gives_the_freshly_quantized_weights_and_skips_quantizing(tmp_path, mode, stores):
    fresh = load(mode, None)
    assert fresh.quantized_cache == "off" and stores[0] > 0
    quantizing = stores[0]
    missed = load(mode, tmp_path)
    assert missed.quantized_cache == "miss" and stores[0] == 2 * quantizing
    assert the_file(mode, tmp_path).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [the_file(mode, tmp_path).name]  # no temporary left
    hit = load(mode, tmp_path)
    assert hit.quantized_cache == "hit" and stores[0] == 2 * quantizing  # nothing quantized
    assert_same_weights(hit, fresh)
    assert_same_weights(missed, fresh)
    assert hit.weights_id == fresh.weights_id


def test_the_key_separates_weights_modes_groups_dtypes_and_formats(tmp_path, monkeypatch):
    identity = checkpoint_identity(CHECKPOINT)
    keys = {
        cache_key(weights, spec, dtype)
        for weights in (identity, "other")
        for spec in ("int8", "int4-g128", "int4-g64")
        for dtype in (torch.bfloat16, torch.float32)
    }
    assert len(keys) == 12
    monkeypatch.setattr(quantized_cache, "FORMAT_VERSION", quantized_cache.FORMAT_VERSION + 1)
    assert cache_key(identity, "int8", torch.bfloat16) not in keys
    names = {
        cache_file(tmp_path, identity, spec, dtype).name
        for spec in ("int8", "int4-g128", "int4-g64")
        for dtype in (torch.bfloat16, torch.float32)
    }
    assert len(names) == 6
    assert cache_file(tmp_path, "other", "int8", torch.bfloat16) != cache_file(tmp_path, identity, "int8", torch.bfloat16)


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # one bit in the payload
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def foreign(path: Path) -> None:
    """Another checkpoint's file (same mode and shapes) under this one's name."""
    other = load("int4", path.parent / "other", CHECKPOINTS / "tiny-mla-noaux")
    assert other.quantized_cache == "miss"
    path.write_bytes(the_file("int4", path.parent / "other", CHECKPOINTS / "tiny-mla-noaux").read_bytes())


def other_format(path: Path) -> None:
    path.write_bytes(path.read_bytes().replace(b'"format": 1,', b'"format": 0,', 1))


def garbage(path: Path) -> None:
    path.write_bytes(b"not a cache at all")


@pytest.mark.parametrize("damage", [corrupt, truncate, foreign, other_format, garbage], ids=lambda f: f.__name__)
def test_an_unusable_file_is_one_warning_then_quantized_again(tmp_path, damage, caplog, stores):
    fresh = load("int4", None)
    load("int4", tmp_path)
    path = the_file("int4", tmp_path)
    damage(path)
    damaged = path.read_bytes()
    caplog.clear()
    before = stores[0]
    with caplog.at_level(logging.INFO, logger=quantized_cache.__name__):
        reloaded = load("int4", tmp_path)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unusable" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    assert reloaded.quantized_cache == "miss" and stores[0] > before
    assert_same_weights(reloaded, fresh)
    assert path.read_bytes() != damaged  # rewritten
    assert load("int4", tmp_path).quantized_cache == "hit"


def test_hit_and_miss_are_logged_with_their_time(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger=quantized_cache.__name__):
        load("int8", tmp_path)
        load("int8", tmp_path)
    messages = [r.getMessage() for r in caplog.records]
    assert any("cache miss" in m and " s" in m for m in messages), messages
    assert any("cache hit" in m and " s in all" in m for m in messages), messages


def test_the_knob(tmp_path, monkeypatch):
    home = tmp_path / "home"
    assert default_quantized_cache({"HOME": str(home)}) == home / ".cache" / "deepseek_vl2" / "quantized"
    assert default_quantized_cache({QUANTIZED_CACHE_ENV: "", "HOME": str(home)}) is None
    assert default_quantized_cache({QUANTIZED_CACHE_ENV: str(tmp_path / "q")}) == tmp_path / "q"
    assert default_quantized_cache({"HOME": "relative"}) is None
    # Through the engine: HOME at call time, and empty turns it off.
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DEEPSEEK_VL2_QUANTIZE", "int8")
    monkeypatch.delenv(QUANTIZED_CACHE_ENV)
    for expected in ("miss", "hit"):
        with Engine.from_pretrained(CHECKPOINTS / "tiny-mha", device="cpu", dtype=torch.bfloat16, prefix_cache_bytes=0) as engine:
            assert engine.model.quantized_cache == expected
    assert len(list((home / ".cache" / "deepseek_vl2" / "quantized").iterdir())) == 1
    monkeypatch.setenv(QUANTIZED_CACHE_ENV, "")
    with Engine.from_pretrained(CHECKPOINTS / "tiny-mha", device="cpu", dtype=torch.bfloat16, prefix_cache_bytes=0) as engine:
        assert engine.model.quantized_cache == "off"


def test_int4_is_stored_in_the_documented_level_free_order():
    k = 256
    w = torch.randn(128, k, generator=torch.Generator().manual_seed(0))
    weight = Int4Weight.empty((), 128, k, torch.bfloat16, torch.device("cpu"), 128)
    weight.store((), w)
    q, _, _ = quantize_int4(w, 128, torch.bfloat16)
    expected = (q[:, 0::2] | q[:, 1::2] << 4).to(torch.uint8)
    assert torch.equal(canonical_int4(weight, (), 0, 128), expected)


def run_worker(mode: str, directory: Path, env: dict[str, str], start_at: float | None = None) -> subprocess.Popen:
    args = [sys.executable, str(WORKER), str(CHECKPOINT), mode, str(directory)]
    return subprocess.Popen(
        args + ([str(start_at)] if start_at else []), cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def worker_report(run: subprocess.Popen) -> dict:
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}
    return env | {"OMP_NUM_THREADS": "1"}


def test_an_int4_file_written_at_one_kernel_level_loads_right_at_the_others(tmp_path):
    native = native_level()
    levels = supported_levels(native)
    writer = "avx2" if "avx2" in levels else levels[0]
    written = worker_report(run_worker("int4", tmp_path, base_env() | level_settings(writer, native)))
    assert written == {"level": writer, "state": "miss", "equal": True}
    for level in levels:
        report = worker_report(run_worker("int4", tmp_path, base_env() | level_settings(level, native)))
        assert report == {"level": level, "state": "hit", "equal": True}, report


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_starting_at_once_both_come_up_right(tmp_path, mode):
    start_at = time.time() + 4  # both past their imports by then
    runs = [run_worker(mode, tmp_path, base_env(), start_at) for _ in range(2)]
    reports = [worker_report(run) for run in runs]
    assert all(r["equal"] and r["state"] in ("miss", "hit") for r in reports), reports
    assert [p.name for p in tmp_path.iterdir()] == [the_file(mode, tmp_path).name]
    assert load(mode, tmp_path).quantized_cache == "hit"


def test_a_write_that_fails_midway_leaves_no_file(tmp_path, monkeypatch, caplog):
    def failing(*args):
        yield torch.zeros(10, dtype=torch.uint8)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(quantized_cache, "_chunks", failing)
    with caplog.at_level(logging.WARNING, logger=quantized_cache.__name__):
        model = load("int8", tmp_path)
    assert model.quantized_cache == "miss"
    assert list(tmp_path.iterdir()) == []
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    monkeypatch.undo()
    assert load("int8", tmp_path).quantized_cache == "miss"


def test_temporaries_of_dead_writers_are_cleared(tmp_path):
    import socket

    path = the_file("int8", tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".{path.name}.{socket.gethostname()}.{int(dead.stdout)}.1.abcd.tmp"
    live = tmp_path / f".{path.name}.{socket.gethostname()}.{os.getpid()}.1.abcd.tmp"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    load("int8", tmp_path)
    assert not stale.exists() and live.exists()


def random_model(config: DeepseekVL2Config, mode: str, directory: Path | None, seed: int = 0) -> DeepseekVL2:
    with torch.device("meta"):
        model = DeepseekVL2(config)
    quantize_model(model, QuantizeSpec(mode))
    model.materialize(torch.device("cpu"), torch.bfloat16)
    weights_id = random_weights_identity(config, seed, torch.device("cpu"))
    model.quantized_cache = fill_with_cache(
        model, weights_id, directory, lambda skip: randomize_(model, config, seed=seed, skip_quantized=skip)
    )
    return model


def test_random_weights_use_the_cache_under_their_identity(tmp_path, stores):
    config = DeepseekVL2Config.from_pretrained(CHECKPOINT)
    fresh = random_model(config, "int4", None)
    assert [random_model(config, "int4", tmp_path).quantized_cache for _ in range(2)] == ["miss", "hit"]
    quantizing = stores[0]
    hit = random_model(config, "int4", tmp_path)
    assert hit.quantized_cache == "hit" and stores[0] == quantizing
    assert_same_weights(hit, fresh)
    assert hit.weights_id == fresh.weights_id == random_weights_identity(config, 0, torch.device("cpu"))
    # Another seed is other weights: a miss, and different values.
    other = random_model(config, "int4", tmp_path, seed=1)
    assert other.quantized_cache == "miss" and other.weights_id != fresh.weights_id
    # The unquantized tensors are the same whether or not the quantized ones were drawn.
    plain = random_model(config, "none", None)
    assert torch.equal(plain.language.model.embed_tokens.weight, hit.language.model.embed_tokens.weight)
