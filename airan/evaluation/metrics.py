"""Scores for one method's answers on a labelled set: pure functions over plain data.

`score_method` gives what the evaluation reports per method and set:
macro-F1 with a percentile-bootstrap CI over items, affected-cell F1, whether
the first recommended action is the gold cause's playbook action, whether the
cited KPIs really moved, prompt size and latency. A failed query (`INVALID`:
no valid diagnosis; `ERROR`: any other failure) stays in the set as a miss.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from airan.core.causes import CAUSES

# a DIAGNOSIS-mode query that ended in "no valid diagnosis", and any other failed query
INVALID = "INVALID"
ERROR = "ERROR"
PREDICTED: tuple[str, ...] = (*CAUSES, INVALID, ERROR)  # the cause table's names, then failures
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Prediction:
    item_id: str
    cause: str  # one of PREDICTED
    cells: tuple[str, ...] = ()
    valid: bool | None = None  # a valid diagnosis; None where it does not apply (in-process methods)
    error: str = ""
    latency_ms: float = 0.0  # client-observed (models) or compute time (in-process methods)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text: str = ""  # the diagnosis' rationale, or the model's raw answer
    cited_kpis: tuple[str, ...] = ()  # the KPIs the answer gives as its reasons
    action: str = ""  # the first recommended action (ActionType name without ACTION_); "" = none
    action_value: float | None = None
    confidence: float | None = None
    server_ms: float | None = None  # the control plane's own arrival-to-last-token time (models)


@dataclass(frozen=True)
class ClassScore:
    precision: float
    recall: float
    f1: float
    support: int


def per_class_scores(gold: Sequence[str], pred: Sequence[str]) -> dict[str, ClassScore]:
    """Precision/recall/F1 for each cause present in the gold labels (0 where undefined)."""
    if len(gold) != len(pred):
        raise ValueError("gold and pred differ in length")
    out = {}
    for c in sorted(set(gold), key=_order):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[c] = ClassScore(precision, recall, f1, tp + fn)
    return out


def macro_f1(gold: Sequence[str], pred: Sequence[str]) -> float:
    """Mean F1 over the causes present in the gold labels; a wrong class, UNKNOWN or INVALID is a miss."""
    scores = per_class_scores(gold, pred)
    return float(np.mean([s.f1 for s in scores.values()])) if scores else 0.0


def accuracy(gold: Sequence[str], pred: Sequence[str]) -> float:
    if len(gold) != len(pred):
        raise ValueError("gold and pred differ in length")
    return sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else 0.0


def confusion_matrix(gold: Sequence[str], pred: Sequence[str], rows: Sequence[str], cols: Sequence[str]) -> list[list[int]]:
    """counts[i][j]: gold rows[i] answered as cols[j]."""
    r = {c: i for i, c in enumerate(rows)}
    k = {c: j for j, c in enumerate(cols)}
    m = [[0] * len(cols) for _ in rows]
    for g, p in zip(gold, pred):
        m[r[g]][k[p]] += 1
    return m


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


# --- vectorised macro-F1 (rule tuning, bootstrap) ---------------------------------------------------


def codes(labels: Sequence[str]) -> np.ndarray:
    """Labels as indices into PREDICTED (an unknown name gets the code after the last)."""
    index = {c: i for i, c in enumerate(PREDICTED)}
    return np.fromiter((index.get(c, len(PREDICTED)) for c in labels), dtype=np.int16, count=len(labels))


def macro_f1_codes(gold: np.ndarray, pred: np.ndarray) -> np.ndarray | float:
    """Macro-F1 of each row of (n,) or (B, n) code arrays, over the classes present in that row's gold.

    From one confusion matrix per row: F1 = 2tp / (gold count + predicted count), which equals the
    precision/recall form (0 where tp is 0).
    """
    gold, pred = np.asarray(gold, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    flat = gold.ndim == 1
    gold, pred = np.atleast_2d(gold), np.atleast_2d(pred)
    k = len(PREDICTED) + 1  # codes() gives an unknown name the last code
    rows = np.arange(gold.shape[0])[:, None] * (k * k)
    cm = np.bincount((rows + gold * k + pred).ravel(), minlength=gold.shape[0] * k * k).reshape(-1, k, k)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted = cm.sum(axis=2), cm.sum(axis=1)
    present = support > 0
    f1 = np.where(present, 2 * tp / np.maximum(support + predicted, 1), 0.0)
    out = np.where(present.any(axis=1), f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1), 0.0)
    return float(out[0]) if flat else out


def bootstrap_macro_f1(
    gold: Sequence[str], pred: Sequence[str], n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile-bootstrap CI of macro-F1: items drawn with replacement `n_resamples` times (seeded)."""
    if len(gold) != len(pred):
        raise ValueError("gold and pred differ in length")
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    if not gold:
        return (float("nan"), float("nan"))
    g, p = codes(gold), codes(pred)
    rng = np.random.default_rng(seed)
    scores = np.empty(n_resamples)
    chunk = max(1, 200_000 // len(g))  # bounded memory: a few MB per step whatever the set size
    for lo in range(0, n_resamples, chunk):
        idx = rng.integers(0, len(g), size=(min(chunk, n_resamples - lo), len(g)))
        scores[lo : lo + len(idx)] = macro_f1_codes(g[idx], p[idx])
    alpha = 100 * (1 - level) / 2
    return (float(np.percentile(scores, alpha)), float(np.percentile(scores, 100 - alpha)))


# --- cells, actions, citations -------------------------------------------------------------------


def cell_f1(gold_cells: Sequence[Sequence[str]], pred_cells: Sequence[Sequence[str]]) -> float:
    """Micro F1 of (item, cell) pairs named as affected against the gold ones, over every item:
    a NORMAL item has no affected cell, so any cell named there is a false positive."""
    if len(gold_cells) != len(pred_cells):
        raise ValueError("gold and predicted cells differ in length")
    tp = fp = fn = 0
    for g, p in zip(gold_cells, pred_cells):
        g, p = set(g), set(p)
        tp += len(g & p)
        fp += len(p - g)
        fn += len(g - p)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def gold_action(label: str) -> tuple[str, float | None]:
    """The gold cause's first playbook action and its value (None: the action takes none)."""
    name, value = CAUSES[label].actions[0]
    return name, None if value is None else float(value)


def action_correct(label: str, p: Prediction) -> bool:
    """The first recommended action is the gold playbook's first, value included."""
    name, value = gold_action(label)
    if p.action != name:
        return False
    if value is None:
        return not p.action_value  # no value: unset or 0 (the proto default)
    return p.action_value is not None and math.isclose(p.action_value, value, abs_tol=1e-6)


def action_accuracy(labels: Sequence[str], preds: Sequence[Prediction]) -> float:
    return sum(action_correct(g, p) for g, p in zip(labels, preds)) / len(labels) if labels else 0.0


def faithful(p: Prediction, evidence, asked_cells: Sequence[str]) -> bool | None:
    """Whether every KPI the answer cites moved (`Evidence.moved`) on a cell it names as affected or
    the question asked about (on any context cell when it names neither); None: it cites nothing."""
    if not p.cited_kpis:
        return None
    cells = set(p.cells) | set(asked_cells) or set(evidence.cells)
    return all(any(evidence.moved(c, kpi) for c in cells) for kpi in p.cited_kpis)


def faithfulness(preds: Sequence[Prediction], evidences: Sequence, asked: Sequence[Sequence[str]]) -> float | None:
    """Share of the answers that cite KPIs whose every cited KPI moved; None when none cites any."""
    checks = [f for f in (faithful(p, e, a) for p, e, a in zip(preds, evidences, asked)) if f is not None]
    return sum(checks) / len(checks) if checks else None


# --- one method on one set -----------------------------------------------------------------------


@dataclass(frozen=True)
class MethodScores:
    """What summary.json holds per method and set (these fields, in this order)."""

    macro_f1: float
    macro_f1_ci95: tuple[float, float]
    n: int
    cell_f1: float
    action_accuracy: float
    faithfulness: float | None
    prompt_tokens_p50: float | None  # None: the method has no prompt
    latency_p50_ms: float
    latency_p95_ms: float
    normal_recall: float | None  # share of NORMAL items answered NORMAL (None: no NORMAL item)
    per_class_f1: dict[str, float] = field(default_factory=dict)


SUMMARY_FIELDS: tuple[str, ...] = tuple(MethodScores.__dataclass_fields__)


def score_method(
    items, preds: Sequence[Prediction], evidences: Sequence, n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> MethodScores:
    """`items` are EvalItems (label, affected_cells, cell_ids) aligned with `preds` and `evidences`
    (the `Evidence` the server computes for each item's request)."""
    if [i.item_id for i in items] != [p.item_id for p in preds]:
        raise ValueError("predictions are not aligned with the items")
    if len(evidences) != len(items):
        raise ValueError("evidence is not aligned with the items")
    gold = [i.label for i in items]
    pred = [p.cause for p in preds]
    per_class = per_class_scores(gold, pred)
    answered = [p.latency_ms for p in preds if p.cause != ERROR]
    prompts = [p.prompt_tokens for p in preds if p.prompt_tokens > 0]
    normal = per_class.get("NORMAL")
    return MethodScores(
        macro_f1=macro_f1(gold, pred),
        macro_f1_ci95=bootstrap_macro_f1(gold, pred, n_resamples, seed),
        n=len(items),
        cell_f1=cell_f1([i.affected_cells for i in items], [p.cells for p in preds]),
        action_accuracy=action_accuracy(gold, preds),
        faithfulness=faithfulness(preds, evidences, [i.cell_ids for i in items]),
        prompt_tokens_p50=percentile(prompts, 50) if prompts else None,
        latency_p50_ms=percentile(answered, 50),
        latency_p95_ms=percentile(answered, 95),
        normal_recall=normal.recall if normal else None,
        per_class_f1={c: s.f1 for c, s in per_class.items()},
    )


def failure_counts(preds: Sequence[Prediction]) -> dict[str, int]:
    causes = [p.cause for p in preds]
    return {"invalid": causes.count(INVALID), "errors": causes.count(ERROR), "unknown": causes.count("UNKNOWN")}


# --- legacy: one-set reports for `airan eval adapter` and benchmarks/bench_variants.py --------------


def cell_scores(gold_cells: Sequence[Sequence[str]], pred_cells: Sequence[Sequence[str]]) -> tuple[float, float]:
    """Micro precision and recall of the named affected cells over items that have some (events)."""
    tp = named = wanted = 0
    for g, p in zip(gold_cells, pred_cells):
        if not g:
            continue  # NORMAL: no affected cell to find
        g, p = set(g), set(p)
        tp += len(g & p)
        named += len(p)
        wanted += len(g)
    return (tp / named if named else 0.0, tp / wanted if wanted else 0.0)


@dataclass(frozen=True)
class MethodReport:
    method: str
    n: int
    accuracy: float
    macro_f1: float
    validity: float | None  # share of valid answers (DIAGNOSIS mode only)
    abstentions: int  # UNKNOWN answers
    invalid: int
    errors: int
    cell_precision: float
    cell_recall: float
    cells_outside_context: int  # named cells not in the item's context (must be 0 in DIAGNOSIS mode)
    latency_p50_ms: float
    latency_p95_ms: float
    tok_s: float | None  # completion tokens / wall time of the run (None: no model)
    wall_s: float
    per_class: dict[str, ClassScore] = field(default_factory=dict)
    confusion: list[list[int]] = field(default_factory=list)  # rows: labels, cols: PREDICTED
    labels: tuple[str, ...] = ()


def summarize(method: str, items, preds: Sequence[Prediction], wall_s: float, uses_model: bool) -> MethodReport:
    """`items` are EvalItems (duck-typed: label, affected_cells, context_cells) aligned with `preds`."""
    if [i.item_id for i in items] != [p.item_id for p in preds]:
        raise ValueError("predictions are not aligned with the items")
    gold = [i.label for i in items]
    pred = [p.cause for p in preds]
    labels = tuple(sorted(set(gold), key=_order))
    validity_known = [p.valid for p in preds if p.valid is not None]
    precision, recall = cell_scores([i.affected_cells for i in items], [p.cells for p in preds])
    outside = sum(len(set(p.cells) - set(i.context_cells)) for i, p in zip(items, preds))
    answered = [p for p in preds if p.cause != ERROR]
    tokens = sum(p.completion_tokens for p in preds)
    return MethodReport(
        method=method,
        n=len(items),
        accuracy=accuracy(gold, pred),
        macro_f1=macro_f1(gold, pred),
        validity=(sum(validity_known) / len(validity_known)) if validity_known else None,
        abstentions=pred.count("UNKNOWN"),
        invalid=pred.count(INVALID),
        errors=pred.count(ERROR),
        cell_precision=precision,
        cell_recall=recall,
        cells_outside_context=outside,
        latency_p50_ms=percentile([p.latency_ms for p in answered], 50),
        latency_p95_ms=percentile([p.latency_ms for p in answered], 95),
        tok_s=(tokens / wall_s if wall_s > 0 else 0.0) if uses_model else None,
        wall_s=wall_s,
        per_class=per_class_scores(gold, pred),
        confusion=confusion_matrix(gold, pred, labels, PREDICTED),
        labels=labels,
    )


def _order(cause: str) -> int:
    return PREDICTED.index(cause) if cause in PREDICTED else len(PREDICTED)
