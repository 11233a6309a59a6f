"""Training data of the NetOps LoRA adapter: items, gold diagnoses, token examples.

Items: labelled scenarios from the evaluation harness's builder (`build_dataset`)
at a TRAIN set seed whose item seeds can never meet its DEV or TEST ones
(checked). Input: exactly the diagnosis-mode prompt the gateway renders for the
request the harness sends (`airan.evaluation.queries.server_query`, then the
parent's chat template within the server's token budget). Target: the gold
diagnosis as compact JSON in the schema's key order - what xgrammar lets the
model write - then <|im_end|>; the loss is on those tokens only.

The gold answer is the cause table's playbook (`airan.core.causes`): one
consistent policy per cause (severity, actions with their values clamped to the
action's bounds, the key KPI the rationale cites), which the rules can check.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from airan.core.causes import ACTIONS, CAUSES
from airan.core.diagnosis import DIAGNOSIS_MAX_TOKENS, RATIONALE_CHARS
from airan.evaluation.queries import MAX_MODEL_LEN, server_query
from airan.evaluation.dataset import DEV_SEED, SEEDS_PER_SET, TEST_SEED, build_dataset

# item seeds are set_seed * SEEDS_PER_SET + i: any set seed other than DEV/TEST is disjoint
TRAIN_SET_SEED = 11
CONFIDENCE_PCT = 80


# --- the gold answer ------------------------------------------------------------------


def _rationale(label: str, cell: str, query) -> str:
    if label == "NORMAL":
        return f"no KPI of {cell} moved by more than 25%"
    name = CAUSES[label].key_kpi
    points = sorted((k.time_s or 0.0, k.value, k.unit) for k in query.kpis if k.cell_id == cell and k.name == name)
    latest = max((k.time_s or 0.0) for k in query.kpis if k.cell_id == cell)
    if not points:
        return f"{name} not reported on {cell}"
    (t0, a, unit), (t1, b, _) = points[0], points[-1]
    unit = f" {unit}" if unit else ""
    if t1 < latest:  # the cell stopped reporting it (no UE left to report it)
        return f"{name} {a:.4g}{unit} -> not reported on {cell}"
    return f"{name} {a:.4g} -> {b:.4g}{unit} on {cell}"


def _actions(label: str, cell: str) -> list[dict]:
    """The cause's playbook actions as the schema writes them; cell-targeted ones act on `cell`."""
    out = []
    for name, value in CAUSES[label].actions:
        spec = ACTIONS[name]
        action: dict = {"type": name}
        if spec.parameter is not None:
            if spec.needs_target_cell:
                action["target_cell"] = cell
            action[spec.parameter] = max(spec.minimum, min(spec.maximum, int(value)))
        out.append(action)
    return out


def target_json(item, query=None) -> str:
    """The gold diagnosis as the constrained decoder writes it: schema key order, no whitespace."""
    query = query or server_query(item)
    cell = item.focus_cell
    answer = {
        "cause": item.label,
        "affected_cells": list(item.affected_cells),
        "severity": CAUSES[item.label].severity,
        "actions": _actions(item.label, cell),
        "confidence_pct": CONFIDENCE_PCT,
        "rationale": _rationale(item.label, cell, query)[:RATIONALE_CHARS],
    }
    return json.dumps(answer, separators=(",", ":"), ensure_ascii=False)


# --- training items -------------------------------------------------------------------


def assert_disjoint_from_eval(items) -> None:
    """No training item may share a seed (= a simulated scenario) with the harness's DEV or TEST sets."""
    for set_seed, split in ((DEV_SEED, "DEV"), (TEST_SEED, "TEST")):
        lo, hi = set_seed * SEEDS_PER_SET, (set_seed + 1) * SEEDS_PER_SET
        clash = [i.seed for i in items if lo <= i.seed < hi]
        if clash:
            raise AssertionError(f"{len(clash)} training item(s) use {split} seeds, e.g. {clash[0]}")


def training_split(n_train: int, n_heldout: int, seed: int = 0):
    """(train, held-out) items from the TRAIN set seed; held-out items follow the training ones."""
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
