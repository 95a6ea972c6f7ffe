"""The store process: the ContextStore service in front of etcd."""

from __future__ import annotations

from context_store.core import ContextStoreCore, StoreConfig
from context_store.servicer import ContextStoreServicer
from discovery import EtcdClient
from mbc.runtime.config import EtcdAccess, ServerConfig
from mbc.runtime.logs import get_logger
from mbc.runtime.security import Authorizer
from mbc.runtime.serving import GrpcServer, wait_for_shutdown_signal
from mbc.v1 import context_pb2, context_pb2_grpc

log = get_logger(__name__)

SERVICE_NAME = context_pb2.DESCRIPTOR.services_by_name["ContextStore"].full_name


def create_server(config: ServerConfig, core: ContextStoreCore) -> tuple[GrpcServer, int]:
    servicer = ContextStoreServicer(core, Authorizer(config.tls.enabled))
    server = GrpcServer(config, lambda s: context_pb2_grpc.add_ContextStoreServicer_to_server(servicer, s), [SERVICE_NAME])
    return server, server.port


class StoreProcess:
    def __init__(
        self,
        etcd_endpoints: tuple[str, ...],
        server: ServerConfig = ServerConfig(),
        store: StoreConfig = StoreConfig(),
        etcd_access: EtcdAccess = EtcdAccess(),
    ) -> None:
        self.etcd = EtcdClient(list(etcd_endpoints), access=etcd_access)
        self.core = ContextStoreCore(self.etcd, store)
        self.server, self.port = create_server(server, self.core)

    async def start(self) -> None:
        await self.etcd.connect()
        await self.server.start()
        await self.server.set_serving(True)
        log.info("store_serving", address=self.server.address)

    async def stop(self) -> None:
        await self.server.stop()
        await self.etcd.close()
        log.info("store_stopped")


async def serve(
    etcd_endpoints: tuple[str, ...],
    server: ServerConfig,
    store: StoreConfig = StoreConfig(),
    etcd_access: EtcdAccess = EtcdAccess(),
) -> None:
    process = StoreProcess(etcd_endpoints, server, store, etcd_access)
    await process.start()
    signal_name = await wait_for_shutdown_signal()
    log.info("shutdown_requested", signal=signal_name)
    await process.stop()
