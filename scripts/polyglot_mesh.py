"""A live local mesh for the polyglot checks: a LocalEtcd, the Context Session Store, the router and
the three example bots (examples/*.yaml), each its own process.

    python scripts/polyglot_mesh.py --workdir DIR

Once every bot serves and the router has indexed all three, writes DIR/mesh.json
({"etcd", "store", "router", "entry", "bots": {bot_id: host:port}, "pids": {...}}); then runs until
SIGTERM or SIGINT and stops the bots, the router, the store and etcd (its children, by pid).
Used by scripts/polyglot_ci.sh, like mbc.bench.mesh is by scripts/ghz_smoke.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import yaml

from mbc.bench.mesh import publish_until_stopped
from mbc.demo import BOT_FILES, ENTRY_BOT, EXAMPLES, wait_indexed


async def run(workdir: Path, timeout: float) -> int:
    from discovery import LocalEtcd
    from mbc.processes import ComponentProcess
    from mbc.serving import wait_for_shutdown_signal

    definitions = {f: yaml.safe_load((EXAMPLES / f).read_text()) for f in BOT_FILES}
    stop = asyncio.get_running_loop().create_task(wait_for_shutdown_signal())
    started: list[ComponentProcess] = []
    with LocalEtcd(data_dir=workdir / "etcd") as etcd:
        try:
            store = ComponentProcess("store", ["store", "--etcd", etcd.endpoint], workdir)
            started.append(store)
            router = ComponentProcess("router", ["router", "--etcd", etcd.endpoint], workdir)
            started.append(router)
            await store.wait_serving("mbc.v1.ContextStore", timeout=timeout)
            await router.wait_serving("mbc.v1.Router", timeout=timeout)
            bots = {}
            for f in BOT_FILES:
                bot_id = definitions[f]["id"]
                bots[f] = ComponentProcess(bot_id, ["bot", str(EXAMPLES / f), "--etcd", etcd.endpoint,
                                                    "--router", router.address, "--store", store.address], workdir)
                started.append(bots[f])
            for bot in bots.values():
                await bot.wait_serving("mbc.v1.Bot", timeout=timeout)
            await wait_indexed(router.address, {d["id"]: d["intents"][0]["phrases"][0] for d in definitions.values()}, timeout)
            info = {
                "etcd": etcd.endpoint,
                "store": store.address,
                "router": router.address,
                "entry": bots[ENTRY_BOT].address,
                "bots": {definitions[f]["id"]: bot.address for f, bot in bots.items()},
                "pids": {"etcd": etcd.pid, **{c.name: c.pid for c in started}},
            }
            return await publish_until_stopped(workdir, info, stop)
        except Exception as e:  # noqa: BLE001 - reported, then everything is stopped
            print(f"mesh: {e}", file=sys.stderr, flush=True)
            return 1
        finally:
            stop.cancel()
            for process in reversed(started):
                process.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/polyglot_mesh.py")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sys.exit(asyncio.run(run(workdir, args.timeout)))


if __name__ == "__main__":
    main()
