"""A network-operations query as the core sees it, and its validation.

The servicer converts protos into `Query`; everything here is plain data so the
simulator and unit tests use it without gRPC.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace

from airan.config import LimitsConfig
from airan.core.diagnosis import BRIEF_MAX_TOKENS, FULL_MAX_TOKENS
from airan.errors import AiranError, ErrorKind, invalid
from airan.core.routing.types import Priority


@dataclass(frozen=True)
class KpiSample:
    name: str
    value: float  # NaN or inf: not reported (a cell that is off reports no throughput); evidence reads it as missing
    unit: str = ""
    cell_id: str = ""
    time_s: float | None = None  # unix seconds


@dataclass(frozen=True)
class Query:
    question: str
    request_id: str
    controller_id: str = ""
    site_ids: tuple[str, ...] = ()
    cell_ids: tuple[str, ...] = ()
    kpis: tuple[KpiSample, ...] = ()
    priority: Priority = Priority.BEST_EFFORT
    max_tokens: int = 0  # 0 = server default
    temperature: float = 0.0
    deadline: float | None = None  # monotonic seconds; None = no deadline
    model: str = ""
    mode: str = "free_text"  # or "diagnosis"
    recent_events: tuple[str, ...] = ()
    # diagnosis: when no replica can answer in time, the fast detector's diagnosis instead (flagged);
    # None = the server's default (router.admission.detector_fallback)
    detector_fallback: bool | None = None
    retrieval: bool = True  # free text: knowledge passages in the prompt (off only for evaluation baselines)
    # the sites the caller's scope confines its routing to (None: every site); the server sets it from
    # the authenticated caller, never from the request
    allowed_sites: frozenset[str] | None = None
    # the server's estimate of a diagnosis's length before the model's own answers are learnt (0: none);
    # set by the gateway from the detector's answer in the same form, never from the request
    answer_tokens_prior: int = 0

    @property
    def context_cells(self) -> list[str]:
        """Cells a diagnosis may name: the ones the request mentions, nothing else."""
        return sorted({*self.cell_ids, *(k.cell_id for k in self.kpis if k.cell_id)})


def query_from_fields(
    question: str,
    request_id: str,
    controller_id: str,
    site_ids: Iterable[str],
    cell_ids: Iterable[str],
    kpis: Iterable[tuple[str, float, str, str, float | None]],
    **options,
) -> Query:
    """A `Query` from the fields a controller's request carries, whatever carried them (a gRPC
    `AskRequest`, a simulator query): id lists become tuples, each KPI row (name, value, unit,
    cell id, unix seconds or None) a `KpiSample`; `options` are the other `Query` fields."""
    return Query(
        question=question,
        request_id=request_id,
        controller_id=controller_id,
        site_ids=tuple(site_ids),
        cell_ids=tuple(cell_ids),
        kpis=tuple(KpiSample(*row) for row in kpis),
        **options,
    )


def validate_query(
    query: Query, limits: LimitsConfig, known_sites: Collection[str], now: float
) -> Query:
    """Return the query with defaults filled in, or raise an AiranError a person can act on."""
    question = query.question.strip()
    if not question:
        raise invalid("question is empty: put the network-operations question in AskRequest.question")
    if len(question) > limits.max_question_chars:
        raise invalid(
            f"question is {len(question)} characters; the limit is {limits.max_question_chars}: "
            "shorten it or move data into kpi_context"
        )
    unknown = [s for s in query.site_ids if s not in known_sites]
    if unknown:
        # a site-scoped caller is told only the sites its scope lets it use, not the whole network
        shown = sorted(known_sites if query.allowed_sites is None else set(known_sites) & query.allowed_sites)
        raise AiranError(
            ErrorKind.NOT_FOUND,
            f"unknown site(s) {', '.join(map(repr, unknown))}; known sites: {', '.join(shown) or '(none in scope)'}",
        )
    if query.mode not in ("free_text", "diagnosis"):
        raise invalid(f"unknown response mode '{query.mode}'")
    diagnosis = query.mode == "diagnosis"
    # a near-RT diagnosis is the compact answer's cause and cells; others may cite KPIs too
    diagnosis_tokens = BRIEF_MAX_TOKENS if query.priority == Priority.NEAR_RT else FULL_MAX_TOKENS
    max_tokens = query.max_tokens or (diagnosis_tokens if diagnosis else limits.default_max_tokens)
    if diagnosis and max_tokens < BRIEF_MAX_TOKENS:
        raise invalid(
            f"diagnosis mode needs max_tokens >= {BRIEF_MAX_TOKENS} to complete its answer "
            f"(got {max_tokens}); leave it 0 for the default of {diagnosis_tokens}"
        )
    if max_tokens > limits.max_tokens_limit:
        raise invalid(
            f"max_tokens {max_tokens} exceeds this server's limit of {limits.max_tokens_limit}; "
            f"ask for at most {limits.max_tokens_limit}"
        )
    if not (math.isfinite(query.temperature) and 0.0 <= query.temperature <= limits.max_temperature):
        raise invalid(f"temperature must be between 0 and {limits.max_temperature}, got {query.temperature}")
    if len(query.kpis) > limits.max_kpi_samples:
        raise invalid(
            f"kpi_context has {len(query.kpis)} samples; the limit is {limits.max_kpi_samples}: "
            "send the most recent or most relevant ones"
        )
    for i, kpi in enumerate(query.kpis):
        if not kpi.name.strip():
            raise invalid(f"kpi_context[{i}] has no name (expected an E2SM-KPM name such as DRB.UEThpDl)")
    if query.deadline is not None and query.deadline <= now:
        raise AiranError(
            ErrorKind.DEADLINE_EXCEEDED,
            f"deadline already passed {1000 * (now - query.deadline):.0f} ms before the query arrived",
        )
    return replace(query, question=question, max_tokens=max_tokens)
