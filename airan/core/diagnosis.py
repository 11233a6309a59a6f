"""Structured NetOps diagnoses: the JSON schema the model decodes under, and its validation.

A RAN controller is a program, so in diagnosis mode the answer is typed: a
cause from the simulator's event vocabulary, the affected cells (only cells
the request mentioned), a severity, bounded actions, a confidence and a short
rationale. The schema is built per request so constrained decoding cannot
name a cell that is not in the context; `parse_diagnosis` re-checks every
rule, so an invalid answer is never returned as success.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import jsonschema

from airan.core import causes

# The vocabulary (causes, severities, actions and their bounds, wording, keywords) is the table in
# airan/core/causes.py; the functions below read it when called. Views kept for importers:
CAUSES: tuple[str, ...] = tuple(causes.CAUSES)  # the simulator's event kinds, plus NORMAL and UNKNOWN (abstain)
# legacy view for importers still on the tuple format: action -> (parameter, unit, min, max, needs a target
# cell), None = no parameter. New code reads causes.ACTIONS (ActionSpec).
ACTIONS: dict[str, tuple[str, str, int, int, bool] | None] = {
    a.name: None if a.parameter is None else (a.parameter, a.unit, a.minimum, a.maximum, a.needs_target_cell)
    for a in causes.ACTIONS.values()
}
MAX_AFFECTED_CELLS = 4
MAX_ACTIONS = 2
RATIONALE_CHARS = 120
# default answer budget: the bounded schema's answers seen here took 80-130 tokens
DIAGNOSIS_MAX_TOKENS = 160
# below this even the shortest valid JSON answer cannot finish
DIAGNOSIS_MIN_TOKENS = 64


class InvalidDiagnosis(ValueError):
    """The model's output is not a valid diagnosis; the message says which rule failed."""


@dataclass(frozen=True)
class Action:
    type: str
    target_cell_id: str = ""
    value: float = 0.0
    unit: str = ""


@dataclass(frozen=True)
class Diagnosis:
    cause: str
    affected_cell_ids: tuple[str, ...]
    severity: str
    actions: tuple[Action, ...]
    confidence: float  # 0..1
    rationale: str
    # compact path: what the model was shown, the detector's own answer, the KPIs the model cited
    evidence: tuple[str, ...] = ()
    detector_cause: str = ""
    detector_confidence: float = 0.0
    cited_kpis: tuple[str, ...] = ()

    @property
    def abstained(self) -> bool:
        return self.cause == "UNKNOWN"


def _action_schemas(cells: list[str]) -> list[dict]:
    out = []
    for a in causes.ACTIONS.values():
        props: dict = {"type": {"const": a.name}}
        required = ["type"]
        if a.parameter is not None:
            if a.needs_target_cell:
                if not cells:
                    continue  # no cell in context to act on
                props["target_cell"] = {"enum": cells}
                required.append("target_cell")
            props[a.parameter] = {"type": "integer", "minimum": a.minimum, "maximum": a.maximum}
            required.append(a.parameter)
        out.append({"type": "object", "properties": props, "required": required, "additionalProperties": False})
    return out


def diagnosis_schema(context_cells: list[str]) -> dict:
    """JSON schema for one answer; cells are limited to those in the request's context."""
    cells = sorted(set(context_cells))
    return {
        "type": "object",
        "properties": {
            "cause": {"enum": list(causes.CAUSES)},
            "affected_cells": {
                "type": "array",
                "items": {"enum": cells} if cells else {"type": "string", "maxLength": 0},
                "maxItems": MAX_AFFECTED_CELLS if cells else 0,
            },
            "severity": {"enum": list(causes.SEVERITIES)},
            "actions": {"type": "array", "items": {"anyOf": _action_schemas(cells)}, "minItems": 1, "maxItems": MAX_ACTIONS},
            "confidence_pct": {"type": "integer", "minimum": 0, "maximum": 100},
            "rationale": {"type": "string", "maxLength": RATIONALE_CHARS},
        },
        "required": ["cause", "affected_cells", "severity", "actions", "confidence_pct", "rationale"],
        "additionalProperties": False,
    }


def parse_diagnosis(text: str, context_cells: list[str]) -> Diagnosis:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidDiagnosis(f"not JSON ({e.msg} at char {e.pos})") from None
    try:
        jsonschema.validate(raw, diagnosis_schema(context_cells))
    except jsonschema.ValidationError as e:
        where = "/".join(map(str, e.absolute_path)) or "<root>"
        raise InvalidDiagnosis(f"{where}: {e.message[:200]}") from None
    # the grammar cannot express uniqueness; a repeat says nothing new, so drop it
    cells = tuple(dict.fromkeys(raw["affected_cells"]))
    unique_actions = {json.dumps(a, sort_keys=True): a for a in raw["actions"]}.values()
    actions = []
    for a in unique_actions:
        spec = causes.ACTIONS[a["type"]]
        if spec.parameter is None:
            actions.append(Action(a["type"]))
        else:
            actions.append(Action(a["type"], a.get("target_cell", ""), float(a[spec.parameter]), spec.unit))
    return Diagnosis(
        cause=raw["cause"],
        affected_cell_ids=cells,
        severity=raw["severity"],
        actions=tuple(actions),
        confidence=raw["confidence_pct"] / 100.0,
        rationale=raw["rationale"].strip(),
    )


def diagnosis_instructions() -> str:
    guide = "\n".join(f"- {c.name}: {c.wording}" for c in causes.CAUSES.values())
    actions = ", ".join(causes.ACTIONS)
    return (
        "Reply with one JSON object only: cause, affected_cells (cell ids from the context), severity "
        f"({', '.join(causes.SEVERITIES)}), actions (from: {actions}), confidence_pct (0-100) and a short rationale "
        f"citing the KPIs.\nCauses:\n{guide}"
    )


def cause_from_text(text: str) -> str:
    """Read a cause out of a free-text answer (the free-text baseline's scoring): the cause whose
    keyword (causes.CAUSES[...].keywords) appears first; UNKNOWN when none does."""
    lowered = text.lower()
    hits = {c.name: min((lowered.find(k) for k in c.keywords if k in lowered), default=-1) for c in causes.CAUSES.values()}
    found = {c: pos for c, pos in hits.items() if pos >= 0}
    return min(found, key=found.get) if found else "UNKNOWN"


# --- the compact answer: what the served model emits ----------------------------------------------
#
# A JSON key costs a decode step, and a near-RT loop has a second. So the model emits only what needs
# judgement: the cause, the affected cells by a one-letter alias, and (when the budget allows) the KPIs it
# cites, e.g. `CONGESTION A; RRU.PrbTotDl, DRB.UEThpDl`. Severity and the action with its parameter come
# from the cause's playbook (airan/core/causes.py); the rationale is the evidence of the cited KPIs; the
# confidence is the detector's calibrated probability of the chosen cause. Constrained decoding keeps the
# answer inside `AnswerGrammar`, and `parse_compact` re-checks it.

COMPACT_PROMPT_VERSION = "netops-v3"
ALIASES = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I or O: they read like 1 and 0
MAX_CITED_KPIS = 3
MAX_LISTED_CELLS = 8  # up to 8 cells the grammar lists every ordered subset (162 at most)
COMPACT_RATIONALE_CHARS = 240  # up to three evidence lines
# budgets: a brief answer is a cause and a few aliases; a full one adds up to three KPI names
BRIEF_MAX_TOKENS = 16
FULL_MAX_TOKENS = 64


def cell_aliases(cells: list[str]) -> dict[str, str]:
    """Cell id -> one letter, in sorted cell order (at most len(ALIASES) cells get one)."""
    return {cell: ALIASES[i] for i, cell in enumerate(sorted(set(cells))[: len(ALIASES)])}


@dataclass(frozen=True)
class AnswerGrammar:
    """The compact answer's language for one request: causes, the context's cell aliases, citable KPIs."""

    causes: tuple[str, ...]
    aliases: tuple[str, ...]
    kpis: tuple[str, ...] = ()  # citable KPI names (those in the evidence); empty = a brief answer

    # Cells and citations are distinct and in the prompt's order: a model decoding greedily under a
    # grammar that allowed repeats ran every answer to its longest form ("A,A,A,A"), a decode step each.
    def cell_lists(self) -> list[str]:
        return _ordered_subsets(self.aliases, MAX_AFFECTED_CELLS, ",")

    def citation_lists(self) -> list[str]:
        return _ordered_subsets(self.kpis, MAX_CITED_KPIS, ", ")

    def regex(self) -> str:
        def alt(words) -> str:
            return "(" + "|".join(_regex_literal(w) for w in words) + ")"

        events = [c for c in self.causes if c not in ("NORMAL", "UNKNOWN")]
        plain = [c for c in self.causes if c in ("NORMAL", "UNKNOWN")]
        if len(self.aliases) > MAX_LISTED_CELLS:  # too many subsets to list: any letters (rare: > 8 cells)
            letter = alt(self.aliases)
            cells = f" {letter}(,{letter}){{0,{MAX_AFFECTED_CELLS - 1}}}"
        else:
            cells = f" {alt(self.cell_lists())}" if self.aliases else ""
        cite = f"(; {alt(self.citation_lists())})?" if self.kpis else ""
        return "(" + "|".join([*plain, f"{alt(events)}{cells}{cite}"]) + ")"

    def gbnf(self) -> str:
        """The same language as a llama.cpp GBNF grammar."""

        def alt(words) -> str:
            return " | ".join(json.dumps(w) for w in words)

        events = [c for c in self.causes if c not in ("NORMAL", "UNKNOWN")]
        plain = [c for c in self.causes if c in ("NORMAL", "UNKNOWN")]
        event = "cause" + (' " " cells' if self.aliases else "") + (' ("; " cite)?' if self.kpis else "")
        lines = [f"root ::= {alt(plain)} | event", f"event ::= {event}", f"cause ::= {alt(events)}"]
        if len(self.aliases) > MAX_LISTED_CELLS:
            more = ' ("," alias)?' * (MAX_AFFECTED_CELLS - 1)
            lines += [f"cells ::= alias{more}", f"alias ::= {alt(self.aliases)}"]
        elif self.aliases:
            lines.append(f"cells ::= {alt(self.cell_lists())}")
        if self.kpis:
            lines.append(f"cite ::= {alt(self.citation_lists())}")
        return "\n".join(lines) + "\n"


def _regex_literal(text: str) -> str:
    """Escape what is special in a regex, and nothing else (xgrammar warns on escaped spaces)."""
    return "".join("\\" + ch if ch in ".^$*+?{}[]\\|()" else ch for ch in text)


def _ordered_subsets(items: tuple[str, ...], most: int, sep: str) -> list[str]:
    """Every non-empty subset of up to `most` items, each in the items' order, joined by `sep`."""
    from itertools import combinations

    return [sep.join(c) for n in range(1, min(most, len(items)) + 1) for c in combinations(items, n)]


@dataclass(frozen=True)
class CompactAnswer:
    cause: str
    cells: tuple[str, ...]  # cell ids
    cited_kpis: tuple[str, ...]


def parse_compact(
    text: str, aliases: dict[str, str], citable: tuple[str, ...] = (), truncated: bool = False
) -> CompactAnswer:
    """`CAUSE [A,B][; KPI, KPI]` -> cause, cell ids, cited KPIs; InvalidDiagnosis says which rule failed.

    `truncated`: the answer hit max_tokens, so a last citation cut short (a prefix of a citable KPI) is dropped.
    """
    head, _, cited = text.strip().partition(";")
    words = head.split()
    if not words or words[0] not in causes.CAUSES:
        raise InvalidDiagnosis(f"no known cause at the start of {text[:60]!r}")
    cause = words[0]
    cell_of = {a: c for c, a in aliases.items()}
    letters = [x for w in words[1:] for x in w.split(",") if x]
    unknown = [x for x in letters if x not in cell_of]
    if unknown:
        raise InvalidDiagnosis(f"cell alias(es) {unknown} not in the context ({', '.join(cell_of)})")
    if cause in ("NORMAL", "UNKNOWN") and letters:
        raise InvalidDiagnosis(f"{cause} names no cells")
    kpis = tuple(dict.fromkeys(k.strip() for k in cited.split(",") if k.strip()))
    if truncated and kpis and kpis[-1] not in citable and any(c.startswith(kpis[-1]) for c in citable):
        kpis = kpis[:-1]
    stray = [k for k in kpis if citable and k not in citable]
    if stray:
        raise InvalidDiagnosis(f"cited KPI(s) {stray} are not in the evidence")
    return CompactAnswer(cause, tuple(dict.fromkeys(cell_of[x] for x in letters)), kpis[:MAX_CITED_KPIS])


def compact_text(cause: str, cells: tuple[str, ...], aliases: dict[str, str], cited: tuple[str, ...] = ()) -> str:
    """The training target for an answer (the inverse of `parse_compact`)."""
    text = cause
    if cells and cause not in ("NORMAL", "UNKNOWN"):
        text += " " + ",".join(aliases[c] for c in sorted(cells, key=lambda c: aliases[c]))
    if cited:
        text += "; " + ", ".join(cited)
    return text


def playbook_diagnosis(
    cause: str, cells: tuple[str, ...], confidence: float, rationale: str = ""
) -> Diagnosis:
    """A full typed diagnosis from a cause and its cells: severity and actions from the cause's playbook."""
    row = causes.CAUSES[cause]
    actions = []
    for name, value in row.actions:
        spec = causes.ACTIONS[name]
        if spec.needs_target_cell and not cells:
            actions.append(Action("ESCALATE"))  # nothing to act on: a person decides
        elif spec.parameter is None:
            actions.append(Action(name))
        else:
            actions.append(Action(name, cells[0] if spec.needs_target_cell else "", float(value), spec.unit))
    return Diagnosis(cause, cells, row.severity, tuple(actions), float(confidence), rationale[:COMPACT_RATIONALE_CHARS])
