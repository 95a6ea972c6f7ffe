"""gRPC targets of replicated services: how a router setting, or the replicas listed in etcd,
becomes one target that gRPC's own resolvers understand (Python gRPC has no custom resolver API:
`ipv4:`/`ipv6:` address lists and `dns:///` are the ways), balanced by mbc/runtime/channels.py."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

__all__ = ["address_list_target", "router_target"]

_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


def _ip_port(address: str) -> tuple[int, str]:
    """(IP version, normalized address) of an IP:port ([v6]:port); ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    ip = host.removeprefix("[").removesuffix("]")
    try:
        version: int = ipaddress.ip_address(ip).version
    except ValueError:
        version = 0
    if not sep or not port.isdigit() or not version:
        raise ValueError(
            f"{address!r} is not IP:port: several router addresses are dialled as one gRPC ipv4:/ipv6: list;"
            " give a host name alone (host:port) or as dns:///host:port"
        )
    return version, f"[{ip}]:{port}" if version == 6 else f"{ip}:{port}"


def address_list_target(addresses: Sequence[str]) -> str:
    """The gRPC target of replicas at `addresses`: "" for none, a lone host:port as it is (DNS
    resolves it), else an ipv4: (or ipv6:) list of IP:port; ValueError for a host name in a list or
    a list mixing IPv4 and IPv6."""
    addresses = sorted(set(addresses))
    if not addresses:
        return ""
    if len(addresses) == 1:
        try:
            version, address = _ip_port(addresses[0])
        except ValueError:
            return addresses[0]
        return f"ipv{version}:{address}"
    parsed = [_ip_port(a) for a in addresses]
    versions = {v for v, _ in parsed}
    if len(versions) > 1:
        raise ValueError(f"router addresses {', '.join(addresses)} mix IPv4 and IPv6: gRPC dials one family per list")
    return f"ipv{versions.pop()}:" + ",".join(a for _, a in parsed)


def router_target(value: str) -> str:
    """The gRPC target of a router setting: a target with a scheme (dns:///routers:50051, ipv4:…)
    as it is, else `address_list_target` of its comma-separated addresses."""
    value = value.strip()
    if value.startswith(_SCHEMES):
        return value
    return address_list_target([a.strip() for a in value.split(",") if a.strip()])
