"""Live state of the edge sites: operator drains and the radio's compute share.

The radio comes first: when the RAN stack needs more of a site's compute, the
AI headroom shrinks, and below `radio.min_ai_headroom` the site takes no new
queries until the surge passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from airan.config import SiteConfig
from airan.errors import AiranError, ErrorKind, invalid
from airan.core.routing.types import SiteView


@dataclass
class SiteState:
    config: SiteConfig
    drained: bool = False
    ran_compute_share: float = 0.0

    @property
    def ai_headroom(self) -> float:
        return max(0.0, 1.0 - self.ran_compute_share)


class SiteRegistry:
    def __init__(self, sites: list[SiteConfig], min_ai_headroom: float = 0.0) -> None:
        self._sites = {s.id: SiteState(s) for s in sites}
        self.min_ai_headroom = min_ai_headroom

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

    def report_ran_load(self, site_id: str, ran_compute_share: float) -> bool:
        """Record the radio's compute share; returns True if the site is now in a surge."""
        if not (math.isfinite(ran_compute_share) and 0.0 <= ran_compute_share <= 1.0):
            raise invalid(
                f"ran_compute_share for site '{site_id}' must be within [0, 1], got {ran_compute_share}"
            )
        state = self.get(site_id)
        state.ran_compute_share = ran_compute_share
        return self.surged(site_id)

    def surged(self, site_id: str) -> bool:
        return self._sites[site_id].ai_headroom < self.min_ai_headroom

    def views(self) -> dict[str, SiteView]:
        return {
            sid: SiteView(sid, s.drained, s.ai_headroom, dict(s.config.latency_ms))
            for sid, s in self._sites.items()
        }

    def states(self) -> list[SiteState]:
        return list(self._sites.values())
