"""The import graph of the project's packages has no cycles, and the library never imports the orchestration.

The graph is read from the source (every ``import`` statement, at module level or inside a function), so a cycle
hidden behind a lazy import counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pruning", "workflows")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from package import module` imports the module; `from module import name` imports the module.
            targets = [f"{origin}.{alias.name}" for alias in node.names] + [origin]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target not in PACKAGES:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_reader_sees_imports_of_every_form():
    graph = import_graph()
    assert "pruning.packing" in graph["pruning.checkpoint"]  # from .packing import ...
    assert "pruning.masks" in graph["pruning.checkpoint"]  # from . import masks as mask_lib
    assert "workflows.sweep" in graph["workflows.cli"]
    assert "pruning.config" in graph["workflows.space"]  # from pruning.config import ...


@pytest.mark.parametrize("graph,cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"c2"}, "c2": {"c"}}, ["c", "c2", "c"]),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),
])
def test_find_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_library_never_imports_the_orchestration_ray_or_mlflow():
    for name, path in _modules().items():
        if not name.startswith("pruning"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for imported in names:
                assert imported.split(".")[0] not in ("workflows", "ray", "mlflow"), f"{name} imports {imported}"


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _undeclared_imports(files: dict[str, Path], declared: set[str], local: set[str]) -> list[str]:
    """``name imports top (distribution)`` for each third-party package the files import that no distribution in
    ``declared`` provides (``local``: top-level names of the files' own directory)."""
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                imported = [node.module or ""]
            else:
                continue
            for top in {module.split(".")[0] for module in imported}:
                if top in sys.stdlib_module_names or top in PACKAGES or top in local or top == "__future__":
                    continue
                owners = {_requirement_name(dist) for dist in distributions.get(top, [])}
                assert owners, f"{name} imports {top}, which no installed distribution provides"
                if not owners & declared:
                    undeclared.append(f"{name} imports {top} ({', '.join(sorted(owners))})")
    return sorted(set(undeclared))


def test_every_package_the_code_imports_is_a_declared_dependency():
    """A package imported only because another dependency happens to pull it in breaks an install the day that
    dependency stops pulling it in: everything ``pruning`` and ``workflows`` import is in pyproject's list."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {_requirement_name(requirement) for requirement in project["dependencies"]}
    undeclared = _undeclared_imports(_modules(), declared, set())
    assert not undeclared, "not in pyproject's dependencies: " + "; ".join(undeclared)


def test_every_package_the_tests_import_is_declared_for_them():
    """The same for the tests, against the dependencies plus the ``test`` extra that ``make setup`` installs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {_requirement_name(requirement)
                for requirement in project["dependencies"] + project["optional-dependencies"]["test"]}
    files = {f"tests/{path.name}": path for path in sorted((ROOT / "tests").glob("*.py"))}
    local = {path.stem for path in files.values()}
    undeclared = _undeclared_imports(files, declared, local)
    assert not undeclared, "not in pyproject's test extra: " + "; ".join(undeclared)


def test_the_command_line_starts_without_the_onnx_exporter():
    """Every command imports pruning.export (eval and ask read an exported directory, pack checks for one), but only
    export needs onnx and ONNX Runtime's optimizer and quantizer, a second of every command's start on 2 cores. ONNX
    Runtime itself is loaded by what runs an exported model alone: at its import it writes a device id under the home
    directory, and warns on stderr where there is none (`eval` or `ask` of a PyTorch model under a service account)."""
    import subprocess

    code = ("import sys, workflows.cli, pruning.export; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxruntime.transformers.optimizer', "
            "'onnxruntime.quantization') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout


def _smoke_space(**base: str) -> str:
    import yaml

    space = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text(encoding="utf-8"))
    space["base"].update(base)
    return yaml.safe_dump(space)


_REFUSED_EARLY = {
    "invalid": ("name: bad\nsearch:\n  target_density: {type: uniform, low: 0.9, high: 0.1}\n",
                "search.target_density.low: must be < high (0.9 >= 0.1)"),
    "data-not-here": (_smoke_space(train_data="data/train.json"),
                      "base.train_data: data/train.json: SQuAD data file not found"),
}


@pytest.mark.parametrize("case", sorted(_REFUSED_EARLY))
def test_a_sweep_refused_by_its_space_or_this_machine_is_refused_before_the_sweeps_modules_load(tmp_path, case):
    """`fineprune sweep` of a space with a typo, or naming a path that is not here for the private local Ray its
    trials would run on, imported Ray Tune's driver side, MLflow and the report before it read the space or looked
    for the path: ten seconds on 2 cores to say one line. The space and the machine are checked first; the line and
    exit 2 are as before, and nothing is written."""
    import subprocess

    text, said = _REFUSED_EARLY[case]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    code = ("import sys\nfrom workflows import cli\nstatus = cli.main(['sweep', '--space', sys.argv[1]])\n"
            "print(status, sorted(m for m in ('workflows.sweep', 'mlflow', 'workflows.report') if m in sys.modules))")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "2 []", done.stdout
    assert done.stderr.strip().splitlines()[-1] == f"fineprune sweep: error: {bad}: {said}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
