"""Sweeps on a Ray cluster: ``cluster.yaml`` checks, and the smoke sweep submitted as a Ray job to a two-node
cluster (token authentication on, an MLflow tracking server, shared checkpoint storage) started on one machine.

Every process the two-node test starts is stopped by process id in the fixture's teardown, also when the test
fails: never a machine-wide ``ray stop``, which would also end other Ray clusters on the same machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import MlflowServer, processes_mentioning

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
BIN = Path(sys.executable).parent  # the environment's console scripts: ray, mlflow, fineprune

# Head-only tools the cluster installs besides the project (AWS autoscaler and S3 artifacts, Postgres store).
CLUSTER_ONLY_PACKAGES = {"boto3", "psycopg2-binary"}


# --------------------------------------------------------------------------------------------------------------
# cluster.yaml
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))


_SEPARATORS = {"&&", "||", ";", ";;", "|", "&", "(", ")"}
_REDIRECTIONS = {">", ">>", "<", ">&", "<&", "&>", ">|"}
_PREFIXES = {"sudo", "exec", "setsid", "if", "then", "else", "do", "!", "{", "}"}


def _simple_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell command line, as argument lists.

    Split at control operators, without redirections, leading ``sudo``/``exec``/``setsid`` or variable
    assignments; the script of a ``bash -c`` and each line ``echo`` writes (into ``~/.bashrc``) are parsed too.
    """
    # A command substitution $( ... ) is one word here, whatever quotes and parentheses it holds.
    substitutions: list[str] = []
    text, i = "", 0
    while i < len(line):
        if line.startswith("$(", i):
            depth, j = 0, i + 1
            while True:
                depth += {"(": 1, ")": -1}.get(line[j], 0)
                if depth == 0:
                    break
                j += 1
            substitutions.append(line[i:j + 1])
            text += f"\0{len(substitutions) - 1}\0"
            i = j + 1
        else:
            text += line[i]
            i += 1
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = [re.sub("\0(\\d+)\0", lambda m: substitutions[int(m.group(1))], token) for token in lexer]
    commands, current, i = [], [], 0
    while i < len(tokens):
        if tokens[i] in _REDIRECTIONS:
            if current and current[-1].isdigit():  # 2> ...: the descriptor goes with the redirection
                current.pop()
            i += 2
            continue
        if tokens[i] in _SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(tokens[i])
        i += 1
    commands.append(current)
    out = []
    for argv in commands:
        while argv and (argv[0] in _PREFIXES or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0])):
            argv = argv[1:]
        if not argv:
            continue
        out.append(argv)
        if argv[0] in ("bash", "sh") and "-c" in argv:
            out += _simple_commands(argv[argv.index("-c") + 1])
        if argv[0] == "echo":
            for text in argv[1:]:
                out += _simple_commands(text)
    return out


def _commands(config: dict, *keys: str) -> list[list[str]]:
    """Every simple command of the config's command lists ``keys``, in order."""
    return [argv for key in keys for line in config.get(key) or [] for argv in _simple_commands(line)]


def _options(argv: list[str]) -> dict[str, str | bool]:
    """``--name value`` and ``--name=value`` options of a command (``True`` for a flag)."""
    options: dict[str, str | bool] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        name, equals, value = arg.partition("=")
        if equals:
            options[name] = value
        elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            options[name] = argv[i + 1]
        else:
            options[name] = True
    return options


def _the_command(commands: list[list[str]], *words: str) -> list[str]:
    """The one command that starts with ``words``."""
    found = [argv for argv in commands if argv[:len(words)] == list(words)]
    assert len(found) == 1, f"{' '.join(words)}: {len(found)} commands"
    return found[0]


def _exports(config: dict, key: str) -> dict[str, str]:
    """The variables the command list ``key`` exports (into ``~/.bashrc``): name -> value as written."""
    return dict(arg.split("=", 1) for argv in _commands(config, key) if argv[0] == "export" for arg in argv[1:])


def _pip_installs(argv: list[str]) -> set[str] | None:
    """The requirement names a ``pip install`` (or ``python -m pip install``) command installs; None for others."""
    if "pip" not in argv or argv[argv.index("pip") + 1:argv.index("pip") + 2] != ["install"]:
        return None
    return {_requirement_name(arg) for arg in argv[argv.index("pip") + 2:] if not arg.startswith("-")}


def _makefile_install_steps() -> list[list[str]]:
    """The arguments of each ``pip install`` in the Makefile's setup recipe, in order, without ``--quiet``."""
    lines = (REPO / "Makefile").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("$(STAMP):"))
    steps = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        if "pip install" in line:
            steps.append([arg for arg in shlex.split(line.split("pip install", 1)[1]) if arg != "--quiet"])
    return steps


def _requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].strip().lower()


def test_cluster_yaml_is_a_valid_ray_cluster_config(cluster_config):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text(encoding="utf-8"))
    jsonschema.validate(cluster_config, schema)  # what `ray up` checks first
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert cluster_config.get(key), key
    assert cluster_config["provider"]["type"] == "aws"


def test_the_guides_on_premises_config_is_one_ray_takes_with_each_key_once(tmp_path):
    """docs/cluster.md makes cluster-onprem.yaml from cluster.yaml by replacing a range of its keys with a block
    that starts with `cluster_name`; replacing from `max_workers` left the AWS `cluster_name` above it, so the file
    named the cluster twice (YAML readers that refuse a repeated key refuse it; Ray took the last one)."""
    from pruning.config import read_yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    guide = (REPO / "docs" / "cluster.md").read_text(encoding="utf-8")
    section = guide.split("## On your own machines", 1)[1].split("\n## ", 1)[0]
    first, last = re.search(r"Replace everything from `([a-z_]+)` through `([a-z_]+)`", section).groups()
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    lines = CLUSTER_YAML.read_text(encoding="utf-8").splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{first}:"))
    end = next(i for i, line in enumerate(lines) if line.startswith(f"{last}:"))
    onprem = tmp_path / "cluster-onprem.yaml"
    onprem.write_text("".join(lines[:start]) + block + "".join(lines[end + 1:]), encoding="utf-8")
    config = read_yaml(onprem)  # refuses a key given twice
    assert config["cluster_name"] == "fineprune-onprem" and config["provider"]["type"] == "local"
    assert {"file_mounts", "rsync_exclude", "setup_commands", "head_start_ray_commands"} <= set(config)
    validate_config(prepare_config(config))  # what `ray up` checks, after it fills in the local provider's node types


def test_cluster_has_a_cpu_head_and_autoscaling_one_gpu_workers(cluster_config):
    types = cluster_config["available_node_types"]
    head_name = cluster_config["head_node_type"]
    assert head_name in types
    assert types[head_name]["resources"].get("GPU", 0) == 0
    assert types[head_name]["resources"].get("CPU", 0) >= 1  # CPU-only spaces can run trials there too
    workers = {name: t for name, t in types.items() if name != head_name}
    gpu_workers = [t for t in workers.values() if t["resources"].get("GPU") == 1]
    assert gpu_workers, "no worker type with one GPU"
    for worker in gpu_workers:
        assert 0 <= worker["min_workers"] <= worker["max_workers"] <= cluster_config["max_workers"]
        assert worker["max_workers"] >= 1
        assert worker["resources"].get("CPU", 0) >= 1


def test_cluster_installs_the_project_exactly_as_the_makefile_does(cluster_config):
    mounts = {remote: local for remote, local in cluster_config["file_mounts"].items()}
    project = next(remote for remote, local in mounts.items() if local in (".", "./"))
    assert ["make", "-C", project, "setup"] in _commands(cluster_config, "setup_commands")
    assert ".venv" in cluster_config["rsync_exclude"]  # the node builds its own environment

    # The Makefile's steps, which the nodes run: the pinned torch first, then the project, then the shipped
    # model and data without their dependencies.
    steps = _makefile_install_steps()
    pinned = [arg for step in steps for arg in step if _requirement_name(arg) == "torch"]
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert pinned and pinned[0] in dependencies, "the Makefile's torch pin differs from pyproject.toml's"
    first_torch = next(i for i, step in enumerate(steps) if pinned[0] in step)
    editable = next(i for i, step in enumerate(steps) if "-e" in step)
    assert first_torch < editable
    assert any("--no-deps" in step for step in steps[editable + 1:])

    # No node installs a project package on its own, so the cluster's versions cannot drift from the Makefile's.
    project_names = {_requirement_name(arg) for step in steps for arg in step if not arg.startswith("-")}
    project_names |= {_requirement_name(dep) for dep in dependencies}
    installs = [argv for argv in _commands(cluster_config, "initialization_commands", "setup_commands",
                                           "head_setup_commands", "worker_setup_commands")
                if _pip_installs(argv) is not None]
    assert installs  # the head's own tools
    for argv in installs:
        installed = _pip_installs(argv)
        assert installed <= CLUSTER_ONLY_PACKAGES, argv
        assert not installed & project_names, argv


def test_cluster_runs_mlflow_and_token_auth_on_every_node(cluster_config):
    head = _commands(cluster_config, "head_start_ray_commands")
    server = _options(_the_command(head, "mlflow", "server"))
    assert re.fullmatch(r"\$\{MLFLOW_BACKEND_STORE_URI:-sqlite:///.+\}", server["--backend-store-uri"])
    assert "--artifacts-destination" in server or "--default-artifact-root" in server
    assert server["--host"] not in ("0.0.0.0", "::")  # the tracking server stays on the private network
    head_ray = _options(_the_command(head, "ray", "start"))
    assert head_ray["--head"] is True
    worker_ray = _options(_the_command(_commands(cluster_config, "worker_start_ray_commands"), "ray", "start"))
    assert worker_ray["--address"] == f"$RAY_HEAD_IP:{head_ray['--port']}"
    # MLFLOW_TRACKING_URI points the driver (head) and the workers at the server.
    for key in ("head_setup_commands", "worker_setup_commands"):
        uri = _exports(cluster_config, key)["MLFLOW_TRACKING_URI"]
        assert uri.startswith("http://") and uri.endswith(f":{server['--port']}"), (key, uri)
    # Every node gets the same token and runs Ray with token authentication.
    assert "~/.ray/auth_token" in cluster_config["file_mounts"]
    assert _exports(cluster_config, "setup_commands")["RAY_AUTH_MODE"] == "token"


def test_the_guide_forwards_the_mlflow_port_to_the_address_the_server_listens_on(cluster_config):
    """`ray attach -p PORT` forwards to the head's localhost, where a server on the private address is not; and
    `ray get-head-ip` gives the public address (unless the provider uses internal IPs), not the private one."""
    guide = (REPO / "docs" / "cluster.md").read_text(encoding="utf-8")
    server = _options(_the_command(_commands(cluster_config, "head_start_ray_commands"), "mlflow", "server"))
    port = server["--port"]
    assert server["--host"] not in ("127.0.0.1", "localhost", "::1")
    assert not re.search(rf"ray attach \S+( -\S+)* -p {port}`", guide)
    forwards = re.findall(rf"-L {port}:(\S+):{port}", guide)
    assert forwards and not {"localhost", "127.0.0.1"} & set(forwards)
    if not cluster_config["provider"].get("use_internal_ips"):
        assert not re.search(r"private\s+IP\s+\(`ray get-head-ip", guide)


def test_the_driver_that_ray_submit_starts_outlives_the_ssh_connection(cluster_config):
    """`ray submit` runs its command over `ssh -tt`: a dropped connection sends the driver SIGHUP, which ends a
    day-long sweep at once. Every documented `ray submit` runs it in tmux on the head, and every node has tmux."""
    texts = {path: (REPO / path).read_text(encoding="utf-8")
             for path in ("docs/cluster.md", "cluster.yaml", "README.md", "docs/reference.md", "workflows/submit.py")}
    submits = [(path, line) for path, text in texts.items() for line in re.findall(r"ray submit [^`\n]*", text)
               if re.search(r"ray submit (--\S+ )*\S+\.yaml", line)]
    assert submits
    for path, line in submits:
        assert re.search(r"ray submit (--\S+ )*--tmux\b", line), f"{path}: {line}"
    installed = [argv for argv in _commands(cluster_config, "setup_commands") if argv[:2] == ["apt-get", "-o"]
                 and "install" in argv]
    assert installed and "tmux" in installed[0]


def test_reference_space_trials_fit_a_gpu_worker(cluster_config):
    """Trials take the space's resources: the reference space's trial must fit one node type, or it never runs."""
    from workflows.space import load_space
    from workflows.sweep import _tune_resources

    need = _tune_resources(load_space(REPO / "tune_spaces" / "bert_base_squad.yaml").resources)
    assert need["gpu"] > 0
    fitting = [name for name, node in cluster_config["available_node_types"].items()
               if node["resources"].get("CPU", 0) >= need["cpu"] and node["resources"].get("GPU", 0) >= need["gpu"]]
    assert fitting and cluster_config["head_node_type"] not in fitting


# --------------------------------------------------------------------------------------------------------------
# Driver-side helpers for clusters
# --------------------------------------------------------------------------------------------------------------


def test_storage_uris_are_kept_and_local_paths_resolved(tmp_path, monkeypatch):
    from workflows.sweep import _storage_roots

    monkeypatch.chdir(tmp_path)
    root, local = _storage_roots("s3://bucket/fineprune/ray/")
    assert root == "s3://bucket/fineprune/ray"  # not squashed into a local path
    assert local == tmp_path / "runs" / "ray" and local.is_dir()
    root, local = _storage_roots("shared/ray")
    assert root == str(tmp_path / "shared" / "ray") and local == tmp_path / "shared" / "ray" and local.is_dir()
    root, local = _storage_roots(f"file://{tmp_path}/nfs")
    assert root == str(tmp_path / "nfs") and local == tmp_path / "nfs"
    assert _storage_roots(None) == (str(tmp_path / "runs" / "ray"), tmp_path / "runs" / "ray")


def test_a_file_uri_storage_path_is_the_directory_it_names(tmp_path, monkeypatch):
    # percent-escapes were kept (a directory named "my%20runs"), and file://localhost/... or file:/... were read as
    # paths relative to the working directory
    from workflows.sweep import StorageError, _storage_roots

    monkeypatch.chdir(tmp_path)
    wanted = tmp_path / "my runs" / "ray"
    for uri in (f"file://{tmp_path}/my%20runs/ray", f"file://localhost{tmp_path}/my%20runs/ray/",
                f"file:{tmp_path}/my%20runs/ray"):
        assert _storage_roots(uri) == (str(wanted), wanted), uri
    assert [p.name for p in tmp_path.iterdir()] == ["my runs"] and wanted.is_dir()
    with pytest.raises(StorageError, match=r"^--storage-path file://nas/ray: a file URI of the host 'nas'"):
        _storage_roots("file://nas/ray")


def test_forwarded_env_leaves_a_jobs_own_variables_to_the_job(monkeypatch):
    from workflows.sweep import _forwarded_env

    for name in ("HF_HUB_OFFLINE", "RAY_CHDIR_TO_TRIAL_DIR", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(name, raising=False)
    env = _forwarded_env()
    assert env["HF_HUB_OFFLINE"] == "1" and env["RAY_CHDIR_TO_TRIAL_DIR"] == "0"
    # Under `ray job submit`, ray.init refuses a runtime env that names one of the job's variables again.
    job = {"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}, "working_dir": "gcs://pkg.zip"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    env = _forwarded_env()
    assert "HF_HUB_OFFLINE" not in env and env["RAY_CHDIR_TO_TRIAL_DIR"] == "0"


def test_the_ui_of_a_tracking_server_is_its_address():
    """`mlflow ui --backend-store-uri http://...` fails (no registry store for http): a server's UI is its address."""
    from workflows.sweep import _ui_hint

    assert _ui_hint("http://10.0.0.10:5000") == "http://10.0.0.10:5000"
    assert _ui_hint("https://mlflow.example.org/") == "https://mlflow.example.org/"
    assert _ui_hint("sqlite:///mlflow.db") == "mlflow ui --backend-store-uri sqlite:///mlflow.db -h 127.0.0.1"
    # A store in a directory whose name holds a space is one word of the command, as a shell splits it.
    assert _ui_hint("sqlite:////home/u/my runs/mlflow.db").split("--backend-store-uri ")[1] == \
        "'sqlite:////home/u/my runs/mlflow.db' -h 127.0.0.1"


# --------------------------------------------------------------------------------------------------------------
# A two-node cluster on one machine
# --------------------------------------------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _stop_processes_mentioning(root: Path) -> None:
    _signal(processes_mentioning(root), signal.SIGTERM)
    deadline = time.monotonic() + 5
    while processes_mentioning(root) and time.monotonic() < deadline:
        time.sleep(0.5)
    _signal(processes_mentioning(root), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while processes_mentioning(root) and time.monotonic() < deadline:
        time.sleep(0.5)


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run([str(BIN / "ray"), "start", *args], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"ray start {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _node_ports(head: bool) -> list[str]:
    """Explicit free ports for everything a Ray node listens on, so two nodes (and other clusters) never clash."""
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
    if head:
        names += ["--ray-client-server-port"]
    return [f"{name}={port}" for name, port in zip(names, _free_ports(len(names)))]


@pytest.mark.slow
def test_the_tests_mlflow_server_moves_to_another_port_when_its_own_is_taken(tmp_path):
    """The port found free for the MLflow server of these tests can be taken before the server binds it (the Ray
    nodes start beside it): the server exits 0 saying "address already in use", and its first start moves on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = MlflowServer(tmp_path, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        server.port = taken.getsockname()[1]
        try:
            server.start()
            assert server.port != taken.getsockname()[1]
            assert "address already in use" in server.log_tail()
            with urllib.request.urlopen(f"{server.uri}/health", timeout=10) as response:
                assert response.status == 200
        finally:
            server.stop()


@pytest.fixture
def two_node_cluster():
    """A head and a worker node (one CPU each, token authentication on), and an MLflow server with a SQLite store.

    Everything lives under one fresh directory (short, for Ray's socket paths); teardown stops every process
    whose command line names it, and the MLflow server's process group.
    """
    root = Path(tempfile.mkdtemp(prefix="fpc-", dir="/tmp" if os.path.isdir("/tmp") else None))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    gcs_port, dashboard_port = _free_ports(2)
    storage = root / "storage"
    storage.mkdir()
    server = MlflowServer(root, env)
    try:
        server.launch()  # it starts while the nodes do; it may have to move to another port (MlflowServer)
        common = ["--num-cpus=1", "--num-gpus=0", f"--object-store-memory={200 * 1024 ** 2}",
                  "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        # Each node gets its own temp dir, as on separate machines: a node deletes the job's unpacked working
        # directory under its temp dir when it no longer needs it, which must not be the driver's.
        _ray_start(["--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                    f"--temp-dir={root / 'head'}", *common, *_node_ports(head=True)], env)
        _ray_start([f"--address=127.0.0.1:{gcs_port}", f"--temp-dir={root / 'node'}", *common,
                    *_node_ports(head=False)], env)
        server.wait()
        yield {"root": root, "env": env, "dashboard": f"http://127.0.0.1:{dashboard_port}",
               "tracking_uri": server.uri, "storage": storage}
    finally:
        _stop_processes_mentioning(root)
        server.stop()
        assert not processes_mentioning(root), "processes of the test cluster outlived its teardown"
        shutil.rmtree(root, ignore_errors=True)


def _cluster_node_ids(cluster: dict) -> set[str]:
    done = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", cluster["dashboard"], "--format", "json"],
                          env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return {node["node_id"] for node in json.loads(done.stdout) if node["state"] == "ALIVE"}


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the cluster's processes in /proc")
def test_smoke_sweep_as_a_job_on_two_nodes(two_node_cluster):
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    cluster = two_node_cluster
    experiment = "cluster-smoke"
    runtime_env = {
        # What a job does not need: local environments and results (working_dir uploads the rest).
        "excludes": [".venv", "runs", "mlruns", "mlartifacts", "reports", "outputs", ".git", "__pycache__",
                     ".pytest_cache", ".hypothesis", "*.egg-info"],
        # A job-level variable the sweep also forwards to its workers: the two must not clash.
        "env_vars": {"HF_HUB_OFFLINE": "1"},
    }
    # The smoke space with a fresh worker per trial: its trials take seconds, less than a worker's start on the other
    # node, so a reused worker would take every trial there is (tune_spaces/README.md, reuse_workers). Two trials
    # at once on two one-CPU nodes: one runs on each.
    space = yaml.safe_load((REPO / "tune_spaces" / "smoke.yaml").read_text())
    assert space.get("reuse_workers", True), "the smoke space turned worker reuse off: update this test"
    assert space["max_concurrent"] == 2, "the smoke space runs other than two trials at once: update this test"
    space_file = cluster["root"] / "smoke.yaml"
    space_file.write_text(yaml.safe_dump({**space, "reuse_workers": False, "num_samples": 2}))
    entrypoint = [str(BIN / "fineprune"), "sweep", "--space", str(space_file), "--experiment", experiment,
                  "--tracking-uri", cluster["tracking_uri"], "--storage-path", str(cluster["storage"])]
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint],
        env=cluster["env"], capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, f"the job failed:\n{job.stdout[-6000:]}\n{job.stderr[-3000:]}"
    summaries = [json.loads(line) for line in job.stdout.splitlines()
                 if line.startswith("{") and '"parent_run_id"' in line]
    assert summaries, f"no sweep summary in the job's output:\n{job.stdout[-3000:]}"
    summary = summaries[-1]

    # Checkpoints went to the shared storage path.
    sweep_dir = Path(summary["sweep_dir"])
    assert sweep_dir.parent == cluster["storage"]
    assert list(sweep_dir.rglob("checkpoint_*")), "no trial checkpoint in the shared storage"

    # The server holds the sweep: every trial finished, and the trials ran on both nodes of the cluster.
    client = MlflowClient(tracking_uri=cluster["tracking_uri"])
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    trials = client.search_runs([exp.experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                              "and tags.`fineprune.kind` = 'trial'")
    assert len(trials) == 2
    assert all(run.info.status in ("FINISHED", "KILLED") for run in trials)
    nodes = {run.data.tags.get("fineprune.node_id") for run in trials}
    assert None not in nodes
    assert len(nodes) == 2, f"all trials ran on one node: {nodes}"
    assert nodes == _cluster_node_ids(cluster)

    # The champion is registered on the server, from one of this sweep's trials.
    name = space["registry"]["name"]
    version = client.get_model_version_by_alias(name, "champion")
    assert version.run_id in {run.info.run_id for run in trials}
    assert summary["champion"]["registered"] and summary["champion"]["version"] == str(version.version)
    # The UI the summary names is the server itself.
    assert summary["ui"] == cluster["tracking_uri"]

    # The report went to the job's temporary working directory on the head, named in full, and to the server: the
    # summary says where to fetch it from.
    assert Path(summary["report"]["html"]).is_absolute()
    assert summary["report"]["artifacts"] == f"runs:/{parent.info.run_id}/report"
    fetched = Path(mlflow.artifacts.download_artifacts(artifact_uri=summary["report"]["artifacts"],
                                                       tracking_uri=cluster["tracking_uri"],
                                                       dst_path=str(cluster["root"] / "fetched")))
    assert {path.name for path in fetched.iterdir()} == {"report.html", "report.md"}


@pytest.fixture
def token_head():
    """A one-CPU head that requires a Ray token (its own temp dir and ports), the token, and an environment without
    any of Ray's variables; every process it started is stopped by id at teardown."""
    root = Path(tempfile.mkdtemp(prefix="fpt-", dir="/tmp" if os.path.isdir("/tmp") else None))
    token = secrets.token_hex(32)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    clean.update(HOME=str(root / "home"), RAY_USAGE_STATS_ENABLED="0",
                 PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                 RAY_gcs_server_port_wait_time_s="2")  # a refused client gives up after two tries, not twenty
    (root / "home").mkdir()
    (gcs_port,) = _free_ports(1)
    try:
        _ray_start(["--head", f"--port={gcs_port}", "--include-dashboard=false", f"--temp-dir={root / 'head'}",
                    "--num-cpus=1", "--num-gpus=0", f"--object-store-memory={100 * 1024 ** 2}",
                    "--node-ip-address=127.0.0.1", "--disable-usage-stats", *_node_ports(head=False)],
                   {**clean, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        yield {"root": root, "address": f"127.0.0.1:{gcs_port}", "token": token, "env": clean}
    finally:
        _stop_processes_mentioning(root)
        assert not processes_mentioning(root), "processes of the test head outlived its teardown"
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the head's processes in /proc")
def test_joining_a_cluster_that_requires_a_token_says_what_is_missing(token_head):
    """Without RAY_AUTH_MODE=token, with it but no token, with a wrong token: exit 2 and one line saying which, and
    no sweep left RUNNING in MLflow (Ray itself says only "failed to connect", or raises a traceback)."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    root, address = token_head["root"], token_head["address"]
    database = root / "mlflow.db"
    command = [sys.executable, "-m", "workflows.cli", "sweep", "--space", str(REPO / "tune_spaces" / "smoke.yaml"),
               "--address", address, "--tracking-uri", f"sqlite:///{database}", "--storage-path", str(root / "ray")]
    cases = [({}, "the cluster requires token authentication and RAY_AUTH_MODE is unset: set RAY_AUTH_MODE=token"),
             ({"RAY_AUTH_MODE": "token"}, "RAY_AUTH_MODE=token but no Ray token was found"),
             ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, "the cluster refused this client's Ray token")]
    for extra, expected in cases:
        done = subprocess.run(command, cwd=root, env={**token_head["env"], **extra}, capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 2, done.stderr[-3000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"fineprune sweep: error: Ray address {address}: ") and expected in last, last
    # Nothing ran: no sweep run is left for `--resume` to take for the last sweep.
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments)
    deleted = client.search_runs(experiments, run_view_type=ViewType.DELETED_ONLY)
    assert len(deleted) == len(cases) and all(r.info.status == "FAILED" for r in deleted)


def test_a_head_restart_waits_for_the_old_mlflow_server_to_exit(cluster_config, tmp_path):
    """The head's start commands stop the MLflow server a previous start left, then start a new one on the same
    port. A server still finishing a request after SIGTERM holds that port: the stop has to wait for its process
    group to be gone, or the new server fails with 'address already in use'."""
    stop = next(line for line in cluster_config["head_start_ray_commands"]
                if isinstance(line, str) and "server.pid" in line and "mlflow server" not in line)
    pid_file = tmp_path / "mlflow" / "server.pid"
    pid_file.parent.mkdir()
    env = {**os.environ, "HOME": str(tmp_path)}
    # A stand-in server that takes two seconds to exit after SIGTERM, in its own process group as setsid makes it.
    old = subprocess.Popen(["bash", "-c", 'echo $$ > "$HOME/mlflow/server.pid"; trap "sleep 2; exit 0" TERM; '
                                          "while :; do sleep 0.1; done"], env=env, start_new_session=True)
    reaper = threading.Thread(target=old.wait)  # reaps it as soon as it exits, as init does on the head
    reaper.start()
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline, "the stand-in server never wrote its pid"
            time.sleep(0.05)
        subprocess.run(["bash", "-c", stop], env=env, check=True, timeout=120)
        assert _group_is_gone(old.pid), "the stop returned while the old server still ran"
        assert not pid_file.exists()
    finally:
        if not _group_is_gone(old.pid):
            os.killpg(old.pid, signal.SIGKILL)
        reaper.join(timeout=30)


def _group_is_gone(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return True
    return False


def test_every_space_the_guides_submit_is_shipped_or_written_by_the_guide(tmp_path):
    """A pasted `--space PATH` must find its file: a shipped one, or one an earlier command of the guide writes;
    the guide's cluster copy of the BERT-base space names the models by their path on the nodes."""
    for guide in ("docs/cluster.md", "README.md", "docs/reference.md"):
        text = (REPO / guide).read_text(encoding="utf-8")
        written = set(re.findall(r">\s*(tune_spaces/\S+\.yaml)", text))
        for space in re.findall(r"--space\s+(tune_spaces/[\w./-]+\.yaml)", text):
            assert (REPO / space).is_file() or space in written, f"{guide}: {space} is neither shipped nor written"
    text = (REPO / "docs" / "cluster.md").read_text(encoding="utf-8")
    command = re.search(r"^(sed .*?)\\\n\s*> tune_spaces/bert_base_squad_cluster\.yaml", text, re.M | re.S).group(1)
    copy = tmp_path / "bert_base_squad_cluster.yaml"
    with copy.open("w") as out:
        subprocess.run(["bash", "-c", command], cwd=REPO, stdout=out, check=True)
    from workflows.space import load_space

    space = load_space(copy)
    assert space.base["model"] == "/home/ubuntu/fineprune/models/bert-base-uncased"
    assert space.teacher.path == "/home/ubuntu/fineprune/models/bert-base-uncased-squad"
    assert "\"~/fineprune\": \".\"" in (REPO / "cluster.yaml").read_text(encoding="utf-8")  # where the nodes keep it
