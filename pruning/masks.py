"""Binarizers and masked linear layers for block movement pruning.

A :class:`MaskedLinear` owns one learned score per ``block`` of its weight; the effective weight is
``weight * binarize(scores)`` expanded to full size, and the bias is masked with its rows (a bias entry is kept when
any block of its row is kept). Gradients reach the scores straight through the binarizer, so a score accumulates
``sum(weight * grad_weight)`` over its block: the movement of those weights away from zero.

Patterns (the paper's "hybrid" setting):
  * attention query/key/value: blocks of ``attention_block`` (default 32x32); the output projection uses the
    transposed block, so ``(head_dim, hidden)`` prunes whole heads ("struct" in the paper);
  * feed-forward pair: the first linear has one score per row (block ``(1, hidden)``); the second linear is a
    :class:`TiedColumnMaskedLinear` that applies the same scores to its columns, so a pruned intermediate dimension
    disappears from both matrices.

The trainer drives the masks from outside: :func:`set_threshold` before each step, nothing read from globals.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .structure import architecture_for, encoder_layers, get_module, set_module

__all__ = [
    "TopKBinarizer",
    "ThresholdBinarizer",
    "MaskedLinear",
    "TiedColumnMaskedLinear",
    "MODES",
    "apply_masks_",
    "remove_masks_",
    "set_threshold",
    "mask_score_parameters",
    "masked_modules",
    "score_regularization",
    "regularization_loss",
    "REGULARIZATION_GROUPS",
    "bake_masks_",
    "fix_masks_",
    "is_masked",
]

MODES = ("topk", "sigmoid_threshold", "cutoff", "fixed")
ROLES = ("attention", "ffn")
# The L1 term is averaged over these groups, as in the reference implementation (nn_pruning divides each group's
# lambda by their number), so the published final lambdas (2.5 to 40) mean the same here.
REGULARIZATION_GROUPS = len(ROLES)


class TopKBinarizer(torch.autograd.Function):
    """Keep the ``round(density * n)`` highest scores of a tensor (at least one); straight-through gradient."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, density: float) -> torch.Tensor:  # noqa: D401
        n = scores.numel()
        k = min(n, max(1, int(round(density * n))))
        mask = torch.zeros(n, dtype=scores.dtype, device=scores.device)
        if k == n:
            mask.fill_(1.0)
        else:
            mask[torch.topk(scores.detach().flatten(), k, sorted=False).indices] = 1.0
        return mask.view_as(scores)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


class ThresholdBinarizer(torch.autograd.Function):
    """Keep scores with ``sigmoid(score) > threshold`` (or ``score >= threshold`` when ``sigmoid`` is False).

    The gradient passes straight through to the raw scores.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float, sigmoid: bool = True) -> torch.Tensor:
        # Decided in float32 whatever the scores' dtype: a bf16 sigmoid rounds scores near the threshold onto it, so
        # a model cast to half precision (and saved, and loaded back in float32) would keep other blocks.
        if sigmoid:
            return (torch.sigmoid(scores.float()) > threshold).to(scores.dtype)
        return (scores.float() >= threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None, None


def _expand(block_mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block mask (R, C) -> weight mask (R * br, C * bc)."""
    rows, cols = block_mask.shape
    br, bc = block
    return block_mask[:, None, :, None].expand(rows, br, cols, bc).reshape(rows * br, cols * bc)


def _apply_blocks(weight: torch.Tensor, block_mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``weight * _expand(block_mask, block)`` without building the full-size mask.

    The weight is viewed as (R, br, C, bc) and multiplied by the broadcast block mask, so the forward pass makes
    one full-size tensor instead of three, and the backward pass reduces the score gradient straight from the
    product of gradient and weight.
    """
    rows, cols = block_mask.shape
    br, bc = block
    return (weight.reshape(rows, br, cols, bc) * block_mask[:, None, :, None]).view(weight.shape)


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is masked block-wise by learned scores.

    Args:
        in_features, out_features, bias: as for :class:`torch.nn.Linear`.
        block: (rows, cols) of one block; must divide the weight's shape.
        mode: ``"topk"``, ``"sigmoid_threshold"``, ``"cutoff"`` (scores >= a global cut-off) or ``"fixed"``.
        mask_init: initial value of every score.
        role: ``"attention"`` or ``"ffn"`` (the first linear of the feed-forward pair, whose scores also mask the
            columns of the second): the regularisation group, and how many weights one score masks.

    Every tensor the layer masks with is a parameter (``mask_scores``) or a non-persistent buffer (``cutoff``,
    ``fixed_mask``), so ``model.to(device)`` moves all of them.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block: tuple[int, int] = (32, 32),
                 mode: str = "sigmoid_threshold", mask_init: float = 0.0, device=None, dtype=None,
                 role: str = "attention") -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        br, bc = block
        if out_features % br or in_features % bc:
            raise ValueError(f"block {br}x{bc} does not divide the {out_features}x{in_features} weight")
        if mode not in MODES:
            raise ValueError(f"unknown mask mode {mode!r} (allowed: {', '.join(MODES)})")
        if role not in ROLES:
            raise ValueError(f"unknown mask role {role!r} (allowed: {', '.join(ROLES)})")
        self.block = (br, bc)
        self.mode = mode
        self.role = role
        self.threshold = 1.0 if mode == "topk" else 0.0  # density for topk; threshold on sigmoid(score) otherwise
        self.mask_scores = nn.Parameter(
            torch.full((out_features // br, in_features // bc), float(mask_init), device=device,
                       dtype=dtype or torch.float32))
        # Derived state lives in buffers so that it follows the scores to any device; neither is saved (a
        # checkpoint records the threshold and rebuilds the fixed mask from the scores).
        self.register_buffer("cutoff", torch.zeros((), device=device, dtype=torch.float32), persistent=False)
        self.register_buffer("fixed_mask", None, persistent=False)  # block mask of "fixed" mode (filled phase)
        self.fixed_block: tuple[int, int] | None = None  # what one entry of fixed_mask covers; None: ``block``

    @property
    def mask_block(self) -> tuple[int, int]:
        """The (rows, cols) one entry of :meth:`block_mask` covers: ``block``, or in ``fixed`` mode the fixed mask's
        own (one row or column of a head, see :func:`fix_masks_`)."""
        if self.mode == "fixed" and self.fixed_block is not None:
            return self.fixed_block
        return self.block

    @property
    def weights_per_score(self) -> int:
        """Weights one score masks: its block, plus the tied column of the second FFN linear for ``ffn``."""
        return self.block[0] * self.block[1] * (2 if self.role == "ffn" else 1)

    def current_threshold(self) -> float:
        """The value that, with ``mode``, reproduces the current mask (the cut-off in ``cutoff`` mode)."""
        return float(self.cutoff) if self.mode == "cutoff" else float(self.threshold)

    def set_cutoff(self, value: float | torch.Tensor) -> None:
        """Switch to ``cutoff`` mode: keep the blocks whose score is at least ``value`` (copied on-device)."""
        self.mode = "cutoff"
        with torch.no_grad():
            self.cutoff.copy_(torch.as_tensor(value, dtype=self.cutoff.dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: tuple[int, int], mode: str, mask_init: float = 0.0,
                    role: str = "attention") -> "MaskedLinear":
        masked = cls(linear.in_features, linear.out_features, linear.bias is not None, block, mode, mask_init,
                     device=linear.weight.device, dtype=linear.weight.dtype, role=role)
        with torch.no_grad():
            masked.weight.copy_(linear.weight)
            if linear.bias is not None:
                masked.bias.copy_(linear.bias)
        return masked

    def block_mask(self) -> torch.Tensor:
        """The binary block mask, differentiable (straight-through) with respect to the scores."""
        if self.mode == "fixed":
            if self.fixed_mask is None:
                raise RuntimeError("fixed mask mode without a fixed mask")
            return self.fixed_mask
        if self.mode == "topk":
            return TopKBinarizer.apply(self.mask_scores, self.threshold)
        if self.mode == "cutoff":
            return ThresholdBinarizer.apply(self.mask_scores, self.cutoff, False)
        return ThresholdBinarizer.apply(self.mask_scores, self.threshold, True)

    def weight_mask(self, block_mask: torch.Tensor | None = None) -> torch.Tensor:
        return _expand(self.block_mask() if block_mask is None else block_mask, self.mask_block)

    def bias_mask(self, block_mask: torch.Tensor) -> torch.Tensor:
        # A bias entry lives as long as any block of its row does; no gradient flows through this path.
        return block_mask.detach().amax(dim=1).repeat_interleave(self.mask_block[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block_mask = self.block_mask()
        weight = _apply_blocks(self.weight, block_mask, self.mask_block)
        bias = None if self.bias is None else self.bias * self.bias_mask(block_mask)
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain linear layer with the mask applied to weight and bias."""
        block_mask = self.block_mask().detach()
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight.copy_(_apply_blocks(self.weight, block_mask, self.mask_block))
        if self.bias is not None:
            linear.bias.copy_(self.bias * self.bias_mask(block_mask))
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block={self.block}, mode={self.mode}, role={self.role}"


class TiedColumnMaskedLinear(nn.Linear):
    """A linear layer whose columns are masked by the row scores of another :class:`MaskedLinear`.

    Used for the second linear of the feed-forward pair: the source is the first linear with ``block=(1, hidden)``,
    so source row ``i`` and this layer's column ``i`` share one score. The source is held as a plain reference (not
    a sub-module), so its scores are saved and optimised once.
    """

    def __init__(self, in_features: int, out_features: int, source: MaskedLinear, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if source.block[1] != source.in_features or source.out_features != in_features:
            raise ValueError("the source of a tied column mask must have one score per row, one row per column here")
        object.__setattr__(self, "source", source)

    @classmethod
    def from_linear(cls, linear: nn.Linear, source: MaskedLinear) -> "TiedColumnMaskedLinear":
        tied = cls(linear.in_features, linear.out_features, source, linear.bias is not None,
                   device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            tied.weight.copy_(linear.weight)
            if linear.bias is not None:
                tied.bias.copy_(linear.bias)
        return tied

    def column_mask(self) -> torch.Tensor:
        return self.source.block_mask().reshape(1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.column_mask(), self.bias)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight.copy_(self.weight * self.column_mask().detach())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear


def is_masked(model: nn.Module) -> bool:
    return any(isinstance(m, MaskedLinear) for m in model.modules())


def masked_modules(model: nn.Module) -> Iterator[tuple[str, MaskedLinear]]:
    """Every score-owning layer, with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, MaskedLinear):
            yield name, module


def apply_masks_(model: nn.Module, mode: str, attention_block: tuple[int, int] = (32, 32),
                 mask_init: float = 0.0) -> nn.Module:
    """Replace the attention and feed-forward linears of ``model`` by masked ones, in place.

    Raises:
        ValueError: the block shape does not divide an attention matrix, or the mode is unknown.
    """
    if mode not in ("topk", "sigmoid_threshold"):
        raise ValueError(f"unknown pruning method {mode!r} (allowed: topk, sigmoid_threshold)")
    arch = architecture_for(model)
    layer_mode = mode
    for layer in encoder_layers(model):
        for path in arch.attention_linears:
            linear = get_module(layer, path)
            if isinstance(linear, MaskedLinear):
                continue
            # The output projection gets the transposed block: its columns belong to heads as the rows of
            # query/key/value do, so a (head_dim, hidden) block masks whole heads in all four matrices.
            br, bc = attention_block if path != arch.attention_output else attention_block[::-1]
            if linear.out_features % br or linear.in_features % bc:
                raise ValueError(f"attention_block: {br}x{bc} does not divide the {linear.out_features}x"
                                 f"{linear.in_features} matrix {path}")
            set_module(layer, path, MaskedLinear.from_linear(linear, (br, bc), layer_mode, mask_init, "attention"))
        first = get_module(layer, arch.ffn_in)
        if isinstance(first, MaskedLinear):
            continue
        masked_first = MaskedLinear.from_linear(first, (1, first.in_features), layer_mode, mask_init, "ffn")
        set_module(layer, arch.ffn_in, masked_first)
        tied = TiedColumnMaskedLinear.from_linear(get_module(layer, arch.ffn_out), masked_first)
        set_module(layer, arch.ffn_out, tied)
    return model


def remove_masks_(model: nn.Module) -> nn.Module:
    """Bake the current masks into plain linear layers, in place (the inverse of :func:`apply_masks_`)."""
    replacements = [(name, module.to_linear()) for name, module in model.named_modules()
                    if isinstance(module, (MaskedLinear, TiedColumnMaskedLinear))]
    for name, linear in replacements:
        set_module(model, name, linear)
    return model


def mask_score_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [module.mask_scores for _, module in masked_modules(model)]


@torch.no_grad()
def set_threshold(model: nn.Module, value: float, global_topk: bool = False) -> None:
    """Set the current threshold of every masked layer.

    For ``topk`` layers ``value`` is the fraction of weights to keep. With ``global_topk`` the fraction applies to
    all masked weights together: one cut-off on the scores is found (each score weighted by the number of weights
    it masks, both FFN matrices counted) and every layer keeps the blocks at or above it. The cut-off is computed
    and stored on the scores' device, with no copy to the host. For ``sigmoid_threshold`` layers ``value`` is the
    threshold on ``sigmoid(score)``.
    """
    modules = [m for _, m in masked_modules(model) if m.mode != "fixed"]
    if not modules:
        return
    if not global_topk:
        for module in modules:
            module.threshold = float(value)
        return
    scores = torch.cat([m.mask_scores.detach().flatten() for m in modules])
    # Integer weight counts: exact for any model size (float32 sums lose units past 2^24 weights).
    sizes = torch.cat([torch.full((m.mask_scores.numel(),), m.weights_per_score, dtype=torch.int64,
                                  device=scores.device) for m in modules])
    total = sum(m.mask_scores.numel() * m.weights_per_score for m in modules)
    order = torch.argsort(scores, descending=True)
    kept = torch.cumsum(sizes[order], 0)
    # The target count goes in as a number: a tensor made of it would be copied from the host every step, and on a
    # GPU that copy waits for the work queued before it. The index stays a one-element tensor (a 0-d one would be
    # read back to the host to index with).
    index = torch.searchsorted(kept, int(round(float(value) * total))).reshape(1).clamp(max=len(kept) - 1)
    cutoff = scores[order[index]].reshape(())
    for module in modules:
        module.set_cutoff(cutoff)


def score_regularization(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 of sigmoid(scores), averaged within each matrix and then over the attention and the FFN groups."""
    groups: dict[str, list[torch.Tensor]] = {role: [] for role in ROLES}
    for _, module in masked_modules(model):
        if module.mode == "fixed":
            continue
        groups[module.role].append(torch.sigmoid(module.mask_scores).mean())
    zero = next(model.parameters()).new_zeros(())
    attention, ffn = (torch.stack(groups[role]).mean() if groups[role] else zero for role in ROLES)
    return attention, ffn


def regularization_loss(model: nn.Module, lambda_attention: float, lambda_ffn: float) -> torch.Tensor:
    """The score penalty added to the loss: ``(lambda_attention * R_att + lambda_ffn * R_ffn) / 2``.

    ``R_att`` and ``R_ffn`` come from :func:`score_regularization`. Dividing by the number of groups matches the
    reference implementation, so a final lambda means the same as its ``regularization_final_lambda`` (with the
    per-group lambdas at 1).
    """
    reg_att, reg_ffn = score_regularization(model)
    return (lambda_attention * reg_att + lambda_ffn * reg_ffn) / REGULARIZATION_GROUPS


@torch.no_grad()
def bake_masks_(model: nn.Module) -> None:
    """Multiply every masked weight (and masked bias) by its current mask, in place; the masks stay.

    The forward pass is unchanged, and pruned weights are now zero: a mask switched off later (the filled phase
    makes kept heads dense again) brings back zeros that then train, not the values the weights had when pruned.
    """
    for module in model.modules():
        if isinstance(module, MaskedLinear):
            block_mask = module.block_mask().detach()
            module.weight.copy_(_apply_blocks(module.weight, block_mask, module.mask_block))
            if module.bias is not None:
                module.bias.mul_(module.bias_mask(block_mask))
        elif isinstance(module, TiedColumnMaskedLinear):
            module.weight.mul_(module.column_mask().detach())


@torch.no_grad()
def fix_masks_(model: nn.Module, head_keep: list[torch.Tensor], ffn_keep: list[torch.Tensor]) -> None:
    """Freeze the structure that packing will keep and make kept heads dense again (the filled phase's masks).

    ``head_keep[i]`` (bool per head) and ``ffn_keep[i]`` (bool per FFN dimension) give layer ``i``'s surviving
    structure, on any device. Query/key/value rows and output columns of a kept head become fully unmasked;
    removed heads and FFN dimensions stay masked for good, also where a score block straddles a removed and a kept
    head (a block that does not divide the head size): the attention masks are fixed per row (query/key/value) and
    per column (output) of a head, not per block. Scores stop receiving gradients. The fixed masks are buffers on
    each layer's device, so they follow ``model.to(...)``.

    The weights are not touched: to start the filled phase from exactly the pruned model, call
    :func:`bake_masks_` first (a checkpoint reloaded in the filled phase must not be baked again).
    """
    arch = architecture_for(model)
    for layer, heads, dims in zip(encoder_layers(model), head_keep, ffn_keep):
        num_heads = heads.numel()
        for path in arch.attention_linears:
            module = get_module(layer, path)
            if not isinstance(module, MaskedLinear):
                continue
            head_dim = (module.out_features if path != arch.attention_output else module.in_features) // num_heads
            per_head = heads.to(device=module.weight.device, dtype=module.weight.dtype).repeat_interleave(head_dim)
            # One entry a row (or column) of the matrix, not one a score block: a block that straddles a kept and a
            # removed head would otherwise bring the removed head's weights back, and the head with them.
            if path == arch.attention_output:  # columns belong to heads
                module.fixed_mask = per_head.reshape(1, -1).contiguous()
                module.fixed_block = (module.out_features, 1)
            else:  # rows belong to heads
                module.fixed_mask = per_head.reshape(-1, 1).contiguous()
                module.fixed_block = (1, module.in_features)
            module.mode = "fixed"
            module.mask_scores.requires_grad_(False)
        first = get_module(layer, arch.ffn_in)
        if isinstance(first, MaskedLinear):
            first.fixed_mask = dims.to(device=first.weight.device, dtype=first.weight.dtype).reshape(-1, 1).contiguous()
            first.mode = "fixed"
            first.mask_scores.requires_grad_(False)
