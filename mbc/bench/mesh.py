"""`mbc bench mesh`: a whole mesh at scale on this machine, started cold, loaded, and hurt.

    mbc bench mesh --bots N [--routers R] [--etcd-members E] [--json OUT]

One run (the plan of bots, groups, instances and hosts: mbc/bench/mesh_plan.py):
1. E etcd members (`LocalEtcdCluster`) and the Context Session Store.
2. At once, R routers, each with an empty embedding cache of its own, and every bot instance,
   hosted in a few hosts (`start_host`). `seconds_to_all_routable`: from that moment until every
   router ranks every bot first for a phrase of its own, in its group (`wait_indexed`);
   `router_ready_seconds`: the slowest router's spawn to gRPC health SERVING.
3. RSS of the bot hosts and routers (/proc), then Respond at 32 concurrent conversations for
   `--seconds` (closed loop, `mbc.bench.loadgen.run_for`), through the gateway helper
   (`Conversation`, which follows the owner): each conversation starts at its group's entry bot
   and sends utterances of its group's intents that no definition holds, so many are transferred.
   A quarter in, one router replica is SIGKILLed (R > 1); half-way, one bot host.
   `respond_errors_during_router_kill`: failed Responds that ended between the two kills.
   `killed_bots_gone_seconds`: from the host's SIGKILL until every surviving router's directory
   has dropped its instances (the routers' `mbc_router_participants` gauge, per group).
4. Match at 32 callers on a surviving router (`mbc.bench.loadgen` in its own process), `val`
   utterances of one group; the etcd database size (`etcd_mvcc_db_total_size_in_bytes`).

Bots are hosted many to a process (`start_host`), follow the router replicas registered in etcd
(with one router: its address), and the gateways name their bot and locate a live instance of an
owner bot through the routers (`open_conversation`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from mbc.bench.clinc import default_data_dir, load_clinc
from mbc.bench.index import _rss_mb
from mbc.bench.loadgen import run_for
from mbc.bench.match import machine, run_load
from mbc.bench.mesh_plan import Instance, MeshPlan, PlanError, PlanOptions, plan_mesh, write_definitions
from mbc.client.gateway import Conversation
from mbc.runtime.channels import ChannelPool
from mbc.runtime.metrics import sample_value, scrape_text
from mbc.runtime.progress import progress_bar
from mbc.testing.etcd import LocalEtcdCluster
from mbc.testing.mesh import LocalMesh, wait_indexed, wait_trained
from mbc.testing.processes import ComponentProcess, new_workdir
from mbc.v1 import bot_pb2

MiB = 1024 * 1024
MESSAGES_PER_CONVERSATION = 5
"""Then the caller starts a new conversation at an entry bot."""
ROUTER_KILL_AT = 0.25
HOST_KILL_AT = 0.5
"""Fractions of the Respond phase when a router replica, then a bot host, is SIGKILLed."""
TARGETS = {"bots": 1000, "routers": 3, "etcd_members": 3}
"""The scale the issue's targets are set for."""
Call = tuple[float, str]
"""When a Respond ended (perf_counter), its status."""


@dataclass(frozen=True)
class MeshOptions:
    bots: int
    routers: int = 1
    etcd_members: int = 1
    seconds: float = 60.0
    """Duration of the Respond phase."""
    concurrency: int = 32
    bots_per_group: int = 15
    intents_per_bot: int = 3
    phrases_per_intent: int = 10
    bots_per_host: int = 50
    lease_ttl: int = 10
    match_requests: int = 1000
    start_timeout: float = 900.0
    log_level: str = "WARNING"
    seed: int = 0
    data_dir: Path = Path()
    workdir: Path | None = None

    def plan_options(self) -> PlanOptions:
        return PlanOptions(
            self.bots, self.bots_per_group, self.intents_per_bot, self.phrases_per_intent, self.bots_per_host, self.seed
        )


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- what the scale-out changes: one function each ------------------------------------------


async def start_host(
    mesh: LocalMesh, host: int, instances: Sequence[Instance], files: dict[str, Path], flags: Sequence[str]
) -> dict[str, ComponentProcess]:
    """One bot host: a single `mbc bot DEF...` process serving every instance of `instances` (one bot
    each) on one port; returns it by instance name."""
    process = await mesh.start_host([files[i.bot_id] for i in instances], f"host-{host}", *flags)
    return {i.name: process for i in instances}


def open_conversation(pool: ChannelPool, entry_bot_id: str, entry_address: str, store: str, routers: str) -> Conversation:
    """A conversation of a gateway starting at the entry bot, named on its host; `routers` (a comma
    list) locate a live instance of an owner bot whose instance died."""
    return Conversation(
        entry_address=entry_address, store_address=store, channels=pool, entry_bot_id=entry_bot_id, router_target=routers
    )


# --- start -----------------------------------------------------------------------------------


@dataclass
class Started:
    """The mesh once every bot is routable everywhere."""

    serving: list[dict[str, ComponentProcess]]
    """Per host, the process serving each instance (by name)."""
    seconds_to_all_routable: float
    router_ready_seconds: list[float]

    @property
    def hosts(self) -> list[list[ComponentProcess]]:
        """The processes of each host."""
        return [list({id(p): p for p in host.values()}.values()) for host in self.serving]

    def address(self, instance: Instance) -> str:
        return self.serving[instance.host][instance.name].address


POLL_SECONDS = 2.0
"""How often each (group, router) is asked whether its bots are routable: the figure's resolution
(it overstates by at most this much), and few enough Matches that watching does not slow what it
measures: at 1,000 bots, 201 (group, router) waits are 201 Matches and their replies every second
on the 2 cores the mesh starts on (docs/performance.md, `mbc bench mesh`, has the cost measured)."""


async def start_mesh(mesh: LocalMesh, plan: MeshPlan, files: dict[str, Path], opts: MeshOptions) -> Started:
    """Routers (empty caches) and every bot host at once; returns when every router ranks every bot
    first for its probe phrase."""
    common = ["--log-level", opts.log_level]
    bar = progress_bar(len(plan.instances) + len(plan.bots) * opts.routers, "mesh starting", unit="step", min_items=0)
    started = time.monotonic()
    ready: list[float] = [0.0] * opts.routers

    async def router(i: int) -> None:
        cache = mesh.workdir / f"cache-router-{i}"
        await mesh.start_router("--embedding-cache", str(cache), *common, name=f"router-{i}")
        ready[i] = time.monotonic() - started

    routers = [asyncio.create_task(router(i)) for i in range(opts.routers)]
    await asyncio.sleep(0)  # each router process is spawned
    try:
        for r in mesh.routers:
            await asyncio.to_thread(r.wait_port, opts.start_timeout)
        addresses = [r.address for r in mesh.routers]

        async def host(h: int) -> dict[str, ComponentProcess]:
            instances = plan.on_host(h)
            processes = await start_host(mesh, h, instances, files, common)
            bar.update(len(instances))
            return processes

        async def routable(address: str) -> None:
            await asyncio.gather(
                *(
                    wait_indexed(
                        address,
                        {b.bot_id: b.probe for b in plan.bots if b.group == g},
                        group=g,
                        timeout=opts.start_timeout,
                        on_indexed=lambda _: bar.update(1),
                        interval=POLL_SECONDS,
                    )
                    for g in plan.groups
                )
            )

        hosts = asyncio.gather(*(host(h) for h in range(plan.hosts)))
        await asyncio.gather(hosts, *(routable(a) for a in addresses), *routers)
        return Started(list(hosts.result()), time.monotonic() - started, ready)
    finally:
        bar.close()
        for task in routers:
            task.cancel()


# --- measure ---------------------------------------------------------------------------------


def cpu_seconds(pids: Sequence[int | None]) -> float:
    """User + system CPU seconds the processes `pids` used so far (from /proc; 0 for one gone)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            if pid is not None:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return round(total, 1)


def rss_mb(processes: Sequence[ComponentProcess]) -> list[float]:
    return [_rss_mb(p.pid)[0] for p in processes if p.process.poll() is None]


def participants_in(metrics: str) -> dict[str, int]:
    """The live instances per group in a router's directory, from its /metrics text (the
    `mbc_router_participants` gauge)."""
    return {
        sample.labels["group"]: int(sample.value)
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "mbc_router_participants"
    }


async def wait_gone(routers: Sequence[ComponentProcess], expected: dict[str, int], timeout: float) -> float | None:
    """Seconds until every router in `routers` counts at most `expected` live instances in each of
    those groups (None after `timeout`)."""
    started = time.perf_counter()

    async def gone(router: ComponentProcess) -> None:
        while time.perf_counter() - started < timeout:
            try:
                counts = participants_in(await asyncio.to_thread(scrape_text, router.metrics_address))
            except OSError:
                counts = {}
            if counts and all(counts.get(g, 0) <= n for g, n in expected.items()):
                return
            await asyncio.sleep(0.1)
        raise TimeoutError

    try:
        await asyncio.gather(*(gone(r) for r in routers))
    except TimeoutError:
        return None
    return time.perf_counter() - started


@dataclass
class Faults:
    """When each SIGKILL happened (perf_counter), and how long the killed bots took to go."""

    router_killed_at: float | None = None
    host_killed_at: float | None = None
    killed_router: str = ""
    killed_host: int = -1
    killed_instances: int = 0
    killed_bots_gone_seconds: float | None = None
    rss_before_kill: dict | None = None


async def inflict(mesh: LocalMesh, plan: MeshPlan, hosts: list[list[ComponentProcess]], opts: MeshOptions) -> Faults:
    """SIGKILL the last router replica (R > 1), then the last bot host; wait until its bots are gone."""
    faults = Faults()
    start = time.perf_counter()
    await asyncio.sleep(opts.seconds * ROUTER_KILL_AT)
    faults.rss_before_kill = {"routers": rss_mb(mesh.routers), "bots": rss_mb([p for h in hosts for p in h])}
    if opts.routers > 1:
        victim = mesh.routers[-1]
        progress(f"SIGKILL {victim.name}")
        faults.router_killed_at = time.perf_counter()
        victim.kill()
        faults.killed_router = victim.name
    await asyncio.sleep(max(0.0, start + opts.seconds * HOST_KILL_AT - time.perf_counter()))
    faults.killed_host = plan.hosts - 1
    killed = hosts[faults.killed_host]
    progress(f"SIGKILL bot host {faults.killed_host} ({len(plan.on_host(faults.killed_host))} instances)")
    faults.host_killed_at = time.perf_counter()
    for p in killed:
        p.signal(signal.SIGKILL)
    for p in killed:
        p.kill()
    faults.killed_instances = len(plan.on_host(faults.killed_host))
    live = [i for i in plan.instances if i.host != faults.killed_host]
    expected = {g: sum(plan.bot(i.bot_id).group == g for i in live) for g in plan.groups}
    survivors = [r for r in mesh.routers if r.process.poll() is None]
    faults.killed_bots_gone_seconds = await wait_gone(survivors, expected, 3 * opts.lease_ttl + 60)
    return faults


async def drive(mesh: LocalMesh, plan: MeshPlan, started: Started, opts: MeshOptions) -> tuple[dict, list[Call], Faults]:
    """Respond at `concurrency` conversations for `seconds`, while `inflict` kills."""
    rng = random.Random(opts.seed)
    assert mesh.store is not None
    store = mesh.store.address
    routers = ",".join(r.address for r in mesh.routers)
    killed_host = plan.hosts - 1
    entries = {}
    for g in plan.groups:
        entry = plan.entry_bot(g)
        instance = next(i for i in plan.instances if i.bot_id == entry.bot_id and i.host != killed_host)
        entries[g] = (entry.bot_id, started.address(instance))
    pool = ChannelPool()
    chats: dict[int, tuple[Conversation, str, int]] = {}
    outcomes: Counter = Counter()

    async def respond(caller: int) -> None:
        chat, group, sent = chats.get(caller) or (None, "", MESSAGES_PER_CONVERSATION)
        if chat is None or sent >= MESSAGES_PER_CONVERSATION:
            group = rng.choice(plan.groups)
            chat, sent = open_conversation(pool, *entries[group], store, routers), 0
        chats[caller] = (chat, group, sent + 1)
        response = await chat.send(rng.choice(plan.messages[group]))
        outcomes[bot_pb2.Outcome.Name(response.outcome).removeprefix("OUTCOME_")] += 1

    calls: list[Call] = []
    faults = asyncio.create_task(inflict(mesh, plan, started.hosts, opts))
    try:
        summary = await run_for("respond", respond, opts.concurrency, opts.seconds, calls)
        summary["outcomes"] = dict(outcomes)
        return summary, calls, await faults
    finally:
        faults.cancel()
        await pool.close()


def measure_match(router: ComponentProcess, plan: MeshPlan, warm: list[str], opts: MeshOptions, workdir: Path) -> dict:
    """Match at `concurrency` callers on `router`: `val` utterances of the first group (none of them
    sent before: the router's utterance cache never answers)."""
    group = plan.groups[0]
    texts = list(plan.match_texts[group])[: opts.match_requests]
    warmup = warm[:64]
    file = workdir / "match-utterances.json"
    file.write_text(json.dumps(warmup + texts))
    n = opts.concurrency
    phases = [f"warmup:8:0:{len(warmup)}", f"c{n}:{n}:{len(warmup)}:{len(texts)}"]
    return run_load(router.address, file, phases, router.pid, router.metrics_address, group=group)[-1]


def etcd_db_mb(cluster: LocalEtcdCluster) -> float:
    """The largest database of the members, MiB."""
    sizes = [
        sample_value(scrape_text(f"127.0.0.1:{m.metrics_port}"), "etcd_mvcc_db_total_size_in_bytes")
        for m in cluster.members
        if m.running
    ]
    return round(max(sizes) / MiB, 2)


def val_by_intent(data_dir: Path) -> dict[str, list[str]]:
    data = json.loads((data_dir / "clinc150_public.json").read_text())
    out: dict[str, list[str]] = {}
    for text, intent in data["val"]:
        out.setdefault(intent, []).append(text)
    return out


async def run(opts: MeshOptions) -> dict:
    domains, train, _, warm = load_clinc(opts.data_dir)
    plan = plan_mesh(opts.plan_options(), domains, train, val_by_intent(opts.data_dir))
    workdir = opts.workdir or new_workdir("mbc-bench-mesh-")
    workdir.mkdir(parents=True, exist_ok=True)
    files = write_definitions(plan, workdir / "bots")
    progress(
        f"{len(plan.bots)} bots in {len(plan.groups)} groups, {len(plan.instances)} instances on {plan.hosts} hosts, "
        f"{plan.phrases()} phrases; logs in {workdir}"
    )
    with LocalEtcdCluster(opts.etcd_members, data_dir=workdir / "etcd") as cluster:
        mesh = LocalMesh(
            workdir,
            ",".join(cluster.endpoints),
            lease_ttl=opts.lease_ttl,
            start_timeout=opts.start_timeout,
            etcd_owned=True,
            routers=opts.routers,
        )
        try:
            await mesh.start_store("--log-level", opts.log_level)
            progress(f"starting {opts.routers} routers and {len(plan.instances)} bot instances ...")
            started = await start_mesh(mesh, plan, files, opts)
            routable_at = time.monotonic()
            cold_cpu = {
                "routers": [cpu_seconds([r.pid]) for r in mesh.routers],
                "bot_hosts": cpu_seconds([p.pid for h in started.hosts for p in h]),
                "etcd_members": cpu_seconds([m.pid for m in cluster.members]),
                "store": cpu_seconds([mesh.store.pid] if mesh.store else []),
            }
            # Routable may be on provisional models (no heads yet): until every group is trained too.
            await asyncio.gather(*(wait_trained(r, opts.start_timeout) for r in mesh.routers))
            seconds_to_all_trained = started.seconds_to_all_routable + time.monotonic() - routable_at
            progress(f"all trained {seconds_to_all_trained:.1f} s after the start")
            routers_rss = rss_mb(mesh.routers)
            bots_rss = rss_mb([p for h in started.hosts for p in h])
            progress(f"all routable in {started.seconds_to_all_routable:.1f} s; Respond, {opts.concurrency} conversations ...")
            respond, calls, faults = await drive(mesh, plan, started, opts)
            survivor = next(r for r in mesh.routers if r.process.poll() is None)
            progress(f"Match at {opts.concurrency} callers on {survivor.name} ...")
            match = await asyncio.to_thread(measure_match, survivor, plan, warm, opts, workdir)
            routers_rss_after = rss_mb(mesh.routers)
            db_mb = etcd_db_mb(cluster)
        finally:
            await asyncio.to_thread(mesh.stop)
    result = report(opts, plan, started, bots_rss, [routers_rss, routers_rss_after], respond, calls, faults, match, db_mb)
    result["details"]["cpu_seconds_to_all_routable"] = cold_cpu
    result["details"]["seconds_to_all_trained"] = round(seconds_to_all_trained, 2)
    return result


# --- report ----------------------------------------------------------------------------------


def errors_between(calls: list[Call], start: float | None, end: float | None) -> int | None:
    """Failed calls that ended in [start, end) (None when nothing happened at `start`)."""
    if start is None:
        return None
    return sum(1 for ended, status in calls if status != "OK" and start <= ended < (end or float("inf")))


def report(
    opts: MeshOptions,
    plan: MeshPlan,
    started: Started,
    bots_rss: list[float],
    routers_rss: list[list[float]],
    respond: dict,
    calls: list[Call],
    faults: Faults,
    match: dict,
    db_mb: float,
) -> dict:
    total = round(sum(bots_rss), 1)
    result = {
        "bots": len(plan.bots),
        "routers": opts.routers,
        "etcd_members": opts.etcd_members,
        "seconds_to_all_routable": round(started.seconds_to_all_routable, 2),
        "router_ready_seconds": round(max(started.router_ready_seconds), 2),
        "bot_rss_mb_total": total,
        "bot_rss_mb_per_bot": round(total / len(plan.bots), 1),
        "router_rss_mb": max(x for sample in routers_rss for x in sample),
        "etcd_db_mb": db_mb,
        "respond_p50_ms": respond["p50_ms"],
        "respond_p99_ms": respond["p99_ms"],
        "respond_errors": respond["errors"],
        "respond_errors_during_router_kill": errors_between(calls, faults.router_killed_at, faults.host_killed_at),
        "killed_bots_gone_seconds": None if (gone := faults.killed_bots_gone_seconds) is None else round(gone, 2),
        "match_qps_c32": match["qps"],
    }
    result["targets"] = targets(result, opts.lease_ttl)
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items() if k not in ("workdir",)}
    result["details"] = {
        "groups": len(plan.groups),
        "instances": len(plan.instances),
        "hosts": plan.hosts,
        "processes_per_host": [len(h) for h in started.hosts],
        "phrases": plan.phrases(),
        "router_ready_seconds": [round(s, 2) for s in started.router_ready_seconds],
        "router_rss_mb": {"once_routable": routers_rss[0], "after_load": routers_rss[1]},
        "bot_rss_mb_max": max(bots_rss) if bots_rss else None,
        "respond": respond,
        "killed_router": faults.killed_router,
        "killed_host": faults.killed_host,
        "killed_instances": faults.killed_instances,
        "match_c32": match,
        "machine": machine(),
    }
    return result


def targets(result: dict, lease_ttl: int) -> dict[str, bool | None]:
    """The issue's targets (set for --bots 1000 --routers 3 --etcd-members 3); None: not measured."""

    def at_most(key: str, bound: float) -> bool | None:
        return None if result[key] is None else result[key] <= bound

    return {
        "seconds_to_all_routable <= 90": at_most("seconds_to_all_routable", 90),
        "bot_rss_mb_total <= 4096": at_most("bot_rss_mb_total", 4096),
        "respond_errors_during_router_kill == 0": at_most("respond_errors_during_router_kill", 0),
        f"killed_bots_gone_seconds <= lease TTL + 2 ({lease_ttl + 2})": at_most("killed_bots_gone_seconds", lease_ttl + 2),
        "etcd_db_mb <= 256": at_most("etcd_db_mb", 256),
    }


def at_target_scale(result: dict) -> bool:
    return all(result[k] >= v for k, v in TARGETS.items())


ROWS = (
    ("seconds_to_all_routable", "s", "routers and bots started at once until every bot is routable on every router"),
    ("router_ready_seconds", "s", "slowest router: spawn to gRPC health SERVING (empty embedding cache)"),
    ("bot_rss_mb_total", "MiB", "RSS of every bot process, summed"),
    ("bot_rss_mb_per_bot", "MiB", "bot_rss_mb_total / bots"),
    ("router_rss_mb", "MiB", "largest router RSS (once routable, after the load)"),
    ("etcd_db_mb", "MiB", "largest etcd member database, at the end"),
    ("respond_p50_ms", "ms", "Respond latency at the gateway, 32 conversations"),
    ("respond_p99_ms", "ms", ""),
    ("respond_errors", "", "failed Responds, whole phase"),
    ("respond_errors_during_router_kill", "", "failed Responds from the router SIGKILL to the host SIGKILL"),
    ("killed_bots_gone_seconds", "s", "host SIGKILL until every router dropped its instances"),
    ("match_qps_c32", "/s", "Match, 32 callers, one surviving router"),
)


def table(result: dict) -> str:
    d = result["details"]
    lines = [
        f"mbc bench mesh: {result['bots']} bots ({d['groups']} groups, {d['instances']} instances on {d['hosts']} hosts), "
        f"{result['routers']} routers, {result['etcd_members']} etcd members",
        f"{'figure':<36} {'value':>10}  what",
        "-" * 100,
    ]
    for key, unit, what in ROWS:
        value = result[key]
        shown = "—" if value is None else f"{value}{(' ' + unit) if unit else ''}"
        lines.append(f"{key:<36} {shown:>10}  {what}")
    lines.append("-" * 100)
    scale = "" if at_target_scale(result) else " (set for --bots 1000 --routers 3 --etcd-members 3; this run is smaller)"
    lines.append(f"targets{scale}:")
    for target, met in result["targets"].items():
        lines.append(f"{'n/a ' if met is None else 'MET ' if met else 'MISS'}  {target}")
    return "\n".join(lines)


def command_line(argv: Sequence[str]) -> str:
    """`mbc ARGS` as run, without the flags that only say where files go."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.split("=", 1)[0] in ("--json", "--workdir"):
            skip = not skip and "=" not in arg
            continue
        kept.append(arg)
    return " ".join(["mbc", *kept])


def main(args) -> int:
    opts = MeshOptions(
        bots=args.bots,
        routers=args.routers,
        etcd_members=args.etcd_members,
        seconds=args.seconds,
        concurrency=args.concurrency,
        bots_per_group=args.bots_per_group,
        intents_per_bot=args.intents_per_bot,
        phrases_per_intent=args.phrases_per_intent,
        bots_per_host=args.bots_per_host,
        lease_ttl=args.lease_ttl,
        match_requests=args.match_requests,
        start_timeout=args.start_timeout,
        log_level=args.component_log_level,
        seed=args.seed,
        data_dir=Path(args.data) if args.data else default_data_dir(),
        workdir=Path(args.workdir) if args.workdir else None,
    )
    if not (opts.data_dir / "clinc150_public.json").exists():
        print(f"mbc bench mesh: no CLINC150 data in {opts.data_dir} (use --data or MBC_CLINC150)", file=sys.stderr)
        return 2
    for name, value in (("--bots", opts.bots), ("--routers", opts.routers), ("--etcd-members", opts.etcd_members)):
        if value < 1:
            print(f"mbc bench mesh: {name} must be at least 1, got {value}", file=sys.stderr)
            return 2
    try:
        result = asyncio.run(run(opts))
    except PlanError as e:
        print(f"mbc bench mesh: {e}", file=sys.stderr)
        return 2
    result["recorded"] = {
        "command": command_line(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "environment": {k: v for k, v in os.environ.items() if k.startswith("MBC_")},  # settings the mesh inherited
    }
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"JSON written to {args.json}")
    return 0


def add_arguments(parser) -> None:
    d = MeshOptions(bots=0)
    parser.add_argument("--bots", type=int, required=True, help="bots in the mesh")
    parser.add_argument("--routers", type=int, default=d.routers, help="router replicas")
    parser.add_argument("--etcd-members", type=int, default=d.etcd_members, help="members of the etcd cluster")
    parser.add_argument("--json", default="", help="write the figures to this file")
    parser.add_argument("--seconds", type=float, default=d.seconds, help="duration of the Respond phase")
    parser.add_argument("--concurrency", type=int, default=d.concurrency, help="concurrent conversations (and Match callers)")
    parser.add_argument("--bots-per-group", type=int, default=d.bots_per_group)
    parser.add_argument("--intents-per-bot", type=int, default=d.intents_per_bot)
    parser.add_argument("--phrases-per-intent", type=int, default=d.phrases_per_intent)
    parser.add_argument("--bots-per-host", type=int, default=d.bots_per_host, help="bot instances per host")
    parser.add_argument("--lease-ttl", type=int, default=d.lease_ttl, help="the bots' etcd lease TTL, seconds")
    parser.add_argument("--match-requests", type=int, default=d.match_requests, help="Matches of the 32-caller phase (at most)")
    parser.add_argument("--start-timeout", type=float, default=d.start_timeout, help="seconds the mesh may take to be routable")
    parser.add_argument("--component-log-level", default=d.log_level, help="log level of the mesh's processes")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--data", default="", help="CLINC150 directory (default: ../shared/data/clinc150 beside the repo)")
    parser.add_argument("--workdir", default="", help="definitions, logs and etcd's data (default: a new temporary directory)")
