"""Host memory within the cgroup limit, read from fake /sys/fs/cgroup and /proc trees."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from deepseek_vl2.engine.memory import Memory, read_memory

GIB = 2**30
V1_UNLIMITED = "9223372036854771712"


def fake_tree(
    tmp_path: Path,
    files: dict[str, str],
    proc_cgroup: str = "0::/\n",
    available_gib: float = 20,
    total_gib: float = 24,
) -> tuple[Path, Path]:
    """(cgroup root, proc root) holding `files` (paths relative to the cgroup root) and a meminfo."""
    cgroup, proc = tmp_path / "cgroup", tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    cgroup.mkdir()
    kib = lambda gib: int(gib * GIB) // 1024  # noqa: E731
    (proc / "meminfo").write_text(
        f"MemTotal:       {kib(total_gib)} kB\nMemFree:         1000 kB\nMemAvailable:   {kib(available_gib)} kB\n"
    )
    (proc / "self" / "cgroup").write_text(proc_cgroup)
    for name, text in files.items():
        (cgroup / name).parent.mkdir(parents=True, exist_ok=True)
        (cgroup / name).write_text(text)
    return cgroup, proc


def test_cgroup_v2_limit_leaves_limit_less_usage(tmp_path):
    roots = fake_tree(tmp_path, {"memory.max": f"{8 * GIB}\n", "memory.current": f"{3 * GIB}\n"})
    found = read_memory(*roots)
    assert (found.limit, found.usage) == (8 * GIB, 3 * GIB)
    assert found.available == 5 * GIB
    assert found.describe() == "memory: cgroup limit 8.00 GiB, 5.00 GiB available"


def test_cgroup_v2_in_the_process_own_cgroup_path(tmp_path):
    roots = fake_tree(
        tmp_path,
        {"kubepods/pod1/memory.max": f"{6 * GIB}\n", "kubepods/pod1/memory.current": f"{GIB}\n"},
        proc_cgroup="0::/kubepods/pod1\n",
    )
    assert read_memory(*roots).available == 5 * GIB


def test_the_tighter_of_the_own_and_the_root_cgroup_counts(tmp_path):
    roots = fake_tree(
        tmp_path,
        {
            "memory.max": f"{16 * GIB}\n", "memory.current": f"{GIB}\n",
            "app/memory.max": f"{4 * GIB}\n", "app/memory.current": f"{GIB}\n",
        },
        proc_cgroup="0::/app\n",
    )  # fmt: skip
    assert read_memory(*roots).available == 3 * GIB


def test_the_host_memory_counts_when_it_is_below_what_the_limit_leaves(tmp_path):
    roots = fake_tree(tmp_path, {"memory.max": f"{16 * GIB}\n", "memory.current": "0\n"}, available_gib=2)
    found = read_memory(*roots)
    assert found.limit == 16 * GIB and found.available == 2 * GIB


def test_cgroup_v2_max_is_no_limit(tmp_path):
    roots = fake_tree(tmp_path, {"memory.max": "max\n", "memory.current": f"{3 * GIB}\n"})
    assert read_memory(*roots) == Memory(20 * GIB)
    assert read_memory(*roots).describe() == "memory: no cgroup limit, 20.00 GiB available"


def test_cgroup_v1_limit(tmp_path):
    roots = fake_tree(
        tmp_path,
        {"memory/memory.limit_in_bytes": f"{10 * GIB}\n", "memory/memory.usage_in_bytes": f"{4 * GIB}\n"},
        proc_cgroup="4:memory:/\n0::/\n",
    )
    found = read_memory(*roots)
    assert (found.limit, found.available) == (10 * GIB, 6 * GIB)


def test_cgroup_v1_in_the_process_own_memory_cgroup(tmp_path):
    roots = fake_tree(
        tmp_path,
        {
            "memory/memory.limit_in_bytes": V1_UNLIMITED, "memory/memory.usage_in_bytes": f"{9 * GIB}",
            "memory/docker/abc/memory.limit_in_bytes": f"{3 * GIB}",
            "memory/docker/abc/memory.usage_in_bytes": f"{GIB}",
        },
        proc_cgroup="5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n",
    )  # fmt: skip
    assert read_memory(*roots).available == 2 * GIB


@pytest.mark.parametrize("limit", [V1_UNLIMITED, str(24 * GIB), str(30 * GIB)])
def test_cgroup_v1_limit_at_or_above_physical_memory_is_no_limit(tmp_path, limit):
    roots = fake_tree(
        tmp_path,
        {"memory/memory.limit_in_bytes": limit, "memory/memory.usage_in_bytes": f"{4 * GIB}"},
        proc_cgroup="4:memory:/\n",
    )
    assert read_memory(*roots) == Memory(20 * GIB)


def test_usage_above_the_limit_leaves_nothing(tmp_path):
    roots = fake_tree(tmp_path, {"memory.max": f"{2 * GIB}", "memory.current": f"{3 * GIB}"})
    assert read_memory(*roots).available == 0


def test_missing_files_fall_back_to_mem_available(tmp_path):
    roots = fake_tree(tmp_path, {}, proc_cgroup="0::/gone\n4:memory:/gone\n")
    assert read_memory(*roots) == Memory(20 * GIB)
    assert read_memory(tmp_path / "nothing", roots[1]) == Memory(20 * GIB)


def test_unreadable_or_garbled_files_fall_back_to_mem_available(tmp_path):
    roots = fake_tree(
        tmp_path,
        {"memory.max": "lots\n", "memory/memory.limit_in_bytes": ""},
        proc_cgroup="garbage without colons\n",
    )
    (roots[0] / "app").mkdir()
    (roots[0] / "app" / "memory.max").mkdir()  # a folder: reading it fails with an OSError
    assert read_memory(*roots) == Memory(20 * GIB)


def test_no_meminfo_leaves_the_cgroup_or_nothing(tmp_path):
    cgroup, proc = fake_tree(tmp_path, {"memory.max": f"{8 * GIB}", "memory.current": f"{GIB}"})
    (proc / "meminfo").unlink()
    assert read_memory(cgroup, proc).available == 7 * GIB
    assert read_memory(tmp_path / "none", proc).available is None


def test_the_real_machine_reads_without_error(caplog):
    found = read_memory()
    assert found.available is None or found.available >= 0
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info(found.describe())
    assert caplog.messages[0].startswith("memory: ")
