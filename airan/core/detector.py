"""The fast detector: gradient-boosted trees over the evidence features, one cell at a time.

It answers in about a millisecond, so it is both the baseline every
evaluation reports and evidence the language model sees. A request-level
answer comes from the per-cell probabilities by `decide`, a pure function.
The trees are a LightGBM text model (diffable, no pickle) with a temperature
fitted on the development set, so its probabilities are calibrated.
Training lives in the factory (`airan model build-detector`).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from airan.core.causes import CAUSES, LABELS
from airan.core.evidence import FEATURE_NAMES, Evidence, cell_features

MODEL_FILE = "model.txt"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class DetectorAnswer:
    cause: str
    affected_cells: tuple[str, ...]
    confidence: float  # the cause's calibrated probability on the deciding cell
    probabilities: dict[str, dict[str, float]]  # cell -> label -> probability

    def top(self, cell: str, n: int = 2) -> list[tuple[str, float]]:
        probs = self.probabilities.get(cell, {})
        return sorted(probs.items(), key=lambda kv: -kv[1])[:n]

    def summary(self) -> str:
        """One line for a prompt: `detector: CONGESTION 0.93 on bs-01/c1`."""
        where = f" on {', '.join(self.affected_cells)}" if self.affected_cells else ""
        return f"detector: {self.cause} {self.confidence:.2f}{where}"


def decide(probabilities: dict[str, np.ndarray], asked_cells: Sequence[str] = ()) -> tuple[str, tuple[str, ...], float]:
    """(cause, affected cells, confidence) from per-cell label probabilities (each a vector over LABELS).

    A question about named cells is answered for them; a site question for the cell that looks
    worst. Affected cells are the candidates whose most likely label is the chosen cause.
    """
    cells = [c for c in asked_cells if c in probabilities] or sorted(probabilities)
    if not cells:
        return "UNKNOWN", (), 0.0
    normal = LABELS.index("NORMAL")

    def worst(cell: str) -> float:
        p = probabilities[cell]
        return float(np.delete(p, normal).max())

    deciding = max(cells, key=worst)
    p = probabilities[deciding]
    label = int(np.argmax(p))
    cause = LABELS[label]
    if cause == "NORMAL":
        return "NORMAL", (), float(p[normal])
    affected = tuple(c for c in sorted(probabilities) if int(np.argmax(probabilities[c])) == label)
    return cause, affected, float(p[label])


class Detector:
    """A trained LightGBM booster plus its temperature; `predict` takes an `Evidence`."""

    def __init__(self, booster, temperature: float = 1.0, manifest: dict | None = None) -> None:
        self.booster = booster
        self.temperature = float(temperature)
        self.manifest = manifest or {}

    @staticmethod
    def load(directory: str | Path) -> Detector:
        import lightgbm

        directory = Path(directory)
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        if tuple(manifest["labels"]) != LABELS or tuple(manifest["features"]) != FEATURE_NAMES:
            raise ValueError(
                f"{directory} was trained on other labels or features than this airan has: "
                "rebuild it with `airan model build-detector`"
            )
        booster = lightgbm.Booster(model_str=(directory / MODEL_FILE).read_text())
        return Detector(booster, manifest["temperature"], manifest)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(n, len(LABELS)) calibrated probabilities for rows of cell features."""
        # one thread: a few rows take microseconds, while OpenMP threads would wait on cores vLLM holds
        raw = self.booster.predict(np.atleast_2d(features), raw_score=True, num_threads=1)
        return softmax(np.asarray(raw, dtype=np.float64) / self.temperature)

    def predict(self, evidence: Evidence, asked_cells: Sequence[str] = ()) -> DetectorAnswer:
        cells = list(evidence.cells)
        if not cells:
            return DetectorAnswer("UNKNOWN", (), 0.0, {})
        probs = self.probabilities(np.vstack([cell_features(evidence, c) for c in cells]))
        by_cell = dict(zip(cells, probs))
        cause, affected, confidence = decide(by_cell, asked_cells)
        table = {c: {label: round(float(p), 4) for label, p in zip(LABELS, row)} for c, row in by_cell.items()}
        return DetectorAnswer(cause, affected, confidence, table)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def playbook_action(cause: str) -> tuple[str, int | None]:
    """The first playbook action of a cause (the detector's answer carries it)."""
    return CAUSES[cause].actions[0]
