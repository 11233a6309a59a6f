"""Variants by headroom: which model a site's replica should serve for the AI headroom forecast.

Pure core over the measured catalog (`airan/configs/catalog.yaml`). A variant's CPU need is the
cores it takes to answer a reference near-RT request (prompt + brief answer) within its budget,
scaled from the catalog's measured TTFT and single-stream speed on the catalog machine's cores.
When a site's forecast headroom falls below what its current variant needs, the planner picks the
best-quality variant of the configured model's family that fits; it swaps back towards the
configured model only once the headroom exceeds that model's need by `hysteresis` for `hold_s`
(so a load that hovers at the boundary does not make replicas flap). With no variant that fits,
the site drains, and the plan says why.
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from airan.config import CatalogEntry

_CPUS_IN_MACHINE = re.compile(r"(\d+(?:\.\d+)?)\s*CPUs?\b")


def family(catalog: Mapping[str, CatalogEntry], model: str) -> list[str]:
    """`model` and every variant built from it, directly or from one of its variants."""

    def descends(name: str) -> bool:
        for _ in range(len(catalog) + 1):  # bounded: a parent cycle in a hand-edited file ends here
            if name == model:
                return True
            if name not in catalog or catalog[name].parent is None:
                return False
            name = catalog[name].parent
        return False

    return [name for name in catalog if descends(name)]


@dataclass(frozen=True)
class NeedParams:
    """The reference request a variant must answer in time, and the catalog's measuring setup."""

    prompt_tokens: int = 272  # a near-RT diagnosis prompt (README: 272 at the median)
    answer_tokens: int = 11  # its brief answer
    budget_s: float = 1.0  # the near-RT loop
    catalog_ttft_prompt_tokens: int = 1300  # the variants benchmark measured TTFT on ~1.3k-token prompts
    default_catalog_cpus: float = 2.0  # when the catalog's measured_on names no CPU count
    # a model with no catalog entry needs this share of its site's cpus (radio.min_ai_headroom)
    unlisted_share: float = 0.15


def catalog_cpus(entry: CatalogEntry, default: float) -> float:
    m = _CPUS_IN_MACHINE.search(entry.measured_on)
    return float(m.group(1)) if m else default


def cpu_need(entry: CatalogEntry, p: NeedParams) -> float:
    """Cores to answer the reference request within its budget (time scales as 1 / cores)."""
    prefill_s = entry.ttft_ms / 1000.0 * p.prompt_tokens / p.catalog_ttft_prompt_tokens
    decode_s = p.answer_tokens / entry.tok_s_1
    return catalog_cpus(entry, p.default_catalog_cpus) * (prefill_s + decode_s) / p.budget_s


@dataclass(frozen=True)
class PlanParams:
    hysteresis: float = 0.25  # swap up / resume only with this much headroom above the need
    hold_s: float = 30.0  # ... sustained this long (clock seconds)
    need: NeedParams = NeedParams()


@dataclass(frozen=True)
class SitePlan:
    site_id: str
    model: str | None  # what the site's replicas should serve; None: the site drains
    action: str  # "keep", "swap_down", "swap_up", "drain", "resume"
    reason: str
    headroom_cpus: float
    need_cpus: float  # of `model` (of the lightest variant when draining)


class VariantPlanner:
    """Per site: keep, swap down, swap back up or drain, with hysteresis and a hold time."""

    def __init__(
        self,
        catalog: Mapping[str, CatalogEntry],
        params: PlanParams = PlanParams(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self.params = params
        self.clock = clock
        self._roomy_since: dict[str, float] = {}  # site -> since when a better choice has fitted

    def need(self, model: str, site_cpus: float) -> float:
        entry = self.catalog.get(model)
        if entry is None:
            return self.params.need.unlisted_share * site_cpus
        return cpu_need(entry, self.params.need)

    def candidates(self, configured: str, available: Collection[str], site_cpus: float) -> list[str]:
        """The configured model and the servable members of its family that need less CPU, best first."""
        base_need = self.need(configured, site_cpus)
        names = [configured] + [
            n for n in family(self.catalog, configured)
            if n != configured and n in available and self.need(n, site_cpus) < base_need
        ]  # fmt: skip
        rank = {n: (self.catalog[n].quality_rank if n in self.catalog else 0) for n in names}
        # the configured model first (the operator's choice), then the others by quality, then by need
        return sorted(names, key=lambda n: (n != configured, rank[n], self.need(n, site_cpus)))

    def plan(
        self, site_id: str, configured: str, current: str | None, headroom_cpus: float, site_cpus: float,
        available: Collection[str] = (),
    ) -> SitePlan:
        """`current` is what the site serves now (None: drained by an earlier plan)."""
        p = self.params
        names = self.candidates(configured, available, site_cpus)
        needs = {n: self.need(n, site_cpus) for n in names}
        fitting = [n for n in names if needs[n] <= headroom_cpus]
        lightest = min(names, key=needs.get)
        if not fitting:
            self._roomy_since.pop(site_id, None)
            reason = (f"radio surge: forecast AI headroom {headroom_cpus:.2f} CPUs is below the "
                      f"{needs[lightest]:.2f} the lightest variant ({lightest}) needs")  # fmt: skip
            return SitePlan(site_id, None, "keep" if current is None else "drain", reason, headroom_cpus,
                            needs[lightest])
        if current is not None and current in needs and needs[current] <= headroom_cpus:
            # it still fits: move up only to a better one that fits with room to spare, for hold_s
            better = [n for n in fitting[: fitting.index(current)] if needs[n] * (1 + p.hysteresis) <= headroom_cpus] \
                if current in fitting else []  # fmt: skip
            if better and self._held(site_id):
                self._roomy_since.pop(site_id, None)
                return SitePlan(site_id, better[0], "swap_up",
                                f"headroom {headroom_cpus:.2f} CPUs has fitted {better[0]} "
                                f"({needs[better[0]]:.2f}) with {p.hysteresis:.0%} to spare for {p.hold_s:g} s",
                                headroom_cpus, needs[better[0]])  # fmt: skip
            if not better:
                self._roomy_since.pop(site_id, None)
            return SitePlan(site_id, current, "keep", "fits", headroom_cpus, needs[current])
        if current is None:
            # drained: resume only with room to spare, held, like a swap up
            roomy = [n for n in fitting if needs[n] * (1 + p.hysteresis) <= headroom_cpus]
            if roomy and self._held(site_id):
                self._roomy_since.pop(site_id, None)
                return SitePlan(site_id, roomy[0], "resume",
                                f"headroom {headroom_cpus:.2f} CPUs fits {roomy[0]} ({needs[roomy[0]]:.2f}) again",
                                headroom_cpus, needs[roomy[0]])  # fmt: skip
            if not roomy:
                self._roomy_since.pop(site_id, None)
            reason = (f"radio surge passing: headroom {headroom_cpus:.2f} CPUs, waiting for "
                      f"{p.hysteresis:.0%} above {needs[lightest]:.2f} for {p.hold_s:g} s")  # fmt: skip
            return SitePlan(site_id, None, "keep", reason, headroom_cpus, needs[lightest])
        # the current variant no longer fits: the best one that does, at once (the radio comes first)
        self._roomy_since.pop(site_id, None)
        choice = fitting[0]
        cur_need = needs.get(current, self.need(current, site_cpus))
        return SitePlan(site_id, choice, "swap_down",
                        f"forecast headroom {headroom_cpus:.2f} CPUs is below the {cur_need:.2f} {current} needs; "
                        f"{choice} needs {needs[choice]:.2f}", headroom_cpus, needs[choice])  # fmt: skip

    def _held(self, site_id: str) -> bool:
        now = self.clock()
        since = self._roomy_since.setdefault(site_id, now)
        return now - since >= self.params.hold_s


def lightest_need(planner: VariantPlanner, configured: str, available: Collection[str], site_cpus: float) -> float:
    names = planner.candidates(configured, available, site_cpus)
    return min((planner.need(n, site_cpus) for n in names), default=math.inf)
