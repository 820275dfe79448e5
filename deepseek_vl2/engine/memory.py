"""Host memory the process may use: the host's MemAvailable, within the cgroup's memory limit when one
is set (Docker, Kubernetes), where MemAvailable counts memory the container cannot have.

cgroup v2: <root>/<path>/memory.max ("max": no limit) and memory.current, <path> from the `0::/path`
line of /proc/self/cgroup, and the root's own files (a container usually mounts its own cgroup at
/sys/fs/cgroup, while /proc/self/cgroup may name the host's path). cgroup v1: the same under
<root>/memory, from the `N:memory:/path` line; an unlimited v1 limit is a huge number, so any limit
at or above the physical memory counts as none. Where several apply, the tightest one counts.
Unreadable or missing files count as no limit. Nothing here imports the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_ROOT = Path("/proc")


@dataclass(frozen=True)
class Memory:
    host_available: int | None  # MemAvailable in bytes, None where it cannot be read
    limit: int | None = None  # the tightest cgroup limit in bytes, None when there is none
    usage: int = 0  # the usage of the cgroup with that limit

    @property
    def available(self) -> int | None:
        """Bytes the process may still take: MemAvailable, within what the cgroup limit leaves;
        None where neither is known."""
        if self.limit is None:
            return self.host_available
        left = max(self.limit - self.usage, 0)
        return left if self.host_available is None else min(self.host_available, left)

    def describe(self) -> str:
        gib = 2**30
        available = "unknown" if self.available is None else f"{self.available / gib:.2f} GiB"
        if self.limit is None:
            return f"memory: no cgroup limit, {available} available"
        return f"memory: cgroup limit {self.limit / gib:.2f} GiB, {available} available"


def _meminfo(proc_root: Path) -> dict[str, int]:
    """/proc/meminfo's fields in bytes; empty where it cannot be read."""
    try:
        lines = (proc_root / "meminfo").read_text(encoding="ascii").splitlines()
        return {name: int(value.split()[0]) * 1024 for name, value in (line.split(":", 1) for line in lines)}
    except (OSError, ValueError, IndexError):
        return {}


def _read_int(path: Path) -> int | None:
    """The file's number; None for "max", an unreadable or missing file, or anything else."""
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def _own_paths(proc_root: Path) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and v1 memory-controller path, from /proc/self/cgroup."""
    v2 = v1 = None
    try:
        lines = (proc_root / "self" / "cgroup").read_text(encoding="ascii").splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _candidates(cgroup_root: Path, own: str | None) -> list[Path]:
    """The process's own cgroup directory under `cgroup_root` (if named) and the root itself."""
    folders = [cgroup_root]
    if own and own.strip("/"):
        folders.insert(0, cgroup_root / own.strip("/"))
    return folders


def read_memory(cgroup_root: Path = CGROUP_ROOT, proc_root: Path = PROC_ROOT) -> Memory:
    """MemAvailable and the tightest cgroup memory limit (v2 or v1) that applies to this process."""
    meminfo = _meminfo(proc_root)
    host_available = meminfo.get("MemAvailable")
    physical = meminfo.get("MemTotal", 2**60)  # v1's "unlimited" is 2**63 less a page
    v2_path, v1_path = _own_paths(proc_root)
    limits: list[tuple[int, int]] = []  # (limit, usage)
    for folder, limit_file, usage_file in [
        *((f, "memory.max", "memory.current") for f in _candidates(cgroup_root, v2_path)),
        *((f, "memory.limit_in_bytes", "memory.usage_in_bytes") for f in _candidates(cgroup_root / "memory", v1_path)),
    ]:  # fmt: skip
        limit = _read_int(folder / limit_file)
        if limit is None or limit <= 0 or limit >= physical:
            continue
        limits.append((limit, _read_int(folder / usage_file) or 0))
    if not limits:
        return Memory(host_available)
    limit, usage = min(limits, key=lambda lu: lu[0] - lu[1])
    return Memory(host_available, limit, usage)


