"""How a bot's router setting and the replicas registered in etcd become one gRPC target
(mbc/runtime/targets.py), and which router records a bot accepts (discovery/routers.py)."""

from __future__ import annotations

import json

import pytest

from discovery.routers import RouterRecord
from mbc.runtime.channels import ROUTER_SERVICE_CONFIG
from mbc.runtime.config import BotConfig
from mbc.runtime.targets import address_list_target, router_target

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("setting", "target"),
    [
        ("127.0.0.1:50051", "ipv4:127.0.0.1:50051"),
        ("10.0.0.8:50051, 10.0.0.7:50051", "ipv4:10.0.0.7:50051,10.0.0.8:50051"),
        ("[::1]:50051,[::1]:50052", "ipv6:[::1]:50051,[::1]:50052"),
        ("routers.mbc:50051", "routers.mbc:50051"),
        ("dns:///routers.mbc.svc.cluster.local:50051", "dns:///routers.mbc.svc.cluster.local:50051"),
        ("ipv4:10.0.0.7:1,10.0.0.8:2", "ipv4:10.0.0.7:1,10.0.0.8:2"),
        ("", ""),
    ],
)
def test_a_router_setting_becomes_one_target(setting, target):
    assert router_target(setting) == target


def test_a_list_naming_a_host_or_mixing_families_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"'routers.mbc:50051' is not IP:port.*dns:///host:port"):
        router_target("10.0.0.7:50051,routers.mbc:50051")
    with pytest.raises(ValueError, match="mix IPv4 and IPv6"):
        address_list_target(["10.0.0.7:50051", "[::1]:50051"])
    with pytest.raises(ValueError, match="router_address: 'b:2' is not IP:port"):
        BotConfig(router_address="10.0.0.7:1,b:2")  # checked with the settings, before the bot starts


def test_the_same_replicas_in_another_order_are_the_same_target():
    """A list that did not change must not open a new channel."""
    assert address_list_target(["127.0.0.1:2", "127.0.0.1:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"


def test_router_channels_balance_over_serving_replicas_and_retry_elsewhere():
    config = json.loads(ROUTER_SERVICE_CONFIG)
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "mbc.v1.Router"}
    router = next(m for m in config["methodConfig"] if {"service": "mbc.v1.Router"} in m["name"])
    assert router["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_a_router_record_round_trips_and_bad_ones_say_why():
    record = RouterRecord("r-1", "10.0.0.7:50051", "1.2.3")
    assert RouterRecord.parse(record.key, record.to_bytes()) == record
    assert record.key == "/mbc/v1/routers/r-1"
    with pytest.raises(ValueError, match="not JSON"):
        RouterRecord.parse(record.key, b"\x00")
    with pytest.raises(ValueError, match="no address"):
        RouterRecord.parse(record.key, b'{"version": "1"}')
    with pytest.raises(ValueError, match="router_id"):
        RouterRecord.parse("/mbc/v1/routers/a/b", record.to_bytes())
