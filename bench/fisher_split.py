"""How the fisher search splits a density budget between heads and FFN dimensions, checked by measurement.

The search (:func:`pruning.importance.search_mask`) keeps, for every possible number of heads, the most important
heads and fills the rest of the budget with the most important neurons, and picks the split with the largest summed
Fisher importance. This bench forces other head counts at the same budget, prunes each split in one shot (mask tuning
included, no training) and scores it on the accuracy protocol's dev questions, next to the search's own choice.

One Fisher pass (the ``fisher`` row's calibration windows) serves every split. Each line is one JSON object; the last
line is ``fisher_split best_heads = K search_heads = S``.

Usage:
    python bench/fisher_split.py --teacher runs/dense_minilm/final --density 0.5 --heads 40 46 60 66
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy_budget  # noqa: E402  (the protocol's row config)
from script_input import InputError, one_line_errors  # noqa: E402

from pruning import importance, squad  # noqa: E402
from pruning.resources import resolve_data  # noqa: E402
from pruning.trainer import build_model, evaluate, train_features  # noqa: E402

def split_masks(est: importance.Importance, costs: importance.StructureCosts, budget: int,
                heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``heads`` most important heads, and as many of the most important neurons as the rest of ``budget`` pays."""
    neurons = min(est.neurons.numel(), (budget - heads * costs.head) // costs.neuron)
    if neurons < 0:
        raise ValueError(f"{heads} heads cost more than the budget")
    head_keep = torch.zeros(est.heads.numel(), dtype=torch.bool)
    head_keep[torch.argsort(-est.heads.flatten(), stable=True)[:heads]] = True
    neuron_keep = torch.zeros(est.neurons.numel(), dtype=torch.bool)
    neuron_keep[torch.argsort(-est.neurons.flatten(), stable=True)[:neurons]] = True
    return head_keep.view_as(est.heads), neuron_keep.view_as(est.neurons)


@one_line_errors("fisher_split")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="dense QA model directory (the protocol's teacher)")
    parser.add_argument("--density", type=float, default=0.5, help="linear density budget, in (0, 1]")
    parser.add_argument("--heads", type=int, nargs="+", required=True, help="head counts to force")
    parser.add_argument("--mask-tuning", choices=tuple(importance.TUNING_DAMPING), default="scales",
                        help="the tuning after each cut (default scales: what the recovery recipe uses, and what the "
                             "recorded table measured)")
    args = parser.parse_args(argv)
    if min(args.heads) < 0:
        parser.error(f"--heads: head counts must be >= 0, got {min(args.heads)}")
    if not 0 < args.density <= 1:  # else refused as the target_density of a row config the user never wrote
        raise InputError(f"--density {args.density:g}: a linear density must be in (0, 1]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    bench_args = accuracy_budget.parse_args(["--teacher", args.teacher])
    cfg = accuracy_budget.row_config("fisher", args.density, args.teacher, Path("runs") / "fisher_split", bench_args)
    model, tokenizer = build_model(cfg)
    model.eval()
    costs = importance.structure_costs(model.config, "density")
    budget = int(math.floor(args.density * costs.total + 1e-6))
    heads_in_model = model.config.num_hidden_layers * model.config.num_attention_heads
    for heads in args.heads:  # before the Fisher pass
        if heads > heads_in_model:
            raise InputError(f"--heads {heads}: the --teacher model has {heads_in_model} heads")
        if heads * costs.head > budget:
            raise InputError(f"--heads {heads}: that many heads cost more than the --density {args.density:g} "
                             f"budget, which pays for at most {budget // costs.head}")
    features = train_features(cfg, squad.load_squad(resolve_data(cfg.train_data), limit=cfg.train_limit), tokenizer)
    dev = squad.load_squad(resolve_data(cfg.eval_data), limit=cfg.eval_limit)
    index, tuning_index = importance.calibration_and_tuning_index(
        int(features["input_ids"].shape[0]), cfg.calibration_samples, cfg.mask_tuning_samples, cfg.seed)
    # The student is the teacher before the cut: labels sampled from its own distribution, as in the fisher row.
    est = importance.fisher_importance(model, features, index, cfg.batch_size, labels="sampled", seed=cfg.seed)
    search_heads = int(importance.search_mask(est.heads, est.neurons, costs, budget)[0].sum())

    results = {}
    for heads in dict.fromkeys([search_heads, *args.heads]):
        head_keep, neuron_keep = split_masks(est, costs, budget, heads)
        pruned, dense = copy.deepcopy(model), model
        with torch.no_grad():
            importance.zero_removed_(pruned, head_keep, neuron_keep)
        importance.tune_masks_(pruned, dense, features, tuning_index, head_keep, neuron_keep,
                               cfg.batch_size, mode=args.mask_tuning, damping=cfg.mask_tuning_damping)
        importance.apply_structure_(pruned, head_keep, neuron_keep)
        f1 = evaluate(pruned, tokenizer, dev, cfg, progress=False)["f1"]
        kept = est.heads[head_keep].sum() + est.neurons[neuron_keep].sum()
        results[heads] = f1
        print(json.dumps({"heads": heads, "search": heads == search_heads, "neurons": int(neuron_keep.sum()),
                          "heads_per_layer": head_keep.sum(1).tolist(), "ffn_widths": neuron_keep.sum(1).tolist(),
                          "fisher_kept": round(float(kept), 2), "f1": round(f1, 2)}), flush=True)
    best = max(results, key=results.get)
    print(f"fisher_split best_heads = {best} search_heads = {search_heads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
