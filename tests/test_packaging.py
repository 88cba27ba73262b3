"""The package as installed outside a checkout: what the wheel carries, and what building it leaves in the tree.

The wheel is built from a copy of the tracked files with setuptools' own backend (what ``pip wheel .`` and
``pip install .`` call), so the test needs no index and leaves the checkout as it was.
"""

from __future__ import annotations

import os
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
    """(the wheel's file names, its entry points, the paths the build added to the source tree, what the build
    wrote to stderr)."""
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
    return (names, entry_points, sorted(name + "/" if (src / name).is_dir() else name for name in added),
            done.stderr)


def test_the_wheel_carries_every_module_and_the_report_templates(built):
    names, entry_points, _, _ = built
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            assert path.relative_to(ROOT).as_posix() in names
    for template in (ROOT / "workflows" / "templates").iterdir():
        assert f"workflows/templates/{template.name}" in names
    assert "fineprune = workflows.cli:main" in entry_points
    # Only the two packages are installed: nothing of the checkout's tests or benchmarks lands in site-packages.
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == set(PACKAGES)


def test_the_build_warns_of_nothing(built):
    """What setuptools warns of builds today and stops building later: a deprecated field (a license as a TOML
    table, which it refuses from the date it names), a directory of package data that is no listed package (which
    it says it will leave out)."""
    *_, stderr = built
    warned = [line for line in stderr.splitlines() if "Warning:" in line]
    assert not warned, stderr[-3000:]


def test_building_the_wheel_leaves_nothing_git_would_pick_up(built):
    """``pip install .`` builds in the source tree; what it leaves there (``build/``, ``*.egg-info``) must be
    ignored, or ``git add -A`` commits it and ``ray job submit --working-dir .`` uploads it."""
    _, _, added, _ = built
    assert added, "the build left nothing in the tree: the test no longer sees what it checks"
    check = subprocess.run(["git", "check-ignore", "--no-index", *added], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode in (0, 1), check.stderr
    missed = set(added) - set(check.stdout.split())
    assert not missed, f"not ignored by .gitignore: {sorted(missed)}"


@pytest.mark.parametrize("layout", ["wheel", "checkout"])
def test_the_cluster_driver_script_reads_the_space_where_the_project_keeps_its_paths(tmp_path, layout):
    """``ray submit`` runs a lone copy of ``workflows/submit.py``. Against an editable install (``make setup``) it
    works from the checkout, as the cluster docs say; against a wheel in site-packages it keeps the caller's working
    directory instead of moving into site-packages, where the space is not and ``runs/`` must not go."""
    installed, caller, lone = tmp_path / "installed", tmp_path / "caller", tmp_path / "lone"
    for package in PACKAGES:
        shutil.copytree(ROOT / package, installed / package, ignore=shutil.ignore_patterns("__pycache__"))
    if layout == "checkout":
        shutil.copy2(ROOT / "pyproject.toml", installed / "pyproject.toml")
    lone.mkdir()
    shutil.copy2(ROOT / "workflows" / "submit.py", lone / "submit.py")
    # The space exists only where the driver should read it; the schema error it gives (no pruning method) shows
    # the file was found and read, and stops the driver before it looks for a cluster.
    where = installed if layout == "checkout" else caller
    (where / "spaces").mkdir(parents=True)
    (where / "spaces" / "space.yaml").write_text("name: lone\nbase: {}\n")
    caller.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(installed)
    done = subprocess.run([sys.executable, str(lone / "submit.py"), "--space", "spaces/space.yaml"], cwd=caller,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "spaces/space.yaml: base.method" in done.stderr, done.stderr[-2000:]
