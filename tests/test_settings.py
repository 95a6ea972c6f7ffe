"""Settings: one typed model (mbc/runtime/config.py) filled from flag defaults, a YAML file, MBC_* variables
and flags (mbc/cli/settings.py); trace ids in metadata (mbc/runtime/tracing.py); metrics of an in-process server."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys

import grpc
import pytest

from mbc.cli import main as cli
from mbc.cli.flags import fill_client_defaults
from mbc.cli.settings import flag_defaults, flags_of, given_flags, resolve
from mbc.runtime import tracing
from mbc.runtime.config import BotConfig, EncoderConfig, RouterConfig, ServerConfig
from mbc.runtime.metrics import sample_value, scrape_text
from mbc.runtime.serving import GrpcServer
from mbc.v1 import router_pb2, router_pb2_grpc
from meshlib import ROOT

pytestmark = pytest.mark.integration  # starts `mbc config show` and gRPC servers


def effective(argv: list[str], env: dict[str, str] | None = None, monkeypatch=None):
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    args = cli.build_parser().parse_args(argv)
    return cli.effective_config(args.command, args)


@pytest.fixture
def config_file(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "mbc.yaml"
        path.write_text(text)
        return str(path)

    return write


def test_layers_flag_defaults_file_env_flags(config_file, monkeypatch):
    path = config_file(
        "router:\n  server: {port: 6000, metrics_port: 9400}\n  encoder: {backend: onnx}\n  etcd_endpoints: [10.0.0.1:2379]\n"
    )
    c = effective(["router"], monkeypatch=monkeypatch)
    assert (c.server.port, c.server.metrics_port, c.encoder.backend) == (50051, 0, "auto")  # the flags' defaults
    assert effective(["bot", "x.yaml"], monkeypatch=monkeypatch).encoder.backend == "torch"  # the bot keeps torch
    assert (RouterConfig().encoder.backend, BotConfig().encoder.backend) == ("auto", "torch")
    c = effective(["router", "--config", path], monkeypatch=monkeypatch)
    assert (c.server.port, c.server.metrics_port, c.encoder.backend, c.etcd_endpoints) == (6000, 9400, "onnx", ("10.0.0.1:2379",))
    # Variables beat the file; flags beat both, even when given with their default value.
    c = effective(
        ["router", "--config", path, "--port", "50051", "--encoder-backend", "torch"],
        {"MBC_ROUTER__SERVER__METRICS_PORT": "9500", "MBC_ROUTER__SERVER__PORT": "7000"},
        monkeypatch,
    )
    assert (c.server.port, c.server.metrics_port, c.encoder.backend) == (50051, 9500, "torch")
    c = effective(
        ["bot", "cards.yaml", "--etcd", "a:1,b:2"],
        {"MBC_BOT__ETCD_ENDPOINTS": "c:3", "MBC_BOT__SERVER__OTEL": "on", "MBC_BOT__MAX_HOPS": "2"},
        monkeypatch,
    )
    assert (c.etcd_endpoints, c.server.otel, c.max_hops, c.definition_path) == (("a:1", "b:2"), True, 2, ("cards.yaml",))
    c = effective(["store"], {"MBC_STORE__LIMITS__MAX_VALUE_BYTES": "1000"}, monkeypatch)
    assert (c.limits.max_value_bytes, c.server.port) == (1000, 50052)


@pytest.mark.parametrize(
    "argv, env, file, words",
    [
        (
            ["router"],
            {"MBC_ROUTER__SERVER__PROT": "1"},
            None,
            "unknown setting MBC_ROUTER__SERVER__PROT (router.server.prot) (did you mean 'port'?)",
        ),
        (
            ["router"],
            {"MBC_ROUTER__SERVER__PORT": "abc"},
            None,
            "env MBC_ROUTER__SERVER__PORT (router.server.port): expected an integer, got 'abc'",
        ),
        (
            ["router"],
            {"MBC_ROUTER__SERVER__PORT": "70000"},
            None,
            "server.port must be between 0 and 65535, got 70000 (router.server.port from env MBC_ROUTER__SERVER__PORT)",
        ),
        (["bot", "x.yaml"], {"MBC_BOT__MAX_HOPS": "-1"}, None, "max_hops must be at least 0"),
        (["router", "--port", "70000"], {}, None, "invalid flag value: server.port must be between 0 and 65535"),
        (["router"], {}, "router:\n  server: {port: '6000'}\n", "(router.server.port): expected an integer, got '6000'"),
        (["router"], {}, "routr:\n  server: {}\n", "unknown section 'routr' (did you mean 'router'?)"),
        (["router"], {}, "router:\n  encodr: {}\n", "unknown setting router.encodr in"),
        (
            ["router"],
            {},
            "router:\n  encoder: {backend: tensorflow}\n",
            "encoder.backend must be one of torch, onnx, onnx-int8, auto; got 'tensorflow'",
        ),
        (["store"], {}, "store:\n  limits: {max_value_bytes: 0}\n", "limits.max_value_bytes must be at least 1"),
        (
            ["router"],
            {"MBC_ROUTER__DECISION__OOS_SHARE": "1.5"},
            None,
            "decision.oos_share is 1.5: a share of the messages, above 0 and below 1 (router.decision.oos_share from env",
        ),
        (
            ["router"],
            {},
            "router:\n  decision: {cost_fallback: -1}\n",
            "decision.cost_fallback is -1.0: a cost is a finite number",
        ),
        (["router"], {}, "router:\n  decision: {knn_weight: .nan}\n", "decision.knn_weight must be a number, got nan"),
    ],
    ids=[
        "unknown-env",
        "env-type",
        "env-range",
        "bot-range",
        "flag-range",
        "file-type",
        "file-section",
        "file-key",
        "file-choice",
        "store-range",
        "decision-share",
        "decision-cost",
        "decision-nan",
    ],
)
def test_bad_settings_stop_the_start_with_a_clear_message(argv, env, file, words, config_file, monkeypatch):
    if file:
        argv = [*argv, "--config", config_file(file)]
    with pytest.raises(SystemExit) as exit_:
        effective(argv, env, monkeypatch)
    assert words in str(exit_.value)


def test_config_show_prints_effective_values_and_their_source(config_file):
    path = config_file("bot:\n  router_address: 10.0.0.7:50051\n")
    env = {**os.environ, "MBC_BOT__MAX_HOPS": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "mbc", "config", "show", "bot", "--config", path],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "bot:"
    assert f'  router_address: "10.0.0.7:50051"  # file {path}' in lines
    assert "  max_hops: 2  # env MBC_BOT__MAX_HOPS" in lines
    assert "    metrics_port: 0" in lines
    # The output is itself a valid config file giving the same settings.
    shown = config_file(result.stdout)
    again = resolve("bot", BotConfig(), shown, {}).config
    assert again.router_address == "10.0.0.7:50051" and again.max_hops == 2


def _other_value(flag, default):
    """A command-line value of `flag` other than its default, and the field value it gives."""
    if flag.kind is bool and flag.choices:
        word = flag.choices[1] if default else flag.choices[0]
        return [flag.name, word], not default
    if flag.kind is bool:
        return [flag.name], True
    if flag.choices:
        word = next(c for c in flag.choices if c != default)
        return [flag.name, word], word
    if flag.kind is int:
        return [flag.name, str(default + 1)], default + 1
    if flag.kind is float:
        return [flag.name, str(default + 1.5)], default + 1.5
    if flag.kind is str:
        return [flag.name, "other.yaml"], "other.yaml"
    if flag.name == "definition":  # positional, one or more
        return ["a.yaml", "bots/"], ("a.yaml", "bots/")
    return [flag.name, "a:1,b:2"], ("a:1", "b:2")


@pytest.mark.parametrize("kind", ["router", "bot", "store"])
def test_each_flag_sets_the_field_it_is_derived_from(kind):
    defaults = flag_defaults(kind)
    for flag in flags_of(kind):
        default = defaults
        for part in flag.path:
            default = getattr(default, part)
        words, value = _other_value(flag, default)
        argv = [kind, *words] if kind != "bot" or flag.name == "definition" else [kind, "cards.yaml", *words]
        given = given_flags(kind, cli.build_parser().parse_args(argv))
        assert given[flag.path] == (value, f"flag {flag.name}"), flag


def test_a_derived_flag_sets_its_field_over_file_and_environment(config_file, monkeypatch):
    path = config_file("bot:\n  lease_ttl_seconds: 20\n  encoder: {model: /m/file}\n")
    c = effective(
        ["bot", "cards.yaml", "--config", path, "--lease-ttl", "30", "--model", "/m/flag", "--router", ""],
        {"MBC_BOT__LEASE_TTL_SECONDS": "25"},
        monkeypatch,
    )
    assert (c.lease_ttl_seconds, c.encoder.model, c.router_address) == (30, "/m/flag", "")
    c = effective(
        ["router", "--idle-spinning", "off", "--calibration", "cal.jsonl", "--etcd", "http://e:1, f:2"], monkeypatch=monkeypatch
    )
    assert (c.encoder.idle_spinning, c.decision.calibration_path, c.etcd_endpoints) == (False, "cal.jsonl", ("e:1", "f:2"))


def test_an_old_variable_still_works_with_a_deprecation_line(config_file, monkeypatch, capsys):
    c = effective(["bot", "cards.yaml"], {"MBC_ROUTER": "10.0.0.9:50051", "MBC_ETCD": "e:1"}, monkeypatch)
    assert (c.router_address, c.etcd_endpoints) == ("10.0.0.9:50051", ("e:1",))
    err = capsys.readouterr().err.splitlines()
    assert "mbc: DeprecationWarning: MBC_ROUTER is deprecated: use MBC_BOT__ROUTER_ADDRESS" in err
    assert "mbc: DeprecationWarning: MBC_ETCD is deprecated: use MBC_BOT__ETCD_ENDPOINTS" in err
    # As the flag default it used to be: below the file and the new variables.
    path = config_file("router:\n  encoder: {backend: onnx}\n")
    monkeypatch.setenv("MBC_ENCODER_BACKEND", "onnx-int8")
    monkeypatch.setenv("MBC_ENCODER_THREADS", "3")
    monkeypatch.setenv("MBC_ROUTER__ENCODER__THREADS", "2")
    c = effective(["router", "--config", path], monkeypatch=monkeypatch)
    assert (c.encoder.backend, c.encoder.threads) == ("onnx", 2)
    err = capsys.readouterr().err
    assert "mbc: DeprecationWarning: MBC_ENCODER_BACKEND is deprecated: use MBC_ROUTER__ENCODER__BACKEND" in err
    # Client commands: MBC_CLIENT__<FIELD>, the old name with the same line.
    args = fill_client_defaults(cli.build_parser().parse_args(["match", "hello"]))
    assert args.router == "10.0.0.9:50051" and args.tls_ca == ""
    assert capsys.readouterr().err == "mbc: DeprecationWarning: MBC_ROUTER is deprecated: use MBC_CLIENT__ROUTER_ADDRESS\n"
    monkeypatch.setenv("MBC_CLIENT__ROUTER_ADDRESS", "r:1")
    monkeypatch.setenv("MBC_TLS_CA", "ca.pem")
    args = fill_client_defaults(cli.build_parser().parse_args(["match", "hello", "--tls-cert", "c.pem"]))
    assert (args.router, args.tls_ca, args.tls_cert) == ("r:1", "ca.pem", "c.pem")
    assert capsys.readouterr().err == "mbc: DeprecationWarning: MBC_TLS_CA is deprecated: use MBC_CLIENT__TLS__CA_FILE\n"


def test_component_help_lists_each_flag_with_its_fields_help(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["router", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    backend = next(f for f in dataclasses.fields(EncoderConfig) if f.name == "backend").metadata["help"]
    assert f"--encoder-backend {{torch,onnx,onnx-int8,auto}} {backend}" in text
    assert "--port PORT port to bind; 0 picks a free one" in text
    assert "--lease-ttl" not in text  # a bot's setting


def test_trace_id_from_metadata():
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tracing.trace_id_from_metadata([("x-mbc-trace-id", tid)]) == tid
    assert tracing.trace_id_from_metadata([("traceparent", f"00-{tid}-00f067aa0ba902b7-01")]) == tid
    # Ours wins over a traceparent; malformed or all-zero ids are ignored.
    assert tracing.trace_id_from_metadata([("traceparent", f"00-{'a' * 32}-00f067aa0ba902b7-01"), ("x-mbc-trace-id", tid)]) == tid
    assert (
        tracing.trace_id_from_metadata([("x-mbc-trace-id", "nope"), ("traceparent", f"00-{'0' * 32}-00f067aa0ba902b7-01")]) == ""
    )
    assert len(tracing.incoming_trace_id([])) == 32


class _Router(router_pb2_grpc.RouterServicer):
    async def Match(self, request, context):
        if request.text == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad")
        return router_pb2.MatchResponse(index_revision=int(tracing.current_trace_id()[:6], 16))


async def test_every_server_counts_rpcs_and_reports_its_metrics_port(tmp_path):
    port_file = tmp_path / "x.port"
    server = GrpcServer(
        ServerConfig(port_file=str(port_file)),
        lambda s: router_pb2_grpc.add_RouterServicer_to_server(_Router(), s),
        ["mbc.v1.Router"],
    )
    await server.start()
    try:
        assert int((tmp_path / "x.metrics-port").read_text()) == server.metrics_port > 0
        labels = {"grpc_service": "mbc.v1.Router", "grpc_method": "Match"}
        before = await asyncio.to_thread(scrape_text, f"127.0.0.1:{server.metrics_port}")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            r = await stub.Match(router_pb2.MatchRequest(text="hi"), metadata=[("x-mbc-trace-id", "abcdef" + "0" * 26)])
            assert r.index_revision == 0xABCDEF  # the handler saw the caller's trace id
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Match(router_pb2.MatchRequest(text="bad"))
        after = await asyncio.to_thread(scrape_text, f"127.0.0.1:{server.metrics_port}")
        for code in ("OK", "INVALID_ARGUMENT"):
            assert (
                sample_value(after, "grpc_server_handled_total", {**labels, "grpc_code": code})
                - sample_value(before, "grpc_server_handled_total", {**labels, "grpc_code": code})
                == 1
            )
        assert (
            sample_value(after, "grpc_server_handling_seconds_count", labels)
            - sample_value(before, "grpc_server_handling_seconds_count", labels)
            == 2
        )
    finally:
        await server.stop()
    assert ServerConfig(metrics_port=-1).metrics_port == -1


OTEL_SCRIPT = """
import asyncio, grpc
from mbc.runtime import tracing
from mbc.runtime.config import ServerConfig
from mbc.runtime.serving import GrpcServer
from mbc.v1 import router_pb2, router_pb2_grpc
from opentelemetry import trace

class R(router_pb2_grpc.RouterServicer):
    async def Match(self, request, context):
        span = trace.get_current_span().get_span_context()
        assert span.is_valid and format(span.trace_id, "032x") == tracing.current_trace_id()
        return router_pb2.MatchResponse()

async def main():
    s = GrpcServer(ServerConfig(otel=True, otel_exporter="none", metrics_port=-1),
                   lambda srv: router_pb2_grpc.add_RouterServicer_to_server(R(), srv), ["mbc.v1.Router"])
    await s.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") as channel:
        await router_pb2_grpc.RouterStub(channel).Match(router_pb2.MatchRequest(text="hi"), timeout=5)
    await s.stop()
    print("otel ok")

asyncio.run(main())
"""


def test_opentelemetry_by_config():
    pytest.importorskip("opentelemetry.instrumentation.grpc")
    # In a child process: the instrumentation patches grpc.aio for the rest of the process.
    result = subprocess.run([sys.executable, "-c", OTEL_SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0 and "otel ok" in result.stdout, result.stderr
