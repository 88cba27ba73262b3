"""The memory a process can take: the machine's, within its container's cgroup limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from pruning import memory
from pruning.memory import available_memory, cgroup_room

GiB = 2**30
NONE = Path("/nonexistent/cgroup")  # a /proc/self/cgroup that names no cgroup below the root


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_cgroup_v2_limit_leaves_its_limit_less_what_it_uses_but_the_cache_it_can_drop(tmp_path):
    root = _write(tmp_path, {"memory.max": f"{8 * GiB}\n", "memory.current": f"{5 * GiB}\n",
                             "memory.stat": f"anon {3 * GiB}\nfile {2 * GiB}\ninactive_file {GiB}\n"})
    assert cgroup_room(root, NONE) == 4 * GiB  # 8 - (5 - 1)
    (root / "memory.stat").unlink()  # nothing to drop known: all of the use counts
    assert cgroup_room(root, NONE) == 3 * GiB
    (root / "memory.current").write_text(f"{9 * GiB}\n")  # past the limit (in reclaim): no room, not a negative one
    assert cgroup_room(root, NONE) == 0


def test_a_cgroup_v1_limit_is_read_from_its_memory_controller(tmp_path):
    root = _write(tmp_path, {"memory/memory.limit_in_bytes": f"{16 * GiB}\n",
                             "memory/memory.usage_in_bytes": f"{6 * GiB}\n",
                             "memory/memory.stat": f"cache {4 * GiB}\ntotal_inactive_file {2 * GiB}\n"})
    assert cgroup_room(root, NONE) == 12 * GiB


@pytest.mark.parametrize("files", [
    {"memory.max": "max\n", "memory.current": "123\n"},  # v2 without a limit
    {"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "123\n"},  # v1's none
    {},  # no cgroup filesystem
    {"memory.max": "garbled\n", "memory.current": "123\n"},
])
def test_no_cgroup_limit_leaves_no_room_to_report(tmp_path, files):
    assert cgroup_room(_write(tmp_path, files), NONE) is None


def test_the_process_s_own_cgroup_and_those_enclosing_it_bind_it_too(tmp_path):
    """Without a cgroup namespace (``systemd-run``, a batch scheduler), the root of the mount is the host's, and the
    process's limit is on its own cgroup, or an enclosing one, which ``/proc/self/cgroup`` names."""
    own = tmp_path / "self_cgroup"
    own.write_text("0::/jobs.slice/job-7\n")
    root = _write(tmp_path / "v2", {"memory.max": "max\n", "memory.current": f"{40 * GiB}\n",
                                    "jobs.slice/memory.max": f"{4 * GiB}\n",
                                    "jobs.slice/memory.current": f"{3 * GiB}\n",
                                    "jobs.slice/job-7/memory.max": "max\n",
                                    "jobs.slice/job-7/memory.current": f"{GiB}\n"})
    assert cgroup_room(root, own) == GiB  # the enclosing slice's 4 GiB, 3 of them used
    (root / "jobs.slice" / "job-7" / "memory.max").write_text(f"{GiB + GiB // 2}\n")
    assert cgroup_room(root, own) == GiB // 2  # its own, tighter
    assert cgroup_room(root, NONE) is None  # the root alone sets no limit
    own.write_text("12:cpu,cpuacct:/x\n4:memory:/batch/42\n0::/\n")  # v1's memory controller
    root = _write(tmp_path / "v1", {"memory/memory.limit_in_bytes": "9223372036854771712\n",
                                    "memory/memory.usage_in_bytes": f"{9 * GiB}\n",
                                    "memory/batch/42/memory.limit_in_bytes": f"{2 * GiB}\n",
                                    "memory/batch/42/memory.usage_in_bytes": f"{GiB}\n"})
    assert cgroup_room(root, own) == GiB
    own.write_text("4:memory:/docker/abc\n")  # a container's own cgroup mounted at the root: the path is not there
    root = _write(tmp_path / "c", {"memory/memory.limit_in_bytes": f"{3 * GiB}\n",
                                   "memory/memory.usage_in_bytes": f"{GiB}\n"})
    assert cgroup_room(root, own) == 2 * GiB


def test_the_memory_available_is_the_smaller_of_the_machine_s_and_the_cgroup_s(tmp_path, monkeypatch):
    machine = available_memory()
    assert machine is not None and machine > 0
    root = _write(tmp_path, {"memory.max": f"{GiB}\n", "memory.current": f"{GiB // 4}\n"})
    monkeypatch.setattr(memory, "CGROUP_ROOT", root)
    assert available_memory() == min(machine, 3 * GiB // 4)
    (root / "memory.max").write_text(f"{1 << 50}\n")  # a limit far above the machine's memory: the machine's counts
    assert abs(available_memory() - machine) < machine / 2  # give or take what other processes took meanwhile
