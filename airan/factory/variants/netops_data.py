"""Training data of the NetOps LoRA adapter: the served compact diagnosis prompt and its gold answer.

Items: honest simulator cases (`airan.evaluation.cases.build_case`) from the
TRAIN set seed for training and the DEV set seed for model selection; TEST and
SHIFTED are never read here. The packaged detector was fitted on the first
`train_items` TRAIN cases (98% right on them, 89% on unseen ones), and its
answer is a line of the prompt: trained on those cases the model would learn to
copy a detector that looks nearly always right. So training starts at the
first TRAIN case the detector never saw (`first_train_index`).

Each item is asked as a controller asks it: about 40% at NEAR_RT (a brief
answer: cause and cells), the rest at NON_RT (citations allowed). The prompt
is exactly the one the gateway renders for that request: the `Query` of the
request's proto round trip (`served_query`), `diagnosis_context` with the
packaged detector, `PromptRenderer.render(query, max_model_len - max_tokens,
diagnosis=ctx)`. The target is `compact_text(label, affected cells, aliases,
cited)` then `<|im_end|>`; the loss is on those tokens only. `cited` names up
to three KPIs the label's cause moves (`causes.CAUSES[label].moves`, not the
STEADY ones), that the prompt shows (`RenderedPrompt.citable_kpis`) and that
moved the cause's way on an affected cell, most salient first; none for a
NEAR_RT item or NORMAL.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from airan.core import causes
from airan.core.causes import LABELS
from airan.core.diagnosis import MAX_CITED_KPIS, compact_text
from airan.evaluation.cases import DEV_SEED, SEEDS_PER_SET, SHIFTED_SEED, TEST_SEED, TRAIN_SEED, build_case
from airan.evaluation.queries import MAX_MODEL_LEN

NEAR_RT, NON_RT = "near_rt", "non_rt"
NEAR_RT_SHARE = 0.4
# the detector's training cases when its manifest does not say (airan/factory/detector.py's default)
DETECTOR_TRAIN_ITEMS = 14_000


# --- items ----------------------------------------------------------------------------


def priorities(n: int, near_rt_share: float = NEAR_RT_SHARE) -> list[str]:
    """Item i is NEAR_RT when floor((i+1)*share) > floor(i*share): exactly round(n*share) of n, spread
    evenly; with share 0.4 the pattern repeats every 5 items, co-prime with the 7 labels' turn, so
    every label gets the same share over 35 items."""
    if not 0.0 <= near_rt_share <= 1.0:
        raise ValueError("near_rt_share must be within 0..1")
    return [NEAR_RT if int((i + 1) * near_rt_share) > int(i * near_rt_share) else NON_RT for i in range(n)]


def load_detector():
    """The packaged detector: its answer is part of the prompt the model is trained on."""
    return _packaged_detector()


@lru_cache(maxsize=1)
def _packaged_detector():
    from airan.core.detector import Detector
    from airan.store.registry import PACKAGED_DETECTOR

    return Detector.load(PACKAGED_DETECTOR)


def first_train_index(detector) -> int:
    """The first TRAIN case the detector was not fitted on."""
    request = (getattr(detector, "manifest", None) or {}).get("request") or {}
    return int(request.get("train_items", DETECTOR_TRAIN_ITEMS)) if isinstance(request, dict) else DETECTOR_TRAIN_ITEMS


def case_items(n: int, set_seed: int, start: int = 0, name: str = ""):
    """Cases start..start+n-1 of a set, exactly as `build_cases` makes them (labels in turn, item i
    from seed set_seed * SEEDS_PER_SET + i)."""
    if start < 0 or start + n > SEEDS_PER_SET:
        raise ValueError(f"cases must lie within 0..{SEEDS_PER_SET}")
    prefix = name or f"s{set_seed}"
    return [build_case(set_seed * SEEDS_PER_SET + i, LABELS[i % len(LABELS)], f"{prefix}-{i:05d}")
            for i in range(start, start + n)]  # fmt: skip


def assert_disjoint_from_eval(items) -> None:
    """No training item may share a seed (= a simulated scenario) with the DEV, TEST or SHIFTED sets."""
    for set_seed, split in ((DEV_SEED, "DEV"), (TEST_SEED, "TEST"), (SHIFTED_SEED, "SHIFTED")):
        lo, hi = set_seed * SEEDS_PER_SET, (set_seed + 1) * SEEDS_PER_SET
        clash = [i.seed for i in items if lo <= i.seed < hi]
        if clash:
            raise AssertionError(f"{len(clash)} training item(s) use {split} seeds, e.g. {clash[0]}")


def data_split(n_train: int, n_dev: int, detector):
    """(train, dev) items: TRAIN cases past the detector's, and the first DEV cases."""
    start = first_train_index(detector)
    train = case_items(n_train, TRAIN_SEED, start, "train")
    assert_disjoint_from_eval(train)
    return train, case_items(n_dev, DEV_SEED, 0, "dev")


# --- the served prompt and the gold answer ----------------------------------------------


def served_query(item, priority: str = NON_RT):
    """The `Query` the gateway builds from the controller's request for `item` at `priority`:
    `airan.evaluation.queries.server_query` (proto round trip, validation) with the priority set."""
    from airan.client import PRIORITIES
    from airan.config import LimitsConfig
    from airan.core.query import validate_query
    from airan.evaluation.runner import ask_request
    from airan.serving.api.convert import query_from_proto

    request = ask_request(item, True)
    request.priority = PRIORITIES[priority]
    query = query_from_proto(request, time.monotonic(), None)
    return validate_query(query, LimitsConfig(), (), time.monotonic())


def cited_kpis(label: str, cells: Sequence[str], ctx, citable: Sequence[str]) -> tuple[str, ...]:
    """Up to MAX_CITED_KPIS KPIs the cause moves that the prompt shows and that moved its way on an
    affected cell (salience >= 1, the faithfulness threshold), most salient first."""
    salience: dict[str, float] = {}
    for kpi, direction in causes.CAUSES[label].moves:
        if direction == causes.STEADY or kpi not in citable:
            continue
        for cell in cells:
            m = ctx.evidence.of(cell, kpi)
            if m is None or not ctx.evidence.moved(cell, kpi):
                continue
            if m.missing_since is not None:
                ok = direction == causes.FALLS  # it stopped being reported: nothing left to count
            else:
                ok = m.change is not None and m.change * direction > 0
            if ok:
                salience[kpi] = max(salience.get(kpi, 0.0), m.salience)
    return tuple(sorted(salience, key=lambda k: -salience[k])[:MAX_CITED_KPIS])


@dataclass(frozen=True)
class Example:
    item_id: str
    label: str
    cells: tuple[str, ...]  # the gold affected cells (ids)
    aliases: tuple[tuple[str, str], ...]  # (cell id, letter) as the prompt shows them
    brief: bool  # asked at NEAR_RT: cause and cells only
    citable: tuple[str, ...]  # KPIs the answer may cite (none when brief)
    input_ids: tuple[int, ...]  # prompt + target + <|im_end|>
    n_prompt: int
    target: str

    @property
    def labels(self) -> list[int]:
        """Next-token labels in the HF convention: -100 (no loss) on every prompt token."""
        return [-100] * self.n_prompt + list(self.input_ids[self.n_prompt :])

    @property
    def alias_map(self) -> dict[str, str]:
        return dict(self.aliases)


def build_example(renderer, item, priority: str = NON_RT, detector=None) -> Example:
    """The gateway's prompt ids for the request, then the gold compact answer and <|im_end|>."""
    from airan.core.prompting import diagnosis_context

    detector = detector if detector is not None else load_detector()
    query = served_query(item, priority)
    ctx = diagnosis_context(query, detector)
    prompt = renderer.render(query, MAX_MODEL_LEN - query.max_tokens, diagnosis=ctx)
    citable = () if ctx.brief else tuple(prompt.citable_kpis)
    cells = () if item.label == "NORMAL" else tuple(item.affected_cells)
    missing = [c for c in cells if c not in ctx.aliases]
    if missing:
        raise ValueError(f"{item.item_id}: affected cell(s) {missing} have no letter in the prompt")
    cited = () if ctx.brief or not cells else cited_kpis(item.label, cells, ctx, citable)
    target = compact_text(item.label, cells, ctx.aliases, cited)
    tok = renderer.tokenizer
    ids = list(tok(target, add_special_tokens=False)["input_ids"]) + [tok.convert_tokens_to_ids("<|im_end|>")]
    return Example(item.item_id, item.label, cells, tuple(ctx.aliases.items()), ctx.brief, citable,
                   tuple(prompt.token_ids) + tuple(ids), len(prompt.token_ids), target)  # fmt: skip


def build_examples(renderer, items, prios: Sequence[str], detector, show_progress: bool = False) -> list[Example]:
    from tqdm.auto import tqdm

    pairs = list(zip(items, prios, strict=True))
    return [build_example(renderer, item, p, detector)
            for item, p in tqdm(pairs, unit="item", disable=not show_progress, leave=False)]  # fmt: skip


def data_sha256(examples: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(ex.item_id.encode())
        digest.update(json.dumps(ex.input_ids).encode())
        digest.update(str(ex.n_prompt).encode())
    return digest.hexdigest()


def describe(examples: Sequence[Example]) -> dict:
    """Counts for the manifest: labels, priorities, citations, tokens."""
    n = max(1, len(examples))
    return {
        "items": len(examples),
        "labels": {label: sum(e.label == label for e in examples) for label in LABELS},
        "near_rt": sum(e.brief for e in examples),
        "with_citations": sum(";" in e.target for e in examples),
        "prompt_tokens_mean": round(sum(e.n_prompt for e in examples) / n, 1),
        "prompt_tokens_max": max((e.n_prompt for e in examples), default=0),
        "target_tokens": sum(len(e.input_ids) - e.n_prompt for e in examples),
    }


# --- the dataset on disk -----------------------------------------------------------------


def write_dataset(out, parent, n_train: int, n_dev: int, near_rt_share: float = NEAR_RT_SHARE,
                  show_progress: bool = False, more: Sequence[tuple[str, Sequence[Example], Sequence[dict]]] = (),
                  more_facts: dict | None = None) -> dict:  # fmt: skip
    """Write the adapter's training and DEV examples as the build makes them (`train.jsonl`,
    `dev.jsonl`: prompt text, target, label, cells, priority) and `manifest.json` (counts, digests,
    prompt and detector versions); return it. `more` are further splits (name, examples, JSON rows;
    `qa_data.write_dataset` adds the free-text pairs), written after these and part of `data_sha256`,
    `more_facts` further manifest entries.
    Deterministic: the items come from fixed simulator seeds, the priorities from their order."""
    from pathlib import Path

    from airan.core.prompting import COMPACT_PROMPT_VERSION, PromptRenderer
    from airan.factory.buildonce import sha256_file
    from airan.store.registry import PACKAGED_DETECTOR

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    detector = load_detector()
    train_items, dev_items = data_split(n_train, n_dev, detector)
    renderer = PromptRenderer(parent)
    manifest = {"prompt_version": COMPACT_PROMPT_VERSION, "tokenizer": str(parent),
                "detector_sha256": sha256_file(Path(PACKAGED_DETECTOR) / "model.txt"),
                "first_train_index": first_train_index(detector), "near_rt_share": near_rt_share}  # fmt: skip
    every = []
    for split, items in (("train", train_items), ("dev", dev_items)):
        examples = build_examples(renderer, items, priorities(len(items), near_rt_share), detector, show_progress)
        with (out / f"{split}.jsonl").open("w") as f:
            for ex in examples:
                f.write(json.dumps({
                    "item_id": ex.item_id, "label": ex.label, "cells": list(ex.cells),
                    "priority": NEAR_RT if ex.brief else NON_RT,
                    "prompt": renderer.tokenizer.decode(ex.input_ids[: ex.n_prompt]), "target": ex.target,
                }) + "\n")  # fmt: skip
        manifest[split] = {**describe(examples), "data_sha256": data_sha256(examples),
                           "file_sha256": sha256_file(out / f"{split}.jsonl")}  # fmt: skip
        every += examples
    manifest |= more_facts or {}
    for split, examples, rows in more:
        with (out / f"{split}.jsonl").open("w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        manifest[split] = {"items": len(examples), "data_sha256": data_sha256(examples),
                           "file_sha256": sha256_file(out / f"{split}.jsonl")}  # fmt: skip
        every += examples
    manifest["data_sha256"] = data_sha256(every)  # what the adapter's manifest records as data.sha256
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
