"""The variant planner on plain catalog data with an injected clock."""
import pytest

from airan.config import CatalogEntry, load_config
from airan.core.placement import NeedParams, PlanParams, VariantPlanner, cpu_need


def _entry(parent, ttft_ms, tok_s_1, rank, machine="AMD EPYC, 2 CPUs, 24 GiB, no GPU"):
    return CatalogEntry(parent=parent, method="base" if parent is None else "x", weight_mb=100, memory_mb=1000,
                        tok_s_1=tok_s_1, tok_s_16=tok_s_1 * 8, ttft_ms=ttft_ms, macro_f1=0.5, validity=1,
                        perplexity=8, quality_rank=rank, measured_on=machine, measured_at="2026-11-27")


NEED = NeedParams(prompt_tokens=1300, answer_tokens=10, budget_s=1.0, catalog_ttft_prompt_tokens=1300)
# needs at 2 catalog cpus: base 2*(0.4+0.1)=1.0, mid 2*(0.3+0.05)=0.7, light 2*(0.2+0.05)=0.5
CATALOG = {
    "base": _entry(None, 400, 100, 2),
    "mid": _entry("base", 300, 200, 3),
    "light": _entry("mid", 200, 200, 4),
    "tuned": _entry("base", 450, 100, 1),  # better quality, needs more: never a step down
    "other": _entry(None, 10, 1000, 5),  # another family
}


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _planner(hold_s=30.0, hysteresis=0.2):
    clock = Clock()
    return VariantPlanner(CATALOG, PlanParams(hysteresis=hysteresis, hold_s=hold_s, need=NEED), clock), clock


def test_need_scales_with_catalog_cores_and_budget():
    assert cpu_need(CATALOG["base"], NEED) == pytest.approx(1.0)
    four = _entry(None, 400, 100, 1, machine="Xeon, 4 CPUs")
    assert cpu_need(four, NEED) == pytest.approx(2.0)
    assert cpu_need(CATALOG["base"], NeedParams(prompt_tokens=1300, answer_tokens=10, budget_s=0.5,
                                                catalog_ttft_prompt_tokens=1300)) == pytest.approx(2.0)


def test_candidates_are_the_configured_model_then_lighter_family_by_quality():
    p, _ = _planner()
    assert p.candidates("base", set(CATALOG), 2.0) == ["base", "mid", "light"]
    assert p.candidates("base", {"light"}, 2.0) == ["base", "light"]  # only what can be served


def test_keeps_what_fits_and_swaps_down_at_once_when_it_does_not():
    p, _ = _planner()
    avail = set(CATALOG)
    assert p.plan("s", "base", "base", 1.2, 2.0, avail).action == "keep"
    down = p.plan("s", "base", "base", 0.8, 2.0, avail)
    assert (down.action, down.model) == ("swap_down", "mid") and "below the 1.00 base needs" in down.reason
    assert p.plan("s", "base", "mid", 0.55, 2.0, avail).model == "light"


def test_swaps_back_only_with_room_to_spare_held_for_the_hold_time():
    p, clock = _planner(hold_s=30, hysteresis=0.2)
    avail = set(CATALOG)
    assert p.plan("s", "base", "mid", 1.1, 2.0, avail).action == "keep"  # 1.1 < 1.0 * 1.2: no room
    clock.t = 10
    assert p.plan("s", "base", "mid", 1.3, 2.0, avail).action == "keep"  # room, held 0 s
    clock.t = 25
    assert p.plan("s", "base", "mid", 1.3, 2.0, avail).action == "keep"  # held 15 s
    clock.t = 30
    assert p.plan("s", "base", "mid", 1.1, 2.0, avail).action == "keep"  # room gone: the hold restarts
    clock.t = 35
    assert p.plan("s", "base", "mid", 1.3, 2.0, avail).action == "keep"
    clock.t = 65
    up = p.plan("s", "base", "mid", 1.3, 2.0, avail)
    assert (up.action, up.model) == ("swap_up", "base")


def test_drains_when_nothing_fits_and_resumes_after_the_surge_with_hysteresis():
    p, clock = _planner(hold_s=10, hysteresis=0.2)
    avail = set(CATALOG)
    d = p.plan("s", "base", "base", 0.3, 2.0, avail)
    assert (d.action, d.model) == ("drain", None)
    assert "radio surge" in d.reason and "light" in d.reason and "0.30" in d.reason
    assert p.plan("s", "base", None, 0.3, 2.0, avail).action == "keep"  # still drained
    assert p.plan("s", "base", None, 0.55, 2.0, avail).model is None  # fits light, but no room to spare
    assert p.plan("s", "base", None, 0.7, 2.0, avail).model is None  # room, not held yet
    clock.t = 10
    r = p.plan("s", "base", None, 0.7, 2.0, avail)
    assert (r.action, r.model) == ("resume", "light")


def test_a_model_outside_the_catalog_needs_the_minimum_share():
    p, _ = _planner()
    assert p.plan("s", "tiny", "tiny", 0.2, 1.0, ()).action == "keep"
    assert p.plan("s", "tiny", "tiny", 0.1, 1.0, ()).action == "drain"


def test_the_shipped_catalog_steps_smollm2_down_to_lighter_variants():
    catalog = load_config().catalog
    p = VariantPlanner(catalog)
    base = "smollm2-135m-instruct"
    need = p.need(base, 2.0)
    plan = p.plan("s", base, base, need * 0.9, 2.0, set(catalog))
    assert plan.action == "swap_down" and p.need(plan.model, 2.0) < need
    assert catalog[plan.model].parent is not None
