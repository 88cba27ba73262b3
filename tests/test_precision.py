"""bf16 autocast where the hardware has bf16 matrix units, fp32 elsewhere; never a silent emulation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from pruning import masks, precision
from pruning.checkpoint import load_model, save_model
from pruning.packing import pack, save_packed
from pruning.config import ConfigError, RunConfig
from pruning.precision import PrecisionError, autocast, cpu_supports_bf16, resolve_precision
from pruning.trainer import train
from workflows.cli import main as cli_main

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128)
needs_cpu_bf16 = pytest.mark.skipif(not cpu_supports_bf16(),
                                    reason="this CPU has no bf16 matrix instructions (avx512_bf16 or AMX)")


def test_auto_resolves_to_what_the_cpu_supports():
    assert resolve_precision("auto", "cpu", cpu_check=lambda: True) == "bf16"
    assert resolve_precision("auto", "cpu", cpu_check=lambda: False) == "fp32"
    assert resolve_precision("auto", "cpu") in ("fp32", "bf16")
    assert resolve_precision("fp32", "cpu", cpu_check=lambda: True) == "fp32"
    assert resolve_precision("bf16", "cpu", cpu_check=lambda: True) == "bf16"


def test_bf16_on_a_cpu_without_it_is_a_one_line_error():
    with pytest.raises(PrecisionError) as err:
        resolve_precision("bf16", "cpu", cpu_check=lambda: False)
    message = str(err.value)
    assert "\n" not in message and message.startswith("precision: bf16")
    assert "fp32 or auto" in message
    assert isinstance(err.value, ConfigError)  # the CLI turns it into exit status 2
    with pytest.raises(PrecisionError, match="precision: unknown value 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_config_accepts_auto_and_rejects_other_values():
    assert RunConfig(precision="auto").precision == "auto"
    with pytest.raises(ConfigError, match="precision: unknown value 'fp16'"):
        RunConfig(precision="fp16")


def test_cli_refuses_bf16_on_a_cpu_without_it(monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)  # a CPU without bf16 matrix instructions
    code = cli_main(["ask", "minilm", "--question", "Who?", "--context", "Nobody.", "--precision", "bf16"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "precision: bf16 asked for, but this CPU has no bf16 matrix instructions" in err
    assert len(err.splitlines()) == 1


@needs_cpu_bf16
@pytest.mark.parametrize("method", ["topk", "sigmoid_threshold"])
def test_a_tiny_model_trains_and_evaluates_in_cpu_bf16_with_fp32_masks(tmp_path, method):
    seen: list[dict] = []
    cfg = RunConfig(model_config=TINY, train_data="dev", eval_data="dev", train_limit=16, eval_limit=6,
                    max_seq_length=96, doc_stride=32, batch_size=8, max_steps=6, learning_rate=1e-3,
                    output_dir=str(tmp_path / "run"), log_every=100, eval_batch_size=32, method=method,
                    initial_warmup=1, final_warmup=1, device="cpu", precision="bf16", eval_every=3)
    metrics = train(cfg, report=lambda m, _: seen.append(m), progress=False)
    assert len(seen) == 2
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in seen)
    assert 0 <= metrics["f1"] <= 100
    model = load_model(metrics["model_dir"])
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32, name
    for _, module in masks.masked_modules(model):
        assert module.block_mask().dtype == torch.float32


@needs_cpu_bf16
def test_masks_and_score_gradients_stay_fp32_under_cpu_autocast():
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=100, **TINY))
    masks.apply_masks_(model, "sigmoid_threshold", (16, 16))
    ids = torch.randint(0, 100, (2, 12))
    with autocast("bf16", "cpu"):
        out = model(input_ids=ids)
        assert out.start_logits.dtype == torch.bfloat16  # the matrix work really ran in bf16
        loss = out.start_logits.float().sum() + masks.regularization_loss(model, 1.0, 1.0)
    loss.backward()
    for _, module in masks.masked_modules(model):
        assert module.mask_scores.dtype == torch.float32 and module.mask_scores.grad.dtype == torch.float32
        assert module.block_mask().dtype == torch.float32


def _linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("masked", [False, True])
def test_bf16_inference_answers_as_autocast_does_with_the_weights_cast_once(masked):
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=200, **TINY)).eval()
    if masked:  # a masked linear rebuilds its weight every call: it stays fp32 and is cast by autocast as before
        masks.apply_masks_(model, "topk", attention_block=(16, 16))
    inputs = dict(input_ids=torch.randint(0, 200, (2, 24)), attention_mask=torch.ones(2, 24, dtype=torch.long))
    with torch.inference_mode(), autocast("bf16", "cpu"):
        expected = model(**inputs)
    served = precision.Bf16Inference(copy.deepcopy(model))
    plain = [m for m in _linears(served) if type(m) is torch.nn.Linear]
    assert plain and all(m.weight.dtype == torch.bfloat16 for m in plain)
    assert all(m.weight.dtype == torch.float32 for m in _linears(served) if type(m) is not torch.nn.Linear)
    assert len(plain) < len(_linears(served)) if masked else len(plain) == len(_linears(served))
    assert all(p.dtype == torch.float32 for n, p in served.named_parameters() if "LayerNorm" in n or "embeddings" in n)
    with torch.inference_mode():
        got = served(**inputs)
    assert torch.equal(got.start_logits, expected.start_logits)
    assert torch.equal(got.end_logits, expected.end_logits)
    assert served.config is model.config or served.config.to_dict() == model.config.to_dict()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_saved_in_half_precision_opens_and_trains_in_fp32(tmp_path, tokenizer, dtype):
    # A checkpoint written from a half-precision model records its dtype in config.json; transformers would open
    # it in that dtype, and the student, its mask scores and their optimizer would then train in half precision
    # whatever `precision` says (AdamW updates below a bf16 weight's rounding step are lost).
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), **TINY)
    half_dir = tmp_path / "half"
    BertForQuestionAnswering(config).to(dtype).save_pretrained(half_dir)
    tokenizer.save_pretrained(half_dir)
    dense = load_model(half_dir)
    assert {p.dtype for p in dense.parameters()} == {torch.float32}

    from pruning.trainer import build_model

    student, _ = build_model(RunConfig(model=str(half_dir), method="topk", attention_block=(16, 16)))
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert all(s.dtype == torch.float32 for s in masks.mask_score_parameters(student))

    # A masked and a packed checkpoint of a half-precision model open in float32 too.
    half = student.to(dtype)
    masks.set_threshold(half, 0.5)
    save_model(half, None, tmp_path / "masked")
    save_packed(pack(half), None, tmp_path / "packed")
    for directory in ("masked", "packed"):
        assert {p.dtype for p in load_model(tmp_path / directory).parameters()} == {torch.float32}, directory


@pytest.mark.parametrize("capability,expected",
                         [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_takes_bf16_only_on_a_gpu_with_bf16_tensor_cores(monkeypatch, capability, expected):
    # torch.cuda.is_bf16_supported() says yes on a V100 or T4 too, where bf16 is emulated and runs slower than fp32.
    # Two GPUs: the one asked for decides, not the current one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda index=None: capability if index == 1 else (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    assert resolve_precision("auto", "cuda:1") == expected
    assert resolve_precision("auto", "cuda:0") == "bf16"
    if expected == "fp32":
        with pytest.raises(PrecisionError, match=r"bf16 asked for, but device cuda:1 has no bf16 tensor cores"):
            resolve_precision("bf16", "cuda:1")


def test_optimizer_moments_kept_in_half_precision_resume_on_float32_parameters():
    # A checkpoint of a run that trained a half-precision model holds bf16 moments; the model now opens in fp32,
    # and the fused AdamW step refused the mix ("expected scalar type Float but found BFloat16").
    from pruning.checkpoint import optimizer_tensors, restore_optimizer

    torch.manual_seed(0)
    half = torch.nn.Linear(8, 4).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(half.parameters(), fused=True)
    for param in half.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    tensors = optimizer_tensors(optimizer)
    assert tensors["state.0.exp_avg"].dtype == torch.bfloat16

    model = torch.nn.Linear(8, 4)
    resumed = torch.optim.AdamW(model.parameters(), fused=True)
    restore_optimizer(resumed, tensors)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    resumed.step()
    assert all(state["exp_avg"].dtype == torch.float32 for state in resumed.state.values())
