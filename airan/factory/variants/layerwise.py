"""Calibration passes through a Llama decoder one layer at a time.

Wanda, GPTQ, SmoothQuant and MLP-channel pruning all need statistics of the
inputs each linear layer sees. They are collected layer by layer
("sequentially"): layer i is measured on the outputs of layers 0..i-1 *after*
those were transformed, so each layer's change accounts for the errors the
earlier changes made, and only one layer's activations are held at a time.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

LINEAR_NAMES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip
# linears that read the same tensor as another: their input statistics are shared
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}  # fmt: skip


class InputStats:
    """Running statistics of a linear layer's input channels over calibration tokens."""

    def __init__(self, in_features: int, *, gram: bool = False, absmax: bool = False) -> None:
        self.tokens = 0
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64)
        self.absmax = torch.zeros(in_features, dtype=torch.float32) if absmax else None
        # X^T X in float64: GPTQ and least-squares compensation solve with it
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64) if gram else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.sq_sum += (x.double() ** 2).sum(0)
        if self.absmax is not None:
            self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        if self.gram is not None:
            # float32 GEMM per sequence (a few hundred tokens), float64 across them
            self.gram += (x.T @ x).double()

    @property
    def norm(self) -> torch.Tensor:
        """||X_j||_2 per input channel (Wanda's activation term)."""
        return self.sq_sum.sqrt().float()


def submodule(layer: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        layer = getattr(layer, part)
    return layer


def collect_input_stats(layer: nn.Module, names: Iterable[str], run: Callable[[], object], *,
                        gram: bool = False, absmax: bool = False) -> dict[str, InputStats]:  # fmt: skip
    """Hook the named linears of `layer`, call `run()` (a calibration pass), return their stats.

    Linears reading the same input (q/k/v, gate/up) get one shared `InputStats` object.
    """
    stats: dict[str, InputStats] = {}
    handles = []
    names = list(names)
    for name in sorted(names, key=lambda n: n in SHARED_INPUT):  # representatives first
        rep = SHARED_INPUT.get(name, name)
        if rep in stats:
            stats[name] = stats[rep]
            continue
        module = submodule(layer, rep)
        stats[name] = stats[rep] = s = InputStats(module.in_features, gram=gram, absmax=absmax)
        handles.append(module.register_forward_pre_hook(lambda _m, args, s=s: s.add(args[0])))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {name: stats[name] for name in names}


class LayerwiseRunner:
    """Holds the calibration hidden states entering the current decoder layer.

    Sequences are run one at a time at their own length (no padding, so no
    attention mask: SDPA's causal flag is exact).
    """

    def __init__(self, model: nn.Module, sequences: Iterable[Iterable[int]]) -> None:
        body = model.model
        self.model = model
        self.layers = body.layers
        with torch.no_grad():
            self.hidden: list[torch.Tensor] = []
            self.position_ids: list[torch.Tensor] = []
            self.rope: list[tuple[torch.Tensor, torch.Tensor]] = []
            for ids in sequences:
                ids_t = torch.tensor([list(ids)], dtype=torch.long)
                h = body.embed_tokens(ids_t)
                pos = torch.arange(ids_t.shape[1]).unsqueeze(0)
                self.hidden.append(h)
                self.position_ids.append(pos)
                self.rope.append(body.rotary_emb(h, pos))

    def forward(self, layer: nn.Module) -> list[torch.Tensor]:
        """`layer` applied to every held sequence (hooks on it see each one)."""
        outs = []
        with torch.no_grad():
            for h, pos, rope in zip(self.hidden, self.position_ids, self.rope):
                out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=rope)
                outs.append(out[0] if isinstance(out, tuple) else out)
        return outs

    def advance(self, layer: nn.Module) -> None:
        """Move the held states through `layer` (after it was transformed)."""
        self.hidden = self.forward(layer)


def run_layerwise(model: nn.Module, sequences, transform: Callable[[int, nn.Module, LayerwiseRunner], None],
                  *, desc: str, show_progress: bool = True) -> None:  # fmt: skip
    """For each decoder layer: `transform(i, layer, runner)`, then feed its new outputs on."""
    from tqdm.auto import tqdm

    runner = LayerwiseRunner(model, sequences)
    for i, layer in enumerate(tqdm(list(runner.layers), desc=desc, unit="layer", disable=not show_progress)):
        transform(i, layer, runner)
        runner.advance(layer)
