"""The load generator of `mbc bench match`: a separate process calling Router.Match over gRPC.

    python -m mbc.bench.loadgen --target HOST:PORT --texts FILE --phase NAME:CONCURRENCY:START:COUNT ...

Each phase sends COUNT requests, the utterances texts[START:START+COUNT] (each once), from
CONCURRENCY callers in a closed loop over one channel, and reports throughput, latency percentiles
(measured here, around each call) and the status of every call. Prints one JSON object.

With `--respond BOT_ID`, the target is a bot host and each request is a Bot.Respond to BOT_ID in a
conversation of its own (a new one, so the bot claims it and, for another bot's utterance,
transfers it); a phase also reports the outcomes and, under "transferred", the latencies of the
Responds that were transferred.

Where the time goes, per phase: the CPU time of this process and, with `--server-pid`, of the
server (Linux /proc), per call; with `--metrics HOST:PORT`, the server's encoder stages per call
(`mbc_encoder_batch_seconds`: encode and post, the router's scoring) and utterances per batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from mbc.v1 import bot_pb2, bot_pb2_grpc, router_pb2, router_pb2_grpc


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
        "mean_ms": round(float(ms.mean()), 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


async def timed(start_call, latencies: list[float], statuses: Counter, calls: list[tuple[float, str]] | None = None) -> None:
    """Awaits the call `start_call()` makes, adding its latency and its status (an error is
    counted, never raised); with `calls`, also (when it ended, perf_counter; its status)."""
    started = time.perf_counter()
    try:
        await start_call()
        status = "OK"
    except grpc.aio.AioRpcError as e:
        status = e.code().name
    except Exception as e:  # noqa: BLE001 - counted as an error, never fatal
        status = type(e).__name__
    ended = time.perf_counter()
    statuses[status] += 1
    latencies.append(ended - started)
    if calls is not None:
        calls.append((ended, status))


async def run_phase(stub, name: str, texts: list[str], concurrency: int, group: str, timeout: float) -> dict:
    latencies: list[float] = []
    statuses: Counter = Counter()
    queue = iter(texts)

    async def caller() -> None:
        for text in queue:
            request = router_pb2.MatchRequest(text=text, group=group)
            await timed(lambda r=request: stub.Match(r, timeout=timeout), latencies, statuses)

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


async def run_for(name: str, make_call, concurrency: int, seconds: float, calls: list[tuple[float, str]] | None = None) -> dict:
    """Closed loop for `seconds`: `concurrency` callers, caller c starting `make_call(c)` (an
    awaitable call) again as soon as its previous one returns. Summarised like `run_phase`; with
    `calls`, each call's end time and status are added to it (to tell what failed when)."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    started = time.perf_counter()
    deadline = started + seconds

    async def caller(c: int) -> None:
        while time.perf_counter() < deadline:
            await timed(lambda: make_call(c), latencies, statuses, calls)

    await asyncio.gather(*(caller(c) for c in range(concurrency)))
    return summarise(name, concurrency, latencies, statuses, time.perf_counter() - started)


async def run_respond_phase(stub, name: str, texts: list[str], concurrency: int, bot_id: str, timeout: float) -> dict:
    """`run_phase` for Bot.Respond: each utterance to `bot_id` in a new conversation; adds the
    outcomes and the figures of the transferred Responds alone ("transferred")."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    outcomes: Counter = Counter()
    transferred: list[float] = []
    queue = iter(enumerate(texts))
    run = f"{os.getpid()}-{time.time_ns()}"

    async def caller() -> None:
        for i, text in queue:
            request = bot_pb2.RespondRequest(
                conversation_id=f"bench-{name}-{run}-{i}", consumer_id="bench", text=text, bot_id=bot_id
            )
            answer: list = []

            async def call(r=request, answer=answer) -> None:
                answer.append(await stub.Respond(r, timeout=timeout))

            await timed(call, latencies, statuses)
            if answer:
                outcome = bot_pb2.Outcome.Name(answer[0].outcome).removeprefix("OUTCOME_")
                outcomes[outcome] += 1
                if answer[0].outcome == bot_pb2.OUTCOME_TRANSFERRED:
                    transferred.append(latencies[-1])

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    phase = summarise(name, concurrency, latencies, statuses, seconds)
    phase["outcomes"] = dict(outcomes)
    moved = summarise(name, concurrency, transferred, Counter(OK=len(transferred)), seconds)
    phase["transferred"] = {k: moved[k] for k in ("requests", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms")}
    return phase


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process `pid`, all its threads (None where /proc cannot tell)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


ENCODER_SAMPLES = {
    "encode": ("mbc_encoder_batch_seconds_sum", {"stage": "encode"}),
    "post": ("mbc_encoder_batch_seconds_sum", {"stage": "post"}),
    "batches": ("mbc_encoder_batch_utterances_count", {}),
    "utterances": ("mbc_encoder_batch_utterances_sum", {}),
}


def encoder_counters(address: str) -> dict[str, float]:
    from mbc.runtime.metrics import sample_value, scrape_text

    text = scrape_text(address)
    return {key: sample_value(text, name, labels) for key, (name, labels) in ENCODER_SAMPLES.items()}


class CostMeter:
    """What a phase cost: CPU of this process and of the server, and the server's encoder stages;
    with `others` (name → pid), the CPU of those processes too."""

    def __init__(self, server_pid: int | None, metrics_address: str | None, others: dict[str, int] | None = None) -> None:
        self.server_pid, self.metrics_address, self.others = server_pid, metrics_address, others or {}

    def read(self) -> dict:
        return {
            "loadgen_cpu": time.process_time(),
            "server_cpu": process_cpu_seconds(self.server_pid) if self.server_pid else None,
            "encoder": encoder_counters(self.metrics_address) if self.metrics_address else None,
            "others": {name: process_cpu_seconds(pid) for name, pid in self.others.items()},
        }

    @staticmethod
    def per_call(before: dict, after: dict, calls: int) -> dict:
        calls = max(1, calls)
        out: dict = {"loadgen_cpu_ms": round((after["loadgen_cpu"] - before["loadgen_cpu"]) * 1000 / calls, 3)}
        if before["server_cpu"] is not None and after["server_cpu"] is not None:
            out["server_cpu_ms"] = round((after["server_cpu"] - before["server_cpu"]) * 1000 / calls, 3)
        if before["encoder"] is not None:
            d = {k: after["encoder"][k] - before["encoder"][k] for k in ENCODER_SAMPLES}
            out["encode_ms"] = round(d["encode"] * 1000 / calls, 3)
            out["post_ms"] = round(d["post"] * 1000 / calls, 3)
            out["utterances_per_batch"] = round(d["utterances"] / d["batches"], 2) if d["batches"] else 0.0
        others = {
            name: round((after["others"][name] - cpu) * 1000 / calls, 3)
            for name, cpu in before.get("others", {}).items()
            if cpu is not None and after["others"].get(name) is not None
        }
        if others:
            out["cpu_ms_by_process"] = others
        return out


async def main_async(args: argparse.Namespace) -> dict:
    texts = json.loads(Path(args.texts).read_text())
    phases = []
    others = dict((name, int(pid)) for name, pid in (p.split("=", 1) for p in args.pid))
    async with grpc.aio.insecure_channel(args.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = bot_pb2_grpc.BotStub(channel) if args.respond else router_pb2_grpc.RouterStub(channel)
        meter = CostMeter(args.server_pid, args.metrics, others)
        for spec in args.phase:
            name, concurrency, start, count = spec.split(":")
            chunk = texts[int(start) : int(start) + int(count)]
            before = meter.read()
            if args.respond:
                phase = await run_respond_phase(stub, name, chunk, int(concurrency), args.respond, args.timeout)
            else:
                phase = await run_phase(stub, name, chunk, int(concurrency), args.group, args.timeout)
            phase["cost_per_call"] = CostMeter.per_call(before, meter.read(), phase["requests"])
            phases.append(phase)
    return {"target": args.target, "phases": phases}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mbc.bench.loadgen")
    parser.add_argument("--target", required=True, help="router host:port")
    parser.add_argument("--texts", required=True, help="JSON list of utterances")
    parser.add_argument("--phase", action="append", default=[], help="NAME:CONCURRENCY:START:COUNT")
    parser.add_argument("--group", default="", help="group asked for (empty: all groups)")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each call, seconds")
    parser.add_argument("--server-pid", type=int, default=0, help="the server's pid, to report its CPU time per call")
    parser.add_argument("--metrics", default="", help="the server's /metrics host:port, to report its encoder stages")
    parser.add_argument("--respond", default="", metavar="BOT_ID", help="call Bot.Respond to this bot instead of Router.Match")
    parser.add_argument("--pid", action="append", default=[], metavar="NAME=PID", help="also report this process's CPU per call")
    result = asyncio.run(main_async(parser.parse_args(argv)))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
