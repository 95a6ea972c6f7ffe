"""The `mbc` command: run a router, a bot or the store; play the demo; ask the mesh; measure it.

`build_parser` is the list of commands, one `add_*` function per command or family. The flags of
`mbc router|bot|store` are derived from their config fields (mbc/cli/settings.py); the client
commands' shared flags are in mbc/cli/flags.py.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable

# Before numpy loads OpenBLAS: its idle threads then sleep at once instead of spinning after each
# call (the router's search is a BLAS product), so under load they leave the cores to the encoder.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "1")

from mbc.bench import index as bench_index  # noqa: E402 (after OPENBLAS_THREAD_TIMEOUT)
from mbc.bench import match as bench_match  # noqa: E402
from mbc.bench import mesh as bench_mesh  # noqa: E402
from mbc.cli.evaluation import add_commands as add_quality_commands  # noqa: E402
from mbc.cli.flags import DEFAULT_ROUTER, client_arg, etcd_access, etcd_args, fill_client_defaults, tls_args, tls_config  # noqa: E402
from mbc.cli.settings import (  # noqa: E402
    CONFIG_ENV,
    KINDS,
    ConfigError,
    add_flags,
    client_default,
    flag_defaults,
    given_flags,
    render,
    resolve,
)
from mbc.runtime.config import split_endpoints  # noqa: E402
from mbc.runtime.logs import configure  # noqa: E402
from mbc.runtime.security import TlsError, read_files  # noqa: E402
from mbc.v1 import participant_pb2  # noqa: E402


def effective_config(kind: str, args: argparse.Namespace):
    """The settings of `mbc KIND`, layered per mbc/cli/settings.py: flag defaults < deprecated
    variables < --config file < MBC_<KIND>__* variables < given flags; exit with a message when
    they cannot work."""
    try:
        config = resolve(kind, flag_defaults(kind), args.config, os.environ, given_flags(kind, args)).config
        if config.server.tls.enabled:
            read_files(config.server.tls)
    except (ConfigError, TlsError) as e:
        sys.exit(f"mbc {kind}: {e}")
    if config.server.otel:
        try:
            import opentelemetry.instrumentation.grpc  # noqa: F401  (only to check the extra is installed)
            import opentelemetry.sdk  # noqa: F401
        except ImportError:
            sys.exit(f"mbc {kind}: --otel needs OpenTelemetry: pip install 'mbc[otel]'")
    return config


# -- command handlers -------------------------------------------------------------------------
# They import their modules when run: the servers load torch, which `mbc match` and the other
# clients must not pay for.


def run_component(kind: str, main) -> None:
    """Run a server; etcd settings or credentials that cannot work, or an etcd it cannot reach at start,
    stop it with a message rather than a traceback."""
    from discovery.errors import EtcdError, EtcdSettingsError  # the etcd client, loaded by servers only
    from discovery.registration import DefinitionError

    try:
        asyncio.run(main)
    except (EtcdError, EtcdSettingsError) as e:
        sys.exit(f"mbc {kind}: etcd: {e}")
    except DefinitionError as e:
        sys.exit(f"mbc {kind}: cannot register: {e}")
    _exit_now()


def _exit_now() -> None:
    """Exit once a server has stopped cleanly (in-flight calls done, deregistered, logs written):
    run the atexit handlers (span exporters flush there), then skip the interpreter's teardown,
    where torch's and onnxruntime's thread pools can take seconds on busy cores: past the grace
    period that SIGTERM promises."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_router(args: argparse.Namespace) -> None:
    from router.server import serve

    config = effective_config("router", args)
    configure(config.log_level, service="router")
    run_component("router", serve(config))


def load_handlers(spec: str):
    """Import a handlers module (dotted name or .py path): its `setup(bot)`, which attaches code to intents."""
    if spec.endswith(".py"):
        loaded = importlib.util.spec_from_file_location(f"mbc_handlers_{abs(hash(spec))}", spec)
        if loaded is None or loaded.loader is None:
            sys.exit(f"mbc bot: cannot load handlers from {spec}")
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        module = importlib.import_module(spec)
    setup = getattr(module, "setup", None)
    if not callable(setup):
        sys.exit(f"mbc bot: {spec} has no setup(bot) function")
    return setup


def cmd_bot(args: argparse.Namespace) -> None:
    from bot_server.bot import Bot, load_bots
    from bot_server.definition import DefinitionError
    from bot_server.engine import OwnIntents
    from bot_server.server import lexical_intents, serve

    config = effective_config("bot", args)
    configure(config.log_level, service="bot")
    try:
        bots = load_bots(config.definition_path)
        for spec in args.handlers:
            setup = load_handlers(spec)
            for bot in bots:  # every hosted bot: a setup serving several bots looks at bot.bot_id
                setup(bot)
        own_intents: Callable[[Bot], OwnIntents] = lexical_intents
        if config.local_model:
            from bot_server.local_model import model_intents  # torch and the model: only when asked for

            own_intents = model_intents(config)
        run_component("bot", serve(config, bots, own_intents))
    except DefinitionError as e:
        sys.exit(f"mbc bot: {e}")


def cmd_store(args: argparse.Namespace) -> None:
    from context_store.server import serve

    config = effective_config("store", args)
    configure(config.log_level, service="store")
    run_component("store", serve(config.etcd_endpoints, config.server, config.limits, config.etcd))


def cmd_config(args: argparse.Namespace) -> None:
    out = []
    for kind in [args.kind] if args.kind else list(KINDS):
        try:
            out.append(render(kind, resolve(kind, flag_defaults(kind), args.config, os.environ)))
        except ConfigError as e:
            sys.exit(f"mbc config: {e}")
    print("\n".join(out))


def client_log_level() -> str:
    return client_default(("log_level",), "WARNING")


def cmd_participants(args: argparse.Namespace) -> None:
    from mbc.cli.inspect import print_participants

    sys.exit(
        asyncio.run(
            print_participants(
                list(split_endpoints(args.etcd)),
                args.group,
                args.timeout,
                args.json,
                tls_config(args),
                etcd_access=etcd_access(args),
            )
        )
    )


def cmd_chat(args: argparse.Namespace) -> None:
    from mbc.cli.chat import run_chat

    if not args.entry:
        sys.stderr.write("mbc chat: error: the following arguments are required: --entry (or MBC_CLIENT__ENTRY_ADDRESS)\n")
        sys.exit(2)
    configure(client_log_level(), service="chat")
    sys.exit(asyncio.run(run_chat(args.entry, args.store, args.conversation, args.consumer, args.timeout, tls=tls_config(args))))


def set_costs(costs: participant_pb2.DecisionCosts, given: str) -> None:
    """`mbc group --costs`: "NAME=VALUE,..." sets fields of a `DecisionCosts` ("default" as a value
    clears one), "default" alone clears them all; ValueError saying what is wrong, the costs
    then left as they were."""
    from router.calibration import cost_overrides

    changed = type(costs)()
    changed.CopyFrom(costs)
    names = [f.name for f in changed.DESCRIPTOR.fields]
    items = [part.strip() for part in given.split(",") if part.strip()]
    if items == ["default"]:
        changed.Clear()
        items = []
    for item in items:
        name, equals, value = (part.strip() for part in item.partition("="))
        if not equals or name not in names:
            raise ValueError(f"{item!r}: give NAME=VALUE, NAME one of {', '.join(names)}")
        if value == "default":
            changed.ClearField(name)
            continue
        try:
            setattr(changed, name, float(value))
        except ValueError:
            raise ValueError(f"{name}={value!r}: not a number") from None
    cost_overrides(changed)
    costs.CopyFrom(changed)


def cmd_group(args: argparse.Namespace) -> None:
    from discovery import EtcdClient, forget_definition
    from discovery.groups import DEFAULT_UNAVAILABLE_MESSAGE, read_group_settings, write_group_settings

    async def run() -> None:
        async with EtcdClient(list(split_endpoints(args.etcd)), access=etcd_access(args)) as etcd:
            if args.forget:
                found = await forget_definition(etcd, args.group, args.forget)
                print(f"group {args.group}: {args.forget} {'forgotten' if found else 'had no definition'}")
                return
            settings = await read_group_settings(etcd, args.group)
            if args.return_to_sender is not None or args.unavailable_message is not None or args.costs is not None:
                if args.return_to_sender is not None:
                    settings.return_to_sender = args.return_to_sender == "on"
                if args.unavailable_message is not None:
                    settings.unavailable_message = args.unavailable_message
                if args.costs is not None:
                    try:
                        set_costs(settings.decision_costs, args.costs)
                    except ValueError as e:
                        sys.stderr.write(f"mbc group: error: --costs {e}\n")
                        sys.exit(2)
                await write_group_settings(etcd, args.group, settings)
            print(f"group {args.group}: return_to_sender={'on' if settings.return_to_sender else 'off'}")
            default = "" if settings.unavailable_message else " (default)"
            print(f"unavailable_message={settings.unavailable_message or DEFAULT_UNAVAILABLE_MESSAGE!r}{default}")
            costs = ", ".join(f"{f.name}={v:g}" for f, v in settings.decision_costs.ListFields())
            print(f"decision_costs={costs or 'the router defaults'}")

    asyncio.run(run())


def cmd_etcd_auth_setup(args: argparse.Namespace) -> None:
    from mbc.cli.etcd_auth import run_setup

    configure(client_log_level(), service="etcd-auth")
    sys.exit(
        asyncio.run(
            run_setup(list(split_endpoints(args.etcd)), etcd_access(args), args.password_dir, args.root_password_file, args.bot)
        )
    )


def cmd_demo(args: argparse.Namespace) -> None:
    from mbc.cli.demo import run_demo

    sys.exit(asyncio.run(run_demo(etcd=split_endpoints(args.etcd) if args.etcd else None)))


def cmd_match(args: argparse.Namespace) -> None:
    from mbc.cli.inspect import print_match

    sys.exit(asyncio.run(print_match(args.router, args.text, args.bot, args.group, args.candidates, tls_config(args))))


def cmd_bench_match(args: argparse.Namespace) -> None:
    configure(client_log_level(), service="bench")
    sys.exit(bench_match.main(args))


def cmd_bench_index(args: argparse.Namespace) -> None:
    configure(client_log_level(), service="bench")
    sys.exit(bench_index.main(args))


def cmd_bench_mesh(args: argparse.Namespace) -> None:
    configure(client_log_level(), service="bench")
    sys.exit(bench_mesh.main(args))


# -- the commands -----------------------------------------------------------------------------


def add_component(sub, kind: str, help: str, func) -> argparse.ArgumentParser:
    """`mbc router|bot|store`: a flag per config field that names one, and --config."""
    parser = sub.add_parser(kind, help=help)
    add_flags(parser, kind)
    parser.add_argument(
        "--config",
        default=os.environ.get(CONFIG_ENV, ""),
        metavar="FILE",
        help="YAML settings file (sections router/bot/store); MBC_<COMPONENT>__<FIELD> variables and flags override it",
    )
    parser.set_defaults(func=func)
    return parser


def add_router(sub) -> None:
    add_component(sub, "router", "run the router (watches etcd, answers Match)", cmd_router)


def add_bot(sub) -> None:
    bot = add_component(sub, "bot", "run bots from definition files (or directories of *.yaml), all on one port", cmd_bot)
    bot.add_argument(
        "--handlers",
        action="append",
        default=[],
        metavar="MODULE",
        help="Python module (dotted name or .py file) whose setup(bot) attaches code to intents, called for "
        "each hosted bot; repeatable",
    )


def add_store(sub) -> None:
    store = add_component(sub, "store", "run the Context Session Store (cross-bot data, conversation owners)", cmd_store)
    store.add_argument("--model", help=argparse.SUPPRESS)  # accepted and ignored, as before: the store has no encoder


def add_config(sub) -> None:
    config = sub.add_parser("config", help="show the effective settings (flag defaults, --config file, MBC_* variables)")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the effective settings as YAML (a valid --config file)")
    show.add_argument("kind", nargs="?", choices=tuple(KINDS), help="one component (default: all)")
    show.add_argument("--config", default=os.environ.get(CONFIG_ENV, ""), metavar="FILE", help="YAML settings file")
    show.set_defaults(func=cmd_config)


def add_group(sub) -> None:
    group = sub.add_parser(
        "group",
        help="show or change a bot group's settings; `--forget BOT_ID` removes a bot that left for good",
    )
    group.add_argument("group")
    group.add_argument(
        "--forget",
        default="",
        metavar="BOT_ID",
        help="delete the bot's definition, so that the router no longer answers that it is unavailable"
        " once no instance of it is live (it forgets its intents)",
    )
    etcd_args(group)
    group.add_argument(
        "--return-to-sender",
        choices=("on", "off"),
        default=None,
        help="hand a transferred conversation back to the sending bot when the receiver's dialog ends",
    )
    group.add_argument(
        "--unavailable-message",
        default=None,
        metavar="TEXT",
        help='answer when the best match is a bot with no live instance ("{bot}": its name; "": the default)',
    )
    group.add_argument(
        "--costs",
        default=None,
        metavar="NAME=VALUE,...",
        help="the group's own decision costs, which its threshold is fitted against (wrong_transfer, fallback,"
        ' clarify, oos_share; a value "default", or "default" alone, gives back the router\'s)',
    )
    group.set_defaults(func=cmd_group)


def add_etcd_auth(sub) -> None:
    etcd_auth = sub.add_parser("etcd-auth", help="etcd users and roles for the mesh's components")
    etcd_auth_sub = etcd_auth.add_subparsers(dest="etcd_auth_command", required=True)
    setup = etcd_auth_sub.add_parser(
        "setup",
        help="create or update one etcd user per component (router, store, each bot) allowed only its key "
        "prefixes, then enable authentication (see mbc/cli/etcd_auth.py)",
    )
    etcd_args(setup, user=False)
    setup.add_argument(
        "--password-dir",
        required=True,
        metavar="DIR",
        help="each user's password is read from DIR/<user>.password, or made (random, mode 0600) when missing",
    )
    setup.add_argument(
        "--root-password-file",
        default="",
        metavar="FILE",
        help="etcd root's password (default DIR/root.password; made when etcd has no authentication yet)",
    )
    setup.add_argument(
        "--bot",
        action="append",
        default=[],
        metavar="GROUP/BOT_ID|DEFINITION.yaml",
        help="a bot to make a user for: its group and id, or its definition file; repeatable",
    )
    setup.set_defaults(func=cmd_etcd_auth_setup)


def add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="start a local mesh and play a conversation through both workflows")
    demo.add_argument("--etcd", default="", help="use these etcd endpoints instead of starting a local etcd")
    demo.set_defaults(func=cmd_demo)


def add_match(sub) -> None:
    match = sub.add_parser("match", help="which bot and intent would take a message")
    match.add_argument("text")
    client_arg(match, "--router", ("router_address",), DEFAULT_ROUTER, help="router host:port")
    match.add_argument("--bot", default="", help="ask as this bot (it is left out of the candidates)")
    match.add_argument("--group", default="", help="only this group (default: the bot's group, or all)")
    match.add_argument("-n", "--candidates", type=int, default=5)
    tls_args(match)
    match.set_defaults(func=cmd_match)


def add_participants(sub) -> None:
    participants = sub.add_parser("participants", help="registered bots: instances, group, health, intents")
    etcd_args(participants)
    participants.add_argument("--group", default="", help="only this group")
    participants.add_argument("--timeout", type=float, default=2.0, help="seconds for each health check")
    participants.add_argument("--json", action="store_true", help="one JSON object per instance instead of a table")
    tls_args(participants)
    participants.set_defaults(func=cmd_participants)


def add_chat(sub) -> None:
    chat = sub.add_parser("chat", help="chat with the mesh in the terminal: who answers, every transfer")
    client_arg(chat, "--entry", ("entry_address",), "", help="host:port of the bot a new conversation starts with")
    client_arg(chat, "--store", ("store_address",), "", help="Context Session Store host:port (finds the owner)")
    chat.add_argument("--conversation", default="", help="conversation id (default: a new one)")
    chat.add_argument("--consumer", default="terminal", help="consumer id")
    chat.add_argument("--timeout", type=float, default=10.0, help="seconds per message")
    tls_args(chat)
    chat.set_defaults(func=cmd_chat)


def add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks of this machine")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    match = bench_sub.add_parser("match", help="Match throughput and latency against the encoder's own limit")
    bench_match.add_arguments(match)
    match.set_defaults(func=cmd_bench_match)
    index = bench_sub.add_parser("index", help="the intent index at scale: build, memory, search, agreement, swap, restart")
    bench_index.add_arguments(index)
    index.set_defaults(func=cmd_bench_index)
    mesh = bench_sub.add_parser("mesh", help="a mesh at scale: cold start, Respond under load, a router and a bot host killed")
    bench_mesh.add_arguments(mesh)
    mesh.set_defaults(func=cmd_bench_mesh)


COMMANDS = (
    add_router,
    add_bot,
    add_store,
    add_group,
    add_etcd_auth,
    add_demo,
    add_match,
    add_config,
    add_participants,
    add_chat,
    add_bench,
    add_quality_commands,
)
"""Every `mbc` command, in the order of `mbc --help` (add_quality_commands: eval, calibrate, overlap)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbc", description="Multi-bot collaboration mesh")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = fill_client_defaults(build_parser().parse_args(argv))
    args.func(args)
