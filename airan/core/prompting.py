"""Grounded prompts: the controller's KPI context goes into the chat prompt.

The prompt is versioned (answers can be traced to the prompt that made them)
and budgeted in tokens: context rows are dropped oldest first until the prompt
and the answer fit the model's context; the question is never dropped.
Rendering goes through the model's own chat template, so the same code serves
the generated tiny model and real SLMs.

Free text (`qa-v1`) is grounded: the request's KPI evidence and the knowledge
passages its question retrieves (airan/core/retrieval.py) go in under their
ids, most relevant first, until the passage budget or the context is spent.
`build_messages` (the KPI-row prompt) remains for the variants' calibration data.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from airan.core import causes
from airan.core.detector import Detector, DetectorAnswer
from airan.core.diagnosis import (
    COMPACT_PROMPT_VERSION, AnswerGrammar, CompactAnswer, Diagnosis, cell_aliases,
    diagnosis_instructions, parse_compact, playbook_diagnosis,
)  # fmt: skip
from airan.core.evidence import NOTHING_MOVED, Evidence, compute_evidence
from airan.core.knowledge import Passage, evidence_passage, name_like_tokens
from airan.core.retrieval import (
    FREE_TEXT_PROMPT_VERSION, PASSAGE_BUDGET_TOKENS, TOP_K, Citation, KnowledgeIndex, citations_of,
    free_text_messages, packaged_index, select_passages,
)  # fmt: skip
from airan.core.query import KpiSample, Query
from airan.core.routing.types import Priority
from airan.errors import invalid

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
    citable_kpis: tuple[str, ...] = ()  # compact diagnosis: KPIs named in the evidence lines shown
    passages: tuple[Citation, ...] = ()  # free text: the passages shown, which the answer may cite
    # free text: names an answer may use (the knowledge base's and those the prompt shows); others are flagged
    known_names: frozenset[str] = frozenset()


# --- diagnosis: evidence, the detector's opinion and a compact answer -----------------------------

# the causes are not listed: the answer grammar holds them, and every token here is prefill time
DIAGNOSIS_SYSTEM = (
    "Diagnose the cells from the KPI evidence. Answer with the cause, the affected cell letters, then "
    "optionally '; ' and the KPIs that show it."
)
EVIDENCE_LINES = 6


@dataclass(frozen=True)
class DiagnosisContext:
    """What a diagnosis prompt is made of, computed once per request from its KPI context (pure)."""

    aliases: dict[str, str]  # cell id -> letter
    evidence: Evidence
    detector: DetectorAnswer | None
    brief: bool  # near-RT: cause and cells only

    def lines(self, n: int = EVIDENCE_LINES) -> list[tuple[str, str, str | None]]:
        return self.evidence.items(max_lines=n, names=self.aliases)

    def detector_line(self) -> str | None:
        d = self.detector
        if d is None:
            return None
        where = ",".join(self.aliases[c] for c in d.affected_cells if c in self.aliases)
        line = f"Detector: {d.cause} {d.confidence:.2f}" + (f" on {where}" if where else "")
        deciding = d.affected_cells[0] if d.affected_cells else None
        if deciding is None and d.probabilities:
            deciding = max(d.probabilities, key=lambda c: 1.0 - d.probabilities[c].get("NORMAL", 0.0))
        runner_up = [(k, p) for k, p in d.top(deciding, 3) if k != d.cause][:1] if deciding else []
        if runner_up:
            line += f" (next {runner_up[0][0]} {runner_up[0][1]:.2f})"
        return line

    def grammar(self, citable: tuple[str, ...]) -> AnswerGrammar:
        return AnswerGrammar(tuple(causes.CAUSES), tuple(self.aliases.values()), () if self.brief else citable)

    def diagnosis(self, answer: CompactAnswer) -> Diagnosis:
        """The typed diagnosis of a compact answer: playbook, detector confidence, cited evidence."""
        d = self.detector
        confidence = 0.0
        if d is not None:
            cells = answer.cells or tuple(d.probabilities)
            confidence = max((d.probabilities.get(c, {}).get(answer.cause, 0.0) for c in cells), default=0.0)
        items = self.evidence.items(max_lines=len(self.evidence.movements) + 4 * len(self.evidence.cells))
        cited = [line for line, cell, kpi in items if kpi in answer.cited_kpis and (not answer.cells or cell in answer.cells)]
        return replace(
            playbook_diagnosis(answer.cause, answer.cells, confidence, "; ".join(dict.fromkeys(cited))),
            evidence=tuple(self.evidence.lines()),
            detector_cause=d.cause if d else "",
            detector_confidence=d.confidence if d else 0.0,
            cited_kpis=answer.cited_kpis,
        )

    def parse(self, text: str, citable: tuple[str, ...], truncated: bool = False) -> Diagnosis:
        return self.diagnosis(parse_compact(text, self.aliases, () if self.brief else citable, truncated))


def diagnosis_context(query: Query, detector: Detector | None = None) -> DiagnosisContext:
    evidence = compute_evidence(query.kpis)
    aliases = cell_aliases(query.context_cells)
    answer = detector.predict(evidence, query.cell_ids) if detector is not None else None
    return DiagnosisContext(aliases, evidence, answer, query.priority == Priority.NEAR_RT)


def diagnosis_messages(query: Query, ctx: DiagnosisContext, n_lines: int = EVIDENCE_LINES) -> list[dict[str, str]]:
    parts = []
    if ctx.aliases:
        parts.append("Cells: " + ", ".join(f"{a}={c}" for c, a in ctx.aliases.items()))
    lines = [line for line, _, _ in ctx.lines(n_lines)] or [NOTHING_MOVED]
    parts.append("Evidence:\n" + "\n".join(f"- {line}" for line in lines))
    if (line := ctx.detector_line()) is not None:
        parts.append(line)
    parts.append(f"Question: {query.question}")
    if ctx.brief:
        parts.append("Answer with the cause and cells only.")
    return [{"role": "system", "content": DIAGNOSIS_SYSTEM}, {"role": "user", "content": "\n".join(parts)}]


def citable_kpis(ctx: DiagnosisContext, n_lines: int = EVIDENCE_LINES) -> tuple[str, ...]:
    return tuple(dict.fromkeys(kpi for _, _, kpi in ctx.lines(n_lines) if kpi))


FREE_TEXT_EVIDENCE_LINES = 6


def free_text_candidates(query: Query, index: KnowledgeIndex) -> tuple[list[Passage], list]:
    """(passages in the order they earn prompt space, the retrieval hits): the request's KPI evidence
    first (when it sent KPIs), then the top passages its question retrieves (unless retrieval is off)."""
    candidates = []
    if query.kpis:
        candidates.append(evidence_passage(compute_evidence(query.kpis).lines(FREE_TEXT_EVIDENCE_LINES)))
    hits = index.search(query.question, TOP_K) if query.retrieval else []
    return candidates + [h.passage for h in hits], hits


class PromptRenderer:
    """Turns a query into prompt token ids with the model's tokenizer and chat template."""

    def __init__(self, model_path: Path, index: KnowledgeIndex | None = None) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        # built here, at server start, so no request pays for it
        self.index = index if index is not None else packaged_index()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, query: Query, budget_tokens: int, diagnosis: DiagnosisContext | None = None) -> RenderedPrompt:
        if diagnosis is not None:
            return self._render_diagnosis(query, budget_tokens, diagnosis)
        return self._render_free_text(query, budget_tokens)

    def _render_free_text(self, query: Query, budget_tokens: int) -> RenderedPrompt:
        """Passages in order of relevance while they fit the passage budget and the context; the
        question is never dropped."""
        candidates, hits = free_text_candidates(query, self.index)

        def ids_for(passages: list[Passage]) -> list[int]:
            return self._chat_ids(free_text_messages(query.question, passages, query.site_ids, query.cell_ids,
                                                     query.recent_events))  # fmt: skip

        bare = ids_for([])
        if len(bare) > budget_tokens:
            raise invalid(
                f"the question alone makes a {len(bare)}-token prompt, over the {budget_tokens} tokens left for "
                "it in the model's context after max_tokens: shorten the question or lower max_tokens"
            )
        chosen = select_passages(candidates, min(PASSAGE_BUDGET_TOKENS, budget_tokens - len(bare)), self.count_tokens)
        ids = ids_for(chosen)
        while len(ids) > budget_tokens and chosen:  # the template's joins may cost a few tokens more
            chosen = chosen[:-1]
            ids = ids_for(chosen)
        shown = free_text_messages(query.question, chosen, query.site_ids, query.cell_ids, query.recent_events)
        known = self.index.kb.known_names() | frozenset(name_like_tokens(" ".join(m["content"] for m in shown)))
        return RenderedPrompt(ids, len(candidates), len(candidates) - len(chosen), FREE_TEXT_PROMPT_VERSION,
                              passages=citations_of(chosen, hits), known_names=known)  # fmt: skip

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _render_diagnosis(self, query: Query, budget_tokens: int, ctx: DiagnosisContext) -> RenderedPrompt:
        """Evidence lines are dropped least salient first until the prompt fits; the question never is."""
        shown = len(ctx.lines())
        for n in range(shown, -1, -1):  # bounded by EVIDENCE_LINES
            ids = self._chat_ids(diagnosis_messages(query, ctx, n))
            if len(ids) <= budget_tokens:
                return RenderedPrompt(ids, shown, shown - n, COMPACT_PROMPT_VERSION, citable_kpis(ctx, n))
        raise invalid(
            f"the question alone makes a {len(ids)}-token diagnosis prompt, over the {budget_tokens} tokens "
            "left for it: shorten the question"
        )
