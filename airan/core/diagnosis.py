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

# the simulator's event kinds, plus NORMAL (nothing wrong) and UNKNOWN (abstain)
CAUSES = (
    "NORMAL",
    "CELL_OUTAGE",
    "INTERFERENCE",
    "CONGESTION",
    "HO_FAILURE_STORM",
    "CELL_SLEEP",
    "FLASH_CROWD",
    "UNKNOWN",
)
SEVERITIES = ("LOW", "MEDIUM", "HIGH", "CRITICAL")
# action -> (parameter name, unit, min, max, needs a target cell); None = no parameter
ACTIONS: dict[str, tuple[str, str, int, int, bool] | None] = {
    "NO_ACTION": None,
    "OFFLOAD_TRAFFIC": ("share_pct", "%", 5, 50, True),
    "RAISE_TX_POWER": ("delta_db", "dB", 1, 3, False),
    "WAKE_SLEEPING_CELL": ("delay_s", "s", 0, 60, True),
    "ADJUST_HO_OFFSET": ("delta_db", "dB", -6, 6, False),
    "ESCALATE": None,
}
MAX_AFFECTED_CELLS = 4
MAX_ACTIONS = 2
RATIONALE_CHARS = 120
# default answer budget: the bounded schema's answers seen here took 80-130 tokens
DIAGNOSIS_MAX_TOKENS = 160
# below this even the shortest valid JSON answer cannot finish
DIAGNOSIS_MIN_TOKENS = 64

CAUSE_GUIDE = {
    "NORMAL": "KPIs within usual ranges",
    "CELL_OUTAGE": "a cell carries no traffic: RRC.ConnMean and DRB.UEThpDl near zero, PEE.AvgPower drops, co-site cells gain UEs",
    "INTERFERENCE": "SINR and CQI fall, BLER rises, throughput falls while load is unchanged",
    "CONGESTION": "sustained high demand: PRB use near 100%, many active UEs, per-UE throughput falls, RLC delay rises",
    "HO_FAILURE_STORM": "many handover attempts with a high share of MM.HoExeInterFail",
    "CELL_SLEEP": "a capacity cell switched off for energy saving: its power and UEs drop, the coverage cell gains UEs",
    "FLASH_CROWD": "a sudden short surge of UEs and PRB use, rising within minutes",
    "UNKNOWN": "the KPIs do not support a conclusion",
}


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
    for name, param in ACTIONS.items():
        props: dict = {"type": {"const": name}}
        required = ["type"]
        if param is not None:
            pname, _, lo, hi, needs_cell = param
            if needs_cell:
                if not cells:
                    continue  # no cell in context to act on
                props["target_cell"] = {"enum": cells}
                required.append("target_cell")
            props[pname] = {"type": "integer", "minimum": lo, "maximum": hi}
            required.append(pname)
        out.append({"type": "object", "properties": props, "required": required, "additionalProperties": False})
    return out


def diagnosis_schema(context_cells: list[str]) -> dict:
    """JSON schema for one answer; cells are limited to those in the request's context."""
    cells = sorted(set(context_cells))
    return {
        "type": "object",
        "properties": {
            "cause": {"enum": list(CAUSES)},
            "affected_cells": {
                "type": "array",
                "items": {"enum": cells} if cells else {"type": "string", "maxLength": 0},
                "maxItems": MAX_AFFECTED_CELLS if cells else 0,
            },
            "severity": {"enum": list(SEVERITIES)},
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
        param = ACTIONS[a["type"]]
        if param is None:
            actions.append(Action(a["type"]))
        else:
            pname, unit, *_ = param
            actions.append(Action(a["type"], a.get("target_cell", ""), float(a[pname]), unit))
    return Diagnosis(
        cause=raw["cause"],
        affected_cell_ids=cells,
        severity=raw["severity"],
        actions=tuple(actions),
        confidence=raw["confidence_pct"] / 100.0,
        rationale=raw["rationale"].strip(),
    )


def diagnosis_instructions() -> str:
    causes = "\n".join(f"- {c}: {why}" for c, why in CAUSE_GUIDE.items())
    actions = ", ".join(ACTIONS)
    return (
        "Reply with one JSON object only: cause, affected_cells (cell ids from the context), severity "
        f"({', '.join(SEVERITIES)}), actions (from: {actions}), confidence_pct (0-100) and a short rationale "
        f"citing the KPIs.\nCauses:\n{causes}"
    )


def cause_from_text(text: str) -> str:
    """Read a cause out of a free-text answer (the free-text baseline's scoring)."""
    lowered = text.lower()
    keywords = {
        "CELL_OUTAGE": ("outage", "off air", "down", "no traffic"),
        "INTERFERENCE": ("interference", "sinr", "bler"),
        "CONGESTION": ("congestion", "congested", "overload", "prb"),
        "HO_FAILURE_STORM": ("handover", "ho failure", "mobility"),
        "CELL_SLEEP": ("sleep", "energy saving", "switched off"),
        "FLASH_CROWD": ("flash crowd", "surge", "sudden"),
        "NORMAL": ("normal", "healthy", "no issue", "no problem"),
    }
    hits = {cause: min((lowered.find(k) for k in words if k in lowered), default=-1) for cause, words in keywords.items()}
    found = {c: pos for c, pos in hits.items() if pos >= 0}
    return min(found, key=found.get) if found else "UNKNOWN"
