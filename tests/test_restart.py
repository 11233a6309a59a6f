"""The control plane restarts without losing state, on the real stack: `airan serve` processes
(real gRPC, Ray in connect mode, a vLLM CPU replica of the tiny model) on a Ray cluster they do
not own. The first is SIGKILLed with a stream in flight; the second finds the drains, the radio's
reports with their times and the idempotent answers, names the call the crash cut off, and adopts
the replica actor (same actor, same process, its engine loaded once)."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import ray
from google.protobuf.timestamp_pb2 import Timestamp

from airan.client import AsyncAiranClient, build_request
from airan.config import dump_config
from airan.serving.cluster.replicas import ACTOR_PREFIX
from airan.serving.cluster.sites import SiteCluster
from airan.serving.state import SqliteStateStore
from airan.v1 import control_pb2
from conftest import prepare_tiny_models, tiny_stack_config

pytestmark = [pytest.mark.slow]
NAMESPACE = "airan-restart-test"
REPLICA = "bs-01-tiny-llama-0"
SERVE_TIMEOUT_S = 180


class Serve:
    """One `airan serve` process; its log (stderr) goes to a file the test reads."""

    def __init__(self, config_file: Path, log_file: Path) -> None:
        self.log_file = log_file
        airan = Path(sys.executable).with_name("airan")
        self.proc = subprocess.Popen([str(airan), "serve", "--config", str(config_file)], stdout=subprocess.PIPE,
                                     stderr=log_file.open("w"), text=True)  # fmt: skip
        self.address = self._wait_for_address()

    def _wait_for_address(self) -> str:
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while time.monotonic() < deadline:  # bounded: readline returns "" when the process ends
            line = self.proc.stdout.readline()
            if not line:
                break
            found = re.search(r"airan serving on (\S+)", line)
            if found:
                return found.group(1)
        self.proc.kill()
        raise AssertionError(f"airan serve did not come up:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_file.read_text()

    def stop(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=60)


@pytest.fixture
def ray_cluster(tmp_path):
    """Ray nodes for the sites, owned by the test, not by any control plane."""
    from ray.cluster_utils import Cluster

    config = tiny_stack_config()
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": False,
                                      "object_store_memory": 96 * 1024 * 1024})  # fmt: skip
    try:
        for site in config.sites:
            cluster.add_node(**SiteCluster(config)._node_args(site))
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _identity() -> dict:
    return ray.get(ray.get_actor(ACTOR_PREFIX + REPLICA).identity.remote(), timeout=30)


def _ran_load(shares: dict[str, tuple[float, float]]) -> control_pb2.ReportRanLoadRequest:
    loads = []
    for site, (share, at) in shares.items():
        ts = Timestamp()
        ts.FromNanoseconds(int(at * 1e9))
        loads.append(control_pb2.SiteRanLoad(site_id=site, ran_compute_share=share, time=ts))
    return control_pb2.ReportRanLoadRequest(loads=loads)


def test_a_restarted_control_plane_keeps_drains_radio_reports_answers_and_replicas(ray_cluster, tmp_path):
    state_file = tmp_path / "state.sqlite"
    config = prepare_tiny_models(tiny_stack_config(
        replicas=[{"site": "bs-01", "model": "tiny-llama"}],  # bs-02 has no replica: it is only drained
        cluster={"mode": "connect", "address": ray_cluster.address, "namespace": NAMESPACE},
        state={"path": str(state_file)},
    ))  # fmt: skip
    config_file = tmp_path / "airan.yaml"
    config_file.write_text(dump_config(config))
    measured = {"bs-01": (0.5, round(time.time() - 3.25, 3)), "bs-02": (0.9, round(time.time() - 1.5, 3))}
    asked = build_request("Summarise bs-01.", site_ids=["bs-01"], max_tokens=8, request_id="restart-1",
                          temperature=1.0)  # fmt: skip

    async def before_the_crash(serve: Serve):
        async with AsyncAiranClient(serve.address) as client:
            await client.drain_site("bs-02")
            await client.control.ReportRanLoad(_ran_load(measured))
            answer = await client.ask(asked, timeout_s=60)
            # a stream in flight when the control plane dies: its caller sees the connection fail
            stream = client.netops.AskStream(build_request("talk", max_tokens=200, request_id="lost-1"))
            await stream.read()
            serve.proc.send_signal(signal.SIGKILL)
            try:
                while await stream.read() != grpc.aio.EOF:  # bounded: the connection drops when the process dies
                    pass
            except grpc.aio.AioRpcError as e:
                return answer, e.code()
            return answer, "the stream finished before the kill"

    first = Serve(config_file, tmp_path / "first.log")
    try:
        answer, cut_off = asyncio.run(before_the_crash(first))
    finally:
        first.stop(signal.SIGKILL)
    assert cut_off == grpc.StatusCode.UNAVAILABLE
    before = _identity()
    assert before["engine_loads"] == 1

    second = Serve(config_file, tmp_path / "second.log")
    try:
        log = second.log()
        assert f"adopted {REPLICA} (tiny-llama, pid {before['pid']}, engine loaded 1x)" in log
        assert "1 call(s) were in flight" in log and "lost-1 (idempotent: a retry runs it anew)" in log

        async def after_the_restart(address: str):
            async with AsyncAiranClient(address) as client:
                sites = {s.site_id: s for s in (await client.topology()).sites}
                again = await client.ask(asked, timeout_s=60)
                retried = await client.ask(build_request("talk", max_tokens=4, request_id="lost-1"), timeout_s=60)
                replicas = (await client.replicas()).replicas
                return sites, again, retried, replicas

        sites, again, retried, replicas = asyncio.run(after_the_restart(second.address))
    finally:
        second.stop(signal.SIGTERM)

    assert sites["bs-02"].state == control_pb2.SITE_DRAINED and sites["bs-01"].state == control_pb2.SITE_ACTIVE
    assert {s: sites[s].ran_compute_share for s in sites} == {"bs-01": 0.5, "bs-02": 0.9}
    assert again == answer  # the same text, tokens and timings: read back, not generated again
    assert retried.completion_tokens == 4  # the call the crash cut off runs anew when retried
    assert [(r.replica_id, r.state) for r in replicas] == [(REPLICA, control_pb2.REPLICA_READY)]
    after = _identity()  # the same actor and process, its engine never loaded again
    assert (after["actor_id"], after["pid"], after["engine_loads"]) == (before["actor_id"], before["pid"], 1)
    # the radio's own measurement times are what was kept (the second control plane logs them too)
    reports = {r.site_id: r for r in SqliteStateStore(state_file).load().ran_reports}
    assert {s: (r.share, r.measured_at) for s, r in reports.items()} == \
        {s: (share, pytest.approx(at, abs=1e-6)) for s, (share, at) in measured.items()}  # fmt: skip
    assert f"last radio report of bs-01: share 0.500 measured at {measured['bs-01'][1]:.3f}" in log

