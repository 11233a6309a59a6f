"""Assembles the control plane: Ray sites, vLLM replicas, gateway, gRPC server.

`ControlPlane` is an async context manager so the CLI, the tests and the
benchmarks start and stop the real stack the same way.
"""
from __future__ import annotations

import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from airan.serving import metrics
from airan.serving.api.interceptors import server_interceptors
from airan.serving.auth import server_credentials
from airan.serving.api.servicers import ControlServicer, NetOpsServicer
from airan.serving.cluster.headroom import HeadroomController, servable_variants
from airan.serving.cluster.replicas import RayReplicaPool
from airan.serving.cluster.sites import SiteCluster
from airan.serving.cluster.supervisor import ReplicaSupervisor
from airan.config import AiranConfig
from airan.serving.gateway import Gateway
from airan.core.detector import Detector
from airan.core.headroom import ForecastParams, HeadroomForecaster
from airan.core.policies import build_router
from airan.store.registry import PACKAGED_DETECTOR, materialize, packaged_detector
from airan.core.prompting import PromptRenderer
from airan.serving.sites import SiteRegistry
from airan.serving.state import Recovery, StateStore, last_report_per_site, open_state_store
from airan.v1 import control_pb2, control_pb2_grpc, netops_pb2, netops_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAMES = (
    netops_pb2.DESCRIPTOR.services_by_name["NetOpsService"].full_name,
    control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name,
)
GRPC_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a taken port is an error, not a second server sharing it
]


def build_grpc_server(
    gateway: Gateway, node_of_site: dict[str, str], health_servicer: health.aio.HealthServicer
) -> grpc.aio.Server:
    """The gRPC server with its interceptor chain, servicers, health and reflection; no port bound yet."""
    cfg = gateway.config.server
    options = [*GRPC_OPTIONS, ("grpc.max_receive_message_length", cfg.max_receive_message_bytes),
               ("grpc.max_send_message_length", cfg.max_send_message_bytes)]  # fmt: skip
    server = grpc.aio.server(interceptors=server_interceptors(gateway.config.auth), options=options)
    netops_pb2_grpc.add_NetOpsServiceServicer_to_server(NetOpsServicer(gateway), server)
    control_pb2_grpc.add_ControlServiceServicer_to_server(ControlServicer(gateway, node_of_site), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return server


class ControlPlane:
    def __init__(self, config: AiranConfig) -> None:
        self.config = config
        self.cluster = SiteCluster(config)
        self.pool: RayReplicaPool | None = None
        self.gateway: Gateway | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.startup_s: dict[str, float] = {}
        self.metrics: metrics.MetricsEndpoint | None = None  # /metrics, server.metrics_port
        self.sampler: metrics.GatewaySampler | None = None
        self.headroom: HeadroomController | None = None  # router.policy radio_first
        self.supervisor: ReplicaSupervisor | None = None  # finds dead or hung replicas, brings them back
        self.store: StateStore | None = None  # what the next control plane reads (config.state)
        self.recovery: Recovery | None = None  # what this one took over from the previous one

    @property
    def address(self) -> str:
        return f"{self.config.server.host}:{self.port}"

    async def start(self) -> ControlPlane:
        t0 = time.monotonic()
        used = {r.model for r in self.config.replicas} | {self.config.default_model}
        used |= {a for r in self.config.replicas for a in r.adapters}
        model_paths = {m.name: materialize(m) for m in self.config.models if m.name in used}
        # an adapter shares its parent's tokenizer and chat template
        renderers = {
            m.name: PromptRenderer(model_paths[m.parent if m.is_adapter else m.name])
            for m in self.config.models
            if m.name in used
        }
        self.startup_s["models"] = time.monotonic() - t0

        t0 = time.monotonic()
        self.cluster.start()  # Ray installs signal handlers: main thread only
        self.startup_s["ray"] = time.monotonic() - t0

        # what the previous control plane left: read before anything serves
        self.store = open_state_store(self.config)
        saved = self.store.load()
        sites = site_registry(self.config, self.store)
        skipped = sites.restore(saved)

        t0 = time.monotonic()
        radio_first = self.config.router.policy == "radio_first"
        variants = servable_variants(self.config, materialize) if radio_first else {}
        self.pool = RayReplicaPool(self.config, model_paths, variants)
        await self.pool.start()  # adopts the replicas a previous control plane left running
        self.startup_s["replicas"] = time.monotonic() - t0

        self.gateway = Gateway(self.config, self.pool, sites, renderers, router=build_router(self.config.router),
                               detector=load_detector(), store=self.store)  # fmt: skip
        answers = self.gateway.restore_answers(saved.answers)
        # calls a crash cut off: their engine requests may still run on adopted replicas
        await self.pool.abort_everywhere([r.request_id for r in saved.in_flight])
        self.store.clear_in_flight()
        self.recovery = Recovery(
            drains=len(saved.drains), drained=tuple(s for s, d in saved.drains.items() if d.drained),
            ran_reports=len(saved.ran_reports), last_reports=last_report_per_site(saved.ran_reports),
            answers=answers, lost=tuple(saved.in_flight), skipped_sites=tuple(skipped),
        )  # fmt: skip
        for line in [*self.recovery.lines(), *self.pool.adoption]:
            log.info("recovery: %s", line)
        if self.recovery.lost:
            log.warning("recovery: %s", self.recovery.lost_line())
        if radio_first:
            gateway = self.gateway
            self.headroom = HeadroomController(
                self.config, sites, self.pool, variants,
                busy=lambda rid: next((v.in_flight for v in gateway.replica_views() if v.replica_id == rid), 0),
            )
            await self.headroom.step()  # caps and admitted concurrency in force before the first query
            self.headroom.start()
        await self._start_grpc(self.cluster.node_of_site())
        # from here NetOps health follows whether any replica can answer
        self.supervisor = ReplicaSupervisor(self.config, self.pool, self.gateway.sites, self.cluster.live_sites,
                                            on_serving=self._set_serving)  # fmt: skip
        self.supervisor.start()
        return self

    async def _start_grpc(self, node_of_site: dict[str, str]) -> None:
        cfg = self.config.server
        self.server = build_grpc_server(self.gateway, node_of_site, self.health)
        bind = f"{cfg.host}:{cfg.port}"
        credentials = server_credentials(cfg)  # mTLS when a client CA is given
        self.port = self.server.add_secure_port(bind, credentials) if credentials \
            else self.server.add_insecure_port(bind)  # fmt: skip
        if self.port == 0:
            raise RuntimeError(f"cannot bind gRPC port {cfg.host}:{cfg.port} (in use?)")
        if self.config.auth.mode == "none":
            log.warning("auth.mode none: every caller that reaches %s may call every RPC, DrainSite included", bind)
        await self.server.start()
        if cfg.metrics_port:
            self.metrics = metrics.MetricsEndpoint(cfg.host, cfg.metrics_port)
            gateway = self.gateway
            self.sampler = metrics.GatewaySampler(gateway.replica_views, gateway.sites.states,
                                                  self.config.router.stats_interval_s)  # fmt: skip
            self.sampler.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("airan serving on %s", self.address)

    async def _set_serving(self, serving: bool) -> None:
        """NetOps is NOT_SERVING while no replica can answer. The server ("") and ControlService stay
        SERVING: operators still drain and report, and a liveness probe on "" must not restart the
        control plane while its replicas come back."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(SERVICE_NAMES[0], status)

    async def stop(self) -> None:
        try:
            await self._stop_serving()
        finally:  # a step that fails must not leave this process joined to Ray (the next start would fail)
            self.cluster.shutdown()

    async def _stop_serving(self) -> None:
        if self.supervisor is not None:  # first: replicas stopped from here on are no failures
            await self.supervisor.stop()
            self.supervisor = None
        # flip health first so load balancers stop sending, then let in-flight work finish
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.server is not None:
            await self.server.stop(self.config.server.grace_s)
        if self.sampler is not None:
            await self.sampler.stop()
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self.headroom is not None:
            await self.headroom.stop()
        if self.pool is not None:
            # connect mode: detached replicas keep serving for the next control plane to adopt
            await self.pool.stop(keep_replicas=self.config.cluster.mode == "connect")
        if self.store is not None:
            self.store.close()
            self.store = None

    async def __aenter__(self) -> ControlPlane:
        try:
            return await self.start()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(self, *exc) -> None:
        await self.stop()


def site_registry(config: AiranConfig, store: StateStore | None = None) -> SiteRegistry:
    """The sites; under router.policy radio_first with the radio's load forecast (report times are
    unix seconds, so the forecaster's clock is the wall clock)."""
    r = config.radio
    forecaster = None
    if config.router.policy == "radio_first":
        params = ForecastParams(quantile=r.forecast_quantile, horizon_s=r.forecast_horizon_s,
                                window_s=r.forecast_window_s, stale_after_s=r.stale_after_s)  # fmt: skip
        forecaster = HeadroomForecaster([s.id for s in config.sites], params, clock=time.time)
    return SiteRegistry(config.sites, r.min_ai_headroom, forecaster, r.headroom_margin, store)


def load_detector() -> Detector | None:
    """The packaged fast detector, or None (diagnosis prompts then carry the KPI evidence only)."""
    detector = packaged_detector()
    if detector is None:
        log.warning("no detector at %s: run `airan model build-detector --export airan/store/detector`", PACKAGED_DETECTOR)
    return detector
