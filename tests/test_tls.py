"""mTLS between components: a real grpc.aio server (GrpcServer, as every component uses) and real
clients (mbc.runtime.channels), with certificates of a test CA (tests/pki.py). A server refuses plaintext,
a client certificate of another CA, an expired one, or none; a client refuses a server whose
certificate is expired or of another CA. Bad TLS settings stop a component at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mbc.cli import main as cli
from mbc.cli.settings import ConfigError, resolve
from mbc.runtime.channels import open_channel
from mbc.runtime.config import ServerConfig, StoreServiceConfig, TlsConfig
from mbc.runtime.security import Identity, TlsError, identity_of, parse_identity
from mbc.runtime.serving import GrpcServer
from pki import CertFiles, TestCA

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]  # starts `mbc store` and gRPC servers


def tls_of(files: CertFiles, ca: Path | None = None) -> TlsConfig:
    return TlsConfig(ca_file=str(ca or files.ca), cert_file=str(files.cert), key_file=str(files.key))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, TestCA]:
    directory = tmp_path_factory.mktemp("pki")
    return {"mesh": TestCA(directory / "mesh"), "other": TestCA(directory / "other", name="other")}


@pytest_asyncio.fixture
async def serve():
    """Start a GrpcServer (health only) with the given TLS settings; stopped after the test."""
    servers: list[GrpcServer] = []

    async def start(tls: TlsConfig) -> GrpcServer:
        server = GrpcServer(ServerConfig(metrics_port=-1, grace_seconds=0, tls=tls), lambda s: None, [])
        await server.start()
        await server.set_serving(True)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


async def health(address: str, tls: TlsConfig = TlsConfig(), credentials: grpc.ChannelCredentials | None = None) -> int:
    channel = grpc.aio.secure_channel(address, credentials) if credentials else open_channel(address, tls)
    async with channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status


async def refused(
    address: str, tls: TlsConfig = TlsConfig(), credentials: grpc.ChannelCredentials | None = None
) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await health(address, tls, credentials)
    return error.value.code()


async def test_client_with_a_certificate_of_the_mesh_ca_is_served(pki, serve):
    server = await serve(tls_of(pki["mesh"].issue("store")))
    assert await health(server.address, tls_of(pki["mesh"].issue("gateway/tests"))) == health_pb2.HealthCheckResponse.SERVING


async def test_server_refuses_plaintext_clients(pki, serve):
    server = await serve(tls_of(pki["mesh"].issue("store")))
    assert await refused(server.address) == grpc.StatusCode.UNAVAILABLE


async def test_server_refuses_a_client_certificate_of_an_unknown_ca(pki, serve):
    server = await serve(tls_of(pki["mesh"].issue("store")))
    stranger = pki["other"].issue("bot/retail-bank/cards")
    # The client trusts the mesh CA (so the handshake fails on the server's side, not the client's).
    assert await refused(server.address, tls_of(stranger, ca=pki["mesh"].cert_path)) == grpc.StatusCode.UNAVAILABLE


async def test_server_refuses_an_expired_client_certificate(pki, serve):
    server = await serve(tls_of(pki["mesh"].issue("store")))
    expired = pki["mesh"].issue("bot/retail-bank/cards", expired=True)
    assert await refused(server.address, tls_of(expired)) == grpc.StatusCode.UNAVAILABLE


async def test_server_refuses_a_tls_client_without_a_certificate(pki, serve):
    server = await serve(tls_of(pki["mesh"].issue("store")))
    anonymous = grpc.ssl_channel_credentials(root_certificates=pki["mesh"].cert_path.read_bytes())
    assert await refused(server.address, credentials=anonymous) == grpc.StatusCode.UNAVAILABLE


async def test_client_refuses_a_server_with_an_expired_certificate(pki, serve):
    server = await serve(tls_of(pki["mesh"].issue("store", expired=True)))
    assert await refused(server.address, tls_of(pki["mesh"].issue("gateway/tests"))) == grpc.StatusCode.UNAVAILABLE


async def test_client_refuses_a_server_of_an_unknown_ca(pki, serve):
    impostor = pki["other"].issue("store")
    server = await serve(tls_of(impostor, ca=pki["mesh"].cert_path))  # accepts mesh clients, presents a foreign certificate
    assert await refused(server.address, tls_of(pki["mesh"].issue("gateway/tests"))) == grpc.StatusCode.UNAVAILABLE


def test_a_missing_or_non_pem_file_stops_a_server_at_start(pki, tmp_path):
    good = pki["mesh"].issue("store")
    with pytest.raises(TlsError, match=r"ca_file .*missing\.crt: No such file"):
        GrpcServer(ServerConfig(metrics_port=-1, tls=tls_of(good, ca=tmp_path / "missing.crt")), lambda s: None, [])
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(TlsError, match="not a PEM file"):
        GrpcServer(ServerConfig(metrics_port=-1, tls=tls_of(good, ca=tmp_path / "junk.crt")), lambda s: None, [])


def test_mbc_store_with_a_missing_certificate_exits_with_a_message(pki, tmp_path):
    good = pki["mesh"].issue("store")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mbc",
            "store",
            "--etcd",
            "127.0.0.1:9",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--tls-ca",
            str(good.ca),
            "--tls-cert",
            str(tmp_path / "nowhere.crt"),
            "--tls-key",
            str(good.key),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MBC_CONFIG": ""},
    )
    assert run.returncode != 0
    assert f"TLS cert_file {tmp_path / 'nowhere.crt'}: No such file or directory" in run.stderr
    assert "Traceback" not in run.stderr


def test_tls_settings_come_from_flags_env_and_files_and_go_together(pki, tmp_path):
    files = pki["mesh"].issue("store")
    argv = ["store", "--tls-ca", str(files.ca), "--tls-cert", str(files.cert), "--tls-key", str(files.key)]
    args = cli.build_parser().parse_args(argv)
    args.argv = argv
    assert cli.effective_config("store", args).server.tls == tls_of(files)

    env = {
        "MBC_STORE__SERVER__TLS__CA_FILE": str(files.ca),
        "MBC_STORE__SERVER__TLS__CERT_FILE": str(files.cert),
        "MBC_STORE__SERVER__TLS__KEY_FILE": str(files.key),
    }
    assert resolve("store", StoreServiceConfig(), environ=env).config.server.tls == tls_of(files)

    config_file = tmp_path / "mbc.yaml"
    config_file.write_text(
        f"store:\n  server:\n    tls: {{ca_file: {files.ca}, cert_file: {files.cert}, key_file: {files.key}}}\n"
    )
    assert resolve("store", StoreServiceConfig(), str(config_file), environ={}).config.server.tls == tls_of(files)

    with pytest.raises(ConfigError, match=r"set all three or none .*MBC_STORE__SERVER__TLS__CA_FILE"):
        resolve("store", StoreServiceConfig(), environ={"MBC_STORE__SERVER__TLS__CA_FILE": str(files.ca)})


@pytest.mark.parametrize(
    "text, identity",
    [
        ("bot/retail-bank/cards", Identity("bot", "retail-bank", "cards")),
        ("spiffe://mbc/bot/retail-bank/cards", Identity("bot", "retail-bank", "cards")),
        ("gateway/web-1", Identity("gateway", name="web-1")),
        ("router", Identity("router")),
        ("store", Identity("store")),
        ("bot/retail-bank", None),
        ("bot/retail-bank/cards/extra", None),
        ("bot//cards", None),
        ("bot/retail bank/cards", None),
        ("gateway", None),
        ("admin", None),
        ("spiffe://other/bot/retail-bank/cards", None),
        ("", None),
    ],
)
def test_parse_identity(text, identity):
    assert parse_identity(text) == identity


def test_identity_of_a_peer_prefers_its_mesh_uri_san_and_refuses_ambiguity():
    san = "x509_subject_alternative_name"
    assert identity_of({san: [b"spiffe://mbc/router", b"127.0.0.1"], "x509_common_name": [b"store"]}) == Identity("router")
    assert identity_of({san: [b"127.0.0.1"], "x509_common_name": [b"gateway/web"]}) == Identity("gateway", name="web")
    assert identity_of({san: [b"spiffe://mbc/router", b"spiffe://mbc/store"]}) is None
    assert identity_of({"x509_common_name": [b"Jane Doe"]}) is None
    assert identity_of({}) is None
