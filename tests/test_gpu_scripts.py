"""The GPU bench scripts on a machine without CUDA: they read what the GPU run wrote, and refuse bad input and a
device the machine does not have in one line, before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "bench" / "results" / "gpu_reference.json"
# MiniLM's shape (6 layers, 12 heads, FFN 1536), but 8 dimensions a head: the recorded packed shapes fit it.
SMALL_MINILM = dict(vocab_size=100, hidden_size=96, num_hidden_layers=6, num_attention_heads=12,
                    intermediate_size=1536, max_position_embeddings=512, model_type="bert")


@pytest.fixture(scope="module")
def latency(bench_script):
    return bench_script("gpu_latency")


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMALL_MINILM))
    return path


def test_latency_reads_the_recorded_reference_run_and_writes_one_row_a_student(latency, config_file, tmp_path):
    out = tmp_path / "new" / "gpu_latency.json"
    code = latency.main(["--results", str(REFERENCE), "--config", str(config_file), "--out", str(out),
                         "--batch-size", "1", "--seq-len", "8", "--repeats", "1", "--device", "cpu"])
    assert code == 0
    written = json.loads(out.read_text())
    recorded = json.loads(REFERENCE.read_text())["students"]
    assert written["device"] == "cpu" and (written["batch_size"], written["seq_len"]) == (1, 8)
    assert [row["index"] for row in written["students"]] == [s["index"] for s in recorded]
    for row, student in zip(written["students"], recorded):
        assert row["flop_limit"] > 1 and set(row) == {"index", "linear_density", "flop_limit", "fp32"}
        assert row["fp32"]["speedup"] == pytest.approx(row["fp32"]["dense_ms"] / row["fp32"]["packed_ms"])


@pytest.mark.parametrize("results,message", [
    (None, "no such file"),
    ("{", "not valid JSON"),
    ('{"teacher": {}}', "no field 'students'"),
    ('{"students": [{"index": 0, "linear_density": 0.5, "heads_kept_per_layer": [12, 12],'
     ' "ffn_kept_per_layer": [9, 9]}]}', "students[0]: heads_kept_per_layer must hold 6 counts from 0 to 12"),
    ('{"students": [{"index": 0, "linear_density": 0.5}]}', "students[0]: no field 'heads_kept_per_layer'"),
])
def test_latency_refuses_a_missing_or_malformed_results_file_in_one_line(latency, config_file, tmp_path, capsys,
                                                                         results, message):
    path = tmp_path / "gpu_reference.json"
    if results is not None:
        path.write_text(results)
    code = latency.main(["--results", str(path), "--config", str(config_file), "--out", str(tmp_path / "o.json"),
                         "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"gpu_latency: --results {path}") and message in err[0]
    assert not (tmp_path / "o.json").exists()


def test_latency_refuses_a_missing_config_and_a_device_this_machine_lacks(latency, config_file, tmp_path, capsys):
    argv = ["--results", str(REFERENCE), "--out", str(tmp_path / "o.json")]
    assert latency.main([*argv, "--config", str(tmp_path / "absent.json"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == f"gpu_latency: --config {tmp_path / 'absent.json'}: no such file"
    if not torch.cuda.is_available():
        assert latency.main([*argv, "--config", str(config_file), "--device", "cuda:0"]) == 2
        assert capsys.readouterr().err.strip() == ("gpu_latency: --device cuda:0: CUDA is not available on this "
                                                   "machine (use cpu)")
    assert latency.main([*argv, "--config", str(config_file), "--device", "tpu"]) == 2
    assert "not a device" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


@pytest.fixture(scope="module")
def reference(bench_script):
    return bench_script("gpu_reference")


def test_reference_reads_each_student_as_a_target_and_a_block(reference):
    assert reference.parse_students(reference.DEFAULT_STUDENTS)[:2] == [(0.15, "heads"), (0.25, "32")]
    assert reference.parse_students("0.5") == [(0.5, "32")]
    for bad in ("0.5:abc", "x:heads", "1.5:32", "0.5:0", ""):
        with pytest.raises(reference.InputError, match="--students: "):
            reference.parse_students(bad)


@pytest.mark.parametrize("argv,message", [
    (["--students", "0.5:heads,0.3:3x2"], "gpu_reference: --students: '0.3:3x2': expected TARGET:BLOCK"),
    (["--carry", "{tmp}/absent"], "gpu_reference: --carry {tmp}/absent: no {tmp}/absent/minilm/model.safetensors"),
    (["--device", "gpu"], "gpu_reference: --device 'gpu': not a device"),
])
def test_reference_refuses_bad_input_in_one_line_before_any_work(reference, tmp_path, capsys, argv, message):
    """A typo in --students used to surface as a traceback only after the teacher had trained (GPU minutes)."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = reference.main(["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(message.replace("{tmp}", str(tmp_path)))
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("out,message", [
    ("file", "exists and is not a directory"),
    ("file/out", "{tmp}/file is a file, not a directory"),
    ("read-only/out", "cannot be made ({tmp}/read-only takes no new files)"),
])
def test_reference_refuses_an_out_directory_it_cannot_write_in_one_line(reference, tmp_path, capsys, unwritable_dir,
                                                                        out, message):
    """An --out (on the GPU machine, $OUT) that is a file, or in a directory that takes no new files, was a
    FileExistsError, NotADirectoryError or PermissionError traceback, status 1."""
    work = tmp_path / "work"  # the model and data already staged, as a rerun finds them
    for staged in ("minilm/model.safetensors", "minilm/config.json", "train-v1.1.json", "dev-v1.1.json"):
        (work / staged).parent.mkdir(parents=True, exist_ok=True)
        (work / staged).write_text("")
    (tmp_path / "file").write_text("")
    code = reference.main(["--rehearsal", "--work", str(work), "--out", str(tmp_path / out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"gpu_reference: --out {tmp_path / out}: {message.replace('{tmp}', str(tmp_path))}"]
    assert reference.main(["--rehearsal", "--work", str(tmp_path / "file"), "--out", str(tmp_path / "o")]) == 2
    line = capsys.readouterr().err.strip().splitlines()
    assert line == [f"gpu_reference: --work {tmp_path / 'file'}: exists and is not a directory"]
    assert not (tmp_path / "o").exists()


def test_the_reference_results_are_written_before_their_table_that_may_fail(reference, tmp_path):
    """gpu_reference wrote its table (gpu_reference.md) before the results of the whole run (gpu_reference.json):
    a table that could not be written (a full disk, a directory in its place) stopped it on a traceback and the
    results were never written. They are now written first, and the table's failure is one line naming it."""
    from pruning.atomic import WriteError

    results = json.loads(REFERENCE.read_text())
    expected_frontier = results.pop("frontier", None)
    out = tmp_path / "out"
    (out / "gpu_reference.md").mkdir(parents=True)
    with pytest.raises(WriteError) as failed:
        reference.write_report(out, results)
    assert str(failed.value) == f"{out / 'gpu_reference.md'}: cannot write (Is a directory)"
    written = json.loads((out / "gpu_reference.json").read_text())
    assert written["students"] == results["students"] and written["teacher"] == results["teacher"]
    assert expected_frontier is None or written["frontier"] == expected_frontier


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_reference_refuses_cuda_on_a_machine_without_it(reference, tmp_path, capsys):
    code = reference.main(["--device", "cuda", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("gpu_reference: --device cuda: CUDA is not available on this machine "
                                               "(use cpu)")


@pytest.mark.parametrize("device,message", [
    ("cuda", "gpu_smoke: --device cuda: CUDA is not available on this machine (use cpu)"),
    ("meta", "gpu_smoke: --device 'meta': only cpu and cuda devices are supported"),
])
def test_smoke_refuses_a_device_it_cannot_run_on_in_one_line(bench_script, tmp_path, capsys, device, message):
    """Before, every stage ran and failed on its own line (exit 1), as if the library were broken."""
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a machine without CUDA")
    code = bench_script("gpu_smoke").main(["--device", device, "--out", str(tmp_path / "work")])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.strip() == message and captured.out == ""
    assert not (tmp_path / "work").exists()


def test_smoke_refuses_an_out_directory_it_cannot_write_in_one_line(bench_script, tmp_path, capsys, unwritable_dir):
    """--out a file, or in a directory that takes no new files, was a FileExistsError or PermissionError
    traceback, status 1."""
    (tmp_path / "file").write_text("")
    for out, problem in ((tmp_path / "file", "exists and is not a directory"),
                         (unwritable_dir / "work", f"cannot be made ({unwritable_dir} takes no new files)")):
        code = bench_script("gpu_smoke").main(["--device", "cpu", "--out", str(out)])
        captured = capsys.readouterr()
        assert code == 2 and captured.err.strip() == f"gpu_smoke: --out {out}: {problem}" and captured.out == ""


@pytest.mark.parametrize("device,expected", [("auto", "cpu"), ("cuda", "cuda")])
def test_a_rehearsal_runs_on_the_cpu_unless_told_otherwise(bench_script, device, expected):
    """A rehearsal's precision was the run's bf16: on a CPU without bf16 it stopped at the teacher, after staging."""
    import argparse

    reference = bench_script("gpu_reference")
    args = argparse.Namespace(device=device, train_limit=None, eval_limit=None, precision=None)
    reference.rehearse(args)
    assert args.device == expected and (args.train_limit, args.eval_limit, args.seq_len) == (64, 32, 128)
    assert args.precision == "auto"
    args = argparse.Namespace(device=device, train_limit=None, eval_limit=None, precision="fp32")
    reference.rehearse(args)
    assert args.precision == "fp32"


def test_reference_refuses_a_precision_the_device_lacks_before_staging(reference, tmp_path, capsys, monkeypatch):
    from pruning import precision

    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)  # a CPU without bf16 matrix instructions
    work = tmp_path / "work"  # the model and data already staged, as a rerun finds them
    for staged in ("minilm/model.safetensors", "minilm/config.json", "train-v1.1.json", "dev-v1.1.json"):
        (work / staged).parent.mkdir(parents=True, exist_ok=True)
        (work / staged).write_text("")
    code = reference.main(["--device", "cpu", "--work", str(work), "--out", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("gpu_reference: precision: bf16 asked for, but this CPU has no")
    assert not (tmp_path / "out").exists() and not (work / "teacher").exists()


def test_the_step_calibration_leaves_evaluations_and_checkpoints_out(reference, tmp_path, monkeypatch):
    """The probe's rate was taken between its evaluations, each followed by a checkpoint: on a GPU those took longer
    than the steps between them, and the recorded teacher trained for a third of its budget. Here each evaluation
    takes at least two seconds, the tiny model's steps a few milliseconds."""
    import time

    from pruning import trainer
    from pruning.config import RunConfig

    evaluate = trainer._evaluate_averaged

    def slow_evaluation(*args, **kwargs):
        time.sleep(2.0)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "_evaluate_averaged", slow_evaluation)
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg = RunConfig(model_config=tiny, train_data="dev", eval_data="dev", train_limit=16, max_seq_length=64,
                    doc_stride=16, batch_size=4, output_dir=str(tmp_path / "teacher"), eval_every=100)
    steps, per_step = reference.calibrated_steps(cfg, seconds=60, probe_steps=6)
    assert per_step < 1.0 and steps > 60
    assert not (tmp_path / "teacher" / "probe").exists()


def test_smoke_takes_auto_as_the_trainer_does(bench_script):
    args = bench_script("gpu_smoke").parse_args(["--device", "auto"])
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
