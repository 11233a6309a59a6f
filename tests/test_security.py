"""Identity and scopes on the real gRPC server (127.0.0.1, in-process; fake replicas, real gateway).

What each refusal returns, as a stock grpc client sees it:
- mTLS, no client certificate, or one signed by another CA: the TLS handshake fails and no RPC
  runs; grpc gives the client UNAVAILABLE (the server never chooses a status: there is no call).
- token mode, no token / a bad, expired or foreign-signed one: UNAUTHENTICATED.
- an identity no scope lists, an RPC or a site outside its scope, a controller_id it may not speak
  for: PERMISSION_DENIED naming what it may do.
- over its rate: RESOURCE_EXHAUSTED with `retry-after-ms` in the trailing metadata.
"""
from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from airan.client import AsyncAiranClient, ClientTLS, build_request
from airan.config import AuthConfig, ControllerScope
from airan.core.authz import issue_token
from airan.core.prompting import PromptRenderer
from airan.factory.tiny import ensure_tiny_model
from airan.serving.api.interceptors import REQUEST_ID_METADATA, RETRY_AFTER_METADATA
from airan.serving.auth import server_credentials
from airan.serving.gateway import Gateway
from airan.serving.server import build_grpc_server
from airan.serving.sites import SiteRegistry
from airan.v1 import control_pb2
from fakes import CONFIG, FakePool, FakeReplica

SERVER_NAME = "airan.test"
SCOPES = [
    ControllerScope(id="xapp-ts", rpcs=["ask", "view"], sites=["bs-01"], rate_per_s=0.01, burst=3),
    ControllerScope(id="noc-ops", rpcs=["ask", "view", "operate"], rate_per_s=None, act_for=["xapp-ts"]),
    ControllerScope(id="spiffe://ran.example/xapp/kpimon", rpcs=["view"], rate_per_s=None),
]


# ---------------------------------------------------------------- a throwaway PKI


@dataclass(frozen=True)
class Pki:
    root: Path

    def path(self, name: str) -> str:
        return str(self.root / name)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(directory: Path, stem: str, cn: str, ca: tuple | None, sans: list[x509.GeneralName] = (),
           is_ca: bool = False) -> tuple:  # fmt: skip
    """A key and certificate (signed by `ca` = (cert, key), or self-signed) written as <stem>.crt/.key."""
    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_cert, issuer_key = ca if ca else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    pem = serialization.Encoding.PEM
    (directory / f"{stem}.crt").write_bytes(cert.public_bytes(pem))
    (directory / f"{stem}.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = _issue(d, "ca", "airan-test-ca", None, is_ca=True)
    _issue(d, "server", SERVER_NAME, ca, [x509.DNSName(SERVER_NAME)])
    _issue(d, "xapp-ts", "xapp-ts", ca)  # identity in the CN (cert-manager commonName)
    _issue(d, "noc-ops", "noc-ops", ca, [x509.DNSName("noc-ops")])
    _issue(d, "kpimon", "kpimon", ca, [x509.UniformResourceIdentifier("spiffe://ran.example/xapp/kpimon")])
    _issue(d, "stranger", "stranger", ca)  # the right CA, but no scope lists it
    rogue_ca = _issue(d, "rogue-ca", "rogue-ca", None, is_ca=True)
    _issue(d, "rogue", "noc-ops", rogue_ca)  # claims a listed name, signed by another CA
    return Pki(d)


# ---------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def renderer():
    return PromptRenderer(ensure_tiny_model())


@dataclass
class Served:
    target: str
    replica: FakeReplica
    gateway: Gateway


async def _serve(config, renderer):
    replica = FakeReplica()
    pool = FakePool({"r1": ("bs-01", replica), "r2": ("bs-02", FakeReplica())})
    gateway = Gateway(config, pool, SiteRegistry(config.sites, config.radio.min_ai_headroom), {"m": renderer})
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server = build_grpc_server(gateway, {}, health_servicer)
    credentials = server_credentials(config.server)
    port = server.add_secure_port("127.0.0.1:0", credentials) if credentials else server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, Served(f"127.0.0.1:{port}", replica, gateway)


@pytest_asyncio.fixture
async def mtls(pki, renderer):
    server_cfg = CONFIG.server.model_copy(update={
        "tls_cert_file": Path(pki.path("server.crt")), "tls_key_file": Path(pki.path("server.key")),
        "tls_client_ca_file": Path(pki.path("ca.crt"))})  # fmt: skip
    config = CONFIG.model_copy(update={"server": server_cfg, "auth": AuthConfig(mode="mtls", controllers=SCOPES)})
    server, served = await _serve(config, renderer)
    yield served
    await server.stop(0)


KEY = b"s" * 40


@pytest_asyncio.fixture
async def token_server(tmp_path, renderer):
    key_file = tmp_path / "token.key"
    key_file.write_bytes(KEY)
    config = CONFIG.model_copy(update={"auth": AuthConfig(mode="token", token_key_file=key_file, controllers=SCOPES)})
    server, served = await _serve(config, renderer)
    yield served
    await server.stop(0)


def tls_for(pki: Pki, who: str | None, ca: str = "ca") -> ClientTLS:
    return ClientTLS(pki.path(f"{ca}.crt"), pki.path(f"{who}.crt") if who else "", pki.path(f"{who}.key") if who else "",
                     server_name=SERVER_NAME)  # fmt: skip


def ask(**kw):
    return build_request("Why did throughput drop on bs-01/c1?", max_tokens=4, **kw)


async def _code(call) -> tuple[grpc.StatusCode, str, dict]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    return e.value.code(), e.value.details(), dict(e.value.trailing_metadata() or ())


def _rejections(reason: str, method: str = "Ask") -> float:
    return REGISTRY.get_sample_value("airan_rejections_total", {"method": method, "priority": "", "reason": reason}) or 0.0


async def _counted(reason: str, method: str, expected: float) -> float:
    """The count once the server has finished the call (the client can see the status first)."""
    for _ in range(100):
        if _rejections(reason, method) >= expected:
            break
        await asyncio.sleep(0.02)
    return _rejections(reason, method)


# ---------------------------------------------------------------- mutual TLS


async def test_mtls_caller_named_by_its_certificate_is_served(mtls, pki):
    async with AsyncAiranClient(mtls.target, tls=tls_for(pki, "xapp-ts"), token="") as c:
        answer = await c.ask(ask(site_ids=["bs-01"]), timeout_s=10)
        assert answer.text and mtls.replica.calls == 1
        assert (await c.topology()).sites


@pytest.mark.parametrize("who, ca", [(None, "ca"), ("rogue", "rogue-ca")], ids=["no-cert", "wrong-ca"])
async def test_mtls_without_a_trusted_certificate_fails_the_handshake(mtls, pki, who, ca):
    """No client certificate, or one from another CA (naming a listed controller): no RPC runs, and
    grpc reports the failed handshake to the client as UNAVAILABLE."""
    tls = tls_for(pki, who, ca="ca")  # the client trusts the server either way
    if who:
        tls = ClientTLS(pki.path("ca.crt"), pki.path(f"{who}.crt"), pki.path(f"{who}.key"), SERVER_NAME)
    async with AsyncAiranClient(mtls.target, tls=tls, token="") as c:
        code, details, _ = await _code(c.ask(ask(), timeout_s=5))
        assert code is grpc.StatusCode.UNAVAILABLE, (code, details)
        code, _, _ = await _code(c.drain_site("bs-01"))
        assert code is grpc.StatusCode.UNAVAILABLE
    assert mtls.replica.calls == 0
    assert not mtls.gateway.sites.get("bs-01").drained


async def test_mtls_certificate_no_scope_lists_is_denied(mtls, pki):
    async with AsyncAiranClient(mtls.target, tls=tls_for(pki, "stranger"), token="") as c:
        code, details, metadata = await _code(c.ask(ask()))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "'stranger' has no scope" in details and metadata[REQUEST_ID_METADATA]


async def test_mtls_out_of_scope_rpc_and_site_are_denied_naming_what_is_allowed(mtls, pki):
    before = _rejections("permission_denied", "DrainSite")
    async with AsyncAiranClient(mtls.target, tls=tls_for(pki, "xapp-ts"), token="") as c:
        code, details, _ = await _code(c.drain_site("bs-01"))
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert "may not call DrainSite" in details and "Ask, AskStream, GetTopology, ListReplicas on sites bs-01" in details
        code, details, _ = await _code(c.report_ran_load({"bs-01": 0.9}))
        assert code is grpc.StatusCode.PERMISSION_DENIED and "ReportRanLoad" in details
        code, details, _ = await _code(c.ask(ask(site_ids=["bs-02"])))
        assert code is grpc.StatusCode.PERMISSION_DENIED and "site(s) bs-02" in details
    assert not mtls.gateway.sites.get("bs-01").drained and mtls.replica.calls == 0
    assert await _counted("permission_denied", "DrainSite", before + 1) == before + 1


async def test_mtls_operator_may_drain_and_san_names_the_caller(mtls, pki):
    async with AsyncAiranClient(mtls.target, tls=tls_for(pki, "noc-ops"), token="") as c:
        await c.drain_site("bs-02")
    assert mtls.gateway.sites.get("bs-02").drained
    async with AsyncAiranClient(mtls.target, tls=tls_for(pki, "kpimon"), token="") as c:
        assert (await c.replicas()).replicas  # view scope, named by its SPIFFE URI SAN
        code, details, _ = await _code(c.ask(ask()))
        assert code is grpc.StatusCode.PERMISSION_DENIED and "'spiffe://ran.example/xapp/kpimon'" in details


async def test_mtls_over_rate_is_resource_exhausted_with_retry_after(mtls, pki):
    before = _rejections("rate_limited", "GetTopology")
    async with AsyncAiranClient(mtls.target, tls=tls_for(pki, "xapp-ts"), token="") as c:
        for _ in range(3):  # the burst
            await c.topology()
        code, details, metadata = await _code(c.topology())
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over its rate (0.01/s, burst 3)" in details
    assert 90_000 <= int(metadata[RETRY_AFTER_METADATA]) <= 100_000  # one token at 0.01/s
    assert metadata[REQUEST_ID_METADATA]
    assert await _counted("rate_limited", "GetTopology", before + 1) == before + 1


async def test_mtls_health_answers_any_certified_caller(mtls, pki):
    tls = tls_for(pki, "stranger")
    channel = grpc.aio.secure_channel(mtls.target, tls.credentials(), options=tls.options())
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await channel.close()


# ---------------------------------------------------------------- bearer tokens (mTLS off)


async def test_token_missing_bad_or_expired_is_unauthenticated(token_server):
    cases = {
        "": "no bearer token",
        issue_token(b"x" * 40, "noc-ops", 60): "signature does not match",
        issue_token(KEY, "noc-ops", 60, now=0): "expired",
        "garbage": "not a valid airan token",
    }
    before = _rejections("unauthenticated", "DrainSite")
    for token, why in cases.items():
        async with AsyncAiranClient(token_server.target, token=token) as c:
            code, details, metadata = await _code(c.drain_site("bs-01"))
        assert code is grpc.StatusCode.UNAUTHENTICATED, (why, code, details)
        assert why in details and metadata[REQUEST_ID_METADATA]
    assert await _counted("unauthenticated", "DrainSite", before + len(cases)) == before + len(cases)
    assert not token_server.gateway.sites.get("bs-01").drained


async def test_token_names_the_controller_and_fills_controller_id(token_server):
    async with AsyncAiranClient(token_server.target, token=issue_token(KEY, "xapp-ts", 60)) as c:
        answer = await c.ask(ask(site_ids=["bs-01"], request_id="q-1"))
        assert answer.text
        code, details, _ = await _code(c.ask(ask(controller_id="noc-ops")))
        assert code is grpc.StatusCode.PERMISSION_DENIED and "may not ask as controller_id 'noc-ops'" in details
        code, _, _ = await _code(c.drain_site("bs-01"))
        assert code is grpc.StatusCode.PERMISSION_DENIED
    async with AsyncAiranClient(token_server.target, token=issue_token(KEY, "noc-ops", 60)) as c:
        assert (await c.ask(ask(controller_id="xapp-ts"))).text  # act_for: xapp-ts
        await c.drain_site("bs-01")
    assert token_server.gateway.sites.get("bs-01").drained


async def test_token_mode_leaves_health_and_reflection_open(token_server):
    """Probes carry no token; `grpcurl list` needs none (the schema is the public protos)."""
    async with grpc.aio.insecure_channel(token_server.target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    def services() -> list[str]:  # a blocking client: off the event loop that serves
        with grpc.insecure_channel(token_server.target) as channel:
            return ProtoReflectionDescriptorDatabase(channel).get_services()

    assert "airan.v1.ControlService" in await asyncio.to_thread(services)


async def test_token_stock_client_with_metadata(token_server):
    """What grpcurl or any stock client sends: `authorization: Bearer <token>`."""
    async with grpc.aio.insecure_channel(token_server.target) as channel:
        from airan.v1 import control_pb2_grpc

        stub = control_pb2_grpc.ControlServiceStub(channel)
        token = issue_token(KEY, "xapp-ts", 60)
        reply = await stub.GetTopology(control_pb2.GetTopologyRequest(), metadata=(("authorization", f"Bearer {token}"),))
        assert reply.sites
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.GetTopology(control_pb2.GetTopologyRequest())
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_idempotency_keys_are_scoped_per_controller(token_server):
    """Another caller's key never returns this caller's answer; a caller's own retry does."""
    token_server.replica.answers = ["first", "second"]
    async with AsyncAiranClient(token_server.target, token=issue_token(KEY, "xapp-ts", 60)) as xapp, \
            AsyncAiranClient(token_server.target, token=issue_token(KEY, "noc-ops", 60)) as ops:  # fmt: skip
        mine = await xapp.ask(ask(request_id="shared-key"))
        theirs = await ops.ask(ask(request_id="shared-key"))
        retried = await xapp.ask(ask(request_id="shared-key"))
    assert mine.text.strip() == "first" and theirs.text.strip() == "second"
    assert retried == mine and token_server.replica.calls == 2
    assert token_server.gateway.remembers("shared-key", "xapp-ts") and token_server.gateway.remembers("shared-key", "noc-ops")
    assert not token_server.gateway.remembers("shared-key")


async def test_a_site_scoped_caller_is_routed_and_shown_only_at_its_sites(token_server):
    """xapp-ts's scope lists bs-01: an Ask naming no site is answered there even when bs-02 scores
    higher, and its views show bs-01 and its replica only; noc-ops (every site) goes to bs-02 and sees both."""
    gateway = token_server.gateway
    gateway._routing_table()
    gateway._rates_of("r1").observe(100, 0.01, 40, 4.0)  # r1 at bs-01 learnt slow: bs-02 predicts faster
    gateway._queue_changed("r1")
    async with AsyncAiranClient(token_server.target, token=issue_token(KEY, "noc-ops", 60)) as ops:
        assert (await ops.ask(ask(), timeout_s=10)).site_id == "bs-02"
        assert sorted(s.site_id for s in (await ops.topology()).sites) == ["bs-01", "bs-02"]
    async with AsyncAiranClient(token_server.target, token=issue_token(KEY, "xapp-ts", 60)) as xapp:
        answer = await xapp.ask(ask(), timeout_s=10)  # names no site
        assert (answer.site_id, answer.replica_id) == ("bs-01", "r1") and token_server.replica.calls == 1
        assert [s.site_id for s in (await xapp.topology()).sites] == ["bs-01"]
        assert [r.replica_id for r in (await xapp.replicas()).replicas] == ["r1"]  # its burst of 3 is spent


async def test_local_default_token_mode_needs_no_setup_on_this_machine(tmp_path, monkeypatch, renderer):
    """default.yaml's local mode: the server makes the key in the cache dir; this user's client signs a
    local-operator token with it for 127.0.0.1, and sends nothing it could sign for another host."""
    from airan.client import local_token
    from airan.config import load_config

    monkeypatch.setenv("AIRAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("AIRAN_TOKEN", raising=False)
    auth = load_config().auth
    assert auth.mode == "token" and auth.token_key_file is None
    assert "local-operator" in {c.id for c in auth.controllers}
    server, served = await _serve(CONFIG.model_copy(update={"auth": auth}), renderer)
    try:
        assert (tmp_path / "cache" / "auth" / "token.key").stat().st_mode & 0o777 == 0o600
        async with AsyncAiranClient(served.target) as c:  # no credentials given
            await c.drain_site("bs-02")
            assert (await c.ask(ask(controller_id="xapp-ts"))).text  # local-operator may ask as any controller
        assert served.gateway.sites.get("bs-02").drained
        assert local_token("airan.example:50051") is None
        async with AsyncAiranClient(served.target, token="") as c:
            code, _, _ = await _code(c.topology())
            assert code is grpc.StatusCode.UNAUTHENTICATED
        monkeypatch.setenv("AIRAN_TOKEN", "from-the-environment")
        assert local_token("airan.example:50051") == "from-the-environment"
    finally:
        await server.stop(0)


def test_cli_issues_tokens_for_listed_controllers_only(tmp_path):
    from typer.testing import CliRunner

    from airan.cli import app
    from airan.core.authz import verify_token

    key_file = tmp_path / "token.key"
    key_file.write_bytes(KEY)
    config = tmp_path / "airan.yaml"
    config.write_text(
        "sites: [{id: bs-01}]\nmodels: [{name: m, source: tiny-random}]\n"
        f"auth: {{mode: token, token_key_file: {key_file}, controllers: [{{id: xapp-ts}}]}}\n"
    )
    result = CliRunner().invoke(app, ["auth", "token", "--controller", "xapp-ts", "--ttl-s", "60", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert verify_token(KEY, result.stdout.strip()) == "xapp-ts"
    result = CliRunner().invoke(app, ["auth", "token", "--controller", "stranger", "--config", str(config)])
    assert result.exit_code == 2 and "not in auth.controllers (xapp-ts)" in result.output


async def test_streams_are_held_to_the_same_scope_and_rate(token_server):
    async with AsyncAiranClient(token_server.target, token=issue_token(KEY, "xapp-ts", 60)) as c:
        chunks = [chunk async for chunk in c.ask_stream(ask(site_ids=["bs-01"]))]
        assert chunks[-1].final
        with pytest.raises(grpc.aio.AioRpcError) as e:
            [chunk async for chunk in c.ask_stream(ask(site_ids=["bs-02"]))]
        assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED and "site(s) bs-02" in e.value.details()
        await c.ask(ask())
        await c.ask(ask())  # the last of its burst of 3 (the denied stream took none)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            [chunk async for chunk in c.ask_stream(ask())]
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(e.value.trailing_metadata())[RETRY_AFTER_METADATA]) > 0
    assert token_server.replica.calls == 3


async def test_the_blocking_client_sends_its_token_on_unary_and_streaming_calls(token_server):
    from airan.client import AiranClient

    def calls() -> tuple[str, bool]:
        with AiranClient(token_server.target, token=issue_token(KEY, "noc-ops", 60)) as c:
            return c.ask(ask()).text, list(c.ask_stream(ask()))[-1].final

    text, final = await asyncio.to_thread(calls)
    assert text and final
