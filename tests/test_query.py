"""Query validation on plain data: what a controller may send."""
from __future__ import annotations

import math

from airan.config import LimitsConfig
from airan.core.evidence import compute_evidence
from airan.core.query import KpiSample, Query, validate_query


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
