"""ONNX Runtime export: a packed (or dense) QA model to ONNX, ORT's transformer fusions, optional dynamic int8.

The model is traced through :class:`_ExportGraph`, a forward pass written for export: every layer reshapes its
query, key and value with its own explicit head count (a packed model keeps a different number of heads in every
layer, and ORT's attention fusion reads the head count from that reshape; the stock module's ``-1`` would leave it
unknown), a layer without heads is folded to the bias of its attention output and a layer without FFN dimensions to
the bias of its second linear, so the graph holds no zero-sized initializer. The TorchScript exporter is used
(``dynamo=False``): the graphs of torch's newer exporter are not matched by ORT's BERT fusions (no attention gets
fused). The batch and sequence axes are dynamic.

:func:`optimize_onnx` then runs ORT's transformer optimizer (``model_type="bert"``, head count and hidden size
detected per layer), without the pass that merges equal subexpressions (it merged the query and key projections of
a layer whose query and key weights were all pruned, and so kept that layer unfused). A RoBERTa-family graph gets the
same attention, LayerNorm and GELU fusions; its embeddings stay unfused (ORT's embedding fusion computes BERT's
positions, not RoBERTa's), as traced. :func:`fused_attention_heads` reads back the head count of every fused attention
node, and :func:`export_model` checks it against the model's heads layer by layer. :func:`quantize_onnx` quantizes the
optimized graph dynamically (int8 weights, activations quantized at run time), which turns the fused attention into
``QAttention``.

An exported directory holds ``model.onnx`` (fp32, optimized), ``model_int8.onnx`` when quantized, the model's
``config.json``, its tokenizer files and ``fineprune_export.json`` (the manifest: files, opset, heads per layer,
fused heads, the logit check). :func:`load_exported` opens it as an :class:`OrtQAModel`, a module with no
parameters that runs the ONNX model through ONNX Runtime and returns ``start_logits``/``end_logits`` tensors, so
the QA functions of :mod:`pruning.squad` and :mod:`pruning.inference` (windows, span search, EM/F1) apply unchanged.

The fused embedding node computes the attention mask as a length per window: windows must be padded on the right,
as :func:`pruning.squad.prepare_eval_features` pads them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import QuestionAnsweringModelOutput

from . import masks as mask_lib
from .bench import eval_mode
from .atomic import scratch_dir, staged_dir
from .checkpoint import EXPORT_MANIFEST, load_model
from .errors import typed_error_line
from .packing import pack
from .resources import resolve_data, resolve_model
from .squad import check_windows, load_squad, questions_of
from .structure import (DEFAULT_MODEL_TYPE, architecture_for, config_class, encoder_layers, get_module, max_positions,
                        position_ids)
from .tokenizer import check_tokenizer_fits, load_tokenizer

__all__ = [
    "ExportError",
    "ExportReport",
    "OrtQAModel",
    "MANIFEST_NAME",
    "FILES",
    "VARIANTS",
    "DEFAULT_OPSET",
    "OPSETS",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "LOGIT_TOLERANCE",
    "to_onnx",
    "optimize_onnx",
    "quantize_onnx",
    "fused_attention_heads",
    "export_model",
    "export_checkpoint",
    "is_exported_dir",
    "read_manifest",
    "load_exported",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = EXPORT_MANIFEST
FILES = {"fp32": "model.onnx", "int8": "model_int8.onnx"}
VARIANTS = tuple(FILES)
DEFAULT_OPSET = 17  # LayerNormalization is one op from 17 on; the TorchScript exporter goes up to 20
OPSETS = range(14, 21)  # the opsets the TorchScript exporter takes
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = ("start_logits", "end_logits")
# An export whose fp32 logits differ more than this from PyTorch's on the check windows is refused: the graph is
# wrong, not merely summed in another order (which moves logits by about 1e-6).
LOGIT_TOLERANCE = 1e-4
_FORMAT = 1
_ATTENTION_OPS = ("Attention", "QAttention", "MultiHeadAttention")
# ORT's basic optimizations that the export leaves out: "ConstantSharing", as optimize_model does, and the common
# subexpression elimination, which merges a layer's query and key projections when their weights are equal (both
# pruned to zeros) and so keeps that layer's attention from being fused.
_DISABLED_ORT_OPTIMIZERS = ("ConstantSharing", "CommonSubexpressionElimination")


class ExportError(ValueError):
    """A model cannot be exported, or an exported directory cannot be opened; the message names the file."""


# --------------------------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------------------------

class _ExportGraph(nn.Module):
    """BERT-family question answering written for tracing: explicit head counts, empty parts folded to their biases.

    It computes what the model's transformers QA class (``BertForQuestionAnswering``, ``RobertaForQuestionAnswering``
    ...) computes in eval mode with absolute positions, with the same modules, so the exported weights are the
    model's own. Positions are those of :func:`pruning.structure.position_ids`: a BERT token's index, or, in the
    RoBERTa family, counted over the non-padding tokens from ``pad_token_id + 1``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.arch = architecture_for(model)
        config = model.config
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ExportError(f"config.json position_embedding_type: only 'absolute' can be exported, got "
                              f"{config.position_embedding_type!r}")
        self.heads: list[int] = []
        for layer in encoder_layers(model):
            attention = get_module(layer, self.arch.self_attention)
            self.heads.append(int(attention.num_attention_heads))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = get_module(self.model, self.arch.base).embeddings
        batch, seq = input_ids.shape
        if self.arch.positions_after_padding:
            positions = position_ids(self.model.config, input_ids)
        else:
            positions = embeddings.position_ids[:, :seq]  # the slice ORT's embedding fusion recognises
        x = (embeddings.word_embeddings(input_ids) + embeddings.token_type_embeddings(token_type_ids)
             + embeddings.position_embeddings(positions))
        x = embeddings.LayerNorm(x)
        project = getattr(get_module(self.model, self.arch.base), "embeddings_project", None)
        if project is not None:  # ELECTRA: embeddings narrower than the layers
            x = project(x)
        # The additive mask in the form ORT's attention fusion recognises; -10000 and the dtype minimum both give
        # padded keys a softmax weight of exactly 0 in float32.
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer, heads in zip(encoder_layers(self.model), self.heads):
            attention = get_module(layer, self.arch.self_attention)
            out = get_module(layer, self.arch.attention_output)
            if heads:
                size = attention.attention_head_size
                query = attention.query(x).view(batch, seq, heads, size).transpose(1, 2)
                key = attention.key(x).view(batch, seq, heads, size).permute(0, 2, 3, 1)
                value = attention.value(x).view(batch, seq, heads, size).transpose(1, 2)
                scores = torch.matmul(query, key) / math.sqrt(size) + mask
                context = torch.matmul(torch.softmax(scores, dim=-1), value)
                attended = out(context.transpose(1, 2).reshape(batch, seq, heads * size))
            else:
                attended = out.bias  # an empty context: the projection yields just its bias
            x = get_module(layer, self.arch.attention_norm)(attended + x)
            first, second = get_module(layer, self.arch.ffn_in), get_module(layer, self.arch.ffn_out)
            if first.out_features:
                hidden = second(get_module(layer, self.arch.ffn_activation).intermediate_act_fn(first(x)))
            else:
                hidden = second.bias
            x = get_module(layer, self.arch.ffn_norm)(hidden + x)
        logits = self.model.qa_outputs(x)
        start, end = logits.split(1, dim=-1)
        return start.squeeze(-1), end.squeeze(-1)


class _LastResort(logging.Handler):
    """What a root logger without handlers does with a record (:data:`logging.lastResort`: warnings and errors to
    stderr), as a handler: while it is there, ``logging.basicConfig`` does nothing."""

    def emit(self, record: logging.LogRecord) -> None:
        last = logging.lastResort
        if last is not None and record.levelno >= last.level:
            last.handle(record)


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """Keep ORT's python tools to warnings that matter while they run.

    Its optimizer logs every fusion at INFO and warns, for each packed layer, that the heads' width differs from
    the model's hidden size (expected: that is what packing does); the quantizer advises pre-processing. It logs
    through the root logger's module functions (``logging.warning``), which give a root logger without handlers one
    of their own (``logging.basicConfig``), so that a program's own ``basicConfig`` later would do nothing: such a
    root logger gets a stand-in for the while (:class:`_LastResort`), taken away after.
    """
    def keep(record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname or record.levelno >= logging.ERROR

    root = logging.getLogger()
    stand_in = _LastResort() if not root.handlers else None
    if stand_in is not None:
        root.addHandler(stand_in)
    targets = [root, *root.handlers]
    for target in targets:
        target.addFilter(keep)
    try:
        yield
    finally:
        for target in targets:
            target.removeFilter(keep)
        if stand_in is not None:
            root.removeHandler(stand_in)


def _as_export_model(model: nn.Module) -> nn.Module:
    """``model`` as a float32 CPU model without masks: packed when it carries masks, copied when it must move."""
    architecture_for(model)  # a clear error for an unsupported model
    if mask_lib.is_masked(model):
        logger.info("the model is masked: packing it before export")
        return pack(model).float().cpu()
    parameter = next(model.parameters())
    if parameter.dtype != torch.float32 or parameter.device.type != "cpu":
        return copy.deepcopy(model).float().cpu()
    return model


def to_onnx(model: nn.Module, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Trace a dense or packed QA model into an ONNX file with dynamic batch and sequence axes.

    Args:
        model: a BERT QA model without masks (see :func:`export_model` for masked ones).
        path: the ``.onnx`` file to write.
        opset: the ONNX opset (14 to 20).

    Raises:
        ExportError: the opset is out of range, the model cannot be traced or the graph holds a zero-sized tensor.
    """
    if not isinstance(opset, int) or opset not in OPSETS:
        raise ExportError(f"opset: must be an integer from {OPSETS[0]} to {OPSETS[-1]} (the TorchScript exporter's "
                          f"range), got {opset!r}")
    if mask_lib.is_masked(model):
        raise ExportError("to_onnx: the model is masked; pack it first (export_model does)")
    path = Path(path)
    graph = _ExportGraph(model)
    generator = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    seq = min(16, max_positions(model.config))  # the traced windows: the axes are dynamic, the positions are not
    sample = (torch.randint(0, vocab, (2, seq), generator=generator), torch.ones(2, seq, dtype=torch.long),
              torch.zeros(2, seq, dtype=torch.long))
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, *OUTPUT_NAMES)}
    # The wrapper is made in train mode: switching it (and so the model) to eval for the trace must give the model
    # back in the mode it came in, not the wrapper's.
    with warnings.catch_warnings(), torch.no_grad(), eval_mode(model):
        graph.eval()
        # The TorchScript exporter is deprecated in favour of the dynamo one, whose graphs ORT does not fuse.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(graph, sample, str(path), dynamo=False, input_names=list(INPUT_NAMES),
                              output_names=list(OUTPUT_NAMES), dynamic_axes=axes, opset_version=opset,
                              do_constant_folding=True)
        except Exception as error:  # the tracer and the exporter raise many types
            raise ExportError(f"{path}: the model cannot be exported ({typed_error_line(error)})") from error
    import onnx  # here, as in the functions below: loading and serving an export need none of these modules

    empty = [init.name for init in onnx.load(str(path), load_external_data=False).graph.initializer
             if 0 in init.dims]
    if empty:
        raise ExportError(f"{path}: the graph holds zero-sized initializers ({', '.join(empty[:3])})")
    return path


def optimize_onnx(src: str | Path, dst: str | Path) -> list[int]:
    """ORT's transformer optimizer (BERT fusions, head counts detected per layer) from ``src`` into ``dst``.

    It runs what ``optimize_model(model_type="bert")`` runs by default, ORT's basic graph optimizations and then the
    Python fusions, except ORT's common subexpression elimination (:data:`_DISABLED_ORT_OPTIMIZERS`). A pruned layer
    can keep heads (their values and outputs) whose query and key weights were all pruned: its query and key
    projections are then the same zeros, that pass merges them into one, and the attention fusion, which looks for
    three projections of the layer's input, leaves the layer unfused (a smoke sweep's champion with one head a layer
    had attention fused in one layer of two).

    Returns:
        The head count of every fused attention node, in graph order (see :func:`fused_attention_heads`).
    """
    from onnxruntime.transformers.optimizer import optimize_by_onnxruntime, optimize_model

    with _quiet_onnxruntime(), scratch_dir("optimize") as tmp:
        basic = optimize_by_onnxruntime(str(src), optimized_model_path=str(Path(tmp) / "basic.onnx"), opt_level=1,
                                        disabled_optimizers=list(_DISABLED_ORT_OPTIMIZERS))
        optimized = optimize_model(basic, model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
        optimized.save_model_to_file(str(dst))
    return fused_attention_heads(dst)


def quantize_onnx(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantization of an optimized graph: int8 weights, uint8 activations quantized at run time.

    Weights are quantized per output channel: a pruned and mask-tuned model has rows of very different scales, and
    one scale per matrix cost a pruned MiniLM 1.27 F1 on 500 dev questions where per-channel scales cost none
    (bench/RESULTS.md, serving speed).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_onnxruntime():
        # The fused nodes are not in the standard domain, so ONNX shape inference leaves some tensor types open;
        # those are float32 here.
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return Path(dst)


def fused_attention_heads(path: str | Path) -> list[int]:
    """``num_heads`` of each (Q)Attention node of an ONNX file, in the graph's (topological) order."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    heads = []
    for node in graph.node:
        if node.op_type in _ATTENTION_OPS:
            values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            heads.append(int(values.get("num_heads", 0)))
    return heads


# --------------------------------------------------------------------------------------------------------------
# Running an exported model
# --------------------------------------------------------------------------------------------------------------

class OrtQAModel(nn.Module):
    """An exported QA model run by ONNX Runtime on the CPU, called like a transformers QA model.

    It has no parameters (so :func:`pruning.squad.compute_logits` runs it on the CPU) and ``eval``/``train`` change
    nothing. ``config`` is the exported model's config.
    """

    def __init__(self, path: str | Path, config: PretrainedConfig, variant: str = "fp32",
                 threads: int | None = None, spin: bool = True) -> None:
        """
        Args:
            path: the ``.onnx`` file.
            config: the model's config (its positions bound the windows).
            variant: ``fp32`` or ``int8``, for reports.
            threads: ORT intra-op threads; default: torch's current count.
            spin: let ORT's worker threads busy-wait for the next operator. That is ORT's default and the fastest
                for a process that runs one model; where several models (or PyTorch) share the cores, as in an
                interleaved benchmark, idle spinning threads steal the cores from the model that runs (a pruned
                MiniLM measured 2.4x slower at 384 tokens), so turn it off there.

        Raises:
            ExportError: the file is missing or not a loadable ONNX model.
        """
        super().__init__()
        self.path = Path(path)
        self.config = config
        self.variant = variant
        if not self.path.is_file():
            raise ExportError(f"{self.path}: ONNX file not found")
        import onnxruntime as ort  # here: a command that reads a PyTorch model loads none of ONNX Runtime

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.spin = spin
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # ORT raises its own types (InvalidProtobuf, Fail, ...) for a bad file
            raise ExportError(f"{self.path}: corrupted or not an ONNX model ({typed_error_line(error)})") from None
        # A graph keeps only the inputs it reads: a model without any head has no use for the attention mask.
        self.inputs = [i.name for i in self.session.get_inputs()]
        if "input_ids" not in self.inputs or not set(self.inputs) <= set(INPUT_NAMES):
            raise ExportError(f"{self.path}: model inputs {sorted(self.inputs)} are not {list(INPUT_NAMES)} "
                              "(or those of them the graph reads)")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **_: Any) -> QuestionAnsweringModelOutput:
        ids = input_ids.detach().cpu().numpy().astype(np.int64, copy=False)
        feeds = {
            "input_ids": ids,
            "attention_mask": (np.ones_like(ids) if attention_mask is None
                               else attention_mask.detach().cpu().numpy().astype(np.int64, copy=False)),
            "token_type_ids": (np.zeros_like(ids) if token_type_ids is None
                               else token_type_ids.detach().cpu().numpy().astype(np.int64, copy=False)),
        }
        start, end = self.session.run(list(OUTPUT_NAMES), {name: feeds[name] for name in self.inputs})
        return QuestionAnsweringModelOutput(start_logits=torch.from_numpy(start), end_logits=torch.from_numpy(end))

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, variant={self.variant!r}, spin={self.spin}"


def is_exported_dir(model_dir: str | Path) -> bool:
    """True when ``model_dir`` holds an export manifest."""
    return (Path(model_dir) / MANIFEST_NAME).is_file()


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The manifest of an exported directory, checked for the keys :func:`load_exported` needs.

    Raises:
        ExportError: the manifest is missing, not JSON, or lacks ``files``/``default``.
    """
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(f"{path}: not found (not an exported model directory)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"{path}: not valid JSON ({typed_error_line(error)})") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{path}: expected a JSON object")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or any(k not in FILES or not isinstance(v, str)
                                                       for k, v in files.items()):
        raise ExportError(f"{path}: 'files' must map variants ({', '.join(VARIANTS)}) to file names")
    if manifest.get("default") not in files:
        raise ExportError(f"{path}: 'default' must name one of the files ({', '.join(files)})")
    return manifest


def load_exported(model_dir: str | Path, variant: str | None = None, threads: int | None = None,
                  spin: bool = True) -> OrtQAModel:
    """Open an exported directory as an :class:`OrtQAModel`.

    Args:
        model_dir: a directory written by :func:`export_checkpoint`.
        variant: ``fp32`` or ``int8``; default: the manifest's (int8 when the export was quantized).
        threads: ORT intra-op threads; default: torch's current count.
        spin: see :class:`OrtQAModel` (off where other models share the cores, as when timing several).

    Raises:
        ExportError: the manifest, config or ONNX file is missing or corrupted, or the variant was not exported.
    """
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    chosen = variant or manifest["default"]
    if chosen not in manifest["files"]:
        raise ExportError(f"{model_dir / MANIFEST_NAME}: no {chosen!r} model in this export "
                          f"(exported: {', '.join(manifest['files'])})")
    config_file = model_dir / "config.json"
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        config = config_class(raw.get("model_type", DEFAULT_MODEL_TYPE)).from_dict(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, ValueError) as error:
        raise ExportError(f"{config_file}: missing or not a supported model config "
                          f"({typed_error_line(error)})") from None
    return OrtQAModel(model_dir / manifest["files"][chosen], config, variant=chosen, threads=threads, spin=spin)


# --------------------------------------------------------------------------------------------------------------
# Exporting
# --------------------------------------------------------------------------------------------------------------

@dataclass
class ExportReport:
    """What an export wrote and how close it is to the PyTorch model."""

    opset: int
    files: dict[str, str]
    default: str
    heads_per_layer: list[int]
    ffn_widths: list[int]
    fused_attention_heads: list[int]  # num_heads of each fused attention node, in layer order
    attention_fused: bool  # every layer with heads got a fused attention node with its own head count
    packed_on_export: bool = False  # the model carried masks and was packed first
    logit_check_windows: int = 0
    max_logit_diff: dict[str, float] = field(default_factory=dict)  # variant -> max |ORT - PyTorch|

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _structure(model: nn.Module) -> tuple[list[int], list[int]]:
    arch = architecture_for(model)
    heads, widths = [], []
    for layer in encoder_layers(model):
        heads.append(int(get_module(layer, arch.self_attention).num_attention_heads))
        widths.append(int(get_module(layer, arch.ffn_in).out_features))
    return heads, widths


def _logit_diff(model: nn.Module, exported: OrtQAModel, inputs: dict[str, torch.Tensor]) -> float:
    """Largest |difference| of start and end logits over the real (unpadded) tokens of ``inputs``."""
    with torch.inference_mode(), eval_mode(model):
        expected = model(**inputs)
        got = exported(**inputs)
    real = inputs["attention_mask"].bool()
    diffs = [float((a.double() - b.double()).abs()[real].max()) if real.any() else 0.0
             for a, b in ((expected.start_logits, got.start_logits), (expected.end_logits, got.end_logits))]
    return max(diffs)


def export_model(model: nn.Module, out_dir: str | Path, quantize: str | None = None, opset: int = DEFAULT_OPSET,
                 inputs: dict[str, torch.Tensor] | None = None) -> ExportReport:
    """Export a QA model to ``out_dir/model.onnx`` (optimized fp32) and, on request, ``model_int8.onnx``.

    Args:
        model: a dense or packed BERT QA model; a masked one is packed first.
        out_dir: an existing directory; the ONNX files are written into it (the raw export goes to a temporary
            directory).
        quantize: None or ``"int8"``.
        opset: the ONNX opset.
        inputs: windows (``input_ids``, ``attention_mask``, ``token_type_ids``) to compare the logits of every
            exported file with the PyTorch model's on; the fp32 file must agree within :data:`LOGIT_TOLERANCE`.

    Returns:
        The :class:`ExportReport` (the manifest's content).

    Raises:
        ExportError: bad ``quantize``/``opset``, a graph that cannot be exported, a fused attention node whose head
            count is not its layer's, or fp32 logits off by more than :data:`LOGIT_TOLERANCE`.
    """
    if quantize not in (None, "int8"):
        raise ExportError(f"quantize: only 'int8' is supported, got {quantize!r}")
    out_dir = Path(out_dir)
    packed_on_export = mask_lib.is_masked(model)
    model = _as_export_model(model)
    heads, widths = _structure(model)
    files = {"fp32": FILES["fp32"]}
    with scratch_dir("export") as tmp:
        raw = to_onnx(model, Path(tmp) / "raw.onnx", opset)
        fused = optimize_onnx(raw, out_dir / files["fp32"])
    expected = [h for h in heads if h]
    if len(fused) == len(expected) and fused != expected:
        raise ExportError(f"{out_dir / files['fp32']}: attention fused with heads {fused}, the layers have "
                          f"{expected}")
    attention_fused = fused == expected
    if not attention_fused:
        logger.warning("attention fused in %d of %d layers with heads (%s vs %s): the model is correct but slower",
                       len(fused), len(expected), fused, expected)
    if quantize == "int8":
        files["int8"] = FILES["int8"]
        quantize_onnx(out_dir / files["fp32"], out_dir / files["int8"])
    report = ExportReport(opset=opset, files=files, default="int8" if quantize else "fp32", heads_per_layer=heads,
                          ffn_widths=widths, fused_attention_heads=fused, attention_fused=attention_fused,
                          packed_on_export=packed_on_export)
    if inputs is not None:
        report.logit_check_windows = int(inputs["input_ids"].shape[0])
        for variant, name in files.items():
            exported = OrtQAModel(out_dir / name, model.config, variant=variant)
            report.max_logit_diff[variant] = _logit_diff(model, exported, inputs)
        if report.max_logit_diff["fp32"] > LOGIT_TOLERANCE:
            raise ExportError(f"{out_dir / files['fp32']}: logits differ from PyTorch's by "
                              f"{report.max_logit_diff['fp32']:.2e} (tolerance {LOGIT_TOLERANCE:.0e})")
    logger.info("exported: heads %s, fused %s, files %s, logit diff %s", heads, fused, list(files.values()),
                report.max_logit_diff)
    return report


def export_checkpoint(model_dir: str | Path, out_dir: str | Path, quantize: str | None = None,
                      opset: int = DEFAULT_OPSET, data: str = "dev", questions: int = 16,
                      overwrite: bool = False) -> dict[str, Any]:
    """``fineprune export``: a model directory to an exported directory, checked on real questions.

    The model (dense, packed, or masked: then packed first) is exported, optimized and optionally quantized; its
    config and tokenizer are copied; the logits of every exported file are compared with PyTorch's on the windows
    of the first ``questions`` questions of ``data`` (at most 384 tokens, the model's limit). The directory appears
    complete or not at all.

    Returns:
        The :class:`ExportReport` as a dict, with ``out_dir`` and ``source`` added.

    Raises:
        ExportError: ``out_dir`` is not empty (without ``overwrite``), or the export fails (see :func:`export_model`).
        CheckpointError, PackingError: the model directory is missing or corrupted.
    """
    if not isinstance(model_dir, (str, os.PathLike)):  # a model object: "File name too long" of its repr
        raise TypeError(f"model_dir must be a model directory's path (export_model() exports a model object), got "
                        f"{type(model_dir).__name__}")
    if quantize not in (None, "int8"):  # before any work, as questions below (a message naming `limit` otherwise)
        raise ExportError(f"quantize: only 'int8' is supported, got {quantize!r}")
    if isinstance(questions, bool) or not isinstance(questions, int) or questions < 1:
        raise ExportError(f"questions: must be a positive integer (questions whose logits are checked), got "
                          f"{questions!r}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise ExportError(f"{out}: exists and is not an empty directory (pass overwrite=True to replace it)")
    source = resolve_model(str(model_dir))
    if is_exported_dir(source):
        raise ExportError(f"{source / MANIFEST_NAME}: the model is already exported")
    model = load_model(source, qa_head=True)
    packed_on_export = mask_lib.is_masked(model)
    if packed_on_export:
        logger.info("%s holds a masked model: packing it before export", source)
        model = pack(model)
    tokenizer = load_tokenizer(source)
    check_tokenizer_fits(source, model.config, tokenizer)
    data = resolve_data(data)
    with questions_of(data):
        inputs = check_windows(load_squad(data, limit=questions, spans=False), tokenizer, max_positions(model.config))
    with staged_dir(out) as tmp:  # an earlier export there is replaced only by a complete one
        report = export_model(model, tmp, quantize=quantize, opset=opset, inputs=inputs)
        report.packed_on_export = packed_on_export
        model.config.to_json_file(str(tmp / "config.json"))
        tokenizer.save_pretrained(str(tmp))
        manifest = {"format": _FORMAT, "source": str(source), **report.to_dict()}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    result = report.to_dict()
    result.update(out_dir=str(out), source=str(source))
    return result
