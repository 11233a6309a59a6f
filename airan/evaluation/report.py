"""Eval output: a rich table, a confusion-matrix PNG (one panel per method), JSON and JSONL."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from airan.evaluation.metrics import PREDICTED, MethodReport, Prediction

METHOD_TITLES = {
    "rules": "(a) KPI-threshold rules",
    "free_text": "(b) model, free text",
    "diagnosis": "(c) model, grounded + constrained",
}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.2f}" if x < 10 else f"{x:,.0f}"


def table_rows(reports: list[MethodReport]) -> tuple[list[str], list[list[str]]]:
    head = ["method", "n", "accuracy", "macro-F1", "validity", "abstain", "invalid/err", "cell P/R",
            "p50 ms", "p95 ms", "tok/s"]
    rows = []
    for r in reports:
        rows.append([
            METHOD_TITLES.get(r.method, r.method), str(r.n), _pct(r.accuracy), f"{r.macro_f1:.3f}", _pct(r.validity),
            str(r.abstentions), f"{r.invalid}/{r.errors}", f"{r.cell_precision:.2f}/{r.cell_recall:.2f}",
            _ms(r.latency_p50_ms), _ms(r.latency_p95_ms), "-" if r.tok_s is None else f"{r.tok_s:.0f}",
        ])
    return head, rows


def markdown_table(reports: list[MethodReport]) -> str:
    head, rows = table_rows(reports)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(reports: list[MethodReport], title: str = "NetOps evaluation") -> None:
    from rich.console import Console
    from rich.table import Table

    head, rows = table_rows(reports)
    table = Table(title=title)
    for k, h in enumerate(head):
        table.add_column(h, justify="left" if k == 0 else "right")
    for row in rows:
        table.add_row(*row)
    # a log file or CI has no terminal width: do not squeeze the table into 80 columns
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table)
    for r in reports:
        per = ", ".join(f"{c} {s.f1:.2f}" for c, s in r.per_class.items())
        console.print(f"[dim]{METHOD_TITLES.get(r.method, r.method)} per-class F1: {per}[/dim]")


def used_columns(reports: list[MethodReport]) -> list[str]:
    """Predicted columns worth a panel column: the labels, UNKNOWN, and INVALID/ERROR when they occur."""
    labels = reports[0].labels if reports else ()
    cols = []
    for j, c in enumerate(PREDICTED):
        seen = any(sum(row[j] for row in r.confusion) for r in reports)
        if c in labels or c == "UNKNOWN" or seen:
            cols.append(c)
    return cols


def save_confusion_png(reports: list[MethodReport], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on the sites or in CI
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = used_columns(reports)
    idx = [PREDICTED.index(c) for c in cols]
    fig, axes = plt.subplots(1, len(reports), figsize=(5.2 * len(reports), 5.0), squeeze=False)
    for ax, r in zip(axes[0], reports):
        m = [[row[j] for j in idx] for row in r.confusion]
        top = max((max(row) for row in m), default=1) or 1
        ax.imshow(m, cmap="Blues", vmin=0, vmax=top)
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                            color="white" if v > 0.6 * top else "black")
        ax.set_xticks(range(len(cols)), [c.replace("_", " ").lower() for c in cols], rotation=60, ha="right",
                      fontsize=8)
        ax.set_yticks(range(len(r.labels)), [c.replace("_", " ").lower() for c in r.labels], fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("injected (label)")
        ax.set_title(f"{METHOD_TITLES.get(r.method, r.method)}\nacc {100 * r.accuracy:.0f}%, "
                     f"macro-F1 {r.macro_f1:.2f}", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(result, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(result.to_json()), indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


def write_predictions(predictions: dict[str, list[Prediction]], items, path: str | Path) -> Path:
    """One line per (method, item): the label next to the answer, for reading the mistakes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    label = {i.item_id: (i.label, i.affected_cells, i.question) for i in items}
    with path.open("w") as f:
        for method, preds in predictions.items():
            for p in preds:
                gold, cells, question = label[p.item_id]
                row = {"method": method, "label": gold, "label_cells": cells, "question": question, **asdict(p)}
                f.write(json.dumps(row, sort_keys=True) + "\n")
    return path


def _clean(x):
    """Strict JSON has no NaN/inf: NaN (a percentile of no answers) -> null, inf (a rule never firing) -> "inf"."""
    if isinstance(x, float):
        return None if math.isnan(x) else (x if math.isfinite(x) else ("inf" if x > 0 else "-inf"))
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x
