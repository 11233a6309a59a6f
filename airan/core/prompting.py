"""Grounded prompts: the controller's KPI context goes into the chat prompt.

The prompt is versioned (answers can be traced to the prompt that made them)
and budgeted in tokens: context rows are dropped oldest first until the prompt
and the answer fit the model's context; the question is never dropped.
Rendering goes through the model's own chat template, so the same code serves
the generated tiny model and real SLMs.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from airan.core.diagnosis import diagnosis_instructions
from airan.errors import invalid
from airan.core.query import KpiSample, Query

PROMPT_VERSION = "netops-v2"
SYSTEM_PROMPT = (
    "You are a radio access network operations assistant running at a base station. "
    "Answer the controller's question using only the KPI context given. "
    "Name the cells involved, state the most likely cause and one concrete action. "
    "If the KPIs do not support a conclusion, say so. Be brief."
)


def kpi_rows(kpis: tuple[KpiSample, ...]) -> list[str]:
    """One row per (cell, sample time), oldest first: `cell @hh:mm:ss: name=value unit; ...`."""
    rows: dict[tuple[str, float | None], list[str]] = defaultdict(list)
    for k in kpis:
        rows[(k.cell_id or "-", k.time_s)].append(f"{k.name}={k.value:.4g}{' ' + k.unit if k.unit else ''}")
    ordered = sorted(rows.items(), key=lambda item: -1.0 if item[0][1] is None else item[0][1])
    out = []
    for (cell, t), pairs in ordered:
        when = f" @{time.strftime('%H:%M:%S', time.gmtime(t))}" if t is not None else ""
        out.append(f"{cell}{when}: " + "; ".join(pairs))
    return out


def context_rows(query: Query) -> list[tuple[str, str]]:
    """(section, row) pairs in drop order: KPI rows oldest first, then events oldest first."""
    return [("kpi", r) for r in kpi_rows(query.kpis)] + [("event", e) for e in query.recent_events]


def build_messages(query: Query, rows: list[tuple[str, str]] | None = None) -> list[dict[str, str]]:
    rows = context_rows(query) if rows is None else rows
    parts = []
    if query.site_ids:
        parts.append(f"Sites: {', '.join(query.site_ids)}")
    if query.cell_ids:
        parts.append(f"Cells: {', '.join(query.cell_ids)}")
    kpis = [r for section, r in rows if section == "kpi"]
    events = [r for section, r in rows if section == "event"]
    if kpis:
        parts.append("KPI context (E2SM-KPM):\n" + "\n".join(kpis))
    if events:
        parts.append("Recent events:\n" + "\n".join(events))
    parts.append(f"Question: {query.question}")
    system = SYSTEM_PROMPT
    if query.mode == "diagnosis":
        system += " " + diagnosis_instructions()
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(parts)}]


@dataclass(frozen=True)
class RenderedPrompt:
    token_ids: list[int]
    context_rows: int
    context_rows_dropped: int
    version: str = PROMPT_VERSION


class PromptRenderer:
    """Turns a query into prompt token ids with the model's tokenizer and chat template."""

    def __init__(self, model_path: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))

    def _ids(self, query: Query, rows: list[tuple[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            build_messages(query, rows), add_generation_prompt=True, tokenize=True
        )
        # transformers may hand back a BatchEncoding-like mapping
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def render(self, query: Query, budget_tokens: int) -> RenderedPrompt:
        rows = context_rows(query)
        ids = self._ids(query, rows)
        if len(ids) <= budget_tokens:
            return RenderedPrompt(ids, len(rows), 0)
        # the largest number of newest rows that fits (prompt length grows with rows kept)
        lo, hi = 0, len(rows) - 1
        best = None
        while lo <= hi:
            keep = (lo + hi) // 2
            candidate = self._ids(query, rows[len(rows) - keep :] if keep else [])
            if len(candidate) <= budget_tokens:
                best, lo = (keep, candidate), keep + 1
            else:
                hi = keep - 1
        if best is None:
            raise invalid(
                f"the question alone makes a {len(self._ids(query, []))}-token prompt, over the "
                f"{budget_tokens} tokens left for it in the model's context after max_tokens: "
                "shorten the question or lower max_tokens"
            )
        keep, ids = best
        return RenderedPrompt(ids, len(rows), len(rows) - keep)
