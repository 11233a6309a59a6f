"""The `lora` method: train a PEFT LoRA adapter on the NetOps diagnoses (`netops_data`).

Why only the top layers carry the adapter: the prompts are 1,400-1,850
tokens, and a CPU forward of one costs seconds. With LoRA on the top
`top_layers` layers only, the frozen layers below compute the same hidden
states for every step, so each item goes through them once (cached) and the
training steps run the top layers alone. vLLM serves the result as an
ordinary PEFT adapter: the layers below simply have no LoRA weights.

`airan model build smollm2-netops-lora` runs it like every recipe (see
`build.build_variant`); `--export airan/store/adapters` copies the adapter
where the repo keeps it. `airan eval adapter` scores base vs adapter through
the real gRPC path.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from airan.core.prompting import PROMPT_VERSION, PromptRenderer, build_messages
from airan.evaluation.queries import server_query
from airan.factory.buildonce import Steps, sha256_file
from airan.factory.variants.hf import load_frozen
from airan.factory.variants.netops_data import TRAIN_SET_SEED, Example, build_example, data_sha256, training_split
from airan.factory.variants.recipes import Recipe
from airan.store.registry import describe

FORMAT = "peft-lora/safetensors"


@dataclass(frozen=True)
class TrainSettings:
    """A LoRA build's settings: the recipe's parameters (recipes.py holds the values), its seed and
    item counts."""

    train_items: int
    heldout_items: int
    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    top_layers: int  # LoRA on the top layers only; the frozen ones below run once per item
    epochs: int
    accum: int  # items per optimizer step
    lr: float
    warmup_steps: int
    # the cause is 2-5 of ~90 target tokens but the whole point: its tokens weigh this much more
    cause_weight: float
    seed: int

    @classmethod
    def of(cls, recipe: Recipe, seed: int, train_items: int, heldout_items: int) -> TrainSettings:
        """The recipe's parameters with the build's seed and item counts."""
        params = {k: tuple(v) if k == "target_modules" else v for k, v in recipe.params.items()}
        return cls(train_items=train_items, heldout_items=heldout_items, seed=seed, **params)

    @property
    def steps(self) -> int:
        return math.ceil(self.train_items / self.accum) * self.epochs


def request_extras(parent: Path) -> dict:
    """What a LoRA build depends on beyond the common request: the parent's config and the prompt."""
    return {"parent_config_sha256": sha256_file(parent / "config.json"), "prompt_version": PROMPT_VERSION}


# --- model pieces ---------------------------------------------------------------------


def _threads() -> int:
    # OpenMP threads that spin-wait on a box others load too run several times slower than one;
    # with the passive wait policy (set before torch loads OpenMP, see train_adapter) every core helps
    cores = len(os.sched_getaffinity(0))
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        return cores
    return cores if os.getloadavg()[0] < cores - 0.5 else 1


def _load_parent(path: Path):
    import torch

    return load_frozen(path, torch.bfloat16)


def _rope(model, hidden):
    import torch

    positions = torch.arange(hidden.shape[1])[None]
    return model.model.rotary_emb(hidden, positions)


def _run_layers(layers, hidden, rope):
    for layer in layers:
        out = layer(hidden, position_embeddings=rope, attention_mask=None)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def bottom_states(model, ex: Example, n_bottom: int):
    """Hidden states entering layer `n_bottom` (frozen below it, so computed once per item)."""
    import torch

    with torch.no_grad():
        hidden = model.model.embed_tokens(torch.tensor([ex.input_ids]))
        return _run_layers(model.model.layers[:n_bottom], hidden, _rope(model, hidden))[0].contiguous()


def target_nll(model, ex: Example, cached, n_bottom: int, cause_weight: float = 1.0):
    """NLL of the target tokens (mean; the cause's tokens weighted `cause_weight`), from the cached
    states through the top layers; and which target tokens the model would predict right."""
    import torch

    hidden = cached[None]
    hidden = _run_layers(model.model.layers[n_bottom:], hidden, _rope(model, hidden))
    # logits only where a target token is predicted: the 49k-word head is costly over 1.8k positions
    where = slice(ex.n_prompt - 1, len(ex.input_ids) - 1)
    logits = model.lm_head(model.model.norm(hidden[0, where])).float()
    targets = torch.tensor(ex.input_ids[ex.n_prompt :])
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    weights = torch.ones_like(nll)
    weights[list(ex.cause_tokens)] = cause_weight
    return (nll * weights).sum() / weights.sum(), logits.argmax(-1).eq(targets)


def cause_right(ex: Example, hits) -> bool:
    """Teacher-forced: every token of the cause predicted (the constrained decoder's choice, near enough)."""
    return bool(hits[list(ex.cause_tokens)].all())


def _lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --- the build ------------------------------------------------------------------------


def train_adapter(work: Path, recipe: Recipe, s: TrainSettings, parent: Path, parent_name: str,
                  threads: int | None = None, show_progress: bool = True) -> dict:  # fmt: skip
    """Train the adapter into `work` (PEFT files); return the manifest's facts."""
    if "torch" not in sys.modules:  # OpenMP reads it once, when torch loads it
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    started = time.perf_counter()
    steps = Steps(recipe.name, total=4, enabled=show_progress)
    threads = threads or _threads()
    torch.set_num_threads(threads)
    torch.manual_seed(s.seed)

    with steps("training and held-out items, rendered as the server renders them"):
        train_items, heldout_items = training_split(s.train_items, s.heldout_items, s.seed)
        renderer = PromptRenderer(parent)
        system_prompt = build_messages(server_query(train_items[0]))[0]["content"] if train_items else ""
        train = [build_example(renderer, i) for i in train_items]
        heldout = [build_example(renderer, i) for i in heldout_items]
    steps.say(f"      {len(train)} training + {len(heldout)} held-out items "
              f"({sum(len(e.input_ids) for e in train + heldout)} tokens), {threads} thread(s)")  # fmt: skip

    model = _load_parent(parent)
    parent_parameters = sum(p.numel() for p in model.parameters())
    n_layers = model.config.num_hidden_layers
    if not 1 <= s.top_layers <= n_layers:
        raise ValueError(f"top_layers must be within 1..{n_layers}")
    n_bottom = n_layers - s.top_layers

    with steps(f"frozen layers 0-{n_bottom - 1}, once per item"):
        cache = [bottom_states(model, ex, n_bottom)
                 for ex in tqdm(train + heldout, unit="item", disable=not show_progress, leave=False)]  # fmt: skip
    train_cache, heldout_cache = cache[: len(train)], cache[len(train) :]

    config = LoraConfig(
        r=s.rank, lora_alpha=s.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=list(s.target_modules), layers_to_transform=list(range(n_bottom, n_layers)),
        layers_pattern="layers",
    )  # fmt: skip
    torch.manual_seed(s.seed)  # LoRA A's initialisation
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]

    def heldout_scores(adapter: bool) -> tuple[float, float]:
        """(mean target NLL, teacher-forced cause accuracy) on the held-out items."""
        total = count = right = 0.0
        with torch.no_grad():
            for ex, c in zip(heldout, heldout_cache):
                if adapter:
                    nll, hits = target_nll(model, ex, c, n_bottom)
                else:
                    with peft_model.disable_adapter():
                        nll, hits = target_nll(model, ex, c, n_bottom)
                n = len(ex.input_ids) - ex.n_prompt
                total, count, right = total + nll.item() * n, count + n, right + cause_right(ex, hits)
        return (total / count, right / len(heldout)) if heldout else (float("nan"), float("nan"))

    parent_nll, parent_cause = heldout_scores(adapter=False)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(s.seed)
    history: list[dict] = []
    with steps(f"training LoRA r={s.rank}: {s.steps} steps"):
        peft_model.train()
        bar = tqdm(total=s.steps, unit="step", disable=not show_progress, leave=False)
        step = 0
        for epoch in range(s.epochs):
            order = torch.randperm(len(train), generator=generator).tolist()
            for start in range(0, len(order), s.accum):
                batch = order[start : start + s.accum]
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, s)
                losses, hits, causes = [], [], []
                for k in batch:
                    loss, hit = target_nll(model, train[k], train_cache[k], n_bottom, s.cause_weight)
                    (loss / len(batch)).backward()
                    losses.append(loss.item())
                    hits.append(hit.float().mean().item())
                    causes.append(cause_right(train[k], hit))
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                history.append({"step": step, "epoch": epoch, "loss": sum(losses) / len(losses),
                                "token_acc": sum(hits) / len(hits), "cause_acc": sum(causes) / len(causes)})  # fmt: skip
                step += 1
                bar.update(1)
                recent = history[-20:]
                bar.set_postfix(loss=f"{history[-1]['loss']:.3f}",
                                cause_acc_20=f"{sum(h['cause_acc'] for h in recent) / len(recent):.2f}")  # fmt: skip
        bar.close()
        peft_model.eval()
    adapter_nll, adapter_cause = heldout_scores(adapter=True)

    with steps("writing the PEFT adapter (bfloat16)"):
        peft_model.save_pretrained(str(work))
        # trained in float32, stored in the parent's bfloat16 (what vLLM computes in): half the bytes
        weights_file = str(work / "adapter_model.safetensors")
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights_file).items()},
                  weights_file, metadata={"format": "pt"})  # fmt: skip
        cfg_path = work / "adapter_config.json"
        adapter_config = json.loads(cfg_path.read_text())
        adapter_config["base_model_name_or_path"] = parent_name  # not this machine's cache path
        cfg_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        (work / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub
    tail = history[-max(1, len(history) // 10) :]
    return {
        "name": recipe.name,
        "method": recipe.method,
        "summary": recipe.summary,
        "parameters_recipe": dict(recipe.params),
        "parent": parent_name,
        "parent_path": str(parent),
        "format": FORMAT,
        "dtype": "bfloat16",
        "rank": s.rank,
        "lora_alpha": s.alpha,
        "target_modules": list(s.target_modules),
        "layers": list(range(n_bottom, n_layers)),
        "parameters": sum(p.numel() for p in params),
        "parent_parameters": parent_parameters,
        "weight_bytes": describe(work)["weight_bytes"],
        "adapter_bytes": (work / "adapter_model.safetensors").stat().st_size,
        "seed": s.seed,
        "prompt_version": PROMPT_VERSION,
        # the adapter learnt this prompt: a changed system prompt means retraining
        "system_prompt_sha256": hashlib.sha256(system_prompt.encode()).hexdigest(),
        "data": {
            "source": "airan.evaluation.dataset.build_dataset",
            "train_set_seed": TRAIN_SET_SEED + s.seed,
            "train_items": len(train),
            "train_item_seeds": [train_items[0].seed, train_items[-1].seed] if train_items else [],
            "heldout_items": len(heldout),
            "labels": sorted({e.label for e in train}),
            "tokens": sum(len(e.input_ids) for e in train),
            "target_tokens": sum(len(e.input_ids) - e.n_prompt for e in train),
            "sha256": data_sha256(train + heldout),
        },
        "training": {**dataclasses.asdict(s), "steps": s.steps, "optimizer": "AdamW",
                     "schedule": "warmup+cosine to 10%",
                     "final_loss": round(sum(h["loss"] for h in tail) / len(tail), 4),
                     "final_token_acc": round(sum(h["token_acc"] for h in tail) / len(tail), 4),
                     "final_cause_acc": round(sum(h["cause_acc"] for h in tail) / len(tail), 4),
                     "loss_every_10": [round(h["loss"], 4) for h in history[::10]], "threads": threads},
        "heldout": {"target_nll": {"parent": round(parent_nll, 4), "adapter": round(adapter_nll, 4)},
                    "cause_accuracy_teacher_forced": {"parent": round(parent_cause, 4),
                                                      "adapter": round(adapter_cause, 4)},
                    "perplexity": {"parent": round(math.exp(parent_nll), 4),
                                   "variant": round(math.exp(adapter_nll), 4)}},
        "build_seconds": round(time.perf_counter() - started, 1),
        "step_seconds": steps.seconds,
        "versions": _versions(),
    }  # fmt: skip


def _versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
