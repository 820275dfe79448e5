"""torch's CPU kernel levels that this machine can run, and the settings that run a process at one.

torch picks its own CPU kernels, and even the layout of packed weights, per level
(ATEN_CPU_CAPABILITY), and a process may be forced down to any level its CPU supports: one machine
can check every level up to its own. `make test` reruns the tests marked `kernel_level` under each
level this prints with `--others`.

The level alone does not make a lower machine: oneDNN (bf16 products and attention) and MKL (fp32
products) choose their instructions from the hardware. On a CPU with AMX, torch's bf16 attention
at level avx2 still asks oneDNN for AMX packing and fails ("pack_vnni2 is only supported when
avx512 is supported"), which no real AVX2 machine does. So each level caps those two libraries at
the same instructions, and the rerun sees what a machine of that level computes.

    python tests/kernel_levels.py            # the settings of every level this CPU runs, one a line
    python tests/kernel_levels.py --others   # those other than the level in use
"""

from __future__ import annotations

import os
import subprocess
import sys

LEVEL_ENV = "ATEN_CPU_CAPABILITY"
# x86-64 levels, lowest first, with the caps that make oneDNN and MKL behave as on such a CPU
# (none at the highest level: the machine's own). Other architectures have only `default`
# besides their own.
X86_LEVELS: dict[str, dict[str, str]] = {
    "default": {"ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {},
}


def native_level() -> str:
    """The level torch picks on this CPU when nothing forces one, in lower case. Asked of a fresh
    interpreter, since the level in use is fixed when torch loads."""
    env = {name: value for name, value in os.environ.items() if name != LEVEL_ENV}
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().lower()


def supported_levels(native: str) -> list[str]:
    """Every level up to `native`, lowest first."""
    if native in X86_LEVELS:
        names = list(X86_LEVELS)
        return names[: names.index(native) + 1]
    return ["default"] if native == "default" else ["default", native]


def level_settings(level: str, native: str) -> dict[str, str]:
    """The environment that runs a process at `level` as a CPU of that level would: the level
    itself and, below the machine's own, the library caps."""
    caps = X86_LEVELS.get(level, {}) if level != native else {}
    return {LEVEL_ENV: level} | caps


def level_in_use() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability().lower()


if __name__ == "__main__":
    native = native_level()
    levels = supported_levels(native)
    if sys.argv[1:] == ["--others"]:
        levels = [level for level in levels if level != level_in_use()]
    for level in levels:
        print(" ".join(f"{name}={value}" for name, value in level_settings(level, native).items()))
