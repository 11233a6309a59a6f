"""airan's RAN knowledge base: load, complete from the code's own tables, validate (pure).

The base lives in `airan/knowledge/*.yaml` (package data, format documented in
`airan/knowledge/FORMAT.md`): KPIs, cause playbooks, radio concepts, the O-RAN
control loops, airan's API, statuses and config. One entry is one passage with
one id (`kind:name`, e.g. `kpi:DRB.UEThpDl`), which a free-text answer cites.

Facts the code already holds are never written twice: a cause's KPIs, key KPI,
severity, actions with their parameter bounds and follow-up proposal come from
`airan.core.causes`; a config section's keys and defaults from `airan.config`.
The YAML only adds the prose. `load_knowledge` refuses a base with a problem
(duplicate id, dangling reference, missing field, wrong format version).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from airan import config as airan_config
from airan.core import causes

FORMAT_VERSION = 1
KNOWLEDGE_DIR = Path(__file__).resolve().parents[1] / "knowledge"
KINDS = ("kpi", "cause", "concept", "loop", "api", "status", "config", "evidence")
EVIDENCE_ID = "evidence"  # the request's own KPI evidence, shown as a passage beside the retrieved ones
_ID = re.compile(r"^(?:[a-z]+:[A-Za-z0-9_.\-]+|evidence)$")
# fields each kind's YAML entry must give (beyond its name or id)
_REQUIRED = {
    "kpi": ("unit", "title", "definition", "rises", "falls", "typical", "keys"),
    "cause": ("title", "symptoms", "checks", "keys"),
    "concept": ("title", "text", "keys"),
    "api": ("title", "text"),
}
_DIRECTION = {causes.RISES: "rises", causes.FALLS: "falls", causes.STEADY: "stays steady"}


class KnowledgeError(ValueError):
    """The knowledge base cannot be used; the message lists every problem found."""


@dataclass(frozen=True)
class Passage:
    id: str  # kind:name, what an answer cites
    kind: str
    title: str
    text: str  # what the prompt shows after the id
    name: str = ""  # the KPI, cause, concept or section name
    unit: str = ""
    # aspect -> the fact a correct answer about that aspect states: terms separated by ';' are all
    # required, alternatives by '|' (e.g. {"unit": "kbit/s|kbps"})
    keys: Mapping[str, str] = field(default_factory=dict)
    fields: Mapping[str, str] = field(default_factory=dict)  # the prose by aspect (definition, rises, ...)
    see: tuple[str, ...] = ()  # ids of related passages

    def __hash__(self) -> int:
        return hash(self.id)


@dataclass(frozen=True)
class KnowledgeBase:
    passages: tuple[Passage, ...]
    format_version: int = FORMAT_VERSION
    _by_id: dict[str, Passage] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {p.id: p for p in self.passages})  # first of a duplicate id wins

    def __len__(self) -> int:
        return len(self.passages)

    def get(self, passage_id: str) -> Passage | None:
        return self._by_id.get(passage_id)

    def __getitem__(self, passage_id: str) -> Passage:
        return self._by_id[passage_id]

    def of_kind(self, kind: str) -> list[Passage]:
        return [p for p in self.passages if p.kind == kind]

    @property
    def kpi_names(self) -> frozenset[str]:
        return frozenset(p.name for p in self.passages if p.kind == "kpi")

    def known_names(self) -> frozenset[str]:
        """Every KPI, cause, action, parameter, status, RPC and config key the base names: a name-like
        token of an answer outside this set is invented (the QA scorer counts those). Computed once."""
        cached = self.__dict__.get("_known_names")
        if cached is None:
            cached = self._names()
            object.__setattr__(self, "_known_names", cached)  # frozen: the base never changes
        return cached

    def _names(self) -> frozenset[str]:
        names: set[str] = set()
        for p in self.passages:
            names.add(p.name)
            names.update(p.name.split("."))  # an RPC's service and method (NetOpsService.Ask)
            names.update(_NAME_LIKE.findall(p.text))
            names.update(_NAME_LIKE.findall(p.title))
        names.update(causes.CAUSES)
        names.update(causes.ACTIONS)
        names.update(a.parameter for a in causes.ACTIONS.values() if a.parameter)
        return frozenset(n for n in names if n)


# tokens that look like names of KPIs, parameters or identifiers: dotted (DRB.UEThpDl), snake
# (share_pct), CamelCase with an inner capital (AskStream) or ALL_CAPS with an underscore (NEAR_RT)
_NAME_LIKE = re.compile(
    r"\b(?:[A-Za-z][A-Za-z0-9]*(?:[.][A-Za-z0-9]+(?:-[A-Za-z0-9]+)?)+"
    r"|[a-z][a-z0-9]*(?:_[a-z0-9]+)+"
    r"|[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+"
    r"|[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]+)+[A-Za-z0-9]*)\b"
)


def name_like_tokens(text: str) -> list[str]:
    """The KPI-, parameter- or identifier-like names in a text (order kept, repeats removed)."""
    return list(dict.fromkeys(m.rstrip(".") for m in _NAME_LIKE.findall(text)))


# --- building passages -----------------------------------------------------------------------------


def _kpi_passage(e: Mapping[str, Any]) -> Passage:
    name, unit = e["name"], e["unit"]
    text = (
        f"{name}: {e['title']} (unit: {unit}). {e['definition']} "
        f"Rises with {e['rises']} Falls with {e['falls']} Typical: {e['typical']}"
    )
    keys = {"unit": _unit_key(unit), **e["keys"]}
    fields_ = {k: e[k] for k in ("definition", "rises", "falls", "typical")}
    return Passage(f"kpi:{name}", "kpi", e["title"], text, name, unit, keys, fields_, tuple(e.get("see", ())))


def _unit_key(unit: str) -> str:
    alternatives = {
        "kbit/s": "kbit/s|kbps|kilobit", "us": "us|µs|microsecond", "%": "%|percent", "W": "W|watt",
        "dB": "dB|decibel", "dBm": "dBm", "ms": "ms|millisecond", "UEs": "UE|user", "PRBs": "PRB|resource block",
        "count": "count|number", "CQI": "CQI|index", "kWh": "kWh|kilowatt", "Mbit": "Mbit|megabit",
    }  # fmt: skip
    return alternatives.get(unit, unit)


def _action_text(name: str, value: int | None) -> str:
    spec = causes.ACTIONS[name]
    if spec.parameter is None:
        return f"{name} ({spec.wording})"
    target = ", aimed at the affected cell" if spec.needs_target_cell else ""
    return (
        f"{name} with {spec.parameter} = {value} {spec.unit} (allowed {spec.minimum} to {spec.maximum} "
        f"{spec.unit}{target}): {spec.wording}"
    )


def _cause_passage(e: Mapping[str, Any]) -> Passage:
    """The YAML's prose plus every fact the cause table holds about it."""
    c = causes.CAUSES[e["name"]]
    parts = [f"{c.name} ({e['title']}): {e['symptoms']}"]
    if c.moves:
        parts.append("KPIs: " + ", ".join(f"{k} {_DIRECTION[d]}" for k, d in c.moves) + ".")
    if c.key_kpi:
        parts.append(f"Key KPI: {c.key_kpi}.")
    parts.append("Check " + "; ".join(e["checks"]) + ".")
    parts.append(f"Severity {c.severity}. Action: " + "; ".join(_action_text(a, v) for a, v in c.actions) + ".")
    if c.proposal:
        parts.append(f"Follow-up ({c.proposal[0]}): propose {c.proposal[1]}.")
    if c.event_kind:
        lo, hi = c.duration_s
        parts.append(f"Usually lasts {lo / 60:.0f} to {hi / 60:.0f} min; asked about by {c.asked_by} controllers.")
    keys = dict(e["keys"])
    keys["severity"] = c.severity
    first, value = c.actions[0]
    spec = causes.ACTIONS[first]
    keys["action"] = f"{first}|{spec.wording}" + (f"; {value}" if spec.parameter else "")
    if spec.parameter:
        keys["bounds"] = f"{spec.minimum}; {spec.maximum}"
    if c.key_kpi:
        keys["key_kpi"] = c.key_kpi
    fields_ = {"symptoms": e["symptoms"], "checks": "; ".join(e["checks"])}
    see = tuple(dict.fromkeys([*e.get("see", ()), *(f"kpi:{k}" for k in c.kpis)]))
    return Passage(f"cause:{c.name}", "cause", e["title"], " ".join(parts), c.name, "", keys, fields_, see)


def _concept_passage(e: Mapping[str, Any]) -> Passage:
    prefix = e.get("id_prefix", "concept")
    return Passage(f"{prefix}:{e['name']}", prefix, e["title"], f"{e['title']}: {e['text']}", e["name"], "",
                   dict(e["keys"]), {"text": e["text"]}, tuple(e.get("see", ())))  # fmt: skip


def _default_text(f) -> str:
    if f.is_required():
        return "required"
    value = f.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see its keys"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return ", ".join(v.model_dump_json() for v in value)
    return "none" if value is None else str(value)


def _section_model(annotation) -> type[BaseModel] | None:
    """The pydantic model a top-level config field holds (itself, or the items of its list)."""
    for t in (annotation, *getattr(annotation, "__args__", ())):
        inner = getattr(t, "__args__", ())
        for candidate in (t, *inner):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                return candidate
    return None


def config_sections() -> dict[str, type[BaseModel] | None]:
    return {name: _section_model(f.annotation) for name, f in airan_config.AiranConfig.model_fields.items()}


def _api_passage(e: Mapping[str, Any]) -> Passage:
    kind, name = e["id"].split(":", 1)
    text = f"{e['title']}: {e['text']}"
    if kind == "config":
        model = config_sections().get(name)
        if model is not None and name != "catalog":
            keys = ", ".join(f"{k} ({_default_text(f)})" for k, f in model.model_fields.items())
            text += f" Keys (default): {keys}."
    return Passage(e["id"], kind, e["title"], text, name, "", dict(e.get("keys", {})), {"text": e["text"]},
                   tuple(e.get("see", ())))  # fmt: skip


_BUILDERS = {"kpi": _kpi_passage, "cause": _cause_passage, "concept": _concept_passage, "api": _api_passage}


def evidence_passage(lines: Iterable[str]) -> Passage:
    """The request's own KPI evidence as a citable passage (`[evidence]`)."""
    lines = list(lines)
    return Passage(EVIDENCE_ID, "evidence", "KPI evidence of this request",
                   "KPI evidence of this request: " + "; ".join(lines), "evidence")  # fmt: skip


# --- loading and validating --------------------------------------------------------------------------


def _entry_problems(kind: str, e: Any, where: str) -> list[str]:
    if not isinstance(e, dict):
        return [f"{where}: an entry must be a mapping"]
    ident = "id" if kind == "api" else "name"
    problems = [f"{where}: missing '{ident}'"] if not e.get(ident) else []
    problems += [f"{where} ({e.get(ident)}): missing '{k}'" for k in _REQUIRED[kind] if not e.get(k)]
    if kind == "cause" and e.get("name") not in causes.CAUSES:
        problems.append(f"{where}: cause '{e.get('name')}' is not in airan/core/causes.py")
    if kind == "kpi" and e.get("keys") and "measures" not in e["keys"]:
        problems.append(f"{where} ({e.get('name')}): keys need 'measures'")
    return problems


def parse_documents(documents: Iterable[tuple[str, Any]]) -> KnowledgeBase:
    """A knowledge base from (source name, parsed YAML) pairs; raises KnowledgeError listing every problem."""
    problems: list[str] = []
    passages: list[Passage] = []
    for source, doc in documents:
        if not isinstance(doc, dict):
            problems.append(f"{source}: expected a mapping with format_version, kind and entries")
            continue
        if doc.get("format_version") != FORMAT_VERSION:
            problems.append(f"{source}: format_version {doc.get('format_version')!r}, this airan reads {FORMAT_VERSION}")
            continue
        kind = doc.get("kind")
        if kind not in _BUILDERS:
            problems.append(f"{source}: kind {kind!r} is not one of {', '.join(_BUILDERS)}")
            continue
        for i, entry in enumerate(doc.get("entries") or []):
            found = _entry_problems(kind, entry, f"{source} entry {i}")
            if found:
                problems += found
                continue
            try:
                passages.append(_BUILDERS[kind](entry))
            except (KeyError, TypeError, ValueError) as e:
                problems.append(f"{source} entry {i}: {type(e).__name__}: {e}")
    kb = KnowledgeBase(tuple(passages))
    problems += validate(kb)
    if problems:
        raise KnowledgeError("knowledge base has problems:\n" + "\n".join(f"  {p}" for p in problems))
    return kb


def validate(kb: KnowledgeBase) -> list[str]:
    """Structural problems: ids, references, kinds, keys; an empty list means usable."""
    problems = []
    seen: set[str] = set()
    for p in kb.passages:
        if p.id in seen:
            problems.append(f"duplicate passage id {p.id}")
        seen.add(p.id)
        if not _ID.match(p.id):
            problems.append(f"passage id {p.id!r} is not kind:name")
        if p.kind not in KINDS:
            problems.append(f"{p.id}: unknown kind {p.kind!r}")
        if not p.text.strip() or not p.title.strip():
            problems.append(f"{p.id}: empty title or text")
        for ref in p.see:
            if kb.get(ref) is None:
                problems.append(f"{p.id}: refers to {ref}, which is no passage")
        for aspect, fact in p.keys.items():
            if not fact_terms(fact):
                problems.append(f"{p.id}: key '{aspect}' states no term")
    for c in causes.CAUSES:
        if kb.get(f"cause:{c}") is None:
            problems.append(f"cause {c} of airan/core/causes.py has no playbook passage")
    for section in config_sections():
        if kb.get(f"config:{section}") is None:
            problems.append(f"config section '{section}' of airan/config.py has no passage")
    return problems


def fact_terms(fact: str) -> list[tuple[str, ...]]:
    """`"PRB; used|usage"` -> [("prb",), ("used", "usage")]: every group must be stated, any one of its words."""
    return [tuple(a.strip().lower() for a in group.split("|") if a.strip())
            for group in fact.split(";") if group.strip()]  # fmt: skip


def load_knowledge(directory: Path | None = None) -> KnowledgeBase:
    """Every `*.yaml` of the directory (default: the packaged base), validated."""
    directory = Path(directory) if directory is not None else KNOWLEDGE_DIR
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise KnowledgeError(f"no knowledge files (*.yaml) in {directory}")
    docs = []
    for f in files:
        try:
            docs.append((f.name, yaml.safe_load(f.read_text())))
        except yaml.YAMLError as e:
            raise KnowledgeError(f"{f}: not valid YAML: {e}") from e
    return parse_documents(docs)


@lru_cache(maxsize=1)
def packaged_knowledge() -> KnowledgeBase:
    """The knowledge base shipped in the package, loaded once per process."""
    return load_knowledge()
