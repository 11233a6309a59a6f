"""Structured pruning: a genuinely smaller dense Llama that vLLM runs faster.

Two transforms, both scored on calibration activations:

- MLP channel pruning (in the spirit of LLM-Pruner, with a data-driven
  criterion instead of its gradient one): channel j of a layer's MLP is the
  triple (gate row j, up row j, down column j); its importance is
  ||X_j||_2 * ||W_down[:, j]||_2, the size of what it adds to the layer's
  output on calibration tokens. The same number is kept in every layer
  (one `intermediate_size` in the config), chosen per layer. The kept
  down_proj columns are then refitted by least squares to reproduce the full
  MLP's output from the kept channels (closed form from the calibration
  Gram matrix, no gradient steps), which recovers much of the loss.
- Layer dropping (ShortGPT's block influence): layers whose output is most
  similar (cosine) to their input change the residual stream least and go.

Attention heads are left alone: with 9 query / 3 KV heads (GQA) the only
valid cut is a whole KV group, a third of the attention, too coarse for a
135M model. An optional short distillation fine-tune ("healing") follows.
"""
from __future__ import annotations

import torch
from torch import nn

from airan.factory.variants.layerwise import LayerwiseRunner, collect_input_stats, run_layerwise


def kept_channel_count(intermediate: int, keep_ratio: float, align: int) -> int:
    """Channels kept per layer, rounded to `align` (vLLM's CPU int kernels want multiples of 32)."""
    if not 0.0 < keep_ratio < 1.0:
        raise ValueError("keep_ratio must be in (0, 1)")
    n = round(intermediate * keep_ratio / align) * align
    return min(max(n, align), intermediate - align)


def channel_importance(input_norm: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    return input_norm.float() * down_weight.detach().float().norm(dim=0)


def least_squares_down(down_weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damp: float) -> torch.Tensor:
    """argmin_W' ||W X - W' X_kept||^2 (+ ridge): W' = W G[:, K] (G[K, K] + lambda I)^-1."""
    g = gram.double()
    a = g[kept][:, kept]
    a = a + damp * torch.diag(a).mean() * torch.eye(len(kept), dtype=a.dtype)
    b = down_weight.double() @ g[:, kept]
    return torch.linalg.solve(a, b.T).T.to(down_weight.dtype)


def _linear(weight: torch.Tensor) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=False, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def prune_mlp_(model: nn.Module, sequences, keep_ratio: float, *, align: int = 32, compensate: bool = True,
               damp: float = 0.01, show_progress: bool = True) -> dict:  # fmt: skip
    """Remove MLP channels from every layer of `model` in place; returns what was done."""
    if getattr(model.config, "mlp_bias", False):
        raise ValueError("MLP pruning here assumes bias-free MLPs (Llama's default)")
    inter = model.config.intermediate_size
    keep_n = kept_channel_count(inter, keep_ratio, align)
    rel_errors: list[float] = []

    def transform(i: int, layer: nn.Module, runner: LayerwiseRunner) -> None:
        mlp = layer.mlp
        stats = collect_input_stats(layer, ["mlp.down_proj"], lambda: runner.forward(layer), gram=compensate)
        s = stats["mlp.down_proj"]
        importance = channel_importance(s.norm, mlp.down_proj.weight)
        # highest importance first; stable so equal scores keep their order
        kept = torch.sort(torch.argsort(-importance, stable=True)[:keep_n]).values
        w_down = mlp.down_proj.weight.detach()
        if compensate:
            new_down = least_squares_down(w_down, s.gram, kept, damp)
            # relative output error on the calibration tokens: tr(E G E^T) / tr(W G W^T)
            full = w_down.double()
            g = s.gram.double()
            e = full.clone()
            e[:, kept] -= new_down.double()
            rel_errors.append(float(torch.trace(e @ g @ e.T) / torch.trace(full @ g @ full.T)))
        else:
            new_down = w_down[:, kept]
        mlp.gate_proj = _linear(mlp.gate_proj.weight.detach()[kept])
        mlp.up_proj = _linear(mlp.up_proj.weight.detach()[kept])
        mlp.down_proj = _linear(new_down)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep_n

    run_layerwise(model, sequences, transform, desc=f"MLP channels -> {keep_n}/{inter}", show_progress=show_progress)
    model.config.intermediate_size = keep_n
    info = {"intermediate_size": [inter, keep_n], "kept_ratio": keep_n / inter}
    if rel_errors:
        info["mean_relative_mlp_error"] = sum(rel_errors) / len(rel_errors)
    return info


def block_influence(model: nn.Module, sequences) -> list[float]:
    """Per layer: 1 - mean cosine(input, output) of the residual stream on calibration tokens."""
    runner = LayerwiseRunner(model, sequences)
    scores = []
    for layer in runner.layers:
        outs = runner.forward(layer)
        cos = torch.cat([nn.functional.cosine_similarity(h.flatten(0, 1), o.flatten(0, 1), dim=-1)
                         for h, o in zip(runner.hidden, outs)])  # fmt: skip
        scores.append(float(1.0 - cos.double().mean()))
        runner.hidden = outs
    return scores


def drop_layers_(model: nn.Module, sequences, n_drop: int) -> dict:
    """Remove the `n_drop` least influential decoder layers of `model` in place."""
    n_layers = len(model.model.layers)
    if not 0 < n_drop < n_layers:
        raise ValueError(f"n_drop must be in 1..{n_layers - 1}")
    scores = block_influence(model, sequences)
    order = sorted(range(n_layers), key=lambda i: (scores[i], i))
    dropped = sorted(order[:n_drop])
    kept = [i for i in range(n_layers) if i not in dropped]
    model.model.layers = nn.ModuleList(model.model.layers[i] for i in kept)
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx  # the KV cache is indexed by position in the stack
    model.config.num_hidden_layers = len(kept)
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n_layers:
        model.config.layer_types = [layer_types[i] for i in kept]
    return {"dropped_layers": dropped, "block_influence": [round(s, 6) for s in scores],
            "num_hidden_layers": [n_layers, len(kept)]}  # fmt: skip


def heal_(student: nn.Module, teacher: nn.Module, sequences, loss_starts, *, steps: int, lr: float,
          seed: int, show_progress: bool = True) -> dict:  # fmt: skip
    """Short distillation fine-tune of the pruned MLPs towards the parent's next-token distributions.

    One whole sequence per step (prompt + the parent's answer: cutting it short
    would drop the answers, which sit after a 388-token system prompt), loss
    from the user turn on. Only MLP weights train (embeddings, attention and
    norms stay the parent's), which keeps a CPU step affordable. Sequences are
    visited in a seeded order.
    """
    from tqdm.auto import tqdm

    if steps <= 0:
        return {"steps": 0}
    params = [p for n, p in student.named_parameters() if ".mlp." in n]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(sequences), generator=generator).tolist()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    student.train()
    try:
        for step in tqdm(range(steps), desc="healing (distillation)", unit="step", disable=not show_progress):
            k = order[step % len(order)]
            ids = torch.tensor([list(sequences[k])])
            start = min(loss_starts[k], ids.shape[1] - 1)
            with torch.no_grad():
                target = torch.log_softmax(teacher(ids).logits[0, start - 1 : -1].float(), dim=-1)
            logp = torch.log_softmax(student(ids).logits[0, start - 1 : -1].float(), dim=-1)
            loss = nn.functional.kl_div(logp, target, log_target=True, reduction="batchmean")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        student.eval()
        for p in student.parameters():
            p.requires_grad_(False)
    head = losses[: max(1, len(losses) // 5)]
    tail = losses[-max(1, len(losses) // 5) :]
    return {"steps": steps, "lr": lr, "kd_loss_first": sum(head) / len(head), "kd_loss_last": sum(tail) / len(tail)}
