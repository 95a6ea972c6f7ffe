"""The router process: etcd watch → index → Router service."""

from __future__ import annotations

import asyncio
import uuid

from discovery import EtcdClient, ParticipantSnapshot, ParticipantWatcher
from discovery.routers import RouterRecord, RouterRegistration, RouterWatcher
from mbc import __version__
from mbc.runtime import metrics
from mbc.runtime.channels import ChannelPool
from mbc.runtime.config import RouterConfig
from mbc.runtime.encoder import Encoder
from mbc.runtime.logs import get_logger
from mbc.runtime.security import Authorizer
from mbc.runtime.serving import GrpcServer, wait_for_shutdown_signal
from mbc.v1 import peers_pb2_grpc, router_pb2, router_pb2_grpc
from router.calibration_store import CalibrationSource
from router.core import RouterCore
from router.peer_servicer import RouterPeersServicer
from router.peers import Peers
from router.servicer import RouterServicer

log = get_logger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


SNAPSHOT_INTERVAL = 0.5
"""Least time between two participant snapshots taken by the core (`RouterProcess._on_snapshot`)."""
PEER_WATCH_SECONDS = 5.0
"""How long a starting router waits for the list of replicas before its first builds (without it,
it would do all the work itself until the list came)."""


def create_server(config: RouterConfig, core: RouterCore) -> tuple[GrpcServer, int]:
    def add_servicers(server) -> None:
        router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(core), server)
        peers_pb2_grpc.add_RouterPeersServicer_to_server(RouterPeersServicer(core, Authorizer(config.server.tls.enabled)), server)

    server = GrpcServer(config.server, add_servicers, [SERVICE_NAME])
    return server, server.port


class RouterProcess:
    """Everything the router runs, started and stopped in the right order."""

    def __init__(self, config: RouterConfig, encoder: Encoder | None = None) -> None:
        self.config = config
        self.encoder = encoder or Encoder(config.encoder)
        self.core = RouterCore(config, self.encoder)
        self.server, self.port = create_server(config, self.core)
        metrics.ROUTER_COLLECTOR.add(self.core)
        self.etcd = EtcdClient(list(config.etcd_endpoints), access=config.etcd)
        self.watcher = ParticipantWatcher(self.etcd, self._on_snapshot)
        record = RouterRecord(config.router_id or uuid.uuid4().hex[:12], self.server.address, __version__)
        self.registration = RouterRegistration(self.etcd, record, ttl=config.lease_ttl_seconds)
        self.calibration = CalibrationSource(
            self.etcd, self.core.set_calibration, config.decision.calibration_path, set_group_costs=self.core.set_group_costs
        )
        """The calibration set and the groups' costs in etcd (the same for every replica), the set
        seeded from the file if any."""
        self.pool: ChannelPool | None = None
        self.replicas: RouterWatcher | None = None
        if config.share_work:
            self.pool = ChannelPool(config.server.max_message_bytes, tls=config.server.tls)
            peers = Peers(self.server.address, self.pool, self.encoder.model_id)
            self.core.peers = self.core.embeddings.peers = peers
            self.replicas = RouterWatcher(self.etcd, peers.update)
            """The live replicas, which share the work of becoming ready (router/peers.py)."""
        self._ready_task: asyncio.Task | None = None
        self._latest: ParticipantSnapshot | None = None
        self._submit_later: asyncio.TimerHandle | None = None
        self._last_submit = float("-inf")

    def _on_snapshot(self, snapshot: ParticipantSnapshot) -> None:
        """Takes a snapshot at once, unless one was taken less than `SNAPSHOT_INTERVAL` ago: then the
        latest one at the end of that interval. Each snapshot rebuilds the directory of every
        instance, so a burst of registrations (a thousand bots starting) would cost one rebuild per
        registration; a lone change still takes effect at once."""
        self._latest = snapshot
        if self._submit_later is not None:
            return
        loop = asyncio.get_running_loop()
        delay = self._last_submit + SNAPSHOT_INTERVAL - loop.time()
        if delay <= 0:
            self._submit_latest()
        else:
            self._submit_later = loop.call_later(delay, self._submit_latest)

    def _submit_latest(self) -> None:
        self._submit_later = None
        snapshot, self._latest = self._latest, None
        if snapshot is not None:
            self._last_submit = asyncio.get_running_loop().time()
            self.core.submit(snapshot.participants, snapshot.revision, snapshot.definitions)

    async def start(self) -> None:
        await self.etcd.connect()  # first: wrong etcd credentials stop the router before it loads anything
        await self.server.start()
        await self.registration.start()  # NOT_SERVING until ready: balanced bots connect but send nothing yet
        await self.core.prepare()
        await self.calibration.start()  # before the participants: the first models use the set
        if self.replicas is not None:
            self.replicas.start()
            try:
                await self.replicas.wait_ready(PEER_WATCH_SECONDS)
            except TimeoutError:
                log.warning("router_list_late", seconds=PEER_WATCH_SECONDS, action="building alone until it comes")
        self.watcher.start()
        self._ready_task = asyncio.create_task(self._serve_when_ready())
        log.info("router_started", address=self.server.address)

    async def _serve_when_ready(self) -> None:
        await self.core.wait_serving()
        directory = self.core.directory
        assert directory is not None  # the core is ready once its first state (with a directory) is in place
        await self.server.set_serving(True)
        log.info("router_serving", address=self.server.address, revision=directory.revision)

    async def stop(self) -> None:
        if self._ready_task:
            self._ready_task.cancel()
        if self._submit_later is not None:
            self._submit_later.cancel()
        await self.server.set_serving(False)  # bots' health watches move their Match to other replicas
        await self.registration.stop()
        await self.server.stop()
        metrics.ROUTER_COLLECTOR.remove(self.core)
        await self.calibration.stop()
        await self.watcher.stop()
        if self.replicas is not None:
            await self.replicas.stop()
        await self.core.close()
        if self.pool is not None:
            await self.pool.close()
        await self.etcd.close()
        self.encoder.close()
        log.info("router_stopped")


async def serve(config: RouterConfig) -> None:
    process = RouterProcess(config)
    await process.start()
    signal_name = await wait_for_shutdown_signal()
    log.info("shutdown_requested", signal=signal_name)
    await process.stop()
