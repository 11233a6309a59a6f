"""The `lora` method: train a PEFT LoRA adapter on the compact NetOps diagnosis (`netops_data`) and on
free-text questions answered from knowledge passages (`qa_data`): one model serves both modes.

The served prompt is ~250 tokens (evidence lines, the detector's answer, the
question) and the answer a few: `CONGESTION A; RRU.PrbTotDl`. LoRA sits on the
top `top_layers` of the parent's layers; the frozen layers below compute the
same hidden states at every step, so each item goes through them once
(cached, with their keys and values for the development items) and the
training steps run the top layers alone, a padded batch of `accum` items at a
time (right padding: causal attention never lets a real position see a pad).
The loss is the mean NLL of the answer's tokens and <|im_end|>, per item. QA prompts (~430 tokens:
retrieved passages and the question) are batched apart from diagnosis ones (~250) so that padding
stays small; the batches of both kinds are shuffled together every epoch.

Model selection: at `checkpoints` evenly spaced steps the adapter answers the
DEV items as the server would ask for it, greedily under the answer grammar
(the canonical token sequences of every cause, cell subset and end: the
answer's end or '; ' before citations), scored by DEV macro-F1 of the
cause; the QA DEV items (whole question groups held out of the
QA training pool, never the evaluation set) are answered greedily too, and among the checkpoints
whose DEV macro-F1 is within `F1_TOLERANCE` of the best, the one with the best QA DEV score (key
facts stated, or a refusal where the context does not cover the question; ties: higher macro-F1,
lower target NLL) is the one written: both modes guard the choice. vLLM
serves the result as an ordinary PEFT adapter: the layers below simply have no
LoRA weights.

`airan model build smollm2-netops-lora` runs it like every recipe (see
`build.build_variant`); `--export airan/store/adapters` copies the adapter
where the repo keeps it. `airan eval adapter` scores base vs adapter through
the real gRPC path. Deterministic for a seed and a thread count.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from airan.core import causes
from airan.core.diagnosis import (
    COMPACT_PROMPT_VERSION, MAX_AFFECTED_CELLS, InvalidDiagnosis, compact_text, parse_compact,
)  # fmt: skip
from airan.factory.buildonce import Steps, sha256_file
from airan.factory.variants import netops_data as D
from airan.factory.variants import qa_data as Q
from airan.factory.variants.hf import load_frozen
from airan.factory.variants.recipes import Recipe
from airan.store.registry import describe

FORMAT = "peft-lora/safetensors"
PLAIN = ("NORMAL", "UNKNOWN")  # causes that name no cells
MISS = "INVALID"  # a DEV answer that does not parse: a miss for every cause
# a checkpoint within this DEV macro-F1 of the best one may be chosen for a better QA DEV score
# (140 DEV items: one item is ~0.007 of macro-F1)
F1_TOLERANCE = 0.015


@dataclass(frozen=True)
class TrainSettings:
    """A LoRA build's settings: the recipe's parameters (recipes.py holds the values), its seed and
    item counts (`heldout_items` are the DEV items that choose the checkpoint)."""

    train_items: int
    heldout_items: int
    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    top_layers: int  # LoRA on the top layers only; the frozen ones below run once per item
    epochs: int
    accum: int  # items per optimizer step (one padded batch)
    lr: float
    warmup_steps: int
    checkpoints: int = 4  # DEV evaluations, evenly spaced over the run; the best one is kept
    near_rt_share: float = D.NEAR_RT_SHARE
    # free-text QA pairs mixed in (qa_data.qa_split): the TRAIN wording pool asks every aspect
    # qa_per_passage times; qa_train_items of them train, qa_dev_items held-out groups choose the checkpoint
    qa_per_passage: int = 0
    qa_train_items: int = 0
    qa_dev_items: int = 0
    seed: int = 0

    @classmethod
    def of(cls, recipe: Recipe, seed: int, train_items: int, heldout_items: int) -> TrainSettings:
        """The recipe's parameters with the build's seed and item counts."""
        params = {k: tuple(v) if k == "target_modules" else v for k, v in recipe.params.items()}
        return cls(train_items=train_items, heldout_items=heldout_items, seed=seed, **params)

    @property
    def steps_per_epoch(self) -> int:
        # the two kinds are batched apart (similar prompt lengths in a padded batch)
        return math.ceil(self.train_items / self.accum) + math.ceil(self.qa_train_items / self.accum)

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def checkpoint_steps(self) -> list[int]:
        """The steps (counted from 1) after which the DEV items are answered; the last step always."""
        n = max(1, min(self.checkpoints, self.steps))
        return sorted({math.ceil(k * self.steps / n) for k in range(1, n + 1)})


def request_extras(parent: Path) -> dict:
    """What a LoRA build depends on beyond the common request: the parent's config, the prompt's
    version, the detector whose answer the prompt shows, and a sample of the rendered prompts (so
    a changed evidence or prompt rendering is a new build)."""
    _passive_openmp()  # before the tokenizer's import loads torch
    from airan.core.detector import MODEL_FILE
    from airan.core.prompting import PromptRenderer
    from airan.store.registry import PACKAGED_DETECTOR

    detector = D.load_detector()
    from airan.core.knowledge import packaged_knowledge
    from airan.core.retrieval import FREE_TEXT_PROMPT_VERSION

    train, dev = D.data_split(7, 7, detector)
    renderer = PromptRenderer(parent)
    sample = D.build_examples(renderer, train + dev, D.priorities(14), detector)
    kb = packaged_knowledge()
    sample += Q.build_qa_examples(renderer, kb=kb, items=Q.train_questions(kb, 1)[::40])
    return {
        "parent_config_sha256": sha256_file(parent / "config.json"),
        "prompt_version": COMPACT_PROMPT_VERSION,
        "free_text_prompt_version": FREE_TEXT_PROMPT_VERSION,
        "knowledge_sha256": Q.knowledge_sha256(kb),
        "detector_sha256": sha256_file(PACKAGED_DETECTOR / MODEL_FILE),
        "prompt_sample_sha256": D.data_sha256(sample),
    }


def prompt_version_of(adapter_dir: Path) -> str | None:
    """The prompt version an adapter directory was trained for (its manifest's), or None."""
    from airan.store.registry import read_manifest

    manifest = read_manifest(Path(adapter_dir))
    return None if manifest is None else manifest.get("prompt_version")


def is_current(adapter_dir: Path) -> bool:
    """Whether the adapter learnt the prompt the server renders now (COMPACT_PROMPT_VERSION)."""
    return prompt_version_of(adapter_dir) == COMPACT_PROMPT_VERSION


# --- model pieces ---------------------------------------------------------------------


def _passive_openmp() -> None:
    """OpenMP reads its wait policy once, when torch loads it: passive, so that both cores help on a
    box others load too (see _threads). Nothing once torch is loaded."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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


class KV:
    """The keys and values of the layers that ran with it (what attention's `update` asks of a cache)."""

    def __init__(self) -> None:
        self.keys: dict[int, object] = {}
        self.values: dict[int, object] = {}

    def update(self, key, value, layer_idx: int, *args, **kwargs):
        import torch

        if layer_idx in self.keys:
            key = torch.cat([self.keys[layer_idx], key], dim=-2)
            value = torch.cat([self.values[layer_idx], value], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def first(self, n: int) -> KV:
        """A cache of the first `n` positions (the tensors are shared, never written in place)."""
        out = KV()
        out.keys = {i: k[..., :n, :] for i, k in self.keys.items()}
        out.values = {i: v[..., :n, :] for i, v in self.values.items()}
        return out

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.keys[layer_idx].shape[-2]) if layer_idx in self.keys else 0


def _rope(model, hidden, start: int = 0):
    import torch

    positions = torch.arange(start, start + hidden.shape[1])[None]
    return model.model.rotary_emb(hidden, positions)


def _run_layers(layers, hidden, rope, cache: KV | None = None):
    for layer in layers:
        out = layer(hidden, position_embeddings=rope, attention_mask=None, past_key_values=cache,
                    use_cache=cache is not None)  # fmt: skip
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def bottom_states(model, ex: D.Example, n_bottom: int, with_kv: bool = False):
    """Hidden states entering layer `n_bottom` (frozen below it, so computed once per item) and,
    with `with_kv`, those layers' keys and values (to decode DEV answers)."""
    import torch

    cache = KV() if with_kv else None
    with torch.no_grad():
        hidden = model.model.embed_tokens(torch.tensor([ex.input_ids]))
        hidden = _run_layers(model.model.layers[:n_bottom], hidden, _rope(model, hidden), cache)
    return hidden[0].contiguous(), cache


def batch_nll(model, examples: Sequence[D.Example], states: Sequence, n_bottom: int, cache: KV | None = None):
    """Per item, the mean NLL of its target tokens (+ <|im_end|>), from the cached states through the
    top layers; the batch is right-padded (causal attention: a real position never sees a pad)."""
    import torch

    width = max(s.shape[0] for s in states)
    hidden = torch.zeros(len(states), width, states[0].shape[-1], dtype=states[0].dtype)
    for b, s in enumerate(states):
        hidden[b, : s.shape[0]] = s
    hidden = _run_layers(model.model.layers[n_bottom:], hidden, _rope(model, hidden), cache)
    # logits only where a target token is predicted: the 49k-word head is costly over every position
    rows, cols, targets, owner = [], [], [], []
    for b, ex in enumerate(examples):
        n = len(ex.input_ids) - ex.n_prompt
        rows += [b] * n
        cols += range(ex.n_prompt - 1, len(ex.input_ids) - 1)
        targets += ex.input_ids[ex.n_prompt :]
        owner += [b] * n
    logits = model.lm_head(model.model.norm(hidden[rows, cols])).float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(targets), reduction="none")
    owner_t = torch.tensor(owner)
    sums = torch.zeros(len(examples)).index_add(0, owner_t, nll)
    counts = torch.zeros(len(examples)).index_add(0, owner_t, torch.ones_like(nll))
    return sums / counts, logits


def _lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --- answering a DEV item under the grammar -------------------------------------------------


def answer_trie(tok, ex: D.Example, eos: int, allowed: Sequence[str] = tuple(causes.CAUSES)) -> dict:
    """Token trie of the answers the request's grammar allows in canonical form: every cause; an
    event's cells as a non-empty subset of the prompt's letters in order; then the end of the turn,
    or (when the answer may cite) ';' where the citations would begin. A node: {token: node};
    the key None marks a complete answer."""
    letters = [a for _, a in ex.aliases]
    subsets = [c for k in range(1, min(MAX_AFFECTED_CELLS, len(letters)) + 1) for c in combinations(letters, k)]
    texts: list[tuple[str, bool]] = []
    for cause in allowed:
        if cause in PLAIN or not letters:
            texts.append((cause, False))
            continue
        inverse = {a: c for c, a in ex.aliases}
        for subset in subsets:
            texts.append((compact_text(cause, tuple(inverse[a] for a in subset), ex.alias_map), bool(ex.citable)))
    root: dict = {}
    for text, may_cite in texts:
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        ends = [ids + [eos]] + ([list(tok(text + ";", add_special_tokens=False)["input_ids"])] if may_cite else [])
        for seq in ends:
            node = root
            for t in seq:
                node = node.setdefault(t, {})
            node[None] = {}
    return root


def _feed(model, tokens: Sequence[int], position: int, cache: KV):
    """Next-token logits after `tokens` (at `position` on), through every layer with the cache."""
    import torch

    hidden = model.model.embed_tokens(torch.tensor([list(tokens)]))
    mask = None
    if len(tokens) > 1:  # a prefix sits in the cache: causal, aligned at the end (True = attends)
        q = torch.arange(position, position + len(tokens))[:, None]
        mask = (torch.arange(position + len(tokens))[None, :] <= q)[None, None]
    rope = _rope(model, hidden, position)
    for layer in model.model.layers:
        out = layer(hidden, position_embeddings=rope, attention_mask=mask, past_key_values=cache, use_cache=True)
        hidden = out[0] if isinstance(out, tuple) else out
    return model.lm_head(model.model.norm(hidden[0, -1])).float()


def dev_answer(model, tok, ex: D.Example, state, kv: KV, trie: dict, n_bottom: int, eos: int) -> tuple[str, float]:
    """(the greedy answer under the grammar, the target's teacher-forced NLL) for one DEV item.

    The model is asked only where the grammar leaves a choice; the tokens it forces in between are
    fed in one pass."""
    import torch

    with torch.no_grad():
        cache = kv.first(len(ex.input_ids))
        nll, logits = batch_nll(model, [ex], [state], n_bottom, cache)
        cache = cache.first(ex.n_prompt)  # the prompt's keys and values in every layer
        scores, node, out, pending, position = logits[0], trie, [], [], ex.n_prompt
        while True:
            allowed = [t for t in node if t is not None]
            if not allowed:
                break
            if len(allowed) > 1:
                if pending:
                    scores = _feed(model, pending, position, cache)
                    position += len(pending)
                    pending = []
                token = max(allowed, key=lambda t: (scores[t].item(), -t))
            else:
                token = allowed[0]
            out.append(token)
            pending.append(token)
            node = node[token]
            if None in node and len(node) == 1:
                break
    text = tok.decode([t for t in out if t != eos]).strip().removesuffix(";").strip()
    return text, float(nll[0])


def dev_scores(answers: Sequence[str], examples: Sequence[D.Example], nlls: Sequence[float]) -> dict:
    from airan.evaluation.metrics import macro_f1

    gold, pred, cells_right = [], [], 0
    for text, ex in zip(answers, examples):
        gold.append(ex.label)
        try:
            a = parse_compact(text, ex.alias_map, ex.citable)
        except InvalidDiagnosis:
            pred.append(MISS)
            continue
        pred.append(a.cause)
        cells_right += a.cause == ex.label and set(a.cells) == set(ex.cells)
    n = max(1, len(examples))
    return {
        "macro_f1": round(macro_f1(gold, pred), 4),
        "accuracy": round(sum(g == p for g, p in zip(gold, pred)) / n, 4),
        "exact_cells": round(cells_right / n, 4),  # right cause and exactly the affected cells
        "invalid": pred.count(MISS),
        "target_nll": round(sum(nlls) / n, 4),
        "predicted": {c: pred.count(c) for c in sorted(set(pred))},
    }


# --- the build ------------------------------------------------------------------------


def train_adapter(work: Path, recipe: Recipe, s: TrainSettings, parent: Path, parent_name: str,
                  threads: int | None = None, show_progress: bool = True) -> dict:  # fmt: skip
    """Train the adapter into `work` (PEFT files); return the manifest's facts."""
    _passive_openmp()
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from airan.core.knowledge import packaged_knowledge
    from airan.core.prompting import DIAGNOSIS_SYSTEM, PromptRenderer

    started = time.perf_counter()
    steps = Steps(recipe.name, total=5, enabled=show_progress)
    threads = threads or _threads()
    torch.set_num_threads(threads)
    torch.manual_seed(s.seed)

    with steps("training and DEV items, rendered as the gateway renders them"):
        detector = D.load_detector()
        train_items, dev_items = D.data_split(s.train_items, s.heldout_items, detector)
        renderer = PromptRenderer(parent)
        tok = renderer.tokenizer
        train = D.build_examples(renderer, train_items, D.priorities(len(train_items), s.near_rt_share), detector,
                                 show_progress)  # fmt: skip
        dev = D.build_examples(renderer, dev_items, D.priorities(len(dev_items), s.near_rt_share), detector,
                               show_progress)  # fmt: skip
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        tries = [answer_trie(tok, ex, eos) for ex in dev]
        kb = packaged_knowledge()
        qa_train_items, qa_dev_items = (Q.qa_split(kb, s.qa_per_passage, s.qa_train_items, s.qa_dev_items)
                                        if s.qa_per_passage else ([], []))  # fmt: skip
        qa_train = Q.build_qa_examples(renderer, kb=kb, items=qa_train_items)
        qa_dev = Q.build_qa_examples(renderer, kb=kb, items=qa_dev_items)
    steps.say(f"      {len(train)} diagnosis + {len(qa_train)} QA training items, {len(dev)} + {len(qa_dev)} DEV "
              f"({sum(len(e.input_ids) for e in train + dev + qa_train + qa_dev)} tokens), {threads} thread(s)")  # fmt: skip

    model = _load_parent(parent)
    parent_parameters = sum(p.numel() for p in model.parameters())
    n_layers = model.config.num_hidden_layers
    if not 1 <= s.top_layers <= n_layers:
        raise ValueError(f"top_layers must be within 1..{n_layers}")
    n_bottom = n_layers - s.top_layers

    with steps(f"frozen layers 0-{n_bottom - 1}, once per item"):
        bar = tqdm(total=len(train) + len(qa_train) + len(dev), unit="item", disable=not show_progress, leave=False)
        t0 = time.perf_counter()
        train_cache = []
        for ex in train + qa_train:
            train_cache.append(bottom_states(model, ex, n_bottom)[0])
            bar.update(1)
        cache_seconds = time.perf_counter() - t0
        train_all = train + qa_train  # indices past len(train) are QA items
        dev_cache = []
        for ex in dev:
            dev_cache.append(bottom_states(model, ex, n_bottom, with_kv=True))
            bar.update(1)
        bar.close()

    config = LoraConfig(
        r=s.rank, lora_alpha=s.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=list(s.target_modules), layers_to_transform=list(range(n_bottom, n_layers)),
        layers_pattern="layers",
    )  # fmt: skip
    torch.manual_seed(s.seed)  # LoRA A's initialisation
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]

    def evaluate(label: str) -> dict:
        t = time.perf_counter()
        answers, nlls = [], []
        for ex, (state, kv), trie in tqdm(list(zip(dev, dev_cache, tries)), unit="item", leave=False,
                                           desc=f"DEV {label}", disable=not show_progress):  # fmt: skip
            text, nll = dev_answer(model, tok, ex, state, kv, trie, n_bottom, eos)
            answers.append(text)
            nlls.append(nll)
        scores = {**dev_scores(answers, dev, nlls), "seconds": round(time.perf_counter() - t, 1)}
        if qa_dev:
            t = time.perf_counter()
            texts = [qa_dev_answer(model, tok, ex, eos) for ex in tqdm(qa_dev, unit="item", leave=False,
                     desc=f"QA DEV {label}", disable=not show_progress)]  # fmt: skip
            scores["qa"] = {**Q.qa_dev_scores(texts, qa_dev_items, qa_dev, kb),
                            "seconds": round(time.perf_counter() - t, 1), "answers": texts}  # fmt: skip
            scores["seconds"] = round(scores["seconds"] + scores["qa"]["seconds"], 1)
        return scores

    def say_scores(label: str, scores: dict, write=steps.say) -> None:
        qa = scores.get("qa")
        more = (f"; QA DEV score {qa['qa_score']:.3f} (recall {qa['key_fact_recall']}, refusal "
                f"{qa['refusal_accuracy']}, invented {qa['invented_names']})") if qa else ""  # fmt: skip
        write(f"      {label}: DEV macro-F1 {scores['macro_f1']:.3f}, accuracy {scores['accuracy']:.3f}, "
              f"target NLL {scores['target_nll']:.3f}{more}")  # fmt: skip

    with steps(f"the parent's DEV answers ({len(dev)} items under the grammar, {len(qa_dev)} QA items)"):
        peft_model.eval()
        parent_scores = evaluate("parent")
    say_scores("parent", parent_scores)

    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(s.seed)
    history: list[dict] = []
    checkpoints: list[dict] = []
    weights_at: dict[int, list] = {}
    when = set(s.checkpoint_steps())
    train_seconds = eval_seconds = 0.0
    with steps(f"training LoRA r={s.rank} on layers {n_bottom}-{n_layers - 1}: {s.steps} steps, "
               f"DEV checks after steps {sorted(when)}"):  # fmt: skip
        bar = tqdm(total=s.steps, unit="step", disable=not show_progress, leave=False)
        step = 0
        for epoch in range(s.epochs):
            for batch in epoch_batches(len(train), len(qa_train), s.accum, generator):
                t = time.perf_counter()
                peft_model.train()
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, s)
                nll, _ = batch_nll(model, [train_all[k] for k in batch], [train_cache[k] for k in batch], n_bottom)
                loss = nll.mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                train_seconds += time.perf_counter() - t
                history.append({"step": step + 1, "epoch": epoch, "loss": loss.item(),
                                "qa": bool(batch[0] >= len(train))})  # fmt: skip
                step += 1
                bar.update(1)
                recent = history[-20:]
                bar.set_postfix(loss_20=f"{sum(h['loss'] for h in recent) / len(recent):.3f}")
                if step in when:
                    peft_model.eval()
                    scores = evaluate(f"step {step}")
                    eval_seconds += scores["seconds"]
                    checkpoints.append({"step": step, "epoch": round(step / s.steps_per_epoch, 2), **scores})
                    weights_at[step] = [p.detach().clone() for p in params]
                    if show_progress:
                        say_scores(f"step {step}", scores, bar.write)
        bar.close()
    chosen_step = choose_checkpoint(checkpoints)
    weights = weights_at[chosen_step]
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    chosen = next(c for c in checkpoints if c["step"] == chosen_step)
    peft_model.eval()

    with steps(f"writing the PEFT adapter of step {chosen_step} (bfloat16)"):
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
    n_train = max(1, len(train))
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
        "trainable_tensors": len(names),
        "parent_parameters": parent_parameters,
        "weight_bytes": describe(work)["weight_bytes"],
        "adapter_bytes": (work / "adapter_model.safetensors").stat().st_size,
        "seed": s.seed,
        "prompt_version": COMPACT_PROMPT_VERSION,
        # the adapter learnt this system prompt (and the rest of the rendering: data.sha256)
        "system_prompt_sha256": hashlib.sha256(DIAGNOSIS_SYSTEM.encode()).hexdigest(),
        "data": {
            "source": "airan.evaluation.cases.build_case (TRAIN past the detector's cases; DEV)",
            "train_set_seed": D.TRAIN_SEED,
            "train_first_index": D.first_train_index(detector),
            "train_item_seeds": [train_items[0].seed, train_items[-1].seed] if train_items else [],
            "dev_set_seed": D.DEV_SEED,
            "train_items": len(train),
            "heldout_items": len(dev),
            "near_rt_share": s.near_rt_share,
            "train": D.describe(train),
            "dev": D.describe(dev),
            "tokens": sum(len(e.input_ids) for e in train),
            "target_tokens": sum(len(e.input_ids) - e.n_prompt for e in train),
            "sha256": D.data_sha256(train + dev + qa_train + qa_dev),
            "qa": {
                "source": "airan.factory.variants.qa_data.qa_split (TRAIN wording pool of airan.evaluation.qa; "
                          "never the evaluation set)",
                "per_passage": s.qa_per_passage,
                "knowledge_sha256": Q.knowledge_sha256(kb),
                "train": Q.describe_qa(qa_train),
                "dev": Q.describe_qa(qa_dev),
                "dev_questions": [i.question for i in qa_dev_items],
                "tokens": sum(len(e.input_ids) for e in qa_train),
                "sha256": D.data_sha256(qa_train + qa_dev),
            },
            "detector": {"sha256": sha256_file(_detector_file()), "train_items": D.first_train_index(detector)},
        },
        "training": {**dataclasses.asdict(s), "steps": s.steps, "optimizer": "AdamW",
                     "schedule": "warmup+cosine to 10%", "loss": "mean target NLL per item (+<|im_end|>)",
                     "final_loss": round(sum(h["loss"] for h in tail) / len(tail), 4),
                     "loss_every_10": [round(h["loss"], 4) for h in history[::10]], "threads": threads,
                     "seconds": {"cache": round(cache_seconds, 1), "train": round(train_seconds, 1),
                                 "dev_checks": round(eval_seconds, 1)},
                     "seconds_per_item": {"cache": round(cache_seconds / n_train, 4),
                                          "train": round(train_seconds / (n_train * s.epochs), 4)}},
        "selection": {
            "metric": "DEV macro-F1 of the cause, greedy under the answer grammar; among checkpoints within "
                      f"{F1_TOLERANCE} of the best macro-F1, the best QA DEV score (ties: higher macro-F1, "
                      "lower target NLL)",
            "chosen_step": chosen_step,
            "chosen": chosen,
            "parent": parent_scores,
            "checkpoints": checkpoints,
        },
        "heldout": {"target_nll": {"parent": parent_scores["target_nll"], "adapter": chosen["target_nll"]},
                    "macro_f1": {"parent": parent_scores["macro_f1"], "adapter": chosen["macro_f1"]},
                    "qa_score": {"parent": parent_scores.get("qa", {}).get("qa_score"),
                                 "adapter": chosen.get("qa", {}).get("qa_score")},
                    "perplexity": {"parent": round(math.exp(parent_scores["target_nll"]), 4),
                                   "variant": round(math.exp(chosen["target_nll"]), 4)}},
        "build_seconds": round(time.perf_counter() - started, 1),
        "step_seconds": steps.seconds,
        "versions": _versions(),
    }  # fmt: skip


def epoch_batches(n_diagnosis: int, n_qa: int, accum: int, generator) -> list[list[int]]:
    """One epoch's batches of indices into diagnosis + QA items: each kind shuffled and cut into batches
    of `accum` apart (a padded batch of similar prompt lengths), then the batches shuffled together."""
    import torch

    batches = []
    for offset, n in ((0, n_diagnosis), (n_diagnosis, n_qa)):
        order = [offset + k for k in torch.randperm(n, generator=generator).tolist()]
        batches += [order[i : i + accum] for i in range(0, n, accum)]
    return [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]


def choose_checkpoint(checkpoints: Sequence[dict]) -> int:
    """The step to keep: among checkpoints whose DEV macro-F1 is within F1_TOLERANCE of the best, the
    best QA DEV score (when QA was trained), then the higher macro-F1, then the lower target NLL."""
    if not checkpoints:
        raise ValueError("no checkpoint was evaluated")
    top = max(c["macro_f1"] for c in checkpoints)
    near = [c for c in checkpoints if c["macro_f1"] >= top - F1_TOLERANCE - 1e-9]
    best = max(near, key=lambda c: (c.get("qa", {}).get("qa_score", 0.0), c["macro_f1"], -c["target_nll"],
                                    -c["step"]))  # fmt: skip
    return int(best["step"])


def qa_dev_answer(model, tok, ex: D.Example, eos: int, max_new_tokens: int = Q.DEV_MAX_NEW_TOKENS) -> str:
    """The greedy free-text answer to a QA DEV item's served prompt (every layer, LoRA included)."""
    import torch

    with torch.no_grad():
        prompt = torch.tensor([list(ex.input_ids[: ex.n_prompt])])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=eos)  # fmt: skip
    return tok.decode([t for t in out[0, ex.n_prompt :].tolist() if t != eos], skip_special_tokens=True).strip()


def _detector_file() -> Path:
    from airan.core.detector import MODEL_FILE
    from airan.store.registry import PACKAGED_DETECTOR

    return PACKAGED_DETECTOR / MODEL_FILE


def _versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
