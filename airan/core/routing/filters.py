"""Filters drop replicas that cannot take the request; they may empty the set."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from airan.core.routing.types import ReplicaState, ReplicaView, RoutingContext


class Filter(Protocol):
    name: str

    def filter(self, ctx: RoutingContext, replicas: Sequence[ReplicaView]) -> list[ReplicaView]: ...

    def explain(self, ctx: RoutingContext) -> str:
        """Why the set became empty, for the error the caller sees."""
        ...


class ReadyFilter:
    name = "ready"

    def filter(self, ctx, replicas):
        return [r for r in replicas if r.state is ReplicaState.READY]

    def explain(self, ctx):
        return "no replica is ready (starting, failed or stopped)"


class ModelFilter:
    name = "model"

    def filter(self, ctx, replicas):
        return [r for r in replicas if r.serves(ctx.request.model)]

    def explain(self, ctx):
        return f"no ready replica serves model '{ctx.request.model}' (or holds it as an adapter)"


class SiteActiveFilter:
    """The radio comes first: drained sites and sites in a radio surge take no AI work."""

    name = "site_active"

    def filter(self, ctx, replicas):
        return [r for r in replicas if _site_accepts(ctx, r.site_id)]

    def explain(self, ctx):
        return (
            "every site with a matching replica is drained or has less AI headroom than "
            f"{ctx.min_ai_headroom:.0%} because of radio load"
        )


def _site_accepts(ctx: RoutingContext, site_id: str) -> bool:
    site = ctx.sites.get(site_id)
    return site is not None and not site.drained and site.ai_headroom >= ctx.min_ai_headroom


FILTERS: dict[str, type] = {f.name: f for f in (ReadyFilter, ModelFilter, SiteActiveFilter)}
