"""How much memory this process can still take: the machine's, within its container's limit.

A process in a container (a Kubernetes pod, ``docker run --memory``) or in a cgroup of its own (``systemd-run -p
MemoryMax=``, a batch scheduler's job) sees the whole host's memory in ``/proc/meminfo``; its cgroup's limit, or an
enclosing one's, is what ends it, killed by the kernel rather than told.
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


_CONTROLLERS = (  # (version, where its hierarchy is mounted under the root, limit, usage, drop-able cache key)
    ("v2", ".", "memory.max", "memory.current", "inactive_file"),
    ("v1", "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
)


def _own_paths(own: Path) -> dict[str, str]:
    """This process's cgroup in each hierarchy, from ``/proc/self/cgroup`` (``0::/path`` for v2,
    ``N:memory:/path`` for v1's memory controller)."""
    paths: dict[str, str] = {}
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            paths["v2"] = path
        elif "memory" in controllers.split(","):
            paths["v1"] = path
    return paths


def _directories(base: Path, path: str | None) -> list[Path]:
    """The cgroup directories whose limits bind a process in ``path`` of the hierarchy mounted at ``base``: its own
    and every enclosing one there is, and ``base`` itself (a container sees its own cgroup there, whatever the path
    says)."""
    found = [base]
    if path:
        directory = base / path.strip("/")
        while directory != base and base in directory.parents:
            if directory.is_dir():
                found.append(directory)
            directory = directory.parent
    return found


def _room_in(directory: Path, limit_file: str, usage_file: str, cache_key: str) -> int | None:
    limit, usage = _read_int(directory / limit_file), _read_int(directory / usage_file)
    if usage is None or limit is None or limit >= _UNLIMITED:  # v2 writes "max"
        return None
    used = max(0, usage - _stat(directory / "memory.stat", cache_key))
    return max(0, limit - used)


def cgroup_room(root: Path | None = None, own: Path | None = None) -> int | None:
    """Bytes this process's memory cgroups still allow: the least, over its own cgroup and those enclosing it, of a
    limit less what that cgroup uses (less the page cache it can drop, its inactive files, as ``docker stats``
    counts), or None where no limit is set (or none can be read).

    ``root``: where the cgroup filesystem is mounted (default :data:`CGROUP_ROOT`; a container sees its own cgroup
    there): v2's ``memory.max`` and ``memory.current``, and v1's ``memory/memory.limit_in_bytes`` and
    ``memory/memory.usage_in_bytes``. ``own``: the process's ``/proc/self/cgroup``, which names its cgroup below it.
    """
    root = CGROUP_ROOT if root is None else root
    paths = _own_paths(Path("/proc/self/cgroup") if own is None else own)
    rooms = [room for version, mount, *files in _CONTROLLERS
             for directory in _directories(root / mount, paths.get(version))
             if (room := _room_in(directory, *files)) is not None]
    return min(rooms, default=None)


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
