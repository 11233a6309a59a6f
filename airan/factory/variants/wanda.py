"""Unstructured pruning with Wanda (Sun et al., 2023): the quality reference for pruning.

Each weight is scored |W_ij| * ||X_j||_2 (its magnitude times the norm of the
input channel it multiplies, measured on calibration data) and, in every
output row, the lowest-scoring half is set to zero. The model is saved dense,
zeros included: vLLM has no sparse CPU kernel, so this variant is exactly as
big and as fast as its parent. It shows how much quality 50% sparsity costs
without retraining, against which structured pruning (which does get
faster) is judged.
"""
from __future__ import annotations

import torch
from torch import nn

from airan.factory.variants.layerwise import LINEAR_NAMES, collect_input_stats, run_layerwise, submodule


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask: per output row, exactly round(in * (1 - sparsity)) weights survive."""
    cols = weight.shape[1]
    n_prune = round(cols * sparsity)
    score = weight.detach().float().abs() * input_norm.float()[None, :]
    # stable sort: ties (e.g. dead input channels) are broken by position, so runs repeat exactly
    order = torch.argsort(score, dim=1, stable=True)
    keep = torch.ones_like(weight, dtype=torch.bool)
    keep.scatter_(1, order[:, :n_prune], False)
    return keep


def wanda_prune_(model: nn.Module, sequences, sparsity: float = 0.5, show_progress: bool = True) -> dict:
    """Prune every decoder linear of `model` in place; returns sparsity facts."""
    if not 0.0 < sparsity < 1.0:
        raise ValueError("sparsity must be in (0, 1)")
    pruned = total = 0

    def transform(i: int, layer: nn.Module, runner) -> None:
        nonlocal pruned, total
        stats = collect_input_stats(layer, LINEAR_NAMES, lambda: runner.forward(layer))
        for name in LINEAR_NAMES:
            linear = submodule(layer, name)
            keep = wanda_mask(linear.weight, stats[name].norm, sparsity)
            with torch.no_grad():
                linear.weight.mul_(keep)
            pruned += int((~keep).sum())
            total += keep.numel()

    run_layerwise(model, sequences, transform, desc=f"Wanda {sparsity:.0%}", show_progress=show_progress)
    return {"pruned_weights": pruned, "prunable_weights": total, "sparsity": pruned / total}
