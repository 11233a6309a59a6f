"""Scopes, rate limits and tokens on plain data (airan/core/authz.py): no gRPC, an injected clock."""
from __future__ import annotations

import os
import stat

import jwt
import pytest

from airan.config import AuthConfig, ConfigError, ControllerScope, parse_config
from airan.core.authz import (
    Authorizer,
    InvalidToken,
    Scope,
    TokenBucket,
    issue_token,
    read_or_create_key,
    resolve_rpcs,
    verify_token,
)
from airan.errors import ErrorKind

KEY = b"k" * 32


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def authorizer(*scopes: ControllerScope, clock=None) -> Authorizer:
    return Authorizer.from_config(AuthConfig(controllers=list(scopes)), clock or Clock())


def test_groups_resolve_to_rpcs():
    assert resolve_rpcs(["ask"]) == {"Ask", "AskStream"}
    assert resolve_rpcs(["view", "DrainSite"]) == {"GetTopology", "ListReplicas", "DrainSite"}
    assert resolve_rpcs(["operate"]) == {"DrainSite", "ReportRanLoad"}


def test_no_identity_is_unauthenticated():
    refusal = authorizer(ControllerScope(id="xapp")).check(None, "Ask")
    assert refusal.kind is ErrorKind.UNAUTHENTICATED and refusal.reason == "unauthenticated"
    assert "client certificate" in refusal.message and "Bearer" in refusal.message


def test_unlisted_identity_is_denied():
    refusal = authorizer(ControllerScope(id="xapp")).check("stranger", "Ask")
    assert refusal.kind is ErrorKind.PERMISSION_DENIED
    assert "'stranger' has no scope" in refusal.message and "auth.controllers" in refusal.message


def test_asking_scope_may_not_operate_and_is_told_what_it_may():
    a = authorizer(ControllerScope(id="xapp", rpcs=["ask", "view"]))
    assert a.check("xapp", "Ask") is None and a.check("xapp", "ListReplicas") is None
    for rpc in ("DrainSite", "ReportRanLoad"):
        refusal = a.check("xapp", rpc)
        assert refusal.kind is ErrorKind.PERMISSION_DENIED
        assert f"may not call {rpc}" in refusal.message
        assert "Ask, AskStream, GetTopology, ListReplicas on every site" in refusal.message


def test_a_scope_names_the_sites_its_caller_is_routed_to_and_sees():
    a = authorizer(ControllerScope(id="xapp", sites=["bs-01", "bs-02"]), ControllerScope(id="ops"))
    assert a.allowed_sites("xapp") == {"bs-01", "bs-02"} and isinstance(a.allowed_sites("xapp"), frozenset)
    assert a.allowed_sites("ops") is None  # "*" (the default): every site


def test_sites_outside_the_scope_are_denied_by_name():
    a = authorizer(ControllerScope(id="ops", rpcs=["operate", "ask"], sites=["bs-01"]))
    assert a.check("ops", "DrainSite", ["bs-01"]) is None
    refusal = a.check("ops", "DrainSite", ["bs-02"])
    assert refusal.kind is ErrorKind.PERMISSION_DENIED
    assert "site(s) bs-02" in refusal.message and "sites bs-01" in refusal.message
    assert a.check("ops", "ReportRanLoad", ["bs-01", "bs-03", "bs-02"]).message.count("bs-02, bs-03") == 1


def test_unscoped_rpcs_need_only_an_identity():
    """Reflection and other methods outside the groups: any listed caller."""
    a = authorizer(ControllerScope(id="xapp", rpcs=["Ask"]))
    assert a.check("xapp", "ServerReflectionInfo") is None


def test_controller_id_must_be_the_caller_unless_it_may_act_for_it():
    a = authorizer(ControllerScope(id="xapp"), ControllerScope(id="tool", act_for=["xapp"]),
                   ControllerScope(id="admin", act_for=["*"]))  # fmt: skip
    assert a.check("xapp", "Ask", controller_id="xapp") is None
    assert a.check("xapp", "Ask", controller_id="") is None
    refusal = a.check("xapp", "Ask", controller_id="rapp")
    assert refusal.kind is ErrorKind.PERMISSION_DENIED and "may not ask as controller_id 'rapp'" in refusal.message
    assert a.check("tool", "Ask", controller_id="xapp") is None
    assert a.check("tool", "Ask", controller_id="rapp") is not None
    assert a.check("admin", "Ask", controller_id="anyone") is None


def test_rate_limit_allows_the_burst_then_refuses_with_the_wait():
    clock = Clock()
    a = authorizer(ControllerScope(id="xapp", rate_per_s=2, burst=3), ControllerScope(id="other", rate_per_s=2, burst=3),
                   clock=clock)  # fmt: skip
    assert all(a.check("xapp", "Ask") is None for _ in range(3))
    refusal = a.check("xapp", "Ask")
    assert refusal.kind is ErrorKind.RESOURCE_EXHAUSTED and refusal.reason == "rate_limited"
    assert refusal.retry_after_s == pytest.approx(0.5)
    assert "2/s, burst 3" in refusal.message and "retry in 500 ms" in refusal.message
    assert a.check("other", "Ask") is None  # buckets are per caller
    clock.t += 0.5
    assert a.check("xapp", "Ask") is None
    assert a.check("xapp", "Ask") is not None


def test_refused_calls_take_no_token():
    a = authorizer(ControllerScope(id="xapp", rate_per_s=1, burst=1))
    assert a.check("xapp", "DrainSite") is not None  # out of scope
    assert a.check("xapp", "Ask") is None


def test_no_rate_means_no_limit():
    a = authorizer(ControllerScope(id="xapp", rate_per_s=None))
    assert all(a.check("xapp", "Ask") is None for _ in range(1000))


def test_token_bucket_refills_to_the_burst_only():
    bucket = TokenBucket(rate_per_s=10, burst=2, now=0.0)
    assert bucket.take(0.0) == 0 and bucket.take(0.0) == 0
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(100.0) == 0 and bucket.take(100.0) == 0  # a long pause refills 2, not 1000
    assert bucket.take(100.0) > 0
    assert bucket.take(99.0) > 0  # a clock that steps back adds nothing


def test_token_round_trip_and_every_way_it_fails():
    token = issue_token(KEY, "xapp-ts", ttl_s=60, now=1000.0)
    assert verify_token(KEY, token, now=1030.0) == "xapp-ts"
    with pytest.raises(InvalidToken, match="expired"):
        verify_token(KEY, token, now=1060.0)
    with pytest.raises(InvalidToken, match="signature does not match"):
        verify_token(b"x" * 32, token, now=1030.0)
    with pytest.raises(InvalidToken, match="not a valid airan token"):
        verify_token(KEY, "not-a-jwt", now=1030.0)
    unsigned = jwt.encode({"sub": "xapp-ts", "iss": "airan", "exp": 2000}, key=None, algorithm="none")
    with pytest.raises(InvalidToken):
        verify_token(KEY, unsigned, now=1030.0)
    foreign = jwt.encode({"sub": "xapp-ts", "iss": "someone", "exp": 2000}, KEY, algorithm="HS256")
    with pytest.raises(InvalidToken, match="not a valid airan token"):
        verify_token(KEY, foreign, now=1030.0)
    no_expiry = jwt.encode({"sub": "xapp-ts", "iss": "airan"}, KEY, algorithm="HS256")
    with pytest.raises(InvalidToken, match="exp"):
        verify_token(KEY, no_expiry, now=1030.0)


def test_key_file_is_created_private_and_reused(tmp_path):
    path = tmp_path / "auth" / "token.key"
    key = read_or_create_key(path)
    assert len(key) >= 32 and read_or_create_key(path) == key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    (tmp_path / "short.key").write_bytes(b"short")
    with pytest.raises(ValueError, match="at least 32"):
        read_or_create_key(tmp_path / "short.key")


def _config(**auth) -> dict:
    return {"sites": [{"id": "bs-01"}, {"id": "bs-02"}], "models": [{"name": "m", "source": "tiny-random"}],
            "auth": auth}  # fmt: skip


def test_config_checks_scopes_against_sites_and_mtls_against_the_ca():
    parse_config(_config(mode="token", controllers=[{"id": "xapp", "sites": ["bs-01"]}]))
    with pytest.raises(ConfigError, match="unknown site.*bs-09"):
        parse_config(_config(controllers=[{"id": "xapp", "sites": ["bs-09"]}]))
    with pytest.raises(ConfigError, match="duplicate id.*xapp"):
        parse_config(_config(controllers=[{"id": "xapp"}, {"id": "xapp"}]))
    with pytest.raises(ConfigError, match="tls_client_ca_file"):
        parse_config(_config(mode="mtls"))
    with pytest.raises(ConfigError, match="rpcs"):
        parse_config(_config(controllers=[{"id": "xapp", "rpcs": ["Drain"]}]))
    assert Scope.from_config(ControllerScope(id="a", sites=["*"], act_for=["*"])).sites is None


def test_an_identity_fits_the_controller_id_it_fills():
    """The interceptor writes a caller's id into AskRequest.controller_id, which has a bound."""
    import re

    from airan.config import IDENTITY_PATTERN
    from airan.core.limits import ID_MAX_CHARS

    assert re.fullmatch(IDENTITY_PATTERN, "x" * ID_MAX_CHARS) and not re.fullmatch(IDENTITY_PATTERN, "x" * (ID_MAX_CHARS + 1))
    with pytest.raises(ConfigError, match="controllers"):
        parse_config(_config(controllers=[{"id": "x" * (ID_MAX_CHARS + 1)}]))
