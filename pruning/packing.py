"""Packing: turn a pruned model into a smaller dense one that computes the same function.

Removed heads lose their query/key/value rows (and biases) and their columns of the attention output; removed FFN
dimensions lose their row of the first linear and their column of the second. Which heads and dimensions go is
decided by :mod:`pruning.sparsity`, so a packed model lacks exactly what the metrics call removed. Zeros inside
kept heads stay as zeros: they are not structure that a dense matrix product can skip.

A layer that loses every head gets an :class:`EmptySelfAttention` (its context is empty and the attention output,
a ``Linear(0, hidden)``, yields just its bias); a layer that loses every FFN dimension gets ``Linear(hidden, 0)``
and ``Linear(0, hidden)``. No head is kept artificially. The modules at packed sizes are built by
:mod:`pruning.packed_modeling`, the one place that code lives.

A packed directory is a standard transformers directory (``config.json``, ``model.safetensors``, tokenizer files)
whose config also records the kept heads of every layer (``fineprune_heads_kept``, indices into the original
heads), the FFN widths (``fineprune_ffn_widths``) and ``fineprune_packed: true``. Its layers have several widths,
which the stock classes cannot build from a config (``from_pretrained`` stops on the mismatched sizes), so
:func:`save_packed` also copies ``packed_modeling.py`` into the directory and names its class of the model type in
config.json's ``auto_map``: ``AutoModelForQuestionAnswering.from_pretrained(dir, trust_remote_code=True)`` opens
it where fineprune is not installed. :func:`load_packed` opens it (and one written before the file was added)
without running that copy: it rebuilds the smaller modules from the record with this package's own
:mod:`pruning.packed_modeling` on the meta device and assigns the stored tensors; nothing is built or padded at the
original sizes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig
from transformers.modeling_utils import str_to_torch_dtype
from transformers.utils.hub import get_checkpoint_shard_files

from . import packed_modeling
from .atomic import give_open_mode, staged_dir
from .bench import compare_latency, eval_mode, flop_ratio, random_inputs
from .spread import JUDGED_PASSES, NOISY_SPREAD, spread
from .errors import path_hint, typed_error_line
from .masks import MaskedLinear, remove_masks_
from .packed_modeling import (FFN_WIDTHS_KEY, HEADS_KEPT_KEY, PACKED_CLASSES, PACKED_FLAG, EmptySelfAttention,
                              head_rows, layer_head_dim, shrink_layer, shrink_to_record)
from .precision import check_available, resolve_precision
from .sparsity import sparsity_report
from .quiet import quiet_transformers
from .structure import architecture_for, architecture_of_type, encoder_layers, get_module, max_positions, qa_model_class

__all__ = [
    "PackingError",
    "EmptySelfAttention",
    "PackReport",
    "PACKED_FLAG",
    "HEADS_KEPT_KEY",
    "FFN_WIDTHS_KEY",
    "WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "weight_files",
    "weight_dtypes",
    "read_weights",
    "check_kinds",
    "pack",
    "pack_for_training",
    "unpack_into_",
    "save_packed",
    "add_remote_code",
    "load_packed",
    "is_packed_dir",
    "is_packed",
    "LOGIT_TOLERANCE",
    "PACK_METRICS",
    "model_params",
    "pack_report",
    "pack_and_verify",
    "max_logit_diff",
    "weights_bytes",
]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"  # save_pretrained(max_shard_size=...): which shard holds what
LOGIT_TOLERANCE = 1e-3  # packed against masked logits: only the summation order differs
# The measured scalars of a PackReport a sweep trial reports, under these (its field) names.
PACK_METRICS = ("speedup", "timing_spread", "max_logit_diff", "params_before", "params_after")
CONFIG_NAME = "config.json"
AUTO_CLASS = "AutoModelForQuestionAnswering"  # the auto class config.json's auto_map names the packed class under
# Weight files a fresh save replaces; stale ones next to a new model.safetensors would confuse loaders.
_STALE_WEIGHTS = ("model.safetensors", "model-*.safetensors", WEIGHTS_INDEX_NAME, "pytorch_model*.bin")
# Weights stored as pickles, which are never read: unpickling a file can run any code it names.
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class PackingError(ValueError):
    """A model cannot be packed, saved or loaded; the message names the file or directory at fault."""


def is_packed(model: nn.Module) -> bool:
    """True for a model returned by :func:`pack` or :func:`load_packed`."""
    return bool(getattr(getattr(model, "config", None), PACKED_FLAG, False))


def pack(model: nn.Module) -> nn.Module:
    """A smaller dense copy of ``model`` with removed heads and FFN dimensions cut out; ``model`` is untouched.

    Args:
        model: a masked model (its current masks are baked in first), a plain model whose pruned structure is
            zeroed, or an already packed model (packed further; head indices stay relative to the original).

    Returns:
        The packed model in eval mode; its config records ``fineprune_heads_kept``, ``fineprune_ffn_widths`` and
        ``fineprune_packed``.

    Raises:
        ValueError: the model's architecture is not in :mod:`pruning.structure`.
    """
    if not isinstance(model, nn.Module):  # a model directory, say: "model_type None is not supported"
        raise TypeError(f"pack() takes a model (pruning.checkpoint.load_model(directory) loads one), got "
                        f"{type(model).__name__}")
    arch = architecture_for(model)
    packed = remove_masks_(copy.deepcopy(model))
    report = sparsity_report(packed)
    config = packed.config
    previous = getattr(config, HEADS_KEPT_KEY, None) if is_packed(packed) else None
    heads_kept: list[list[int]] = []
    widths: list[int] = []
    for i, (layer, structure) in enumerate(zip(encoder_layers(packed), report.layers)):
        local_heads = structure.heads_kept.nonzero().flatten().tolist()
        ffn = structure.ffn_kept.nonzero().flatten().tolist()
        shrink_layer(layer, local_heads, ffn, layer_head_dim(layer, config, arch), arch)
        # Record indices into the original heads, also when packing an already packed model again.
        heads_kept.append([previous[i][h] for h in local_heads] if previous else local_heads)
        widths.append(len(ffn))
    setattr(config, PACKED_FLAG, True)
    setattr(config, HEADS_KEPT_KEY, heads_kept)
    setattr(config, FFN_WIDTHS_KEY, widths)
    logger.info("packed: %d of %d heads kept, FFN widths %s", sum(map(len, heads_kept)), report.heads_total, widths)
    return packed.eval()


def _bias_masked_out(linear: nn.Module) -> bool:
    """Whether a masked linear's bias mask hides its whole bias (it follows the blocks of its rows)."""
    if not isinstance(linear, MaskedLinear) or linear.bias is None:
        return False
    with torch.no_grad():
        return not bool(linear.bias_mask(linear.block_mask()).any())


def pack_for_training(masked: nn.Module) -> nn.Module:
    """:func:`pack` for training in the masked model's place, with :func:`unpack_into_` writing the result back.

    A masked linear with nothing kept drops its bias (its bias mask follows its blocks), while the packed
    ``Linear(0, hidden)`` would add it: that bias is frozen at the zero packing gave it, so that the trained packed
    model stays one the masked model can compute. The second FFN linear's bias is never masked: it trains in both,
    also in a layer without FFN dimensions. The result is in train mode.
    """
    arch = architecture_for(masked)
    packed = pack(masked)
    for full, small in zip(encoder_layers(masked), encoder_layers(packed)):
        for path in (*arch.attention_linears, arch.ffn_in, arch.ffn_out):
            linear = get_module(small, path)
            if linear.in_features == 0 and linear.bias is not None and _bias_masked_out(get_module(full, path)):
                linear.bias.requires_grad_(False)
    return packed.train()


def unpack_into_(masked: nn.Module, packed: nn.Module) -> nn.Module:
    """Write the weights of ``packed``, a :func:`pack` of ``masked`` trained since, back into ``masked``; in place.

    The kept rows and columns of every shrunk linear go back to their places in the full-size matrices, every other
    parameter (embeddings, LayerNorms, output biases, the QA head) is copied whole. What packing removed keeps its
    old values in ``masked``, where its masks hide it, so ``masked`` then computes what ``packed`` computes and can
    be saved as an ordinary masked checkpoint. The structure must not have changed between the two calls.

    Returns:
        ``masked``.

    Raises:
        PackingError: ``packed`` is not a packing of ``masked``'s structure.
    """
    arch = architecture_for(masked)
    report = sparsity_report(masked)
    done: set[str] = set()
    with torch.no_grad():
        layers = zip(encoder_layers(masked), encoder_layers(packed), report.layers)
        for i, (full, small, structure) in enumerate(layers):
            head_dim = layer_head_dim(full, masked.config, arch)
            rows = head_rows(structure.heads_kept.nonzero().flatten(), head_dim)
            ffn = structure.ffn_kept.nonzero().flatten()
            for path, index, dim in [(arch.query, rows, 0), (arch.key, rows, 0), (arch.value, rows, 0),
                                     (arch.attention_output, rows, 1), (arch.ffn_in, ffn, 0), (arch.ffn_out, ffn, 1)]:
                target, source = get_module(full, path), get_module(small, path)
                if source.weight.shape[dim] != index.numel():
                    raise PackingError(f"layer {i} {path}: {source.weight.shape[dim]} packed rows or columns for "
                                       f"{index.numel()} kept ones: not a packing of this model's structure")
                where = index.to(target.weight.device)
                target.weight.index_copy_(dim, where, source.weight.to(target.weight))
                if target.bias is not None:
                    if dim == 0:
                        target.bias.index_copy_(0, where, source.bias.to(target.bias))
                    else:
                        target.bias.copy_(source.bias)
                prefix = f"{arch.layers}.{i}.{path}."
                done.update(prefix + name for name, _ in source.named_parameters())
        params = dict(masked.named_parameters())
        for name, source in packed.named_parameters():
            if name in done:
                continue
            target = params.get(name)
            if target is None or target.shape != source.shape:
                raise PackingError(f"{name}: {tuple(source.shape)} in the packed model, "
                                   f"{None if target is None else tuple(target.shape)} in the masked one")
            target.copy_(source)
    return masked


def _keep_others(out_dir: Path, staging: Path) -> None:
    """Copy what ``out_dir`` holds besides a model's weights into ``staging``, the directory that replaces it."""
    for entry in out_dir.iterdir():
        if any(entry.match(pattern) for pattern in _STALE_WEIGHTS):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, staging / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, staging / entry.name, follow_symlinks=False)


def add_remote_code(model_dir: str | Path, model_type: str) -> None:
    """Copy packed_modeling.py into a saved packed model's directory and point config.json's ``auto_map`` at its
    class, so that ``AutoModelForQuestionAnswering.from_pretrained(dir, trust_remote_code=True)`` builds it.

    :func:`save_packed` calls it, and so does :func:`pruning.checkpoint.save_model` for a packed model (a training
    run continued from a packed directory writes its checkpoint and final model there).
    """
    model_dir = Path(model_dir)
    source = Path(packed_modeling.__file__)
    shutil.copyfile(source, model_dir / source.name)
    config_file = model_dir / CONFIG_NAME
    data = json.loads(config_file.read_text(encoding="utf-8"))
    # Only this entry: the directory holds no other code, so an entry the model's source named (a model of a hub
    # repository's own code, say) would point at a file it lacks.
    data["auto_map"] = {AUTO_CLASS: f"{source.stem}.{PACKED_CLASSES[model_type].__name__}"}
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_packed(model: nn.Module, tokenizer: Any | None, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a packed model as a standard transformers directory, with ``packed_modeling.py`` and config.json's
    ``auto_map`` naming its class, so that ``AutoModelForQuestionAnswering.from_pretrained(out_dir,
    trust_remote_code=True)`` opens it without fineprune.

    Args:
        model: a model returned by :func:`pack` or :func:`load_packed`.
        tokenizer: saved alongside when given (anything with ``save_pretrained``).
        out_dir: target directory; created if missing. It is written whole or not at all: the model goes into a
            staging directory that takes its name once complete.
        overwrite: allow writing into a non-empty directory (its old weight files are replaced, its other files
            kept).

    Returns:
        The directory.

    Raises:
        PackingError: the model is not packed, or ``out_dir`` is a non-empty directory and ``overwrite`` is False.
    """
    out = Path(out_dir)
    if not is_packed(model):
        raise PackingError(f"{out}: refusing to save an unpacked model as packed (call pack() first)")
    if out.exists() and not out.is_dir():
        raise PackingError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PackingError(f"{out}: directory is not empty (pass overwrite=True to replace its contents)")
    with staged_dir(out) as tmp:  # an earlier model there stays whole until the new one is
        if out.is_dir():
            _keep_others(out, tmp)
        with quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
        for weights in tmp.glob("*.safetensors"):  # written 0600 by safetensors, unlike the files beside them
            give_open_mode(weights)
        add_remote_code(tmp, model.config.model_type)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info("saved packed model to %s", out)
    return out


def _read_config_json(config_file: Path) -> dict[str, Any] | None:
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_packed_dir(model_dir: str | Path) -> bool:
    """True when ``model_dir`` holds a config.json written for a packed model."""
    data = _read_config_json(Path(model_dir) / CONFIG_NAME)
    return isinstance(data, dict) and data.get(PACKED_FLAG) is True


def weight_files(model_dir: str | Path) -> tuple[Path, dict[Path, set[str] | None]]:
    """The safetensors files of a model directory's weights, as transformers' ``from_pretrained`` finds them:
    ``model.safetensors``, or else the shards that ``model.safetensors.index.json`` names (the files
    ``save_pretrained(dir, max_shard_size=...)`` writes), read through transformers' own index reader.

    Returns:
        The file that names the weights (``model.safetensors`` or the index) and each weights file with the tensor
        names the index places in it (None for a single ``model.safetensors``).

    Raises:
        PackingError: one line naming the file: neither is there (a directory of pickled ``pytorch_model.bin``
            weights, which are never unpickled, says so), the index is not one, or it names a shard that is missing.
    """
    path = Path(model_dir)
    single, index = path / WEIGHTS_NAME, path / WEIGHTS_INDEX_NAME
    if single.is_file():
        return single, {single: None}
    if not index.is_file():
        pickled = next((path / name for name in _PICKLED_WEIGHTS if (path / name).is_file()), None)
        if pickled is not None:
            raise PackingError(f"{pickled}: pickled PyTorch weights are not read (unpickling can run code); save the "
                               f"model as safetensors ({WEIGHTS_NAME}), e.g. save_pretrained(dir, "
                               "safe_serialization=True)")
        raise PackingError(f"{single}: weights file not found")
    try:
        shards, metadata = get_checkpoint_shard_files(str(path), str(index), local_files_only=True)
        weight_map = metadata["weight_map"]
        placed: dict[Path, set[str]] = {Path(shard): set() for shard in shards}
        for name, shard in weight_map.items():
            placed[path / shard].add(name)
    except Exception as error:  # not JSON, no weight_map or metadata, a weight_map that is no mapping of names
        raise PackingError(f"{index}: not a safetensors index of a model's shards "
                           f"({typed_error_line(error)})") from None
    for shard in placed:
        if not shard.is_file():
            raise PackingError(f"{shard}: weights file not found (named in {index.name})")
    return index, dict(placed)


_LFS_POINTER = b"version https://git-lfs.github.com/spec/"  # what a Git LFS file is before `git lfs pull`


def _unreadable(weights_file: Path, error: BaseException) -> PackingError:
    """The one line of a weights file safetensors cannot read; a Git LFS pointer (a repository cloned without
    git-lfs, or before `git lfs pull`) is said to be one, since it is no damaged file."""
    try:
        with open(weights_file, "rb") as handle:
            pointer = handle.read(len(_LFS_POINTER)) == _LFS_POINTER
    except OSError:
        pointer = False
    if pointer:
        return PackingError(f"{weights_file}: a Git LFS pointer, not the weights (fetch them with `git lfs pull` in "
                            "the repository the directory was cloned from)")
    return PackingError(f"{weights_file}: cannot be read as safetensors ({typed_error_line(error)})")


def _shard_dtypes(shard: Path, expected: set[str] | None, index: Path) -> dict[str, torch.dtype]:
    """The tensor names and dtypes in a safetensors file's header; for a shard, exactly those its index places
    there."""
    try:
        with safe_open(str(shard), framework="pt") as handle:
            names = list(handle.keys())
            dtypes = {name: handle.get_slice(name).get_dtype() for name in names}
    except Exception as error:  # safetensors reports corruption with several error types
        raise _unreadable(shard, error) from None
    if expected is not None and set(names) != expected:
        absent, extra = sorted(expected - set(names)), sorted(set(names) - expected)
        what = f"lacks tensor {absent[0]!r}" if absent else f"holds tensor {extra[0]!r}"
        where = "places there" if absent else "does not place there"
        raise PackingError(f"{shard}: {what}, which {index.name} {where}")
    unknown = next((name for name, dtype in dtypes.items() if dtype not in str_to_torch_dtype), None)
    if unknown is not None:
        raise PackingError(f"{shard}: tensor {unknown!r} has dtype {dtypes[unknown]}, which torch cannot hold")
    return {name: str_to_torch_dtype[dtype] for name, dtype in dtypes.items()}


def weight_dtypes(model_dir: str | Path) -> tuple[Path, dict[str, torch.dtype]]:
    """The file naming a model directory's weights (see :func:`weight_files`) and the names and dtypes of its
    tensors, read from the safetensors headers alone (the tensors are left for the real load).

    Raises:
        PackingError: as :func:`weight_files`, or a file is corrupted, or a shard does not hold what the index says.
    """
    source, files = weight_files(model_dir)
    dtypes: dict[str, torch.dtype] = {}
    for shard, expected in files.items():
        dtypes.update(_shard_dtypes(shard, expected, source))
    return source, dtypes


def check_kinds(weights_file: Path, stored: dict[str, torch.dtype], expected: dict[str, torch.Tensor]) -> None:
    """Refuse integers or booleans stored for a model's floating-point tensor (or the reverse): a quantized model's
    int8 weights, say, which loading would silently turn into floats of another scale, and the answers into noise.

    Raises:
        PackingError: one line naming ``weights_file`` and the first such tensor.
    """
    for name, dtype in stored.items():
        if name in expected and dtype.is_floating_point != expected[name].is_floating_point():
            raise PackingError(f"{weights_file}: tensor {name!r} has dtype {str(dtype).removeprefix('torch.')}, "
                               f"where the model holds {str(expected[name].dtype).removeprefix('torch.')}")


def read_weights(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Path, dict[str, torch.Tensor]]:
    """The tensors of a model directory's weights, from ``model.safetensors`` or all the shards its index names.

    Returns:
        The file naming the weights (for messages) and the tensors.

    Raises:
        PackingError: as :func:`weight_dtypes`.
    """
    source, files = weight_files(model_dir)
    state: dict[str, torch.Tensor] = {}
    for shard, expected in files.items():
        _shard_dtypes(shard, expected, source)
        try:
            state.update(load_file(str(shard), device=str(device)))
        except Exception as error:  # a header that reads but tensors that do not (a truncated file)
            raise _unreadable(shard, error) from None
    return source, state


def _model_class(config, config_file: Path) -> type:
    """The stock transformers class named in the config's ``architectures`` (for a packed class, its base), or,
    where config.json names none (a config edited by hand, or written by a tool that leaves the key out), the
    question-answering class of its ``model_type``, which is what a packed directory of that type holds."""
    names = getattr(config, "architectures", None) or []
    names = [names] if isinstance(names, str) else list(names)  # one name written without its list
    if not names:
        return qa_model_class(config.model_type)
    packed = {cls.__name__: cls.__bases__[0] for cls in PACKED_CLASSES.values()}
    for name in names:
        cls = packed.get(name) or getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    raise PackingError(f"{config_file}: no known model class in 'architectures' ({names or 'missing'})")


def _drop_auto_map(config) -> None:
    """Forget the config's ``auto_map``, which names code files of the directory it was read from (a packed
    directory's packed_modeling.py): the model is built here with this package's classes, and a directory written
    from it (a checkpoint, a packed model, an export) carries none of those files; :func:`save_packed` writes its
    own file with its own entry."""
    if hasattr(config, "auto_map"):
        del config.auto_map


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true and false are no counts


def _check_record(config, config_file: Path) -> tuple[list[list[int]], list[int]]:
    """The kept heads and FFN widths from a packed config, validated against its original sizes."""
    heads = getattr(config, HEADS_KEPT_KEY, None)
    widths = getattr(config, FFN_WIDTHS_KEY, None)
    layers, num_heads = config.num_hidden_layers, config.num_attention_heads
    if not isinstance(heads, list) or len(heads) != layers:
        raise PackingError(f"{config_file}: '{HEADS_KEPT_KEY}' must list the kept heads of all {layers} layers")
    if not isinstance(widths, list) or len(widths) != layers:
        raise PackingError(f"{config_file}: '{FFN_WIDTHS_KEY}' must give the FFN width of all {layers} layers")
    for i, kept in enumerate(heads):
        if (not isinstance(kept, list) or any(not _is_index(h) or not 0 <= h < num_heads for h in kept)
                or kept != sorted(set(kept))):
            raise PackingError(f"{config_file}: '{HEADS_KEPT_KEY}' of layer {i} must be increasing head indices "
                               f"in [0, {num_heads})")
    for i, width in enumerate(widths):
        if not _is_index(width) or not 0 <= width <= config.intermediate_size:
            raise PackingError(f"{config_file}: '{FFN_WIDTHS_KEY}' of layer {i} must be in "
                               f"[0, {config.intermediate_size}]")
    return heads, widths


# The threads building a packed model's modules now (see _parameters_on_meta), the lock that guards them, and the
# method nn.Module had before the one patch they share.
_META_THREADS: set[int] = set()
_META_LOCK = threading.Lock()
_register_before: Any = None
_TORCH_REGISTER = nn.Module.register_parameter  # torch's own, for a patch of another library that wraps this one
_CALLING = threading.local()


def _register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    """``nn.Module.register_parameter`` while some thread builds a packed model: on the meta device in those threads,
    as before in the others."""
    if getattr(_CALLING, "inside", False):  # called again through a patch that wraps this one: torch's own
        _TORCH_REGISTER(module, name, param)
        return
    _CALLING.inside = True
    try:
        _register_before(module, name, param)
    finally:
        _CALLING.inside = False
    if param is not None and param.device.type != "meta" and threading.get_ident() in _META_THREADS:
        module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device while buffers (position ids and the like) stay real, in this thread.

    Buffers that are not saved with the weights must keep the values their module computes at construction;
    parameters are replaced by the stored tensors anyway, so they need no memory and no initialisation. The method
    is patched on ``nn.Module`` while any thread is inside, and acts in those threads alone: modules that other
    threads build meanwhile (a server answering while another version loads) get their parameters as before, and
    the method is put back when the last thread leaves, whatever order they leave in.
    """
    global _register_before
    me = threading.get_ident()
    with _META_LOCK:
        outer = me not in _META_THREADS  # a block nested in this thread's leaves the undoing to the outer one
        if outer:
            # Another library that patches the method too (saving and restoring it across ours) may have left this
            # one in place: it is never taken for the method before, which it would then call forever.
            if not _META_THREADS and nn.Module.register_parameter is not _register_parameter:
                _register_before = nn.Module.register_parameter
                nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]
            _META_THREADS.add(me)
    try:
        yield
    finally:
        if outer:
            with _META_LOCK:
                _META_THREADS.discard(me)
                # Put back unless another patch replaced this one meanwhile (its own undoing restores it).
                if not _META_THREADS and nn.Module.register_parameter is _register_parameter:
                    nn.Module.register_parameter = _register_before  # type: ignore[method-assign]


def load_packed(model_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a packed model from a directory written by :func:`save_packed`.

    The modules are created at their packed sizes (on the meta device) from the record in config.json, then the
    tensors of model.safetensors (or of the shards its index names, as ``save_pretrained(dir, max_shard_size=...)``
    writes them) are assigned to them; every stored tensor must match its module's shape.

    Args:
        model_dir: the packed directory.
        device: where the weights go.

    Returns:
        The model in eval mode.

    Raises:
        PackingError: the directory, config.json or the weights are missing or unreadable, the config does
            not describe a packed model, or a stored tensor is missing, unexpected or of the wrong shape or kind
            (integers for a model's floating-point weights).
    """
    check_available(device)  # not taken for an unreadable weights file
    path = Path(model_dir)
    if not path.is_dir():
        raise PackingError(f"{path}: packed model directory not found{path_hint(path)}")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise PackingError(f"{config_file}: not found (not a model directory)")
    if not is_packed_dir(path):
        raise PackingError(f"{config_file}: not a packed model (no '{PACKED_FLAG}: true'); load it with "
                           "from_pretrained instead")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as error:  # transformers raises several types for a bad config
        raise PackingError(f"{config_file}: cannot be read ({typed_error_line(error)})") from error
    try:
        arch = architecture_of_type(getattr(config, "model_type", None))
    except ValueError as error:
        raise PackingError(f"{config_file}: {error}") from None
    _check_record(config, config_file)
    _drop_auto_map(config)
    cls = _model_class(config, config_file)
    config.architectures = [cls.__name__]  # the class built here, not a packed one whose file stays behind
    weights_file, _ = weight_files(path)

    try:
        with _parameters_on_meta():
            model = cls(config)
    except Exception as error:  # the modules check their config values (an activation's name, say) as they build
        raise PackingError(f"{config_file}: {cls.__name__} cannot be built from it "
                           f"({typed_error_line(error)})") from error
    try:
        layers = get_module(model, arch.layers)
    except AttributeError:
        raise PackingError(f"{config_file}: 'architectures' names {cls.__name__}, which has no {arch.layers} of a "
                           f"{config.model_type} model") from None
    # fineprune's own module building; the directory's copy of it (packed_modeling.py) is never run here.
    shrink_to_record(model, layers, arch)

    weights_file, state = read_weights(path, device)
    expected = model.state_dict()
    for name, tensor in state.items():
        if name not in expected:
            raise PackingError(f"{weights_file}: unexpected tensor {name!r} for this config")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise PackingError(f"{weights_file}: tensor {name!r} has shape {tuple(tensor.shape)}, the config "
                               f"implies {tuple(expected[name].shape)}")
        check_kinds(weights_file, {name: tensor.dtype}, expected)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if missing:
        raise PackingError(f"{weights_file}: missing tensor {missing[0]!r}"
                           + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return model.to(device).eval()


def _linear_params(model: nn.Module) -> int:
    arch = architecture_for(model)
    total = 0
    for layer in encoder_layers(model):
        for path in (*arch.attention_linears, arch.ffn_in, arch.ffn_out):
            linear = get_module(layer, path)
            total += linear.weight.numel() + (0 if linear.bias is None else linear.bias.numel())
    return total


def model_params(model: nn.Module) -> int:
    """The model's parameters, its mask scores (training state, not weights of the model) left out."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.endswith("mask_scores"))


def weights_bytes(model_dir: str | Path) -> int:
    """Total size of the weight files the model is read from (``model.safetensors``, or the shards its index names;
    see :func:`weight_files`) in a model directory: a ``pytorch_model.bin`` beside them, never read, and a training
    checkpoint's optimizer state are not the model's.

    Raises:
        PackingError: the directory is missing, or holds no weights that are read.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise PackingError(f"{path}: model directory not found{path_hint(path)}")
    return sum(f.stat().st_size for f in weight_files(path)[1])


def _logit_tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    items = output.items() if hasattr(output, "items") else []
    return [value for key, value in items if key.endswith("logits") and isinstance(value, torch.Tensor)]


@contextlib.contextmanager
def _full_fp32() -> Iterator[None]:
    """fp32 matrix products at full precision inside, whatever the process set (TF32 rounds them to a 10-bit
    mantissa on a GPU); the setting comes back afterwards."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def max_logit_diff(model_a: nn.Module, model_b: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between the logits of two models on ``inputs`` (float64 comparison).

    Both run with full-precision fp32 matrix products (no TF32), so the difference is the summation order alone.
    """
    with eval_mode(model_a), eval_mode(model_b), torch.inference_mode(), _full_fp32():
        out_a = _logit_tensors(model_a(**inputs))
        out_b = _logit_tensors(model_b(**inputs))
    if not out_a or len(out_a) != len(out_b):
        raise ValueError("the two models do not return the same logits")
    return max(float((a.double().cpu() - b.double().cpu()).abs().max()) if a.numel() else 0.0
               for a, b in zip(out_a, out_b))


@dataclass
class PackReport:
    """What packing removed and what it bought.

    The counts are exact. ``max_logit_diff`` (masked against packed, float64 comparison) is filled when the logits
    were compared, ``speedup`` (and the two medians it is the ratio of) when the dense shape was timed against the
    packed model; the field names are the metric names the sweep logs.
    """

    params_before: int  # all parameters of the unpacked model, mask scores excluded
    params_after: int  # all parameters of the packed model
    linear_params_before: int  # weights and biases of the encoder's attention and FFN linears
    linear_params_after: int
    linear_density: float  # nonzero fraction of the encoder's linear weights (as in the run metrics)
    heads_total: int
    heads_removed: int
    heads_removed_per_layer: list[int] = field(default_factory=list)
    heads_kept: list[list[int]] = field(default_factory=list)
    ffn_widths: list[int] = field(default_factory=list)
    ffn_dims_total: int = 0
    flop_ratio: float | None = None  # encoder matmul FLOPs, unpacked / packed: the speed-up limit
    dense_file_bytes: int | None = None
    packed_file_bytes: int | None = None
    max_logit_diff: float | None = None  # largest |masked - packed| logit on the check inputs
    logit_check_windows: int | None = None  # how many windows the logits were compared on
    speedup: float | None = None  # median latency of the dense shape / median latency of the packed model
    # How far the timed passes disagree: the larger of the two models' upper over lower quartile (1.0: steady;
    # above NOISY_SPREAD the speedup is noise, as when another process shares the machine); None under 4 passes.
    timing_spread: float | None = None
    dense_ms: float | None = None  # median latency of the dense shape, milliseconds
    packed_ms: float | None = None
    precision: str | None = None  # the resolved precision of the timing (fp32 or bf16)
    latency_shape: list[int] | None = None  # [batch_size, seq_len] of the timed input

    @property
    def param_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        out = dataclasses.asdict(self)
        out["param_ratio"] = self.param_ratio
        return out

    def metrics(self) -> dict[str, float]:
        """The measured scalars a trial reports (:data:`PACK_METRICS`), those that were measured."""
        values = {name: getattr(self, name) for name in PACK_METRICS}
        return {name: float(value) for name, value in values.items() if value is not None}


def pack_report(masked_model: nn.Module, packed_model: nn.Module, *, seq_len: int = 384,
                inputs: dict[str, torch.Tensor] | None = None, dense_dir: str | Path | None = None,
                packed_dir: str | Path | None = None) -> PackReport:
    """Compare a model with its packed version: counts, the FLOP ratio and, on request, logits and file sizes.

    Args:
        masked_model: the model given to :func:`pack` (masked, zeroed or dense).
        packed_model: what :func:`pack` returned for it.
        seq_len: sequence length of the FLOP ratio.
        inputs: when given, both models run on them and ``max_logit_diff`` is filled.
        dense_dir, packed_dir: when given, the sizes of their weight files are filled.

    Raises:
        PackingError: ``packed_model`` is not packed, or a given directory does not exist.
    """
    if not is_packed(packed_model):
        raise PackingError("pack_report: the second model is not packed (call pack() first)")
    before = sparsity_report(masked_model)
    config = packed_model.config
    report = PackReport(
        params_before=model_params(masked_model),
        params_after=model_params(packed_model),
        linear_params_before=_linear_params(masked_model),
        linear_params_after=_linear_params(packed_model),
        linear_density=before.linear_density,
        heads_total=before.heads_total,
        heads_removed=before.heads_total - sum(map(len, getattr(config, HEADS_KEPT_KEY))),
        heads_removed_per_layer=[config.num_attention_heads - len(k) for k in getattr(config, HEADS_KEPT_KEY)],
        heads_kept=[list(k) for k in getattr(config, HEADS_KEPT_KEY)],
        ffn_widths=list(getattr(config, FFN_WIDTHS_KEY)),
        ffn_dims_total=before.ffn_dims_total,
        flop_ratio=flop_ratio(masked_model, packed_model, seq_len),
    )
    if inputs is not None:
        report.max_logit_diff = max_logit_diff(masked_model, packed_model, inputs)
        report.logit_check_windows = int(next(iter(inputs.values())).shape[0])
    if dense_dir is not None:
        report.dense_file_bytes = weights_bytes(dense_dir)
    if packed_dir is not None:
        report.packed_file_bytes = weights_bytes(packed_dir)
    return report


def pack_and_verify(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None, *,
                    tolerance: float | None = LOGIT_TOLERANCE, time_latency: bool = True, batch_size: int = 1,
                    seq_len: int = 128, repeats: int = 10, warmup: int = 2,
                    precision: str = "fp32") -> tuple[nn.Module, PackReport]:
    """Pack ``model``, check that the packed model computes the same logits, and time it against the dense shape.

    The one load -> pack -> check -> time pipeline of the sweep, ``fineprune pack`` and the benchmarks. Packing
    itself is :func:`pack`; the timing is :func:`pruning.bench.compare_latency` (interleaved medians) of the dense
    shape (``model`` with its masks baked in: the original sizes, what packing is compared against) and the packed
    model, both on ``model``'s device, under ``precision``. The logit check runs without autocast.

    Args:
        model: a masked (or zeroed, or dense) model; it is not changed.
        inputs: the model inputs of the logit check (real windows, say); default: 2 random windows of up to 64
            tokens.
        tolerance: the largest logit difference accepted; None: report it, never fail.
        time_latency: time the two models (``speedup``, ``dense_ms``, ``packed_ms``); off: counts and logits only.
        batch_size, seq_len, repeats, warmup: the timed input and passes (``seq_len`` is capped at the model's
            position embeddings).
        precision: ``fp32``, ``bf16`` or ``auto``, resolved for the model's device.

    Returns:
        The packed model (eval mode, on ``model``'s device) and its :class:`PackReport`.

    Raises:
        PackingError: ``model`` is already packed, or the packed logits differ by more than ``tolerance``.
        PrecisionError: ``bf16`` on a device without bf16 support.
    """
    if is_packed(model):  # timed against itself (its own shape as the "dense" one): a speedup of about 1
        raise PackingError("the model is already packed: its speedup is measured by packing the masked model it was "
                           "packed from (pack() packs a packed model further, unchecked and untimed)")
    device = _device(model)
    precision = resolve_precision(precision, device)  # fails before any work
    limit = max_positions(model.config)
    seq_len = min(seq_len, limit)
    dense = remove_masks_(copy.deepcopy(model)).eval()
    packed = pack(dense)
    if inputs is None:
        inputs = random_inputs(model, 2, min(64, limit))
    inputs = {key: value.to(device) for key, value in inputs.items()}
    report = pack_report(model, packed, seq_len=seq_len, inputs=inputs)
    if tolerance is not None and report.max_logit_diff > tolerance:
        raise PackingError(f"packed logits differ from the masked model's by {report.max_logit_diff:.2e} "
                           f"(tolerance {tolerance:.0e})")
    if time_latency:
        timing = compare_latency(dense, packed, batch_size=batch_size, seq_len=seq_len, repeats=repeats,
                                 warmup=warmup, precision=precision)
        report.speedup = float(timing["ratio"])
        report.dense_ms = float(timing["median_a_s"]) * 1e3
        report.packed_ms = float(timing["median_b_s"]) * 1e3
        report.precision = precision
        report.latency_shape = [batch_size, seq_len]
        if repeats >= JUDGED_PASSES:
            report.timing_spread = max(spread(timing["times_a_s"]), spread(timing["times_b_s"]))
        logger.info("speedup dense/packed %.2f (%s, batch %d, seq %d, %d repeats); max |logit diff| %.2e",
                    report.speedup, precision, batch_size, seq_len, repeats, report.max_logit_diff)
        if report.timing_spread is not None and report.timing_spread > NOISY_SPREAD:
            logger.warning("speedup %.2f is noise: the timed passes disagree by up to %.1fx (upper over lower "
                           "quartile; %gx at most counts as steady), as when another process shares the machine; "
                           "time the packed model again on a quiet one (`fineprune select` times registered "
                           "versions side by side)", report.speedup, report.timing_spread, NOISY_SPREAD)
    return packed, report


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
