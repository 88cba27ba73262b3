"""The memory a process can take: the machine's, within its container's cgroup limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from pruning import memory
from pruning.memory import available_memory, cgroup_room

GiB = 2**30


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_cgroup_v2_limit_leaves_its_limit_less_what_it_uses_but_the_cache_it_can_drop(tmp_path):
    root = _write(tmp_path, {"memory.max": f"{8 * GiB}\n", "memory.current": f"{5 * GiB}\n",
                             "memory.stat": f"anon {3 * GiB}\nfile {2 * GiB}\ninactive_file {GiB}\n"})
    assert cgroup_room(root) == 4 * GiB  # 8 - (5 - 1)
    (root / "memory.stat").unlink()  # nothing to drop known: all of the use counts
    assert cgroup_room(root) == 3 * GiB
    (root / "memory.current").write_text(f"{9 * GiB}\n")  # past the limit (in reclaim): no room, not a negative one
    assert cgroup_room(root) == 0


def test_a_cgroup_v1_limit_is_read_from_its_memory_controller(tmp_path):
    root = _write(tmp_path, {"memory/memory.limit_in_bytes": f"{16 * GiB}\n",
                             "memory/memory.usage_in_bytes": f"{6 * GiB}\n",
                             "memory/memory.stat": f"cache {4 * GiB}\ntotal_inactive_file {2 * GiB}\n"})
    assert cgroup_room(root) == 12 * GiB


@pytest.mark.parametrize("files", [
    {"memory.max": "max\n", "memory.current": "123\n"},  # v2 without a limit
    {"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "123\n"},  # v1's none
    {},  # no cgroup filesystem
    {"memory.max": "garbled\n", "memory.current": "123\n"},
])
def test_no_cgroup_limit_leaves_no_room_to_report(tmp_path, files):
    assert cgroup_room(_write(tmp_path, files)) is None


def test_the_memory_available_is_the_smaller_of_the_machine_s_and_the_cgroup_s(tmp_path, monkeypatch):
    machine = available_memory()
    assert machine is not None and machine > 0
    root = _write(tmp_path, {"memory.max": f"{GiB}\n", "memory.current": f"{GiB // 4}\n"})
    monkeypatch.setattr(memory, "CGROUP_ROOT", root)
    assert available_memory() == min(machine, 3 * GiB // 4)
    (root / "memory.max").write_text(f"{1 << 50}\n")  # a limit far above the machine's memory: the machine's counts
    assert abs(available_memory() - machine) < machine / 2  # give or take what other processes took meanwhile
