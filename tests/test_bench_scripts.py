"""The CPU bench scripts' command lines: a short run writes what it says where it says, and bad input (a missing or
packed checkpoint, an output path that cannot be written, an impossible size) is one line and exit 2 before any
work."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess

import pytest

from conftest import frozen as frozen_path
from conftest import random_masked_model

from pruning.checkpoint import save_model
from pruning.packing import pack, save_packed


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny masked checkpoint with the shipped tokenizer and 512 positions (the bench's windows are 384 tokens),
    and the packed directory made from it."""
    model, tokenizer = random_masked_model(positions=512)
    root = tmp_path_factory.mktemp("bench_ckpt")
    masked = save_model(model, tokenizer, root / "masked")
    save_packed(pack(model), tokenizer, root / "packed")
    return {"masked": masked, "packed": root / "packed"}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err), err
    return err[-1]


@pytest.fixture(scope="module")
def serve_speed(bench_script):
    return bench_script("serve_speed")


def test_serve_speed_writes_its_rows_and_the_int8_drop_where_asked(serve_speed, checkpoints, tmp_path, capsys):
    out = tmp_path / "new" / "serve_speed.json"
    code = serve_speed.main(["--checkpoint", str(checkpoints["masked"]), "--no-bert-base", "--quick",
                             "--questions", "3", "--drop-questions", "4", "--seq-lens", "64", "--json", str(out)])
    assert code == 0
    written = json.loads(out.read_text())
    assert {row["row"] for row in written["rows"]} >= {"dense eager", "packed eager", "packed ort fp32",
                                                      "packed ort int8"}
    assert all(row["seq_len"] == 64 and row["f1"] is not None for row in written["rows"])
    assert written["int8_drop"]["questions"] == 4
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("serve_speedup dense_eager/packed_int8 = nan")


def test_serve_speed_refuses_bad_input_before_the_bert_base_rows(serve_speed, checkpoints, tmp_path, capsys):
    """These used to fail as tracebacks, the checkpoint's only after the BERT-base rows (minutes) and --json after
    every row."""
    absent = tmp_path / "absent"
    assert serve_speed.main(["--checkpoint", str(absent)]) == 2
    assert _one_line(capsys) == f"serve_speed: {absent}: model directory not found"
    assert serve_speed.main(["--checkpoint", str(checkpoints["packed"])]) == 2
    assert _one_line(capsys).startswith(f"serve_speed: --checkpoint {checkpoints['packed']}: a packed directory")
    (tmp_path / "file").write_text("")
    assert serve_speed.main(["--checkpoint", str(checkpoints["masked"]), "--json", str(tmp_path / "file" / "x")]) == 2
    assert _one_line(capsys).endswith(f"{tmp_path / 'file'} is a file, not a directory")
    short = save_model(*random_masked_model(positions=128), tmp_path / "short")
    assert serve_speed.main(["--checkpoint", str(short), "--no-bert-base", "--quick"]) == 2
    assert _one_line(capsys) == (f"serve_speed: --checkpoint {short}: the model takes 128 positions; its F1 is "
                                 "measured on 384-token windows")
    shorter = save_model(*random_masked_model(positions=400), tmp_path / "shorter")
    assert serve_speed.main(["--checkpoint", str(shorter), "--seq-lens", "128", "450"]) == 2
    assert _one_line(capsys) == "serve_speed: --seq-lens 450: the checkpoint's model takes 400 positions"
    with pytest.raises(SystemExit) as exit_:
        serve_speed.main(["--checkpoint", str(checkpoints["masked"]), "--seq-lens", "600"])
    assert exit_.value.code == 2 and "--seq-lens must be from 32 to 512" in capsys.readouterr().err


def test_pack_speed_writes_its_rows_where_asked(bench_script, tmp_path, capsys):
    out = tmp_path / "new" / "pack_speed.json"
    code = bench_script("pack_speed").main(["--quick", "--no-minilm", "--seq-len", "16", "--warmup", "0",
                                            "--json", str(out)])
    assert code == 0
    (row,) = json.loads(out.read_text())
    assert row["speedup"] == pytest.approx(row["dense_ms"] / row["packed_ms"], rel=1e-6)
    assert row["of_limit"] == pytest.approx(row["speedup"] / row["flop_limit"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"pack_speedup dense/packed = {row['speedup']:.2f} (flop limit {row['flop_limit']:.2f})")


def test_eval_batches_counts_fewer_positions_by_length_and_times_both_ways(bench_script, capsys):
    code = bench_script("eval_batches").main(["--limit", "40", "--questions", "6", "--repeats", "1", "--seq-len",
                                              "128", "--batch-size", "8"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    counted = {line.split("  ")[0].strip(): int(line.split("batches")[1].split("positions")[0].replace(",", ""))
               for line in lines[:2]}
    assert counted["length sorted"] < counted["file order"]
    assert "same answer for 6 of 6 questions" in lines
    assert lines[-1].startswith("eval_batches file_order/length_sorted = ")


@pytest.mark.parametrize("script,argv,message", [
    ("pack_speed", ["--json", "{tmp}/file/x.json"], "pack_speed: --json {tmp}/file/x.json: {tmp}/file is a file"),
    ("bf16_weights", ["--checkpoint", "{tmp}/absent"], "bf16_weights: {tmp}/absent: model directory not found"),
    ("bf16_weights", ["--checkpoint", "{masked}", "--seq-lens", "600"], "bf16_weights: --seq-lens 600: "),
    ("fisher_split", ["--teacher", "{tmp}/absent", "--heads", "4"],
     "fisher_split: {tmp}/absent: model directory not found"),
    ("serve_load", ["--model-dir", "{tmp}/absent"], "serve_load: {tmp}/absent: model directory not found"),
])
def test_bad_input_is_one_line_and_exit_2(bench_script, checkpoints, tmp_path, capsys, script, argv, message):
    """Each of these was a Python traceback (pack_speed's --json only after minutes of measurements)."""
    (tmp_path / "file").write_text("")

    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path)).replace("{masked}", str(checkpoints["masked"]))

    assert bench_script(script).main([fill(a) for a in argv]) == 2
    assert _one_line(capsys).startswith(fill(message))


@pytest.mark.parametrize("script,argv,message", [
    ("pack_speed", ["--seq-len", "600"], "--seq-len must be from 1 to 512"),
    ("train_overhead", ["--recovery", "1.5"], "--recovery 1.5: a linear density between 0 and 1"),
    ("train_overhead", ["--seq-len", "600"], "--seq-len 600: the models have 512 positions"),
    # These were tracebacks: --threads from torch at once; the others only after a row had trained (accuracy_budget)
    # or after the server had started and served the load (serve_load).
    ("pack_speed", ["--threads", "-1"], "--threads must be >= 1"),
    ("train_overhead", ["--threads", "-2"], "--threads must be >= 1"),
    ("accuracy_budget", ["--repeats", "0"], "--repeats and --threads must be >= 1"),
    ("accuracy_budget", ["--threads", "-1"], "--repeats and --threads must be >= 1"),
    ("serve_load", ["--clients", "0"], "--clients, --workers and --per-request must be >= 1"),
    ("serve_load", ["--requests", "0"], "--clients, --workers and --per-request must be >= 1"),
    ("serve_load", ["--rounds", "-1"], "--rounds >= 0"),
    ("serve_load", ["--bad-fraction", "1.5"], "--bad-fraction 1.5: a fraction from 0 to 1"),
    ("serve_load", ["--threads", "0"], "--threads must be >= 1"),
    # These registered the model and then stopped with the model server's start-up failure as a traceback.
    ("serve_load", ["--max-seq-length", "0"], "--max-seq-length must be >= 1, got 0"),
    ("serve_load", ["--doc-stride", "-1"], "--doc-stride must be >= 1, got -1"),
    ("serve_load", ["--max-windows", "0"], "--max-windows must be >= 1, got 0"),
    ("serve_load", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    # The batching phase compares one record a request with --per-request: one against one stopped it with a
    # NameError after the load phase.
    ("serve_load", ["--per-request", "1", "--model-dir", "absent-model"], "--per-request 1: the batching phase"),
    ("eval_batches", ["--questions", "0"], "--questions must be a positive integer, got 0"),
    ("eval_batches", ["--seq-len", "600"], "--seq-len 600: the shipped model has 512 positions"),
])
def test_impossible_sizes_are_refused_before_any_model_is_built(bench_script, capsys, script, argv, message):
    with pytest.raises(SystemExit) as exit_:
        bench_script(script).main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_serve_load_serves_a_model_directory_with_the_settings_it_records(bench_script, checkpoints, tmp_path,
                                                                          capsys):
    """A directory registered by serve_load serves with the windows, span search and precision its run recorded in
    it (a flag given wins), as a registered version of it would; a spoilt record is one line before any server."""
    import shutil

    import mlflow

    from pruning.checkpoint import EVALUATION_KEY
    from workflows.served_model import SERVE_DEFAULTS

    serve_load = bench_script("serve_load")
    model_dir = tmp_path / "recorded"
    shutil.copytree(checkpoints["packed"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    evaluation = {"max_seq_length": 256, "doc_stride": 64, "max_query_length": 32, "max_answer_length": 12,
                  "n_best": 5}
    (model_dir / "config.json").write_text(json.dumps({**config, EVALUATION_KEY: {**evaluation,
                                                                                  "precision": "bf16"}}))
    unset = {"max_seq_length": None, "doc_stride": None, "max_windows": None, "batch_size": None}
    settings = serve_load.dir_settings(model_dir, unset)
    assert settings == {**SERVE_DEFAULTS, **evaluation, "precision": "bf16"}
    assert serve_load.dir_settings(model_dir, {**unset, "doc_stride": 32})["doc_stride"] == 32
    assert serve_load.dir_settings(checkpoints["packed"], unset) == SERVE_DEFAULTS

    before = mlflow.get_tracking_uri()
    try:
        model_uri, _ = serve_load.register_dir(model_dir, tmp_path / "store", settings)
        served = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    finally:
        mlflow.set_tracking_uri(before)
    assert (served.max_seq_length, served.doc_stride, served.max_query_length, served.max_answer_length,
            served.n_best) == tuple(evaluation.values())

    (model_dir / "config.json").write_text(json.dumps({**config, EVALUATION_KEY: {"doc_stride": 0}}))
    assert serve_load.main(["--model-dir", str(model_dir)]) == 2
    assert _one_line(capsys) == (f"serve_load: {model_dir / 'config.json'}: {EVALUATION_KEY}.doc_stride: must be a "
                                 "whole number >= 1, got 0")


def test_serve_load_refuses_a_model_its_store_does_not_hold_before_the_server_starts(bench_script, tmp_path, capsys):
    """A --model-uri in a store that does not exist (which the server then made, empty) or that lacks the model
    stopped on MLflow's traceback once the model server had started."""
    from mlflow.tracking import MlflowClient

    missing = tmp_path / "none.db"
    for argv, message in (
            (["--model-uri", "models:/x/1", "--tracking-uri", f"sqlite:///{missing}"],
             f"--tracking-uri sqlite:///{missing}: no MLflow database at {missing}"),
            (["--model-uri", "x", "--tracking-uri", f"sqlite:///{missing}"], None),
            (["--model-uri", "models:/x@champion", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
             f"--model-uri models:/x@champion: not in sqlite:///{tmp_path}/mlflow.db ("),
            (["--model-uri", "models:/x/1", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
             f"--model-uri models:/x/1: not in sqlite:///{tmp_path}/mlflow.db (")):
        if "mlflow.db" in argv[-1]:
            MlflowClient(tracking_uri=argv[-1]).search_experiments()  # an MLflow store without the model
        with pytest.raises(SystemExit) as exit_:
            bench_script("serve_load").main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err
        assert (message or "--model-uri x: write models:/NAME/VERSION or models:/NAME@ALIAS") in err
    assert not missing.exists()


@pytest.mark.parametrize("case", ["read-only file", "file in read-only directory", "new file", "new file under"])
def test_an_output_file_and_a_tracking_database_are_refused_for_the_same_reason(bench_script, tmp_path, case):
    """The check that an output file can be written was kept twice, for the bench scripts' --json/--plot and for a
    sweep's sqlite:/// database: a file in a directory that took no new files passed it for one and not the other.
    Both now give one reason, in one line naming the flag or the tracking URI and the file."""
    from workflows.tracking import TrackingStoreError, check_writable_store

    script_input = bench_script("script_input")
    directory = tmp_path / "out"
    directory.mkdir()
    path, frozen, reason = {
        "read-only file": (directory / "out.json", directory / "out.json",
                           "cannot be written (no permission to write it)"),
        "file in read-only directory": (directory / "out.json", directory,
                                        f"cannot be written ({directory} takes no new files)"),
        "new file": (directory / "new.json", directory, f"cannot be made ({directory} takes no new files)"),
        "new file under": (directory / "sub" / "new.json", directory,
                           f"cannot be made ({directory} takes no new files)"),
    }[case]
    (directory / "out.json").write_text("earlier")
    with frozen_path(frozen):
        with pytest.raises(script_input.InputError) as refused:
            script_input.check_output(path, "--json")
        assert str(refused.value) == f"--json {path}: {reason}"
        with pytest.raises(TrackingStoreError) as refused:
            check_writable_store(f"sqlite:///{path}")
        assert str(refused.value) == (f"tracking URI sqlite:///{path}: the database {path}: {reason} (pass another "
                                      "--tracking-uri)")
    assert sorted(p.name for p in directory.iterdir()) == ["out.json"]
    assert (directory / "out.json").read_text() == "earlier"


def test_a_tracking_database_given_as_a_link_is_checked_where_sqlite_writes_it(tmp_path):
    """A sqlite:/// database given as a link into a directory that takes new files, from one that takes none, was
    refused as "cannot be written (LINKS takes no new files)", though SQLite writes the database and its journal
    where the link points; it passes, and MLflow records into it."""
    from mlflow.tracking import MlflowClient

    from workflows.tracking import check_writable_store

    stores, links = tmp_path / "stores", tmp_path / "links"
    stores.mkdir()
    links.mkdir()
    (links / "mlflow.db").symlink_to(stores / "mlflow.db")
    uri = f"sqlite:///{links / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # the store made once, where the link points
    with frozen_path(links):
        check_writable_store(uri)
        MlflowClient(uri).create_experiment("through-the-link")
    assert MlflowClient(f"sqlite:///{stores / 'mlflow.db'}").get_experiment_by_name("through-the-link") is not None


@pytest.fixture
def full_disk(tmp_path):
    """A directory on a file system of its own, 64 KiB (a tmpfs), which :func:`_fill` leaves without room; skipped
    where none can be mounted (not root, or a container that refuses)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("no small file system can be mounted here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)  # a store MLflow keeps open


def _fill(directory):
    """Take every free block of the file system of ``directory``."""
    with open(directory / "filler", "wb", buffering=0) as filler:
        with contextlib.suppress(OSError):
            while True:
                filler.write(b"x" * 1024)


@pytest.mark.parametrize("change", ["directory made read-only", "a directory in its place"])
def test_an_output_that_cannot_be_written_once_the_work_is_done_is_one_line_and_status_1(bench_script, tmp_path,
                                                                                         capsys, change):
    """A --json or --plot that could no longer be written when a script came to it (its directory made read-only
    while it ran, a directory put in its place) was a traceback; it is one line naming the file, status 1, and the
    file there before is left as it was."""
    script_input = bench_script("script_input")
    out = tmp_path / "out"
    out.mkdir()
    path = out / ("results.json" if change == "directory made read-only" else "plot.png")
    if change == "directory made read-only":
        path.write_text("earlier")

    @script_input.one_line_errors("bench")
    def main() -> int:
        script_input.check_output(path, "--json")  # passes: the change comes while the script runs
        with frozen_path(out) if change == "directory made read-only" else contextlib.nullcontext():
            if change == "a directory in its place":
                path.mkdir()
            return script_input.write_text(path, "new") or 0

    assert main() == 1
    err = capsys.readouterr().err.strip().splitlines()
    reason = "Operation not permitted" if os.geteuid() == 0 else "Permission denied"
    assert err == [f"bench: {path}: cannot write ({reason if path.suffix == '.json' else 'Is a directory'})"], err
    if change == "directory made read-only":
        assert sorted(p.name for p in out.iterdir()) == ["results.json"] and path.read_text() == "earlier"
    else:
        assert path.is_dir() and list(path.iterdir()) == [] and sorted(p.name for p in out.iterdir()) == ["plot.png"]


def test_search_efficiency_on_a_full_disk_keeps_the_earlier_results(bench_script, tmp_path, full_disk, capsys):
    """search_efficiency --json on a disk that filled up while it ran truncated the earlier results file to the
    part of the new one that fitted (invalid JSON) and stopped on an OSError traceback; the earlier file is now left
    whole, and the script says in one line that it could not write the new one, status 1."""
    from test_search_efficiency import _table_file

    bench = bench_script("search_efficiency")
    table = _table_file(bench, tmp_path / "grid.json")
    results = full_disk / "results.json"
    results.write_text("earlier results\n")
    _fill(full_disk)
    # 60 seeds: results larger than the one block the earlier file held, which a write in place gave back first
    assert bench.main(["--table", str(table), "--samplers", "grid,tpe:4", "--seeds", "60", "--budget", "6", "--json",
                       str(results)]) == 1
    assert _one_line(capsys) == f"search_efficiency: {results}: cannot write (No space left on device)"
    assert results.read_text() == "earlier results\n"
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "results.json"]


def test_serve_load_with_no_room_for_its_store_is_one_line(bench_script, checkpoints, full_disk, monkeypatch, capsys):
    """serve_load registering a model directory in a temporary directory without room for the copy stopped on a
    page of SQLAlchemy's (or MLflow's) traceback; it is one line naming the temporary directory and what to do."""
    import tempfile

    import mlflow

    serve_load = bench_script("serve_load")
    _fill(full_disk)
    monkeypatch.setattr(tempfile, "tempdir", str(full_disk))  # as TMPDIR=full_disk does
    before = mlflow.get_tracking_uri()
    try:
        assert serve_load.main(["--model-dir", str(checkpoints["packed"]), "--requests", "2", "--rounds", "0"]) == 1
    finally:
        mlflow.set_tracking_uri(before)
    line = _one_line(capsys)
    assert line.startswith(f"serve_load: {full_disk}: cannot register {checkpoints['packed']} in a temporary store "
                           "there ("), line
    assert line.endswith("); set TMPDIR to a directory with room for a copy of it"), line
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_search_efficiency_writes_into_a_pipe_given_as_its_json_and_leaves_it_a_pipe(bench_script, tmp_path, capsys):
    """A --json that is a pipe or a device (``/dev/stdout`` into ``| jq``, ``/dev/null``) was refused where its
    directory takes no new files, and elsewhere replaced by a regular file of its name (as root, ``/dev/null``
    itself), the reader getting nothing; it is written into, as it was before results were written whole."""
    from test_search_efficiency import _table_file

    bench = bench_script("search_efficiency")
    table = _table_file(bench, tmp_path / "grid.json")
    directory = tmp_path / "pipes"
    directory.mkdir()
    pipe = directory / "results.json"
    os.mkfifo(pipe)
    reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)  # there before the script opens it, as `| jq` is
    received = []
    try:
        with frozen_path(directory):  # it takes no new files, as /dev does for a user
            code = bench.main(["--table", str(table), "--samplers", "grid,tpe:4", "--seeds", "2", "--budget", "6",
                               "--json", str(pipe)])
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(reader, 1 << 16):
                received.append(chunk)
    finally:
        os.close(reader)
    assert code == 0, capsys.readouterr().err
    assert json.loads(b"".join(received))["budget"] == 6
    assert pipe.is_fifo() and sorted(p.name for p in directory.iterdir()) == ["results.json"]


@pytest.mark.parametrize("links", ["a directory that takes new files", "a directory that takes none"])
def test_search_efficiency_writes_the_file_a_json_link_points_to_and_keeps_the_link(bench_script, tmp_path, capsys,
                                                                                     links):
    """A --json given as a symbolic link (``latest.json`` naming the run's file) was replaced by a regular file,
    the file it named left as it was, and refused outright where the link's own directory takes no new files; the
    file it points to is written, beside itself, and the link stays."""
    from test_search_efficiency import _table_file

    bench = bench_script("search_efficiency")
    table = _table_file(bench, tmp_path / "grid.json")
    runs, links_dir = tmp_path / "runs", tmp_path / "links"
    runs.mkdir()
    links_dir.mkdir()
    (runs / "results.json").write_text("earlier")
    link = links_dir / "latest.json"
    link.symlink_to(runs / "results.json")
    with frozen_path(links_dir) if links.endswith("none") else contextlib.nullcontext():
        code = bench.main(["--table", str(table), "--samplers", "grid,tpe:4", "--seeds", "2", "--budget", "6",
                           "--json", str(link)])
    assert code == 0, capsys.readouterr().err
    assert link.is_symlink() and link.resolve() == runs / "results.json"
    assert json.loads((runs / "results.json").read_text())["budget"] == 6
    assert sorted(p.name for p in runs.iterdir()) == ["results.json"]


@pytest.mark.parametrize("mode", [0o600, 0o664])
def test_search_efficiency_keeps_the_permissions_of_the_results_it_replaces(bench_script, tmp_path, capsys, mode):
    """Results written again over a file kept private (0600) or shared with a group (0664) took the mode of a new
    file (0644 under umask 022: readable by everyone, no longer writable by the group) since they came to be written
    whole beside it; the file keeps its mode, as it did when it was written in place."""
    from test_search_efficiency import _table_file

    bench = bench_script("search_efficiency")
    results = tmp_path / "results.json"
    results.write_text("earlier")
    results.chmod(mode)
    old_umask = os.umask(0o022)
    try:
        code = bench.main(["--table", str(_table_file(bench, tmp_path / "grid.json")), "--samplers", "grid,tpe:4",
                           "--seeds", "2", "--budget", "6", "--json", str(results)])
    finally:
        os.umask(old_umask)
    assert code == 0, capsys.readouterr().err
    assert json.loads(results.read_text())["budget"] == 6
    assert results.stat().st_mode & 0o777 == mode
