"""The typed run configuration: one frozen dataclass, loaded from YAML.

A run is either a dense fine-tune (``method: dense``; the teacher and the baseline), a fine-pruning run
(``method: topk`` or ``method: sigmoid_threshold``) or a one-shot structured pruning (``method: fisher``) with an
optional recovery fine-tune. Every hyperparameter of the trainer lives here; the
trainer reads nothing else. Unknown keys are an error naming the key, and every value is checked in
``__post_init__`` so that a bad config fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Hashable, Iterable, Mapping

import yaml

from .errors import did_you_mean, name_hint, path_hint

__all__ = ["ConfigError", "Method", "TopkScope", "MaskInit", "MaskTuning", "RunConfig", "read_yaml", "load_config",
           "config_from_dict", "config_to_dict", "HEAD_BLOCK", "DEFAULT_BLOCK", "method_block", "default_block",
           "attention_block_of", "check_head_shaped",
           "check_keys_apply", "METHOD_KEYS", "EVALUATION_KEYS", "evaluation_settings", "MAX_SEED", "FINAL_DIR",
           "CHECKPOINT_DIR", "home_path"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key (and the file when known)."""


class Method(str, enum.Enum):
    """How the linear layers are trained."""

    DENSE = "dense"  # plain fine-tuning, no masks
    TOPK = "topk"  # keep the top fraction of blocks; density set directly
    SIGMOID_THRESHOLD = "sigmoid_threshold"  # keep blocks with sigmoid(score) > threshold; density from L1
    FISHER = "fisher"  # one-shot: heads and FFN neurons chosen by Fisher importance, then mask tuning


class MaskInit(str, enum.Enum):
    """Where the initial mask scores of topk and sigmoid_threshold come from."""

    CONSTANT = "constant"  # every score 0 (a number given as mask_init is the constant instead)
    FISHER = "fisher"  # Fisher importance of the block's head or FFN neuron (calibration_samples windows)
    MAGNITUDE = "magnitude"  # mean absolute weight of the block


class MaskTuning(str, enum.Enum):
    """What the least-squares step after a fisher cut fits, layer by layer, to the dense layer's output."""

    AUTO = "auto"  # weights for a one-shot run (fill_steps 0), scales when a recovery follows
    SCALES = "scales"  # one scale per kept head and FFN neuron (Kwon et al., 2022)
    WEIGHTS = "weights"  # the output linears' columns of the kept heads and neurons, and their biases


class TopkScope(str, enum.Enum):
    PER_MATRIX = "per_matrix"  # every matrix keeps the same fraction of its blocks
    GLOBAL = "global"  # one cut-off over all masked weights


# Names of model/data shortcuts resolved by ``pruning.resources``.
SHIPPED_MODEL = "minilm"
# What a training run writes in its output_dir: its final model, and the checkpoint it resumes from.
FINAL_DIR = "final"
CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs. Defaults follow the paper's hybrid setting where one applies."""

    # --- model and data -----------------------------------------------------------------------------------
    # a local HF QA (or encoder) directory of a model_type in pruning.structure (bert, roberta, xlm-roberta,
    # camembert, electra), or "minilm" (the shipped all-MiniLM-L6-v2)
    model: str = SHIPPED_MODEL
    # config kwargs (model_type: bert unless given): build a random model instead of loading one
    model_config: dict[str, Any] | None = None
    tokenizer: str | None = None  # tokenizer directory; default: the model's (the shipped one for random models)
    train_data: str = "train"  # SQuAD v1.1 or v2.0 JSON path, or "train"/"dev" for the shipped files
    eval_data: str = "dev"
    train_limit: int | None = None  # use the first N questions (quick CPU runs)
    eval_limit: int | None = None
    output_dir: str = "runs/default"
    cache_dir: str | None = None  # where tokenized training windows are cached (shared by a sweep's trials)
    seed: int = 42  # 0 to 2**32 - 1 (MAX_SEED)

    # --- features and post-processing ---------------------------------------------------------------------
    max_seq_length: int = 384
    doc_stride: int = 128
    # a question with more tokens is cut to its first max_query_length (as in the BERT SQuAD recipe), one warning
    # giving how many were cut
    max_query_length: int = 64
    max_answer_length: int = 30
    n_best: int = 20
    max_windows: int = 64  # served model: the most windows one context may need (longer ones are refused)

    # --- optimisation -------------------------------------------------------------------------------------
    epochs: float = 2.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16
    eval_batch_size: int = 64
    grad_accum: int = 1  # micro-batches a step; a run in epochs needs at least as many in an epoch
    # batches of windows of similar length: each epoch's shuffled windows are taken in groups of 50 batches, each
    # group sorted by length and cut into batches, and the batches shuffled. Every window still comes once an
    # epoch; a batch is cut to its longest window, so on SQuAD (a third of the windows full, the rest shorter) a
    # step costs about a fifth less than with batches drawn at random, whose longest window is nearly always full.
    # Off by default: on the accuracy bench its extra steps at equal FLOPs kept less F1 than random batches.
    group_by_length: bool = False
    learning_rate: float = 3e-5
    weight_decay: float = 0.0
    # keep the word embeddings as they are (not trained): they hold over half of a small BERT's weights, and a
    # fine-tune on a few thousand questions moves only the rows of the tokens those questions contain.
    freeze_embeddings: bool = False
    # linear warm-up (then linear decay) of the learning rate, as a fraction of the training steps before the filled
    # phase; the filled phase (and a fisher recovery) warms up again over the same fraction of its fill_steps
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0  # clip the weights' gradient norm to this; 0 or null: no clipping
    # dropout probability of every dropout layer of the student while it trains (hidden and attention); None: the
    # model's own (0.1 for BERT). Saved models keep their own config.
    dropout: float | None = None
    # exponential moving average of the weights while the structure is fixed (dense runs, the filled phase, the
    # recovery after a fisher cut), with this decay per step; evaluations and the saved model use the average.
    # None: off.
    ema_decay: float | None = None
    eval_every: int | None = None  # steps between evaluations; None: only at the end
    # steps between checkpoints; one is also written at every evaluation and at the end (None: only then)
    save_every: int | None = None
    log_every: int = 10

    # --- masks (ignored for method: dense) ------------------------------------------------------------------
    method: Method = Method.DENSE
    # rows x columns of one attention score block, or head: one head of the model, [head_dim, hidden] (whole heads
    # kept or removed; what method fisher prunes), whatever the model's width; null: the method's own
    # (method_block: [32, 32] for topk and sigmoid_threshold, the paper's; head for fisher)
    attention_block: tuple[int, int] | str | None = None
    mask_lr: float = 1e-2
    # initial scores: a number (every score that value; sigmoid(0) = 0.5 keeps everything at threshold 0), or
    # constant (0), fisher or magnitude: scores spread over [-mask_init_scale, mask_init_scale] by the weighted
    # quantile of the block's importance per weight, so the first cuts follow the estimate
    mask_init: float | str = 0.0
    mask_init_scale: float = 1.0
    # topk: fraction of masked weights kept at the end of the schedule (starts at 1.0)
    target_density: float = 0.5
    topk_scope: TopkScope = TopkScope.PER_MATRIX
    # sigmoid_threshold: threshold on sigmoid(score) ramps initial_threshold -> final_threshold
    initial_threshold: float = 0.0
    final_threshold: float = 0.1
    # Final L1 weights (ramping from 0 with the threshold). The penalty is (lambda_attention * R_att + lambda_ffn *
    # R_ffn) / 2, R = mean sigmoid(score) of a group, as in the reference implementation: a lambda here is its
    # regularization_final_lambda (group lambdas 1), so the published values (2.5 to 40) transfer unchanged.
    lambda_attention: float = 10.0
    lambda_ffn: float = 10.0
    # cubic schedule: hold for initial_warmup, ramp, hold for the last final_warmup (with 0, the ramp ends at the
    # last pruning step, which is at the target). A value < 1 is a fraction of the pruning steps, a value >= 1 a
    # number of steps; together they may not take more than every pruning step.
    initial_warmup: float = 0.1
    final_warmup: float = 0.2

    # --- fisher: one-shot structured pruning (also the calibration of mask_init: fisher) -------------------------
    calibration_samples: int = 2048  # training windows whose squared mask gradients give the importance
    target_flops: float | None = None  # fisher: fraction of the encoder's FLOPs to keep (instead of target_density)
    mask_rearrange: bool = False  # fisher: re-choose each layer's heads/neurons with its block-diagonal Fisher
    mask_tuning_samples: int = 256  # fisher: windows of the least-squares fit (calibration windows first); 0: off
    # fisher: fit a scale per kept structure, or the kept weights. The weights fit closer and keep more F1 with no
    # training, but a recovery from them ends lower than from the scales (bench/RESULTS.md), hence auto.
    mask_tuning: MaskTuning = MaskTuning.AUTO
    # fisher: the ridge weight of the tuning's least squares, relative to the mean diagonal of its Gram matrix
    # (larger: smaller changes). null: the mode's default (importance.TUNING_DAMPING).
    mask_tuning_damping: float | None = None
    # fisher: cut in this many stages, each followed by an equal share of the fill_steps (1: one-shot). Stage i
    # keeps target ** (i / fisher_stages) of the linear weights (or FLOPs), from the model the last stage recovered.
    fisher_stages: int = 1
    # fisher: every layer keeps at least this fraction of its heads and of its FFN dimensions (the most important
    # ones); the search places the rest of the budget. 0: no floor, the search alone decides.
    fisher_layer_floor: float = 0.0

    # --- hardware -----------------------------------------------------------------------------------------
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    # "fp32", "bf16" (autocast of the matrix work; masks, scores, losses and optimizer state stay fp32; on a CPU
    # only where it has bf16 matrix instructions, on a GPU from compute capability 8.0) or "auto" (bf16 where
    # supported, else fp32). See pruning.precision.
    precision: str = "fp32"

    # --- distillation -------------------------------------------------------------------------------------
    teacher: str | None = None  # QA model directory; None: no distillation
    alpha_ce: float = 0.1
    alpha_distil: float = 0.9
    temperature: float = 2.0
    alpha_hidden: float = 0.0  # weight of the layer-wise hidden-state MSE to the teacher (needs a teacher)
    # keep the teacher's logits of every training window after its first forward (pruning.teacher_cache): one
    # teacher forward per distinct window instead of one per step. With alpha_hidden > 0 its layer outputs too, in
    # bf16 (layers x hidden x 2 bytes a token: 2.7 GB for MiniLM on 3,072 windows of 192 tokens). Without a
    # teacher it does nothing, like the other distillation keys.
    teacher_cache: bool = False

    # --- filled phase ---------------------------------------------------------------------------------------
    fill_steps: int = 0  # steps after pruning with removed heads/FFN dims fixed and kept heads dense again
    #                      (for fisher: the recovery fine-tune after the one-shot step)
    fill_learning_rate: float | None = None  # default: learning_rate
    # fisher: train the recovery on the packed model (removed heads and FFN dimensions cut out, so each step costs
    # what the smaller model costs); checkpoints and the final model are still ordinary masked checkpoints.
    fill_packed: bool = False

    def __post_init__(self) -> None:
        _check(self)

    @property
    def masked(self) -> bool:
        return self.method is not Method.DENSE

    @property
    def tuning_mode(self) -> MaskTuning:
        """The mask tuning a fisher cut runs: ``mask_tuning`` with ``auto`` resolved by ``fill_steps``."""
        if self.mask_tuning is MaskTuning.AUTO:
            return MaskTuning.WEIGHTS if self.fill_steps == 0 else MaskTuning.SCALES
        return self.mask_tuning


_ENUMS = {"method": Method, "topk_scope": TopkScope, "mask_tuning": MaskTuning}
# Keys naming a file, a directory or a shipped resource; the optional ones may be null.
_PATH_KEYS = ("model", "tokenizer", "train_data", "eval_data", "output_dir", "cache_dir", "teacher")
_OPTIONAL_PATH_KEYS = ("tokenizer", "cache_dir", "teacher")


def home_path(path: str) -> str:
    """``path`` as a shell reads it: a leading ``~`` (or ``~user``) is the home directory. Every path a user gives
    (a run config's, a search space's, the command line's, also where the shell left ``~`` as typed) is read so.

    Raises:
        ConfigError: ``path`` is under ``~`` but this process has no home directory (no ``HOME``, and a user id
            the system does not know, as in some containers): the path would be a directory named ``~`` here.
    """
    if not path.startswith("~"):
        return path
    expanded = os.path.expanduser(path)
    if expanded == path and (path == "~" or path.startswith("~/")):
        raise ConfigError(f"{path}: ~ is the home directory, and this process has none (HOME is not set); give "
                          "the path in full")
    return expanded


def _fail(key: str, message: str) -> None:
    if message.endswith("got None"):  # `key: ~` or `key:` with no value: YAML's null, which Python calls None
        message = message[:-len("None")] + "null (YAML reads ~ and a key with no value as null)"
    raise ConfigError(f"{key}: {message}")


def _check(cfg: RunConfig) -> None:
    """Coerce what YAML gives, then check each key alone and the keys together; the first problem is a
    :class:`ConfigError` naming its key."""
    _coerce(cfg)
    _check_counts(cfg)
    _check_numbers(cfg)
    _check_together(cfg)
    _check_model_config(cfg)


def _coerce(cfg: RunConfig) -> None:
    """The values YAML gives, as the checks read them: enums from their names, a block from its list (or one
    integer), paths as strings with ``~`` expanded, ``mask_init`` as its kind or a number."""
    for key, enum_type in _ENUMS.items():
        value = getattr(cfg, key)
        if not isinstance(value, enum_type):
            try:
                object.__setattr__(cfg, key, enum_type(value))
            except ValueError:
                allowed = ", ".join(m.value for m in enum_type)
                _fail(key, f"unknown value {value!r} (allowed: {allowed})")
    block = cfg.attention_block
    if isinstance(block, int):
        block = (block, block)
    if block is not None and block != HEAD_BLOCK:
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(_is_int(b) and b > 0 for b in block)):
            _fail("attention_block", f"must be two positive integers [rows, cols] or {HEAD_BLOCK} (one head of the "
                                     f"model), got {cfg.attention_block!r}")
        block = (int(block[0]), int(block[1]))
    object.__setattr__(cfg, "attention_block", block)
    for key in _PATH_KEYS:
        value = getattr(cfg, key)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
            object.__setattr__(cfg, key, value)
        if isinstance(value, str):  # YAML reads no `~`: the home directory, as a shell reads it
            try:
                value = home_path(value)
            except ConfigError as err:
                _fail(key, str(err))
            object.__setattr__(cfg, key, value)
        if value is None and key not in _OPTIONAL_PATH_KEYS:  # `output_dir: ~` meant as the home directory
            _fail(key, "must be a path or name, got null (YAML reads a bare ~ as null; write '~' in quotes for the "
                       "home directory)")
        if not (isinstance(value, str) and value) and not (value is None and key in _OPTIONAL_PATH_KEYS):
            allowed = "a path or name" + (" or null" if key in _OPTIONAL_PATH_KEYS else "")
            _fail(key, f"must be {allowed}, got {value!r}")
    if isinstance(cfg.mask_init, MaskInit):
        pass
    elif isinstance(cfg.mask_init, str):
        try:
            object.__setattr__(cfg, "mask_init", MaskInit(cfg.mask_init))
        except ValueError:
            allowed = ", ".join(m.value for m in MaskInit)
            _fail("mask_init", f"unknown value {cfg.mask_init!r} (a number, or one of: {allowed})")
    elif not _is_number(cfg.mask_init):
        _fail("mask_init", f"must be a number or one of constant, fisher, magnitude, got {cfg.mask_init!r}")


def _check_counts(cfg: RunConfig) -> None:
    """The integer keys: steps, sizes, samples, stages, the seed."""
    positive_ints = ["max_seq_length", "doc_stride", "max_query_length", "max_answer_length", "n_best", "max_windows",
                     "batch_size", "eval_batch_size", "grad_accum", "log_every"]
    for key in positive_ints:
        if not (_is_int(getattr(cfg, key)) and getattr(cfg, key) > 0):
            _fail(key, f"must be a positive integer, got {getattr(cfg, key)!r}")
    optional_ints = ["train_limit", "eval_limit", "max_steps", "eval_every", "save_every"]
    for key in optional_ints:
        value = getattr(cfg, key)
        if value is not None and not (_is_int(value) and value > 0):
            _fail(key, f"must be a positive integer or null, got {value!r}")
    if not (_is_int(cfg.fill_steps) and cfg.fill_steps >= 0):
        _fail("fill_steps", f"must be an integer >= 0, got {cfg.fill_steps!r}")
    if not (_is_int(cfg.calibration_samples) and cfg.calibration_samples > 0):
        _fail("calibration_samples", f"must be a positive integer, got {cfg.calibration_samples!r}")
    if not (_is_int(cfg.mask_tuning_samples) and cfg.mask_tuning_samples >= 0):
        _fail("mask_tuning_samples", f"must be an integer >= 0, got {cfg.mask_tuning_samples!r}")
    for key in (*positive_ints, *optional_ints, "fill_steps", "calibration_samples", "mask_tuning_samples"):
        value = getattr(cfg, key)
        if value is not None and value > MAX_COUNT:  # torch takes no larger count (a batch split, an index)
            _fail(key, f"must be at most {MAX_COUNT}, got {value!r}")
    if not (_is_int(cfg.fisher_stages) and cfg.fisher_stages >= 1):
        _fail("fisher_stages", f"must be an integer >= 1, got {cfg.fisher_stages!r}")
    if not (_is_int(cfg.seed) and 0 <= cfg.seed <= MAX_SEED):
        _fail("seed", f"must be an integer from 0 to {MAX_SEED}, got {cfg.seed!r}")
    if cfg.doc_stride >= cfg.max_seq_length:
        _fail("doc_stride", f"must be smaller than max_seq_length ({cfg.max_seq_length}), got {cfg.doc_stride}")


def _check_numbers(cfg: RunConfig) -> None:
    """The real-valued keys, switches and device settings, each in its range."""
    if cfg.mask_tuning_damping is not None and (not _is_number(cfg.mask_tuning_damping)
                                                or not cfg.mask_tuning_damping > 0):
        _fail("mask_tuning_damping", f"must be a number > 0 or null, got {cfg.mask_tuning_damping!r}")
    for key in ("mask_rearrange", "teacher_cache", "fill_packed", "group_by_length", "freeze_embeddings"):
        if not isinstance(getattr(cfg, key), bool):
            _fail(key, f"must be true or false, got {getattr(cfg, key)!r}")
    if cfg.max_grad_norm is not None and (not _is_number(cfg.max_grad_norm) or cfg.max_grad_norm < 0):
        _fail("max_grad_norm", f"must be a number >= 0 (0: no clipping) or null, got {cfg.max_grad_norm!r}")
    non_negative = ["epochs", "weight_decay", "lambda_attention", "lambda_ffn",
                    "alpha_ce", "alpha_distil", "alpha_hidden", "initial_warmup", "final_warmup"]
    for key in non_negative:
        value = getattr(cfg, key)
        if not _is_number(value) or value < 0:
            _fail(key, f"must be a number >= 0, got {value!r}")
    for key in ("initial_warmup", "final_warmup"):
        value = getattr(cfg, key)
        if value >= 1 and value != int(value):
            _fail(key, f"must be a fraction of the pruning steps (< 1) or a whole number of steps, got {value!r}")
    for key in ["learning_rate", "mask_lr", "temperature", "mask_init_scale"]:
        value = getattr(cfg, key)
        if not _is_number(value) or value <= 0:
            _fail(key, f"must be a number > 0, got {value!r}")
    if cfg.fill_learning_rate is not None and (not _is_number(cfg.fill_learning_rate) or cfg.fill_learning_rate <= 0):
        _fail("fill_learning_rate", f"must be a number > 0 or null, got {cfg.fill_learning_rate!r}")
    if not _is_number(cfg.warmup_ratio) or not 0 <= cfg.warmup_ratio < 1:
        _fail("warmup_ratio", f"must be in [0, 1), got {cfg.warmup_ratio!r}")
    if not _is_number(cfg.target_density) or not 0 < cfg.target_density <= 1:
        _fail("target_density", f"must be in (0, 1], got {cfg.target_density!r}")
    if cfg.target_flops is not None and (not _is_number(cfg.target_flops) or not 0 < cfg.target_flops <= 1):
        _fail("target_flops", f"must be in (0, 1] or null, got {cfg.target_flops!r}")
    for key in ["initial_threshold", "final_threshold"]:
        value = getattr(cfg, key)
        if not _is_number(value) or not 0 <= value < 1:
            _fail(key, f"must be in [0, 1), got {value!r}")
    if cfg.dropout is not None and (not _is_number(cfg.dropout) or not 0 <= cfg.dropout < 1):
        _fail("dropout", f"must be in [0, 1) or null, got {cfg.dropout!r}")
    if cfg.ema_decay is not None and (not _is_number(cfg.ema_decay) or not 0 < cfg.ema_decay < 1):
        _fail("ema_decay", f"must be in (0, 1) or null, got {cfg.ema_decay!r}")
    if not _is_number(cfg.fisher_layer_floor) or not 0 <= cfg.fisher_layer_floor < 1:
        _fail("fisher_layer_floor", f"must be in [0, 1), got {cfg.fisher_layer_floor!r}")
    if cfg.precision not in ("fp32", "bf16", "auto"):
        _fail("precision", f"unknown value {cfg.precision!r} (allowed: fp32, bf16, auto)")
    if not isinstance(cfg.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        _fail("device", f"must be auto, cpu or cuda[:N], got {cfg.device!r}")


def _check_together(cfg: RunConfig) -> None:
    """Keys that must agree with each other (and with the method)."""
    if cfg.model_config is not None and cfg.model != SHIPPED_MODEL:
        # A copied config that builds a random model (configs/tiny_smoke.yaml, the smoke space), given a model: the
        # random one trained, and the model given was never read, without a word.
        _fail("model", f"{cfg.model!r} is given with model_config, which builds a random model instead of loading "
                       "it: give one of them (model_config: null loads the model)")
    if (cfg.method in (Method.TOPK, Method.SIGMOID_THRESHOLD) and cfg.initial_warmup < 1 and cfg.final_warmup < 1
            and cfg.initial_warmup + cfg.final_warmup > 1):
        _fail("final_warmup", f"{cfg.final_warmup} of the pruning steps after an initial_warmup of "
                              f"{cfg.initial_warmup}: the two warm-ups take more than every pruning step")
    if cfg.epochs == 0 and cfg.max_steps is None:
        _fail("epochs", "is 0 and max_steps is not set: nothing to train")
    if cfg.alpha_ce + cfg.alpha_distil <= 0:
        _fail("alpha_ce", "alpha_ce + alpha_distil must be > 0")
    if cfg.target_flops is not None and cfg.method is not Method.FISHER:
        _fail("target_flops", f"only method fisher takes a FLOP target, not {cfg.method.value}")
    if not cfg.masked and cfg.fill_steps:
        _fail("fill_steps", "a filled phase needs a pruning method (topk, sigmoid_threshold or fisher)")
    if cfg.fisher_layer_floor > 0:
        if cfg.method is not Method.FISHER:
            _fail("fisher_layer_floor", f"is {cfg.fisher_layer_floor}, but only method fisher searches a layer floor")
        target_key = "target_density" if cfg.target_flops is None else "target_flops"
        if cfg.fisher_layer_floor > getattr(cfg, target_key):
            _fail("fisher_layer_floor", f"{cfg.fisher_layer_floor} exceeds {target_key} {getattr(cfg, target_key)}: "
                                        f"the floor alone would keep more than the target")
    if cfg.fill_packed and cfg.method is not Method.FISHER:
        _fail("fill_packed", f"trains a fisher recovery packed, but method is {cfg.method.value}")
    if cfg.fill_packed and cfg.fisher_stages > 1:
        _fail("fill_packed", f"needs fisher_stages 1 (a later stage cuts the masked model), got {cfg.fisher_stages}")
    if cfg.fisher_stages > 1 and cfg.method is not Method.FISHER:
        _fail("fisher_stages", f"is {cfg.fisher_stages}, but only method fisher prunes in stages")
    if cfg.fisher_stages > 1 and cfg.fill_steps < cfg.fisher_stages:
        _fail("fisher_stages", f"{cfg.fisher_stages} stages need at least {cfg.fisher_stages} fill_steps (recovery "
                               f"after each), got {cfg.fill_steps}")


def _check_model_config(cfg: RunConfig) -> None:
    """``model_config``, a random model's fields: known keys, values in range, a head-shaped block."""
    if cfg.model_config is None:
        return
    if not isinstance(cfg.model_config, Mapping):
        _fail("model_config", f"must be a mapping of config fields, got {type(cfg.model_config).__name__}")
    _check_model_keys(cfg.model_config)
    _check_model_values(cfg.model_config)
    default_hidden, default_heads = _attention_defaults(_model_type(cfg.model_config))
    hidden = cfg.model_config.get("hidden_size", default_hidden)
    heads = cfg.model_config.get("num_attention_heads", default_heads)
    if hidden % heads:
        _fail("model_config.hidden_size", f"{hidden} is not a multiple of num_attention_heads {heads}")
    if cfg.method is Method.FISHER:
        check_head_shaped(method_block(cfg), hidden // heads, hidden)


def _model_type(values: Mapping[Any, Any]) -> str:
    """The ``model_type`` of ``model_config`` (bert unless given), one the structure table knows."""
    # pruning.structure imports torch and transformers: only configs that build a random model need it.
    from .structure import ARCHITECTURES, DEFAULT_MODEL_TYPE

    model_type = values.get("model_type", DEFAULT_MODEL_TYPE)
    # pruning.distilbert and pruning.albert read a directory of one as BERT or ELECTRA; a random one is theirs.
    for read, read_as in (("distilbert", "bert"), ("albert", "electra")):
        if model_type == read:
            _fail("model_config.model_type", f"{read!r} is read from a model directory only (as the {read_as} model "
                  f"that computes the same); a random model is given as {read_as}'s config values")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        _fail("model_config.model_type", f"{model_type!r} is not supported ({', '.join(sorted(ARCHITECTURES))})")
    return model_type


@functools.cache
def _config_fields(model_type: str) -> tuple[str, frozenset[str]]:
    """The config class name of ``model_type`` and its fields."""
    from .structure import config_class  # only for configs that build a random model: keeps this module light

    cls = config_class(model_type)
    return cls.__name__, frozenset(cls().to_dict())


@functools.cache
def _attention_defaults(model_type: str) -> tuple[int, int]:
    """``hidden_size`` and ``num_attention_heads`` of ``model_type``'s config when ``model_config`` leaves them out."""
    from .structure import config_class  # only for configs that build a random model: keeps this module light

    defaults = config_class(model_type)()
    return int(defaults.hidden_size), int(defaults.num_attention_heads)


# Config fields a random model is built from: sizes (integers >= 1) and dropout probabilities ([0, 1)).
_MODEL_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "embedding_size")
_MODEL_PROBABILITIES = ("hidden_dropout_prob", "attention_probs_dropout_prob")


def _check_model_values(values: Mapping[Any, Any]) -> None:
    """The sizes and probabilities of ``model_config`` that the config takes unchecked and the model fails on."""
    for key in _MODEL_SIZES:
        if key in values and not (_is_int(values[key]) and values[key] > 0):
            _fail(f"model_config.{key}", f"must be a positive integer, got {values[key]!r}")
    for key in _MODEL_PROBABILITIES:
        if key in values and not (_is_number(values[key]) and 0 <= values[key] < 1):
            _fail(f"model_config.{key}", f"must be in [0, 1), got {values[key]!r}")
    problem = _model_config_problem(dict(values))
    if problem is not None:
        _fail(*problem)


def _model_config_problem(values: dict[Any, Any]) -> tuple[str, str] | None:
    """The key of ``model_config`` and why its model's config cannot be made from it (a value of the wrong type)
    or the model built (an activation transformers does not have), or None: found here, not as a traceback from
    transformers once the run has started."""
    # transformers: only configs that build a random model need it, which keeps this module light.
    from transformers.activations import ACT2FN

    from .structure import config_class

    values = {"model_type": _model_type(values), **values}
    act = values.get("hidden_act")
    if act is not None and not (isinstance(act, str) and act in ACT2FN):
        return "model_config.hidden_act", f"unknown activation {act!r} (one of {', '.join(sorted(ACT2FN))})"
    cls = config_class(values.pop("model_type"))
    try:
        config = cls(**values)
    except Exception as err:  # TypeError, ValueError, or the strict field checks of recent transformers
        return "model_config", f"invalid {cls.__name__} ({' '.join(str(err).split())})"
    # What the config takes and the model's layers refuse (an embedding's padding row, an initialiser's spread).
    pad, vocab = getattr(config, "pad_token_id", None), config.vocab_size
    if pad is not None and not (_is_int(pad) and 0 <= pad < vocab):
        return "model_config.pad_token_id", f"must be a token id below vocab_size ({vocab}), got {pad!r}"
    spread = getattr(config, "initializer_range", None)
    if spread is not None and not (_is_number(spread) and spread >= 0):
        return "model_config.initializer_range", f"must be a number >= 0, got {spread!r}"
    return None


def _check_model_keys(values: Mapping[Any, Any]) -> None:
    """Every key of ``model_config`` must be a field of its model_type's config, which would otherwise keep a typo
    silently."""
    name, known = _config_fields(_model_type(values))
    unknown = sorted((key for key in values if key not in known), key=str)
    if unknown:
        close = did_you_mean(unknown[0], known)
        hint = f" ({close})" if close else ""
        more = f"; and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        _fail("model_config", f"unknown key {unknown[0]!r}{hint}: {name} has no such field{more}")


# The attention_block that is one head of whatever model the run prunes: [head_dim, hidden].
HEAD_BLOCK = "head"
# The attention_block of topk and sigmoid_threshold without one of their own: the paper's 32x32 blocks.
DEFAULT_BLOCK = (32, 32)


def method_block(cfg: RunConfig) -> tuple[int, int] | str:
    """The attention block ``cfg`` prunes with: its ``attention_block``, or without one (null) its method's own,
    :data:`HEAD_BLOCK` for fisher (which keeps or removes whole heads) and :data:`DEFAULT_BLOCK` for the others. A
    config that leaves the key out thus fits every method, a sweep that searches ``method`` among them."""
    return default_block(cfg.method) if cfg.attention_block is None else cfg.attention_block


def default_block(method: Method) -> tuple[int, int] | str:
    """The attention block of ``method`` when a config gives none (see :func:`method_block`)."""
    return HEAD_BLOCK if method is Method.FISHER else DEFAULT_BLOCK


def attention_block_of(block: tuple[int, int] | str, hidden: int, heads: int) -> tuple[int, int]:
    """``attention_block`` as rows x columns for a model ``hidden`` wide in ``heads`` heads: :data:`HEAD_BLOCK` is
    ``(hidden // heads, hidden)``, two numbers are themselves."""
    return (hidden // heads, hidden) if block == HEAD_BLOCK else (int(block[0]), int(block[1]))


def check_head_shaped(block: tuple[int, int] | str, head_dim: int, hidden: int) -> None:
    """Method fisher keeps or removes whole heads: its attention block must be one head, :data:`HEAD_BLOCK` or
    ``[head_dim, hidden]``.

    Raises:
        ConfigError: naming ``attention_block``.
    """
    if block != HEAD_BLOCK and tuple(block) != (head_dim, hidden):
        _fail("attention_block", f"method fisher needs head-shaped blocks: {HEAD_BLOCK} or [head_dim, hidden] = "
                                 f"[{head_dim}, {hidden}], got {list(block)}")


# The largest seed: NumPy's, Optuna's samplers' and Ray's search generator's (a sweep without a seed of its own
# seeds its search with base.seed) take 0 .. 2**32 - 1, and torch no more than 2**63 - 1.
MAX_SEED = 2**32 - 1
# The largest count a run config takes (steps, windows, batch sizes): torch's largest integer.
MAX_COUNT = 2**63 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _YamlLoader(yaml.SafeLoader):
    """Safe YAML that reads ``1e-4`` as a number (plain YAML 1.1 wants ``1.0e-4``) and rejects duplicate keys.

    A merge key (``<<: *defaults``) takes the merged mapping's keys, which the mapping's own keys override, as YAML
    has it; only a key written twice in one mapping is refused."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(None, None, f"a {type(key).__name__} as a key",
                                                        key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


MERGE_TAG = "tag:yaml.org,2002:merge"


def _construct_int(loader: _YamlLoader, node: yaml.ScalarNode) -> int:
    """An integer as written: ``010`` is ten (YAML 1.2, and what a config means), not YAML 1.1's octal eight; a
    base-60 ``1:30`` (YAML 1.1's 90) is refused, as nothing a config takes is written that way."""
    value = loader.construct_scalar(node)
    digits = value.replace("_", "")
    if ":" in digits:
        raise yaml.constructor.ConstructorError(None, None, f"{value} reads as a base-60 number (YAML 1.1); quote it "
                                                "or write the number", node.start_mark)
    if re.fullmatch(r"[-+]?0[0-9]+", digits):
        return int(digits, 10)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_YamlLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parser_limit(err: BaseException) -> str | None:
    """What a JSON or YAML parser's error other than a syntax error says of the file, in a few words: nesting deeper
    than Python's recursion limit, or an integer longer than it converts (4,300 digits); None for anything else."""
    if isinstance(err, RecursionError):
        return "nested too deeply"
    if isinstance(err, ValueError) and "integer string conversion" in str(err):
        return "a number too long to read"
    return None


def read_yaml(path: str | Path) -> Any:
    """The one YAML reader of run configs and search spaces: safe, ``1e-4`` is a number, a repeated key an error.

    Raises:
        ConfigError: ``<path>: not valid YAML (what and where)``, in one line; the caller checks that the file exists.
    """
    path = Path(path)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        lines = str(err).replace('in "<unicode string>", ', "at ").strip().splitlines()
        raise ConfigError(f"{path}: not valid YAML ({' '.join(line.strip() for line in lines[:3])})") from None
    except (RecursionError, ValueError) as err:
        if (limit := parser_limit(err)) is None:
            raise
        raise ConfigError(f"{path}: not readable YAML ({limit})") from None


def config_from_dict(values: Mapping[str, Any], source: str = "config", base: RunConfig | None = None) -> RunConfig:
    """Build a config from a mapping, rejecting unknown keys; ``base`` supplies the values not given."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(values).__name__}")
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(values) - known, key=str)  # YAML keys may be numbers or booleans too
    if unknown:
        hint = name_hint(unknown[0], known)
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}{more}{hint}")
    values = dict(values)
    # A number is a name (output_dir: 2024); a list, mapping or boolean is no path, and left to the path check.
    if isinstance(values.get("output_dir"), (int, float)) and not isinstance(values["output_dir"], bool):
        values["output_dir"] = str(values["output_dir"])
    try:
        if base is None:
            return RunConfig(**values)
        return dataclasses.replace(base, **values)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except TypeError as err:  # a wrong type that __post_init__ did not catch
        raise ConfigError(f"{source}: {err}") from None


_PRUNING = frozenset({Method.TOPK, Method.SIGMOID_THRESHOLD, Method.FISHER})
_MOVEMENT = frozenset({Method.TOPK, Method.SIGMOID_THRESHOLD})
# The methods that read each mask key (every other RunConfig key applies to every method).
METHOD_KEYS: dict[str, frozenset[Method]] = {
    **dict.fromkeys(("attention_block", "fill_steps", "fill_learning_rate", "calibration_samples"), _PRUNING),
    "target_density": frozenset({Method.TOPK, Method.FISHER}),
    "topk_scope": frozenset({Method.TOPK}),
    **dict.fromkeys(("initial_threshold", "final_threshold", "lambda_attention", "lambda_ffn"),
                    frozenset({Method.SIGMOID_THRESHOLD})),
    **dict.fromkeys(("mask_lr", "mask_init", "mask_init_scale", "initial_warmup", "final_warmup"), _MOVEMENT),
    **dict.fromkeys(("target_flops", "mask_rearrange", "mask_tuning_samples", "mask_tuning", "mask_tuning_damping",
                     "fisher_stages", "fisher_layer_floor", "fill_packed"), frozenset({Method.FISHER})),
    # fisher prunes before the first step: it trains its fill_steps only
    **dict.fromkeys(("epochs", "max_steps"), frozenset({Method.DENSE, Method.TOPK, Method.SIGMOID_THRESHOLD})),
}


def check_keys_apply(cfg: RunConfig, keys: Iterable[str]) -> None:
    """Refuse a key given in ``keys`` with a value of its own that ``cfg.method`` never reads, such as
    ``target_density: 0.3`` with ``sigmoid_threshold`` (whose density follows its lambdas): the run would silently
    do something else. A key at its default changes nothing either way (a config written out whole holds them all).

    Raises:
        ConfigError: naming the first such key, the method, and the methods that read it.
    """
    defaults = RunConfig()
    for key in keys:
        if key not in METHOD_KEYS or getattr(cfg, key) == getattr(defaults, key):
            continue
        if key == "attention_block" and cfg.attention_block == DEFAULT_BLOCK:
            continue  # the block a config written out whole named when null was not yet the method's own
        methods = METHOD_KEYS[key]
        if cfg.method not in methods:
            readers = [m.value for m in Method if m in methods]
            readers = " and ".join(filter(None, (", ".join(readers[:-1]), readers[-1])))
            steps = "; a fisher run trains its fill_steps" if key in ("epochs", "max_steps") else ""
            _fail(key, f"has no effect with method {cfg.method.value} (read by {readers} only{steps})")
        if key == "target_density" and cfg.method is Method.FISHER and cfg.target_flops is not None:
            _fail(key, "has no effect beside target_flops (method fisher keeps one target)")


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a YAML config file; ``overrides`` (already typed) replace its values. A key of the file that the
    config's method never reads is an error (:func:`check_keys_apply`)."""
    path = Path(path)
    if path.is_dir():  # the configs/ folder, or a run's output_dir
        raise ConfigError(f"{path}: is a directory; a YAML run config file is expected")
    if not path.exists():  # a pipe (--config <(envsubst < run.yaml)) is read like a file: once, here
        raise ConfigError(f"{path}: config file not found{path_hint(path)}")
    values = read_yaml(path)
    if values is None:  # an empty file (or comments only): every default, a MiniLM on the whole SQuAD training set
        raise ConfigError(f"{path}: empty (no config keys; write {{}} to take every default)")
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    given = list(values)
    values = {**values, **(overrides or {})}
    cfg = config_from_dict(values, source=str(path))
    try:
        check_keys_apply(cfg, given)  # the overrides' caller names its own keys (see check_keys_apply)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain, YAML/JSON-friendly values (enums as strings, tuples as lists); round-trips through
    ``config_from_dict``."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(value)
        out[f.name] = value
    return out


# The run-config keys that decide a model's EM/F1 beyond its weights and questions: the evaluation windows and the
# span search. A training run's model directories record them (pruning.checkpoint), ``fineprune eval`` and
# ``ask`` default to that record, and a registered version serves with the trial's values.
EVALUATION_KEYS = ("max_seq_length", "doc_stride", "max_query_length", "max_answer_length", "n_best")


def evaluation_settings(cfg: RunConfig) -> dict[str, int]:
    """The :data:`EVALUATION_KEYS` of ``cfg``, by name."""
    return {key: getattr(cfg, key) for key in EVALUATION_KEYS}
