"""Eval output: summary.json, a rich/markdown table per test set, a macro-F1 PNG (CI bars) and a
confusion-matrix PNG per set, predictions JSONL."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from airan.evaluation.metrics import PREDICTED, MethodReport, confusion_matrix

SUMMARY_FILE = "summary.json"
PREDICTIONS_FILE = "predictions.jsonl"


def clean(x):
    """Strict JSON has no NaN/inf: NaN (a percentile of no answers) -> null, inf (a rule never firing) -> "inf"."""
    if isinstance(x, float):
        return None if math.isnan(x) else (x if math.isfinite(x) else ("inf" if x > 0 else "-inf"))
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.2f}" if x < 10 else f"{x:,.0f}"


def _f1(m: dict) -> str:
    lo, hi = m["macro_f1_ci95"]
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return f"{m['macro_f1']:.3f}"
    return f"{m['macro_f1']:.3f} [{lo:.3f}, {hi:.3f}]"


HEAD = ["method", "n", "macro-F1 [95% CI]", "cell F1", "action acc", "faithful", "NORMAL recall", "prompt tok p50",
        "p50 ms", "p95 ms", "invalid/err"]  # fmt: skip


def set_rows(set_summary: dict) -> list[list[str]]:
    """Table rows of one set of summary.json."""
    rows = []
    for method, m in set_summary["methods"].items():
        d = set_summary.get("details", {}).get(method, {})
        tokens = m["prompt_tokens_p50"]
        rows.append([
            method, str(m["n"]), _f1(m), f"{m['cell_f1']:.3f}", _pct(m["action_accuracy"]), _pct(m["faithfulness"]),
            _pct(m["normal_recall"]), "-" if tokens is None else f"{tokens:.0f}", _ms(m["latency_p50_ms"]),
            _ms(m["latency_p95_ms"]), f"{d.get('invalid', 0)}/{d.get('errors', 0)}",
        ])  # fmt: skip
    return rows


def markdown_summary(summary: dict) -> str:
    out = []
    for name, s in summary["sets"].items():
        out.append(f"**{name}** ({s['n']} items)\n")
        out.append("| " + " | ".join(HEAD) + " |")
        out.append("|" + "---|" * len(HEAD))
        out += ["| " + " | ".join(r) + " |" for r in set_rows(s)]
        out.append("")
    return "\n".join(out)


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    # a log file or CI has no terminal width: do not squeeze the table into 80 columns
    console = Console() if sys.stdout.isatty() else Console(width=170)
    for name, s in summary["sets"].items():
        table = Table(title=f"NetOps diagnosis, {name} set ({s['n']} items)")
        for k, h in enumerate(HEAD):
            table.add_column(h, justify="left" if k == 0 else "right")
        for row in set_rows(s):
            table.add_row(*row)
        console.print(table)
        for method, m in s["methods"].items():
            per = ", ".join(f"{c} {f:.2f}" for c, f in m["per_class_f1"].items())
            console.print(f"[dim]{method} per-class F1: {per}[/dim]")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on the sites or in CI
    import matplotlib.pyplot as plt

    return plt


def save_f1_png(set_name: str, set_summary: dict, path: str | Path) -> Path:
    """Macro-F1 per method with its bootstrap 95% CI as error bars."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    methods = list(set_summary["methods"])
    f1 = [set_summary["methods"][m]["macro_f1"] for m in methods]
    ci = [set_summary["methods"][m]["macro_f1_ci95"] for m in methods]
    lower = [max(0.0, f - (lo if lo is not None else f)) for f, (lo, _) in zip(f1, ci)]
    upper = [max(0.0, (hi if hi is not None else f) - f) for f, (_, hi) in zip(f1, ci)]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(methods) + 2), 4.2))
    bars = ax.bar(range(len(methods)), f1, yerr=[lower, upper], capsize=6, color="#4c72b0")
    for b, f in zip(bars, f1):
        ax.text(b.get_x() + b.get_width() / 2, 0.02, f"{f:.2f}", ha="center", va="bottom", color="white", fontsize=9)
    ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("macro-F1 (95% bootstrap CI)")
    ax.set_title(f"{set_name} set, {set_summary['n']} items")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_confusion_png(set_result, path: str | Path, title: str = "") -> Path:
    """One confusion-matrix panel per method of a `SetResult` (rows: labels; columns: answers seen)."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gold = [i.label for i in set_result.items]
    labels = [c for c in PREDICTED if c in set(gold)]
    methods = list(set_result.predictions)
    answered = {m: [p.cause for p in set_result.predictions[m]] for m in methods}
    cols = [c for c in PREDICTED if c in labels or c == "UNKNOWN" or any(c in a for a in answered.values())]
    fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(5.2 * max(1, len(methods)), 5.0), squeeze=False)
    for ax, method in zip(axes[0], methods):
        m = confusion_matrix(gold, answered[method], labels, cols)
        top = max((max(row) for row in m), default=1) or 1
        ax.imshow(m, cmap="Blues", vmin=0, vmax=top)
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                            color="white" if v > 0.6 * top else "black")  # fmt: skip
        ax.set_xticks(range(len(cols)), [c.replace("_", " ").lower() for c in cols], rotation=60, ha="right",
                      fontsize=8)  # fmt: skip
        ax.set_yticks(range(len(labels)), [c.replace("_", " ").lower() for c in labels], fontsize=8)
        ax.set_xlabel("answered")
        ax.set_ylabel("injected (label)")
        f1 = set_result.scores[method].macro_f1 if method in set_result.scores else float("nan")
        ax.set_title(f"{method}\nmacro-F1 {f1:.2f}", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(obj: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(obj), indent=2, allow_nan=False) + "\n")
    return path


def write_predictions(evaluation, path: str | Path) -> Path:
    """One line per (set, method, item): the label next to the answer, for reading the mistakes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for name, s in evaluation.sets.items():
            label = {i.item_id: i for i in s.items}
            for method, preds in s.predictions.items():
                for p in preds:
                    i = label[p.item_id]
                    row = {"set": name, "method": method, "label": i.label, "label_cells": i.affected_cells,
                           "question": i.question, **asdict(p)}  # fmt: skip
                    f.write(json.dumps(clean(row)) + "\n")
    return path


def write_outputs(evaluation, out_dir: str | Path) -> list[Path]:
    """summary.json, predictions.jsonl, and per set macro_f1_<set>.png and confusion_<set>.png."""
    out = Path(out_dir)
    summary = evaluation.summary()
    paths = [write_json(summary, out / SUMMARY_FILE), write_predictions(evaluation, out / PREDICTIONS_FILE)]
    for name, s in evaluation.sets.items():
        if not s.predictions:
            continue
        paths.append(save_f1_png(name, summary["sets"][name], out / f"macro_f1_{name}.png"))
        paths.append(save_confusion_png(s, out / f"confusion_{name}.png", title=f"{name} set, {len(s.items)} items"))
    return paths


# --- legacy: MethodReport tables (`airan eval adapter`) -------------------------------------------------


def table_rows(reports: list[MethodReport]) -> tuple[list[str], list[list[str]]]:
    head = ["method", "n", "accuracy", "macro-F1", "validity", "abstain", "invalid/err", "cell P/R",
            "p50 ms", "p95 ms", "tok/s"]  # fmt: skip
    rows = []
    for r in reports:
        rows.append([
            r.method, str(r.n), _pct(r.accuracy), f"{r.macro_f1:.3f}", _pct(r.validity),
            str(r.abstentions), f"{r.invalid}/{r.errors}", f"{r.cell_precision:.2f}/{r.cell_recall:.2f}",
            _ms(r.latency_p50_ms), _ms(r.latency_p95_ms), "-" if r.tok_s is None else f"{r.tok_s:.0f}",
        ])  # fmt: skip
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
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table)
    for r in reports:
        per = ", ".join(f"{c} {s.f1:.2f}" for c, s in r.per_class.items())
        console.print(f"[dim]{r.method} per-class F1: {per}[/dim]")
