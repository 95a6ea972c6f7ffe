"""A local mesh of real processes: etcd, the Context Session Store, routers and bots.

The one way to start a mesh on this machine, in the spirit of temporalio's
`WorkflowEnvironment.start_local`: `mbc demo`, the benchmarks, the ghz and polyglot scripts and the
tests all start theirs with `LocalMesh`. Every component is its own `python -m mbc ...` process
bound to 127.0.0.1 on a free port; etcd is a `LocalEtcd` unless endpoints are given.

    async with start_local(EXAMPLE_BOTS) as mesh:      # etcd, store, router, the example bots
        ... mesh.router.address, mesh.bots["cards"].address ...

    async with start_local(EXAMPLE_BOTS, routers=3) as mesh:   # three router replicas, which the
        ... mesh.routers ...                                   # bots find in etcd (round robin)

`python -m mbc.testing.mesh --workdir DIR [--routers R]` runs one for scripts: once the router has indexed every
bot it writes DIR/mesh.json (see `LocalMesh.describe`) and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

import yaml

from mbc.runtime.channels import open_channel
from mbc.runtime.config import TlsConfig, split_endpoints
from mbc.runtime.metrics import sample_value, scrape_text
from mbc.runtime.serving import wait_for_shutdown_signal
from mbc.testing.etcd import LocalEtcd
from mbc.testing.processes import ComponentProcess, new_workdir
from mbc.v1 import router_pb2, router_pb2_grpc

EXAMPLES = Path(__file__).resolve().parent / "examples"
"""The example bots of the retail-bank group (the repository's examples/, shipped in the package)."""
EXAMPLE_BOTS = tuple(EXAMPLES / f for f in ("personal_banking.yaml", "business_banking.yaml", "cards.yaml"))
"""The example bots; the first is the entry bot of `mbc demo` and the polyglot checks."""
EXAMPLE_GROUP = "retail-bank"
EXAMPLE_PROBES = {
    "cards": "I lost my debit card",
    "business-banking": "open a business account for my LLC",
    "personal-banking": "what's my checking balance",
}
"""An utterance each example bot is the best match for."""
START_TIMEOUT = 240.0
"""Seconds a component may take to serve: it loads torch and the model, minutes when several meshes
share 2 cores."""

T = TypeVar("T")


@overload
async def eventually(
    check: Callable[[], Awaitable[T]],
    timeout: float = ...,
    interval: float = ...,
    *,
    what: str = ...,
    retry_on: tuple[type[BaseException], ...] = ...,
) -> tuple[T, float]: ...


@overload
async def eventually(
    check: Callable[[], T],
    timeout: float = ...,
    interval: float = ...,
    *,
    what: str = ...,
    retry_on: tuple[type[BaseException], ...] = ...,
) -> tuple[T, float]: ...


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    timeout: float = 5.0,
    interval: float = 0.2,
    *,
    what: str = "condition",
    retry_on: tuple[type[BaseException], ...] = (),
) -> tuple[T, float]:
    """Poll `check` (a function, async or not) until it returns something truthy; an exception of
    `retry_on` counts as not yet. Returns (that value, seconds it took); AssertionError after `timeout`."""
    start = time.monotonic()
    while True:
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
        except retry_on:
            value = None
        if value:
            return value, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(interval)


async def wait_indexed(
    router: str,
    probes: Mapping[str, str],
    *,
    group: str = "",
    timeout: float = 60.0,
    tls: TlsConfig = TlsConfig(),
    on_indexed: Callable[[str], None] = lambda bot_id: None,
    interval: float = 0.2,
) -> None:
    """Until the router at `router` ranks each bot of `probes` first for its utterance (in `group`);
    `on_indexed(bot_id)` as each one is. Each round asks about the first bot still pending, and
    once it is ranked first, about all the others at once (a group's bots mostly become routable
    together, with its model): a wait costs the router one Match per `interval` until then, and
    the last bots are not asked one after another on a busy router."""
    pending = dict(probes)
    async with open_channel(router, tls) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def indexed(bot_id: str) -> bool:
            request = router_pb2.MatchRequest(text=pending[bot_id], group=group, max_candidates=1)
            try:
                r = await stub.Match(request, timeout=5)
            except Exception:  # noqa: BLE001 - not serving yet: asked again
                return False
            if not (r.candidates and r.candidates[0].bot_id == bot_id):
                return False
            pending.pop(bot_id)
            on_indexed(bot_id)
            return True

        async def all_indexed() -> bool:
            if pending and await indexed(next(iter(pending))):
                await asyncio.gather(*(indexed(b) for b in list(pending)))
            return not pending

        try:
            await eventually(all_indexed, timeout, interval)
        except AssertionError:
            raise TimeoutError(f"router did not index {sorted(pending)} within {timeout:.0f}s") from None


def router_name(index: int) -> str:
    """The component name of the `index`-th router replica of a mesh: router, router2, router3, ..."""
    return "router" if index == 0 else f"router{index + 1}"


@dataclass(frozen=True)
class BotFile:
    """What the harness reads of a definition file: the bot's id, group and a phrase of its own."""

    path: Path
    bot_id: str
    group: str
    probe: str

    @classmethod
    def read(cls, path: Path) -> BotFile:
        data = yaml.safe_load(Path(path).read_text())
        return cls(Path(path), data["id"], data.get("group", "default"), data["intents"][0]["phrases"][0])


async def wait_trained(router: ComponentProcess, timeout: float = 60.0) -> None:
    """Until `router` answers every group with its trained model, none with a provisional one
    (`mbc_router_groups_provisional`, read from its /metrics): what a test checks of decisions is
    then what the trained model decides."""

    async def trained() -> bool:
        text = await asyncio.to_thread(scrape_text, router.metrics_address)
        return sample_value(text, "mbc_router_groups_provisional") == 0

    try:
        await eventually(trained, max(timeout, 1.0), retry_on=(OSError, ValueError))
    except AssertionError:
        raise TimeoutError(f"{router.name} still had provisional models after {timeout:.0f}s") from None


class LocalMesh:
    """Components of one mesh as child processes, started in `workdir` (logs: <name>.log).

    `etcd` lists the endpoints to use (comma-separated); empty: `start_etcd` starts a LocalEtcd.
    `etcd_flags(name)` gives the etcd TLS and user flags of the component called `name` ("store",
    "router", a bot's name). With `ca` (an object whose `issue(identity)` returns PEM files with
    `ca`, `cert` and `key`, as tests/pki.py's TestCA), every component serves and calls over mTLS
    with a certificate of its identity (store, router, bot/<group>/<bot_id>); `client_tls` is a
    gateway's. `lease_ttl` sets the bots' lease TTL (their default when None). `etcd_owned`: the
    etcd endpoints given go away with the mesh (a cluster its caller stops after it), so stop()
    forgets no definition. With `routers` > 1 (router replicas), the bots follow the replicas
    registered in etcd; with one, they call the first router started by its address.
    """

    def __init__(
        self,
        workdir: Path,
        etcd: str = "",
        *,
        etcd_flags: Callable[[str], list[str]] | None = None,
        ca: Any = None,
        lease_ttl: int | None = None,
        start_timeout: float = START_TIMEOUT,
        etcd_owned: bool = False,
        routers: int = 1,
    ) -> None:
        self.workdir = Path(workdir)
        self.etcd_owned = etcd_owned
        self.replicas = routers
        self.etcd = etcd
        self._etcd_flags = etcd_flags or (lambda name: [])
        self.ca = ca
        self.lease_ttl = lease_ttl
        self.start_timeout = start_timeout
        self.client_tls = self.tls("gateway/tests")
        self.local_etcd: LocalEtcd | None = None
        self.store: ComponentProcess | None = None
        self.router: ComponentProcess | None = None
        self.routers: list[ComponentProcess] = []
        self.bots: dict[str, ComponentProcess] = {}
        self.bot_files: dict[str, BotFile] = {}
        self._defined: dict[tuple[str, str], str] = {}
        """(group, bot_id) of every bot started here, with a component name to use its etcd flags:
        stop() forgets their definitions, which outlive the instances in a shared etcd."""

    @property
    def etcd_endpoints(self) -> tuple[str, ...]:
        return split_endpoints(self.etcd)

    def tls(self, identity: str) -> TlsConfig:
        """A certificate of the mesh's CA naming `identity`; no TLS for a plaintext mesh."""
        if self.ca is None:
            return TlsConfig()
        files = self.ca.issue(identity)
        return TlsConfig(ca_file=str(files.ca), cert_file=str(files.cert), key_file=str(files.key))

    def _tls_flags(self, identity: str) -> list[str]:
        tls = self.tls(identity)
        return ["--tls-ca", tls.ca_file, "--tls-cert", tls.cert_file, "--tls-key", tls.key_file] if tls.enabled else []

    def start_etcd(self) -> LocalEtcd:
        """A LocalEtcd with its data in workdir/etcd, used by every component started after it."""
        self.local_etcd = LocalEtcd(data_dir=self.workdir / "etcd")
        self.local_etcd.start()
        self.etcd = self.local_etcd.endpoint
        return self.local_etcd

    async def _serving(self, component: ComponentProcess, service: str) -> ComponentProcess:
        await component.wait_serving(service, timeout=self.start_timeout, tls=self.client_tls)
        return component

    async def start_store(self, *args: str, env: dict[str, str] | None = None) -> ComponentProcess:
        self.store = ComponentProcess(
            "store",
            ["store", "--etcd", self.etcd, *self._etcd_flags("store"), *self._tls_flags("store"), *args],
            self.workdir,
            env=env,
        )
        return await self._serving(self.store, "mbc.v1.ContextStore")

    async def start_router(self, *args: str, env: dict[str, str] | None = None, name: str = "router") -> ComponentProcess:
        """A router (`args`: more `mbc router` flags); the first one started is `self.router`."""
        router = ComponentProcess(
            name,
            ["router", "--etcd", self.etcd, *self._etcd_flags("router"), *self._tls_flags("router"), *args],
            self.workdir,
            env=env,
        )
        self.routers.append(router)
        self.router = self.router or router
        return await self._serving(router, "mbc.v1.Router")

    async def start_bot(self, path: Path, name: str = "", *args: str, env: dict[str, str] | None = None) -> ComponentProcess:
        """The bot of definition `path`, named `name` (default: its id), calling the first router
        and the store started so far; `args`: more `mbc bot` flags."""
        return await self.start_host([path], name, *args, env=env)

    async def start_host(
        self, paths: Sequence[Path], name: str = "", *args: str, env: dict[str, str] | None = None
    ) -> ComponentProcess:
        """One `mbc bot` process hosting the bots of `paths` on one port, named `name` (default: the
        first bot's id; `bot_files[name]` is that first bot's), as `start_bot`."""
        bot_files = [BotFile.read(p) for p in paths]
        name = name or bot_files[0].bot_id
        flags = ["bot", *map(str, paths), "--etcd", self.etcd, *self._etcd_flags(name)]
        if self.router is not None and self.replicas == 1:
            flags += ["--router", self.router.address]
        if self.store is not None:
            flags += ["--store", self.store.address]
        if self.lease_ttl is not None:
            flags += ["--lease-ttl", str(self.lease_ttl)]
        flags += self._tls_flags(f"bot/{bot_files[0].group}/{bot_files[0].bot_id}")
        bot = ComponentProcess(name, [*flags, *args], self.workdir, env=env)
        self.bots[name] = bot
        self.bot_files[name] = bot_files[0]
        for bot_file in bot_files:
            self._defined.setdefault((bot_file.group, bot_file.bot_id), name)
        return await self._serving(bot, "mbc.v1.Bot")

    async def wait_indexed(
        self, names: Sequence[str] | None = None, timeout: float = 60.0, router: ComponentProcess | None = None
    ) -> None:
        """Until `router` (default: the first one) ranks each bot (`names`: by component name;
        default: all) first for a phrase of its own."""
        router = router or self.router
        assert router is not None, "no router started"
        files = [self.bot_files[n] for n in (self.bots if names is None else names)]
        groups = {f.group for f in files}
        started = time.monotonic()
        await wait_indexed(
            router.address,
            {f.bot_id: EXAMPLE_PROBES.get(f.bot_id, f.probe) for f in files},
            group=groups.pop() if len(groups) == 1 else "",
            timeout=timeout,
            tls=self.client_tls,
        )
        await wait_trained(router, timeout - (time.monotonic() - started))

    def forget_command(self, group: str, bot_id: str, name: str = "") -> list[str]:
        """`mbc group GROUP --forget BOT_ID`, with the etcd flags of component `name` (default: a component
        started for that bot)."""
        name = name or self._defined.get((group, bot_id), bot_id)
        return [sys.executable, "-m", "mbc", "group", group, "--forget", bot_id, "--etcd", self.etcd, *self._etcd_flags(name)]

    def forget_now(self, group: str, bot_id: str, name: str = "") -> None:
        """Delete a bot's definition (it left for good): once no instance of it is live, the
        router forgets it instead of answering that it is unavailable."""
        subprocess.run(self.forget_command(group, bot_id, name), check=True, capture_output=True, timeout=60)

    async def forget(self, group: str, bot_id: str, name: str = "") -> None:
        """forget_now, without blocking the event loop."""
        await asyncio.to_thread(self.forget_now, group, bot_id, name)

    def _forget_all(self) -> None:
        """Forget the definitions of every bot started here (best effort): later meshes on the same
        etcd must not find them absent in their groups."""
        if not self._defined or self.local_etcd is not None or self.etcd_owned:  # its etcd goes with it
            return
        commands = [self.forget_command(group, bot_id, name) for (group, bot_id), name in self._defined.items()]
        with ThreadPoolExecutor(min(len(commands), 4)) as pool:
            list(pool.map(lambda c: subprocess.run(c, capture_output=True, timeout=60), commands))
        self._defined.clear()

    def stop(self) -> dict[str, int]:
        """The bots (they leave etcd and may still call the store), then the routers and the store,
        then a LocalEtcd this mesh started; the components of each step are stopped together, so
        their exits overlap. The definitions of the bots started here are forgotten (after the
        bots, beside the routers and the store). Returns each component's exit code, in the order
        they were stopped."""
        codes: dict[str, int] = {}
        # `router` too: a test may put a restarted router there without adding it to `routers`.
        routers = list(dict.fromkeys([*self.routers, *([self.router] if self.router else [])]))
        for i, step in enumerate((list(self.bots.values()), [*routers, *([self.store] if self.store else [])])):
            if step or i == 1:
                with ThreadPoolExecutor(len(step) + 1) as pool:
                    forgotten = pool.submit(self._forget_all) if i == 1 else None
                    codes.update(zip((c.name for c in step), pool.map(ComponentProcess.terminate, step)))
                    if forgotten is not None:
                        forgotten.result()
        if self.local_etcd is not None:
            self.local_etcd.stop()
        return codes

    def describe(self) -> dict[str, Any]:
        """Where everything listens: {"etcd", "store", "router", "routers", "bots": {bot_id: host:port},
        "entry" and "bot" (the first bot's address), "bot_id" (its id), "pids": {name: pid}}; "router" is
        the first router, "routers" every replica."""
        first = next(iter(self.bots), "")
        pids: dict[str, int | None] = {
            c.name: c.pid for c in [*([self.store] if self.store else []), *self.routers, *self.bots.values()]
        }
        if self.local_etcd is not None:
            pids["etcd"] = self.local_etcd.pid
        return {
            "etcd": self.etcd,
            "store": self.store.address if self.store else "",
            "router": self.router.address if self.router else "",
            "routers": [r.address for r in self.routers],
            "bots": {self.bot_files[n].bot_id: b.address for n, b in self.bots.items()},
            "entry": self.bots[first].address if first else "",
            "bot": self.bots[first].address if first else "",
            "bot_id": self.bot_files[first].bot_id if first else "",
            "pids": pids,
        }


@contextlib.asynccontextmanager
async def start_local(
    bot_files: Sequence[Path] = EXAMPLE_BOTS,
    *,
    workdir: Path | None = None,
    etcd: str = "",
    store: bool = True,
    router_args: Sequence[str] = (),
    router_env: dict[str, str] | None = None,
    etcd_flags: Callable[[str], list[str]] | None = None,
    ca: Any = None,
    lease_ttl: int | None = None,
    start_timeout: float = START_TIMEOUT,
    index_timeout: float = 60.0,
    routers: int = 1,
) -> AsyncIterator[LocalMesh]:
    """A mesh whose routers have indexed every bot of `bot_files`: etcd (a LocalEtcd unless `etcd`
    endpoints are given), the store (unless `store` is False) beside `routers` routers
    (`router_args` and `router_env` added; "router", "router2", ...), then the bots. Stopped, etcd
    included, on exit."""
    mesh = LocalMesh(
        workdir or new_workdir("mbc-mesh-"),
        etcd,
        etcd_flags=etcd_flags,
        ca=ca,
        lease_ttl=lease_ttl,
        start_timeout=start_timeout,
        routers=routers,
    )
    try:
        if not etcd:
            mesh.start_etcd()
        await asyncio.gather(
            *([mesh.start_store()] if store else []),
            *(mesh.start_router(*router_args, env=router_env, name=router_name(i)) for i in range(routers)),
        )
        await asyncio.gather(*(mesh.start_bot(Path(f)) for f in bot_files))
        await asyncio.gather(*(mesh.wait_indexed(timeout=index_timeout, router=r) for r in mesh.routers))
        yield mesh
    finally:
        mesh.stop()


async def serve_until_stopped(args: argparse.Namespace) -> int:
    """`python -m mbc.testing.mesh`: start, write DIR/mesh.json (atomically, and print it), wait for
    SIGTERM or SIGINT, stop."""
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stop = asyncio.get_running_loop().create_task(wait_for_shutdown_signal())
    try:
        async with start_local(
            [Path(b) for b in args.bot] or EXAMPLE_BOTS,
            workdir=workdir,
            store=not args.no_store,
            router_args=args.router_flags,
            routers=args.routers,
            start_timeout=args.timeout,
            index_timeout=args.timeout,
        ) as mesh:
            info = json.dumps(mesh.describe())
            (workdir / "mesh.json.tmp").write_text(info)
            (workdir / "mesh.json.tmp").replace(workdir / "mesh.json")
            print(info, flush=True)
            await stop
        return 0
    except Exception as e:  # noqa: BLE001 - reported; the mesh is stopped by start_local
        print(f"mesh: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mbc.testing.mesh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="logs, etcd's data and mesh.json go here")
    parser.add_argument(
        "--bot",
        action="append",
        default=[],
        metavar="FILE",
        help="a bot definition to run; repeatable (default: the example bots)",
    )
    parser.add_argument("--no-store", action="store_true", help="no Context Session Store")
    parser.add_argument("--routers", type=int, default=1, help="router replicas (more than one: bots find them in etcd)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to start and index everything")
    parser.add_argument("router_flags", nargs="*", help="extra `mbc router` flags (after --)")
    sys.exit(asyncio.run(serve_until_stopped(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
