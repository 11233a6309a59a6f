"""Live state of the edge sites: operator drains, the radio's compute share and its forecast.

The radio comes first: when the RAN stack needs more of a site's compute, the AI headroom shrinks,
and below `radio.min_ai_headroom` the site takes no new queries until the surge passes. With a
forecaster (router.policy radio_first) the headroom is the forecast one (airan/core/headroom.py:
capacity - the radio's share at a high quantile over the next control interval - a margin), and a
site whose headroom fits no variant is surged with a reason the topology shows.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from airan.config import SiteConfig
from airan.core.headroom import Forecast, HeadroomForecaster
from airan.core.routing.types import SiteView
from airan.errors import AiranError, ErrorKind, invalid
from airan.serving.state import DrainRecord, RanReport, SavedState, StateStore


@dataclass
class SiteState:
    config: SiteConfig
    drained: bool = False
    ran_compute_share: float = 0.0
    # the last radio report: when the radio measured it and when it arrived (unix seconds; None: none yet)
    ran_measured_at: float | None = None
    ran_received_at: float | None = None
    # radio first: the forecast, the CPUs it leaves the AI, and why the site is surged ("" = not)
    forecast: Forecast | None = None
    headroom_cpus: float | None = None
    surge_reason: str = ""

    @property
    def ai_headroom(self) -> float:
        """Share of the site the AI may use: by the forecast when there is one, else by the last report."""
        if self.headroom_cpus is not None:
            return 0.0 if self.surge_reason else self.headroom_cpus / self.config.cpus
        return max(0.0, 1.0 - self.ran_compute_share)

    @property
    def surged(self) -> bool:
        return bool(self.surge_reason)


class SiteRegistry:
    def __init__(
        self, sites: list[SiteConfig], min_ai_headroom: float = 0.0,
        forecaster: HeadroomForecaster | None = None, headroom_margin: float = 0.0,
        store: StateStore | None = None, wall_clock: Callable[[], float] | None = None,
    ) -> None:
        self._sites = {s.id: SiteState(s) for s in sites}
        self.min_ai_headroom = min_ai_headroom
        self.forecaster = forecaster
        self.headroom_margin = headroom_margin
        # drains and radio reports are written here on every change, so a restarted control plane
        # neither serves a drained site nor mistakes a surging one for idle
        self.store = store
        # report times are unix seconds; the forecaster reads them on its own clock, so both are one
        self.wall_clock = wall_clock or (forecaster.clock if forecaster is not None else time.time)
        self.refresh_forecasts()

    def __contains__(self, site_id: str) -> bool:
        return site_id in self._sites

    @property
    def ids(self) -> list[str]:
        return list(self._sites)

    def get(self, site_id: str) -> SiteState:
        try:
            return self._sites[site_id]
        except KeyError:
            raise AiranError(
                ErrorKind.NOT_FOUND,
                f"unknown site '{site_id}'; known sites: {', '.join(self._sites)}",
            ) from None

    def set_drained(self, site_id: str, drained: bool) -> SiteState:
        state = self.get(site_id)
        state.drained = drained
        if self.store is not None:
            self.store.set_drain(DrainRecord(site_id, drained, self.wall_clock()))
        return state

    def report_ran_load(self, site_id: str, ran_compute_share: float, at: float | None = None) -> bool:
        """Record the radio's compute share (measured at `at`, radio-clock seconds; None: now);
        returns True if the site is now in a surge."""
        if not (math.isfinite(ran_compute_share) and 0.0 <= ran_compute_share <= 1.0):
            raise invalid(
                f"ran_compute_share for site '{site_id}' must be within [0, 1], got {ran_compute_share}"
            )
        state = self.get(site_id)
        received = self.wall_clock()
        report = RanReport(site_id, ran_compute_share, received if at is None else float(at), received)
        self._apply(state, report)
        if self.store is not None:
            self.store.add_ran_report(report)
        return self.surged(site_id)

    def _apply(self, state: SiteState, report: RanReport) -> None:
        state.ran_compute_share = report.share
        state.ran_measured_at, state.ran_received_at = report.measured_at, report.received_at
        if self.forecaster is not None:
            self.forecaster.observe(report.site_id, report.share, report.measured_at, report.received_at)
            self._refresh(state)

    def restore(self, saved: SavedState) -> list[str]:
        """Drains and radio reports a previous control plane wrote (each report with its own times,
        so a radio that went quiet while the control plane was down is stale now). Returns what was
        skipped: sites the config no longer has."""
        skipped = set()
        for record in saved.drains.values():
            if record.site_id in self._sites:
                self._sites[record.site_id].drained = record.drained
            else:
                skipped.add(record.site_id)
        for report in saved.ran_reports:
            if report.site_id in self._sites:
                self._apply(self._sites[report.site_id], report)
            else:
                skipped.add(report.site_id)
        self.refresh_forecasts()
        return sorted(skipped)

    def refresh_forecasts(self) -> None:
        """Re-forecast every site (reports that stopped make a site's forecast stale)."""
        for state in self._sites.values():
            self._refresh(state)

    def _refresh(self, state: SiteState) -> None:
        if self.forecaster is None:
            return
        state.forecast = self.forecaster.forecast(state.config.id)
        state.headroom_cpus = state.forecast.headroom_cpus(state.config.cpus, self.headroom_margin)

    def set_surge(self, site_id: str, reason: str) -> None:
        """Surge (reason) or clear it (""): set by the headroom controller when no variant fits."""
        self.get(site_id).surge_reason = reason

    def surged(self, site_id: str) -> bool:
        state = self._sites[site_id]
        return state.surged or state.ai_headroom < self.min_ai_headroom

    def views(self) -> dict[str, SiteView]:
        return {
            sid: SiteView(sid, s.drained, s.ai_headroom, dict(s.config.latency_ms), s.headroom_cpus, s.surge_reason)
            for sid, s in self._sites.items()
        }

    def states(self) -> list[SiteState]:
        return list(self._sites.values())
