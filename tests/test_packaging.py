"""The package as installed outside a checkout: what the wheel carries, and what building it leaves in the tree.

The wheel is built from a copy of the tracked files with setuptools' own backend (what ``pip wheel .`` and
``pip install .`` call), so the test needs no index and leaves the checkout as it was.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pruning", "workflows")


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(the wheel's file names, its entry points, the paths the build added to the source tree)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in _tracked_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    before = {p.relative_to(src).as_posix() for p in src.rglob("*")}
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = out / done.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    # The top-level paths the build added, a directory's with its slash (as .gitignore patterns tell them apart).
    added = {name.split("/")[0] for name in {p.relative_to(src).as_posix() for p in src.rglob("*")} - before}
    return names, entry_points, sorted(name + "/" if (src / name).is_dir() else name for name in added)


def test_the_wheel_carries_every_module_and_the_report_templates(built):
    names, entry_points, _ = built
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            assert path.relative_to(ROOT).as_posix() in names
    for template in (ROOT / "workflows" / "templates").iterdir():
        assert f"workflows/templates/{template.name}" in names
    assert "fineprune = workflows.cli:main" in entry_points
    # Only the two packages are installed: nothing of the checkout's tests or benchmarks lands in site-packages.
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == set(PACKAGES)


def test_building_the_wheel_leaves_nothing_git_would_pick_up(built):
    """``pip install .`` builds in the source tree; what it leaves there (``build/``, ``*.egg-info``) must be
    ignored, or ``git add -A`` commits it and ``ray job submit --working-dir .`` uploads it."""
    _, _, added = built
    assert added, "the build left nothing in the tree: the test no longer sees what it checks"
    check = subprocess.run(["git", "check-ignore", "--no-index", *added], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode in (0, 1), check.stderr
    missed = set(added) - set(check.stdout.split())
    assert not missed, f"not ignored by .gitignore: {sorted(missed)}"
