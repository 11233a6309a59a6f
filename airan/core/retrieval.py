"""Retrieval for free-text answers: a BM25 index over the knowledge base, passage selection
under a token budget, the grounded prompt, and the citations an answer makes (pure).

A 135M model knows no RAN: whatever a free-text answer says must come from the
context it is given. The question retrieves the top passages (bm25s over
`airan.core.knowledge`); the request's own KPI evidence is a passage too. They
go into the prompt under their ids (`[kpi:DRB.UEThpDl] ...`), most relevant
first, until the token budget is spent; the model cites the ids it used, and
`parse_citations` keeps only ids that were shown for this request.

Tokenisation understands KPI names: `DRB.UEThpDl` is indexed as itself and as
its parts (`drb`, `ue`, `thp`, `dl`), and common words map to the parts'
spelling (`downlink` -> `dl`, `throughput` -> `thp`), so "DRB UE throughput
downlink" and "UEThpDl" both find it.
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from airan.core.knowledge import KnowledgeBase, Passage, name_like_tokens, packaged_knowledge

FREE_TEXT_PROMPT_VERSION = "qa-v1"
TOP_K = 4  # passages retrieved per question (the evidence passage comes on top)
PASSAGE_BUDGET_TOKENS = 400  # tokens of passages in one prompt, at most
NOT_COVERED = "The context does not cover this."
FREE_TEXT_SYSTEM = (
    "You are a radio access network operations assistant. Answer the question using only the context "
    "passages. After each fact, cite its passage id in brackets, e.g. [kpi:RRU.PrbTotDl]. "
    f"If the passages do not answer the question, reply: {NOT_COVERED} Be brief."
)

# --- tokenisation --------------------------------------------------------------------------------------

_STOP = frozenset(
    "a an and are as at be by can do does for from how i in is it its of on or that the this to was what "
    "when which who why with my me we our you your there their them they it's than then so if into any "
    "all per not no".split()
)  # fmt: skip
# everyday words -> the abbreviation KPI names and the base use for them
_SYNONYMS = {
    "downlink": "dl", "uplink": "ul", "throughput": "thp", "throughputs": "thp", "handover": "ho",
    "handovers": "ho", "connections": "conn", "connection": "conn", "connected": "conn", "failures": "fail",
    "failure": "fail", "failed": "fail", "fails": "fail", "successful": "succ", "success": "succ",
    "successes": "succ", "succeeded": "succ", "attempts": "req", "attempt": "req", "attempted": "req",
    "requested": "req", "requests": "req", "executions": "exe", "execution": "exe", "errors": "err",
    "error": "err", "available": "avail", "availability": "avail", "used": "use", "usage": "use",
    "utilisation": "use", "utilization": "use", "utilised": "use", "prbs": "prb", "ues": "ue", "users": "ue",
    "user": "ue", "latency": "delay", "delays": "delay", "average": "mean", "maximum": "max", "peak": "max",
    "establishment": "estab", "establishments": "estab", "setup": "estab", "setups": "estab",
    "interfering": "interference", "congested": "congestion", "sleeping": "sleep", "outages": "outage",
    "blocks": "block", "measures": "measure", "measured": "measure", "measurement": "measure",
}  # fmt: skip
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[.\-_][A-Za-z0-9]+)+|[A-Za-z0-9]+")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def _word(w: str) -> str | None:
    w = w.lower()
    if w in _STOP or len(w) < 2 and not w.isdigit():
        return None
    w = _SYNONYMS.get(w, w)
    if len(w) > 4 and w.endswith("s") and not w.endswith("ss"):
        w = _SYNONYMS.get(w[:-1], w[:-1])
    return w


def tokenize(text: str) -> list[str]:
    """Lower-case terms; a dotted or CamelCase name also yields itself whole and its parts."""
    out: list[str] = []
    for m in _NAME.finditer(text):
        token = m.group(0)
        parts = re.split(r"[.\-_]", token)
        pieces = [p for part in parts for p in (_CAMEL.findall(part) if not part.islower() else [part])]
        if len(parts) > 1 or len(pieces) > 1:
            out.append(token.lower())  # the whole name: a rare, decisive term
        for piece in pieces:
            w = _word(piece)
            if w:
                out.append(w)
    return out


def estimate_tokens(text: str) -> int:
    """A tokenizer-agnostic upper-side estimate (BPE vocabularies of small models average ~3.5
    characters per token on this text, KPI names fewer); pass the served tokenizer where exactness matters."""
    return math.ceil(len(text) / 3.2)


# --- the index ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float


@dataclass(frozen=True)
class Citation:
    passage_id: str
    title: str
    score: float = 0.0  # the retrieval score of the passage for this request (0 for the evidence)


class KnowledgeIndex:
    """BM25 (bm25s) over the passages; names and titles weigh more than body text."""

    def __init__(self, kb: KnowledgeBase) -> None:
        import bm25s

        t0 = time.perf_counter()
        self.kb = kb
        self.passages = tuple(p for p in kb.passages if p.kind != "evidence")
        corpus = [self._doc_tokens(p) for p in self.passages]
        self._bm25 = bm25s.BM25()
        self._bm25.index(corpus, show_progress=False)
        self._vocab = set(self._bm25.vocab_dict)
        self._names = {p.name.lower(): i for i, p in enumerate(self.passages) if p.kind == "kpi"}
        self.build_s = time.perf_counter() - t0

    @staticmethod
    def _doc_tokens(p: Passage) -> list[str]:
        name = tokenize(p.name.replace("-", " ") if p.kind in ("concept", "loop") else p.name)
        return 3 * name + 2 * tokenize(p.title) + tokenize(p.text)

    def search(self, question: str, k: int = TOP_K) -> list[Hit]:
        """The k best passages with a positive score, best first; a KPI named exactly comes first."""
        terms = [t for t in tokenize(question) if t in self._vocab]
        if not terms or k <= 0:
            return []
        scores = np.asarray(self._bm25.get_scores(terms), dtype=np.float64)
        named = [self._names[t] for t in dict.fromkeys(terms) if t in self._names]
        if named:  # an exact KPI name is what the question is about, whatever else it says
            scores[named] += scores.max() + 1.0
        order = np.argsort(-scores, kind="stable")[:k]
        return [Hit(self.passages[i], float(scores[i])) for i in order if scores[i] > 0]


@lru_cache(maxsize=1)
def packaged_index() -> KnowledgeIndex:
    """The index of the packaged knowledge base, built at first use and kept for the process."""
    return KnowledgeIndex(packaged_knowledge())


# --- selection and the prompt -------------------------------------------------------------------------


def passage_line(p: Passage) -> str:
    return f"[{p.id}] {p.text}"


def select_passages(
    candidates: Sequence[Passage], budget_tokens: int, count_tokens: Callable[[str], int] = estimate_tokens
) -> list[Passage]:
    """Candidates in order while their lines fit the budget; one that does not fit is skipped and the
    next (shorter) one may still fit."""
    chosen, used = [], 0
    for p in candidates:
        cost = count_tokens(passage_line(p)) + 1  # + the newline
        if used + cost <= budget_tokens:
            chosen.append(p)
            used += cost
    return chosen


def free_text_messages(
    question: str,
    passages: Sequence[Passage],
    site_ids: Sequence[str] = (),
    cell_ids: Sequence[str] = (),
    recent_events: Sequence[str] = (),
) -> list[dict[str, str]]:
    parts = []
    if site_ids:
        parts.append(f"Sites: {', '.join(site_ids)}")
    if cell_ids:
        parts.append(f"Cells: {', '.join(cell_ids)}")
    if recent_events:
        parts.append("Recent events: " + "; ".join(recent_events))
    parts.append("Context:\n" + ("\n".join(passage_line(p) for p in passages) if passages else "(no passages)"))
    parts.append(f"Question: {question}")
    return [{"role": "system", "content": FREE_TEXT_SYSTEM}, {"role": "user", "content": "\n".join(parts)}]


# --- citations ------------------------------------------------------------------------------------------

_CITATION = re.compile(r"\[([^\[\]\n]{1,120})\]")
_CITED_ID = re.compile(r"(?:[a-z]+:[A-Za-z0-9_.\-]*[A-Za-z0-9_]|evidence)")


def cited_ids(text: str) -> list[str]:
    """Every passage id the text cites in brackets (`[kpi:DRB.UEThpDl]`, `[kpi:A, cause:B]`), in order, once."""
    out = []
    for group in _CITATION.findall(text):
        out += _CITED_ID.findall(group)
    return list(dict.fromkeys(out))


def parse_citations(text: str, shown: Sequence[Citation]) -> tuple[tuple[Citation, ...], int]:
    """(the cited passages that were shown for this request, in order of first citation; how many cited
    ids were not shown and so were dropped)."""
    by_id = {c.passage_id: c for c in shown}
    ids = cited_ids(text)
    kept = tuple(by_id[i] for i in ids if i in by_id)
    return kept, len(ids) - len(kept)


def citations_of(passages: Sequence[Passage], hits: Sequence[Hit] = ()) -> tuple[Citation, ...]:
    score = {h.passage.id: h.score for h in hits}
    return tuple(Citation(p.id, p.title, round(score.get(p.id, 0.0), 4)) for p in passages)


def unverified_names(text: str, known: Collection[str], *given: str) -> tuple[str, ...]:
    """The KPI-, parameter- or identifier-like names of an answer (its citations aside) that are neither
    `known` (the knowledge base's names) nor named in any `given` text (the question, the prompt): an
    answer that uses one may have invented it. Order kept, once each."""
    asked = {n for g in given for n in name_like_tokens(g)}
    return tuple(n for n in name_like_tokens(strip_citations(text)) if n not in known and n not in asked)


def strip_citations(text: str) -> str:
    """The answer without its bracketed citations (for reading or scoring facts)."""
    return re.sub(r"\s*\[[^\[\]\n]{1,120}\]", "", text)

