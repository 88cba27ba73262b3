import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from pruning import masks
from pruning.masks import MaskedLinear, ThresholdBinarizer, TiedColumnMaskedLinear, TopKBinarizer
from pruning.sparsity import sparsity_report


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    values = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    values.update(overrides)
    model = BertForQuestionAnswering(BertConfig(**values)).eval()
    with torch.no_grad():  # random biases, as a trained model's are (BERT starts them at zero, hiding their masks)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_()
    return model


def inputs(seed=1, batch=2, seq=12):
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.randint(0, 100, (batch, seq), generator=g),
                attention_mask=torch.ones(batch, seq, dtype=torch.long),
                token_type_ids=torch.zeros(batch, seq, dtype=torch.long))


def test_topk_binarizer_keeps_exact_count_and_passes_gradient():
    scores = torch.randn(8, 4, requires_grad=True)
    mask = TopKBinarizer.apply(scores, 0.25)
    assert int(mask.sum()) == 8
    kept = scores.detach().flatten()[mask.flatten().bool()]
    assert kept.min() >= scores.detach().flatten()[~mask.flatten().bool()].max()
    (mask * torch.arange(32.0).view(8, 4)).sum().backward()
    assert torch.equal(scores.grad, torch.arange(32.0).view(8, 4))


def test_threshold_binarizer_uses_sigmoid():
    scores = torch.tensor([-3.0, -1.0, 0.0, 2.0], requires_grad=True)
    mask = ThresholdBinarizer.apply(scores, 0.3, True)
    assert mask.tolist() == [0.0, 0.0, 1.0, 1.0]  # sigmoid(-1) = 0.27
    mask.sum().backward()
    assert scores.grad.tolist() == [1.0] * 4
    # Kept above the threshold only: scores all at sigmoid 0.5 (a constant start) are pruned at threshold 0.5.
    assert ThresholdBinarizer.apply(torch.zeros(3), 0.5, True).tolist() == [0.0, 0.0, 0.0]


def test_topk_keeps_the_rounded_count_not_the_truncated_one():
    """Density 0.36 of 10 scores keeps 4 (3.6 rounded), not 3; and always at least one."""
    scores = torch.arange(10.0)
    assert TopKBinarizer.apply(scores, 0.36).tolist() == [0.0] * 6 + [1.0] * 4
    assert TopKBinarizer.apply(scores, 0.01).tolist() == [0.0] * 9 + [1.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_threshold_decisions_do_not_depend_on_the_scores_dtype(tmp_path, dtype):
    """A model cast to half precision keeps the blocks it keeps in float32, and so does its saved and reloaded copy
    (loaded in float32): in bf16, sigmoid(0.003) rounds to exactly 0.5, which a comparison in bf16 would cut."""
    from pruning.checkpoint import load_model, save_model

    scores = torch.tensor([0.003, -0.003, 0.02, 1.0])
    assert ThresholdBinarizer.apply(scores, 0.5, True).tolist() == [1.0, 0.0, 1.0, 1.0]
    assert ThresholdBinarizer.apply(scores.to(dtype), 0.5, True).tolist() == [1.0, 0.0, 1.0, 1.0]
    # The cut-off mode compares the scores themselves: 0.1 is no bf16 number, the cut-off stays 0.1 all the same.
    cut = torch.tensor([0.1]).to(dtype).float()  # the half-precision number nearest 0.1
    expected = [float(cut.item() >= 0.1)]
    assert ThresholdBinarizer.apply(cut.to(dtype), 0.1, False).tolist() == expected

    model = tiny_model()
    masks.apply_masks_(model, "sigmoid_threshold", (16, 16), mask_init=5.0)
    masks.set_threshold(model, 0.5)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.value.mask_scores[:] = 0.003
    heads = sparsity_report(model).heads_kept_per_layer
    half = model.to(dtype)
    assert sparsity_report(half).heads_kept_per_layer == heads == [4, 4]
    save_model(half, None, tmp_path / "m")
    assert sparsity_report(load_model(tmp_path / "m")).heads_kept_per_layer == heads


def test_masked_forward_equals_dense_when_everything_is_kept():
    model = tiny_model()
    x = inputs()
    with torch.no_grad():
        dense = model(**x)
    masks.apply_masks_(model, "sigmoid_threshold", (16, 16))
    masks.set_threshold(model, 0.0)
    with torch.no_grad():
        masked = model(**x)
    assert torch.equal(dense.start_logits, masked.start_logits)
    assert torch.equal(dense.end_logits, masked.end_logits)


def test_gradients_reach_the_scores():
    model = tiny_model()
    masks.apply_masks_(model, "topk", (16, 16))
    masks.set_threshold(model, 0.5)
    out = model(**inputs())
    (out.start_logits.sum() + out.end_logits.sum()).backward()
    scores = masks.mask_score_parameters(model)
    assert len(scores) == 2 * 5  # q, k, v, o, ffn per layer
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scores)


def test_score_gradient_is_the_block_sum_of_weight_times_weight_gradient():
    """Straight through: d loss / d score(block) = sum over the block of (d loss / d effective weight) * weight."""
    torch.manual_seed(0)
    linear = MaskedLinear(12, 8, block=(4, 3), mode="topk")
    linear.threshold = 0.5
    x = torch.randn(5, 12)
    out = linear(x)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    grad_effective = upstream.t() @ x  # (8, 12): gradient of the loss with respect to the masked weight
    expected = (grad_effective * linear.weight.detach()).reshape(2, 4, 4, 3).sum(dim=(1, 3))
    torch.testing.assert_close(linear.mask_scores.grad, expected)
    block_mask = linear.block_mask().detach()
    weight_mask = block_mask.repeat_interleave(4, dim=0).repeat_interleave(3, dim=1)  # each block over its (4, 3)
    torch.testing.assert_close(linear.weight.grad, grad_effective * weight_mask)
    assert 0 < float(block_mask.sum()) < block_mask.numel()  # some blocks are really cut


def test_block_mask_and_bias_follow_the_blocks():
    linear = MaskedLinear(8, 4, block=(2, 4), mode="sigmoid_threshold")
    with torch.no_grad():
        linear.mask_scores.copy_(torch.tensor([[5.0, -5.0], [-5.0, -5.0]]))
        linear.bias.fill_(1.0)
    linear.threshold = 0.5
    baked = linear.to_linear()
    assert (baked.weight[:2, :4] != 0).all() and (baked.weight[:2, 4:] == 0).all()
    assert (baked.weight[2:] == 0).all()
    assert baked.bias.tolist() == [1.0, 1.0, 0.0, 0.0]  # a row's bias lives while any block of the row does


def test_ffn_shared_mask_removes_the_same_dimension_from_both_matrices():
    model = tiny_model()
    masks.apply_masks_(model, "sigmoid_threshold", (16, 16), mask_init=5.0)
    layer = model.bert.encoder.layer[0]
    first, second = layer.intermediate.dense, layer.output.dense
    assert isinstance(first, MaskedLinear) and isinstance(second, TiedColumnMaskedLinear)
    assert second.source is first
    with torch.no_grad():
        first.mask_scores[[3, 70]] = -5.0
    masks.set_threshold(model, 0.5)
    w1, w2 = first.to_linear(), second.to_linear()
    for dim in (3, 70):
        assert (w1.weight[dim] == 0).all() and w1.bias[dim] == 0
        assert (w2.weight[:, dim] == 0).all()
    assert (w1.weight[4] != 0).any() and (w2.weight[:, 4] != 0).any()
    assert sparsity_report(model).ffn_kept_per_layer == [126, 128]
    # one score per dimension, owned once
    names = [n for n, _ in model.named_parameters() if n.endswith("mask_scores")]
    assert len(names) == len(set(names)) == 10


def test_block_shape_that_does_not_divide_is_an_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="attention_block: 24x16 does not divide"):
        masks.apply_masks_(model, "topk", (24, 16))
    with pytest.raises(ValueError, match="unknown pruning method"):
        masks.apply_masks_(tiny_model(), "magnitude", (16, 16))


def masked_fraction(model) -> float:
    """Kept fraction of the weights the masks cover: an FFN score masks a row of the first linear and a column of
    the second, so it counts twice its block."""
    kept = total = 0.0
    for _, module in masks.masked_modules(model):
        mask = module.block_mask().detach()
        factor = 2 if module.role == "ffn" else 1
        kept += float(mask.sum()) * module.block[0] * module.block[1] * factor
        total += mask.numel() * module.block[0] * module.block[1] * factor
    return kept / total


def test_topk_reaches_its_density_exactly_per_matrix():
    model = tiny_model()
    masks.apply_masks_(model, "topk", (16, 16))
    with torch.no_grad():
        for score in masks.mask_score_parameters(model):
            score.copy_(torch.randn_like(score))
    masks.set_threshold(model, 0.5)
    assert all(float(m.block_mask().detach().mean()) == 0.5 for _, m in masks.masked_modules(model))
    assert masked_fraction(model) == 0.5


@pytest.mark.parametrize("ffn_offset", [0.0, 2.0, -2.0])
def test_global_topk_counts_both_ffn_matrices(ffn_offset):
    """Globally the fraction is over every masked weight; an FFN dimension costs 2 x hidden weights, not hidden.

    With FFN scores shifted up (or down) the cut favours one group, which is where counting an FFN dimension at
    half its price misses the target.
    """
    model = tiny_model()
    masks.apply_masks_(model, "topk", (16, 16))
    with torch.no_grad():
        for _, module in masks.masked_modules(model):
            module.mask_scores.copy_(torch.randn_like(module.mask_scores) + (ffn_offset if module.role == "ffn" else 0))
    masks.set_threshold(model, 0.5, global_topk=True)
    assert masked_fraction(model) == pytest.approx(0.5, abs=0.02)
    assert all(m.mode == "cutoff" for _, m in masks.masked_modules(model))


def test_remove_masks_bakes_the_same_function():
    model = tiny_model()
    masks.apply_masks_(model, "topk", (16, 16))
    with torch.no_grad():
        for score in masks.mask_score_parameters(model):
            score.copy_(torch.randn_like(score))
    masks.set_threshold(model, 0.4)
    x = inputs()
    with torch.no_grad():
        before = model(**x).start_logits
        masks.remove_masks_(model)
        after = model(**x).start_logits
    assert not masks.is_masked(model)
    assert torch.allclose(before, after, atol=1e-6)


def test_score_regularization_groups_and_fix_masks():
    model = tiny_model()
    masks.apply_masks_(model, "sigmoid_threshold", (16, 16))
    reg_att, reg_ffn = masks.score_regularization(model)
    assert float(reg_att.detach()) == pytest.approx(0.5) and float(reg_ffn.detach()) == pytest.approx(0.5)
    report = sparsity_report(model)
    heads = [torch.tensor([True, False, True, True])] * 2
    ffn = [s.ffn_kept for s in report.layers]
    masks.fix_masks_(model, heads, ffn)
    layer = model.bert.encoder.layer[0]
    assert layer.attention.self.value.mode == "fixed"
    assert not layer.attention.self.value.mask_scores.requires_grad
    assert sparsity_report(model).heads_removed_per_layer == [1, 1]


def test_head_shaped_blocks_prune_whole_heads():
    model = tiny_model()  # hidden 64, 4 heads of 16
    masks.apply_masks_(model, "topk", (16, 64))
    layer = model.bert.encoder.layer[0]
    assert layer.attention.self.query.mask_scores.shape == (4, 1)
    assert layer.attention.output.dense.block == (64, 16)  # transposed: one score per head's columns
    with torch.no_grad():
        for score in masks.mask_score_parameters(model):
            score.copy_(torch.randn_like(score))
    masks.set_threshold(model, 0.5)
    report = sparsity_report(model)
    # half of the value heads are masked in every layer, and each masked value head removes its head
    assert all(removed >= 2 for removed in report.heads_removed_per_layer)


def test_regularization_loss_averages_the_two_groups():
    """As in the reference implementation: each group's lambda is divided by the number of groups."""
    model = tiny_model()
    masks.apply_masks_(model, "sigmoid_threshold", (16, 16), mask_init=0.0)  # sigmoid(0) = 0.5 everywhere
    with torch.no_grad():
        for _, module in masks.masked_modules(model):
            if module.role == "ffn":
                module.mask_scores.fill_(torch.logit(torch.tensor(0.25)).item())
    loss = masks.regularization_loss(model, lambda_attention=10.0, lambda_ffn=4.0)
    assert float(loss.detach()) == pytest.approx((10.0 * 0.5 + 4.0 * 0.25) / 2)


def test_row_blocks_for_attention_stay_in_the_attention_group_and_reload(tmp_path):
    """``attention_block: [1, hidden]`` (one score per query/key/value row) is not a feed-forward pattern."""
    from pruning.checkpoint import load_model, save_model

    model = tiny_model()
    masks.apply_masks_(model, "topk", (1, 64))
    roles = {name.split("layer.0.")[1]: m.role for name, m in masks.masked_modules(model) if ".layer.0." in name}
    assert roles == {"attention.self.query": "attention", "attention.self.key": "attention",
                     "attention.self.value": "attention", "attention.output.dense": "attention",
                     "intermediate.dense": "ffn"}
    with torch.no_grad():
        for _, module in masks.masked_modules(model):
            module.mask_scores.copy_(torch.randn_like(module.mask_scores))
            if module.role == "ffn":
                module.mask_scores.fill_(1.0)  # FFN kept, attention scores random
    reg_att, reg_ffn = masks.score_regularization(model)
    assert float(reg_ffn.detach()) == pytest.approx(float(torch.sigmoid(torch.tensor(1.0))))
    assert float(reg_att.detach()) != pytest.approx(float(reg_ffn.detach()))
    masks.set_threshold(model, 0.5)
    x = inputs()
    with torch.no_grad():
        before = model(**x).start_logits
    save_model(model, None, tmp_path / "rows")
    reloaded = load_model(tmp_path / "rows")
    query = reloaded.bert.encoder.layer[0].attention.self.query
    assert query.block == (1, 64) and reloaded.bert.encoder.layer[0].attention.output.dense.block == (64, 1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**x).start_logits, before)


def test_a_block_straddling_a_removed_and_a_kept_head_keeps_the_removed_head_out_of_the_filled_phase(tmp_path):
    """Blocks of 24 rows over heads of 16: pruning value rows 0-23 removes head 0 (rows 0-15) while head 1 lives on
    through rows 24-31. The filled phase trains kept heads densely and must not bring head 0 back: the structure,
    and so the packed model, stays what pruning left, and the masked and packed models compute the same."""
    from pruning.checkpoint import load_model, save_model
    from pruning.packing import max_logit_diff, pack
    from pruning.trainer import enter_fill_phase

    model = tiny_model(hidden_size=48, num_attention_heads=3, intermediate_size=37, num_hidden_layers=1)
    masks.apply_masks_(model, "sigmoid_threshold", (24, 48))
    with torch.no_grad():
        for name, module in masks.masked_modules(model):
            module.mask_scores.fill_(5.0)
            if name.endswith("attention.self.value"):
                module.mask_scores[0] = -5.0
    masks.set_threshold(model, 0.5)
    enter_fill_phase(model)
    assert sparsity_report(model).layers[0].heads_kept.tolist() == [False, True, True]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        out = model(**inputs(seed=step))
        (out.start_logits.square().mean() + out.end_logits.square().mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert sparsity_report(model).layers[0].heads_kept.tolist() == [False, True, True]
    value = model.bert.encoder.layer[0].attention.self.value.to_linear()
    assert not value.weight[:16].any() and not value.bias[:16].any()  # head 0 still masked
    assert value.weight[16:32].all()  # head 1 dense again, also its rows inside the pruned block
    packed = pack(model)
    assert packed.config.fineprune_heads_kept == [[1, 2]]
    assert max_logit_diff(model, packed, inputs()) < 1e-5
    reloaded = load_model(save_model(model, None, tmp_path / "filled"))
    assert sparsity_report(reloaded).layers[0].heads_kept.tolist() == [False, True, True]
    assert max_logit_diff(model, reloaded, inputs()) == 0.0


def test_the_filled_phase_brings_back_pruned_rows_of_a_kept_head_as_zeros_bias_included():
    """Rows 0-7 of head 0's value matrix pruned (blocks of 8 rows), the head kept by its other rows: in the filled
    phase the head is dense again, and those rows come back as zeros, their bias too (a bias left as it was adds
    itself back to every token). The model computes what it did at the end of pruning."""
    from pruning.trainer import enter_fill_phase

    model = tiny_model()
    masks.apply_masks_(model, "sigmoid_threshold", (8, 16), mask_init=5.0)
    masks.set_threshold(model, 0.5)
    value = model.bert.encoder.layer[0].attention.self.value
    with torch.no_grad():
        value.mask_scores[0, :] = -5.0
        before = model(**inputs()).start_logits
    assert value.bias[:8].abs().min() > 0
    enter_fill_phase(model)
    assert sparsity_report(model).layers[0].heads_kept.all()
    with torch.no_grad():
        after = model(**inputs()).start_logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert not value.weight[:8].any() and not value.bias[:8].any() and value.bias[8:].abs().min() > 0
