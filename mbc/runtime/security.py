"""Mutual TLS between mesh components, and who may call what.

Credentials: `server_credentials` and `channel_credentials` build gRPC credentials from the PEM
files of a `TlsConfig`, read once; a file that is missing or unreadable is a `TlsError` at start.

Identity: a component is named by its certificate, as the URI SAN `spiffe://mbc/<identity>` or,
without one, the subject common name `<identity>`:

    bot/<group>/<bot_id>    a bot (every instance of it shares the identity)
    gateway/<name>          a channel gateway, `mbc chat`, an operator's tool
    router, store           the router, the Context Session Store

`Authorizer` reads the verified peer certificate of a call and refuses it with UNAUTHENTICATED
(no certificate, or no mesh identity in it) or PERMISSION_DENIED (an identity that may not do
this). Without TLS (development) it allows everything: there is nothing verified to check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from mbc.runtime.config import TlsConfig
from mbc.runtime.names import validate_name
from mbc.runtime.status import abort

SPIFFE_PREFIX = "spiffe://mbc/"


class TlsError(ValueError):
    """A TLS file named in the settings cannot be used."""


def _read(setting: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TlsError(f"TLS {setting} {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"TLS {setting} {path}: not a PEM file")
    return data


def read_files(tls: TlsConfig) -> tuple[bytes, bytes, bytes]:
    """(CA bundle, certificate chain, private key); TlsError names a file that cannot be used."""
    return _read("ca_file", tls.ca_file), _read("cert_file", tls.cert_file), _read("key_file", tls.key_file)


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Serve TLS with this certificate and require a client certificate signed by the CA."""
    ca, cert, key = read_files(tls)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """Verify the server against the CA and present this certificate."""
    ca, cert, key = read_files(tls)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


@dataclass(frozen=True)
class Identity:
    """Who is calling, from a verified certificate."""

    kind: str
    """"bot", "gateway", "router" or "store"."""
    group: str = ""
    """A bot's group."""
    name: str = ""
    """A bot's id, or a gateway's name."""

    def __str__(self) -> str:
        return "/".join(p for p in (self.kind, self.group, self.name) if p)


def _is_name(text: str) -> bool:
    try:
        validate_name("name", text)
        return True
    except ValueError:
        return False


def parse_identity(text: str) -> Identity | None:
    """The identity named by `text` (`bot/<group>/<bot_id>`, `gateway/<name>`, `router`, `store`),
    with or without the spiffe://mbc/ prefix; None when it names none."""
    parts = text.removeprefix(SPIFFE_PREFIX).split("/")
    if parts[0] == "bot" and len(parts) == 3 and all(_is_name(p) for p in parts[1:]):
        return Identity("bot", parts[1], parts[2])
    if parts[0] == "gateway" and len(parts) == 2 and _is_name(parts[1]):
        return Identity("gateway", name=parts[1])
    if parts[0] in ("router", "store") and len(parts) == 1:
        return Identity(parts[0])
    return None


def identity_of(auth_context: dict[str, list[bytes]]) -> Identity | None:
    """The mesh identity of a verified peer (`ServicerContext.auth_context()`): its spiffe://mbc/
    URI SAN, else its common name; None when there is none, or when two SANs disagree."""
    uris = {v.decode(errors="replace") for v in auth_context.get("x509_subject_alternative_name", ())}
    mesh = {u for u in uris if u.startswith(SPIFFE_PREFIX)}
    if len(mesh) > 1:
        return None
    if mesh:
        return parse_identity(mesh.pop())
    names = auth_context.get("x509_common_name", ())
    return parse_identity(names[0].decode(errors="replace")) if len(names) == 1 else None


def refusal(identity: Identity, group: str, bot_id: str = "", action: str = "do this") -> str:
    """Why `identity` may not `action` when only bots of `group` (only bot `bot_id` of it, when
    given) may; empty when it may."""
    if identity.kind != "bot" or identity.group != group:
        return f"{identity} may not {action}: only bots of group {group!r} may"
    if bot_id and identity.name != bot_id:
        return f"{identity} may not {action} as bot {bot_id!r}"
    return ""


class Authorizer:
    """The checks servicers make on the caller; `enabled` follows the server's TLS setting."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    async def caller(self, context: grpc.aio.ServicerContext) -> Identity | None:
        """The caller's identity; None without TLS. Aborts with UNAUTHENTICATED when TLS is on and
        the caller has no mesh identity."""
        if not self.enabled:
            return None
        identity = identity_of(context.auth_context())
        if identity is None:
            await abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "the client certificate names no mesh identity (URI SAN spiffe://mbc/bot/<group>/<bot_id>, "
                "spiffe://mbc/gateway/<name>, ...)",
            )
        return identity

    async def bot_of_group(
        self, context: grpc.aio.ServicerContext, group: str, bot_id: str = "", action: str = "do this"
    ) -> Identity | None:
        """The caller, which must be a bot of `group` (and be `bot_id` when given), else PERMISSION_DENIED."""
        identity = await self.caller(context)
        reason = refusal(identity, group, bot_id, action) if identity is not None else ""
        if reason:
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, reason)
        return identity
