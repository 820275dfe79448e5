"""Remembered execution decisions: what calibration (calibration.py) decided for a machine, kept on
disk (DEEPSEEK_VL2_EXECUTION_CACHE) under a key of everything that makes it valid (machine_key), so
that a restarted server makes the same choice without measuring again, and a seeded answer does not
change with the machine's mood.

The key holds the calibration scheme, the CPU model and feature flags, the kernel level torch runs
(ATEN_CPU_CAPABILITY, and caps on oneDNN's and MKL's instructions), the torch version, its thread
count, the model's dtype, quantization, product and attention shapes, and the batch measured at.
A memory that cannot be read or written costs one warning and a fresh measurement, never the setup;
servers starting together each add their record to the file without losing the other's.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..compute.execution import CHOICES, Execution, describe

if TYPE_CHECKING:
    from ..model.model import DeepseekVL2

log = logging.getLogger(__name__)

CACHE_ENV = "DEEPSEEK_VL2_EXECUTION_CACHE"
DEFAULT_CACHE_UNDER_HOME = Path(".cache") / "deepseek_vl2" / "execution.json"
# The calibration scheme: what is measured, on which shapes, and how it is decided. Bump it whenever
# any of that changes (the measured products or attention, their shapes or rows, MARGIN, the
# options, the record's fields, what machine_key holds), so that records of an older scheme are
# measured again instead of trusted. 2: kernel level, attention shapes and the engine's batch in
# the key; the scheme and level in the record. 3: few-row products gain the `upcast` option.
SCHEME_VERSION = 3


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
