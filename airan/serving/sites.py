"""Live state of the edge sites: operator drains, the radio's compute share and its forecast.

The radio comes first: when the RAN stack needs more of a site's compute, the AI headroom shrinks,
and below `radio.min_ai_headroom` the site takes no new queries until the surge passes. With a
forecaster (router.policy radio_first) the headroom is the forecast one (airan/core/headroom.py:
capacity - the radio's share at a high quantile over the next control interval - a margin), and a
site whose headroom fits no variant is surged with a reason the topology shows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from airan.config import SiteConfig
from airan.core.headroom import Forecast, HeadroomForecaster
from airan.core.routing.types import SiteView
from airan.errors import AiranError, ErrorKind, invalid


@dataclass
class SiteState:
    config: SiteConfig
    drained: bool = False
    ran_compute_share: float = 0.0
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
    ) -> None:
        self._sites = {s.id: SiteState(s) for s in sites}
        self.min_ai_headroom = min_ai_headroom
        self.forecaster = forecaster
        self.headroom_margin = headroom_margin
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
        return state

    def report_ran_load(self, site_id: str, ran_compute_share: float, at: float | None = None) -> bool:
        """Record the radio's compute share (measured at `at`, radio-clock seconds; None: now);
        returns True if the site is now in a surge."""
        if not (math.isfinite(ran_compute_share) and 0.0 <= ran_compute_share <= 1.0):
            raise invalid(
                f"ran_compute_share for site '{site_id}' must be within [0, 1], got {ran_compute_share}"
            )
        state = self.get(site_id)
        state.ran_compute_share = ran_compute_share
        if self.forecaster is not None:
            self.forecaster.observe(site_id, ran_compute_share, at)
            self._refresh(state)
        return self.surged(site_id)

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
