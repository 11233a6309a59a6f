"""The registry of variant recipes: what `airan model build NAME` makes from which parent."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

Method = Literal["w8a8", "w4a16", "prune-mlp", "drop-layers", "wanda", "merge-lora", "lora"]

FORMATS = {
    "w8a8": "compressed-tensors/int-quantized",
    "w4a16": "compressed-tensors/pack-quantized",
    "prune-mlp": "safetensors",
    "drop-layers": "safetensors",
    "wanda": "safetensors",
    "merge-lora": "safetensors",
    "lora": "peft-lora/safetensors",  # an adapter served on top of its parent, not a model
}


@dataclass(frozen=True)
class Recipe:
    name: str
    method: Method
    params: Mapping[str, object] = field(default_factory=dict)
    # "smollm2" = the prepared SmolLM2-135M-Instruct, or another recipe's name (built first),
    # or a model directory (tests)
    parent: str = "smollm2"
    summary: str = ""
    # 16 simulator prompts + answers (~9.6k SmolLM2 tokens): every variant builds within the
    # ~30 min budget on a shared 2-core box; the layer passes cost ~0.25 s per 1k tokens per layer.
    # A trained method (lora) trains on `calib_items` items.
    calib_items: int = 16
    heldout_items: int = 16  # for the perplexity check (a trained method: the DEV items that pick its checkpoint)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    @property
    def format(self) -> str:
        return FORMATS[self.method]

    @property
    def is_adapter(self) -> bool:
        """The build is a LoRA adapter (served beside its parent), not a model directory."""
        return self.method == "lora"

    def with_params(self, **updates) -> Recipe:
        return replace(self, params={**self.params, **updates})


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "smollm2-w8a8",
            "w8a8",
            {"smooth_alpha": 0.5, "damp": 0.01},
            summary="int8 weights (per channel, GPTQ) and int8 dynamic per-token activations, "
            "SmoothQuant 0.5; vLLM's oneDNN int8 GEMMs",
        ),
        Recipe(
            "smollm2-w4a16",
            "w4a16",
            # 64, not 128: the hidden size 576 is not a multiple of 128
            {"group_size": 64, "damp": 0.01},
            summary="int4 weights (groups of 64, GPTQ), bf16 activations; vLLM's CPU W4A16 kernel",
        ),
        Recipe(
            "smollm2-mlp50",
            "prune-mlp",
            {"keep_ratio": 0.5, "align": 32, "compensate": True, "damp": 0.01, "heal_steps": 32, "heal_lr": 5e-5},
            summary="half of every layer's MLP channels removed by calibration importance, "
            "down_proj refitted by least squares, short distillation heal",
        ),
        Recipe(
            "smollm2-drop10",
            "drop-layers",
            {"n_drop": 10, "heal_steps": 32, "heal_lr": 5e-5},
            summary="the 10 of 30 decoder layers with the least block influence on calibration data removed, "
            "short distillation heal: fewer steps per token is what speeds vLLM's single stream",
        ),
        Recipe(
            "smollm2-wanda50",
            "wanda",
            {"sparsity": 0.5},
            summary="Wanda 50% unstructured (dense with zeros): the pruning quality reference, not faster",
        ),
        Recipe(
            "smollm2-netops-lora",
            "lora",
            # Sized for about an hour on the shared 2-core box. Measured on SmolLM2 (2 threads, bf16, LoRA
            # r=16 on all 7 projections of layers 18-29, ~270-token served prompts; timing probe and a
            # 48-item build of this recipe, 2026-11-30): frozen layers 0-17 0.22 s per item once (0.012
            # s/layer), training 0.45 s per item-epoch (batch 8), a DEV answer under the grammar 0.44 s
            # (load 2.1-2.3 from others). 2000 items x 2 epochs = 1,790 s, caching 2,140 items 460 s,
            # parent + 4 DEV checks of 140 items 305 s, data 25 s: ~43 min. At load 2.9 the same rates were
            # 0.28 / 0.69 / 0.70 s (~65 min); at load 4.7 0.51 / 1.63 / ~0.8 s (~2.3 h): build when CI idles.
            # 500 steps of 8 items; lr with warmup then cosine to 10%; the best DEV checkpoint is kept.
            {"rank": 16, "alpha": 32, "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
             "up_proj", "down_proj"), "top_layers": 12, "epochs": 2, "accum": 8, "lr": 5e-4, "warmup_steps": 25,
             "checkpoints": 4, "near_rt_share": 0.4, "qa_per_passage": 2, "qa_train_items": 480, "qa_dev_items": 20},
            summary="LoRA r=16 on the top 12 of 30 layers, trained on the served compact diagnosis prompt "
            "(evidence, the detector's answer) of simulator cases (TRAIN seeds the detector never saw; "
            "40% near-RT brief answers) and on free-text questions answered from retrieved knowledge "
            "passages (or declined when they do not cover it); the checkpoint kept is the best on DEV QA "
            "among those near the best DEV macro-F1",
            # 1200 diagnosis items (not 2000) leave room for 480 QA pairs of ~430-token prompts in ~45 min:
            # measured 2026-11-30 (2 threads, idle box) 0.72 s per QA item-epoch, 0.30 s to cache one,
            # a 48-token greedy QA DEV answer ~3.4 s; diagnosis rates as above. The build of 2026-11-30 took
            # 56.5 min under other helpers' load (caching 745 s, 420 steps 1,936 s, 5 DEV checks 451 s + 201 s).
            calib_items=1200,
            heldout_items=140,
        ),
        Recipe(
            "smollm2-netops-merged",
            "merge-lora",
            # the committed copy (airan/store/adapters/), or a PEFT adapter directory
            {"adapter": "smollm2-netops-lora"},
            # an adapter trained for an older prompt still merges, with a warning; the manifest records its version
            summary="the NetOps LoRA adapter merged into the base weights: the adapter's answers at the "
            "base's speed (vLLM's CPU LoRA path is several times slower)",
        ),
        Recipe(
            "smollm2-netops-w4a16",
            "w4a16",
            {"group_size": 64, "damp": 0.01},
            parent="smollm2-netops-merged",
            summary="int4 weights (GPTQ) of the LoRA-merged model: domain-adapted at under half the base's weights",
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown variant '{name}'; known: {', '.join(RECIPES)}") from None
