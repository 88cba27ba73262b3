"""The training loop on a tiny random BERT and real SQuAD dev questions."""

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from conftest import renumber_tokens
from pruning import masks, squad
from pruning.checkpoint import MASKS_KEY, load_model, save_model
from pruning.config import ConfigError, RunConfig
from pruning.resources import resolve_data
from pruning.sparsity import sparsity_report
from pruning.trainer import build_model, enter_fill_phase, fused_adamw, mask_schedule, plan, train, train_features

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128)


def tiny_cfg(tmp_path, **overrides) -> RunConfig:
    values = dict(model_config=TINY, train_data="dev", eval_data="dev", train_limit=16, eval_limit=6,
                  max_seq_length=96, doc_stride=32, batch_size=8, max_steps=6, learning_rate=1e-3,
                  output_dir=str(tmp_path / "run"), log_every=100, eval_batch_size=32)
    values.update(overrides)
    return RunConfig(**values)


class Stop(Exception):
    pass


def test_a_few_steps_lower_the_loss(tmp_path):
    seen = []
    cfg = tiny_cfg(tmp_path, max_steps=24, eval_every=2, train_limit=8, eval_limit=2, batch_size=8,
                   learning_rate=3e-3, warmup_ratio=0.0)
    train(cfg, report=lambda m, c: seen.append(m["loss"]), progress=False)
    assert len(seen) == 12
    assert sum(seen[-3:]) / 3 < 0.8 * sum(seen[:3]) / 3


def test_a_new_run_in_an_earlier_runs_directory_removes_its_final_model_before_it_trains(tmp_path):
    """A run stopped part-way must not leave the earlier run's final model beside its own checkpoint."""
    first = train(tiny_cfg(tmp_path, max_steps=2), progress=False)
    final = Path(first["model_dir"])
    assert (final / "model.safetensors").is_file()

    def stop(metrics, checkpoint):
        raise Stop

    with pytest.raises(Stop):
        train(tiny_cfg(tmp_path, max_steps=4, eval_every=2), report=stop, progress=False)
    assert not final.exists()
    assert (tmp_path / "run" / "checkpoint" / "trainer_state.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_before_an_earlier_run_s_outputs_are_removed(tmp_path):
    """Called as a library (the command line checks the device first), a run asking for CUDA on a machine without it
    removed the earlier run's final model and checkpoint, then stopped in torch's assertion."""
    first = train(tiny_cfg(tmp_path, max_steps=2), progress=False)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(ConfigError, match=r"^device cuda: CUDA is not available on this machine \(use cpu\)$"):
        train(tiny_cfg(tmp_path, max_steps=2, device="cuda"), progress=False)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before
    assert (Path(first["model_dir"]) / "model.safetensors").is_file()


def test_an_earlier_final_model_that_is_a_link_is_unlinked_and_what_it_points_at_kept(tmp_path):
    """``final`` or ``checkpoint`` linked to a model kept elsewhere stopped the run in rmtree's "Cannot call rmtree on
    a symbolic link", once the model and data were loaded."""
    kept = train(tiny_cfg(tmp_path / "elsewhere", max_steps=2), progress=False)
    before = sorted(p.name for p in Path(kept["model_dir"]).iterdir())
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "final").symlink_to(kept["model_dir"])
    (tmp_path / "run" / "checkpoint").symlink_to(tmp_path / "elsewhere" / "run" / "checkpoint")
    result = train(tiny_cfg(tmp_path, max_steps=2), progress=False)
    final = tmp_path / "run" / "final"
    assert not final.is_symlink() and Path(result["model_dir"]) == final and (final / "model.safetensors").is_file()
    assert sorted(p.name for p in Path(kept["model_dir"]).iterdir()) == before
    assert (tmp_path / "elsewhere" / "run" / "checkpoint" / "trainer_state.json").is_file()


def test_a_run_whose_model_and_data_moved_resumes_from_where_they_are_now(tmp_path):
    """A run with absolute paths, its directory's parent renamed (another disk, a renamed project): the checkpoint
    compared the paths alone, and its advice, the old paths, named files no longer there. The model and data are
    now recognised by their contents' digests, which checkpoints record."""
    from pruning.checkpoint import STATE

    base = train(tiny_cfg(tmp_path / "base", max_steps=2), progress=False)
    site = tmp_path / "siteA"
    shutil.copytree(base["model_dir"], site / "model")
    shutil.copy(resolve_data("dev"), site / "train.json")

    def at(where, **changes):
        return tiny_cfg(tmp_path, model_config=None, model=str(where / "model"), train_data=str(where / "train.json"),
                        output_dir=str(where / "run"), max_steps=4, eval_every=2, **changes)

    def stop(metrics, checkpoint):
        raise Stop

    with pytest.raises(Stop):
        train(at(site), report=stop, progress=False)
    moved = site.rename(tmp_path / "siteB")
    checkpoint = moved / "run" / "checkpoint"
    state = json.loads((checkpoint / STATE).read_text())
    assert state["config"]["model"] == str(site / "model") and state["step"] == 2

    saved = json.loads((checkpoint / STATE).read_text())
    del saved["model_digest"]  # a checkpoint written before they recorded it: the move is named, not guessed
    (checkpoint / STATE).write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"model \".*siteA/model\" there \(gone from there, and the checkpoint "
                                          r"records no digest of it to recognise it by elsewhere\), "
                                          r"\".*siteB/model\" here"):
        train(at(moved), resume_from=checkpoint, progress=False)
    (checkpoint / STATE).write_text(json.dumps(state))

    other = tmp_path / "other"  # another model at the new place: refused, as before
    shutil.copytree(moved, other)
    (other / "model" / "config.json").write_text((other / "model" / "config.json").read_text() + "\n")
    with pytest.raises(ConfigError, match=r"model \".*siteA/model\" there, \".*other/model\" here"):
        train(at(other), resume_from=other / "run" / "checkpoint", progress=False)

    result = train(at(moved), resume_from=checkpoint, progress=False)
    assert result["step"] == 4 and Path(result["model_dir"]) == moved / "run" / "final"


def test_a_run_resumed_into_an_earlier_runs_directory_removes_its_final_model_before_it_trains(tmp_path):
    """Resumed from another directory's checkpoint into an output_dir that held an earlier run (fineprune's
    --overwrite), the earlier run's final model stayed until the resumed run wrote its own: stopped before that, the
    directory held this run's checkpoint beside another run's final model, which eval would score as this run's."""
    first = train(tiny_cfg(tmp_path / "a", max_steps=4, eval_every=2), progress=False)
    earlier = train(tiny_cfg(tmp_path / "b", max_steps=2, seed=7), progress=False)
    final = Path(earlier["model_dir"])
    assert final.is_dir() and Path(first["model_dir"]).is_dir()

    def stop(metrics, checkpoint):
        raise Stop

    with pytest.raises(Stop):
        train(tiny_cfg(tmp_path / "b", max_steps=6, eval_every=2), resume_from=tmp_path / "a" / "run" / "checkpoint",
              report=stop, progress=False)
    assert not final.exists()
    state = json.loads((tmp_path / "b" / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 6  # the resumed run's checkpoint, not the earlier run's (step 2)
    assert (tmp_path / "a" / "run" / "final").is_dir()  # the run resumed from keeps its own


def test_checkpoint_round_trip_gives_identical_logits(tmp_path, tokenizer):
    cfg = tiny_cfg(tmp_path, method="topk", attention_block=[16, 16], target_density=0.5)
    model, tok = build_model(cfg)
    with torch.no_grad():
        for score in masks.mask_score_parameters(model):
            score.copy_(torch.randn_like(score))
    masks.set_threshold(model, 0.5)
    save_model(model, tok, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    ids = torch.randint(0, 30000, (2, 20))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).start_logits, loaded(input_ids=ids).start_logits)
        assert torch.equal(model(input_ids=ids).end_logits, loaded(input_ids=ids).end_logits)
    assert masks.is_masked(loaded)


def test_dense_checkpoint_with_missing_or_broken_weights_names_the_file(tmp_path):
    from pruning.checkpoint import CheckpointError

    model, tok = build_model(tiny_cfg(tmp_path, method="dense"))
    out = save_model(model, tok, tmp_path / "dense")
    weights = out / "model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot be read as safetensors"):
        load_model(out)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weights file not found"):
        load_model(out)


def _masks_of(model):
    return [m.block_mask().detach().clone() for _, m in masks.masked_modules(model)]


@pytest.mark.parametrize("method", ["topk", "sigmoid_threshold"])
def test_resume_continues_the_schedule_with_identical_masks(tmp_path, method):
    common = dict(method=method, attention_block=[16, 16], target_density=0.3, max_steps=6, eval_every=3,
                  mask_lr=0.5, lambda_attention=20.0, lambda_ffn=20.0, initial_warmup=1, final_warmup=1)
    full = train(tiny_cfg(tmp_path / "a", **common), progress=False)

    def stop_at_first(metrics, checkpoint):
        assert metrics["step"] == 3 and checkpoint is not None
        raise Stop

    cfg_b = tiny_cfg(tmp_path / "b", **common)
    with pytest.raises(Stop):
        train(cfg_b, report=stop_at_first, progress=False)
    state = json.loads((tmp_path / "b" / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3
    steps = []
    resumed = train(cfg_b, report=lambda m, c: steps.append(m["step"]),
                    resume_from=tmp_path / "b" / "run" / "checkpoint", progress=False)
    assert steps == [6]
    a, b = load_model(full["model_dir"]), load_model(resumed["model_dir"])
    for mask_a, mask_b in zip(_masks_of(a), _masks_of(b)):
        assert torch.equal(mask_a, mask_b)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa, pb, atol=1e-5), name
    assert resumed["f1"] == pytest.approx(full["f1"])


def test_the_optimizer_steps_with_the_fused_kernel_and_matches_the_loop(tmp_path):
    from pruning.trainer import _optimizer

    cfg = tiny_cfg(tmp_path, method="topk", attention_block=[16, 16], target_density=0.5, weight_decay=0.1)
    model, _ = build_model(cfg)
    twin = build_model(cfg)[0]
    twin.load_state_dict(model.state_dict())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fused = _optimizer(model, cfg)
    assert fused.defaults["fused"] is True
    loop = _optimizer(twin, cfg)
    for group in loop.param_groups:  # the same groups, stepped by torch's loop over parameters instead
        group["fused"], group["foreach"] = None, False
    for step in range(3):
        grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        for net in (model, twin):
            for name, param in net.named_parameters():
                param.grad = grads[name].clone()
        fused.step()
        loop.step()
    # All three groups moved (mask scores at their own rate, weights with decay, biases without), and alike.
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert not torch.equal(a, before[name]), name
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name
    # Where torch has no fused kernel (the meta device of the device checks), torch's default stays.
    assert fused_adamw([torch.zeros(2, device="meta")]) is None
    assert fused_adamw([torch.zeros(2), torch.zeros(2, device="meta")]) is None


def _windows_of_lengths(lengths: torch.Tensor, width: int = 96) -> dict[str, torch.Tensor]:
    mask = (torch.arange(width) < lengths[:, None]).long()
    return {"input_ids": mask.clone(), "attention_mask": mask, "token_type_ids": torch.zeros_like(mask)}


def _padded_tokens(batches, lengths) -> int:
    return sum(len(b) * int(lengths[b].max()) for b in batches)


@pytest.mark.parametrize("grouped", [False, True])
def test_every_window_comes_once_an_epoch_in_the_same_order_after_a_resume(tmp_path, grouped):
    from itertools import islice

    from pruning.batches import micro_batches

    lengths = torch.randint(20, 97, (203,), generator=torch.Generator().manual_seed(0))
    features = _windows_of_lengths(lengths)
    cfg = tiny_cfg(tmp_path, batch_size=8, group_by_length=grouped)
    per_epoch = 26  # ceil(203 / 8): the last batch of an epoch holds 3 windows
    batches = list(islice(micro_batches(features, cfg), 3 * per_epoch))
    epochs = [torch.cat(batches[i * per_epoch:(i + 1) * per_epoch]) for i in range(3)]
    for epoch in epochs:
        assert torch.equal(epoch.sort().values, torch.arange(203))
    assert not torch.equal(epochs[0], epochs[1])
    assert sorted(len(b) for b in batches[:per_epoch]) == [3] + [8] * 25
    resumed = list(islice(micro_batches(features, cfg, start_micro=37), 3 * per_epoch - 37))
    assert all(torch.equal(a, b) for a, b in zip(resumed, batches[37:], strict=True))


def test_batches_grouped_by_length_need_less_padding(tmp_path):
    from itertools import islice

    from pruning.batches import micro_batches

    # As SQuAD's windows: a third at the full width, the rest shorter.
    generator = torch.Generator().manual_seed(1)
    lengths = torch.where(torch.rand(600, generator=generator) < 1 / 3, 96,
                          torch.randint(40, 96, (600,), generator=generator))
    features = _windows_of_lengths(lengths)
    padded = {}
    for grouped in (False, True):
        cfg = tiny_cfg(tmp_path, batch_size=16, group_by_length=grouped)
        padded[grouped] = _padded_tokens(list(islice(micro_batches(features, cfg), 38)), lengths)
    assert padded[False] == 600 * 96  # every batch drawn at random holds a full window
    assert padded[True] < 0.9 * padded[False]
    assert padded[True] >= int(lengths.sum())
    with pytest.raises(ConfigError, match="group_by_length: must be true or false, got 'yes'"):
        tiny_cfg(tmp_path, group_by_length="yes")


def test_a_run_grouped_by_length_trains_and_saves(tmp_path):
    steps = []
    result = train(tiny_cfg(tmp_path, group_by_length=True, max_steps=3, train_limit=24),
                   report=lambda m, c: steps.append(m["step"]), progress=False)
    assert steps == [3] and 0.0 <= result["f1"] <= 100.0
    assert sparsity_report(load_model(result["model_dir"])).linear_density == 1.0


def test_lambda_lowers_density_over_steps(tmp_path):
    densities = []
    cfg = tiny_cfg(tmp_path, method="sigmoid_threshold", attention_block=[16, 16], max_steps=12, eval_every=4,
                   mask_lr=0.5, lambda_attention=50.0, lambda_ffn=50.0, initial_warmup=0, final_warmup=2)
    train(cfg, report=lambda m, c: densities.append(m["linear_density"]), progress=False)
    assert densities[-1] < 0.9
    assert densities == sorted(densities, reverse=True)


def test_topk_reaches_the_target_at_the_end_and_fill_keeps_structure(tmp_path):
    seen = []
    cfg = tiny_cfg(tmp_path, method="topk", attention_block=[16, 16], target_density=0.5, max_steps=6,
                   eval_every=6, fill_steps=2, initial_warmup=1, final_warmup=1)
    p = plan(cfg, 100)
    assert mask_schedule(cfg, p, p.prune_steps - p.final_warmup)[0] == 0.5
    assert mask_schedule(cfg, p, 0)[0] == 1.0
    result = train(cfg, report=lambda m, c: seen.append(m), progress=False)
    at_end_of_pruning, final = seen[0], seen[-1]
    assert at_end_of_pruning["step"] == 6 and final["step"] == 8
    model = load_model(result["model_dir"])
    # filled: the structure (heads, FFN dims) is what pruning left; kept heads are dense again
    assert final["heads_removed"] == at_end_of_pruning["heads_removed"]
    assert [final[f"ffn_kept_layer_{i}"] for i in range(2)] == [at_end_of_pruning[f"ffn_kept_layer_{i}"] for i in range(2)]
    assert all(m.mode == "fixed" for _, m in masks.masked_modules(model))
    for i, (layer, s) in enumerate(zip(model.bert.encoder.layer, sparsity_report(model).layers)):
        assert int(s.ffn_kept.sum()) == 64  # topk kept exactly half of the 128 FFN dims
        value = layer.attention.self.value.to_linear().weight.reshape(4, 16, 64)
        for head, kept in enumerate(s.heads_kept.tolist()):
            assert bool((value[head] != 0).all()) == kept


@pytest.mark.parametrize("method,target", [("topk", {"target_density": 0.5}),
                                           ("sigmoid_threshold", {"final_threshold": 0.9})])
@pytest.mark.parametrize("fill_steps", [0, 1])
def test_a_run_without_final_warmup_ends_at_its_target(tmp_path, method, target, fill_steps):
    """The last pruning step is at the schedule's target, so the final masks are too, with or without a filled
    phase after it."""
    seen = []
    cfg = tiny_cfg(tmp_path, method=method, attention_block=[16, 16], max_steps=4, eval_every=1,
                   fill_steps=fill_steps, initial_warmup=0, final_warmup=0, **target)
    result = train(cfg, report=lambda m, c: seen.append(m), progress=False)
    final_value = next(iter(target.values()))
    assert [m["threshold"] for m in seen][3] == final_value  # step 4, the last pruning step
    recorded = json.loads((Path(result["model_dir"]) / "config.json").read_text())[MASKS_KEY]
    kept_at = recorded["fill_from"]["threshold"] if fill_steps else recorded["threshold"]
    assert kept_at == final_value
    if method == "topk":
        report = sparsity_report(load_model(result["model_dir"]))
        assert all(int(s.ffn_kept.sum()) == 64 for s in report.layers)  # exactly half of the 128 FFN dims


def test_an_initial_warmup_over_every_pruning_step_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="initial_warmup: 6 steps leave none of the 6 pruning steps"):
        plan(tiny_cfg(tmp_path, method="topk", initial_warmup=6, final_warmup=0, max_steps=6), 10)
    assert plan(tiny_cfg(tmp_path, method="topk", initial_warmup=5, final_warmup=1, max_steps=6), 10).prune_steps == 6


def test_distillation_term_is_reported(tmp_path):
    teacher = train(tiny_cfg(tmp_path / "t", max_steps=2), progress=False)
    seen = []
    cfg = tiny_cfg(tmp_path / "s", method="topk", attention_block=[16, 16], target_density=0.5, max_steps=2,
                   eval_every=2, teacher=teacher["model_dir"], initial_warmup=0, final_warmup=0)
    train(cfg, report=lambda m, c: seen.append(m), progress=False)
    assert seen[-1]["loss_distil"] > 0
    assert seen[-1]["loss"] == pytest.approx(0.1 * seen[-1]["loss_ce"] + 0.9 * seen[-1]["loss_distil"], rel=1e-5)


def test_block_shape_must_divide_the_model(tmp_path):
    with pytest.raises(ConfigError, match="attention_block"):
        build_model(tiny_cfg(tmp_path, method="topk", attention_block=[24, 16]))


def test_warmups_longer_than_the_run_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="initial_warmup"):
        plan(tiny_cfg(tmp_path, method="topk", initial_warmup=5, final_warmup=5, max_steps=6), 10)


@pytest.mark.parametrize("method", ["topk", "sigmoid_threshold"])
def test_warmup_fractions_that_add_up_to_one_fit_a_run_of_odd_steps(tmp_path, method):
    """0.5 and 0.5 of 7 steps are 3.5 each: both rounded up to 4 they took 8 of the 7 steps and the run was refused."""
    for max_steps in (None, 7):
        cfg = tiny_cfg(tmp_path, method=method, max_steps=max_steps, epochs=1.0, grad_accum=1, batch_size=1,
                       initial_warmup=0.5, final_warmup=0.5)
        p = plan(cfg, 7)
        assert (p.prune_steps, p.initial_warmup, p.final_warmup) == (7, 4, 3)
    assert plan(dataclasses.replace(cfg, max_steps=9), 7).final_warmup == 4  # 4.5 and 4.5: 4 + 4, as before


def test_warmups_over_a_run_of_known_steps_are_refused_before_the_data_is_read(tmp_path, caplog):
    cfg = tiny_cfg(tmp_path, method="topk", attention_block=[16, 16], max_steps=6, initial_warmup=4, final_warmup=4)
    with caplog.at_level(logging.INFO, logger="pruning"), pytest.raises(
            ConfigError, match=r"^initial_warmup \+ final_warmup: 4 \+ 4 steps exceed the 6 pruning steps$"):
        train(cfg, progress=False)
    assert "tokenizing" not in caplog.text
    assert not Path(cfg.output_dir).exists()
    with caplog.at_level(logging.INFO, logger="pruning"), pytest.raises(ConfigError, match="initial_warmup: 6 steps"):
        train(dataclasses.replace(cfg, initial_warmup=6, final_warmup=0), progress=False)
    assert "tokenizing" not in caplog.text


@pytest.mark.parametrize("method,global_topk", [("topk", False), ("topk", True), ("sigmoid_threshold", False)])
def test_filled_phase_starts_from_exactly_the_pruned_model(method, global_topk):
    """Entering the filled phase changes no output: pruned weights inside kept heads come back as zeros, and the
    biases of pruned rows too (random biases, as a trained model's: BERT starts them at zero)."""
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.bias.normal_()
    masks.apply_masks_(model, method, (16, 16))
    with torch.no_grad():
        for score in masks.mask_score_parameters(model):
            score.copy_(torch.randn_like(score))
    masks.set_threshold(model, 0.5 if method == "topk" else 0.6, global_topk=global_topk)
    g = torch.Generator().manual_seed(1)
    x = dict(input_ids=torch.randint(0, 100, (2, 16), generator=g), token_type_ids=torch.zeros(2, 16, dtype=torch.long),
             attention_mask=torch.ones(2, 16, dtype=torch.long))
    query = model.bert.encoder.layer[0].attention.self.query
    pruned_blocks = ~query.block_mask().detach().bool()
    with torch.no_grad():
        before = model(**x)
        enter_fill_phase(model)
        after = model(**x)
    torch.testing.assert_close(after.start_logits, before.start_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(after.end_logits, before.end_logits, atol=1e-5, rtol=0)
    # The blocks pruned before the filled phase hold zeros now, whether or not their head was kept.
    weight = query.weight.detach().reshape(4, 16, 4, 16)
    assert pruned_blocks.any()
    assert (weight.permute(0, 2, 1, 3)[pruned_blocks] == 0).all()
    assert query.mode == "fixed"


def test_dropout_override_makes_training_passes_deterministic_and_leaves_the_saved_config(tmp_path):
    from pruning.trainer import set_dropout_

    model = BertForQuestionAnswering(BertConfig(vocab_size=50, **TINY)).train()
    inputs = {"input_ids": torch.randint(0, 50, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    with torch.no_grad():
        assert not torch.equal(model(**inputs).start_logits, model(**inputs).start_logits)  # 0.1 by default
        assert set_dropout_(model, 0.0) > 0
        assert torch.equal(model(**inputs).start_logits, model(**inputs).start_logits)
    # The same seeded run with and without the override: only the dropout differs, and the losses with it.
    losses = {}
    for name, dropout in (("model", None), ("none", 0.0)):
        seen = []
        metrics = train(tiny_cfg(tmp_path / name, dropout=dropout, max_steps=2, eval_every=1),
                        report=lambda m, c: seen.append(m["loss"]), progress=False)
        losses[name] = seen
    assert losses["model"] != losses["none"]
    assert load_model(metrics["model_dir"]).config.hidden_dropout_prob == 0.1  # the model's own, as saved
    for bad in (1.0, -0.1, "x"):
        with pytest.raises(ConfigError, match="dropout: must be in \\[0, 1\\) or null"):
            RunConfig(dropout=bad)


@pytest.mark.parametrize("source", ["model_config", "model_dir", "teacher"])
def test_windows_longer_than_the_model_are_cut_to_its_positions(tmp_path, caplog, source):
    import logging
    import math

    short = {**TINY, "max_position_embeddings": 64}
    model, tok = build_model(tiny_cfg(tmp_path, model_config=short))
    save_model(model, tok, tmp_path / "short")
    overrides = {"model_config": dict(model_config=short),
                 "model_dir": dict(model=str(tmp_path / "short"), model_config=None),
                 "teacher": dict(teacher=str(tmp_path / "short"))}[source]
    cfg = tiny_cfg(tmp_path, max_seq_length=96, doc_stride=48, max_steps=2, train_limit=4, eval_limit=2,
                   **overrides)
    with caplog.at_level(logging.WARNING, logger="pruning.trainer"):
        metrics = train(cfg, progress=False)
    cut = [r.getMessage() for r in caplog.records if "max_seq_length 96 exceeds" in r.getMessage()]
    owner = "the teacher" if source == "teacher" else "the model"
    assert cut == [f"max_seq_length 96 exceeds the 64 position embeddings of {owner}: training and evaluation use "
                   f"windows of 64 tokens with doc_stride 32"]
    assert math.isfinite(metrics["f1"]) and metrics["step"] == 2
    # The checkpoint records the config as given, so that the run resumes with the same one.
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert (state["config"]["max_seq_length"], state["config"]["doc_stride"]) == (96, 48)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o002, 0o775)], ids=["umask022", "umask002"])
def test_model_directories_and_their_files_get_the_modes_mkdir_and_open_give(tmp_path, umask, mode):
    import os
    import stat

    old = os.umask(umask)
    try:
        metrics = train(tiny_cfg(tmp_path, max_steps=1, train_limit=2, eval_limit=1), progress=False)
        train(tiny_cfg(tmp_path, max_steps=1, train_limit=2, eval_limit=1), progress=False)  # replaces both
    finally:
        os.umask(old)
    for path in (tmp_path / "run" / "final", tmp_path / "run" / "checkpoint"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
        # Every file, the weights (which safetensors writes 0600) included, has the mode open gives.
        for file in path.iterdir():
            assert stat.S_IMODE(file.stat().st_mode) == mode & 0o666, file
    assert metrics["model_dir"] == str(tmp_path / "run" / "final")


def test_resuming_under_a_different_run_config_is_refused(tmp_path):
    import dataclasses

    cfg = tiny_cfg(tmp_path, method="topk", attention_block=[16, 64], max_steps=2, train_limit=4, eval_limit=1)
    train(cfg, progress=False)
    checkpoint = tmp_path / "run" / "checkpoint"
    written = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}
    other = tiny_cfg(tmp_path / "other", method="sigmoid_threshold", attention_block=[16, 16], max_steps=2,
                     train_limit=4, eval_limit=1)
    with pytest.raises(ConfigError) as err:
        train(other, resume_from=checkpoint, progress=False)
    assert str(err.value) == (f'{checkpoint}: written under a different run config (method "topk" there, '
                              f'"sigmoid_threshold" here; attention_block [16, 64] there, [16, 16] here); resume '
                              f'with the config it was written with')
    assert not (tmp_path / "other").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match=r"\(train_limit 4 there, 8 here\)"):
        train(dataclasses.replace(cfg, train_limit=8), resume_from=checkpoint, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()} == written
    # Where the outputs go, evaluation, logging and the device may change on resume.
    again = dataclasses.replace(cfg, output_dir=str(tmp_path / "again"), eval_limit=2, eval_every=1, log_every=1,
                                device="cpu")
    assert train(again, resume_from=checkpoint, progress=False)["step"] == 2


def test_a_sigmoid_threshold_run_resumed_with_other_lambdas_is_refused(tmp_path):
    """The L1 weights ramp with the threshold and set the density the run reaches, as target_density does for
    topk: a resume under other lambdas would not continue the run it names."""
    cfg = tiny_cfg(tmp_path, method="sigmoid_threshold", attention_block=[16, 16], max_steps=4, eval_every=2,
                   train_limit=4, eval_limit=1, lambda_attention=20.0, lambda_ffn=20.0, final_warmup=0)

    def stop_at_first(metrics, checkpoint):
        raise Stop

    with pytest.raises(Stop):
        train(cfg, report=stop_at_first, progress=False)
    checkpoint = tmp_path / "run" / "checkpoint"
    for key in ("lambda_attention", "lambda_ffn"):
        with pytest.raises(ConfigError, match=rf"\({key} 20\.0 there, 40\.0 here\); resume with the config"):
            train(dataclasses.replace(cfg, **{key: 40.0}), resume_from=checkpoint, progress=False)
    resumed = train(cfg, resume_from=checkpoint, progress=False)
    assert resumed["step"] == 4 and resumed["lambda_attention"] == 20.0

@pytest.mark.parametrize("max_grad_norm", [0, None])
def test_max_grad_norm_zero_or_null_turns_clipping_off_and_the_weights_train(tmp_path, max_grad_norm):
    from pruning.trainer import seed_everything

    cfg = tiny_cfg(tmp_path, max_steps=2, max_grad_norm=max_grad_norm, warmup_ratio=0.0)
    seed_everything(cfg.seed)
    start = build_model(cfg)[0].state_dict()
    trained = load_model(train(cfg, progress=False)["model_dir"]).state_dict()
    moved = [name for name, value in start.items() if value.is_floating_point()
             and not torch.equal(value, trained[name])]
    assert "bert.encoder.layer.0.attention.self.query.weight" in moved and "qa_outputs.weight" in moved
    with pytest.raises(ConfigError, match="max_grad_norm"):
        tiny_cfg(tmp_path, max_grad_norm=-1.0)


def test_a_random_model_with_fewer_embeddings_than_the_tokenizer_has_tokens_is_refused(tmp_path):
    cfg = tiny_cfg(tmp_path, model_config={**TINY, "vocab_size": 100})
    with pytest.raises(ConfigError, match=r"model_config.vocab_size: 100 is smaller than the tokenizer's 30522 tokens"):
        build_model(cfg)


def test_optimizer_state_of_another_parameter_list_is_refused_not_shifted(tmp_path):
    """Moments numbered for one list of trained parameters must not land on the parameters of another."""
    from pruning.checkpoint import CheckpointError, optimizer_tensors, restore_optimizer
    from pruning.trainer import _optimizer

    cfg = tiny_cfg(tmp_path, method="sigmoid_threshold", attention_block=[16, 16])
    model = build_model(cfg)[0]
    optimizer = _optimizer(model, cfg)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    tensors = optimizer_tensors(optimizer)
    twin = build_model(cfg)[0]
    restore_optimizer(_optimizer(twin, cfg), tensors)  # the same parameters: accepted
    frozen = _optimizer(build_model(cfg)[0], dataclasses.replace(cfg, freeze_embeddings=True))
    with pytest.raises(CheckpointError, match=r"^opt.safetensors: optimizer state for \d+ trained parameters, but "
                                              r"this run trains \d+"):
        restore_optimizer(frozen, tensors, source="opt.safetensors")
    assert not frozen.state  # nothing half-restored
    # The other way round, from a checkpoint written before the count was recorded: the shapes tell.
    for param in frozen.param_groups[1]["params"] + frozen.param_groups[2]["params"]:
        param.grad = torch.ones_like(param)
    frozen.step()
    older = {k: v for k, v in optimizer_tensors(frozen).items() if k != "params"}
    unfrozen = _optimizer(twin, cfg)
    with pytest.raises(CheckpointError, match=r"optimizer state state\.\d+\.exp_avg has shape \(128, 64\), but "
                                              r"trained parameter \d+ has shape \(30522, 64\)"):
        restore_optimizer(unfrozen, older, source="opt.safetensors")


def test_resuming_with_other_trained_parameters_or_a_damaged_state_file_is_a_clear_error(tmp_path):
    from pruning.checkpoint import CheckpointError

    cfg = tiny_cfg(tmp_path, max_steps=2, train_limit=4, eval_limit=1)
    train(cfg, progress=False)
    checkpoint = tmp_path / "run" / "checkpoint"
    with pytest.raises(ConfigError, match=r"\(freeze_embeddings false there, true here\)"):
        train(dataclasses.replace(cfg, freeze_embeddings=True), resume_from=checkpoint, progress=False)
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for bad, message in [({"step": "2"}, "step must be an integer >= 0, got '2'"),
                         ({"step": -1}, "step must be an integer >= 0, got -1"),
                         ({"step": None}, "step must be an integer >= 0, got None"),
                         ({"history": {}}, "history must be a list"),
                         # a resume at the run's end read the last entry's step: an AttributeError's traceback
                         ({"history": [{"step": 1}, 1]}, "history\\[1\\] must be a mapping of an evaluation's "
                                                          "metrics, got int")]:
        state_file.write_text(json.dumps({**state, **bad}))
        with pytest.raises(CheckpointError, match=f"trainer_state.json: {message}$"):
            train(cfg, resume_from=checkpoint, progress=False)


def test_a_checkpoint_whose_config_json_records_another_methods_masks_is_refused(tmp_path):
    """A topk checkpoint whose config.json was edited (or copied from another run) to record sigmoid_threshold masks
    resumed without a word, its density schedule read as a threshold: it trained another model (linear density
    0.86 against 0.52, no head removed against 2)."""
    from pruning.checkpoint import CheckpointError

    cfg = tiny_cfg(tmp_path, method="topk", attention_block=[16, 16], target_density=0.5, max_steps=4, eval_every=2)

    def stop(metrics, checkpoint):
        raise Stop

    with pytest.raises(Stop):
        train(cfg, report=stop, progress=False)
    config_file = tmp_path / "run" / "checkpoint" / "config.json"
    written = json.loads(config_file.read_text())
    edits = [({**written["fineprune_masks"], "mode": "sigmoid_threshold"},
              'fineprune_masks.mode: "sigmoid_threshold", but method topk trains "topk" or "cutoff" masks'),
             ({**written["fineprune_masks"], "mode": "fixed",
               "fill_from": {"mode": "sigmoid_threshold", "threshold": 0.1}},
              'fineprune_masks.fill_from.mode: "sigmoid_threshold", but method topk trains "topk" or "cutoff" masks'),
             (None, "no fineprune_masks: a dense model, but method topk trains masks")]
    for masks_entry, says in edits:
        edited = {k: v for k, v in written.items() if k != "fineprune_masks"}
        if masks_entry is not None:
            edited["fineprune_masks"] = masks_entry
        config_file.write_text(json.dumps(edited))
        with pytest.raises(CheckpointError) as err:
            train(cfg, resume_from=config_file.parent, progress=False)
        assert str(err.value) == f"{config_file}: {says} (the file was edited or comes from another run)"
    config_file.write_text(json.dumps(written))
    assert train(cfg, resume_from=config_file.parent, progress=False)["step"] == 4


@pytest.mark.parametrize("scope", ["global", "per_matrix"])
def test_a_topk_run_resumes_in_its_filled_phase_whatever_its_scope(tmp_path, scope):
    """A global topk keeps the blocks above one cut-off of all its scores (``cutoff`` masks), a per-matrix one
    ``topk`` masks: either resumes, in its filled phase too, where its masks record what they were fixed from."""
    cfg = tiny_cfg(tmp_path, method="topk", attention_block=[16, 16], target_density=0.5, max_steps=4, fill_steps=4,
                   eval_every=6, topk_scope=scope)

    def stop(metrics, checkpoint):
        raise Stop

    with pytest.raises(Stop):
        train(cfg, report=stop, progress=False)
    masks_entry = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["fineprune_masks"]
    assert masks_entry["mode"] == "fixed"
    assert masks_entry["fill_from"]["mode"] == ("cutoff" if scope == "global" else "topk")
    assert train(cfg, resume_from=tmp_path / "run" / "checkpoint", progress=False)["step"] == 8


def test_a_distillation_the_teacher_cannot_give_is_refused_before_the_first_step(tmp_path):
    with pytest.raises(ConfigError, match=r"^alpha_hidden: 0.5 weighs a hidden-state MSE to the teacher, but no "
                                          r"teacher is set$"):
        train(tiny_cfg(tmp_path / "none", alpha_hidden=0.5), progress=False)
    narrow = tiny_cfg(tmp_path / "t", model_config={**TINY, "hidden_size": 32, "num_attention_heads": 2}, max_steps=1,
                      train_limit=2, eval_limit=1)
    teacher = train(narrow, progress=False)["model_dir"]
    with pytest.raises(ConfigError, match=r"^alpha_hidden: the hidden-state MSE needs a teacher with the student's "
                                          r"layers and width, but the teacher has 2 layers of 32 and the student 2 "
                                          r"of 64$"):
        train(tiny_cfg(tmp_path / "s", teacher=teacher, alpha_hidden=1.0), progress=False)
    assert not (tmp_path / "s" / "run" / "checkpoint").exists()
    # Logit distillation alone takes a teacher of any shape.
    assert train(tiny_cfg(tmp_path / "s", teacher=teacher, max_steps=1, train_limit=2, eval_limit=1),
                 progress=False)["step"] == 1
    small_vocab = tiny_cfg(tmp_path / "v", model_config={**TINY, "vocab_size": 30522}, max_steps=1)
    model, tokenizer = build_model(small_vocab)
    model.resize_token_embeddings(1000)
    save_model(model, tokenizer, tmp_path / "small-vocab")
    with pytest.raises(ConfigError, match=r"teacher: .*small-vocab embeds 1000 tokens, fewer than the student's "
                                          r"tokenizer has \(30522\)"):
        train(tiny_cfg(tmp_path / "s2", teacher=str(tmp_path / "small-vocab")), progress=False)


def _damage_config(path, change):
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(fineprune_masks="x"), "fineprune_masks: expected an object, got 'x'"),
    (lambda c: c["fineprune_masks"].update(attention_block="ab"), "fineprune_masks.attention_block: invalid value 'ab'"),
    (lambda c: c["fineprune_masks"].update(mode="fixed", fill_from={"mode": "bogus", "threshold": 0.4}),
     "fineprune_masks.fill_from.mode: invalid value 'bogus'"),
    (lambda c: c.update(hidden_size="x"), "invalid bert config"),
    # NaN or infinity masked every weight off without a word, or stopped topk in a traceback.
    (lambda c: c["fineprune_masks"].update(mode="topk", threshold=float("nan")),
     "fineprune_masks.threshold: invalid value nan, expected a density in (0, 1]"),
    (lambda c: c["fineprune_masks"].update(mode="topk", threshold=1.5),
     "fineprune_masks.threshold: invalid value 1.5, expected a density in (0, 1]"),
    (lambda c: c["fineprune_masks"].update(mode="fixed", fill_from={"mode": "cutoff", "threshold": float("inf")}),
     "fineprune_masks.fill_from.threshold: invalid value inf, expected a finite number"),
    (lambda c: c["fineprune_masks"].update(mode="sigmoid_threshold", threshold=float("-inf")),
     "fineprune_masks.threshold: invalid value -inf, expected a finite number"),
], ids=["masks", "block", "fill_from", "hidden_size", "topk_nan", "topk_above_one", "fill_inf", "sigmoid_inf"])
def test_a_masked_checkpoint_with_a_damaged_config_names_the_file_and_entry(tmp_path, masked_checkpoint, change,
                                                                            message):
    import shutil

    from pruning.checkpoint import CheckpointError

    damaged = tmp_path / "damaged"
    shutil.copytree(masked_checkpoint, damaged)
    _damage_config(damaged, change)
    with pytest.raises(CheckpointError) as err:
        load_model(damaged)
    assert str(err.value).startswith(f"{damaged / 'config.json'}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_masked_checkpoint_whose_weights_do_not_fit_its_block_shape_names_the_tensor(tmp_path, masked_checkpoint):
    import shutil

    from pruning.checkpoint import CheckpointError

    damaged = tmp_path / "damaged"
    shutil.copytree(masked_checkpoint, damaged)
    _damage_config(damaged, lambda c: c["fineprune_masks"].update(attention_block=[32, 32]))
    with pytest.raises(CheckpointError, match=r"model.safetensors: weights do not match the config \(bert\.encoder\."
                                              r"layer\.0\.attention\.[\w.]+\.mask_scores has shape \(4, 4\), the "
                                              r"config gives \(2, 2\)\)$"):
        load_model(damaged)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_checkpoint_carries_the_cuda_generator_so_dropout_resumes_with_the_same_draws(tmp_path):
    from pruning.checkpoint import optimizer_tensors, restore_optimizer
    from pruning.trainer import _optimizer

    cfg = tiny_cfg(tmp_path, device="cuda")
    model = build_model(cfg)[0].to("cuda")
    optimizer = _optimizer(model, cfg)
    torch.rand(3, device="cuda")
    tensors = optimizer_tensors(optimizer)
    expected = torch.rand(1000, device="cuda")  # what the next dropout of the uninterrupted run draws from
    torch.cuda.manual_seed_all(cfg.seed)  # a resumed process starts from the seed
    restore_optimizer(_optimizer(model, cfg), tensors)
    assert torch.equal(torch.rand(1000, device="cuda"), expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_a_checkpoint_of_a_gpu_run_resumes_on_the_cpu_and_says_its_dropout_draws_differ(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    def stop(metrics, checkpoint):
        raise Stop

    cfg = tiny_cfg(tmp_path, max_steps=4, eval_every=2, eval_limit=2, train_limit=8)
    with pytest.raises(Stop):
        train(cfg, report=stop, progress=False)
    checkpoint = Path(cfg.output_dir) / "checkpoint"
    tensors = load_file(str(checkpoint / "optimizer.safetensors"))
    assert not any(k.startswith("rng.cuda.") for k in tensors)  # a CPU run draws from the CPU's generator alone
    # What a run on a machine with two GPUs writes beside it: each device's generator state (seed and offset).
    for device in (0, 1):
        tensors[f"rng.cuda.{device}"] = torch.arange(16, dtype=torch.uint8)
    save_file(tensors, str(checkpoint / "optimizer.safetensors"))
    with caplog.at_level("WARNING", logger="pruning.checkpoint"):
        resumed = train(cfg, resume_from=checkpoint, progress=False)
    assert resumed["step"] == 4
    lines = [r.getMessage() for r in caplog.records if r.name == "pruning.checkpoint"]
    assert lines == [f"{checkpoint / 'optimizer.safetensors'}: written by a run on a GPU, resumed on the CPU: dropout "
                     "after the resume draws other numbers than the uninterrupted run would"]


def test_a_run_that_diverges_stops_at_its_first_non_finite_step_and_keeps_its_last_checkpoint(tmp_path):
    from pruning.trainer import TrainingDiverged

    cfg = tiny_cfg(tmp_path, max_steps=6, save_every=1, learning_rate=1e30, warmup_ratio=0.0, max_grad_norm=None)
    with pytest.raises(TrainingDiverged, match=r"^step 2: the training loss is nan \(ce nan, .*learning_rate 1e\+30 "
                                               r".*the last checkpoint, of step 1, is kept$"):
        train(cfg, progress=False)
    run = Path(cfg.output_dir)
    assert not (run / "final").exists()
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 1
    kept = load_model(run / "checkpoint")
    assert all(torch.isfinite(value).all() for value in kept.state_dict().values() if value.is_floating_point())


def test_a_clipped_run_whose_gradients_overflow_stops_on_the_gradient_norm(tmp_path):
    from pruning.trainer import TrainingDiverged

    cfg = tiny_cfg(tmp_path, max_steps=3, learning_rate=1e30, warmup_ratio=0.0, max_grad_norm=1.0)
    with pytest.raises(TrainingDiverged, match=r"^step \d: the (training loss|gradient norm) is (nan|inf)"):
        train(cfg, progress=False)
    assert not (Path(cfg.output_dir) / "final").exists()


def test_a_teacher_whose_tokenizer_numbers_tokens_otherwise_is_refused(tmp_path):
    """Same vocabulary size, other ids: the teacher would read other words from the student's ids."""
    cfg = tiny_cfg(tmp_path / "t", max_steps=1, train_limit=2, eval_limit=1)
    model, tokenizer = build_model(cfg)
    save_model(model, tokenizer, tmp_path / "other-ids")
    renumber_tokens(tmp_path / "other-ids")
    with pytest.raises(ConfigError, match=r"^teacher: .*other-ids has a tokenizer of 30522 tokens that numbers 1000 "
                                          r"of the student's 30522 tokens differently"):
        train(tiny_cfg(tmp_path / "s", teacher=str(tmp_path / "other-ids")), progress=False)
    assert not (tmp_path / "s" / "run" / "checkpoint").exists()
    save_model(model, tokenizer, tmp_path / "same-ids")  # the student's own tokenizer passes
    assert train(tiny_cfg(tmp_path / "s", teacher=str(tmp_path / "same-ids"), max_steps=1, train_limit=2,
                          eval_limit=1), progress=False)["step"] == 1


def test_a_teacher_whose_tokenizer_adds_tokens_to_the_students_is_accepted(tmp_path):
    """Extra tokens after the student's, every student token at its own id: the teacher reads the student's ids as
    the student does (a sweep's space check passes it too), so it is no reason to refuse the run."""
    cfg = tiny_cfg(tmp_path / "t", max_steps=1, train_limit=2, eval_limit=1)
    model, tokenizer = build_model(cfg)
    tokenizer.add_tokens(["zzqqxx"])
    save_model(model, tokenizer, tmp_path / "more-tokens")
    assert train(tiny_cfg(tmp_path / "s", teacher=str(tmp_path / "more-tokens"), max_steps=1, train_limit=2,
                          eval_limit=1), progress=False)["step"] == 1


def test_a_run_scored_on_its_own_training_questions_says_so(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="pruning.trainer"):
        train(tiny_cfg(tmp_path / "same", max_steps=1, train_limit=4, eval_limit=2), progress=False)
    assert "2 of the 2 evaluation questions are training questions too" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pruning.trainer"):
        train(tiny_cfg(tmp_path / "held-out", max_steps=1, train_data="train", train_limit=4, eval_limit=2),
              progress=False)
    assert "evaluation questions are training questions" not in caplog.text


def test_training_windows_cut_questions_to_the_run_configs_max_query_length(tokenizer, dev_subset, tmp_path):
    from pruning import squad
    from pruning.trainer import train_features

    examples = dev_subset[:4]
    for cache_dir in (None, str(tmp_path / "cache")):
        for length in (64, 6):
            cfg = RunConfig(train_data="dev", train_limit=4, max_seq_length=96, doc_stride=32,
                            max_query_length=length, cache_dir=cache_dir)
            expected = squad.prepare_train_features(examples, tokenizer, 96, 32, max_query_length=length)
            features = train_features(cfg, examples, tokenizer)  # the cache keeps one set of windows per length
            assert all(torch.equal(features[key], expected[key]) for key in expected)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_the_feature_cache_follows_the_data_files_contents(tokenizer, tmp_path):
    """An in-place edit that keeps the file's size and modification second must not reuse the old windows."""
    import os

    from pruning import squad
    from pruning.trainer import train_features

    def squad_file(answer: str) -> dict:
        context = f"The capital of France is {answer}."
        return {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
            {"id": "q1", "question": "What is the capital of France?",
             "answers": [{"text": answer, "answer_start": context.index(answer)}]}]}]}]}

    data = tmp_path / "train.json"
    data.write_text(json.dumps(squad_file("Paris")))
    stat = data.stat()
    cfg = RunConfig(train_data=str(data), max_seq_length=64, doc_stride=16, cache_dir=str(tmp_path / "cache"))
    first = train_features(cfg, squad.load_squad(data), tokenizer)
    assert all(torch.equal(train_features(cfg, [], tokenizer)[key], first[key]) for key in first)  # read back
    assert len(list((tmp_path / "cache").iterdir())) == 1
    data.write_text(json.dumps(squad_file("Lyon.")))  # same length, a different answer span
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data.stat().st_size == stat.st_size
    examples = squad.load_squad(data)
    again = train_features(cfg, examples, tokenizer)
    expected = squad.prepare_train_features(examples, tokenizer, max_seq_length=64, doc_stride=16)
    assert all(torch.equal(again[key], expected[key]) for key in expected)
    assert not all(torch.equal(again[key], first[key]) for key in first)


def test_the_feature_cache_follows_the_side_the_tokenizer_cuts_a_long_context_from(tokenizer, dev_subset, tmp_path):
    """The key left out the tokenizer's truncation side: windows cut from a context's start (a tokenizer_config.json
    saying ``truncation_side: left``, read as it was before the tokenizer was loaded right-sided) were read back
    for windows cut from its end."""
    import copy

    from pruning import squad
    from pruning.trainer import train_features

    cfg = RunConfig(train_data="dev", train_limit=4, max_seq_length=64, doc_stride=16, cache_dir=str(tmp_path))
    right = train_features(cfg, dev_subset[:4], tokenizer)
    left_tokenizer = copy.deepcopy(tokenizer)
    left_tokenizer.truncation_side = "left"
    left = train_features(cfg, dev_subset[:4], left_tokenizer)
    expected = squad.prepare_train_features(dev_subset[:4], left_tokenizer, max_seq_length=64, doc_stride=16)
    assert all(torch.equal(left[key], expected[key].to(left[key].dtype)) for key in expected)
    ids = left["input_ids"], right["input_ids"]
    assert ids[0].shape != ids[1].shape or not torch.equal(*ids)  # other windows indeed
    assert len(list(tmp_path.glob("train-features-*.safetensors"))) == 2
    again = train_features(cfg, [], tokenizer)  # read back: the right-sided windows
    assert all(torch.equal(again[key], right[key]) for key in right)


def test_the_feature_cache_is_shared_by_copies_of_one_tokenizer(tokenizer, dev_subset, tmp_path):
    """The key held the directory a tokenizer was read from: with `student_init`, a sweep's trials read the
    tokenizer their teacher saved, so every teacher of a cache tokenized the training set again into an identical
    file (hundreds of megabytes for SQuAD), kept for good."""
    from pruning.tokenizer import load_tokenizer
    from pruning.trainer import train_features

    for name in ("teacher_a", "teacher_b"):
        tokenizer.save_pretrained(tmp_path / name)
    cfg = RunConfig(train_data="dev", train_limit=4, max_seq_length=64, doc_stride=16, cache_dir=str(tmp_path / "c"))
    first = train_features(cfg, dev_subset[:4], load_tokenizer(tmp_path / "teacher_a"))
    again = train_features(cfg, [], load_tokenizer(tmp_path / "teacher_b"))  # read back, not tokenized (no examples)
    assert all(torch.equal(again[key], first[key]) for key in first)
    assert len(list((tmp_path / "c").iterdir())) == 1
    other = load_tokenizer(tmp_path / "teacher_b")
    other.add_special_tokens({"pad_token": "[UNK]"})  # another token pads the windows: other windows
    assert not torch.equal(train_features(cfg, dev_subset[:4], other)["input_ids"], first["input_ids"])
    assert len(list((tmp_path / "c").iterdir())) == 2


def test_training_windows_are_kept_narrow_and_taken_as_int64(tokenizer, dev_subset, tmp_path):
    """Kept as int64, SQuAD's training windows at 384 tokens took 816 MB in every trial's process (and its cache
    file); ids are kept in 32 bits and the mask in 8, and a batch is widened as it is taken. A cache file written
    with int64 windows is still read, narrowed."""
    from safetensors.torch import save_file

    from pruning import squad
    from pruning.trainer import _CACHE_DIGEST, _features_digest, train_features

    cfg = RunConfig(train_data="dev", train_limit=6, max_seq_length=96, doc_stride=32, cache_dir=str(tmp_path))
    features = train_features(cfg, dev_subset[:6], tokenizer)
    assert {k: v.dtype for k, v in features.items()} == {
        "input_ids": torch.int32, "attention_mask": torch.uint8, "token_type_ids": torch.int32,
        "start_positions": torch.long, "end_positions": torch.long}
    batch = squad.window_batch(features, torch.tensor([4, 0, 2]))
    assert all(v.dtype == torch.long for v in batch.values())
    width = batch["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"], features["input_ids"][[4, 0, 2], :width].long())

    (cached,) = tmp_path.iterdir()
    wide = {k: v.long() for k, v in features.items()}  # as a cache was written before
    save_file(wide, str(cached), metadata={_CACHE_DIGEST: _features_digest(wide)})
    again = train_features(cfg, [], tokenizer)  # read back, not tokenized again
    assert {k: v.dtype for k, v in again.items()} == {k: v.dtype for k, v in features.items()}
    assert all(torch.equal(again[k], features[k]) for k in features)


def test_tokenizing_the_training_questions_is_said_and_shown_as_it_goes(tokenizer, dev_subset, tmp_path, caplog,
                                                                        capsys):
    """Tokenizing the whole training set takes minutes: a run says so first and draws a bar of the questions done
    (none when it reads the windows back from its cache)."""
    from pruning.trainer import train_features

    cfg = RunConfig(train_data="dev", train_limit=8, max_seq_length=96, doc_stride=32, cache_dir=str(tmp_path))
    with caplog.at_level("INFO", logger="pruning.trainer"):
        train_features(cfg, dev_subset[:8], tokenizer, progress=True)
    assert "tokenizing 8 training questions into windows of 96 tokens (stride 32)" in caplog.text
    assert "tokenize: 100%" in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level("INFO", logger="pruning.trainer"):
        train_features(cfg, dev_subset[:8], tokenizer, progress=True)  # from the cache
    assert "tokenizing" not in caplog.text and "tokenize" not in capsys.readouterr().err


def test_a_resumed_runs_figures_count_the_work_before_the_resume(tmp_path):
    """train_seconds and teacher_forward_windows describe the whole run, not the part after a resume."""
    teacher = train(tiny_cfg(tmp_path, method="dense", max_steps=2, output_dir=str(tmp_path / "teacher")),
                    progress=False)["model_dir"]
    cfg = tiny_cfg(tmp_path / "student", method="topk", attention_block=[16, 16], target_density=0.5, max_steps=6,
                   eval_every=3, teacher=teacher)

    def stop_at_first(metrics, checkpoint):
        raise Stop

    with pytest.raises(Stop):
        train(cfg, report=stop_at_first, progress=False)
    checkpoint = Path(cfg.output_dir) / "checkpoint"
    before = json.loads((checkpoint / "trainer_state.json").read_text())["counters"]
    assert before["teacher_forward_windows"] == 3 * cfg.batch_size and before["train_seconds"] > 0
    resumed = train(cfg, resume_from=checkpoint, progress=False)
    assert resumed["teacher_forward_windows"] == 6 * cfg.batch_size  # as many as an uninterrupted run's
    assert type(before["teacher_forward_windows"]) is int and type(resumed["teacher_forward_windows"]) is int
    assert resumed["train_seconds"] > before["train_seconds"]



def test_a_run_resumed_at_its_very_end_reports_what_the_uninterrupted_run_did(tmp_path):
    """Resumed from its last checkpoint (killed after writing it, before the final model), a run trains nothing and
    evaluates again: it reported only the evaluation and the pruning figures, without the loss, learning rate,
    epoch or train_seconds its last evaluation recorded, which a script reading them then lacked."""
    cfg = tiny_cfg(tmp_path, method="topk", attention_block=[16, 16], target_density=0.5, max_steps=4, eval_every=2)
    whole = train(cfg, progress=False)
    checkpoint = Path(cfg.output_dir) / "checkpoint"
    resumed = train(cfg, resume_from=checkpoint, progress=False)
    assert set(whole) <= set(resumed), set(whole) - set(resumed)
    for key in ("loss", "learning_rate", "epoch", "train_seconds", "threshold", "f1", "linear_density"):
        assert resumed[key] == pytest.approx(whole[key]), key


def test_a_stopped_writes_earlier_directory_left_beside_its_replacement_is_removed(tmp_path):
    """Killed after the new checkpoint took its name and before the earlier one (moved aside) was removed, a write
    left that earlier checkpoint, as large as the model, beside the run for good: a resume at the very end writes no
    checkpoint that would have removed it. The resume removes it, and resumes from the new one."""
    cfg = tiny_cfg(tmp_path, method="dense", max_steps=2)
    train(cfg, progress=False)
    run = Path(cfg.output_dir)
    shutil.copytree(run / "checkpoint", run / ".checkpoint.old")
    assert train(cfg, resume_from=run / "checkpoint", progress=False)["step"] == 2
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "final"]


def test_teacher_forward_windows_counts_the_short_last_batch_of_an_epoch(tmp_path, tokenizer):
    """A distilled run without a teacher cache reports the windows its teacher ran on: an epoch whose windows do not
    fill its last batch gives that batch's windows, not a full batch."""
    teacher = train(tiny_cfg(tmp_path, method="dense", max_steps=1, output_dir=str(tmp_path / "teacher")),
                    progress=False)["model_dir"]
    cfg = tiny_cfg(tmp_path / "student", train_limit=3, max_steps=2, grad_accum=2, teacher=teacher)
    windows = int(train_features(cfg, squad.load_squad(resolve_data("dev"), limit=3), tokenizer)["input_ids"].shape[0])
    assert windows % cfg.batch_size  # the last batch of each epoch is short
    epoch = [cfg.batch_size] * (windows // cfg.batch_size) + [windows % cfg.batch_size]
    micro = cfg.max_steps * cfg.grad_accum
    ran = sum((epoch * micro)[:micro])
    assert ran < micro * cfg.batch_size
    assert train(cfg, progress=False)["teacher_forward_windows"] == ran

class _HostReads:
    """Counts reads of floating-point tensor values into Python (``float``, ``item``, ``tolist``, ``bool``, ``int``,
    ``numpy``): on a GPU each one waits for all the work queued before it. The integer window bookkeeping is left
    out: it reads CPU tensors, on a GPU run too."""

    METHODS = ("__float__", "item", "tolist", "__bool__", "__int__", "numpy")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name)))

    def _counted(self, method):
        def read(tensor, *args, **kwargs):
            if tensor.is_floating_point():
                self.count += 1
            return method(tensor, *args, **kwargs)
        return read


@pytest.mark.parametrize("grad_accum,max_grad_norm", [(3, 1.0), (2, None)])
def test_a_training_step_reads_the_device_once_whatever_its_micro_batches(tmp_path, monkeypatch, grad_accum,
                                                                          max_grad_norm):
    """The loss terms of every micro-batch and the gradient norm come back in one read a step; the figures a run
    reports are the means over its micro-batches, as before."""
    reads = _HostReads(monkeypatch)
    counts, reported = {}, {}
    for steps in (1, 5):  # the same evaluation at the end: the difference is what the 4 steps more read
        cfg = tiny_cfg(tmp_path / str(steps), method="dense", max_steps=steps, batch_size=2, grad_accum=grad_accum,
                       max_grad_norm=max_grad_norm, eval_limit=2, train_limit=8, dropout=0.0)
        before = reads.count
        reported[steps] = train(cfg, progress=False)
        counts[steps] = reads.count - before
    assert (counts[5] - counts[1]) == 4
    for metrics in reported.values():  # no teacher, no penalty: the loss is the span cross-entropy
        assert metrics["loss"] == metrics["loss_ce"] > 0
        assert metrics["loss_distil"] == metrics["loss_hidden"] == metrics["loss_reg"] == 0.0


def _edit_tensors(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("shape", [(1,), (3, 3)], ids=["broadcasts", "other"])
def test_a_checkpoint_whose_weight_average_has_another_shape_is_refused_naming_the_tensor(tmp_path, shape):
    """A tensor that broadcasts would have filled the average with one value, and the final model with it."""
    from pruning.checkpoint import CheckpointError

    cfg = tiny_cfg(tmp_path, max_steps=2, train_limit=4, eval_limit=1, ema_decay=0.9)
    train(cfg, progress=False)
    optimizer_file = tmp_path / "run" / "checkpoint" / "optimizer.safetensors"
    name = "average.qa_outputs.weight"
    _edit_tensors(optimizer_file, lambda tensors: tensors.__setitem__(name, torch.zeros(shape)))
    with pytest.raises(CheckpointError) as err:
        train(cfg, resume_from=optimizer_file.parent, progress=False)
    assert str(err.value) == (f"{optimizer_file}: {name} has shape {shape}, but the trained parameter has shape "
                              "(2, 64)")


@pytest.mark.parametrize("name, value, says", [
    ("rng.torch", torch.zeros(3), r"rng\.torch must be a random generator state \(uint8 of shape \(\d+,\)\), got "
                                  r"float32 of shape \(3,\)"),
    ("params", torch.zeros(2, 2), r"params must be one whole number, got float32 of shape \(2, 2\)"),
    ("state.0.step", torch.zeros(3), r"state\.0\.step must be one number \(the parameter's step count\), got shape "
                                     r"\(3,\)"),
], ids=["rng", "params", "step"])
def test_a_checkpoint_whose_optimizer_file_holds_an_edited_tensor_is_refused_naming_it(tmp_path, name, value, says):
    from pruning.checkpoint import CheckpointError

    cfg = tiny_cfg(tmp_path, max_steps=2, train_limit=4, eval_limit=1)
    train(cfg, progress=False)
    optimizer_file = tmp_path / "run" / "checkpoint" / "optimizer.safetensors"
    _edit_tensors(optimizer_file, lambda tensors: tensors.__setitem__(name, value))
    with pytest.raises(CheckpointError, match=rf"^{optimizer_file}: {says}$"):
        train(dataclasses.replace(cfg, max_steps=3), resume_from=optimizer_file.parent, progress=False)


def test_resuming_on_a_training_file_whose_questions_changed_is_refused(tmp_path):
    """The same train_data path with other contents gives other windows: the resumed run would index into them
    with the data order and step of the first."""
    from pruning.resources import squad_file

    dev = json.loads(squad_file("dev").read_text(encoding="utf-8"))
    data = tmp_path / "train.json"

    def write(articles):
        data.write_text(json.dumps({"version": dev["version"], "data": articles}), encoding="utf-8")

    write(dev["data"][:1])
    cfg = tiny_cfg(tmp_path, train_data=str(data), max_steps=2, train_limit=8, eval_limit=1)
    train(cfg, progress=False)
    checkpoint = tmp_path / "run" / "checkpoint"
    write(dev["data"][1:2])
    with pytest.raises(ConfigError) as err:
        train(dataclasses.replace(cfg, max_steps=3), resume_from=checkpoint, progress=False)
    assert str(err.value) == (f"{checkpoint}: written under a different run config (train_data {json.dumps(str(data))}"
                              f": its contents differ from those the checkpoint was trained on); resume with the "
                              f"config it was written with")
    write(dev["data"][:1])  # the same questions written again: the same run
    assert train(dataclasses.replace(cfg, max_steps=3), resume_from=checkpoint, progress=False)["step"] == 3


def test_a_checkpoint_without_its_tokenizer_files_is_refused_not_resumed_on_unknown_tokens(tmp_path):
    """transformers builds a tokenizer of its five special tokens from config.json alone: every word would be
    [UNK], and the run would go on training on windows of nothing but [UNK]."""
    from pruning.checkpoint import CheckpointError
    from pruning.tokenizer import load_tokenizer

    cfg = tiny_cfg(tmp_path, max_steps=2, train_limit=4, eval_limit=1)
    train(cfg, progress=False)
    checkpoint = tmp_path / "run" / "checkpoint"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).unlink()
    says = rf"^{checkpoint}: no tokenizer files \(what loads from config\.json alone holds only its \d+ special tokens\)$"
    with pytest.raises(CheckpointError, match=says):
        load_tokenizer(checkpoint)
    with pytest.raises(CheckpointError, match=says):
        train(dataclasses.replace(cfg, max_steps=3), resume_from=checkpoint, progress=False)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 2


def test_a_checkpoint_past_the_steps_of_the_run_config_is_refused_not_reported_as_the_last_step(tmp_path):
    """A dense run may be resumed with another max_steps, but not with fewer steps than the checkpoint has trained:
    its final model would be reported at a step it has passed."""
    from pruning.checkpoint import CheckpointError

    cfg = tiny_cfg(tmp_path, max_steps=4, train_limit=4, eval_limit=1)
    train(cfg, progress=False)
    checkpoint = tmp_path / "run" / "checkpoint"
    final = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "final").iterdir()}
    with pytest.raises(CheckpointError, match=rf"^{checkpoint / 'trainer_state.json'}: step 4 is past the 2 steps "
                                              r"the run config trains$"):
        train(dataclasses.replace(cfg, max_steps=2), resume_from=checkpoint, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "final").iterdir()} == final
    assert train(dataclasses.replace(cfg, max_steps=5), resume_from=checkpoint, progress=False)["step"] == 5


@pytest.mark.parametrize("method,extra", [("topk", dict(attention_block=[16, 16])),
                                          ("sigmoid_threshold", dict(attention_block=[16, 16])),
                                          ("fisher", dict(attention_block=[16, 64], fill_steps=4, fill_packed=True,
                                                     calibration_samples=8, mask_tuning_samples=8))],
                         ids=["topk", "sigmoid_threshold", "fisher_fill_packed"])
def test_evaluating_and_saving_mid_run_leave_the_training_as_it_would_be_without(tmp_path, method, extra):
    """An evaluation reads the masked weights and a checkpoint of a packed recovery writes them back into the masked
    model: neither may draw from the random generators the dropout of the next steps draws from, or how often a run
    evaluates or saves would change what it trains."""
    from safetensors.torch import load_file

    common = dict(method=method, target_density=0.5, max_steps=6, train_limit=8,
                  eval_limit=2, batch_size=4, **extra)
    plain = train(tiny_cfg(tmp_path / "plain", **common), progress=False)
    often = train(tiny_cfg(tmp_path / "often", eval_every=2, save_every=2, **common), progress=False)
    first = load_file(str(Path(plain["model_dir"]) / "model.safetensors"))
    second = load_file(str(Path(often["model_dir"]) / "model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert often["f1"] == plain["f1"] and often["loss"] == plain["loss"]


def test_a_run_tokenizes_its_evaluation_questions_once_however_often_it_evaluates(tmp_path, monkeypatch):
    """The windows of the evaluation questions are the same at every evaluation of a run: a run evaluating after
    each of 4 steps calls the tokenizer as often as a run of 1 step evaluating once, and every evaluation scores
    exactly what a fresh evaluation of that step's checkpoint (on windows of its own) scores."""
    from pruning import squad
    from pruning.resources import resolve_data
    from pruning.tokenizer import load_tokenizer
    from pruning.trainer import evaluate

    calls = {"run": 0, "check": 0}
    counting = ["run"]
    tokenize = squad.tokenize_text

    def counted(*args, **kwargs):
        calls[counting[-1]] += 1
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(squad, "tokenize_text", counted)
    checked = []

    def check(metrics, checkpoint_dir):
        counting.append("check")
        examples = squad.load_squad(resolve_data(cfg.eval_data), limit=cfg.eval_limit, spans=False)
        fresh = evaluate(load_model(checkpoint_dir), load_tokenizer(checkpoint_dir), examples, cfg, progress=False)
        counting.pop()
        checked.append((metrics["step"], metrics["exact_match"], metrics["f1"], fresh["exact_match"], fresh["f1"]))

    counts = {}
    for steps, every in ((1, None), (4, 1)):
        cfg = tiny_cfg(tmp_path / str(steps), method="dense", max_steps=steps, eval_every=every, train_limit=8,
                       eval_limit=12, batch_size=4, dropout=0.0)
        before = calls["run"]
        train(cfg, report=check, progress=False)
        counts[steps] = calls["run"] - before
    assert counts[4] == counts[1] > 0
    assert calls["check"] > 0
    assert [row[0] for row in checked] == [1, 1, 2, 3, 4]
    for step, em, f1, fresh_em, fresh_f1 in checked:
        assert (em, f1) == (fresh_em, fresh_f1), step


def _record_trained_windows(monkeypatch) -> list[list[int]]:
    """The windows of every micro-batch the runs after this call train on, in order (each batch goes through
    :func:`pruning.squad.window_batch`, which is called as before)."""
    from pruning import squad

    batches: list[list[int]] = []
    build = squad.window_batch

    def recorded(features, index, device):
        batches.append(index.tolist())
        return build(features, index, device)

    monkeypatch.setattr(squad, "window_batch", recorded)
    return batches


def _stopped_at(step):
    def stop(metrics, checkpoint):
        assert metrics["step"] == step and checkpoint is not None
        raise Stop
    return stop


def _flat(batches) -> list[int]:
    return [window for batch in batches for window in batch]


@pytest.mark.parametrize("change", [dict(batch_size=4), dict(grad_accum=2), dict(batch_size=4, grad_accum=2),
                                    dict(batch_size=16)],
                         ids=["batch_size_halved", "grad_accum_doubled", "both", "batch_size_doubled"])
def test_a_dense_resume_with_other_batches_goes_on_at_the_next_untrained_window(tmp_path, monkeypatch, change):
    """The 16 questions give 48 windows, 6 batches of 8 an epoch. A run stopped after 3 steps has trained the first
    24 windows of its first epoch: resumed with other batch settings it trains the other 24, none twice, and then
    the next epochs, each window once an epoch, in the order an uninterrupted run trains them."""
    windows = _record_trained_windows(monkeypatch)
    cfg = tiny_cfg(tmp_path, method="dense", train_limit=16, eval_limit=1, batch_size=8, max_steps=10, eval_every=3)
    train(dataclasses.replace(cfg, output_dir=str(tmp_path / "plain"), eval_every=None), progress=False)
    plain = _flat(windows)
    assert len(plain) == 80 and sorted(plain[:48]) == list(range(48))
    windows.clear()
    with pytest.raises(Stop):
        train(cfg, report=_stopped_at(3), progress=False)
    assert _flat(windows) == plain[:24]
    resumed_cfg = dataclasses.replace(cfg, eval_every=None, **change)
    result = train(resumed_cfg, resume_from=tmp_path / "run" / "checkpoint", progress=False)
    assert result["step"] == 10
    assert len(windows) == 3 + 7 * resumed_cfg.grad_accum
    assert all(len(batch) <= resumed_cfg.batch_size for batch in windows[3:])
    trained = _flat(windows)
    for start in range(0, len(trained) - 47, 48):  # every whole epoch holds each window once
        assert sorted(trained[start:start + 48]) == list(range(48)), start
    shared = min(len(trained), len(plain))
    assert trained[:shared] == plain[:shared]


@pytest.mark.parametrize("method,change", [("topk", dict(seed=7)), ("topk", dict(group_by_length=True)),
                                           ("dense", dict(seed=7, batch_size=4, grad_accum=2))],
                         ids=["topk_seed", "topk_group_by_length", "dense_seed_and_batches"])
def test_a_resume_with_another_order_finishes_the_epoch_in_its_order_then_takes_the_new_one(tmp_path, monkeypatch,
                                                                                          method, change):
    """The windows the first run trained of its epoch are those of its order: the resumed run trains the rest of
    that order, and orders the next epochs by its own settings, as a run started with them does."""
    windows = _record_trained_windows(monkeypatch)
    extra = dict(attention_block=[16, 16], target_density=0.5) if method == "topk" else {}
    cfg = tiny_cfg(tmp_path, method=method, train_limit=16, eval_limit=1, batch_size=8, max_steps=10, eval_every=3,
                   **extra)
    train(dataclasses.replace(cfg, output_dir=str(tmp_path / "plain"), eval_every=None), progress=False)
    plain = _flat(windows)
    windows.clear()
    train(dataclasses.replace(cfg, output_dir=str(tmp_path / "other"), eval_every=None, **change), progress=False)
    other = _flat(windows)
    assert other[:48] != plain[:48]
    windows.clear()
    with pytest.raises(Stop):
        train(cfg, report=_stopped_at(3), progress=False)
    train(dataclasses.replace(cfg, eval_every=None, **change), resume_from=tmp_path / "run" / "checkpoint",
          progress=False)
    trained = _flat(windows)
    assert trained[:48] == plain[:48]
    assert trained[48:80] == other[48:80]


@pytest.mark.parametrize("grouped", [False, True])
def test_a_position_in_an_epoch_cut_into_other_batches_resumes_as_the_run_would_go_on(tmp_path, grouped):
    """A run resumed with other settings saves its position inside the epoch it finishes in the first run's order:
    resumed from there with its own settings it trains what it would have trained without the stop."""
    from itertools import islice

    from pruning.batches import DataPosition, WindowBatches

    features = _windows_of_lengths(torch.randint(20, 97, (203,), generator=torch.Generator().manual_seed(0)))
    first = WindowBatches(features, tiny_cfg(tmp_path, batch_size=8, group_by_length=grouped))
    started = list(islice(first, 5))
    then = tiny_cfg(tmp_path, batch_size=12, group_by_length=not grouped, seed=5)
    going = WindowBatches(features, then, first.position)
    batches, positions = [], []
    for _ in range(60):
        positions.append(going.position)
        batches.append(next(going))
    left = 203 - sum(len(b) for b in started)  # the rest of the first epoch, in its order, cut into batches of 12
    rest = -(-left // 12)
    assert [len(b) for b in batches[:rest]] == [12] * (rest - 1) + [left - 12 * (rest - 1)]
    assert sorted(torch.cat(started + batches[:rest]).tolist()) == list(range(203))
    assert positions[rest] == DataPosition(1, 0, 5, 12, not grouped)  # the next epochs in the new settings
    assert sorted(torch.cat(batches[rest:rest + 17]).tolist()) == list(range(203))
    for k in (1, 7, rest - 1, rest, rest + 5):
        again = list(islice(WindowBatches(features, then, positions[k]), 60 - k))
        assert all(torch.equal(a, b) for a, b in zip(again, batches[k:], strict=True)), k


def test_a_checkpoint_that_records_no_data_position_resumes_where_its_config_places_it(tmp_path, monkeypatch):
    """A checkpoint written before checkpoints recorded their position in the windows stopped after its step's
    micro-batches in the order of the config it records: resumed with that config it trains what the uninterrupted
    run does, with other batches it goes on at the next untrained window."""
    import shutil

    windows = _record_trained_windows(monkeypatch)
    cfg = tiny_cfg(tmp_path, method="dense", train_limit=16, eval_limit=1, batch_size=8, max_steps=10, eval_every=3)
    full = train(dataclasses.replace(cfg, output_dir=str(tmp_path / "plain")), progress=False)
    plain = _flat(windows)
    with pytest.raises(Stop):
        train(cfg, report=_stopped_at(3), progress=False)
    checkpoint = tmp_path / "run" / "checkpoint"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["data_position"] == dict(epoch=0, window=24, seed=42, batch_size=8, group_by_length=False)
    del state["data_position"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    shutil.copytree(checkpoint, tmp_path / "older")
    windows.clear()
    resumed = train(cfg, resume_from=checkpoint, progress=False)
    assert _flat(windows) == plain[24:]
    a, b = load_model(full["model_dir"]), load_model(resumed["model_dir"])
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    windows.clear()
    train(dataclasses.replace(cfg, output_dir=str(tmp_path / "halved"), batch_size=4), resume_from=tmp_path / "older",
          progress=False)
    assert _flat(windows) == plain[24:52]


@pytest.mark.parametrize("record,says", [
    ([0, 24], "data_position must be an object, got [0, 24]"),
    (dict(epoch=0, window=48, seed=42, batch_size=8, group_by_length=False),
     "data_position.window 48 is past the 48 training windows of an epoch"),
    (dict(epoch=0, window=24, seed=42, batch_size=0, group_by_length=False),
     "data_position.batch_size must be an integer of at least 1, got 0"),
    (dict(epoch=0, window=24, seed=42, batch_size=8, group_by_length="no"),
     'data_position.group_by_length must be true or false, got "no"'),
    (dict(epoch=0, window=24, seed=42, group_by_length=False), "data_position.batch_size must be an integer of at "
                                                               "least 1, got null"),
    # Seeds the torch generator could not take stopped the run with a traceback (OverflowError from manual_seed).
    (dict(epoch=0, window=24, seed=10**20, batch_size=8, group_by_length=False),
     "data_position.seed must be an integer from 0 to 4294967295, got 100000000000000000000"),
    (dict(epoch=2**40, window=24, seed=42, batch_size=8, group_by_length=False),
     "data_position.epoch must be an integer from 0 to 2147483647, got 1099511627776"),
])
def test_an_edited_data_position_is_refused_naming_the_file_and_field(tmp_path, record, says):
    from pruning.checkpoint import CheckpointError

    cfg = tiny_cfg(tmp_path, method="dense", train_limit=16, eval_limit=1, max_steps=3)
    train(cfg, progress=False)
    path = tmp_path / "run" / "checkpoint" / "trainer_state.json"
    state = json.loads(path.read_text())
    state["data_position"] = record
    path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError) as err:
        train(dataclasses.replace(cfg, max_steps=4), resume_from=path.parent, progress=False)
    assert str(err.value) == f"{path}: {says}"


def test_a_run_of_epochs_resumed_with_other_batches_is_refused_naming_the_key(tmp_path, monkeypatch):
    """A run without max_steps has as many steps as its epochs hold batches of its settings: resumed with other
    batches it would train another number of epochs (with batches twice as large, the 3 steps left of 6 were counted
    done and the second half of the epoch never trained). Resumed with max_steps it trains to that step."""
    windows = _record_trained_windows(monkeypatch)
    cfg = tiny_cfg(tmp_path, method="dense", train_limit=16, eval_limit=1, batch_size=8, max_steps=None, epochs=1,
                   eval_every=3)
    with pytest.raises(Stop):
        train(cfg, report=_stopped_at(3), progress=False)
    checkpoint = tmp_path / "run" / "checkpoint"
    written = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}
    for change, says in ((dict(batch_size=16), "batch_size 8 there, 16 here"),
                         (dict(grad_accum=2), "grad_accum 1 there, 2 here")):
        with pytest.raises(ConfigError) as err:
            train(dataclasses.replace(cfg, **change), resume_from=checkpoint, progress=False)
        assert str(err.value) == (f"{checkpoint}: {says}: a run without max_steps counts its epochs in steps of its "
                                  "batches, so it would train another number of epochs; resume with the same batches, "
                                  "or set max_steps")
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()} == written
    first = _flat(windows)
    windows.clear()
    result = train(dataclasses.replace(cfg, batch_size=16, max_steps=5), resume_from=checkpoint, progress=False)
    assert result["step"] == 5 and sorted(first + _flat(windows)) == list(range(48))


def test_a_run_in_epochs_whose_step_takes_more_than_an_epoch_is_refused(tmp_path):
    """3 micro-batches an epoch, 4 a step: counted as one step an epoch, the run trained 8 micro-batches (2.7 epochs)
    for 2."""
    cfg = tiny_cfg(tmp_path, max_steps=None, epochs=2.0, batch_size=8, grad_accum=4)
    with pytest.raises(ConfigError, match=r"^grad_accum: 4 micro-batches a step exceed the 3 of an epoch \(24 "
                                          r"training windows in batches of 8\), so the run cannot train its 2 epochs "
                                          r"in steps; lower grad_accum or batch_size, or set max_steps$"):
        plan(cfg, 24)
    assert plan(dataclasses.replace(cfg, grad_accum=3), 24).prune_steps == 2  # a step an epoch, as before


@pytest.mark.parametrize("grad_accum, epochs, steps", [(7, 2.0, 3), (5, 3.0, 7), (1, 2.0, 24), (4, 1.0, 3)])
def test_a_run_in_epochs_trains_its_epochs_micro_batches_whatever_grad_accum(tmp_path, grad_accum, epochs, steps):
    """The windows are one stream across epochs: the steps of a run in epochs are its epochs' micro-batches in
    steps. Rounded down per epoch, 12 micro-batches an epoch with grad_accum 7 made 2 steps of the 2 epochs
    (1.17 of them), with grad_accum 5 6 steps of the 3 (2.5)."""
    from pruning.trainer import plan

    cfg = tiny_cfg(tmp_path, max_steps=None, epochs=epochs, batch_size=8, grad_accum=grad_accum)
    p = plan(cfg, 94)  # 12 micro-batches an epoch, the last one short
    assert p.prune_steps == steps
    assert abs(p.prune_steps * grad_accum - epochs * 12) <= grad_accum / 2
    assert plan(dataclasses.replace(cfg, max_steps=2), 24).prune_steps == 2  # steps given: 8 micro-batches


def test_each_loss_line_names_the_steps_it_is_the_mean_of(tmp_path, caplog):
    """A loss line is the mean of the steps since the last one: after a resume the first averaged fewer steps than
    log_every under a line that read as the uninterrupted run's (a loss of 10.54 where that run logged 8.06)."""
    import re

    cfg = tiny_cfg(tmp_path, max_steps=5, log_every=3, eval_every=2, eval_limit=1)

    def stop(metrics, checkpoint):
        raise Stop

    def lines() -> list[str]:
        found = [re.search(r"^step (\d+)/5 .*; mean of (steps? [\d-]+)\)", m) for m in caplog.messages]
        return [f"{m.group(1)}: {m.group(2)}" for m in found if m]

    with caplog.at_level(logging.INFO, logger="pruning.trainer"):
        train(dataclasses.replace(cfg, output_dir=str(tmp_path / "whole")), progress=False)
        assert lines() == ["3: steps 1-3", "5: steps 4-5"]
        caplog.clear()
        with pytest.raises(Stop):
            train(cfg, report=stop, progress=False)
        train(cfg, resume_from=tmp_path / "run" / "checkpoint", progress=False)
        assert lines() == ["3: step 3", "5: steps 4-5"]


def test_the_logged_epoch_counts_the_windows_trained(tmp_path):
    """Steps of 4 micro-batches over epochs of 3 (24 windows in batches of 8): step 1 has trained 4/3 of an epoch,
    not the one the step count made of it."""
    seen = []
    cfg = tiny_cfg(tmp_path, max_steps=2, eval_every=1, train_limit=8, eval_limit=2, batch_size=8, grad_accum=4)
    train(cfg, report=lambda m, c: seen.append((m["step"], m["epoch"])), progress=False)
    assert seen == [(1, pytest.approx(4 / 3)), (2, pytest.approx(8 / 3))]


@pytest.mark.parametrize("first,then", [("long", "short"), ("short", None)])
def test_a_resume_whose_teacher_would_cut_the_windows_otherwise_is_refused_naming_the_teacher(tmp_path, first, then):
    """A run's windows of 96 tokens are cut to 64 by a teacher of 64 positions, not by one of 128: a resume given the
    other teacher (or none) went on, on other windows, with no word but the cut's warning where it cut them."""
    for name, positions in (("long", 128), ("short", 64)):
        model, tok = build_model(tiny_cfg(tmp_path, model_config={**TINY, "max_position_embeddings": positions}))
        save_model(model, tok, tmp_path / name)
    cfg = tiny_cfg(tmp_path, max_seq_length=96, doc_stride=48, max_steps=4, eval_every=2, train_limit=4,
                   eval_limit=2, teacher=str(tmp_path / first))
    with pytest.raises(Stop):
        train(cfg, report=_stopped_at(2), progress=False)
    checkpoint = tmp_path / "run" / "checkpoint"
    written = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}
    teacher = None if then is None else str(tmp_path / then)
    windows = {"long": "96 tokens (doc_stride 48)", "short": "64 tokens (doc_stride 32)"}
    with pytest.raises(ConfigError) as err:
        train(dataclasses.replace(cfg, teacher=teacher), resume_from=checkpoint, progress=False)
    assert str(err.value) == (f'{checkpoint}: teacher "{tmp_path / first}" there, {json.dumps(teacher)} here: the '
                              f"run trained on windows of {windows[first]}, which the position embeddings here make "
                              f"{windows[then or 'long'].replace(' tokens', '')}; resume with a teacher that keeps "
                              "the windows")
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()} == written
    # Distillation may change where the windows stay: the same teacher, or none after the long one.
    other = None if first == "long" else str(tmp_path / first)
    assert train(dataclasses.replace(cfg, teacher=other), resume_from=checkpoint, progress=False)["step"] == 4


@pytest.mark.parametrize("method", ["dense", "topk"])
def test_the_planned_steps_are_logged_as_pruning_and_filled_only_for_a_masked_run(tmp_path, caplog, method):
    """A dense run's log said "2 steps (2 pruning + 0 filled)", steps that prune nothing."""
    cfg = tiny_cfg(tmp_path, method=method, max_steps=2, train_limit=4, eval_limit=2,
                   **({"attention_block": [16, 16]} if method == "topk" else {}))
    with caplog.at_level(logging.INFO, logger="pruning.trainer"):
        train(cfg, progress=False)
    planned = [r.getMessage() for r in caplog.records if "training features;" in r.getMessage()]
    assert len(planned) == 1
    assert ("2 steps (2 pruning + 0 filled)," in planned[0]) == (method == "topk")
    assert "; 2 steps" in planned[0]


@pytest.mark.parametrize("target", [0.05, 0.5, 0.95])
def test_global_topk_without_a_filled_phase_ends_at_its_target_density(tmp_path, target):
    """Global top-k finds one cut-off on the scores as each step begins; the step then moves the scores, and the
    final model was evaluated and saved against the stale cut-off: at a target of 0.01 a run ended at 0.025, at 0.99
    at 0.977. What is evaluated and saved now keeps the scheduled fraction of the scores as they end, to within one
    block, the granularity of a cut-off (as a filled phase's start did already)."""
    cfg = tiny_cfg(tmp_path, method="topk", topk_scope="global", target_density=target, attention_block=[16, 16],
                   mask_lr=0.1, max_steps=6, initial_warmup=0, final_warmup=0, train_limit=8, eval_limit=2)
    metrics = train(cfg, progress=False)
    model = load_model(metrics["model_dir"])
    modules = [module for _, module in masks.masked_modules(model)]
    total = sum(m.mask_scores.numel() * m.weights_per_score for m in modules)
    block = max(m.weights_per_score for m in modules) / total
    with torch.no_grad():
        kept = sum(float(m.block_mask().sum()) * m.weights_per_score for m in modules) / total
    assert target <= kept < target + block, (kept, block)
    assert sparsity_report(model).linear_density == pytest.approx(metrics["linear_density"])
