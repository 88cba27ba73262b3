"""The weight average: hand-worked updates, the swap for evaluation, and its place in the training loop."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pruning.averaging import PREFIX, WeightAverage
from pruning.checkpoint import OPTIMIZER, CheckpointError, load_model
from pruning.config import ConfigError, RunConfig
from pruning.trainer import train

from test_trainer import Stop, tiny_cfg


def _linear(value: float) -> nn.Linear:
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(value)
    return layer


def test_updates_follow_the_warmed_up_decay_by_hand():
    layer = _linear(0.0)
    average = WeightAverage(layer, decay=0.5)
    with torch.no_grad():
        layer.weight.fill_(10.0)
    average.update(layer)  # decay min(0.5, 1/10) = 0.1: 0.1 * 0 + 0.9 * 10
    assert torch.allclose(average.shadow["weight"], torch.full((1, 2), 9.0))
    with torch.no_grad():
        layer.weight.fill_(20.0)
    average.update(layer)  # decay min(0.5, 2/11) = 2/11
    assert torch.allclose(average.shadow["weight"], torch.full((1, 2), 9.0 * 2 / 11 + 20.0 * 9 / 11))
    for _ in range(20):
        average.update(layer)
    assert average.current_decay() == 0.5 and average.updates == 22
    assert float(layer.weight.detach()[0, 0]) == 20.0  # updating never touches the live weights


def test_applied_swaps_the_average_in_and_the_live_weights_back_even_on_error():
    layer = _linear(1.0)
    average = WeightAverage(layer, decay=0.9)
    with torch.no_grad():
        layer.weight.fill_(5.0)
    with average.applied(layer):
        assert float(layer.weight.detach()[0, 0]) == 1.0
    assert float(layer.weight.detach()[0, 0]) == 5.0
    with pytest.raises(RuntimeError):
        with average.applied(layer):
            raise RuntimeError("evaluation failed")
    assert float(layer.weight.detach()[0, 0]) == 5.0


def test_a_saved_average_loads_back_and_another_models_is_refused():
    layer = _linear(1.0)
    average = WeightAverage(layer, decay=0.9)
    with torch.no_grad():
        layer.weight.fill_(3.0)
    average.update(layer)
    again = WeightAverage(_linear(7.0), decay=0.9)
    again.load(average.tensors())
    assert torch.equal(again.shadow["weight"], average.shadow["weight"]) and again.updates == 1
    with pytest.raises(CheckpointError, match="ckpt: the weight average does not match"):
        WeightAverage(nn.Linear(2, 3), decay=0.9).load({PREFIX + "other": torch.zeros(1)}, source="ckpt")
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(layer, decay=1.0)


def test_the_final_model_is_the_average_and_the_checkpoint_keeps_the_live_weights(tmp_path):
    cfg = tiny_cfg(tmp_path / "ema", ema_decay=0.8, max_steps=4, learning_rate=3e-3)
    metrics = train(cfg, progress=False)
    final = dict(load_model(metrics["model_dir"]).named_parameters())
    saved = load_file(str(tmp_path / "ema" / "run" / "checkpoint" / OPTIMIZER))
    live = dict(load_model(tmp_path / "ema" / "run" / "checkpoint").named_parameters())
    assert int(saved[PREFIX + "_updates"]) == 4
    moved = 0
    for name, param in final.items():
        assert torch.equal(param, saved[PREFIX + name]), name
        moved += not torch.equal(param, live[name])
    assert moved > 0  # the live weights went on past their average
    plain = train(tiny_cfg(tmp_path / "plain", max_steps=4, learning_rate=3e-3), progress=False)
    assert torch.equal(dict(load_model(plain["model_dir"]).named_parameters())["qa_outputs.weight"],
                       live["qa_outputs.weight"])  # the average changes what is saved, not how the run trains


def test_masked_runs_average_only_the_filled_phase_and_resume_exactly(tmp_path):
    common = dict(method="topk", attention_block=[16, 16], target_density=0.5, max_steps=4, fill_steps=2,
                  initial_warmup=0, final_warmup=0, eval_every=1, ema_decay=0.7)
    full = train(tiny_cfg(tmp_path / "a", **common), progress=False)
    saved = load_file(str(tmp_path / "a" / "run" / "checkpoint" / OPTIMIZER))
    assert int(saved[PREFIX + "_updates"]) == 2  # the two filled steps, none of the pruning ones
    assert not any(k.endswith("mask_scores") for k in saved if k.startswith(PREFIX))
    # Without a filled phase the structure never stops moving: nothing is averaged.
    unfilled = train(tiny_cfg(tmp_path / "c", **{**common, "fill_steps": 0}), progress=False)
    assert not any(k.startswith(PREFIX) for k in load_file(str(tmp_path / "c" / "run" / "checkpoint" / OPTIMIZER)))
    assert unfilled["step"] == 4

    def stop_at_filled_step(metrics, checkpoint):
        if metrics["step"] == 5:
            raise Stop

    cfg = tiny_cfg(tmp_path / "b", **common)
    with pytest.raises(Stop):
        train(cfg, report=stop_at_filled_step, progress=False)
    resumed = train(cfg, resume_from=tmp_path / "b" / "run" / "checkpoint", progress=False)
    assert resumed["f1"] == full["f1"]
    a, b = load_model(full["model_dir"]), load_model(resumed["model_dir"])
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, "x"])
def test_ema_decay_outside_the_open_unit_interval_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="ema_decay: must be in \\(0, 1\\) or null"):
        RunConfig(ema_decay=bad)


def test_eval_of_a_checkpoint_holding_an_average_says_it_scores_the_live_weights(tmp_path, capsys, caplog):
    import json
    import logging

    from pruning.averaging import holds_average
    from workflows.cli import main

    metrics = train(tiny_cfg(tmp_path / "ema", ema_decay=0.8, max_steps=2, learning_rate=3e-3, eval_limit=2),
                    progress=False)
    checkpoint = tmp_path / "ema" / "run" / "checkpoint"
    assert holds_average(checkpoint) and not holds_average(metrics["model_dir"])
    train(tiny_cfg(tmp_path / "plain", max_steps=1, eval_limit=1), progress=False)
    assert not holds_average(tmp_path / "plain" / "run" / "checkpoint")

    def warnings(model_dir) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="workflows.cli"):
            assert main(["eval", str(model_dir), "--eval-limit", "2", "--no-progress"]) == 0
        capsys.readouterr()
        return [r.getMessage() for r in caplog.records if "ema_decay" in r.getMessage()]

    assert warnings(checkpoint) == [f"{checkpoint} is a training checkpoint of a run with ema_decay: these are its "
                                    "live weights, while the run evaluated their average, which its final model "
                                    "holds; use the final model for the run's figures"]
    assert warnings(metrics["model_dir"]) == []
    assert warnings(tmp_path / "plain" / "run" / "checkpoint") == []
    assert main(["eval", metrics["model_dir"], "--eval-limit", "2", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["exact_match"], result["f1"]) == pytest.approx((metrics["exact_match"], metrics["f1"]))


def test_pack_and_export_of_a_checkpoint_holding_an_average_say_they_take_the_live_weights(tmp_path, capsys, caplog):
    import logging

    from pruning.averaging import holds_average
    from workflows.cli import main

    metrics = train(tiny_cfg(tmp_path / "ema", ema_decay=0.8, max_steps=2, learning_rate=3e-3, eval_limit=2),
                    progress=False)
    checkpoint = tmp_path / "ema" / "run" / "checkpoint"
    final = Path(metrics["model_dir"])
    assert holds_average(checkpoint) and final == checkpoint.parent / "final"

    def warnings(*args: str) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="workflows.cli"):
            assert main(list(args)) == 0
        capsys.readouterr()
        return [r.getMessage() for r in caplog.records if "ema_decay" in r.getMessage()]

    for command in ("pack", "export"):
        flags = ("--questions", "1") + (("--repeats", "1") if command == "pack" else ())
        assert warnings(command, str(checkpoint), str(tmp_path / f"{command}-checkpoint"), *flags) == [
            f"{checkpoint} is a training checkpoint of a run with ema_decay: {command} takes its live weights, while "
            f"the run evaluated their average, which its final model {final} holds; {command} that one for the model "
            "the run scored"]
        assert warnings(command, str(final), str(tmp_path / f"{command}-final"), *flags) == []
