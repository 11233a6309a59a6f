"""Grounded prompts: the controller's KPI context goes into the chat prompt.

Rendering goes through the model's own chat template, so the same code serves
the generated tiny model and real SLMs.
"""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

from airan.query import KpiSample, Query

PROMPT_VERSION = "netops-v1"
SYSTEM_PROMPT = (
    "You are a radio access network operations assistant running at a base station. "
    "Answer the controller's question using only the KPI context given. "
    "Name the cells involved, state the most likely cause and one concrete action. "
    "If the KPIs do not support a conclusion, say so. Be brief."
)


def format_kpis(kpis: tuple[KpiSample, ...]) -> str:
    """One line per cell (and sample time), `name=value unit` pairs: compact and readable."""
    rows: dict[tuple[str, float | None], list[str]] = defaultdict(list)
    for k in kpis:
        value = f"{k.value:.4g}"
        rows[(k.cell_id or "-", k.time_s)].append(f"{k.name}={value}{' ' + k.unit if k.unit else ''}")
    lines = []
    for (cell, t), pairs in rows.items():
        when = time.strftime("%H:%M:%S", time.gmtime(t)) if t is not None else ""
        lines.append(f"{cell}{' @' + when if when else ''}: " + "; ".join(pairs))
    return "\n".join(lines)


def build_messages(query: Query) -> list[dict[str, str]]:
    parts = []
    if query.site_ids:
        parts.append(f"Sites: {', '.join(query.site_ids)}")
    if query.cell_ids:
        parts.append(f"Cells: {', '.join(query.cell_ids)}")
    if query.kpis:
        parts.append("KPI context (E2SM-KPM):\n" + format_kpis(query.kpis))
    parts.append(f"Question: {query.question}")
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "\n".join(parts)},
    ]


class PromptRenderer:
    """Turns a query into prompt token ids with the model's tokenizer and chat template."""

    def __init__(self, model_path: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))

    def render(self, query: Query) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            build_messages(query), add_generation_prompt=True, tokenize=True
        )
        # transformers may hand back a BatchEncoding-like mapping
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
