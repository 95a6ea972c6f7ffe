"""The load generator of `mbc bench match`: a separate process calling Router.Match over gRPC.

    python -m mbc.bench.loadgen --target HOST:PORT --texts FILE --phase NAME:CONCURRENCY:START:COUNT ...

Each phase sends COUNT requests, the utterances texts[START:START+COUNT] (each once), from
CONCURRENCY callers in a closed loop over one channel, and reports throughput, latency percentiles
(measured here, around each call) and the status of every call. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter

import grpc
import numpy as np

from mbc.v1 import router_pb2, router_pb2_grpc


def summarise(name: str, concurrency: int, latencies: list[float], statuses: Counter, seconds: float) -> dict:
    ms = np.array(latencies) * 1000.0 if latencies else np.zeros(1)
    count = sum(statuses.values())
    return {
        "phase": name,
        "concurrency": concurrency,
        "requests": count,
        "ok": statuses.get("OK", 0),
        "errors": count - statuses.get("OK", 0),
        "statuses": dict(statuses),
        "seconds": round(seconds, 3),
        "qps": round(statuses.get("OK", 0) / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


async def timed(start_call, latencies: list[float], statuses: Counter) -> None:
    """Awaits the call `start_call()` makes, adding its latency and its status (an error is
    counted, never raised)."""
    started = time.perf_counter()
    try:
        await start_call()
        statuses["OK"] += 1
    except grpc.aio.AioRpcError as e:
        statuses[e.code().name] += 1
    except Exception as e:  # noqa: BLE001 - counted as an error, never fatal
        statuses[type(e).__name__] += 1
    latencies.append(time.perf_counter() - started)


async def run_phase(stub, name: str, texts: list[str], concurrency: int, group: str, timeout: float) -> dict:
    latencies: list[float] = []
    statuses: Counter = Counter()
    queue = iter(texts)

    async def caller() -> None:
        for text in queue:
            await timed(lambda: stub.Match(router_pb2.MatchRequest(text=text, group=group), timeout=timeout),
                        latencies, statuses)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return summarise(name, concurrency, latencies, statuses, time.perf_counter() - started)


async def run_paced(name: str, make_call, rate: float, seconds: float, max_in_flight: int = 256) -> dict:
    """Open loop: start `make_call(i)` (an awaitable gRPC call) every 1/rate seconds for `seconds`,
    so a slow server does not slow the sender down (at most `max_in_flight` calls pending; a
    start that would exceed it is counted as "NOT_SENT"). Summarised like a closed-loop phase."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    pending: set[asyncio.Task] = set()

    async def one(i: int) -> None:
        await timed(lambda: make_call(i), latencies, statuses)

    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        if len(pending) >= max_in_flight:
            statuses["NOT_SENT"] += 1
            continue
        task = asyncio.create_task(one(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)
    return summarise(name, max_in_flight, latencies, statuses, loop.time() - start)


async def main_async(args: argparse.Namespace) -> dict:
    texts = json.loads(open(args.texts).read())
    phases = []
    async with grpc.aio.insecure_channel(args.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = router_pb2_grpc.RouterStub(channel)
        for spec in args.phase:
            name, concurrency, start, count = spec.split(":")
            chunk = texts[int(start) : int(start) + int(count)]
            phases.append(await run_phase(stub, name, chunk, int(concurrency), args.group, args.timeout))
    return {"target": args.target, "phases": phases}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mbc.bench.loadgen")
    parser.add_argument("--target", required=True, help="router host:port")
    parser.add_argument("--texts", required=True, help="JSON list of utterances")
    parser.add_argument("--phase", action="append", default=[], help="NAME:CONCURRENCY:START:COUNT")
    parser.add_argument("--group", default="", help="group asked for (empty: all groups)")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each call, seconds")
    result = asyncio.run(main_async(parser.parse_args(argv)))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
