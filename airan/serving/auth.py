"""Who is calling: the gRPC side of identity (the decisions are airan/core/authz.py's).

- `server_credentials`: TLS for the gRPC port; with server.tls_client_ca_file the server requires a
  client certificate signed by that CA (mutual TLS). A client without one, or with one from another
  CA, fails the TLS handshake: no RPC runs, and the client sees UNAVAILABLE (gRPC never reaches a
  status the server could choose).
- `Authenticator.identify`: the caller's identity for one call. auth.mode mtls: the verified client
  certificate's subject alternative names, then its common name (the first that `auth.controllers`
  lists, else the first one); token: the subject of the `authorization: Bearer <JWT>` metadata,
  verified with the HMAC key (auth.token_key_file).
"""
from __future__ import annotations

from collections.abc import Container

import grpc

from airan.config import AuthConfig, ServerConfig
from airan.core.authz import InvalidToken, default_key_file, read_or_create_key, verify_token

AUTHORIZATION_METADATA = "authorization"


def server_credentials(server: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (and mTLS with a client CA) from the config's PEM files; None = plaintext."""
    if server.tls_cert_file is None:
        return None
    client_ca = server.tls_client_ca_file.read_bytes() if server.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(server.tls_key_file.read_bytes(), server.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def certificate_identity(auth_context: dict, known: Container[str]) -> str | None:
    """The caller named by its verified certificate: SANs (DNS names, URIs such as SPIFFE ids), then the
    CN; the first that `known` holds, else the first of them; None without a certificate."""
    names = [*auth_context.get("x509_subject_alternative_name", ()), *auth_context.get("x509_common_name", ())]
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return next((n for n in names if n in known), names[0] if names else None)


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == AUTHORIZATION_METADATA:
            scheme, _, token = (value.decode() if isinstance(value, bytes) else value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class Authenticator:
    def __init__(self, auth: AuthConfig) -> None:
        self.mode = auth.mode
        self.known = {c.id for c in auth.controllers}
        self.key = read_or_create_key(auth.token_key_file or default_key_file()) if auth.mode == "token" else b""

    def identify(self, context: grpc.aio.ServicerContext) -> tuple[str | None, str]:
        """(identity, "") or (None, why there is none)."""
        if self.mode == "mtls":
            identity = certificate_identity(context.auth_context(), self.known)
            return (identity, "") if identity else (None, "no client certificate: this server requires mutual TLS")
        token = bearer_token(context.invocation_metadata())
        if token is None:
            return None, ("no bearer token: send `authorization: Bearer <token>` metadata (issue one with "
                          "`airan auth token --controller ID`)")  # fmt: skip
        try:
            return verify_token(self.key, token), ""
        except InvalidToken as e:
            return None, f"bad bearer token: {e}"
