"""smollm2-netops-lora: a LoRA adapter that teaches SmolLM2-135M-Instruct the simulator's diagnoses.

Data: labelled items from the evaluation harness's builder (`build_dataset`)
at a TRAIN set seed whose item seeds can never meet its DEV or TEST ones
(checked). Input: exactly the diagnosis-mode prompt the gateway renders for
the request the harness sends (AskRequest -> Query -> PromptRenderer with the
parent's chat template and the server's token budget). Target: the gold
diagnosis as compact JSON in the schema's key order - what xgrammar lets the
model write - then <|im_end|>; the loss is on those tokens only.

Why only the top layers carry the adapter: the prompts are 1,400-1,850
tokens, and a CPU forward of one costs seconds. With LoRA on the top
`top_layers` layers only, the frozen layers below compute the same hidden
states for every step, so each item goes through them once (cached) and the
training steps run the top layers alone. vLLM serves the result as an
ordinary PEFT adapter: the layers below simply have no LoRA weights.

`airan model build smollm2-netops-lora` trains it into
`cache_dir()/models/smollm2-netops-lora/` (PEFT files + manifest.json);
`--export airan/store/adapters` also copies it where the repo keeps it.
`python -m airan.factory.variants.lora_netops eval --split test` scores base
vs adapter through the real gRPC path.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

NAME = "smollm2-netops-lora"
PARENT = "smollm2-135m-instruct"  # the parent's model name in configs
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# the committed copy (so CI and sites need not retrain)
PACKAGED_DIR = Path(__file__).resolve().parents[2] / "store" / "adapters" / NAME
# item seeds are set_seed * SEEDS_PER_SET + i: any set seed other than DEV/TEST is disjoint
TRAIN_SET_SEED = 11
RANK = 16
ALPHA = 32
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the server's prompt budget: the parent's context (eval stack and default config) minus the answer budget
MAX_MODEL_LEN = 2048


@dataclass(frozen=True)
class TrainSettings:
    train_items: int = 112
    heldout_items: int = 14
    top_layers: int = 4
    epochs: int = 8
    accum: int = 4  # items per optimizer step
    lr: float = 1e-3
    warmup_steps: int = 10
    # the cause is 2-5 of ~90 target tokens but the whole point: its tokens weigh this much more
    cause_weight: float = 20.0
    seed: int = 0

    @property
    def steps(self) -> int:
        return math.ceil(self.train_items / self.accum) * self.epochs


# --- the gold answer ------------------------------------------------------------------

# a fixed mapping from cause: the adapter learns one consistent policy, which the rules can check
SEVERITY_BY_CAUSE = {
    "NORMAL": "LOW",
    "CELL_OUTAGE": "CRITICAL",
    "INTERFERENCE": "MEDIUM",
    "CONGESTION": "MEDIUM",
    "HO_FAILURE_STORM": "HIGH",
    "CELL_SLEEP": "LOW",
    "FLASH_CROWD": "MEDIUM",
}
# (action type, parameter value); cell-targeted actions act on the affected cell
ACTIONS_BY_CAUSE: dict[str, list[tuple[str, int | None]]] = {
    "NORMAL": [("NO_ACTION", None)],
    "CELL_OUTAGE": [("ESCALATE", None)],
    "INTERFERENCE": [("RAISE_TX_POWER", 2)],
    "CONGESTION": [("OFFLOAD_TRAFFIC", 20)],
    "HO_FAILURE_STORM": [("ADJUST_HO_OFFSET", 2)],
    "CELL_SLEEP": [("NO_ACTION", None)],
    "FLASH_CROWD": [("OFFLOAD_TRAFFIC", 30)],
}
# the KPI of the affected cell whose move the rationale cites
KEY_KPI = {
    "CELL_OUTAGE": "RRC.ConnMean",
    "INTERFERENCE": "L1M.SS-SINR",
    "CONGESTION": "RRU.PrbTotDl",
    "HO_FAILURE_STORM": "MM.HoExeInterFail",
    "CELL_SLEEP": "PEE.AvgPower",
    "FLASH_CROWD": "RRC.ConnMean",
}
CONFIDENCE_PCT = 80


def server_query(item, max_tokens: int = 0):
    """The `Query` the gateway builds from the harness's request for `item` (proto round trip included)."""
    from airan.serving.api.convert import query_from_proto
    from airan.config import LimitsConfig
    from airan.evaluation.runner import ask_request
    from airan.core.query import validate_query

    query = query_from_proto(ask_request(item, diagnosis=True, max_tokens=max_tokens), time.monotonic(), None)
    return validate_query(query, LimitsConfig(), (), time.monotonic())


def _rationale(label: str, cell: str, query) -> str:
    if label == "NORMAL":
        return f"no KPI of {cell} moved by more than 25%"
    name = KEY_KPI[label]
    points = sorted((k.time_s or 0.0, k.value, k.unit) for k in query.kpis if k.cell_id == cell and k.name == name)
    latest = max((k.time_s or 0.0) for k in query.kpis if k.cell_id == cell)
    if not points:
        return f"{name} not reported on {cell}"
    (t0, a, unit), (t1, b, _) = points[0], points[-1]
    unit = f" {unit}" if unit else ""
    if t1 < latest:  # the cell stopped reporting it (no UE left to report it)
        return f"{name} {a:.4g}{unit} -> not reported on {cell}"
    return f"{name} {a:.4g} -> {b:.4g}{unit} on {cell}"


def target_json(item, query=None) -> str:
    """The gold diagnosis as the constrained decoder writes it: schema key order, no whitespace."""
    from airan.core.diagnosis import ACTIONS, RATIONALE_CHARS

    query = query or server_query(item)
    cell = item.focus_cell
    actions = []
    for kind, value in ACTIONS_BY_CAUSE[item.label]:
        action: dict = {"type": kind}
        param = ACTIONS[kind]
        if param is not None:
            pname, _, lo, hi, needs_cell = param
            if needs_cell:
                action["target_cell"] = cell
            action[pname] = max(lo, min(hi, int(value)))
        actions.append(action)
    answer = {
        "cause": item.label,
        "affected_cells": list(item.affected_cells),
        "severity": SEVERITY_BY_CAUSE[item.label],
        "actions": actions,
        "confidence_pct": CONFIDENCE_PCT,
        "rationale": _rationale(item.label, cell, query)[:RATIONALE_CHARS],
    }
    return json.dumps(answer, separators=(",", ":"), ensure_ascii=False)


# --- training items -------------------------------------------------------------------


def assert_disjoint_from_eval(items) -> None:
    """No training item may share a seed (= a simulated scenario) with the harness's DEV or TEST sets."""
    from airan.evaluation.dataset import DEV_SEED, SEEDS_PER_SET, TEST_SEED

    for set_seed, split in ((DEV_SEED, "DEV"), (TEST_SEED, "TEST")):
        lo, hi = set_seed * SEEDS_PER_SET, (set_seed + 1) * SEEDS_PER_SET
        clash = [i.seed for i in items if lo <= i.seed < hi]
        if clash:
            raise AssertionError(f"{len(clash)} training item(s) use {split} seeds, e.g. {clash[0]}")


def training_split(n_train: int, n_heldout: int, seed: int = 0):
    """(train, held-out) items from the TRAIN set seed; held-out items follow the training ones."""
    from airan.evaluation.dataset import DEV_SEED, TEST_SEED, build_dataset

    set_seed = TRAIN_SET_SEED + seed
    if set_seed in (DEV_SEED, TEST_SEED):  # never: TRAIN_SET_SEED > both, seed >= 0
        raise ValueError(f"training set seed {set_seed} is a DEV/TEST seed")
    items = build_dataset(n_train + n_heldout, set_seed, "train")
    assert_disjoint_from_eval(items)
    return items[:n_train], items[n_train:]


@dataclass(frozen=True)
class Example:
    item_id: str
    label: str
    input_ids: tuple[int, ...]  # prompt + target
    n_prompt: int
    target: str
    cause_tokens: tuple[int, ...] = ()  # indices into the target tokens that spell the cause

    @property
    def labels(self) -> list[int]:
        """Next-token labels in the HF convention: -100 (no loss) on every prompt token."""
        return [-100] * self.n_prompt + list(self.input_ids[self.n_prompt :])


def build_example(renderer, item) -> Example:
    """Prompt ids exactly as the server renders them, then the target's ids and the end of the turn."""
    from airan.core.diagnosis import DIAGNOSIS_MAX_TOKENS

    query = server_query(item)
    prompt = renderer.render(query, budget_tokens=MAX_MODEL_LEN - (query.max_tokens or DIAGNOSIS_MAX_TOKENS))
    tok = renderer.tokenizer
    target = target_json(item, query)
    enc = tok(target, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"]) + [tok.convert_tokens_to_ids("<|im_end|>")]
    start = target.index('"cause":"') + len('"cause":"')
    end = start + len(item.label)
    cause = tuple(k for k, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start)
    return Example(item.item_id, item.label, tuple(prompt.token_ids) + tuple(ids), len(prompt.token_ids), target, cause)


def data_sha256(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(ex.item_id.encode())
        digest.update(json.dumps(ex.input_ids).encode())
        digest.update(str(ex.n_prompt).encode())
    return digest.hexdigest()


# --- model pieces ---------------------------------------------------------------------


def _threads() -> int:
    # OpenMP threads that spin-wait on a box others load too run several times slower than one;
    # with the passive wait policy (set before torch loads OpenMP, see build_adapter) every core helps
    cores = len(os.sched_getaffinity(0))
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        return cores
    return cores if os.getloadavg()[0] < cores - 0.5 else 1


def _load_parent(path: Path):
    import torch

    from airan.factory.variants.build import load_frozen

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


def adapter_dir(models_dir: Path | None = None) -> Path:
    from airan.config import cache_dir

    return (models_dir or cache_dir() / "models") / NAME


def load_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(manifest, dict) and manifest.get("manifest_version") == MANIFEST_VERSION
    weights = path / "adapter_model.safetensors"
    return manifest if ok and weights.is_file() and weights.stat().st_size == manifest.get("adapter_bytes") else None


def build_adapter(
    settings: TrainSettings = TrainSettings(),
    *,
    models_dir: Path | None = None,
    parent_dir: Path | None = None,
    force: bool = False,
    show_progress: bool = True,
) -> Path:
    """Train (or reuse) the adapter into the model cache; return its directory."""
    import fcntl
    import sys

    if "torch" not in sys.modules:  # OpenMP reads it once, when torch loads it
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from airan.factory.smollm2 import prepare_smollm2

    parent = Path(parent_dir) if parent_dir else prepare_smollm2(show_progress=show_progress)
    final = adapter_dir(models_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    request = {"settings": settings.__dict__, "parent_config_sha256": _file_sha(parent / "config.json"),
               "parent_weights_sha256": _weights_sha(parent)}  # fmt: skip

    def reusable() -> bool:
        manifest = load_manifest(final)
        return not force and manifest is not None and manifest.get("request") == request

    if reusable():
        return final
    with open(final.parent / f".{NAME}.lock", "w") as lock:  # one build at a time; a waiter reuses it
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if reusable():
                return final
            return _build_locked(settings, request, parent, final, show_progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights_sha(parent: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(parent.glob("*.safetensors")):
        with open(file, "rb") as f:
            while chunk := f.read(4 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _say(show: bool, text: str) -> None:
    if show:
        from rich.console import Console

        Console(stderr=True, highlight=False).print(f"[bold]{NAME}[/bold] {text}")


def _build_locked(s: TrainSettings, request: dict, parent: Path, final: Path, show: bool) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    from airan.core.prompting import PROMPT_VERSION, PromptRenderer, build_messages

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    threads = _threads()
    torch.set_num_threads(threads)
    torch.manual_seed(s.seed)

    t = time.perf_counter()
    train_items, heldout_items = training_split(s.train_items, s.heldout_items, s.seed)
    renderer = PromptRenderer(parent)
    system_prompt = build_messages(server_query(train_items[0]))[0]["content"] if train_items else ""
    train = [build_example(renderer, i) for i in train_items]
    heldout = [build_example(renderer, i) for i in heldout_items]
    seconds["data"] = round(time.perf_counter() - t, 1)
    _say(show, f"{len(train)} training + {len(heldout)} held-out items "
               f"({sum(len(e.input_ids) for e in train + heldout)} tokens), {threads} thread(s)")  # fmt: skip

    model = _load_parent(parent)
    n_layers = model.config.num_hidden_layers
    if not 1 <= s.top_layers <= n_layers:
        raise ValueError(f"top_layers must be within 1..{n_layers}")
    n_bottom = n_layers - s.top_layers

    t = time.perf_counter()
    cache = [bottom_states(model, ex, n_bottom)
             for ex in tqdm(train + heldout, desc=f"frozen layers 0-{n_bottom - 1}", unit="item", disable=not show)]  # fmt: skip
    seconds["frozen_pass"] = round(time.perf_counter() - t, 1)
    train_cache, heldout_cache = cache[: len(train)], cache[len(train) :]

    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=list(TARGET_MODULES), layers_to_transform=list(range(n_bottom, n_layers)),
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
    t = time.perf_counter()
    peft_model.train()
    bar = tqdm(total=s.steps, desc="training LoRA", unit="step", disable=not show)
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
    seconds["training"] = round(time.perf_counter() - t, 1)
    adapter_nll, adapter_cause = heldout_scores(adapter=True)

    work = Path(tempfile.mkdtemp(prefix=f".tmp-{NAME}-", dir=final.parent))
    try:
        peft_model.save_pretrained(str(work))
        # trained in float32, stored in the parent's bfloat16 (what vLLM computes in): half the bytes
        from safetensors.torch import load_file, save_file

        weights_file = str(work / "adapter_model.safetensors")
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights_file).items()},
                  weights_file, metadata={"format": "pt"})  # fmt: skip
        cfg_path = work / "adapter_config.json"
        adapter_config = json.loads(cfg_path.read_text())
        adapter_config["base_model_name_or_path"] = PARENT  # not this machine's cache path
        cfg_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        (work / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub
        tail = history[-max(1, len(history) // 10) :]
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "name": NAME,
            "method": "lora",
            "parent": PARENT,
            "parent_path": str(parent),
            "format": "peft-lora/safetensors",
            "dtype": "bfloat16",
            "rank": RANK,
            "lora_alpha": ALPHA,
            "target_modules": list(TARGET_MODULES),
            "layers": list(range(n_bottom, n_layers)),
            "parameters": sum(p.numel() for p in params),
            "adapter_bytes": (work / "adapter_model.safetensors").stat().st_size,
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
            "training": {**s.__dict__, "steps": s.steps, "optimizer": "AdamW", "schedule": "warmup+cosine to 10%",
                         "final_loss": round(sum(h["loss"] for h in tail) / len(tail), 4),
                         "final_token_acc": round(sum(h["token_acc"] for h in tail) / len(tail), 4),
                         "final_cause_acc": round(sum(h["cause_acc"] for h in tail) / len(tail), 4),
                         "loss_every_10": [round(h["loss"], 4) for h in history[::10]], "threads": threads},
            "heldout": {"target_nll": {"parent": round(parent_nll, 4), "adapter": round(adapter_nll, 4)},
                        "cause_accuracy_teacher_forced": {"parent": round(parent_cause, 4),
                                                          "adapter": round(adapter_cause, 4)},
                        "perplexity": {"parent": round(math.exp(parent_nll), 4),
                                       "variant": round(math.exp(adapter_nll), 4)}},
            "request": request,
            "rebuild_command": f"airan model build {NAME} --seed {s.seed} --export airan/store/adapters",
            "build_seconds": round(time.perf_counter() - started, 1),
            "step_seconds": seconds,
            "versions": _versions(),
        }  # fmt: skip
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        from airan.factory.variants.build import publish_dir

        publish_dir(work, final)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return final


def _versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def export(src: Path, dest_root: Path) -> Path:
    """Copy a built adapter (weights, config, manifest) to DEST_ROOT/<name>/ (the repo keeps one there)."""
    dest = Path(dest_root) / NAME
    dest.mkdir(parents=True, exist_ok=True)
    for file in ("adapter_config.json", "adapter_model.safetensors", MANIFEST):
        shutil.copyfile(Path(src) / file, dest / file)
    return dest


def build_cli(seed: int = 0, train_items: int | None = None, force: bool = False, export_to: Path | None = None) -> Path:
    """`airan model build smollm2-netops-lora`: train (or reuse), print a summary, optionally export."""
    settings = TrainSettings(seed=seed, **({"train_items": train_items} if train_items else {}))
    path = build_adapter(settings, force=force)
    m = json.loads((path / MANIFEST).read_text())
    ppl = m["heldout"]["perplexity"]
    print(
        f"{NAME}: {path}\n"
        f"  LoRA r={m['rank']} on {', '.join(m['target_modules'])} of layers {m['layers'][0]}-{m['layers'][-1]}, "
        f"{m['parameters'] / 1e3:.0f}K parameters, {m['adapter_bytes'] / 1e6:.1f} MB; "
        f"{m['data']['train_items']} items x {m['training']['epochs']} epochs = {m['training']['steps']} steps, "
        f"final loss {m['training']['final_loss']:.3f}; held-out target perplexity {ppl['variant']:.2f} "
        f"(parent {ppl['parent']:.2f}), cause accuracy {m['heldout']['cause_accuracy_teacher_forced']['adapter']:.2f} "
        f"(parent {m['heldout']['cause_accuracy_teacher_forced']['parent']:.2f}); built in {m['build_seconds']:.0f} s"
    )
    if export_to is not None:
        print(f"  exported to {export(path, export_to)}")
    return path



# --- evaluation through the real gRPC path --------------------------------------------


def stack_config(adapter_path: Path | None = None, n_sites: int = 1, holders: int = 1, port: int = 0,
                 kv_cache_gb: float = 1.0, max_num_seqs: int = 8):  # fmt: skip
    """SmolLM2 on `n_sites` sites (one replica each, the cores split among them); the first
    `holders` replicas also hold the adapter, so one replica serves base and adapter requests."""
    from airan.config import parse_config

    cores = len(os.sched_getaffinity(0))
    sites = [{"id": f"bs-{k + 1:02d}", "cpus": max(1, cores // n_sites), "memory_gb": 8} for k in range(n_sites)]
    return parse_config({
        "sites": sites,
        "models": [
            {"name": PARENT, "source": "smollm2", "dtype": "bfloat16", "max_model_len": MAX_MODEL_LEN},
            {"name": NAME, "source": "local", "path": str(adapter_path or PACKAGED_DIR), "method": "lora",
             "parent": PARENT},
        ],
        "replicas": [{"site": site["id"], "model": PARENT, **({"adapters": [NAME]} if k < holders else {})}
                     for k, site in enumerate(sites)],
        "engine": {"kv_cache_gb": kv_cache_gb, "max_num_seqs": max_num_seqs, "max_lora_rank": RANK},
        "server": {"host": "127.0.0.1", "port": port, "grace_s": 1, "default_model": PARENT},
    })  # fmt: skip


async def compare_on(address: str, items, *, concurrency: int = 4, timeout_s: float = 600.0, progress=None):
    """(base report, adapter report, their predictions) in DIAGNOSIS mode, one model after the other."""
    from dataclasses import replace as dc_replace

    from airan.evaluation.runner import run_eval

    reports, predictions, meta = [], {}, {}
    for label, model in (("base " + PARENT, PARENT), ("adapter " + NAME, NAME)):
        result = await run_eval(items, [], ["diagnosis"], address=address, concurrency=concurrency, model=model,
                                timeout_s=timeout_s, progress=progress)  # fmt: skip
        reports.append(dc_replace(result.reports[0], method=label))
        predictions[label] = result.predictions["diagnosis"]
        meta[label] = result.meta
    return reports, predictions, meta


async def compare(items, adapter_path: Path | None = None, **kwargs):
    """Start a one-site stack whose replica holds base + adapter, and score both on `items`."""
    from airan.stack import LocalStack

    async with LocalStack(stack_config(adapter_path)) as plane:
        return await compare_on(plane.address, items, **kwargs)


if __name__ == "__main__":
    import typer

    cli = typer.Typer(no_args_is_help=True, add_completion=False)

    @cli.callback()
    def _main() -> None:
        """Build or evaluate the smollm2-netops-lora adapter."""

    @cli.command("build")
    def _build(seed: int = 0, force: bool = False, export_to: Path = typer.Option(None, "--export")) -> None:
        """Train the adapter (same as `airan model build smollm2-netops-lora`)."""
        build_cli(seed=seed, force=force, export_to=export_to)

    @cli.command("eval")
    def _eval(
        split: str = typer.Option("dev", help="dev while developing; test once, for the report"),
        n: int = typer.Option(70, help="items (labels in turn, so a multiple of 7 is balanced)"),
        adapter: Path = typer.Option(None, help="adapter directory (default: the committed copy)"),
        concurrency: int = 4,
        out: Path = typer.Option(None, help="write the reports and predictions as JSON here"),
    ) -> None:
        """Base vs adapter in DIAGNOSIS mode through gRPC -> gateway -> Ray replica -> vLLM."""
        import asyncio
        import sys
        from dataclasses import asdict

        from airan.evaluation.dataset import DEV_SEED, TEST_SEED, build_dataset
        from airan.evaluation.report import markdown_table, print_table

        if split not in ("dev", "test"):
            raise typer.BadParameter("--split must be dev or test")
        items = build_dataset(n, DEV_SEED if split == "dev" else TEST_SEED, split)

        def progress(method: str, done: int, total: int) -> None:
            if done == total or done % max(1, total // 5) == 0:
                print(f"  {done}/{total}", file=sys.stderr, flush=True)

        reports, predictions, meta = asyncio.run(compare(items, adapter, concurrency=concurrency, progress=progress))
        print_table(reports, title=f"DIAGNOSIS mode, {split} set, {len(items)} items")
        print(markdown_table(reports))
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({
                "split": split, "n": len(items), "adapter": str(adapter or PACKAGED_DIR), "meta": meta,
                "reports": [asdict(r) for r in reports],
                "predictions": {k: [asdict(p) for p in v] for k, v in predictions.items()},
            }, indent=2) + "\n")  # fmt: skip

    cli()
