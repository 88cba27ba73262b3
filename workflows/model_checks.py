"""Whether a sweep's configs fit the model they will train, told before anything starts: the model's transformers
config read here, and the checks the trainer makes before a run's first step (attention blocks that divide the
matrices, a teacher of the student's shape and vocabulary, a Fisher layer floor within the budget, the positions the
windows are cut to).

Each reads what it can on this machine and says nothing of what it cannot (a model directory only a cluster's
workers hold, a tokenizer that does not load): the trial then says why. The space's validators
(:class:`workflows.space.SweepSpace`) run them on every extreme of the searched values and name the key.
"""

from __future__ import annotations

import math
from typing import Any

from pruning.config import ConfigError, Method, RunConfig, attention_block_of, check_head_shaped, method_block
from pruning.resources import ResourceError, resolve_model

__all__ = ["is_packed", "model_config", "vocabulary_problem", "teacher_vocabulary_problem", "positions_of",
           "check_blocks", "check_teacher_shape", "check_layer_floor"]


def is_packed(model: str) -> bool:
    """Whether the model directory ``model`` names holds a packed model (False when it is not here to read: on a
    cluster's machines, the trial says so)."""
    from pruning.packing import is_packed_dir

    try:
        return is_packed_dir(resolve_model(model))
    except (ResourceError, OSError, ValueError):
        return False


def model_config(cfg: RunConfig) -> Any:
    """The transformers config the trainer builds ``cfg``'s model from (``config.json`` of its directory, or its
    ``model_config``), or None when it cannot be told here: a model directory that exists only on the cluster's
    machines, or a config or tokenizer that does not load (the trial says why).
    """
    # pruning imports torch and transformers: only a space whose limits are checked needs them.
    from pruning.checkpoint import CheckpointError, load_config
    from pruning.resources import shipped_model_dir
    from pruning.structure import scratch_config
    from pruning.tokenizer import load_tokenizer

    try:
        if cfg.model_config is None:
            return load_config(resolve_model(cfg.model))
        tokenizer = load_tokenizer(cfg.tokenizer or shipped_model_dir())
        return scratch_config(cfg.model_config, tokenizer)
    except (ResourceError, CheckpointError, OSError, TypeError, ValueError):
        return None


def vocabulary_problem(cfg: RunConfig) -> str | None:
    """Why a model built from ``cfg.model_config`` cannot embed its tokenizer's ids (the trainer refuses it before
    the first step), or None (also when the tokenizer does not load here: the run says why)."""
    from pruning.checkpoint import CheckpointError
    from pruning.resources import shipped_model_dir
    from pruning.structure import scratch_config
    from pruning.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.tokenizer or shipped_model_dir())
        size = int(scratch_config(cfg.model_config, tokenizer).vocab_size)
    except (ResourceError, CheckpointError, OSError, TypeError, ValueError):
        return None
    if size < len(tokenizer):
        return f"{size} is smaller than the tokenizer's {len(tokenizer)} tokens"
    return None


def teacher_vocabulary_problem(cfg: RunConfig, teacher: str) -> str | None:
    """Why the teacher directory ``teacher`` cannot read the token ids of ``cfg``'s student (fewer embeddings than the
    student's tokenizer has tokens, or a tokenizer of its own that numbers them otherwise), as the trainer refuses it
    before a trial's first step; None when it can, or when either is not here to read (the trial says why)."""
    from pruning.checkpoint import TOKENIZER_FILES, CheckpointError, load_config
    from pruning.resources import shipped_model_dir
    from pruning.tokenizer import load_tokenizer

    try:
        teacher_dir = resolve_model(teacher)
        own = shipped_model_dir() if cfg.model_config is not None else resolve_model(cfg.model)
        ours = load_tokenizer(cfg.tokenizer or own)
        embedded = int(load_config(teacher_dir).vocab_size)
    except (ResourceError, CheckpointError, OSError, TypeError, ValueError, AttributeError):
        return None
    if embedded < len(ours):
        return (f"{teacher} embeds {embedded} tokens, fewer than the student's tokenizer has ({len(ours)}): it needs "
                "the student's vocabulary")
    if not any((teacher_dir / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        theirs = load_tokenizer(teacher_dir).get_vocab()
    except (CheckpointError, OSError, ValueError):
        return None
    vocabulary = ours.get_vocab()
    differ = sum(1 for token, index in vocabulary.items() if theirs.get(token) != index)
    if differ:
        return (f"{teacher} has a tokenizer of {len(theirs)} tokens that numbers {differ} of the student's "
                f"{len(vocabulary)} tokens differently: the teacher must read the student's token ids")
    return None


def positions_of(config: Any) -> int | None:
    """:func:`pruning.structure.max_positions` of a model config; None for no config, or one it cannot read."""
    from pruning.structure import max_positions

    if config is None:
        return None
    try:
        return max_positions(config)
    except (TypeError, ValueError):
        return None


def check_blocks(cfg: RunConfig, model: Any, label: str) -> None:
    """The attention blocks of ``cfg``'s method fit the attention matrices of ``model`` (a transformers config, of
    the model ``label`` names), as the trainer requires when it builds the masked model: topk and sigmoid_threshold
    blocks divide the matrices, fisher blocks are one head.

    Raises:
        ConfigError: naming ``attention_block``.
    """
    if not cfg.masked:
        return
    try:
        hidden, heads = int(model.hidden_size), int(model.num_attention_heads)
    except (AttributeError, TypeError, ValueError):
        return
    if heads <= 0 or hidden % heads:  # the model does not build; the trial says why
        return
    if cfg.method is Method.FISHER:
        check_head_shaped(method_block(cfg), hidden // heads, hidden)
        return
    rows, cols = attention_block_of(method_block(cfg), hidden, heads)
    if hidden % rows or hidden % cols:
        raise ConfigError(f"attention_block: {rows}x{cols} does not divide the {hidden}x{hidden} attention matrices "
                          f"of {label} (hidden_size {hidden})")


def check_teacher_shape(cfg: RunConfig, model: Any, teacher: Any, label: str) -> None:
    """``alpha_hidden`` > 0 needs a teacher of the student's layers and width, as the trainer requires before the
    first step; ``model`` and ``teacher`` are transformers configs (``teacher`` None: not known here).

    Raises:
        ConfigError: naming ``alpha_hidden``.
    """
    if teacher is None or not cfg.alpha_hidden > 0:
        return
    try:
        ours = (int(model.num_hidden_layers), int(model.hidden_size))
        theirs = (int(teacher.num_hidden_layers), int(teacher.hidden_size))
    except (AttributeError, TypeError, ValueError):
        return
    if ours != theirs:
        raise ConfigError(f"alpha_hidden: {cfg.alpha_hidden} weighs a hidden-state MSE that needs a teacher with the "
                          f"student's layers and width, but {label} has {theirs[0]} layers of {theirs[1]} and the "
                          f"student {ours[0]} of {ours[1]}")


def check_layer_floor(cfg: RunConfig, model: Any, label: str, positions: int | None) -> None:
    """A fisher ``fisher_layer_floor`` keeps ``ceil(floor * n)`` of each layer's ``n`` heads and FFN neurons, which
    must fit in the ``target_density`` (or ``target_flops``) budget of the cut, as the trainer requires after the
    importance passes (:func:`pruning.importance.search_mask`); the floor's structures are kept by every stage, so
    the last stage, whose budget is the target itself, is the one to fit. FLOPs are counted on the windows the
    trainer cuts to ``positions`` (the student's and the teacher's); with ``positions`` None a FLOP target is left
    to the trial.

    Raises:
        ConfigError: naming ``fisher_layer_floor``.
    """
    if cfg.method is not Method.FISHER or not cfg.fisher_layer_floor > 0:
        return
    from pruning.importance import structure_costs
    from pruning.squad import fit_windows

    by_flops = cfg.target_flops is not None
    if by_flops and positions is None:
        return
    seq = cfg.max_seq_length
    if by_flops and seq > positions:  # as the trainer cuts the windows (pruning.trainer.fit_to_model)
        seq = fit_windows(cfg.max_seq_length, cfg.doc_stride, positions)[0]
    try:
        costs = structure_costs(model, "flops" if by_flops else "density", seq)
        layers, heads = int(model.num_hidden_layers), int(model.num_attention_heads)
        inter = int(model.intermediate_size)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return
    floor = cfg.fisher_layer_floor
    kept_heads, kept_neurons = math.ceil(floor * heads - 1e-9), math.ceil(floor * inter - 1e-9)
    cost = layers * (kept_heads * costs.head + kept_neurons * costs.neuron)
    target_key = "target_flops" if by_flops else "target_density"
    budget = int(math.floor(getattr(cfg, target_key) * costs.total + 1e-6))
    if cost > budget:
        share = f"FLOPs on windows of {seq} tokens" if by_flops else "linear weights"
        raise ConfigError(f"fisher_layer_floor: {floor} keeps {kept_heads} of the {heads} heads and {kept_neurons} of "
                          f"the {inter} FFN neurons of every layer of {label}, {cost / costs.total:.4g} of its "
                          f"{share}, more than the {target_key} {getattr(cfg, target_key)}")
