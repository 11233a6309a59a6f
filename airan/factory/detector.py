"""Train the fast detector: LightGBM over the evidence features of simulator cases (TRAIN seeds).

One row per cell of a case, labelled with the cause of the event on that cell
(NORMAL otherwise). Rounds stop early on the DEV set; a temperature fitted on
DEV makes the probabilities calibrated (expected calibration error before and
after is recorded). Deterministic for a seed and thread count. The committed
model lives in airan/store/detector/ (`airan model build-detector
--export airan/store/detector`).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from airan.core.causes import LABELS
from airan.core.detector import MODEL_FILE, decide, softmax
from airan.core.evidence import FEATURE_NAMES, cell_features, compute_evidence
from airan.core.query import KpiSample
from airan.evaluation.cases import DEV_SEED, TRAIN_SEED, build_cases
from airan.evaluation.dataset import EvalItem
from airan.evaluation.metrics import macro_f1
from airan.factory.buildonce import build_once

DETECTOR_NAME = "netops-detector"
TEMPERATURES = np.round(np.arange(0.5, 3.01, 0.05), 2)


@dataclass(frozen=True)
class DetectorRecipe:
    train_items: int = 14_000
    dev_items: int = 1_400
    num_leaves: int = 15
    learning_rate: float = 0.05
    max_rounds: int = 800
    early_stopping: int = 50
    seed: int = 0
    threads: int = 2


def evidence_of(item: EvalItem):
    return compute_evidence(KpiSample(k.name, k.value, k.unit, k.cell_id, k.time_s) for k in item.kpis)


def cell_rows(items: list[EvalItem], progress: str | None = None) -> tuple[np.ndarray, np.ndarray, list]:
    """Features and labels, one row per cell; the third value maps rows back to (item, cells)."""
    X, y, spans = [], [], []
    for item in tqdm(items, desc=progress, disable=progress is None, unit="case"):
        ev = evidence_of(item)
        start = len(X)
        for cell in ev.cells:
            X.append(cell_features(ev, cell))
            y.append(LABELS.index(item.label) if cell in item.affected_cells else 0)
        spans.append((item, ev.cells, start, len(X)))
    return np.asarray(X, np.float32), np.asarray(y, np.int32), spans


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def train_detector(work: Path, recipe: DetectorRecipe, show_progress: bool = True) -> dict:
    import lightgbm

    started = time.perf_counter()
    progress = (lambda s: s) if show_progress else (lambda s: None)
    train = build_cases(recipe.train_items, TRAIN_SEED, progress=progress("train cases"))
    dev = build_cases(recipe.dev_items, DEV_SEED, progress=progress("dev cases"))
    X, y, _ = cell_rows(train, progress("train features"))
    Xd, yd, dev_spans = cell_rows(dev, progress("dev features"))
    params = dict(
        objective="multiclass", num_class=len(LABELS), learning_rate=recipe.learning_rate,
        num_leaves=recipe.num_leaves, min_data_in_leaf=20, bagging_fraction=0.8, bagging_freq=1,
        feature_fraction=0.8, lambda_l2=1.0, deterministic=True, force_row_wise=True,
        num_threads=recipe.threads, seed=recipe.seed, verbose=-1,
    )  # fmt: skip
    booster = lightgbm.train(
        params, lightgbm.Dataset(X, y, feature_name=[f.replace(":", "__") for f in FEATURE_NAMES]),
        recipe.max_rounds, valid_sets=[lightgbm.Dataset(Xd, yd)],
        callbacks=[lightgbm.early_stopping(recipe.early_stopping, verbose=False)],
    )  # fmt: skip
    raw = booster.predict(Xd, raw_score=True, num_iteration=booster.best_iteration)

    def nll(t: float) -> float:
        p = softmax(raw / t)
        return float(-np.log(np.clip(p[np.arange(len(yd)), yd], 1e-12, None)).mean())

    temperature = float(min(TEMPERATURES, key=nll))
    calibrated = softmax(raw / temperature)
    gold, pred = [], []
    for item, cells, a, b in dev_spans:
        gold.append(item.label)
        pred.append(decide(dict(zip(cells, calibrated[a:b])), item.cell_ids)[0])
    (work / MODEL_FILE).write_text(booster.model_to_string(num_iteration=booster.best_iteration))
    facts = {
        "labels": list(LABELS),
        "features": list(FEATURE_NAMES),
        "temperature": temperature,
        "best_iteration": int(booster.best_iteration),
        "train_rows": int(len(y)),
        "dev_rows": int(len(yd)),
        "dev_macro_f1": round(macro_f1(gold, pred), 4),
        "dev_nll": {"raw": round(nll(1.0), 4), "calibrated": round(nll(temperature), 4)},
        "dev_ece": {"raw": round(expected_calibration_error(softmax(raw), yd), 4),
                    "calibrated": round(expected_calibration_error(calibrated, yd), 4)},  # fmt: skip
        "build_seconds": round(time.perf_counter() - started, 1),
        "rebuild_command": "airan model build-detector --export airan/store/detector",
    }
    return facts


def build_detector(out_dir: Path, recipe: DetectorRecipe = DetectorRecipe(), *, force: bool = False,
                   show_progress: bool = True) -> Path:  # fmt: skip
    """Train (or reuse) the detector into `out_dir`; the manifest records the recipe as the request."""
    request = {"name": DETECTOR_NAME, **dataclasses.asdict(recipe), "features": len(FEATURE_NAMES), "labels": list(LABELS)}

    def build(work: Path) -> dict:
        return train_detector(work, recipe, show_progress)  # build_once writes them into the manifest

    return build_once(out_dir, request, build, force=force)
