"""The cheaper recovery: training the packed model (``fill_packed``) and caching the teacher's logits."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertForQuestionAnswering

from pruning import importance as imp
from pruning import masks
from pruning.checkpoint import load_model
from pruning.config import ConfigError, RunConfig
from pruning.packing import PackingError, pack, pack_for_training, unpack_into_
from pruning.teacher_cache import TeacherCache
from pruning.trainer import train, training_loss

from test_importance import HEADS, INTER, LAYERS, tiny_model, windows
from test_importance import tiny_cfg as fisher_cfg

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def cut_model(head_keep: torch.Tensor, seed: int = 0) -> BertForQuestionAnswering:
    """A tiny random BERT with fixed masks: ``head_keep`` heads and every other FFN dimension of each layer."""
    model = tiny_model(seed)
    neuron_keep = (torch.arange(INTER) % 2 == 0).repeat(LAYERS, 1)
    imp.zero_removed_(model, head_keep, neuron_keep)
    imp.apply_structure_(model, head_keep, neuron_keep)
    return model


def tiny_cfg(tmp_path, **overrides) -> RunConfig:
    """A fisher cut to 0.4 with a 4-step recovery, without dropout (so that two runs can match step for step)."""
    return fisher_cfg(tmp_path, **{"target_density": 0.4, "fill_steps": 4, "dropout": 0.0, **overrides})


def logits(model, features) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(**{k: features[k] for k in INPUTS})
    return torch.cat([out.start_logits, out.end_logits])


# --- unpacking ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [[[True, False, True, True], [False, True, False, False]],
                                   [[False, False, False, False], [True, True, False, True]]])
def test_trained_packed_weights_go_back_into_the_masked_model(heads):
    masked = cut_model(torch.tensor(heads))
    packed = pack_for_training(masked)
    with torch.no_grad():  # as if trained: every trainable parameter moves
        for p in packed.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    # A layer that lost every head has no attention-output bias in the masked model: frozen in the packed one.
    frozen = [n for n, p in packed.named_parameters() if not p.requires_grad]
    assert frozen == (["bert.encoder.layer.0.attention.output.dense.bias"] if not any(heads[0]) else [])
    features = windows()
    assert float((logits(masked, features) - logits(packed, features)).abs().max()) > 1e-2
    assert unpack_into_(masked, packed) is masked
    assert float((logits(masked, features) - logits(packed, features)).abs().max()) <= 1e-4
    assert all(m.mode == "fixed" for _, m in masks.masked_modules(masked))
    # Packing the written-back model again gives the trained weights.
    again = dict(pack(masked).named_parameters())
    for name, p in packed.named_parameters():
        assert torch.equal(again[name], p), name


def test_a_layer_without_ffn_trains_its_output_bias_packed_as_masked():
    # Layer 0 keeps no head, layer 1 no FFN dimension: one SGD step on each model, then the packed one written back.
    head_keep = torch.tensor([[False] * HEADS, [True, False, True, True]])
    neuron_keep = torch.ones(LAYERS, INTER, dtype=torch.bool)
    neuron_keep[1] = False
    masked = tiny_model(0)
    imp.zero_removed_(masked, head_keep, neuron_keep)
    imp.apply_structure_(masked, head_keep, neuron_keep)
    packed = pack_for_training(masked)
    frozen = [n for n, p in packed.named_parameters() if not p.requires_grad]
    assert frozen == ["bert.encoder.layer.0.attention.output.dense.bias"]
    features = {k: windows()[k] for k in INPUTS}
    for model in (masked, packed):
        model.train()
        model.zero_grad()
        model(**features).start_logits.sum().backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and p.grad is not None:
                    p.sub_(0.01 * p.grad)
    trained = copy.deepcopy(masked)
    unpack_into_(masked, packed)
    assert float((logits(masked, features) - logits(trained, features)).abs().max()) <= 1e-4


def test_unpacking_into_another_structure_is_refused():
    masked = cut_model(torch.tensor([[True, False, True, True], [False, True, False, False]]))
    other = pack(cut_model(torch.tensor([[True, True, True, True], [False, True, False, False]])))
    with pytest.raises(PackingError, match="layer 0 attention.self.query: 64 packed rows or columns for 48 kept"):
        unpack_into_(masked, other)


# --- training the packed model ------------------------------------------------------------------------------


def test_a_packed_recovery_trains_what_the_masked_one_trains(tmp_path):
    """Without dropout the two runs compute the same function with the same gradients on the kept weights."""
    seen = {}
    results = {}
    for packed in (False, True):
        cfg = tiny_cfg(tmp_path / str(packed), fill_packed=packed, eval_every=2)
        results[packed] = train(cfg, report=lambda m, c, k=packed: seen.setdefault(k, []).append(m),
                                progress=False)
    a, b = load_model(results[False]["model_dir"]), load_model(results[True]["model_dir"])
    assert all(m.mode == "fixed" for _, m in masks.masked_modules(b))  # an ordinary masked checkpoint
    for (_, ma), (_, mb) in zip(masks.masked_modules(a), masks.masked_modules(b)):
        assert torch.equal(ma.block_mask(), mb.block_mask())
    # The QA head's bias shifts every position's logit alike, so its gradient is zero up to rounding, which
    # AdamW turns into steps of either sign: the runs may differ by a constant per row, nothing else.
    diff = logits(a, windows(width=40)) - logits(b, windows(width=40))
    assert float((diff - diff.mean(dim=1, keepdim=True)).abs().max()) <= 1e-4
    # The model did train: the recovery moved it away from the one-shot cut.
    for key in ("f1", "exact_match", "linear_density", "heads_removed"):
        assert [m[key] for m in seen[True]] == pytest.approx([m[key] for m in seen[False]], abs=1e-6), key
    assert seen[True][-1]["loss"] == pytest.approx(seen[False][-1]["loss"], rel=1e-4)


# --- the teacher's logits, cached --------------------------------------------------------------------------


def test_cached_logits_equal_the_teachers_forward_at_any_padded_width():
    teacher = cut_model(torch.ones(LAYERS, HEADS, dtype=torch.bool), seed=3)
    masks.remove_masks_(teacher)
    features = windows(n=12, width=24)
    cache = TeacherCache(teacher, features, torch.device("cpu"), batch_size=5)
    index = torch.tensor([7, 2, 9, 2])  # a repeated window is run once
    width = int(features["attention_mask"][index].sum(dim=1).max())
    start, end, hidden = cache(index, width)
    assert cache.forwards == 3 and start.shape == (4, width) and hidden is None
    with torch.no_grad():
        out = teacher(**{k: features[k][index, :width] for k in INPUTS})
    assert torch.allclose(start, out.start_logits, atol=1e-5) and torch.allclose(end, out.end_logits, atol=1e-5)
    cache(torch.tensor([2, 7]), 10)
    assert cache.forwards == 3  # nothing new to run


def test_the_loss_with_cached_logits_equals_the_loss_with_the_teacher(tmp_path):
    teacher = cut_model(torch.ones(LAYERS, HEADS, dtype=torch.bool), seed=3)
    masks.remove_masks_(teacher)
    student = cut_model(torch.tensor([[True, False, True, True], [False, True, True, False]]))
    features = windows(n=8, width=20)
    cfg = tiny_cfg(tmp_path)
    cache = TeacherCache(teacher, features, torch.device("cpu"), batch_size=8)
    index = torch.arange(8)
    width = int(features["attention_mask"].sum(dim=1).max())
    batch = {k: v[index, :width] if v.ndim == 2 else v[index] for k, v in features.items()}
    direct = training_loss(student, batch, cfg, teacher)
    cached = training_loss(student, batch, cfg, teacher, cached_teacher=cache(index, width))
    for a, b in zip(direct, cached):
        assert float(a.detach()) == pytest.approx(float(b.detach()), abs=1e-5)
    assert float(direct[2].detach()) > 0  # the distillation term is there, not zero on both sides
    with pytest.raises(ValueError, match="hold no hidden states, but alpha_hidden is 1.0"):
        training_loss(student, batch, tiny_cfg(tmp_path, alpha_hidden=1.0, teacher="x"), teacher,
                      cached_teacher=cache(index, width))


def test_cached_hidden_states_equal_the_teachers_and_give_the_same_loss(tmp_path):
    teacher = cut_model(torch.ones(LAYERS, HEADS, dtype=torch.bool), seed=3)
    masks.remove_masks_(teacher)
    student = cut_model(torch.tensor([[True, False, True, True], [False, True, True, False]]))
    features = windows(n=8, width=20)
    cache = TeacherCache(teacher, features, torch.device("cpu"), batch_size=3, hidden=True)
    index = torch.tensor([5, 1, 6, 1])
    width = int(features["attention_mask"][index].sum(dim=1).max())
    kept = cache(index, width)
    with torch.no_grad():
        out = teacher(**{k: features[k][index, :width] for k in INPUTS}, output_hidden_states=True)
    assert len(kept.hidden_states) == LAYERS
    real = features["attention_mask"][index, :width].bool()
    for mine, theirs in zip(kept.hidden_states, out.hidden_states[1:]):  # bf16: 8 bits of mantissa
        assert mine.shape == theirs.shape
        assert torch.allclose(mine.float()[real], theirs[real], rtol=1e-2, atol=1e-2)
    batch = {k: v[index, :width] if v.ndim == 2 else v[index] for k, v in features.items()}
    cfg = tiny_cfg(tmp_path, alpha_hidden=1.0, teacher="x")
    direct = training_loss(student, batch, cfg, teacher)
    cached = training_loss(student, batch, cfg, None, cached_teacher=kept)
    assert float(direct[3].detach()) > 0
    for a, b in zip(direct, cached):
        assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-2, abs=1e-5)


def test_hidden_states_beyond_the_memory_available_are_refused_before_any_is_taken():
    """Every training window's hidden states at full width (SQuAD's 88,641 windows of 384 tokens: 157 GB for MiniLM)
    were allocated at once: past the memory available, a traceback after the tokenization, or a run the kernel kills
    as the cache fills. A teacher of 512 layers of width 16,384 (on the meta device) over 1,000 windows of 512
    tokens would need 8.6 TB."""
    from transformers import BertConfig

    from pruning.memory import available_memory

    with torch.device("meta"):
        teacher = BertForQuestionAnswering(BertConfig(hidden_size=16384, num_hidden_layers=512,
                                                      num_attention_heads=128, intermediate_size=64))
    features = {k: torch.zeros(1000, 512, dtype=torch.long) for k in INPUTS}
    assert available_memory() is not None and available_memory() > 0
    with pytest.raises(ConfigError, match=r"^teacher_cache: the teacher's hidden states that alpha_hidden distils, "
                                          r"512 layers x 16384 values x 512 tokens for each of 1,000 training "
                                          r"windows, take 8589\.9 GB, more than the [0-9.]+ GB of memory"):
        TeacherCache(teacher, features, torch.device("cpu"), batch_size=8, hidden=True)
    TeacherCache(teacher, features, torch.device("cpu"), batch_size=8)  # the logits alone: 4 MB


@pytest.mark.parametrize("alpha_hidden", [0.0, 1.0])
def test_a_cached_teacher_runs_once_per_window_and_trains_the_same(tmp_path, alpha_hidden):
    teacher = train(tiny_cfg(tmp_path, method="dense", fill_steps=0, max_steps=3, attention_block=[32, 32],
                             output_dir=str(tmp_path / "teacher")), progress=False)["model_dir"]
    results = {}
    for cached in (False, True):
        cfg = tiny_cfg(tmp_path / str(cached), model=teacher, model_config=None, teacher=teacher, fill_steps=6,
                       teacher_cache=cached, fill_packed=True, train_limit=3, alpha_hidden=alpha_hidden)
        results[cached] = train(cfg, progress=False)
    plain, cached = results[False], results[True]
    distinct = int(cached["teacher_forward_windows"])  # the cache runs the teacher once on each window
    epoch = [8] * (distinct // 8) + ([distinct % 8] if distinct % 8 else [])  # an epoch's batches of 8
    windows_seen = sum((epoch * 6)[:6])  # six steps of one batch each
    assert plain["teacher_forward_windows"] == windows_seen
    assert 0 < distinct < windows_seen  # 3 questions give fewer windows than six steps train
    # The kept hidden states are bf16: the runs agree to its rounding, not to fp32's.
    tolerance = 1e-4 if alpha_hidden == 0 else 1e-2
    assert cached["loss_distil"] == pytest.approx(plain["loss_distil"], rel=tolerance)
    assert cached["loss_hidden"] == pytest.approx(plain["loss_hidden"], rel=tolerance)
    assert (plain["loss_hidden"] > 0) == (alpha_hidden > 0)
    a, b = load_model(plain["model_dir"]), load_model(cached["model_dir"])
    diff = logits(a, windows(width=40)) - logits(b, windows(width=40))  # up to a constant per row, as above
    assert float((diff - diff.mean(dim=1, keepdim=True)).abs().max()) <= tolerance


@pytest.mark.parametrize("values,message", [
    (dict(teacher_cache="yes", teacher="t"), "teacher_cache: must be true or false, got 'yes'"),
    (dict(fill_packed=True, method="topk"), "fill_packed: trains a fisher recovery packed, but method is topk"),
    (dict(fill_packed=True, method="fisher", fisher_stages=2, fill_steps=4), "fill_packed: needs fisher_stages 1"),
    (dict(fill_packed=1, method="fisher"), "fill_packed: must be true or false, got 1")])
def test_bad_cache_and_packing_settings_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**values)


def test_the_recovery_step_bench_cuts_to_the_density_and_times_all_three_steps(capsys, bench_script):
    from pruning.sparsity import sparsity_report

    bench = bench_script("train_overhead")
    dense = BertForQuestionAnswering(cut_model(torch.ones(LAYERS, HEADS, dtype=torch.bool)).config)
    masked = bench.cut(dense, 0.5)
    costs = imp.structure_costs(dense.config, "density")
    assert 0.5 - costs.neuron / costs.total < sparsity_report(masked).linear_density <= 0.5
    assert bench.measure_recovery(dense, 0.5, batch_size=2, seq_len=16, repeats=1, warmup=0) > 0
    out = capsys.readouterr().out
    assert "masked/packed " in out and "masked/packed_cached" in out and "FLOP limit" in out
    assert bench.measure_optimizer(dense, 0.5, batch_size=2, seq_len=16, repeats=1, warmup=0) > 0
    out = capsys.readouterr().out
    assert "MiniLM dense step" in out and "recovery, cached" in out and out.count("loop/fused") == 2


# --- frozen word embeddings --------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True])
def test_frozen_word_embeddings_stay_while_the_rest_trains(tmp_path, tokenizer, packed):
    from transformers import BertConfig

    from pruning.checkpoint import save_model
    from test_importance import TINY

    torch.manual_seed(5)
    start = BertForQuestionAnswering(BertConfig(vocab_size=tokenizer.vocab_size, **TINY))
    save_model(start, tokenizer, tmp_path / "start")
    cfg = tiny_cfg(tmp_path, model=str(tmp_path / "start"), model_config=None, fill_packed=packed,
                   freeze_embeddings=True)
    trained = load_model(train(cfg, progress=False)["model_dir"])
    before, after = start.bert.embeddings, trained.bert.embeddings
    assert torch.equal(after.word_embeddings.weight, before.word_embeddings.weight)
    assert not torch.equal(after.position_embeddings.weight, before.position_embeddings.weight)
    with pytest.raises(ConfigError, match="freeze_embeddings: must be true or false, got 1"):
        tiny_cfg(tmp_path, freeze_embeddings=1)
