"""How long a restarted router takes to serve: process start to grpc health SERVING, warm caches.

A LocalEtcd holds the three example bots (examples/*.yaml), registered as their bot processes
would register them (no bot process runs); routers are started by the test harness
(`ComponentProcess`, `python -m mbc router`) over one cache directory (XDG_CACHE_HOME: phrase
embeddings, trained heads, exported ONNX model). The first start fills the caches and is not
counted; each of the next `--runs` starts is timed from the process spawn to SERVING, then
stopped. Prints one JSON document (seconds; the load average before and after).

    python -m mbc.bench.restart [--runs 5] [--cache DIR] [-- ROUTER FLAGS...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bot_server.bot import Bot
from bot_server.server import participant_of
from discovery import EtcdClient, Registration
from mbc.testing.etcd import LocalEtcd
from mbc.testing.processes import ComponentProcess
from mbc.v1 import common_pb2

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def _measure(args: argparse.Namespace, etcd: LocalEtcd, workdir: Path) -> dict:
    client = EtcdClient([etcd.endpoint])
    await client.connect()
    registrations = []
    for i, path in enumerate(sorted(EXAMPLES.glob("*.yaml"))):
        bot = Bot.from_file(path)
        identity = common_pb2.BotRef(bot_id=bot.bot_id, instance_id=f"bench-{i}", address=f"127.0.0.1:{60000 + i}")
        registration = Registration(client, participant_of(bot, identity), ttl=600)
        await registration.start()
        registrations.append(registration)
    env = {"XDG_CACHE_HOME": str(args.cache)}
    times: list[float] = []
    try:
        for run in range(args.runs + 1):
            started = time.monotonic()
            router = ComponentProcess(f"router-{run}", ["router", "--etcd", etcd.endpoint, *args.router_flags], workdir, env=env)
            try:
                await router.wait_serving("mbc.v1.Router", timeout=300)
                seconds = time.monotonic() - started
            finally:
                router.terminate()
            print(f"run {run}{' (fills the caches, not counted)' if run == 0 else ''}: {seconds:.2f} s", file=sys.stderr)
            if run:
                times.append(seconds)
    finally:
        for registration in registrations:
            await registration.stop()
        await client.close()
    return {
        "runs": len(times),
        "seconds": [round(t, 3) for t in times],
        "min": round(min(times), 3),
        "median": round(statistics.median(times), 3),
        "max": round(max(times), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mbc.bench.restart", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed restarts (after one that fills the caches)")
    parser.add_argument("--cache", type=Path, default=None, help="cache directory (XDG_CACHE_HOME); default: a new one")
    parser.add_argument("router_flags", nargs="*", help="more `mbc router` flags (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mbc-restart-") as tmp:
        args.cache = args.cache or Path(tmp) / "cache"
        load_before = os.getloadavg()
        with LocalEtcd() as etcd:
            result = asyncio.run(_measure(args, etcd, Path(tmp)))
        result["loadavg_before"] = [round(x, 2) for x in load_before]
        result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        result["router_flags"] = args.router_flags
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
