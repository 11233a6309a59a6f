"""Who may call what: per-controller scopes and rate limits, over plain data (no gRPC).

The gRPC shell (airan/serving/api/interceptors.py, `AuthInterceptor`) finds the caller's identity
(its client certificate or its token, airan/serving/auth.py), reads the sites a request names, and
asks `Authorizer.check`; a `Refusal` becomes the call's status:

- UNAUTHENTICATED: no identity (no or bad token; certificates are refused by TLS itself);
- PERMISSION_DENIED: an identity no scope lists, an RPC or a site outside its scope, or a
  controller_id it may not speak for; the message names what it may do;
- RESOURCE_EXHAUSTED: over its rate (token bucket); `retry_after_s` says when a call would pass.

Bearer tokens are JWTs signed with HMAC-SHA256 (PyJWT): `issue_token` / `verify_token`.
"""
from __future__ import annotations

import math
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import jwt

from airan.config import AuthConfig, ControllerScope, cache_dir
from airan.errors import ErrorKind

# RPC groups a scope may name (config: auth.controllers[].rpcs)
RPC_GROUPS: dict[str, frozenset[str]] = {
    "ask": frozenset({"Ask", "AskStream"}),
    "view": frozenset({"GetTopology", "ListReplicas"}),
    "operate": frozenset({"DrainSite", "ReportRanLoad"}),
}
SCOPED_RPCS = frozenset().union(*RPC_GROUPS.values())
ANY = "*"


def resolve_rpcs(names: Iterable[str]) -> frozenset[str]:
    """Group names (ask, view, operate) and single RPC names -> RPC names."""
    out: set[str] = set()
    for name in names:
        out |= RPC_GROUPS.get(name, {name})
    return frozenset(out)


@dataclass(frozen=True)
class Scope:
    controller_id: str
    rpcs: frozenset[str]
    sites: frozenset[str] | None  # None: every site
    act_for: frozenset[str] | None  # other controller ids it may name; None: any
    rate_per_s: float | None  # None: no limit
    burst: int

    @classmethod
    def from_config(cls, c: ControllerScope) -> Scope:
        return cls(
            c.id, resolve_rpcs(c.rpcs), None if ANY in c.sites else frozenset(c.sites),
            None if ANY in c.act_for else frozenset(c.act_for), c.rate_per_s, c.burst,
        )  # fmt: skip

    def describe(self) -> str:
        sites = "every site" if self.sites is None else "sites " + ", ".join(sorted(self.sites))
        return f"{', '.join(sorted(self.rpcs))} on {sites}"


@dataclass(frozen=True)
class Refusal:
    kind: ErrorKind
    message: str
    reason: str  # metrics label: unauthenticated, permission_denied, rate_limited
    retry_after_s: float = 0.0


class TokenBucket:
    """`rate_per_s` tokens a second up to `burst`; a call takes one. Times are the caller's clock."""

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> float:
        """Takes a token and returns 0, or returns the seconds until one is there (taking none)."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.updated) * self.rate_per_s)
        self.updated = max(self.updated, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


class Authorizer:
    """Scopes by identity and one token bucket per identity."""

    def __init__(self, scopes: Iterable[Scope], clock: Callable[[], float] = time.monotonic) -> None:
        self.scopes = {s.controller_id: s for s in scopes}
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    @classmethod
    def from_config(cls, auth: AuthConfig, clock: Callable[[], float] = time.monotonic) -> Authorizer:
        return cls((Scope.from_config(c) for c in auth.controllers), clock)

    def allowed_sites(self, identity: str) -> frozenset[str] | None:
        """The sites a listed identity's scope confines it to (None: every site): where its queries
        may be routed and which sites its views show."""
        return self.scopes[identity].sites

    def check(self, identity: str | None, rpc: str, sites: Iterable[str] = (), controller_id: str = "") -> Refusal | None:
        """None when `identity` may call `rpc` naming `sites` (and speaking for `controller_id`, "" = itself)
        now; else why not. A call that passes takes a token from the identity's bucket."""
        if not identity:
            return Refusal(ErrorKind.UNAUTHENTICATED, "no caller identity: send a client certificate (mTLS) or "
                           "`authorization: Bearer <token>` (airan auth token --controller ID)", "unauthenticated")  # fmt: skip
        scope = self.scopes.get(identity)
        if scope is None:
            return Refusal(ErrorKind.PERMISSION_DENIED, f"caller '{identity}' has no scope: list it under "
                           "auth.controllers in the server's config", "permission_denied")  # fmt: skip
        if rpc in SCOPED_RPCS and rpc not in scope.rpcs:
            return Refusal(ErrorKind.PERMISSION_DENIED, f"caller '{identity}' may not call {rpc}: its scope allows "
                           f"{scope.describe()}", "permission_denied")  # fmt: skip
        if scope.sites is not None:
            outside = sorted({s for s in sites if s not in scope.sites})
            if outside:
                return Refusal(ErrorKind.PERMISSION_DENIED, f"caller '{identity}' may not name site(s) "
                               f"{', '.join(outside)}: its scope allows {scope.describe()}", "permission_denied")  # fmt: skip
        if controller_id and controller_id != identity and scope.act_for is not None \
                and controller_id not in scope.act_for:  # fmt: skip
            allowed = ", ".join([identity, *sorted(scope.act_for)])
            return Refusal(ErrorKind.PERMISSION_DENIED, f"caller '{identity}' may not ask as controller_id "
                           f"'{controller_id}' (it may name: {allowed}); leave controller_id empty to ask as "
                           "itself", "permission_denied")  # fmt: skip
        if scope.rate_per_s is not None:
            now = self.clock()
            bucket = self._buckets.get(identity)
            if bucket is None:
                bucket = self._buckets[identity] = TokenBucket(scope.rate_per_s, scope.burst, now)
            wait_s = bucket.take(now)
            if wait_s > 0:
                return Refusal(ErrorKind.RESOURCE_EXHAUSTED, f"caller '{identity}' is over its rate "
                               f"({scope.rate_per_s:g}/s, burst {scope.burst}): retry in {math.ceil(wait_s * 1000)} ms",
                               "rate_limited", retry_after_s=wait_s)  # fmt: skip
        return None


# -- bearer tokens ------------------------------------------------------------------
TOKEN_ALGORITHM = "HS256"
TOKEN_ISSUER = "airan"
LOCAL_OPERATOR = "local-operator"  # the subject this user's own airan commands sign their tokens with
MIN_KEY_BYTES = 32


class InvalidToken(ValueError):
    """A token that names no one: bad signature, expired, malformed, wrong issuer."""


def issue_token(key: bytes, subject: str, ttl_s: float, now: float | None = None) -> str:
    now = time.time() if now is None else now
    claims = {"sub": subject, "iss": TOKEN_ISSUER, "iat": int(now), "exp": int(now + ttl_s)}
    return jwt.encode(claims, key, algorithm=TOKEN_ALGORITHM)


def verify_token(key: bytes, token: str, now: float | None = None) -> str:
    """The token's subject; `InvalidToken` saying why when it names no one."""
    try:
        claims = jwt.decode(token, key, algorithms=[TOKEN_ALGORITHM], issuer=TOKEN_ISSUER,
                            options={"require": ["sub", "exp", "iss"], "verify_exp": False, "verify_iat": False})  # fmt: skip
    except jwt.InvalidSignatureError:
        raise InvalidToken("the token's signature does not match this server's key") from None
    except jwt.PyJWTError as e:
        raise InvalidToken(f"not a valid airan token ({e})") from None
    subject, expires = claims["sub"], claims["exp"]
    if not isinstance(expires, (int, float)) or expires <= (time.time() if now is None else now):
        raise InvalidToken("the token has expired: issue a new one (airan auth token --controller ID)")
    if not isinstance(subject, str) or not subject:
        raise InvalidToken("the token names no subject")
    return subject


def default_key_file() -> Path:
    """Where a local server and this user's clients keep the token key (auth.token_key_file unset)."""
    return cache_dir() / "auth" / "token.key"


def read_or_create_key(path: Path) -> bytes:
    """The HMAC key at `path`; created (random, mode 0600) when missing, so a local server and this
    user's clients share it without setup. Anyone who can read it can sign any token."""
    try:
        key = path.read_bytes().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return read_or_create_key(path)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(32).encode())
        key = path.read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{path}: the token key has {len(key)} bytes; use at least {MIN_KEY_BYTES} random bytes")
    return key
