"""Command-line flags shared by several `mbc` commands: etcd endpoints and access, mTLS files, and
the serving flags of the router, the bot and the store."""

from __future__ import annotations

import argparse
import os
import sys

from mbc.runtime.config import EtcdAccess, ServerConfig, TlsConfig
from mbc.runtime.security import read_files

def tls_args(parser: argparse.ArgumentParser, client: bool = True) -> None:
    """mTLS files (TlsConfig), all three or none. Client commands default to MBC_TLS_CA, MBC_TLS_CERT
    and MBC_TLS_KEY; servers take MBC_<COMPONENT>__SERVER__TLS__<FIELD> like their other settings."""
    env = os.environ.get if client else (lambda name, default: default)
    parser.add_argument("--tls-ca", default=env("MBC_TLS_CA", ""), metavar="FILE",
                        help="PEM CA of the mesh: turns on mutual TLS (with --tls-cert and --tls-key)")
    parser.add_argument("--tls-cert", default=env("MBC_TLS_CERT", ""), metavar="FILE",
                        help="PEM certificate naming this component (spiffe://mbc/bot/<group>/<bot_id>, spiffe://mbc/gateway/<name>, ...)")
    parser.add_argument("--tls-key", default=env("MBC_TLS_KEY", ""), metavar="FILE", help="PEM private key of --tls-cert")


def tls_config(args: argparse.Namespace) -> TlsConfig:
    """The client command's TlsConfig, its files checked (exit with a message otherwise)."""
    try:
        tls = TlsConfig(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key)
        if tls.enabled:
            read_files(tls)
        return tls
    except ValueError as e:  # TlsError included
        sys.exit(f"mbc {args.command}: {e}")


def etcd_access_args(parser: argparse.ArgumentParser, user: bool = True) -> None:
    """TLS files and the etcd user (fields of EtcdAccess)."""
    parser.add_argument("--etcd-ca", default=EtcdAccess.ca_file, metavar="FILE",
                        help="CA of etcd's server certificate: talk TLS to etcd (as do https:// endpoints)")
    parser.add_argument("--etcd-cert", default=EtcdAccess.cert_file, metavar="FILE", help="client certificate for etcd (with --etcd-key)")
    parser.add_argument("--etcd-key", default=EtcdAccess.key_file, metavar="FILE", help="key of --etcd-cert")
    if user:
        parser.add_argument("--etcd-user", default=EtcdAccess.username, help="etcd user (see `mbc etcd-auth setup`)")
        parser.add_argument("--etcd-password-file", default=EtcdAccess.password_file, metavar="FILE",
                            help="file holding the etcd user's password")


def etcd_access(args: argparse.Namespace) -> EtcdAccess:
    return EtcdAccess(ca_file=args.etcd_ca, cert_file=args.etcd_cert, key_file=args.etcd_key,
                      username=getattr(args, "etcd_user", ""), password_file=getattr(args, "etcd_password_file", ""))


def server_args(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=default_port, help="port to bind; 0 picks a free one")
    parser.add_argument("--port-file", default="", help="write the bound port to this file once serving")
    parser.add_argument("--etcd", default=os.environ.get("MBC_ETCD", "127.0.0.1:2379"), help="etcd endpoints, comma-separated host:port")
    etcd_access_args(parser)
    parser.add_argument("--model", default=os.environ.get("MBC_MODEL", ""), help="sentence-transformers model directory (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--log-level", default=os.environ.get("MBC_LOG_LEVEL", "INFO"))
    parser.add_argument("--config", default=os.environ.get("MBC_CONFIG", ""), metavar="FILE",
                        help="YAML settings file (sections router/bot/store); MBC_<COMPONENT>__<FIELD> variables and flags override it")
    parser.add_argument("--metrics-port", type=int, default=ServerConfig.metrics_port,
                        help="Prometheus /metrics port on --host; 0 picks a free one (written to <port file stem>.metrics-port), -1 turns it off")
    parser.add_argument("--otel", action="store_true", default=ServerConfig.otel,
                        help="OpenTelemetry gRPC instrumentation (needs the otel extra)")
    parser.add_argument("--otel-exporter", default=ServerConfig.otel_exporter, choices=("otlp", "console", "none"),
                        help="where OpenTelemetry spans go (otlp: OTEL_EXPORTER_OTLP_ENDPOINT)")
    tls_args(parser, client=False)


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(host=args.host, port=args.port, port_file=args.port_file, metrics_port=args.metrics_port,
                        otel=args.otel, otel_exporter=args.otel_exporter,
                        tls=TlsConfig(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key))
