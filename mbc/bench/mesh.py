"""A live local mesh for load tests: a LocalEtcd, the router and one example bot, each its own process.

    python -m mbc.bench.mesh --workdir DIR [--bot examples/cards.yaml] [router flags after --]

Once the router serves and has indexed the bot, writes DIR/mesh.json
({"router": host:port, "bot": host:port, "bot_id": ..., "pids": {...}}); then runs until SIGTERM or
SIGINT and stops the bot, the router and etcd (by pid: they are its children). Used by
scripts/ghz_smoke.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import yaml

from mbc.demo import EXAMPLES, wait_indexed



async def publish_until_stopped(workdir: Path, info: dict, stop: asyncio.Future) -> int:
    """Write DIR/mesh.json (atomically) and print it, then wait for SIGTERM or SIGINT."""
    tmp = workdir / "mesh.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.replace(workdir / "mesh.json")
    print(json.dumps(info), flush=True)
    await stop
    return 0


async def run(workdir: Path, bot_file: Path, router_flags: list[str], timeout: float) -> int:
    from discovery import LocalEtcd
    from mbc.processes import ComponentProcess
    from mbc.serving import wait_for_shutdown_signal

    definition = yaml.safe_load(bot_file.read_text())
    stop = asyncio.get_running_loop().create_task(wait_for_shutdown_signal())
    started: list[ComponentProcess] = []
    with LocalEtcd(data_dir=workdir / "etcd") as etcd:
        try:
            router = ComponentProcess("router", ["router", "--etcd", etcd.endpoint, *router_flags], workdir)
            started.append(router)
            await router.wait_serving("mbc.v1.Router", timeout=timeout)
            bot = ComponentProcess("bot", ["bot", str(bot_file), "--etcd", etcd.endpoint, "--router", router.address], workdir)
            started.append(bot)
            await bot.wait_serving("mbc.v1.Bot", timeout=timeout)
            await wait_indexed(router.address, {definition["id"]: definition["intents"][0]["phrases"][0]}, timeout)
            info = {
                "router": router.address,
                "bot": bot.address,
                "bot_id": definition["id"],
                "etcd": etcd.endpoint,
                "pids": {"etcd": etcd.pid, "router": router.pid, "bot": bot.pid},
            }
            return await publish_until_stopped(workdir, info, stop)
        except Exception as e:  # noqa: BLE001 - reported, then everything is stopped
            print(f"mesh: {e}", file=sys.stderr, flush=True)
            return 1
        finally:
            stop.cancel()
            for process in reversed(started):
                process.terminate()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mbc.bench.mesh")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--bot", default=str(EXAMPLES / "cards.yaml"))
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("router_flags", nargs="*", help="extra `mbc router` flags (after --)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sys.exit(asyncio.run(run(workdir, Path(args.bot), args.router_flags, args.timeout)))


if __name__ == "__main__":
    main()
