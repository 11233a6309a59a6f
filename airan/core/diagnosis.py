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
