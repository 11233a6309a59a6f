"""Questions and answers about the knowledge base: the QA evaluation set, its scorers, and the
question wordings training may use.

Every question is generated from a passage of `airan/knowledge` and one of its `keys` (the facts
a correct answer states, see airan/knowledge/FORMAT.md), so each item knows its key facts and the
passages that hold them. Two template pools word the questions: `TRAIN_TEMPLATES` (training pairs,
`airan.factory.variants.qa_data`) and `EVAL_TEMPLATES` (this set); no wording is shared, which a
test checks. Unanswerable items ask about things the base does not hold; the right answer says the
context does not cover it.

Scorers are pure functions of answer texts: key-fact recall, citation precision (the cited passages
state a key fact), invented names (KPI- or parameter-like names neither in the base nor in the
question), refusal accuracy, and latency percentiles.
"""
from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from airan.core.knowledge import KnowledgeBase, Passage, config_sections, fact_terms
from airan.core.retrieval import cited_ids, strip_citations, unverified_names

QA_SEED = 15
# aspect -> wordings; {name} is the passage's name (a KPI, status or config key), {title} its title
TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "measures": ("What does {name} measure?", "Explain the KPI {name}.", "What is {name}?", "Define {name}.",
                 "Describe the counter {name}.", "{name}: what is it?"),
    "unit": ("What unit is {name} reported in?", "In which unit does {name} come?", "What are the units of {name}?",
             "Unit of {name}?"),
    "rises": ("What makes {name} go up?", "Why would {name} increase?", "What raises {name}?"),
    "falls": ("What makes {name} drop?", "Why would {name} decrease?", "What lowers {name}?"),
    "typical": ("What are typical values of {name}?", "What range is normal for {name}?", "Typical {name} values?"),
    "symptoms": ("What does {title} look like in the KPIs?", "How do I recognise {title}?", "Symptoms of {title}?"),
    "checks": ("What should I check for {title}?", "How do I confirm {title}?"),
    "action": ("What action fixes {title}?", "How do I resolve {title}?", "What should a controller do about {title}?"),
    "severity": ("How severe is {title}?", "What is the severity of {title}?"),
    "bounds": ("What are the limits of the action for {title}?", "How far may the {title} action go?"),
    "key_kpi": ("Which KPI shows {title} first?", "What is the key KPI of {title}?"),
    "what": ("What is {title}?", "Explain {title}.", "What does {title} do?", "Tell me about {title}."),
    "budget": ("What time budget does the {title} have?", "How fast is the {title}?"),
    "default": ("What is the default {name}?", "Default value of {name}?"),
    "unanswerable": ("What is {topic}?", "Tell me {topic}.", "Explain {topic}."),
}  # fmt: skip
EVAL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "measures": ("Could you tell me what the {name} counter captures?", "Which quantity does {name} report?",
                 "I see {name} in my E2 report; tell me its meaning."),
    "unit": ("Which unit of measurement applies to {name}?", "How is {name} expressed, in what unit?"),
    "rises": ("Under which conditions does {name} climb?", "What drives {name} higher?"),
    "falls": ("When does {name} go down?", "What pushes {name} lower?"),
    "typical": ("Which values of {name} are usual in a live network?", "Give me a normal operating range for {name}."),
    "symptoms": ("Which KPI pattern points to {title}?", "How would {title} show up in cell counters?"),
    "checks": ("Before acting on suspected {title}, which checks are worth doing?",),
    "action": ("Which remedy does the playbook recommend against {title}?", "How should {title} be handled?"),
    "severity": ("Which severity level is assigned to {title}?",),
    "bounds": ("Within which bounds may the parameter of the {title} remedy be set?",),
    "key_kpi": ("Which single counter best indicates {title}?",),
    "what": ("Give me a short explanation of {title}.", "In a sentence or two, describe {title}."),
    "budget": ("How much time may a decision in the {title} take?",),
    "default": ("If I leave {name} unset, which value is used?",),
    "unanswerable": ("Can you give me details on {topic}?", "I need to know {topic}; can you help?"),
}  # fmt: skip
# things the knowledge base does not hold: two disjoint pools, like the wordings
TRAIN_UNANSWERABLE = (
    "the price of a 5G spectrum licence in Germany", "the RSRQ threshold for handover to GSM",
    "how to configure a Wi-Fi access point", "the weather forecast for tomorrow", "the capital of Australia",
    "the battery life of a typical smartphone", "the fibre latency between Paris and Berlin",
    "how to bake sourdough bread", "the counter QF.SessionTimeUE", "the Kubernetes version airan was tested on",
    "the salary of a RAN engineer", "the wind load rating of an antenna mast", "the counter GTP.InDataOctN3UPF",
    "the number of base stations in Japan", "the history of the GSM standard", "the best football team in Europe",
)  # fmt: skip
EVAL_UNANSWERABLE = (
    "the cost of electricity for a macro site in Spain", "the SIM card format used by IoT modules",
    "the counter RACH.PreambleDedCell", "who invented the transistor", "the lease price of a rooftop site",
    "the lifetime of a lithium backup battery at a cell site", "the counter PAG.ReceivedNbrCnInitiated",
    "the satellite orbit used for backhaul in the Arctic", "how to reset a home router", "the population of Milan",
    "the LTE band used by railway operators in France", "the vendor of the radio units at bs-02",
    "the counter RM.RegisteredSubNbrMean", "the typical rent of an edge data centre rack", "the speed of sound in air",
    "the counter IP.LatencyDlMean", "the noise figure of a low-noise amplifier", "the opening hours of the NOC",
    "the carbon footprint of manufacturing a radio unit", "the encryption algorithm of the fronthaul",
)  # fmt: skip
REFUSAL = re.compile(
    r"does not cover|doesn't cover|not covered|no (?:passage|information|context)|cannot answer|can't answer|"
    r"not (?:in|given in|provided in) the (?:context|passages)|do(?:es)? not (?:say|mention|contain)|i don't know|"
    r"unable to answer",
    re.IGNORECASE,
)
# aspects asked of KPIs: measures and unit always, then one of these in turn
_KPI_TURN = ("rises", "falls", "typical")


@dataclass(frozen=True)
class QAItem:
    item_id: str
    question: str
    aspect: str  # the passage key asked about, or "unanswerable"
    passage_ids: tuple[str, ...]  # the passages that hold the key facts (none when unanswerable)
    facts: tuple[str, ...]  # key facts a correct answer states (fact syntax of airan/knowledge/FORMAT.md)

    @property
    def answerable(self) -> bool:
        return self.aspect != "unanswerable"


def _fill(template: str, p: Passage | None = None, **extra) -> str:
    values = {"name": p.name if p else "", "title": p.title if p else "", **extra}
    return template.format(**values)


def _config_defaults(kb: KnowledgeBase) -> list[tuple[Passage, str, str]]:
    """(config passage, section.key, default) of scalar config keys with a default."""
    out = []
    for section, model in config_sections().items():
        p = kb.get(f"config:{section}")
        if model is None or p is None or section == "catalog":
            continue
        for key, f in model.model_fields.items():
            if isinstance(f.default, (int, float, str)) and not isinstance(f.default, bool) and str(f.default):
                out.append((p, f"{section}.{key}", str(f.default)))
    return out


def questions(kb: KnowledgeBase, templates: Mapping[str, Sequence[str]], unanswerable: Sequence[str],
              seed: int = QA_SEED, per_passage: int = 0) -> list[QAItem]:  # fmt: skip
    """Questions over the whole base: each KPI asked what it measures, its unit and one other aspect
    (in turn), each cause three of its aspects, every other passage with keys one, some config
    defaults, and every unanswerable topic once. `per_passage` > 0 asks every aspect of every
    passage that many times (for training). Wordings are drawn from `templates`; deterministic for a seed."""
    rng = random.Random(seed)
    items: list[QAItem] = []

    def ask(p: Passage | None, aspect: str, facts: tuple[str, ...], n: int, **extra) -> None:
        pool = templates[aspect]
        for k in range(n):
            template = pool[(rng.randrange(len(pool)) + k) % len(pool)]
            q = _fill(template, p, **extra)
            items.append(QAItem(f"qa-{len(items):04d}", q, aspect, (p.id,) if p else (), facts))

    turn = 0
    for p in kb.passages:
        aspects = [a for a in p.keys if a in templates]
        if not aspects:
            continue
        if per_passage:
            chosen = aspects
        elif p.kind == "kpi":  # what it measures, its unit, then one more aspect it has keys for, in turn
            more = [a for a in _KPI_TURN[turn % 3:] + _KPI_TURN[: turn % 3] if a in p.keys]
            chosen = ["measures", "unit", *more[:1]]
            turn += 1
        elif p.kind == "cause":
            chosen = rng.sample(aspects, min(3, len(aspects)))
        else:
            chosen = aspects[:1]
        for aspect in chosen:
            ask(p, aspect, (p.keys[aspect],), per_passage or 1)
    defaults = _config_defaults(kb)
    for p, key, default in (defaults if per_passage else rng.sample(defaults, min(8, len(defaults)))):
        ask(p, "default", (default,), per_passage or 1, name=key)
    for topic in unanswerable:
        ask(None, "unanswerable", (), per_passage or 1, topic=topic)
    return items


def eval_set(kb: KnowledgeBase, seed: int = QA_SEED) -> list[QAItem]:
    """The QA evaluation set: EVAL_TEMPLATES wordings, EVAL_UNANSWERABLE topics."""
    return questions(kb, EVAL_TEMPLATES, EVAL_UNANSWERABLE, seed)


def train_questions(kb: KnowledgeBase, per_passage: int = 3, seed: int = QA_SEED + 1) -> list[QAItem]:
    """Training questions: every aspect of every passage `per_passage` times, in TRAIN_TEMPLATES wordings."""
    return questions(kb, TRAIN_TEMPLATES, TRAIN_UNANSWERABLE, seed, per_passage)


def template_words(template: str) -> tuple[str, ...]:
    return tuple(re.findall(r"[a-z0-9']+", re.sub(r"\{[a-z]+\}", " ", template.lower())))


# --- scoring ---------------------------------------------------------------------------------------


def _term_in(term: str, text: str) -> bool:
    if len(term) <= 3 and term.replace("/", "").isalnum():  # short terms as words (a plural s allowed)
        return re.search(rf"(?<![a-z0-9]){re.escape(term)}s?(?![a-z0-9])", text) is not None
    return term in text


def states(text: str, fact: str) -> bool:
    """Whether `text` states `fact`: every ';' group has one of its '|' alternatives in it."""
    low = text.lower()
    return all(any(_term_in(t, low) for t in group) for group in fact_terms(fact))


def says_not_covered(text: str) -> bool:
    return REFUSAL.search(text) is not None


@dataclass(frozen=True)
class QAAnswer:
    item_id: str
    text: str
    latency_ms: float
    citations: tuple[str, ...] = ()  # the passage ids the response carried as citations
    citations_dropped: int = 0
    retrieved: tuple[str, ...] = ()  # not known from the response; kept for in-process runs
    error: str = ""
    completion_tokens: int = 0  # the answer's length in tokens, as the response counts it
    unverified_names: tuple[str, ...] = ()  # the names the server flagged as backed by nothing it knows


@dataclass
class QAScores:
    n: int
    n_answerable: int
    n_unanswerable: int
    key_fact_recall: float  # answerable items: share of their key facts the answer states
    citation_precision: float | None  # cited passages that state a key fact of the item; None: nothing cited
    citation_rate: float  # answerable items whose answer cites at least one passage
    citations_dropped: int  # cited ids the server dropped (not shown for the request)
    invented_names: int  # KPI- or parameter-like names neither in the base nor in the question, all answers
    answers_with_invented_names: float
    # invented names the response did not flag in unverified_names (what a caller would take on trust)
    invented_unflagged: int
    refusal_accuracy: float | None  # unanswerable items the answer declines
    false_refusals: float  # answerable items the answer declines
    errors: int
    latency_p50_ms: float
    latency_p95_ms: float
    examples_invented: list[str] = field(default_factory=list)


def invented(text: str, question: str, known: frozenset[str]) -> list[str]:
    """Names of the answer neither in the base nor in the question (what the server's guard flags as
    `unverified_names` when given the same texts; it also accepts names of the prompt it showed)."""
    return list(unverified_names(text, known, question))


def score(items: Sequence[QAItem], answers: Sequence[QAAnswer], kb: KnowledgeBase) -> QAScores:
    by_id = {a.item_id: a for a in answers}
    known = kb.known_names()
    recall, cited_ok, cited_all, with_cites, false_ref, refusals = [], 0, 0, 0, 0, []
    invented_total, with_invented, examples, unflagged = 0, 0, [], 0
    for item in items:
        a = by_id[item.item_id]
        text = strip_citations(a.text)
        names = invented(a.text, item.question, known)
        invented_total += len(names)
        unflagged += sum(n not in a.unverified_names for n in names)
        with_invented += bool(names)
        examples += names[: max(0, 10 - len(examples))]
        if not item.answerable:
            refusals.append(not a.error and says_not_covered(a.text))
            continue
        recall.append(0.0 if a.error else float(np.mean([states(text, f) for f in item.facts])))
        false_ref += says_not_covered(a.text)
        cites = a.citations or tuple(cited_ids(a.text))
        with_cites += bool(cites)
        for pid in cites:
            p = kb.get(pid)
            cited_all += 1
            cited_ok += p is not None and any(states(p.text, f) for f in item.facts)
    latencies = [a.latency_ms for a in answers if not a.error]
    n_ans = len(recall)
    return QAScores(
        n=len(items), n_answerable=n_ans, n_unanswerable=len(refusals),
        key_fact_recall=round(float(np.mean(recall)), 4) if recall else 0.0,
        citation_precision=round(cited_ok / cited_all, 4) if cited_all else None,
        citation_rate=round(with_cites / n_ans, 4) if n_ans else 0.0,
        citations_dropped=sum(a.citations_dropped for a in answers),
        invented_names=invented_total,
        answers_with_invented_names=round(with_invented / len(items), 4) if items else 0.0,
        invented_unflagged=unflagged,
        refusal_accuracy=round(float(np.mean(refusals)), 4) if refusals else None,
        false_refusals=round(false_ref / n_ans, 4) if n_ans else 0.0,
        errors=sum(bool(a.error) for a in answers),
        latency_p50_ms=round(float(np.percentile(latencies, 50)), 1) if latencies else 0.0,
        latency_p95_ms=round(float(np.percentile(latencies, 95)), 1) if latencies else 0.0,
        examples_invented=examples,
    )  # fmt: skip


def reference_answer(item: QAItem, kb: KnowledgeBase, shown: Sequence[str]) -> str:
    """The answer a grounded model gives: the passage's prose for the aspect, cited, when the passage is
    among those `shown`; otherwise (and for unanswerable items) that the context does not cover it."""
    from airan.core.retrieval import NOT_COVERED

    if not item.answerable or not item.passage_ids or item.passage_ids[0] not in shown:
        return NOT_COVERED
    p = kb[item.passage_ids[0]]
    cite = f"[{p.id}]"
    body = {
        "measures": f"{p.name} is the {p.title[0].lower() + p.title[1:]}: {p.fields.get('definition', '')}",
        "unit": f"{p.name} is reported in {p.unit}.",
        "rises": f"{p.name} rises with {p.fields.get('rises', '')}",
        "falls": f"{p.name} falls with {p.fields.get('falls', '')}",
        "typical": f"Typical {p.name}: {p.fields.get('typical', '')}",
        "symptoms": f"{p.title}: {p.fields.get('symptoms', '')}",
        "checks": f"For {p.title.lower()}, check {p.fields.get('checks', '')}.",
    }.get(item.aspect)
    if body is None:  # aspects whose facts live in the generated text: the sentence that states them
        sentences = re.split(r"(?<=[.;])\s+", p.text)
        stating = [s for s in sentences if any(states(s, f) for f in item.facts)]
        body = " ".join(stating[:2]) or p.text
    return f"{body.strip()} {cite}"
