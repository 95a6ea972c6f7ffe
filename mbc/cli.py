"""The `mbc` command: run a router or a bot, play the demo, ask the router."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from mbc.config import BotConfig, EncoderConfig, RouterConfig, ServerConfig
from mbc.logs import configure

DEFAULT_ROUTER = "127.0.0.1:50051"


def _endpoints(value: str) -> tuple[str, ...]:
    return tuple(e.strip().removeprefix("http://") for e in value.split(",") if e.strip())


def _server_args(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=default_port, help="port to bind; 0 picks a free one")
    parser.add_argument("--port-file", default="", help="write the bound port to this file once serving")
    parser.add_argument("--etcd", default=os.environ.get("MBC_ETCD", "127.0.0.1:2379"), help="etcd endpoints, comma-separated host:port")
    parser.add_argument("--model", default=os.environ.get("MBC_MODEL", ""), help="sentence-transformers model directory (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--log-level", default=os.environ.get("MBC_LOG_LEVEL", "INFO"))


def _server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(host=args.host, port=args.port, port_file=args.port_file)


def cmd_router(args: argparse.Namespace) -> None:
    from router.server import serve

    configure(args.log_level, service="router")
    config = RouterConfig(
        etcd_endpoints=_endpoints(args.etcd),
        server=_server_config(args),
        encoder=EncoderConfig(model=args.model),
    )
    asyncio.run(serve(config))


def cmd_bot(args: argparse.Namespace) -> None:
    from bot_server.definition import DefinitionError
    from bot_server.server import serve

    configure(args.log_level, service="bot")
    config = BotConfig(
        definition_path=args.definition,
        etcd_endpoints=_endpoints(args.etcd),
        router_address=args.router,
        server=_server_config(args),
        encoder=EncoderConfig(model=args.model),
        instance_id=args.instance_id,
        lease_ttl_seconds=args.lease_ttl,
    )
    try:
        asyncio.run(serve(config))
    except DefinitionError as e:
        sys.exit(f"mbc bot: {e}")


def cmd_store(args: argparse.Namespace) -> None:
    from context_store.server import serve

    configure(args.log_level, service="store")
    asyncio.run(serve(_endpoints(args.etcd), _server_config(args)))


def cmd_demo(args: argparse.Namespace) -> None:
    from mbc.demo import run_demo

    sys.exit(asyncio.run(run_demo(etcd=_endpoints(args.etcd) if args.etcd else None)))


def cmd_match(args: argparse.Namespace) -> None:
    from mbc.inspect import print_match

    sys.exit(asyncio.run(print_match(args.router, args.text, args.bot, args.group, args.candidates)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbc", description="Multi-bot collaboration mesh")
    sub = parser.add_subparsers(dest="command", required=True)

    router = sub.add_parser("router", help="run the router (watches etcd, answers Match)")
    _server_args(router, default_port=50051)
    router.set_defaults(func=cmd_router)

    bot = sub.add_parser("bot", help="run one bot from a definition file")
    bot.add_argument("definition", help="bot definition YAML")
    _server_args(bot, default_port=0)
    bot.add_argument("--router", default=os.environ.get("MBC_ROUTER", DEFAULT_ROUTER), help="router host:port; empty disables transfers")
    bot.add_argument("--instance-id", default="", help="instance id to register (default: generated)")
    bot.add_argument("--lease-ttl", type=int, default=10, help="etcd lease TTL in seconds")
    bot.set_defaults(func=cmd_bot)

    store = sub.add_parser("store", help="run the Context Session Store (cross-bot data, conversation owners)")
    _server_args(store, default_port=50052)
    store.set_defaults(func=cmd_store)

    demo = sub.add_parser("demo", help="start a local mesh and play a conversation through both workflows")
    demo.add_argument("--etcd", default="", help="use these etcd endpoints instead of starting a local etcd")
    demo.set_defaults(func=cmd_demo)

    match = sub.add_parser("match", help="which bot and intent would take a message")
    match.add_argument("text")
    match.add_argument("--router", default=os.environ.get("MBC_ROUTER", DEFAULT_ROUTER))
    match.add_argument("--bot", default="", help="ask as this bot (it is left out of the candidates)")
    match.add_argument("--group", default="", help="only this group (default: the bot's group, or all)")
    match.add_argument("-n", "--candidates", type=int, default=5)
    match.set_defaults(func=cmd_match)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)
