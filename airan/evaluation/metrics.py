"""Scores for one method's answers on a labelled set: pure functions over plain data."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from airan.core.causes import CAUSES

# a DIAGNOSIS-mode query that ended in "no valid diagnosis", and any other failed query
INVALID = "INVALID"
ERROR = "ERROR"
PREDICTED: tuple[str, ...] = (*CAUSES, INVALID, ERROR)  # the cause table's names, then failures


@dataclass(frozen=True)
class Prediction:
    item_id: str
    cause: str  # one of PREDICTED
    cells: tuple[str, ...] = ()
    valid: bool | None = None  # schema validity; None where it does not apply (rules, free text)
    error: str = ""
    latency_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text: str = ""  # free text, or the diagnosis' rationale


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


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


@dataclass(frozen=True)
class MethodReport:
    method: str
    n: int
    accuracy: float
    macro_f1: float
    validity: float | None  # share of schema-valid answers (DIAGNOSIS mode only)
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
