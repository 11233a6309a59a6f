"""Query validation on plain data: what a controller may send."""
from __future__ import annotations

import math

import pytest

from airan.config import LimitsConfig
from airan.core.evidence import compute_evidence
from airan.core.query import KpiSample, Query, validate_query
from airan.errors import AiranError, ErrorKind


def test_non_finite_kpi_values_are_accepted_as_missing():
    """A cell that is off reports no throughput: the simulator's own NaN KPIs must go through the API."""
    kpis = (
        KpiSample("DRB.UEThpDl", 15000.0, "kbit/s", "bs-01/c1", 1_700_000_000),
        KpiSample("DRB.UEThpDl", math.nan, "kbit/s", "bs-01/c1", 1_700_000_060),
        KpiSample("DRB.UEThpDl", math.inf, "kbit/s", "bs-01/c2", 1_700_000_060),
    )
    q = Query(question="What is wrong with bs-01/c1?", request_id="r", kpis=kpis, site_ids=("bs-01",))
    ok = validate_query(q, LimitsConfig(), {"bs-01"}, now=0.0)
    assert ok.kpis == kpis
    ev = compute_evidence(ok.kpis)
    assert ev.of("bs-01/c1", "DRB.UEThpDl").missing_since == 1_700_000_060
    assert ev.flags["bs-01/c2"].silent


def test_an_unknown_site_is_answered_with_the_sites_the_callers_scope_allows():
    known = {"bs-01", "bs-02", "bs-03"}
    q = Query(question="why?", request_id="r", site_ids=("bs-99",))
    with pytest.raises(AiranError) as unscoped:
        validate_query(q, LimitsConfig(), known, now=0.0)
    assert unscoped.value.kind is ErrorKind.NOT_FOUND and "bs-01, bs-02, bs-03" in str(unscoped.value)
    scoped = Query(question="why?", request_id="r", site_ids=("bs-99",), allowed_sites=frozenset({"bs-02"}))
    with pytest.raises(AiranError) as e:
        validate_query(scoped, LimitsConfig(), known, now=0.0)
    assert "known sites: bs-02" in str(e.value) and "bs-01" not in str(e.value) and "bs-03" not in str(e.value)
