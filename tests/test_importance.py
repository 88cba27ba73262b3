"""One-shot structured pruning (method fisher) and the mask warm starts, on tiny random BERTs."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from pruning import importance as imp
from pruning import masks
from pruning.bench import linear_flops
from pruning.checkpoint import load_model, save_model
from pruning.config import ConfigError, MaskInit, RunConfig
from pruning.distill import hidden_mse
from pruning.packing import pack
from pruning.sparsity import sparsity_report
from pruning.trainer import train
from workflows.cli import main as cli_main

HIDDEN, HEADS, LAYERS, INTER, VOCAB = 64, 4, 2, 128, 120
TINY = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=INTER,
            max_position_embeddings=128)
HEAD_BLOCK = [HIDDEN // HEADS, HIDDEN]


def tiny_model(seed: int = 0, vocab: int = VOCAB) -> BertForQuestionAnswering:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=INTER, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertForQuestionAnswering(config).eval()
    with torch.no_grad():  # larger weights than the init's, so that heads and neurons matter unequally
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 2 and "embeddings" not in name:
                p.mul_(4.0)
    return model


def windows(n: int = 10, width: int = 18, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random windows of different lengths (padding at the end), with random gold spans inside them."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (n, width), generator=g) * mask
    start = (torch.rand(n, generator=g) * (lengths - 1)).long()
    end = torch.minimum(start + 2, lengths - 1)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), start_positions=start,
                end_positions=end)


def tiny_cfg(tmp_path, **overrides) -> RunConfig:
    values = dict(model_config=TINY, train_data="dev", eval_data="dev", train_limit=16, eval_limit=6,
                  max_seq_length=96, doc_stride=32, batch_size=8, learning_rate=1e-3, method="fisher",
                  attention_block=HEAD_BLOCK, calibration_samples=24, mask_tuning_samples=16,
                  output_dir=str(tmp_path / "run"), log_every=100, eval_batch_size=32)
    values.update(overrides)
    return RunConfig(**values)


# --- importance ---------------------------------------------------------------------------------------------


def hand_importance(model, features):
    """sum over windows of (dL_w/dm)^2, one window at a time, from the context and its gradient (no mask variables).

    With the context ``c`` of a head (the input columns of the output projection that belong to it) scaled by ``m``,
    ``dL/dm`` at ``m = 1`` is ``sum_t <c_t, dL/dc_t>``; likewise for an FFN activation.
    """
    heads = torch.zeros(LAYERS, HEADS, dtype=torch.float64)
    neurons = torch.zeros(LAYERS, INTER, dtype=torch.float64)
    head_dim = HIDDEN // HEADS
    for w in range(features["input_ids"].shape[0]):
        length = int(features["attention_mask"][w].sum())
        inputs = {k: features[k][w:w + 1, :length] for k in ("input_ids", "attention_mask", "token_type_ids")}
        seen = {}
        handles = []
        for i, layer in enumerate(model.bert.encoder.layer):
            for name, module in (("ctx", layer.attention.output.dense), ("act", layer.output.dense)):
                def hook(mod, args, key=(name, i)):
                    args[0].retain_grad()
                    seen[key] = args[0]
                handles.append(module.register_forward_pre_hook(hook))
        out = model(**inputs)
        loss = (torch.nn.functional.cross_entropy(out.start_logits, features["start_positions"][w:w + 1])
                + torch.nn.functional.cross_entropy(out.end_logits, features["end_positions"][w:w + 1])) / 2
        loss.backward()
        for h in handles:
            h.remove()
        for i in range(LAYERS):
            ctx = seen[("ctx", i)]
            g = (ctx * ctx.grad).reshape(length, HEADS, head_dim).sum(dim=(0, 2))
            heads[i] += g.double() ** 2
            act = seen[("act", i)]
            neurons[i] += ((act * act.grad).sum(dim=(0, 1))).double() ** 2
        model.zero_grad()
    return heads, neurons


def test_head_and_neuron_importance_equal_a_hand_computation():
    model = tiny_model()
    features = windows(10)
    expected_heads, expected_neurons = hand_importance(model, features)
    # Batches of 3 windows of unequal length: per-window gradients must not mix, padding must not count.
    got = imp.fisher_importance(model, features, torch.arange(10), batch_size=3)
    assert got.windows == 10
    assert torch.allclose(got.heads, expected_heads, rtol=1e-3, atol=1e-12)
    assert torch.allclose(got.neurons, expected_neurons, rtol=1e-3, atol=1e-12)
    assert expected_heads.max() > 3 * expected_heads.min()  # the heads differ: the comparison means something
    assert all(p.requires_grad for p in model.parameters())  # weights frozen only while it ran


def test_block_diagonal_fisher_has_the_importance_on_its_diagonal():
    model = tiny_model()
    got = imp.fisher_importance(model, windows(6), torch.arange(6), batch_size=4, block_diagonal=True)
    assert torch.allclose(got.head_blocks.diagonal(dim1=1, dim2=2), got.heads, rtol=1e-5)
    assert torch.allclose(got.neuron_blocks.diagonal(dim1=1, dim2=2).double(), got.neurons, rtol=1e-3)


def test_sampled_labels_come_from_the_teacher():
    model = tiny_model()
    features = windows(8)
    a = imp.fisher_importance(model, features, torch.arange(8), labels="sampled", seed=3)
    b = imp.fisher_importance(model, features, torch.arange(8), labels="sampled", seed=3, teacher=copy.deepcopy(model))
    gold = imp.fisher_importance(model, features, torch.arange(8), labels="gold")
    assert torch.allclose(a.heads, b.heads, rtol=1e-4)  # the model's own distribution is its copy's
    assert not torch.allclose(a.heads, gold.heads, rtol=1e-2)


@pytest.mark.parametrize("labels", ["gold", "sampled"])
def test_importance_does_not_depend_on_the_batch_size(labels):
    """Each window's sampled span is drawn from a stream of its own: one stream for all windows in batch order made
    the importance (by a third to three quarters, here) and so the mask change with batch_size, a searched key."""
    model, teacher = tiny_model(), tiny_model(seed=5)
    features = windows(12)
    got = [imp.fisher_importance(model, features, torch.arange(12), batch_size=size, labels=labels, teacher=teacher,
                                 seed=3) for size in (1, 5, 12)]
    for other in got[1:]:
        assert torch.allclose(other.heads, got[0].heads, rtol=1e-5)
        assert torch.allclose(other.neurons, got[0].neurons, rtol=1e-5, atol=1e-12)
    if labels == "sampled":  # the seed still draws the labels
        again = imp.fisher_importance(model, features, torch.arange(12), labels=labels, teacher=teacher, seed=4)
        assert not torch.allclose(again.heads, got[0].heads, rtol=1e-2)


# --- search -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("constraint,target", [("density", 0.5), ("density", 0.3), ("density", 0.07),
                                               ("flops", 0.5), ("flops", 0.25), ("density", 1.0)])
def test_search_meets_the_constraint_exactly(constraint, target):
    config = tiny_model().config
    costs = imp.structure_costs(config, constraint, seq_len=48)
    g = torch.Generator().manual_seed(7)
    heads = torch.rand(LAYERS, HEADS, generator=g)
    neurons = torch.rand(LAYERS, INTER, generator=g) * 0.01
    budget = int(target * costs.total)
    head_keep, neuron_keep = imp.search_mask(heads, neurons, costs, budget)
    used = int(head_keep.sum()) * costs.head + int(neuron_keep.sum()) * costs.neuron
    assert used <= budget
    assert budget - used < costs.neuron or bool(neuron_keep.all())  # no neuron left out that would still fit
    # Within each kind, what is kept is the most important.
    if head_keep.any() and not head_keep.all():
        assert heads[head_keep].min() >= heads[~head_keep].max()
    if neuron_keep.any() and not neuron_keep.all():
        assert neurons[neuron_keep].min() >= neurons[~neuron_keep].max()


def test_a_later_stage_keeps_only_what_the_last_one_kept():
    config = tiny_model().config
    costs = imp.structure_costs(config, "density")
    g = torch.Generator().manual_seed(3)
    heads, neurons = torch.rand(LAYERS, HEADS, generator=g), torch.rand(LAYERS, INTER, generator=g) * 0.01
    first_heads, first_neurons = imp.search_mask(heads, neurons, costs, int(0.6 * costs.total))
    # The next stage sees new importances, under which removed structures would look important again.
    heads2, neurons2 = torch.rand(LAYERS, HEADS, generator=g), torch.rand(LAYERS, INTER, generator=g) * 0.01
    budget = int(0.3 * costs.total)
    head_keep, neuron_keep = imp.search_mask(heads2, neurons2, costs, budget, first_heads, first_neurons)
    assert not (head_keep & ~first_heads).any() and not (neuron_keep & ~first_neurons).any()
    used = int(head_keep.sum()) * costs.head + int(neuron_keep.sum()) * costs.neuron
    assert budget - costs.neuron < used <= budget
    # Among what may still be kept, the most important is.
    for keep, allowed, values in ((head_keep, first_heads, heads2), (neuron_keep, first_neurons, neurons2)):
        if keep.any() and (allowed & ~keep).any():
            assert values[keep].min() >= values[allowed & ~keep].max()
    unconstrained = imp.search_mask(heads2, neurons2, costs, budget)
    assert (unconstrained[0] & ~first_heads).any() or (unconstrained[1] & ~first_neurons).any()


def test_a_layer_floor_keeps_each_layers_most_important_share_and_still_meets_the_budget():
    config = tiny_model().config
    costs = imp.structure_costs(config, "density")
    heads = torch.tensor([[9.0, 8.0, 7.0, 6.0], [0.4, 0.1, 0.3, 0.2]])  # layer 1 looks unimportant throughout
    neurons = torch.cat([torch.full((1, INTER), 5.0), torch.linspace(1e-3, 2e-3, INTER).unsqueeze(0)])
    budget = int(0.5 * costs.total)
    plain = imp.search_mask(heads, neurons, costs, budget)
    assert not plain[0][1].any() and not plain[1][1].any()  # without a floor, layer 1 loses everything
    head_keep, neuron_keep = imp.search_mask(heads, neurons, costs, budget, floor=0.25)
    used = int(head_keep.sum()) * costs.head + int(neuron_keep.sum()) * costs.neuron
    assert budget - costs.neuron < used <= budget
    # Layer 1 keeps its most important head (0.4, index 0) and its ceil(0.25 * INTER) most important neurons.
    assert head_keep[1].tolist() == [True, False, False, False]
    floor_neurons = math.ceil(0.25 * INTER)
    assert int(neuron_keep[1].sum()) == floor_neurons and neuron_keep[1, INTER - floor_neurons:].all()
    # The rest of the budget goes by importance: all of layer 0's neurons and its most important heads.
    assert neuron_keep[0].all() and head_keep[0].tolist() == [True, True, False, False]
    # The floor respects a later stage's allowed set, and a floor that costs more than the budget is an error.
    allowed = torch.tensor([[True, True, True, True], [False, True, True, False]])
    staged = imp.search_mask(heads, neurons, costs, budget, allowed_heads=allowed, floor=0.25)
    assert staged[0][1].tolist() == [False, False, True, False]
    assert imp.layer_floor(heads, 0.0).sum() == 0 and imp.layer_floor(heads, 1.0).all()
    with pytest.raises(ValueError, match="layer floor of 0.9 costs"):
        imp.search_mask(heads, neurons, costs, budget, floor=0.9)


def test_stage_targets_shrink_evenly_to_the_target():
    assert imp.stage_targets(0.3, 1) == [0.3]
    two = imp.stage_targets(0.3, 2)
    assert two[0] == pytest.approx(0.3 ** 0.5) and two[1] == 0.3
    three = imp.stage_targets(0.5, 3)
    assert three[-1] == 0.5 and three[0] / 1.0 == pytest.approx(three[1] / three[0]) == pytest.approx(0.5 / three[1])
    with pytest.raises(ValueError):
        imp.stage_targets(0.5, 0)


def test_cost_model_matches_the_flop_count_of_packed_models():
    model = tiny_model()
    costs = imp.structure_costs(model.config, "flops", seq_len=40)
    assert costs.total == linear_flops(model, 40)
    head_keep = torch.tensor([[True, False, True, True], [False, False, True, False]])
    neuron_keep = torch.zeros(LAYERS, INTER, dtype=torch.bool)
    neuron_keep[:, :50] = True
    imp.zero_removed_(model, head_keep, neuron_keep)
    packed = pack(model)
    assert linear_flops(packed, 40) == int(head_keep.sum()) * costs.head + int(neuron_keep.sum()) * costs.neuron
    weights = imp.structure_costs(model.config, "density")
    assert sparsity_report(packed).linear_density == pytest.approx(
        (int(head_keep.sum()) * weights.head + int(neuron_keep.sum()) * weights.neuron) / weights.total)


def test_ties_break_deterministically():
    config = tiny_model().config
    costs = imp.structure_costs(config, "density")
    heads = torch.full((LAYERS, HEADS), 1000.0)
    neurons = torch.ones(LAYERS, INTER)
    budget = int(0.3 * costs.total)
    first = imp.search_mask(heads, neurons, costs, budget)
    for _ in range(3):
        again = imp.search_mask(heads.clone(), neurons.clone(), costs, budget)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    head_keep, neuron_keep = first
    k = (budget // costs.head)
    n = (budget - k * costs.head) // costs.neuron
    # Equal importances: the first heads and neurons in (layer, index) order.
    assert head_keep.flatten().tolist() == [True] * k + [False] * (LAYERS * HEADS - k)
    assert neuron_keep.flatten().tolist() == [True] * n + [False] * (LAYERS * INTER - n)


def test_rearrangement_keeps_counts_and_lowers_the_quadratic_loss():
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(LAYERS, 40, 12, generator=g)
    grads[:, :, :3] += grads[:, :, 3:6]  # correlated structures: the diagonal alone misjudges them
    blocks = grads.transpose(1, 2) @ grads
    diagonal = blocks.diagonal(dim1=1, dim2=2)
    keep = torch.zeros(LAYERS, 12, dtype=torch.bool)
    for layer in range(LAYERS):
        keep[layer, torch.argsort(-diagonal[layer], stable=True)[:6]] = True
    new = imp.rearrange_mask(keep, blocks)
    assert torch.equal(new.sum(dim=1), keep.sum(dim=1))

    def loss(mask, layer):
        z = (~mask[layer]).double()
        return float(z @ blocks[layer].double() @ z)

    assert all(loss(new, layer) <= loss(keep, layer) for layer in range(LAYERS))
    assert any(loss(new, layer) < loss(keep, layer) for layer in range(LAYERS))


# --- tuning and the masked representation ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["scales", "weights"])
def test_mask_tuning_lowers_every_layers_reconstruction_error(mode):
    dense = tiny_model()
    model = copy.deepcopy(dense)
    features = windows(16, width=20)
    head_keep = torch.tensor([[True, False, True, False], [False, True, True, False]])
    neuron_keep = torch.zeros(LAYERS, INTER, dtype=torch.bool)
    neuron_keep[0, ::2] = True
    neuron_keep[1, 1::3] = True
    imp.zero_removed_(model, head_keep, neuron_keep)
    untuned = copy.deepcopy(model)
    tuning = imp.tune_masks_(model, dense, features, torch.arange(16), head_keep, neuron_keep, batch_size=5,
                             mode=mode)
    for layer in tuning:
        assert layer.attention_after < layer.attention_before
        assert layer.ffn_after < layer.ffn_before
    # The reported errors are those of the model with the scales folded in, measured independently (as a masked
    # checkpoint, each model on its own inputs) ...
    imp.apply_structure_(model, head_keep, neuron_keep)
    measured = imp.reconstruction_errors(model, dense, features, torch.arange(16), batch_size=7)
    for layer, (attention, ffn) in zip(tuning, measured):
        assert attention == pytest.approx(layer.attention_after, rel=1e-3)
        assert ffn == pytest.approx(layer.ffn_after, rel=1e-3)
    # ... and the first layer, whose input both share, starts from the untuned model's error.
    before = imp.reconstruction_errors(untuned, dense, features, torch.arange(16))
    assert before[0][0] == pytest.approx(tuning[0].attention_before, rel=1e-3)
    assert sum(a + f for a, f in measured) < sum(a + f for a, f in before)


def test_weight_tuning_fits_closer_than_scales_and_keeps_removed_weights_zero():
    dense = tiny_model()
    features = windows(16, width=20)
    head_keep = torch.tensor([[True, False, True, False], [False, True, True, True]])
    neuron_keep = torch.zeros(LAYERS, INTER, dtype=torch.bool)
    neuron_keep[:, ::3] = True
    neuron_keep[1, :] = False  # a layer without FFN: only the bias is fitted
    results = {}
    for mode in ("scales", "weights"):
        model = copy.deepcopy(dense)
        imp.zero_removed_(model, head_keep, neuron_keep)
        results[mode] = (model, imp.tune_masks_(model, dense, features, torch.arange(16), head_keep, neuron_keep,
                                                batch_size=6, damping=1e-6, mode=mode))
    (_, scales), (model, weights) = results["scales"], results["weights"]
    # The first attention sublayer sees the same input in both modes, and a scale per head is one of the weight
    # changes the weights mode can choose, so it fits at least as closely (strictly, here).
    assert weights[0].attention_after < scales[0].attention_after
    assert sum(t.attention_after + t.ffn_after for t in weights) < sum(t.attention_after + t.ffn_after for t in scales)
    assert weights[1].ffn_after < weights[1].ffn_before  # the bias alone moved the empty FFN's output
    for layer, heads, neurons in zip(model.bert.encoder.layer, head_keep, neuron_keep):
        columns = (~heads).repeat_interleave(HIDDEN // HEADS)
        assert torch.all(layer.attention.output.dense.weight[:, columns] == 0)
        assert torch.all(layer.output.dense.weight[:, ~neurons] == 0)


def test_the_tuning_damping_reaches_the_least_squares(tmp_path):
    # A ridge this strong leaves the weights where the cut put them: the error after tuning stays the error before.
    errors = {}
    for damping in (None, 1e9):
        metrics = train(tiny_cfg(tmp_path / str(damping), target_density=0.4, mask_tuning="weights",
                                 mask_tuning_damping=damping), progress=False)
        errors[damping] = (metrics["tuning_error_before"], metrics["tuning_error_after"])
    assert errors[None][1] < 0.9 * errors[None][0]
    assert errors[1e9][1] == pytest.approx(errors[1e9][0], rel=1e-4)


@pytest.mark.parametrize("mode", ["scales", "weights"])
def test_mask_tuning_takes_layers_with_nothing_kept(mode):
    dense = tiny_model()
    model = copy.deepcopy(dense)
    head_keep = torch.tensor([[False, False, False, False], [True, True, False, False]])
    neuron_keep = torch.zeros(LAYERS, INTER, dtype=torch.bool)
    neuron_keep[0, :5] = True  # layer 1 keeps no FFN dimension, layer 0 no head
    imp.zero_removed_(model, head_keep, neuron_keep)
    tuning = imp.tune_masks_(model, dense, windows(8), torch.arange(8), head_keep, neuron_keep, mode=mode)
    for layer in tuning:
        assert layer.attention_after <= layer.attention_before
        assert layer.ffn_after <= layer.ffn_before
    # The layer without heads loses its attention output's bias with them: the weights mode fitted that bias (a
    # tenth of the error reported) and the structure then masked it off, so the model saved was not the one fitted
    # and the reported errors (and the later layers' fits) described another model. Nothing is fitted there now.
    assert tuning[0].attention_after == tuning[0].attention_before
    assert torch.all(model.bert.encoder.layer[0].attention.output.dense.bias == 0)
    imp.apply_structure_(model, head_keep, neuron_keep)
    measured = imp.reconstruction_errors(model, dense, windows(8), torch.arange(8))
    for layer, (attention, ffn) in zip(tuning, measured):
        assert attention == pytest.approx(layer.attention_after, rel=1e-3)
        assert ffn == pytest.approx(layer.ffn_after, rel=1e-3)
    packed = pack(copy.deepcopy(model))
    inputs = {k: v for k, v in windows(4).items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        assert torch.allclose(model(**inputs).start_logits, packed(**inputs).start_logits, atol=1e-4)


def test_unknown_tuning_mode_is_refused():
    dense = tiny_model()
    keep_heads, keep_neurons = torch.ones(LAYERS, HEADS, dtype=torch.bool), torch.ones(LAYERS, INTER, dtype=torch.bool)
    with pytest.raises(ValueError, match="'scales' or 'weights'"):
        imp.tune_masks_(copy.deepcopy(dense), dense, windows(2), torch.arange(2), keep_heads, keep_neurons,
                        mode="columns")


def test_structure_survives_save_and_load(tmp_path, tokenizer):
    model = tiny_model()
    head_keep = torch.tensor([[True, False, True, True], [False, False, False, False]])
    neuron_keep = torch.rand(LAYERS, INTER, generator=torch.Generator().manual_seed(2)) > 0.6
    imp.zero_removed_(model, head_keep, neuron_keep)
    imp.apply_structure_(model, head_keep, neuron_keep)
    report = sparsity_report(model)
    assert torch.equal(torch.stack([s.heads_kept for s in report.layers]), head_keep)
    assert torch.equal(torch.stack([s.ffn_kept for s in report.layers]), neuron_keep)
    loaded = load_model(save_model(model, tokenizer, tmp_path / "ckpt"))
    assert all(m.mode == "fixed" for _, m in masks.masked_modules(loaded))
    inputs = {k: v for k, v in windows(4).items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        assert torch.allclose(model(**inputs).start_logits, loaded(**inputs).start_logits, atol=1e-6)


def test_tuning_windows_extend_the_calibration_windows():
    calibration, tuning = imp.calibration_and_tuning_index(100, 8, 20, seed=3)
    assert torch.equal(calibration, imp.calibration_index(100, 8, seed=3))
    assert torch.equal(tuning[:8], calibration) and len(set(tuning.tolist())) == 20
    calibration, tuning = imp.calibration_and_tuning_index(100, 30, 10, seed=3)
    assert torch.equal(calibration, imp.calibration_index(100, 30, seed=3)) and torch.equal(tuning, calibration[:10])
    assert len(imp.calibration_and_tuning_index(100, 8, 0, seed=3)[1]) == 0
    assert [len(i) for i in imp.calibration_and_tuning_index(12, 8, 20, seed=3)] == [8, 12]


def test_mask_tuning_may_use_more_windows_than_the_calibration(tmp_path, tokenizer):
    metrics = train(tiny_cfg(tmp_path, target_density=0.4, calibration_samples=4, mask_tuning_samples=20),
                    progress=False)
    assert metrics["calibration_windows"] == 4 and metrics["tuning_windows"] == 20
    assert type(metrics["calibration_windows"]) is int and type(metrics["tuning_windows"]) is int  # counts: 4, not 4.0


def test_each_fisher_stage_says_it_computes_importance_before_its_passes(tmp_path, caplog):
    """The calibration passes take minutes on a large model while the step count stands still: each stage says
    what it computes first, then what it keeps."""
    with caplog.at_level("INFO", logger="pruning.trainer"):
        train(tiny_cfg(tmp_path, target_density=0.3, fill_steps=4, fisher_stages=2, calibration_samples=4,
                       mask_tuning_samples=4), progress=False)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fisher stage")]
    importance_lines = [m for m in said if "importance" in m]
    assert importance_lines == [f"fisher stage {i}/2: importance of the heads and FFN neurons on 4 calibration windows"
                                for i in (1, 2)], said
    for i in (1, 2):
        assert said.index(importance_lines[i - 1]) < min(k for k, m in enumerate(said)
                                                         if m.startswith(f"fisher stage {i}/2: keeping"))


# --- through the trainer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [dict(target_density=0.4), dict(target_flops=0.5, mask_rearrange=True),
                                       dict(target_density=0.3, fill_steps=2),
                                       dict(target_density=0.3, fill_steps=4, fisher_stages=2, eval_every=2),
                                       dict(target_density=0.4, fisher_layer_floor=0.25),
                                       dict(target_density=0.4, mask_tuning="scales")])
def test_one_shot_checkpoint_packs_to_the_same_logits(tmp_path, tokenizer, overrides):
    cfg = tiny_cfg(tmp_path, **overrides)
    seen = []
    metrics = train(cfg, report=lambda m, c: seen.append(m), progress=False)
    assert len(seen) == cfg.fisher_stages and seen[-1]["f1"] == metrics["f1"]
    assert metrics["prune_seconds"] > 0 and metrics["calibration_windows"] == 24 * cfg.fisher_stages
    assert metrics["tuning_windows"] == 16 * cfg.fisher_stages
    if cfg.fisher_stages == 2:  # the first stage keeps sqrt(0.3) of the weights until the second cuts to 0.3
        assert seen[0]["linear_density"] == pytest.approx(0.3 ** 0.5, abs=0.02)
        assert seen[0]["heads_removed"] <= seen[1]["heads_removed"]
    masked = load_model(metrics["model_dir"])
    packed = pack(masked)
    if "target_flops" in overrides:
        assert linear_flops(packed, cfg.max_seq_length) <= 0.5 * linear_flops(masked, cfg.max_seq_length)
    else:
        costs = imp.structure_costs(masked.config, "density")
        assert cfg.target_density - costs.neuron / costs.total < metrics["linear_density"] <= cfg.target_density
    assert sparsity_report(packed).linear_density == pytest.approx(metrics["linear_density"])
    from pruning.squad import load_squad, prepare_eval_features
    from pruning.resources import squad_file

    inputs = prepare_eval_features(load_squad(squad_file("dev"), limit=4), tokenizer, max_seq_length=96,
                                   doc_stride=32).model_inputs()
    with torch.no_grad():
        a, b = masked(**inputs), packed(**inputs)
    assert float((a.start_logits - b.start_logits).abs().max()) <= 1e-4
    assert float((a.end_logits - b.end_logits).abs().max()) <= 1e-4


def test_recovery_with_hidden_state_distillation(tmp_path):
    teacher_cfg = tiny_cfg(tmp_path, method="dense", max_steps=4, output_dir=str(tmp_path / "teacher"),
                           attention_block=(32, 32))
    teacher = train(teacher_cfg, progress=False)["model_dir"]
    cfg = tiny_cfg(tmp_path, model=teacher, model_config=None, teacher=teacher, fill_steps=3, alpha_hidden=1.0,
                   target_density=0.5)
    metrics = train(cfg, progress=False)
    assert metrics["loss_hidden"] > 0 and metrics["loss_distil"] > 0 and metrics["step"] == 3


class Stop(Exception):
    pass


@pytest.mark.parametrize("extra", [dict(fisher_stages=1), dict(fisher_stages=2),
                                   dict(fill_packed=True, ema_decay=0.5)])
def test_recovery_resumes_with_the_same_structure_and_weights(tmp_path, extra):
    # With two stages the run stops after step 2, just before the second cut. A packed recovery resumes from the
    # masked checkpoint it wrote, packed again, with its optimizer state and weight average.
    common = dict(target_density=0.4, fill_steps=4, eval_every=2, **extra)
    full = train(tiny_cfg(tmp_path / "a", **common), progress=False)

    def stop_at_first(metrics, checkpoint):
        raise Stop

    cfg = tiny_cfg(tmp_path / "b", **common)
    with pytest.raises(Stop):
        train(cfg, report=stop_at_first, progress=False)
    resumed = train(cfg, resume_from=tmp_path / "b" / "run" / "checkpoint", progress=False)
    assert resumed["step"] == 4 and resumed["prune_seconds"] > 0  # the one-shot step ran once, before the stop
    a, b = load_model(full["model_dir"]), load_model(resumed["model_dir"])
    for (_, ma), (_, mb) in zip(masks.masked_modules(a), masks.masked_modules(b)):
        assert torch.equal(ma.block_mask(), mb.block_mask())
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa, pb, atol=1e-5), name


def test_a_packed_recovery_stopped_after_its_last_checkpoint_resumes_to_its_final_model(tmp_path):
    """Killed after the last step's checkpoint, before final/ was written: the resume writes the final model."""
    import shutil

    cfg = tiny_cfg(tmp_path, target_density=0.4, fill_steps=2, fill_packed=True, ema_decay=0.5)
    full = train(cfg, progress=False)
    final = Path(full["model_dir"])
    expected = load_model(final)
    shutil.rmtree(final)
    resumed = train(cfg, resume_from=tmp_path / "run" / "checkpoint", progress=False)
    assert resumed["step"] == 2 and resumed["f1"] == full["f1"]
    for (name, pa), (_, pb) in zip(expected.named_parameters(), load_model(final).named_parameters()):
        assert torch.equal(pa, pb), name


def test_a_packed_recovery_resumes_only_packed(tmp_path):
    """Its optimizer state belongs to the packed model's parameters: a resume must train the same ones."""
    import dataclasses

    from pruning.config import ConfigError

    cfg = tiny_cfg(tmp_path, target_density=0.4, fill_steps=4, eval_every=2, fill_packed=True)

    def stop_at_first(metrics, checkpoint):
        raise Stop

    with pytest.raises(Stop):
        train(cfg, report=stop_at_first, progress=False)
    with pytest.raises(ConfigError, match=r"\(fill_packed true there, false here\)"):
        train(dataclasses.replace(cfg, fill_packed=False), resume_from=tmp_path / "run" / "checkpoint",
              progress=False)


@pytest.mark.parametrize("method", ["topk", "sigmoid_threshold"])
@pytest.mark.parametrize("source", ["fisher", "magnitude"])
def test_warm_start_orders_the_scores(tmp_path, method, source):
    cfg = tiny_cfg(tmp_path, method=method, attention_block=[16, 16], mask_init=source, mask_init_scale=2.0,
                   max_steps=2, target_density=0.5, initial_warmup=0, final_warmup=0, mask_lr=1e-12)
    metrics = train(cfg, progress=False)
    model = load_model(metrics["model_dir"])
    scores = torch.cat([s.detach().flatten() for s in masks.mask_score_parameters(model)])
    assert float(scores.min()) >= -2.0 and float(scores.max()) <= 2.0 and float(scores.std()) > 0.5
    assert ("calibration_windows" in metrics) == (source == "fisher")


def test_fisher_warm_start_follows_head_importance():
    model = tiny_model()
    masks.apply_masks_(model, "topk", (16, 16))
    estimate = imp.fisher_importance(model, windows(8), torch.arange(8))
    imp.warm_start_scores_(model, "fisher", 1.0, estimate)
    for layer, heads, neurons in zip(model.bert.encoder.layer, estimate.heads, estimate.neurons):
        value = layer.attention.self.value.mask_scores.detach()  # (heads, blocks): 16 rows = one head here
        assert torch.equal(torch.argsort(value[:, 0], stable=True), torch.argsort(heads.float(), stable=True))
        ffn = layer.intermediate.dense.mask_scores.detach().flatten()
        assert torch.equal(torch.argsort(ffn, stable=True), torch.argsort(neurons.float(), stable=True))


def test_magnitude_warm_start_follows_block_magnitude():
    model = tiny_model()
    masks.apply_masks_(model, "topk", (16, 16))
    imp.warm_start_scores_(model, "magnitude", 1.0)
    query = model.bert.encoder.layer[0].attention.self.query
    expected = query.weight.detach().abs().reshape(4, 16, 4, 16).mean(dim=(1, 3)).flatten()
    assert torch.equal(torch.argsort(query.mask_scores.detach().flatten(), stable=True),
                       torch.argsort(expected, stable=True))


# --- losses, config and the command line ------------------------------------------------------------------


def test_hidden_mse_is_zero_for_equal_states_and_ignores_padding():
    a = [torch.randn(2, 5, 8), torch.randn(2, 5, 8)]
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    assert float(hidden_mse(a, [t.clone() for t in a], mask)) == 0.0
    b = [t.clone() for t in a]
    b[0][1, 4] += 100.0  # a padded token
    assert float(hidden_mse(a, b, mask)) == 0.0
    b[1][0, 0, 0] += 1.0
    assert float(hidden_mse(a, b, mask)) == pytest.approx(1.0 / 8 / 8 / 2)


def test_mask_init_accepts_numbers_and_names():
    assert RunConfig(mask_init=0.5).mask_init == 0.5
    assert RunConfig(mask_init="fisher").mask_init is MaskInit.FISHER
    with pytest.raises(ConfigError, match="mask_init"):
        RunConfig(mask_init="gradient")
    with pytest.raises(ConfigError, match="target_flops"):
        RunConfig(method="topk", target_flops=0.5)


def test_mask_tuning_takes_scales_or_weights():
    assert RunConfig(method="fisher", mask_tuning="weights").mask_tuning.value == "weights"
    # auto: the weights when nothing trains after the cut, the scales when a recovery does.
    assert RunConfig(method="fisher").tuning_mode.value == "weights"
    assert RunConfig(method="fisher", fill_steps=10).tuning_mode.value == "scales"
    assert RunConfig(method="fisher", fill_steps=10, mask_tuning="weights").tuning_mode.value == "weights"
    with pytest.raises(ConfigError, match="mask_tuning: unknown value 'columns' \\(allowed: auto, scales, weights\\)"):
        RunConfig(method="fisher", mask_tuning="columns")
    for bad in (0, -1.0, "a"):
        with pytest.raises(ConfigError, match="mask_tuning_damping: must be a number > 0 or null"):
            RunConfig(method="fisher", mask_tuning_damping=bad)


@pytest.mark.parametrize("values", [dict(method="fisher", fisher_stages=0), dict(method="topk", fisher_stages=2),
                                    dict(method="fisher", fisher_stages=3, fill_steps=2),
                                    dict(method="fisher", fisher_stages=1.5, fill_steps=4)])
def test_bad_fisher_stages_are_refused(values):
    with pytest.raises(ConfigError, match="fisher_stages"):
        RunConfig(**values)


@pytest.mark.parametrize("values,message", [
    (dict(method="fisher", fisher_layer_floor=1.0), "must be in \\[0, 1\\), got 1.0"),
    (dict(method="fisher", fisher_layer_floor=-0.1), "must be in \\[0, 1\\)"),
    (dict(method="fisher", fisher_layer_floor="a"), "must be in \\[0, 1\\), got 'a'"),
    (dict(method="topk", fisher_layer_floor=0.2), "is 0.2, but only method fisher"),
    (dict(method="fisher", target_density=0.3, fisher_layer_floor=0.4), "0.4 exceeds target_density 0.3"),
    (dict(method="fisher", target_flops=0.2, fisher_layer_floor=0.3), "0.3 exceeds target_flops 0.2")])
def test_bad_layer_floors_are_refused(values, message):
    with pytest.raises(ConfigError, match="fisher_layer_floor: " + message):
        RunConfig(**values)


def test_a_layer_floor_that_rounds_past_the_budget_is_a_config_error(tmp_path):
    # ceil(0.2 x 4) = 1 of 4 heads and ceil(0.2 x 128) = 26 of 128 neurons in each layer: 0.227 of the weights.
    cfg = tiny_cfg(tmp_path, target_density=0.2, fisher_layer_floor=0.2)
    with pytest.raises(ConfigError, match="fisher_layer_floor: a layer floor of 0.2 costs"):
        train(cfg, progress=False)


def fineprune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tokenizer) -> Path:
    # As many word embeddings as the tokenizer saved beside it has tokens: a model that can read its windows.
    return save_model(tiny_model(vocab=len(tokenizer)), tokenizer, tmp_path_factory.mktemp("dense") / "model")


def fisher_config(tmp_path: Path, model_dir: Path, line: str) -> Path:
    config = tmp_path / "fisher.yaml"
    block = "" if line.startswith("attention_block") else f"attention_block: {HEAD_BLOCK}\n"
    config.write_text(f"model: {model_dir}\nmethod: fisher\ntrain_data: dev\neval_data: dev\ntrain_limit: 4\n"
                      f"eval_limit: 2\nmax_seq_length: 64\ndoc_stride: 16\n{block}{line}\n"
                      f"output_dir: {tmp_path / 'out'}\n")
    return config


@pytest.mark.parametrize("line,key", [
    ("target_density: 1.5", "target_density"),
    ("target_density: 0", "target_density"),
    ("target_flops: 0.0", "target_flops"),
    ("target_flops: 1.2", "target_flops"),
    ("calibration_samples: 0", "calibration_samples"),
    ("mask_tuning: columns", "mask_tuning"),
    ("mask_tuning_damping: 0", "mask_tuning_damping"),
])
def test_bad_fisher_values_are_one_line_naming_file_and_key(tmp_path, dense_dir, line, key, capsys):
    config = fisher_config(tmp_path, dense_dir, line)
    assert cli_main(["prune", "--config", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(config) in lines[0] and key in lines[0]
    assert not (tmp_path / "out").exists()


def test_fisher_needs_head_shaped_blocks_one_line_exit_2(tmp_path, dense_dir):
    # Known only once the model is loaded: the real command line, through the trainer.
    config = fisher_config(tmp_path, dense_dir, "attention_block: [16, 16]")
    proc = fineprune("prune", "--config", str(config))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert str(config) in lines[-1] and "attention_block" in lines[-1] and "[16, 64]" in lines[-1]
    assert "Traceback" not in proc.stderr
