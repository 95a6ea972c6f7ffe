"""Command-line flags of the client commands (`mbc match`, `chat`, `participants`, `group`,
`etcd-auth`, `calibrate`, `overlap`): etcd endpoints and access, mTLS files, addresses, and the
routers' settings file of the quality commands.

Their names and help come from the config fields (mbc/runtime/config.py), as do the flags of
`mbc router|bot|store` (mbc/cli/settings.py). A client flag that is not given takes its value from
MBC_CLIENT__<FIELD> (or a deprecated single name), read after parsing (`fill_client_defaults`) so
that only the command being run reads, and warns about, its variables.
"""

from __future__ import annotations

import argparse
import os
import sys

from mbc.cli.settings import (
    CONFIG_ENV,
    ConfigError,
    add_field_arguments,
    client_default,
    env_name,
    field_flags,
    flag_defaults,
    resolve,
)
from mbc.runtime.config import LOCAL_ROUTER, DecisionConfig, EtcdAccess, RouterConfig, TlsConfig
from mbc.runtime.security import read_files

DEFAULT_ROUTER = LOCAL_ROUTER
DECISION_ENV_PREFIX = env_name("router", ("decision", ""))
DEFAULT_ETCD = ",".join(RouterConfig.etcd_endpoints)
_CLIENT_DEFAULT = "_client_default_"


def client_arg(parser: argparse.ArgumentParser, name: str, path: tuple[str, ...], default: str, **options) -> None:
    """A flag whose default is MBC_CLIENT__<PATH>, else `default` (filled by `fill_client_defaults`)."""
    action = parser.add_argument(name, default=None, **options)
    parser.set_defaults(**{_CLIENT_DEFAULT + action.dest: (path, default)})


def fill_client_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Give the client flags that were not on the command line their default from the environment."""
    for key in [k for k in vars(args) if k.startswith(_CLIENT_DEFAULT)]:
        dest = key[len(_CLIENT_DEFAULT) :]
        path, default = getattr(args, key)
        delattr(args, key)
        if getattr(args, dest) is None:
            setattr(args, dest, client_default(path, default))
    return args


def router_settings_arg(parser: argparse.ArgumentParser) -> None:
    """`--config FILE`: the routers' settings, of which a quality command uses `router.decision`."""
    parser.add_argument(
        "--config",
        default=os.environ.get(CONFIG_ENV, ""),
        metavar="FILE",
        help="the routers' YAML settings file: its router.decision section (costs, oos_share...) is used, "
        "as are MBC_ROUTER__DECISION__* variables, so that the thresholds are the ones the routers fit",
    )


def router_decision(args: argparse.Namespace, command: str) -> DecisionConfig:
    """The routers' decision settings, layered as `mbc router` layers them (--config file, then
    MBC_ROUTER__DECISION__* variables); exit with a message when they cannot work. The router's
    other variables are not read: a client command reads, and warns about, its own."""
    environ = {name: value for name, value in os.environ.items() if name.startswith(DECISION_ENV_PREFIX)}
    try:
        return resolve("router", flag_defaults("router"), args.config, environ).config.decision
    except ConfigError as e:
        sys.exit(f"mbc {command}: {e}")


def tls_args(parser: argparse.ArgumentParser) -> None:
    """A client's mTLS files (TlsConfig), all three or none."""
    for flag in field_flags(TlsConfig):
        client_arg(parser, flag.name, ("tls", *flag.path), "", help=flag.help, metavar=flag.metavar)


def tls_config(args: argparse.Namespace) -> TlsConfig:
    """The client command's TlsConfig, its files checked (exit with a message otherwise)."""
    try:
        tls = TlsConfig(**{flag.path[-1]: getattr(args, flag.dest) for flag in field_flags(TlsConfig)})
        if tls.enabled:
            read_files(tls)
        return tls
    except ValueError as e:  # TlsError included
        sys.exit(f"mbc {args.command}: {e}")


def etcd_args(
    parser: argparse.ArgumentParser, user: bool = True, help: str = "etcd endpoints, comma-separated host:port"
) -> None:
    """--etcd (MBC_CLIENT__ETCD_ENDPOINTS), then TLS files and the etcd user (fields of EtcdAccess)."""
    client_arg(parser, "--etcd", ("etcd_endpoints",), DEFAULT_ETCD, help=help)
    only = None if user else ("ca_file", "cert_file", "key_file")
    add_field_arguments(parser, field_flags(EtcdAccess, only), EtcdAccess())


def etcd_access(args: argparse.Namespace) -> EtcdAccess:
    return EtcdAccess(**{flag.path[-1]: getattr(args, flag.dest) for flag in field_flags(EtcdAccess) if hasattr(args, flag.dest)})
