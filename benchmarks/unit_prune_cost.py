"""What pruning each kept unit of a structured VBD run would cost, against the KL it saves.

The structured objective is N·E[CE] + Σ ½·log(1 + 1/α) (Eq. 16–18 on per-unit
multipliers). For every unit a run keeps (log α ≤ its threshold), this measures the rise
of the summed training cross-entropy under the training noise when the unit is masked
as pruned (the same noise draws in every pass, so the difference is not noise), and
compares it with the KL term the unit pays now (its layer's prior; VBD's ½·log(1 + 1/α)):
a unit whose removal costs less than its KL is one that the objective would drop but
training has not.

    python benchmarks/unit_prune_cost.py RUN_DIR [--units K] [--out FILE.json]

``--units K`` measures only the K kept units of each layer nearest to pruning (highest
log α), one pass over the training set each.

Needs a run trained with ``--train-clip`` (a pruned unit is masked in training too).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vbdropout.nn.structured import StructuredVBD
from vbdropout.train.runs import load_run

PRUNED_LOG_SIGMA2 = 50.0  # log α far above any threshold: the unit is masked


@torch.no_grad()
def summed_cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Σ CE over (x, y) with the training noise, drawn from a fixed seed."""
    torch.manual_seed(0)
    return sum(
        F.cross_entropy(model(x[i : i + 2000]), y[i : i + 2000], reduction="sum").item()
        for i in range(0, len(x), 2000)
    )


@torch.no_grad()
def unit_costs(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, units: int | None = None
) -> dict[str, list[dict]]:
    """Per StructuredVBD layer, each kept unit's cost of pruning and its KL (nats); with
    ``units``, only that many per layer, the highest log α first."""
    model.train()
    base = summed_cross_entropy(model, x, y)
    out: dict[str, list[dict]] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, StructuredVBD):
            continue
        if not layer.train_clip:
            raise ValueError(f"layer {name} was trained without train_clip")
        log_alpha = layer.log_alpha.detach().clone()
        kls = layer.prior.kl(log_alpha)  # the layer's own KL term, per unit
        rows = []
        kept = torch.nonzero(layer.keep_mask()).flatten()
        kept = kept[log_alpha[kept].argsort(descending=True)][:units]
        for unit in kept.tolist():
            saved = layer.log_sigma2[unit].clone()
            layer.log_sigma2[unit] = PRUNED_LOG_SIGMA2
            cost = summed_cross_entropy(model, x, y) - base
            layer.log_sigma2[unit] = saved
            rows.append(
                {
                    "unit": unit,
                    "log_alpha": float(log_alpha[unit]),
                    "kl": float(kls[unit]),
                    "cost": cost,
                }
            )
        out[name] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data-dir")
    parser.add_argument("--units", type=int, help="per layer, the K kept units nearest to pruning")
    parser.add_argument("--out", help="write every unit's numbers here (JSON)")
    args = parser.parse_args()
    trained = load_run(args.run, args.data_dir)
    model, data = trained.model, trained.data
    costs = unit_costs(model, data.train_x, data.train_y, args.units)
    for name, rows in costs.items():
        cost = torch.tensor([r["cost"] for r in rows])
        kl = torch.tensor([r["kl"] for r in rows])
        cheap = int((cost < kl).sum())
        print(
            f"layer {name}: {len(rows)} kept units measured; pruning one costs {cost.min():.2f} to "
            f"{cost.max():.2f} nats (median {cost.median():.2f}); KL {kl.min():.2f} to "
            f"{kl.max():.2f}; {cheap} cost less than their KL"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"run": args.run, "layers": costs}, indent=1))


if __name__ == "__main__":
    main()
