"""The `mbc` command: run a router or a bot, play the demo, ask the router."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import sys

# Before numpy loads OpenBLAS: its idle threads sleep at once instead of spinning ~0.1 s after each
# call (the router's search is a BLAS product), which took the cores the encoder needed under load:
# 284 Matches/s at 32 callers against 347-398 (measured, 2 cores).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "1")

from mbc.runtime.config import DecisionConfig, BotConfig, EncoderConfig, RouterConfig, StoreServiceConfig
from mbc.runtime.logs import configure
from mbc.cli.flags import etcd_access, etcd_access_args, server_args, server_config, tls_args, tls_config
from mbc.runtime.config import split_endpoints

DEFAULT_ROUTER = "127.0.0.1:50051"


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    raise KeyError(name)


def _flag_defaults(kind: str) -> tuple[dict, dict]:
    """The defaults of the arguments of `mbc KIND` (positionals: ""), and another valid value of
    those with choices."""
    actions = [a for a in _subcommand(build_parser(), kind)._actions
               if a.dest != "help" and a.default is not argparse.SUPPRESS and not isinstance(a, argparse._SubParsersAction)]
    probes = {a.dest: next(c for c in a.choices if c != a.default) for a in actions if a.choices and len(a.choices) > 1}
    return {a.dest: "" if a.default is None and not a.option_strings else a.default for a in actions}, probes


def _given_flags(argv: list[str]) -> set[str]:
    """The dests of the flags present on the command line (whatever their value)."""
    parser = build_parser()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
            elif action.option_strings:
                action.default = argparse.SUPPRESS
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            return set(vars(parser.parse_args(argv)))
        except SystemExit:
            return set()


def effective_config(kind: str, args: argparse.Namespace, build):
    """`build(args)` layered per mbc/cli/settings.py: flag defaults < --config file < MBC_* env < given flags."""
    from mbc.runtime.security import TlsError, read_files
    from mbc.cli.settings import ConfigError, flag_overrides, resolve

    defaults, probes = _flag_defaults(kind)
    try:
        base, overrides = flag_overrides(build, args, defaults, _given_flags(getattr(args, "argv", [])), probes)
        config = resolve(kind, base, args.config, os.environ, overrides).config
        if config.server.otel:
            try:
                import opentelemetry.instrumentation.grpc  # noqa: F401
                import opentelemetry.sdk  # noqa: F401
            except ImportError:
                sys.exit(f"mbc {kind}: --otel needs OpenTelemetry: pip install 'mbc[otel]'")
        if config.server.tls.enabled:
            read_files(config.server.tls)
        return config
    except (ConfigError, TlsError) as e:
        sys.exit(f"mbc {kind}: {e}")
    except ValueError as e:  # a flag's value is out of range
        sys.exit(f"mbc {kind}: invalid flag value: {e}")


def _router_encoder_args(parser: argparse.ArgumentParser) -> None:
    """Encoder speed settings of the router (see EncoderConfig)."""
    defaults = EncoderConfig()
    env = os.environ.get
    parser.add_argument("--encoder-backend", default=env("MBC_ENCODER_BACKEND", defaults.backend),
                        choices=("torch", "onnx", "onnx-int8"), help="inference engine (onnx needs the onnx extra)")
    parser.add_argument("--encoder-threads", type=int, default=int(env("MBC_ENCODER_THREADS", defaults.threads)),
                        help="intra-op threads of the engine; 0: its default")
    parser.add_argument("--encoder-workers", type=int, default=defaults.workers,
                        help="threads encoding and scoring micro-batches side by side")
    parser.add_argument("--onnx-dir", default=env("MBC_ONNX_DIR", defaults.onnx_dir), help="cache of exported ONNX models")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch,
                        help="largest micro-batch of concurrent Match utterances; 1 disables batching")
    parser.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms,
                        help="bounded wait for a micro-batch to fill, under concurrency only")
    parser.add_argument("--query-cache", type=int, default=defaults.query_cache_size,
                        help="utterance embeddings kept for repeated utterances; 0 disables")
    parser.add_argument("--idle-spinning", choices=("on", "off"), default="on" if defaults.idle_spinning else "off",
                        help="onnx: a micro-batch alone on an idle router runs on spinning engine threads")


def _router_encoder_config(args: argparse.Namespace) -> EncoderConfig:
    return EncoderConfig(
        model=args.model,
        backend=args.encoder_backend,
        threads=args.encoder_threads,
        workers=args.encoder_workers,
        onnx_dir=args.onnx_dir,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        query_cache_size=args.query_cache,
        idle_spinning=args.idle_spinning == "on",
    )


def run_component(kind: str, main) -> None:
    """Run a server; etcd settings or credentials that cannot work, or an etcd it cannot reach at start,
    stop it with a message rather than a traceback."""
    from discovery.errors import EtcdError, EtcdSettingsError

    try:
        asyncio.run(main)
    except (EtcdError, EtcdSettingsError) as e:
        sys.exit(f"mbc {kind}: etcd: {e}")
    _exit_now()


def _exit_now() -> None:
    """Exit once a server has stopped cleanly (in-flight calls done, deregistered, logs written):
    run the atexit handlers (span exporters flush there), then skip the interpreter's teardown,
    where torch's and onnxruntime's thread pools took 4-9 s on two busy cores: past the grace
    period that SIGTERM promises."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def router_config(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        etcd_endpoints=split_endpoints(args.etcd),
        etcd=etcd_access(args),
        server=server_config(args),
        encoder=_router_encoder_config(args),
        decision=DecisionConfig(calibration_path=args.calibration),
        embedding_cache_dir=args.embedding_cache,
    )


def cmd_router(args: argparse.Namespace) -> None:
    from router.server import serve

    config = effective_config("router", args, router_config)
    configure(args.log_level, service="router")
    run_component("router", serve(config))


def load_handlers(spec: str, bot) -> None:
    """Import a handlers module (dotted name or .py path) and let its `setup(bot)` attach code to intents."""
    import importlib
    import importlib.util

    if spec.endswith(".py"):
        loaded = importlib.util.spec_from_file_location(f"mbc_handlers_{abs(hash(spec))}", spec)
        if loaded is None:
            sys.exit(f"mbc bot: cannot load handlers from {spec}")
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        module = importlib.import_module(spec)
    setup = getattr(module, "setup", None)
    if not callable(setup):
        sys.exit(f"mbc bot: {spec} has no setup(bot) function")
    setup(bot)


def bot_config(args: argparse.Namespace) -> BotConfig:
    return BotConfig(
        definition_path=args.definition,
        etcd_endpoints=split_endpoints(args.etcd),
        etcd=etcd_access(args),
        router_address=args.router,
        store_address=args.store,
        server=server_config(args),
        encoder=EncoderConfig(model=args.model),
        instance_id=args.instance_id,
        lease_ttl_seconds=args.lease_ttl,
    )


def cmd_bot(args: argparse.Namespace) -> None:
    from bot_server.bot import Bot
    from bot_server.definition import DefinitionError
    from bot_server.server import serve

    config = effective_config("bot", args, bot_config)
    configure(args.log_level, service="bot")
    try:
        bot = Bot.from_file(config.definition_path)
        for spec in args.handlers:
            load_handlers(spec, bot)
        run_component("bot", serve(config, bot))
    except DefinitionError as e:
        sys.exit(f"mbc bot: {e}")


def cmd_store(args: argparse.Namespace) -> None:
    from context_store.server import serve

    config = effective_config("store", args, store_config)
    configure(args.log_level, service="store")
    run_component("store", serve(config.etcd_endpoints, config.server, config.limits, config.etcd))


def store_config(args: argparse.Namespace) -> StoreServiceConfig:
    return StoreServiceConfig(etcd_endpoints=split_endpoints(args.etcd), etcd=etcd_access(args), server=server_config(args))


CONFIG_BUILDERS = {"router": router_config, "bot": bot_config, "store": store_config}


def cmd_config(args: argparse.Namespace) -> None:
    from mbc.cli.settings import ConfigError, render, resolve

    kinds = [args.kind] if args.kind else list(CONFIG_BUILDERS)
    out = []
    for kind in kinds:
        defaults = argparse.Namespace(**_flag_defaults(kind)[0])
        try:
            effective = resolve(kind, CONFIG_BUILDERS[kind](defaults), args.config, os.environ)
        except ConfigError as e:
            sys.exit(f"mbc config: {e}")
        out.append(render(kind, effective))
    print("\n".join(out))


def cmd_participants(args: argparse.Namespace) -> None:
    from mbc.cli.inspect import print_participants

    sys.exit(asyncio.run(print_participants(list(split_endpoints(args.etcd)), args.group, args.timeout, args.json, tls_config(args),
                                            etcd_access=etcd_access(args))))


def cmd_chat(args: argparse.Namespace) -> None:
    from mbc.cli.chat import run_chat

    configure(os.environ.get("MBC_LOG_LEVEL", "WARNING"), service="chat")
    sys.exit(asyncio.run(run_chat(args.entry, args.store, args.conversation, args.consumer, args.timeout, tls=tls_config(args))))


def cmd_group(args: argparse.Namespace) -> None:
    from discovery import EtcdClient
    from discovery.groups import read_group_settings, write_group_settings

    async def run() -> None:
        async with EtcdClient(list(split_endpoints(args.etcd)), access=etcd_access(args)) as etcd:
            settings = await read_group_settings(etcd, args.group)
            if args.return_to_sender is not None:
                settings.return_to_sender = args.return_to_sender == "on"
                await write_group_settings(etcd, args.group, settings)
            print(f"group {args.group}: return_to_sender={'on' if settings.return_to_sender else 'off'}")

    asyncio.run(run())


def cmd_etcd_auth_setup(args: argparse.Namespace) -> None:
    from mbc.cli.etcd_auth import run_setup

    configure(os.environ.get("MBC_LOG_LEVEL", "WARNING"), service="etcd-auth")
    sys.exit(asyncio.run(run_setup(list(split_endpoints(args.etcd)), etcd_access(args), args.password_dir,
                                   args.root_password_file, args.bot)))


def cmd_demo(args: argparse.Namespace) -> None:
    from mbc.cli.demo import run_demo

    sys.exit(asyncio.run(run_demo(etcd=split_endpoints(args.etcd) if args.etcd else None)))


def cmd_match(args: argparse.Namespace) -> None:
    from mbc.cli.inspect import print_match

    sys.exit(asyncio.run(print_match(args.router, args.text, args.bot, args.group, args.candidates, tls_config(args))))


def cmd_bench_match(args: argparse.Namespace) -> None:
    from mbc.bench.match import main

    configure(os.environ.get("MBC_LOG_LEVEL", "WARNING"), service="bench")
    sys.exit(main(args))


def cmd_bench_index(args: argparse.Namespace) -> None:
    from mbc.bench.index import main

    configure(os.environ.get("MBC_LOG_LEVEL", "WARNING"), service="bench")
    sys.exit(main(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbc", description="Multi-bot collaboration mesh")
    sub = parser.add_subparsers(dest="command", required=True)

    router = sub.add_parser("router", help="run the router (watches etcd, answers Match)")
    server_args(router, default_port=50051)
    _router_encoder_args(router)
    router.add_argument("--calibration", default=os.environ.get("MBC_CALIBRATION", ""),
                        help="labelled calibration set (JSON Lines), reloaded when it changes (see `mbc calibrate`)")
    router.add_argument("--embedding-cache", default=os.environ.get("MBC_EMBEDDING_CACHE", ""), metavar="DIR",
                        help='persisted phrase embeddings (default ~/.cache/mbc/embeddings; "off": none)')
    router.set_defaults(func=cmd_router)

    bot = sub.add_parser("bot", help="run one bot from a definition file")
    bot.add_argument("definition", help="bot definition YAML")
    server_args(bot, default_port=0)
    bot.add_argument("--router", default=os.environ.get("MBC_ROUTER", DEFAULT_ROUTER), help="router host:port; empty disables transfers")
    bot.add_argument("--store", default=os.environ.get("MBC_STORE", ""), help="Context Session Store host:port; empty keeps state in the bot")
    bot.add_argument("--handlers", action="append", default=[], metavar="MODULE",
                     help="Python module (dotted name or .py file) whose setup(bot) attaches code to intents; repeatable")
    bot.add_argument("--instance-id", default="", help="instance id to register (default: generated)")
    bot.add_argument("--lease-ttl", type=int, default=10, help="etcd lease TTL in seconds")
    bot.set_defaults(func=cmd_bot)

    store = sub.add_parser("store", help="run the Context Session Store (cross-bot data, conversation owners)")
    server_args(store, default_port=50052)
    store.set_defaults(func=cmd_store)

    group = sub.add_parser("group", help="show or change a bot group's settings")
    group.add_argument("group")
    group.add_argument("--etcd", default=os.environ.get("MBC_ETCD", "127.0.0.1:2379"), help="etcd endpoints, comma-separated host:port")
    etcd_access_args(group)
    group.add_argument("--return-to-sender", choices=("on", "off"), default=None,
                       help="hand a transferred conversation back to the sending bot when the receiver's dialog ends")
    group.set_defaults(func=cmd_group)

    etcd_auth = sub.add_parser("etcd-auth", help="etcd users and roles for the mesh's components")
    etcd_auth_sub = etcd_auth.add_subparsers(dest="etcd_auth_command", required=True)
    setup = etcd_auth_sub.add_parser(
        "setup", help="create or update one etcd user per component (router, store, each bot) allowed only its key "
                      "prefixes, then enable authentication (see mbc/cli/etcd_auth.py)")
    setup.add_argument("--etcd", default=os.environ.get("MBC_ETCD", "127.0.0.1:2379"), help="etcd endpoints, comma-separated host:port")
    etcd_access_args(setup, user=False)
    setup.add_argument("--password-dir", required=True, metavar="DIR",
                       help="each user's password is read from DIR/<user>.password, or made (random, mode 0600) when missing")
    setup.add_argument("--root-password-file", default="", metavar="FILE",
                       help="etcd root's password (default DIR/root.password; made when etcd has no authentication yet)")
    setup.add_argument("--bot", action="append", default=[], metavar="GROUP/BOT_ID|DEFINITION.yaml",
                       help="a bot to make a user for: its group and id, or its definition file; repeatable")
    setup.set_defaults(func=cmd_etcd_auth_setup)

    demo = sub.add_parser("demo", help="start a local mesh and play a conversation through both workflows")
    demo.add_argument("--etcd", default="", help="use these etcd endpoints instead of starting a local etcd")
    demo.set_defaults(func=cmd_demo)

    match = sub.add_parser("match", help="which bot and intent would take a message")
    match.add_argument("text")
    match.add_argument("--router", default=os.environ.get("MBC_ROUTER", DEFAULT_ROUTER))
    match.add_argument("--bot", default="", help="ask as this bot (it is left out of the candidates)")
    match.add_argument("--group", default="", help="only this group (default: the bot's group, or all)")
    match.add_argument("-n", "--candidates", type=int, default=5)
    tls_args(match)
    match.set_defaults(func=cmd_match)

    config = sub.add_parser("config", help="show the effective settings (flag defaults, --config file, MBC_* variables)")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the effective settings as YAML (a valid --config file)")
    show.add_argument("kind", nargs="?", choices=("router", "bot", "store"), help="one component (default: all)")
    show.add_argument("--config", default=os.environ.get("MBC_CONFIG", ""), metavar="FILE", help="YAML settings file")
    show.set_defaults(func=cmd_config)

    participants = sub.add_parser("participants", help="registered bots: instances, group, health, intents")
    participants.add_argument("--etcd", default=os.environ.get("MBC_ETCD", "127.0.0.1:2379"), help="etcd endpoints, comma-separated host:port")
    etcd_access_args(participants)
    participants.add_argument("--group", default="", help="only this group")
    participants.add_argument("--timeout", type=float, default=2.0, help="seconds for each health check")
    participants.add_argument("--json", action="store_true", help="one JSON object per instance instead of a table")
    tls_args(participants)
    participants.set_defaults(func=cmd_participants)

    chat = sub.add_parser("chat", help="chat with the mesh in the terminal: who answers, every transfer")
    chat.add_argument("--entry", default=os.environ.get("MBC_ENTRY", ""), required=not os.environ.get("MBC_ENTRY"),
                      help="host:port of the bot a new conversation starts with")
    chat.add_argument("--store", default=os.environ.get("MBC_STORE", ""), help="Context Session Store host:port (finds the owner)")
    chat.add_argument("--conversation", default="", help="conversation id (default: a new one)")
    chat.add_argument("--consumer", default="terminal", help="consumer id")
    chat.add_argument("--timeout", type=float, default=10.0, help="seconds per message")
    tls_args(chat)
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="benchmarks of this machine")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    bench_match = bench_sub.add_parser("match", help="Match throughput and latency against the encoder's own limit")
    from mbc.bench.match import add_arguments as _bench_match_arguments

    _bench_match_arguments(bench_match)
    bench_match.set_defaults(func=cmd_bench_match)
    bench_index = bench_sub.add_parser("index", help="the intent index at scale: build, memory, search, agreement, swap, restart")
    from mbc.bench.index import add_arguments as _bench_index_arguments

    _bench_index_arguments(bench_index)
    bench_index.set_defaults(func=cmd_bench_index)
    from mbc.cli.evaluation import add_commands as _quality_commands

    _quality_commands(sub)  # eval, calibrate, overlap
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.func(args)
