"""The training loop: dense fine-tuning and masked fine-pruning, with distillation and a filled phase.

One explicit loop, in this order each step: set learning rates and the mask threshold, forward, loss (span
cross-entropy, distillation, score regularisation), backward, clip, optimizer step, weight average (``ema_decay``),
log, evaluate, checkpoint.

Phases of a masked run (``S`` = pruning steps, ``F`` = ``fill_steps``):
  * steps ``[0, S)``: the threshold (or topk density) follows the cubic schedule; scores learn at ``mask_lr``;
  * steps ``[S, S + F)`` ("filled"): removed heads and FFN dimensions stay removed, kept heads are dense again,
    scores are frozen, and the weights are fine-tuned further with distillation.

``method: fisher`` has no pruning steps: before the loop, one-shot structured pruning (:mod:`pruning.importance`)
fixes the structure, and the ``F`` filled steps are its recovery fine-tune. With ``fisher_stages: k`` the cut
is made in ``k`` stages, each on the model the previous recovery left, before steps ``0, F/k, 2F/k, ...``.
``mask_init: fisher | magnitude`` warm starts the scores of topk and sigmoid_threshold from the same importance
estimates. With ``fill_packed`` the recovery trains the packed model (a step costs what the smaller model costs);
its weights go back into the masked model (:func:`pruning.packing.unpack_into_`) for every checkpoint and the
final model. With ``teacher_cache`` the teacher runs once per distinct window (:mod:`pruning.teacher_cache`).

``train(cfg, report=...)`` calls ``report(metrics, checkpoint_dir)`` at every evaluation; the sweep forwards it to
Ray Tune, a plain script can log it. Nothing here knows about Ray or MLflow.

The order the windows are trained in is :mod:`pruning.batches`; what a resumed run must share with its checkpoint,
and where it goes on, :mod:`pruning.resume`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from . import atomic, importance
from . import masks as mask_lib
from . import squad
from .packing import PACKED_FLAG, is_packed_dir, model_params, pack_for_training, unpack_into_
from .averaging import PREFIX as AVERAGE_PREFIX
from .averaging import WeightAverage
from .batches import DataPosition, WindowBatches
from .checkpoint import (
    STATE,
    OPTIMIZER,
    NULL_ANSWERS,
    TOKENIZER_FILES,
    CheckpointError,
    load_model,
    load_training_state,
    optimizer_tensors,
    read_null_answers,
    restore_optimizer,
    save_model,
)
from .contents import content_digest
from .config import (CHECKPOINT_DIR, FINAL_DIR, ConfigError, MaskInit, Method, RunConfig, TopkScope,
                     attention_block_of, check_head_shaped, config_to_dict, evaluation_settings, method_block)
from .distill import hidden_mse, kd_loss, qa_ce_loss
from .errors import error_line
from .precision import autocast, check_device, resolve_precision
from .resources import resolve_data, resolve_model, resolve_tokenizer, same_model, shipped_model_dir
from .resume import (DATA_DIGEST, DATA_POSITION, MODEL_DIGEST, check_resume_config, check_resumed_masks,
                     check_resumed_windows, resume_position)
from .schedules import cubic_schedule, linear_warmup_decay, warmups
from .sparsity import sparsity_report
from .structure import architecture_for, max_positions, qa_model_class, scratch_config
from .teacher_cache import TeacherCache, TeacherOutputs
from .tokenizer import load_tokenizer, tokenizer_misfit

__all__ = ["Report", "TrainingPlan", "build_model", "fit_to_model", "plan", "mask_schedule", "train", "evaluate",
           "resolve_device", "check_device", "enter_fill_phase", "training_loss", "fused_adamw", "TrainingDiverged",
           "warn_if_not_held_out"]

logger = logging.getLogger(__name__)

_FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW kernel runs (and is tested here)

Report = Callable[[dict[str, float], "str | None"], None]


class TrainingDiverged(RuntimeError):
    """The training loss or the gradient norm stopped being finite: the run's settings make it diverge.

    Raised before the optimizer applies the step, so the weights and the last checkpoint stay finite.
    """


def _check_finite(step: int, terms: dict[str, float], grad_norm: float | None, cfg: RunConfig,
                  saved_step: int | None) -> None:
    """Stop a diverged run at its first non-finite step, in one line: what went non-finite, what to change."""
    if math.isfinite(terms["loss"]) and (grad_norm is None or math.isfinite(grad_norm)):
        return
    if math.isfinite(terms["loss"]):
        what = f"the gradient norm is {grad_norm}"
    else:
        parts = ", ".join(f"{name.removeprefix('loss_')} {terms[name]:.4g}"
                          for name in ("loss_ce", "loss_distil", "loss_hidden", "loss_reg"))
        what = f"the training loss is {terms['loss']} ({parts})"
    kept = "" if saved_step is None else f"; the last checkpoint, of step {saved_step}, is kept"
    raise TrainingDiverged(f"step {step}: {what}: training diverged at learning_rate {cfg.learning_rate:g} "
                           f"(lower it, or set max_grad_norm){kept}")


_TERMS = ("loss_ce", "loss_distil", "loss_hidden", "loss_reg", "loss")  # the order of a micro-batch's terms


def _host_terms(values: list[float], cfg: RunConfig) -> tuple[dict[str, float], float | None]:
    """A step's loss terms (means over its micro-batches) and gradient norm (None without clipping), from the one
    read of the device that gives them all: each micro-batch's terms in :data:`_TERMS` order, then the norm.

    On a GPU every read waits for the work queued before it; a read per term and micro-batch would stall the queue
    between micro-batches, so the loop keeps them on the device until the step is done.
    """
    terms = dict.fromkeys(_TERMS, 0.0)
    for micro in range(cfg.grad_accum):
        for offset, name in enumerate(_TERMS):
            terms[name] += values[micro * len(_TERMS) + offset] / cfg.grad_accum
    grad_norm = values[cfg.grad_accum * len(_TERMS)] if cfg.max_grad_norm else None
    return terms, grad_norm


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _check_config(cfg: Any) -> None:
    """A run's settings are a :class:`RunConfig`: a YAML path or a dict given in its place stopped at its first
    attribute read (``'str' object has no attribute 'seed'``)."""
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"cfg must be a RunConfig (pruning.config.load_config(path) reads one from YAML, "
                        f"config_from_dict(values) makes one of a dict), got {type(cfg).__name__}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _tokenizer_source(cfg: RunConfig) -> str:
    """Where the run's tokenizer comes from, as :func:`build_model` finds it, for a message."""
    return cfg.tokenizer or (cfg.model if cfg.model_config is None else "the shipped tokenizer (minilm)")


def _check_tokenizer_fits(cfg: RunConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer whose windows the model cannot embed (:func:`tokenizer_misfit`: a BERT tokenizer for a
    RoBERTa-family model, whose ``type_vocab_size`` is 1, or a model with fewer word embeddings than the tokenizer
    has tokens): every window would fail at the first forward with an index error."""
    if (misfit := tokenizer_misfit(model.config, tokenizer)) is None:
        return
    source = _tokenizer_source(cfg)
    if cfg.model_config is not None:
        raise ConfigError(f"tokenizer: {source} does not fit model_config: {misfit}: use the model's own tokenizer")
    config_file = resolve_model(cfg.model) / "config.json"
    if cfg.tokenizer is None:
        raise ConfigError(f"model: {config_file}: {misfit}: the model and the tokenizer files beside it do not belong "
                          "together (save the model with its own tokenizer)")
    raise ConfigError(f"tokenizer: {source} does not fit {config_file}: {misfit}: use the model's own tokenizer")


def _check_pad_id(cfg: RunConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a RoBERTa-family model whose ``pad_token_id`` is not the id its windows are padded with: it would
    count positions from another token (a CLS token taken for padding gets the zero position embedding) without a
    word."""
    if not architecture_for(model).positions_after_padding:
        return
    ours, theirs = model.config.pad_token_id, tokenizer.pad_token_id
    if ours == theirs:
        return
    source = _tokenizer_source(cfg)
    if cfg.model_config is not None:
        raise ConfigError(f"model_config.pad_token_id: {ours} is not the pad id of the tokenizer {source} "
                          f"({theirs}): a {model.config.model_type} model counts positions from its pad id (leave "
                          "pad_token_id out to take the tokenizer's)")
    raise ConfigError(f"tokenizer: {source} pads with id {theirs}, but {resolve_model(cfg.model) / 'config.json'} "
                      f"has pad_token_id {ours}: a {model.config.model_type} model counts positions from its pad id")


def build_model(cfg: RunConfig) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The student (masked when the method asks for it) and its tokenizer, on the CPU."""
    if cfg.model_config is not None:
        tokenizer = load_tokenizer(resolve_tokenizer(cfg.tokenizer) if cfg.tokenizer else shipped_model_dir())
        config = scratch_config(cfg.model_config, tokenizer)
        if config.vocab_size < len(tokenizer):  # token ids past the embeddings fail at the first forward
            raise ConfigError(f"model_config.vocab_size: {config.vocab_size} is smaller than the tokenizer's "
                              f"{len(tokenizer)} tokens")
        model = qa_model_class(config.model_type)(config)
    else:
        model_dir = resolve_model(cfg.model)
        if cfg.masked and is_packed_dir(model_dir):
            # Its layers differ in width: a fisher cut fails on them, and masks trained on them were saved with the
            # packed record into a final model and checkpoint that nothing reads back.
            raise CheckpointError(f"{cfg.model}: is a packed model ({PACKED_FLAG} in config.json), whose layers "
                                  f"differ in width; method {cfg.method.value} prunes a model of the original "
                                  "shape: prune the model it was packed from (a packed model can be fine-tuned "
                                  "with `fineprune train`)")
        model = load_model(model_dir, fine_tune=True)
        tokenizer = load_tokenizer(resolve_tokenizer(cfg.tokenizer) if cfg.tokenizer else model_dir)
    if mask_lib.is_masked(model):
        raise CheckpointError(f"{cfg.model}: is a masked checkpoint; start from a dense model or use --resume")
    _check_tokenizer_fits(cfg, model, tokenizer)
    _check_pad_id(cfg, model, tokenizer)
    if cfg.method is Method.FISHER:
        # Pruned in one shot by train() once the calibration windows exist; the masks come with the structure.
        config = model.config
        check_head_shaped(method_block(cfg), config.hidden_size // config.num_attention_heads, config.hidden_size)
    elif cfg.masked:
        constant = 0.0 if isinstance(cfg.mask_init, MaskInit) else float(cfg.mask_init)
        config = model.config
        block = attention_block_of(method_block(cfg), config.hidden_size, config.num_attention_heads)
        try:
            mask_lib.apply_masks_(model, cfg.method.value, block, constant)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return model, tokenizer


@dataclass(frozen=True)
class TrainingPlan:
    steps_per_epoch: float  # optimizer steps (a fraction where grad_accum does not divide an epoch's micro-batches)
    prune_steps: int  # steps of the main phase (all steps for a dense run)
    fill_steps: int
    lr_warmup: int
    initial_warmup: int
    final_warmup: int

    @property
    def total_steps(self) -> int:
        return self.prune_steps + self.fill_steps


def _warmups(cfg: RunConfig, main: int) -> tuple[int, int]:
    """The initial and final warm-up of ``main`` pruning steps, in steps.

    Raises:
        ConfigError: for a masked run, warm-ups that leave the schedule no room to reach its target.
    """
    initial, final = warmups(cfg.initial_warmup, cfg.final_warmup, main)
    if cfg.masked and initial + final > main:
        raise ConfigError(f"initial_warmup + final_warmup: {initial} + {final} steps exceed the {main} pruning steps")
    if cfg.masked and final == 0 and initial >= main:  # the last step would be held at the start, not the target
        raise ConfigError(f"initial_warmup: {initial} steps leave none of the {main} pruning steps to reach the "
                          "target (final_warmup is 0)")
    return initial, final


def plan(cfg: RunConfig, num_features: int) -> TrainingPlan:
    """Step counts of a run, from the config and the number of training features.

    ``method: fisher`` prunes before the first step: it has no pruning steps, only its ``fill_steps``.
    """
    micro_batches = max(1, math.ceil(num_features / cfg.batch_size))
    if cfg.max_steps is None and cfg.method is not Method.FISHER and cfg.grad_accum > micro_batches:
        # A step would train more than an epoch: counted as one, the run trained other epochs than it was given.
        raise ConfigError(f"grad_accum: {cfg.grad_accum} micro-batches a step exceed the {micro_batches} of an epoch "
                          f"({num_features} training windows in batches of {cfg.batch_size}), so the run cannot "
                          f"train its {cfg.epochs:g} epochs in steps; lower grad_accum or batch_size, or set max_steps")
    # The windows are one stream across epochs: the micro-batches left over at an epoch's end start the next step,
    # so the run's steps are its epochs' micro-batches in steps (rounded down per epoch, a run in epochs of 12
    # micro-batches with grad_accum 7 trained 2 steps for its 2 epochs, 1.17 of them).
    steps_per_epoch = micro_batches / cfg.grad_accum
    if cfg.method is Method.FISHER:
        return TrainingPlan(steps_per_epoch, 0, cfg.fill_steps, 0, 0, 0)
    main = cfg.max_steps if cfg.max_steps is not None else max(1, int(round(cfg.epochs * steps_per_epoch)))
    initial, final = _warmups(cfg, main)
    return TrainingPlan(steps_per_epoch, main, cfg.fill_steps, int(round(cfg.warmup_ratio * main)), initial, final)


def mask_schedule(cfg: RunConfig, p: TrainingPlan, step: int) -> tuple[float, float, float]:
    """(threshold, lambda_attention, lambda_ffn) at ``step``.

    For topk the threshold is the fraction of weights kept (1 -> target_density); for sigmoid_threshold it is the
    threshold on sigmoid(score) (initial_threshold -> final_threshold) and the L1 weights ramp from 0 to their final
    values along the same cubic curve.
    """
    step = min(step, p.prune_steps)
    args = (step, p.prune_steps)
    warm = dict(initial_warmup=p.initial_warmup, final_warmup=p.final_warmup)
    if cfg.method is Method.TOPK:
        return cubic_schedule(*args, 1.0, cfg.target_density, **warm), 0.0, 0.0
    threshold = cubic_schedule(*args, cfg.initial_threshold, cfg.final_threshold, **warm)
    lam_att = cubic_schedule(*args, 0.0, cfg.lambda_attention, **warm)
    lam_ffn = cubic_schedule(*args, 0.0, cfg.lambda_ffn, **warm)
    return threshold, lam_att, lam_ffn


def fused_adamw(params: Iterable[torch.Tensor]) -> bool | None:
    """``True`` when torch's fused AdamW kernel can step every parameter, else ``None`` (torch's default).

    The fused kernel does the same arithmetic as the loop over parameters in one pass; on CPU, where torch's default
    is that loop, a step over MiniLM's 22.6M parameters takes about a tenth of the time (about 17 ms instead of 200 on
    one core). Tensors on other devices (``meta``) keep the default.
    """
    return all(p.device.type in _FUSED_DEVICES and p.is_floating_point() for p in params) or None


def _optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """Three groups: mask scores (own learning rate, no decay), weights with decay, biases/LayerNorm without.

    With ``freeze_embeddings`` the word embeddings stop taking gradients here, the one place that decides what trains
    (every optimizer of a run, the packed model's too, is built by this function).
    """
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    scores, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("mask_scores"):
            scores.append(param)
        elif param.ndim < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": scores, "lr": cfg.mask_lr, "base_lr": cfg.mask_lr, "weight_decay": 0.0, "name": "mask_scores"},
        {"params": decay, "lr": cfg.learning_rate, "base_lr": cfg.learning_rate, "weight_decay": cfg.weight_decay,
         "name": "decay"},
        {"params": no_decay, "lr": cfg.learning_rate, "base_lr": cfg.learning_rate, "weight_decay": 0.0,
         "name": "no_decay"},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                             fused=fused_adamw(scores + decay + no_decay))


def _lr_multiplier(cfg: RunConfig, p: TrainingPlan, step: int) -> float:
    if step < p.prune_steps:
        return linear_warmup_decay(step, p.prune_steps, p.lr_warmup)
    fill_step = step - p.prune_steps
    return linear_warmup_decay(fill_step, p.fill_steps, int(round(cfg.warmup_ratio * p.fill_steps)))


def fit_to_model(cfg: RunConfig, model: nn.Module, teacher: nn.Module | None = None) -> RunConfig:
    """``cfg`` with its windows cut to the position embeddings of ``model`` (and of the ``teacher``, which sees the
    same windows), by :func:`pruning.squad.fit_windows`, as evaluation cuts them; ``cfg`` itself when they fit.

    A cut is logged as a warning: training and evaluation then use shorter windows than ``max_seq_length``.
    """
    limits = {"the model": max_positions(model.config)}
    if teacher is not None:
        limits["the teacher"] = max_positions(teacher.config)
    owner, positions = min(limits.items(), key=lambda item: item[1])
    if cfg.max_seq_length <= positions:
        return cfg
    seq, stride = squad.fit_windows(cfg.max_seq_length, cfg.doc_stride, positions)
    logger.warning("max_seq_length %d exceeds the %d position embeddings of %s: training and evaluation use windows "
                   "of %d tokens with doc_stride %d", cfg.max_seq_length, positions, owner, seq, stride)
    return dataclasses.replace(cfg, max_seq_length=seq, doc_stride=stride)


def _tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides a tokenizer's ids: a fast tokenizer's whole definition (vocabulary, merges, special
    tokens, post-processor), else its vocabulary.

    The truncation and padding a call leaves set on a fast tokenizer are left out: windows set their own, and a
    tokenizer that has cut one set of windows is still the same tokenizer.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
        text = json.dumps(definition, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def train_features(cfg: RunConfig, examples: list, tokenizer: PreTrainedTokenizerBase,
                   progress: bool = False) -> dict[str, torch.Tensor]:
    """Tokenized training windows, cached as safetensors under ``cfg.cache_dir`` when it is set. Tokenizing (minutes
    for the whole SQuAD training set) is logged first, with a tqdm bar when ``progress``.

    The cache key covers the data file's contents (an in-place edit is a new key), the question limit, the tokenizer
    (its whole definition, so one retrained into the same directory is a new key, and copies of a fast one in
    other directories are one; its special tokens, and the side it cuts a long context from) and the window
    settings, so trials of a sweep that share data tokenize it once. Files of other keys (an earlier release's
    too) are not read, and can be deleted.
    """
    def tokenize() -> dict[str, torch.Tensor]:
        logger.info("tokenizing %d training questions into windows of %d tokens (stride %d)", len(examples),
                    cfg.max_seq_length, cfg.doc_stride)
        return squad.prepare_train_features(examples, tokenizer, max_seq_length=cfg.max_seq_length,
                                            doc_stride=cfg.doc_stride, max_query_length=cfg.max_query_length,
                                            progress=progress)

    if cfg.cache_dir is None:
        return tokenize()
    data = resolve_data(cfg.train_data)
    # The last items say how text is tokenized and answers labelled: a change there is a new key.
    # A fast tokenizer is known by its definition, wherever it was read from (each teacher of a sweep keeps a copy
    # of one tokenizer, which tokenized the same windows once per teacher); a slow one by its vocabulary and path.
    where = None if getattr(tokenizer, "backend_tokenizer", None) is not None else tokenizer.name_or_path
    key = json.dumps([content_digest(data), cfg.train_limit, where, sorted(tokenizer.special_tokens_map.items()),
                      len(tokenizer), _tokenizer_digest(tokenizer), cfg.max_seq_length, cfg.doc_stride,
                      cfg.max_query_length, getattr(tokenizer, "truncation_side", None), squad.__name__,
                      "special-token literals as text", "answers without outer whitespace",
                      "answers as their tokens cover them", "checksummed"])
    path = Path(cfg.cache_dir) / f"train-features-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        logger.debug("training windows read from the feature cache %s", path)
        try:
            return squad.compact_windows(_read_feature_cache(path))  # one written as int64 is read narrowed
        except Exception as err:  # a damaged cache is rebuilt, never trusted
            logger.warning("ignoring unreadable feature cache %s: %s", path, error_line(err))
    features = {k: v.contiguous() for k, v in tokenize().items()}
    logger.debug("training windows written to the feature cache %s", path)
    tmp = atomic.temporary_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.save_tensors(features, tmp, metadata={_CACHE_DIGEST: _features_digest(features)})
        os.replace(tmp, path)
    except BaseException as err:  # noqa: BLE001 - the partial file goes whatever stopped the write (Ctrl-C too)
        with contextlib.suppress(OSError):  # nothing there to remove where cache_dir could not be made
            tmp.unlink(missing_ok=True)
        if not isinstance(err, (OSError, SafetensorError)):
            raise
        # A full disk: the run goes on, the next one tokenizes again.
        logger.warning("cannot write the feature cache %s (%s); going on without it", path, error_line(err))
    return features


_CACHE_DIGEST = "sha256"  # the feature cache's metadata key: the digest of the windows it holds


def _features_digest(features: dict[str, torch.Tensor]) -> str:
    """A digest of tokenized windows: every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name in sorted(features):
        tensor = features[name].contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else b"")
    return digest.hexdigest()


def _read_feature_cache(path: Path) -> dict[str, torch.Tensor]:
    """The windows of a feature cache file, checked against the digest it was written with: damage to its data
    (a bad sector, a partial copy) is refused, not trained on."""
    with safe_open(str(path), framework="pt") as handle:
        recorded = (handle.metadata() or {}).get(_CACHE_DIGEST)
        features = {name: handle.get_tensor(name) for name in handle.keys()}
    if recorded is None:
        raise ValueError("it records no digest of its windows")
    if _features_digest(features) != recorded:
        raise ValueError("its windows do not match the digest it was written with (the file is damaged)")
    return features


def evaluate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list, cfg: RunConfig,
             device: torch.device | None = None, progress: bool = True,
             features: squad.EvalFeatures | None = None, null_answers: bool = False) -> dict[str, float]:
    """EM/F1 (official SQuAD metric, v1.1's or v2.0's: :func:`pruning.squad.evaluate`) of ``model`` on ``examples``,
    plus its sparsity metrics. ``null_answers``: the model answers "no answer" where that scores higher than every
    span (one trained on unanswerable questions).

    The forward passes run in the config's precision on ``device`` (default: the model's), on windows cut to the
    model's position embeddings when ``max_seq_length`` exceeds them (:func:`pruning.squad.fit_windows`).
    ``features``: those windows (:func:`pruning.squad.prepare_eval_features` of ``examples`` with the config's
    window settings, cut to the model), built once by a run that evaluates the same questions again and again; None
    tokenizes the questions here.
    """
    _check_config(cfg)
    parameter = next(model.parameters(), None)
    if parameter is None:  # an exported model (ONNX Runtime's), whose sparsity is not in modules to count
        raise TypeError(f"{type(model).__name__} has no parameters: evaluate() scores a PyTorch model and counts its "
                        "sparsity; score an exported model with pruning.squad.evaluate_model")
    run_device = device if device is not None else parameter.device
    cfg = fit_to_model(cfg, model)
    with autocast(resolve_precision(cfg.precision, run_device), run_device):
        answers = squad.predict_spans(model, tokenizer, examples, max_seq_length=cfg.max_seq_length,
                                      doc_stride=cfg.doc_stride, batch_size=cfg.eval_batch_size,
                                      max_answer_length=cfg.max_answer_length, n_best=cfg.n_best, device=device,
                                      progress=progress, max_query_length=cfg.max_query_length, features=features,
                                      null_answers=null_answers)
    # On questions that hold unanswerable ones, the answerable / unanswerable split as well (SQuAD v2.0), and for a
    # model answering "no answer" what the best threshold for it would score.
    metrics, _ = squad.evaluate_answers(examples, answers, null_answers)
    metrics.update(sparsity_report(model).metrics())
    return metrics


def _load_teacher(cfg: RunConfig, device: torch.device) -> nn.Module | None:
    if cfg.teacher is None:
        return None
    path = resolve_model(cfg.teacher)
    try:
        teacher = load_model(path, qa_head=True)
    except CheckpointError as err:  # named as the config key it comes from
        raise CheckpointError(f"teacher: {err}") from None
    if mask_lib.is_masked(teacher):
        mask_lib.remove_masks_(teacher)
    teacher.to(device).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def warn_if_not_held_out(train_examples: list[squad.Example], eval_examples: list[squad.Example],
                         scored: str = "this run") -> None:
    """Say so when ``scored`` (a run, a sweep's trials) is scored on questions it trains on (the same file, or
    splits that share ids)."""
    shared = {ex.id for ex in train_examples} & {ex.id for ex in eval_examples}
    if shared:
        logger.warning("%d of the %d evaluation questions are training questions too (e.g. %s): the EM and F1 of %s "
                       "are not held out", len(shared), len(eval_examples), min(shared), scored)


def _check_teacher(cfg: RunConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                   teacher: nn.Module | None) -> None:
    """Refuse, before the first step, a distillation that the teacher cannot give: ``alpha_hidden`` without a
    teacher or with a teacher of another depth or width, and a teacher whose embeddings lack the tokenizer's ids.

    Raises:
        ConfigError: naming ``alpha_hidden`` or ``teacher``.
    """
    if teacher is None:
        if cfg.alpha_hidden > 0:
            raise ConfigError(f"alpha_hidden: {cfg.alpha_hidden} weighs a hidden-state MSE to the teacher, but no "
                              "teacher is set")
        return
    if teacher.config.vocab_size < len(tokenizer):
        raise ConfigError(f"teacher: {cfg.teacher} embeds {teacher.config.vocab_size} tokens, fewer than the "
                          f"student's tokenizer has ({len(tokenizer)}): it needs the student's vocabulary")
    if (misfit := tokenizer_misfit(teacher.config, tokenizer, "the student's tokenizer")) is not None:
        raise ConfigError(f"teacher: {resolve_model(cfg.teacher) / 'config.json'}: {misfit}: the teacher cannot "
                          "read the student's windows")
    _check_teacher_vocabulary(cfg, tokenizer)
    student_shape = (model.config.num_hidden_layers, model.config.hidden_size)
    teacher_shape = (teacher.config.num_hidden_layers, teacher.config.hidden_size)
    if cfg.alpha_hidden > 0 and student_shape != teacher_shape:
        raise ConfigError(f"alpha_hidden: the hidden-state MSE needs a teacher with the student's layers and width, "
                          f"but the teacher has {teacher_shape[0]} layers of {teacher_shape[1]} and the student "
                          f"{student_shape[0]} of {student_shape[1]}")


def _check_teacher_vocabulary(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a teacher whose own tokenizer numbers the tokens differently: fed the student's ids, it would read
    other words (a BERT teacher for a RoBERTa student, a cased teacher for an uncased student) and distil noise.
    A teacher directory without tokenizer files is not checked."""
    teacher_dir = resolve_model(cfg.teacher)
    if not any((teacher_dir / name).is_file() for name in TOKENIZER_FILES):
        return
    try:
        theirs = load_tokenizer(teacher_dir).get_vocab()
    except CheckpointError as err:
        logger.warning("the teacher's vocabulary is not checked against the student's: %s", err)
        return
    ours = tokenizer.get_vocab()
    # Tokens of the teacher's own beyond the student's are never fed to it: only the student's ids must match.
    differ = sum(1 for token, index in ours.items() if theirs.get(token) != index)
    if differ:
        raise ConfigError(f"teacher: {cfg.teacher} has a tokenizer of {len(theirs)} tokens that numbers "
                          f"{differ} of the student's {len(ours)} tokens differently: the teacher must read the "
                          "student's token ids (distil from a teacher fine-tuned with the student's tokenizer)")


def training_loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg: RunConfig, teacher: nn.Module | None = None,
                  lambda_attention: float = 0.0, lambda_ffn: float = 0.0, regularize: bool = True,
                  cached_teacher: TeacherOutputs | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, span cross-entropy, distillation, hidden-state MSE, score regularisation) of one batch.

    ``loss = alpha_ce * ce + alpha_distil * distil + alpha_hidden * hidden`` with a teacher (``ce`` alone without
    one), plus the score penalty of :func:`pruning.masks.regularization_loss` for ``sigmoid_threshold`` when
    ``regularize`` is set. ``hidden`` is the layer-wise MSE of :func:`pruning.distill.hidden_mse` (computed only
    when ``alpha_hidden > 0``). ``cached_teacher``, when given, stands in for the teacher's forward
    (:class:`pruning.teacher_cache.TeacherCache`; with ``alpha_hidden > 0`` it must hold the hidden states).
    """
    if cached_teacher is not None and cfg.alpha_hidden > 0 and cached_teacher.hidden_states is None:
        raise ValueError(f"the cached teacher outputs hold no hidden states, but alpha_hidden is {cfg.alpha_hidden}")
    with_hidden = (teacher is not None or cached_teacher is not None) and cfg.alpha_hidden > 0
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"], output_hidden_states=with_hidden)
    start_logits, end_logits = out.start_logits.float(), out.end_logits.float()
    ce = qa_ce_loss(start_logits, end_logits, batch["start_positions"], batch["end_positions"])
    zero = start_logits.new_zeros(())
    distil, hidden, reg = zero, zero, zero
    loss = ce
    if teacher is not None or cached_teacher is not None:
        if cached_teacher is None:
            with torch.no_grad():
                t_out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                token_type_ids=batch["token_type_ids"], output_hidden_states=with_hidden)
            cached_teacher = TeacherOutputs(t_out.start_logits, t_out.end_logits,
                                            t_out.hidden_states[1:] if with_hidden else None)
        distil = (kd_loss(start_logits, cached_teacher.start_logits.float(), cfg.temperature)
                  + kd_loss(end_logits, cached_teacher.end_logits.float(), cfg.temperature)) / 2
        loss = cfg.alpha_ce * ce + cfg.alpha_distil * distil
        if with_hidden:
            # Layer outputs only: the embeddings are not pruned.
            hidden = hidden_mse(out.hidden_states[1:], cached_teacher.hidden_states, batch["attention_mask"])
            loss = loss + cfg.alpha_hidden * hidden
    if cfg.method is Method.SIGMOID_THRESHOLD and regularize:
        reg = mask_lib.regularization_loss(model, lambda_attention, lambda_ffn)
        loss = loss + reg
    return loss, ce, distil, hidden, reg


def set_dropout_(model: nn.Module, p: float) -> int:
    """Set the probability of every dropout layer of ``model`` (not its config); returns how many there are."""
    layers = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    for layer in layers:
        layer.p = p
    return len(layers)


def _is_fixed(model: nn.Module) -> bool:
    return all(m.mode == "fixed" for _, m in mask_lib.masked_modules(model))


def enter_fill_phase(model: nn.Module) -> None:
    """Freeze the structure packing will keep; kept heads become dense again.

    The current masks are baked into the weights first, so the model computes exactly what it did at the end of
    pruning: the pruned blocks inside kept heads come back as zeros and train from there.
    """
    first = next(m for _, m in mask_lib.masked_modules(model))
    model.fineprune_fill_from = (first.mode, first.current_threshold())
    report = sparsity_report(model)
    mask_lib.bake_masks_(model)
    mask_lib.fix_masks_(model, [s.heads_kept for s in report.layers], [s.ffn_kept for s in report.layers])


@dataclass
class _Start:
    """Where a run starts: a new model, or a checkpoint's model, optimizer state and record."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    step: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    carried: dict[str, float] = dataclasses.field(default_factory=dict)  # the earlier sessions' work
    state: dict[str, Any] = dataclasses.field(default_factory=dict)  # the checkpoint's training state
    tensors: dict[str, torch.Tensor] | None = None  # its optimizer state (and weight average)

    @classmethod
    def of(cls, cfg: RunConfig, resume_from: Path | None) -> "_Start":
        if resume_from is None:
            model, tokenizer = build_model(cfg)
            return cls(model, tokenizer)
        state, tensors = load_training_state(resume_from)
        start = cls(load_model(resume_from), load_tokenizer(resume_from), int(state["step"]),
                    list(state.get("history", [])),
                    # The work of the runs before this one, so that the final figures count the whole run.
                    {k: float(v) for k, v in state.get("counters", {}).items() if isinstance(v, (int, float))},
                    state, tensors)
        logger.info("resuming from %s at step %d", resume_from, start.step)
        return start


def _evaluation_record(cfg: RunConfig, precision: str, train_examples: list[squad.Example],
                       teacher: nn.Module | None) -> tuple[dict[str, Any], bool]:
    """What checkpoints and the final model record of the run's evaluations (windows as cut to the model, span
    search, precision: what eval and ask default to), and whether the model learns to answer "no answer".

    A run that trains on unanswerable questions (SQuAD v2.0) teaches its model to answer "no answer", which its
    evaluations, eval, ask and the served model then predict (:func:`pruning.squad.postprocess_predictions`)."""
    evaluation = {**evaluation_settings(cfg), "precision": precision}
    null_answers = any(ex.impossible for ex in train_examples)
    if null_answers:
        evaluation[NULL_ANSWERS] = True
        logger.info("%d of the %d training questions are unanswerable: the model learns to answer \"no answer\"",
                    sum(ex.impossible for ex in train_examples), len(train_examples))
        if teacher is not None and cfg.alpha_distil > 0 and not read_null_answers(resolve_model(cfg.teacher)):
            logger.warning("teacher %s: its config.json does not record training on unanswerable questions "
                           "(fineprune_evaluation.null_answers): a teacher that never learned to answer \"no "
                           "answer\" teaches the student to answer them with spans; fine-tune it on this data first",
                           cfg.teacher)
    return evaluation, null_answers


def _run_windows(cfg: RunConfig, given_seq: int, train_examples: list[squad.Example],
                 eval_examples: list[squad.Example], tokenizer: PreTrainedTokenizerBase,
                 progress: bool) -> tuple[dict[str, torch.Tensor], squad.EvalFeatures]:
    """The training windows, and the evaluation questions' windows (the same at every evaluation of the run, so
    tokenized once); ``given_seq``: the window length the config gave, before it was cut to the model."""
    with squad.questions_of(resolve_data(cfg.train_data)), squad.windows_cut(given_seq, cfg.max_seq_length):
        features = train_features(cfg, train_examples, tokenizer, progress=progress)
    with squad.questions_of(resolve_data(cfg.eval_data)), squad.windows_cut(given_seq, cfg.max_seq_length):
        eval_windows = squad.prepare_eval_features(eval_examples, tokenizer, max_seq_length=cfg.max_seq_length,
                                                   doc_stride=cfg.doc_stride, max_query_length=cfg.max_query_length,
                                                   progress=progress)
    return features, eval_windows


def _remove_earlier_outputs(output_dir: Path, resume_from: Path | None) -> None:
    """Remove an earlier run's final model and checkpoint from ``output_dir`` (given over to this run) before this
    run trains, so that a run stopped before it writes its own does not leave them as if they were its own (a
    ``--resume`` of that checkpoint would continue the earlier run). A run resumed from a checkpoint of another
    directory continues that run here: whatever ``output_dir`` held is another run's, as for a new run."""
    if resume_from is not None and Path(resume_from).resolve().is_relative_to(output_dir.resolve()):
        return
    for name, what in ((FINAL_DIR, "final model"), (CHECKPOINT_DIR, "checkpoint")):
        previous = output_dir / name
        if previous.is_symlink():  # the link goes, not what it points at (rmtree refuses a link)
            logger.warning("%s: removing the link to the earlier run's %s (%s is kept)", previous, what,
                           os.readlink(previous))
            previous.unlink()
        elif previous.is_dir():
            logger.warning("%s: removing the earlier run's %s", previous, what)
            shutil.rmtree(previous)


def _optimizer_and_average(cfg: RunConfig, model: nn.Module, tensors: dict[str, torch.Tensor] | None,
                           resume_from: Path | None) -> tuple[torch.optim.AdamW, WeightAverage | None]:
    """The run's optimizer and weight average (``ema_decay``), with a resumed checkpoint's state (``tensors``)."""
    optimizer = _optimizer(model, cfg)
    if tensors is not None:
        restore_optimizer(optimizer, tensors, source=str(Path(resume_from) / OPTIMIZER))
    average = _start_average(cfg, model)
    if average is not None and tensors is not None and any(k.startswith(AVERAGE_PREFIX) for k in tensors):
        average.load(tensors, source=str(Path(resume_from) / OPTIMIZER))
    return optimizer, average


def _set_learning_rates(optimizer: torch.optim.Optimizer, cfg: RunConfig, p: TrainingPlan, step: int) -> None:
    """Each parameter group's learning rate at ``step``: its base (the weights' ``fill_learning_rate`` in the filled
    phase, where given) times the schedule's multiplier."""
    multiplier = _lr_multiplier(cfg, p, step)
    for group in optimizer.param_groups:
        base = group["base_lr"]
        if step >= p.prune_steps and group["name"] != "mask_scores" and cfg.fill_learning_rate is not None:
            base = cfg.fill_learning_rate
        group["lr"] = base * multiplier


def _backward(model: nn.Module, optimizer: torch.optim.Optimizer, batches: WindowBatches,
              features: dict[str, torch.Tensor], cfg: RunConfig, teacher: nn.Module | None,
              cache: TeacherCache | None, device: torch.device, precision: str, lambdas: tuple[float, float],
              regularize: bool) -> tuple[dict[str, float], float | None, int]:
    """The gradients of one optimizer step: ``grad_accum`` micro-batches forward and backward, then the clip.

    Returns the step's loss terms and gradient norm (read back from the device once, after the clip) and the
    number of windows it trained on (a short last batch counts short)."""
    parts = []  # each micro-batch's loss terms, left on the device
    windows = 0
    for _ in range(cfg.grad_accum):
        index = next(batches)
        windows += int(index.numel())
        # Dynamic padding: windows are padded to max_seq_length, a batch only needs its longest one.
        batch = squad.window_batch(features, index, device)
        width = int(batch["attention_mask"].shape[1])
        cached = cache(index, width) if cache is not None else None
        with autocast(precision, device):
            loss, ce, distil, hidden, reg = training_loss(model, batch, cfg, teacher, *lambdas, regularize=regularize,
                                                          cached_teacher=cached)
        (loss / cfg.grad_accum).backward()
        parts.append(torch.stack([t.detach().double() for t in (ce, distil, hidden, reg, loss)]))
    if cfg.max_grad_norm:  # 0 or None: no clipping (a clip to norm 0 would zero every gradient)
        parts.append(torch.nn.utils.clip_grad_norm_(
            [q for g in optimizer.param_groups if g["name"] != "mask_scores" for q in g["params"]],
            cfg.max_grad_norm).detach().double().reshape(1))
    terms, grad_norm = _host_terms(torch.cat(parts).tolist(), cfg)
    return terms, grad_norm, windows


def train(cfg: RunConfig, report: Report | None = None, resume_from: str | Path | None = None,
          progress: bool = True, held_out_warning: bool = True) -> dict[str, Any]:
    """Run one fine-tuning (dense) or fine-pruning (masked) job described by ``cfg``.

    Args:
        cfg: the run configuration.
        report: called as ``report(metrics, checkpoint_dir)`` after each evaluation (``checkpoint_dir`` is the
            checkpoint written at that step, or None).
        resume_from: a training checkpoint directory; training continues at its step with the same optimizer
            state, data order and masks.
        progress: show tqdm progress bars.
        held_out_warning: warn when evaluation questions are training questions too (a sweep checks that once for
            all its runs, and turns it off in each).

    Returns:
        The final metrics (``exact_match``, ``f1``, densities, heads removed, ...), plus ``step``,
        ``model_dir`` (the final model directory) and ``precision`` (``fp32`` or ``bf16``: what ``auto`` became).
    """
    _check_config(cfg)
    seed_everything(cfg.seed)
    check_device(cfg.device)  # a device this machine lacks, before an earlier run's outputs are removed
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)  # fails before any data or model is loaded
    logger.debug("run config %s; device %s, precision %s", json.dumps(config_to_dict(cfg), default=str), device,
                 precision)
    if cfg.max_steps is not None and cfg.method is not Method.FISHER:
        _warmups(cfg, cfg.max_steps)  # the pruning steps are known: no need to read the data to check the warm-ups
    if resume_from is not None:
        resume_from = Path(resume_from)
        atomic.tidy(resume_from, restore=True)  # a checkpoint a killed writer had moved aside is put back
        check_resume_config(cfg, resume_from)  # before anything is written
        check_resumed_masks(cfg, resume_from)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    train_examples = squad.load_squad(resolve_data(cfg.train_data), limit=cfg.train_limit)
    # Recorded in checkpoints: a resume on the same path with other contents (other windows) is refused, and one
    # whose model or data moved is recognised at its new path.
    digests = {DATA_DIGEST: content_digest(resolve_data(cfg.train_data))}
    with contextlib.suppress(OSError):  # a file it cannot read (a dangling link) is the model load's to report
        digests[MODEL_DIGEST] = content_digest(resolve_model(cfg.model))
    # The metric reads answer texts only, as `fineprune eval` does: no answer_start is checked.
    eval_examples = squad.load_squad(resolve_data(cfg.eval_data), limit=cfg.eval_limit, spans=False)
    if held_out_warning:
        warn_if_not_held_out(train_examples, eval_examples)

    start = _Start.of(cfg, resume_from)
    model, tokenizer, history, carried = start.model, start.tokenizer, start.history, start.carried
    teacher = _load_teacher(cfg, device)
    _check_teacher(cfg, model, tokenizer, teacher)
    saved_cfg = cfg  # what checkpoints record: the run's config as given, not its windows cut to the model
    cfg = fit_to_model(cfg, model, teacher)
    if resume_from is not None:
        check_resumed_windows(cfg, resume_from, start.state)
    evaluation, null_answers = _evaluation_record(cfg, precision, train_examples, teacher)
    features, eval_windows = _run_windows(cfg, saved_cfg.max_seq_length, train_examples, eval_examples, tokenizer,
                                          progress)
    num_features = int(features["input_ids"].shape[0])
    p = plan(cfg, num_features)
    if start.step > p.total_steps:  # a dense run resumed with fewer steps: its model has trained past the end
        raise CheckpointError(f"{Path(resume_from) / STATE}: step {start.step} is past the {p.total_steps} steps the "
                              "run config trains")
    steps = (f"{p.total_steps} steps" if not cfg.masked
             else f"{p.total_steps} steps ({p.prune_steps} pruning + {p.fill_steps} filled)")
    logger.info("%d questions -> %d training features; %s, device %s, %s", len(train_examples), num_features, steps,
                device, precision)

    _remove_earlier_outputs(output_dir, resume_from)

    model.to(device)
    if cfg.dropout is not None:
        set_dropout_(model, cfg.dropout)
    pruning_metrics: dict[str, float] = {}
    if resume_from is None and cfg.masked:
        pruning_metrics = _initial_masks(cfg, model, teacher, features, device)
    elif resume_from is not None:
        pruning_metrics = {k: v for k, v in start.state.get("pruning", {}).items() if isinstance(v, (int, float))}
    skeleton = None  # with fill_packed: the masked model whose structure the packed one trains
    # Packed on a resume at the very end too: the checkpoint's optimizer state and average are the packed model's.
    if cfg.fill_packed and p.fill_steps > 0:
        skeleton, model = model, pack_for_training(model).to(device)
        skeleton.to("cpu")  # only written to, at checkpoints and at the end
        logger.info("recovery on the packed model: %d of %d parameters", model_params(model), model_params(skeleton))
    cache = (TeacherCache(teacher, features, device, cfg.eval_batch_size, lambda: autocast(precision, device),
                          hidden=cfg.alpha_hidden > 0)
             if cfg.teacher_cache and teacher is not None else None)
    optimizer, average = _optimizer_and_average(cfg, model, start.tensors, resume_from)

    global_topk = cfg.topk_scope is TopkScope.GLOBAL and cfg.method is Method.TOPK
    stage_steps = fisher_stage_steps(cfg) if cfg.method is Method.FISHER else []
    batches = WindowBatches(features, cfg,
                            None if resume_from is None else resume_position(start.state, resume_from, cfg, features))
    running: dict[str, float] = {}
    teacher_windows = 0  # windows the teacher ran on in this process without a cache (a short last batch counts short)
    last_metrics: dict[str, Any] = {}
    saved_step = start.step if resume_from is not None else None  # the last checkpoint a diverged run leaves
    started = time.time()
    bar = tqdm(total=p.total_steps, initial=start.step, desc="train", disable=not progress, dynamic_ncols=True)

    def schedule_values(step: int) -> tuple[float, float, float]:
        if cfg.method is Method.FISHER:
            return 0.0, 0.0, 0.0
        if not cfg.masked or step >= p.prune_steps:
            return (mask_schedule(cfg, p, p.prune_steps)[0] if cfg.masked else 0.0), 0.0, 0.0
        return mask_schedule(cfg, p, step)

    for step in range(start.step, p.total_steps):
        if cfg.masked and step == p.prune_steps and not _is_fixed(model):
            # The last pruning masks decide the structure; from here on it is fixed.
            mask_lib.set_threshold(model, schedule_values(step)[0], global_topk=global_topk)
            enter_fill_phase(model)
            optimizer = _rebuild_optimizer_for_fill(model, cfg, optimizer)
            average = _start_average(cfg, model)
        if step in stage_steps:
            stage = stage_steps.index(step) + 1
            pruning_metrics = _fisher_cut(cfg, model, teacher, features, device, stage, pruning_metrics)
            model.to(device)
            optimizer = _optimizer(model, cfg)  # the baked and re-masked layers are new parameters
            average = _start_average(cfg, model)
        threshold, lam_att, lam_ffn = schedule_values(step)
        if cfg.masked and step < p.prune_steps:
            mask_lib.set_threshold(model, threshold, global_topk=global_topk)
        _set_learning_rates(optimizer, cfg, p, step)
        model.train()
        terms, grad_norm, windows = _backward(model, optimizer, batches, features, cfg, teacher, cache, device,
                                              precision, (lam_att, lam_ffn), regularize=step < p.prune_steps)
        if teacher is not None and cache is None:
            teacher_windows += windows
        _check_finite(step + 1, terms, grad_norm, cfg, saved_step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if average is not None:
            average.update(model)

        for key, value in terms.items():
            running[key] = running.get(key, 0.0) + value
        running["_n"] = running.get("_n", 0) + 1
        bar.update(1)
        done = step + 1
        bar.set_postfix(loss=f"{terms['loss']:.3f}", thr=f"{threshold:.3f}" if cfg.masked else None)
        if done % cfg.log_every == 0 or done == p.total_steps:
            n = running.pop("_n")  # the steps since the last line (fewer after a resume, or at the end)
            steps = f"step {done}" if n == 1 else f"steps {done - n + 1}-{done}"
            logger.info("step %d/%d loss %.4f (ce %.4f distil %.4f reg %.4f; mean of %s)%s", done, p.total_steps,
                        running["loss"] / n, running["loss_ce"] / n, running["loss_distil"] / n,
                        running["loss_reg"] / n, steps, f" threshold {threshold:.4f}" if cfg.masked else "")
            running = {}

        is_last = done == p.total_steps
        do_eval = is_last or (cfg.eval_every is not None and done % cfg.eval_every == 0)
        do_save = is_last or do_eval or (cfg.save_every is not None and done % cfg.save_every == 0)
        if not (do_eval or do_save):
            continue
        if cfg.masked and global_topk and step < p.prune_steps:
            # One global cut-off, found on the scores as this step began: the step has moved them since, and what is
            # evaluated and saved keeps this step's fraction of the updated scores (each matrix's own top-k does so
            # at every forward). Without a filled phase, the last step's model was saved off its target density.
            mask_lib.set_threshold(model, threshold, global_topk=True)
        # The windows trained, in epochs: a step of grad_accum micro-batches need not end where an epoch does.
        epoch = batches.position.epoch + batches.position.window / num_features
        metrics: dict[str, Any] = {"step": done, "epoch": epoch, "threshold": threshold,
                                   "lambda_attention": lam_att, "lambda_ffn": lam_ffn,
                                   "learning_rate": optimizer.param_groups[1]["lr"], **terms,
                                   "phase_fill": float(step >= p.prune_steps),
                                   "train_seconds": carried.get("train_seconds", 0.0) + time.time() - started,
                                   **pruning_metrics}
        if teacher is not None:  # the teacher's forwards (a resumed run's cache is built again: its forwards count)
            metrics["teacher_forward_windows"] = int(carried.get("teacher_forward_windows", 0)) + int(
                cache.forwards if cache is not None else teacher_windows)
        if do_eval:
            with _generators_kept(device):
                metrics.update(_evaluate_averaged(model, average, tokenizer, eval_examples, cfg, device, progress,
                                                  eval_windows, null_answers))
            logger.info("step %d: exact_match %.2f f1 %.2f linear_density %.3f heads_removed %d", done,
                        metrics["exact_match"], metrics["f1"], metrics["linear_density"], metrics["heads_removed"])
            history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        checkpoint_dir = None
        if do_save:
            if skeleton is not None:
                with _generators_kept(device):
                    unpack_into_(skeleton, model)
            saved = model if skeleton is None else skeleton
            counters = {k: metrics[k] for k in ("train_seconds", "teacher_forward_windows") if k in metrics}
            checkpoint_dir = str(_save_checkpoint(output_dir / CHECKPOINT_DIR, saved, tokenizer, optimizer,
                                                  saved_cfg, done, history, pruning_metrics, average, counters,
                                                  evaluation, digests, batches.position))
            saved_step = done
        if do_eval:
            last_metrics = metrics
            if report is not None:
                report(metrics, checkpoint_dir)
    bar.close()

    if not last_metrics:  # nothing trained: a one-shot run without recovery, or resumed at the very end
        # Resumed at the very end: what the last evaluation recorded of its training (loss, train_seconds, ...).
        recorded = history[-1] if resume_from is not None and history and history[-1].get("step") == p.total_steps \
            else {}
        last_metrics = {**recorded, "step": p.total_steps, **pruning_metrics,
                        **_evaluate_averaged(model, average, tokenizer, eval_examples, cfg, device, progress,
                                             eval_windows, null_answers)}
        if resume_from is None:
            history.append({k: v for k, v in last_metrics.items() if isinstance(v, (int, float))})
            if report is not None:
                report(last_metrics, None)
    final_dir = output_dir / FINAL_DIR
    if average is not None:  # the model the metrics describe
        average.copy_to(model)
    if skeleton is not None:
        model = unpack_into_(skeleton, model)
    model.to("cpu")
    save_model(model, tokenizer, final_dir, evaluation=evaluation)
    last_metrics = dict(last_metrics)
    last_metrics["model_dir"] = str(final_dir)
    last_metrics["precision"] = precision  # what the metrics were measured in: fp32 or bf16, never auto
    return last_metrics


def _initial_masks(cfg: RunConfig, model: nn.Module, teacher: nn.Module | None, features: dict[str, torch.Tensor],
                   device: torch.device) -> dict[str, float]:
    """Prune in one shot (fisher) or warm-start the scores (``mask_init``); returns what it cost.

    Calibration windows are drawn from the training windows. Their labels are the gold spans, or spans sampled
    from the teacher's distribution when there is a teacher (the model's own distribution would be the same when
    the student starts from the teacher, and the gradient of a soft-target loss at its own optimum is zero).
    """
    source = cfg.mask_init.value if isinstance(cfg.mask_init, MaskInit) else MaskInit.CONSTANT.value
    if cfg.method is not Method.FISHER and source == MaskInit.CONSTANT.value:
        return {}
    started, started_cpu = time.time(), time.process_time()
    num_windows = int(features["input_ids"].shape[0])
    if source == MaskInit.MAGNITUDE.value and cfg.method is not Method.FISHER:
        importance.warm_start_scores_(model, "magnitude", cfg.mask_init_scale)
        return {"prune_seconds": time.time() - started, "prune_cpu_seconds": time.process_time() - started_cpu}
    if cfg.method is not Method.FISHER:
        index = importance.calibration_index(num_windows, cfg.calibration_samples, cfg.seed)
        estimate = _fisher_estimate(cfg, model, teacher, features, index, device)
        importance.warm_start_scores_(model, "fisher", cfg.mask_init_scale, estimate)
        return {"calibration_windows": int(index.numel()), "calibration_seconds": time.time() - started,
                "prune_seconds": time.time() - started, "prune_cpu_seconds": time.process_time() - started_cpu}
    return _fisher_cut(cfg, model, teacher, features, device, stage=0)


def _fisher_estimate(cfg: RunConfig, model: nn.Module, teacher: nn.Module | None, features: dict[str, torch.Tensor],
                     index: torch.Tensor, device: torch.device, trained: bool = False) -> importance.Importance:
    # A student that starts from the teacher's weights, and has not been trained since, has the teacher's
    # distribution: no second forward pass.
    label_model = None if teacher is None or (not trained and same_model(cfg.model, cfg.teacher)) else teacher
    try:
        return importance.fisher_importance(
            model, features, index, cfg.batch_size, labels="sampled" if teacher is not None else "gold",
            teacher=label_model,
            block_diagonal=cfg.method is Method.FISHER and cfg.mask_rearrange, seed=cfg.seed, device=device,
            autocast=lambda: autocast(resolve_precision(cfg.precision, device), device))
    except squad.NonFiniteLogits as err:  # the labels are drawn from the teacher's distribution: name it
        raise squad.NonFiniteLogits(f"teacher {cfg.teacher}: {err}") from None


def fisher_stage_steps(cfg: RunConfig) -> list[int]:
    """The steps before which each later stage of a staged fisher cut runs (the first runs before step 0)."""
    return [cfg.fill_steps * i // cfg.fisher_stages for i in range(1, cfg.fisher_stages)]


def _fisher_cut(cfg: RunConfig, model: nn.Module, teacher: nn.Module | None, features: dict[str, torch.Tensor],
                device: torch.device, stage: int,
                previous: dict[str, float] | None = None) -> dict[str, float]:
    """One stage of the fisher cut, in place: importance, search, mask tuning, then the fixed masks.

    Stage 0 starts from the plain model. A later stage starts from the masked model the previous stages left
    (recovered since), bakes its masks and keeps a subset of what it kept, at the stage's share of the target
    (:func:`importance.stage_targets`); the last stage meets the target exactly. Every stage draws its own
    calibration windows. Costs add up in the returned metrics.
    """
    started, started_cpu = time.time(), time.process_time()
    out = dict(previous or {})
    allowed_heads = allowed_neurons = None
    if stage:
        report = sparsity_report(model)
        allowed_heads = torch.stack([layer.heads_kept for layer in report.layers]).bool()
        allowed_neurons = torch.stack([layer.ffn_kept for layer in report.layers]).bool()
        mask_lib.remove_masks_(model)
    num_windows = int(features["input_ids"].shape[0])
    index, tuning_index = importance.calibration_and_tuning_index(
        num_windows, cfg.calibration_samples, cfg.mask_tuning_samples, cfg.seed + stage)
    # Said before the passes, which take minutes on a large model while the step count stands still.
    logger.info("fisher stage %d/%d: importance of the heads and FFN neurons on %d calibration windows", stage + 1,
                cfg.fisher_stages, index.numel())
    estimate = _fisher_estimate(cfg, model, teacher, features, index, device, trained=stage > 0)
    out["calibration_windows"] = int(out.get("calibration_windows", 0)) + int(index.numel())
    out["calibration_seconds"] = out.get("calibration_seconds", 0.0) + time.time() - started

    by_flops = cfg.target_flops is not None
    costs = importance.structure_costs(model.config, "flops" if by_flops else "density", cfg.max_seq_length)
    target = importance.stage_targets(cfg.target_flops if by_flops else cfg.target_density, cfg.fisher_stages)[stage]
    budget = int(math.floor(target * costs.total + 1e-6))
    try:
        head_keep, neuron_keep = importance.search_mask(estimate.heads, estimate.neurons, costs, budget,
                                                        allowed_heads, allowed_neurons, cfg.fisher_layer_floor)
    except ValueError as err:  # a floor that rounds up past the budget: known only with the model's shape
        raise ConfigError(f"fisher_layer_floor: {err}") from None
    if cfg.mask_rearrange:
        heads = importance.rearrange_mask(head_keep, estimate.head_blocks)
        neurons = importance.rearrange_mask(neuron_keep, estimate.neuron_blocks)
        # A rearranged later stage must not bring back what an earlier one removed.
        if allowed_heads is None or not (heads & ~allowed_heads).any():
            head_keep = heads
        if allowed_neurons is None or not (neurons & ~allowed_neurons).any():
            neuron_keep = neurons
    logger.info("fisher stage %d/%d: keeping %d of %d heads and %d of %d FFN dimensions (budget %.3f of the %s)",
                stage + 1, cfg.fisher_stages, int(head_keep.sum()), head_keep.numel(), int(neuron_keep.sum()),
                neuron_keep.numel(), target, "FLOPs" if by_flops else "linear weights")
    dense = copy.deepcopy(model) if cfg.mask_tuning_samples else None
    with torch.no_grad():
        importance.zero_removed_(model, head_keep, neuron_keep)
    if dense is not None:
        tuned = time.time()
        logger.info("mask tuning (%s) on %d windows", cfg.tuning_mode.value, len(tuning_index))
        tuning = importance.tune_masks_(model, dense, features, tuning_index, head_keep,
                                        neuron_keep, cfg.batch_size, device=device, mode=cfg.tuning_mode.value,
                                        damping=cfg.mask_tuning_damping)
        del dense
        out["tuning_seconds"] = out.get("tuning_seconds", 0.0) + time.time() - tuned
        out["tuning_windows"] = int(out.get("tuning_windows", 0)) + int(tuning_index.numel())
        # The error of the last stage: against the model that stage started from.
        out["tuning_error_before"] = float(sum(t.attention_before + t.ffn_before for t in tuning))
        out["tuning_error_after"] = float(sum(t.attention_after + t.ffn_after for t in tuning))
    importance.apply_structure_(model, head_keep, neuron_keep)
    out["prune_seconds"] = out.get("prune_seconds", 0.0) + time.time() - started
    out["prune_cpu_seconds"] = out.get("prune_cpu_seconds", 0.0) + time.process_time() - started_cpu
    logger.info("fisher stage %d took %.1f s (%.1f s of CPU time)", stage + 1, time.time() - started,
                time.process_time() - started_cpu)
    return out


def _start_average(cfg: RunConfig, model: nn.Module) -> WeightAverage | None:
    """A fresh weight average when ``ema_decay`` is set and the structure is fixed; None otherwise."""
    if cfg.ema_decay is None or (cfg.masked and not _is_fixed(model)):
        return None
    return WeightAverage(model, cfg.ema_decay)


def _generators_kept(device: torch.device):
    """A context in which the random generators the training draws from (the CPU's, and ``device``'s on a GPU) end
    as they began: reading the masked weights builds layers, and a layer's initialisation draws, so without it how
    often a run evaluates or saves would change the dropout of every later step."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index])
    return torch.random.fork_rng(devices=[])


def _evaluate_averaged(model: nn.Module, average: WeightAverage | None, tokenizer: PreTrainedTokenizerBase,
                       examples: list, cfg: RunConfig, device: torch.device, progress: bool,
                       features: squad.EvalFeatures | None = None, null_answers: bool = False) -> dict[str, float]:
    with average.applied(model) if average is not None else contextlib.nullcontext():
        return evaluate(model, tokenizer, examples, cfg, device=device, progress=progress, features=features,
                        null_answers=null_answers)


def _rebuild_optimizer_for_fill(model: nn.Module, cfg: RunConfig, old: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Scores are frozen in the filled phase: a fresh optimizer over the weights keeps their moments."""
    new = _optimizer(model, cfg)
    for group in new.param_groups:
        for param in group["params"]:
            if param in old.state:
                new.state[param] = old.state[param]
    return new


def _save_checkpoint(path: Path, model: nn.Module, tokenizer, optimizer, cfg: RunConfig, step: int,
                     history: list[dict[str, Any]], pruning: dict[str, float] | None = None,
                     average: WeightAverage | None = None, counters: dict[str, float] | None = None,
                     evaluation: dict[str, Any] | None = None, digests: dict[str, str] | None = None,
                     position: DataPosition | None = None) -> Path:
    # counters: the run's training seconds and teacher forwards so far, carried on by a resume.
    state = {"step": step, "config": config_to_dict(cfg), "history": history, "pruning": pruning or {},
             "counters": counters or {}}
    state.update(digests or {})  # of the training file and the model, see train()
    if position is not None:
        state[DATA_POSITION] = dataclasses.asdict(position)
    # Weights are saved from the CPU copy of the state dict; the model itself stays on its device. The live
    # weights go into the checkpoint (training continues from them), their average beside the optimizer state.
    tensors = optimizer_tensors(optimizer)
    if average is not None:
        tensors.update(average.tensors())
    return save_model(model, tokenizer, path, extra_files={STATE: state}, tensors={OPTIMIZER: tensors},
                      evaluation=evaluation)
