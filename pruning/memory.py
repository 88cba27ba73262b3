"""How much memory this process can still take: the machine's, within its container's limit.

A process in a container (a Kubernetes pod, ``docker run --memory``, a Ray worker with a memory limit) sees the whole
host's memory in ``/proc/meminfo``; its cgroup's limit is what ends it, killed by the kernel rather than told.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available_memory", "cgroup_room"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned 63-bit number; anything this large is none.
_UNLIMITED = 1 << 60


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int:
    """``key``'s value in a cgroup's ``memory.stat`` (0 where it is not there)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def cgroup_room(root: Path | None = None) -> int | None:
    """Bytes this process's memory cgroup still allows: its limit less what it uses (less the page cache it can drop,
    its inactive files, as ``docker stats`` counts), or None where no limit is set (or none can be read).

    ``root``: where the cgroup filesystem is mounted (default :data:`CGROUP_ROOT`; a container sees its own cgroup
    there): v2's ``memory.max`` and ``memory.current``, else v1's ``memory/memory.limit_in_bytes`` and
    ``memory/memory.usage_in_bytes``.
    """
    root = CGROUP_ROOT if root is None else root
    for limit_file, usage_file, stat_key in (("memory.max", "memory.current", "inactive_file"),
                                             ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                              "total_inactive_file")):
        limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
        if usage is None:
            continue
        if limit is None or limit >= _UNLIMITED:  # v2 writes "max"
            return None
        used = max(0, usage - _stat(root / Path(limit_file).parent / "memory.stat", stat_key))
        return max(0, limit - used)
    return None


def available_memory() -> int | None:
    """Bytes of memory this process can take now without swapping or being killed: the machine's (Linux's
    MemAvailable, else the free pages), or its cgroup's room where that is less (:func:`cgroup_room`); None where
    neither says."""
    machine = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                machine = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if machine is None:
        try:
            machine = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            pass
    room = cgroup_room()
    known = [value for value in (machine, room) if value is not None]
    return min(known) if known else None
