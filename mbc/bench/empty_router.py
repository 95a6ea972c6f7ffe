"""A Router whose Match answers at once, with no candidate, behind the same serving stack as
`mbc router` (`GrpcServer`: its interceptors, health and reflection) and nothing else.

`mbc bench match` loads it like the real router to measure the floor under every Match on this
machine: what gRPC and the serving stack cost, in latency and in CPU (server and load generator).

    python -m mbc.bench.empty_router --port 0 --port-file FILE
"""

from __future__ import annotations

import argparse
import asyncio

import grpc

from mbc.runtime.config import ServerConfig
from mbc.runtime.serving import GrpcServer, wait_for_shutdown_signal
from mbc.v1 import router_pb2, router_pb2_grpc

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


class EmptyRouter(router_pb2_grpc.RouterServicer):
    async def Match(self, request: router_pb2.MatchRequest, context: grpc.aio.ServicerContext) -> router_pb2.MatchResponse:
        return router_pb2.MatchResponse()


async def serve(config: ServerConfig) -> None:
    server = GrpcServer(config, lambda s: router_pb2_grpc.add_RouterServicer_to_server(EmptyRouter(), s), [SERVICE_NAME])
    await server.start()
    await server.set_serving(True)
    await wait_for_shutdown_signal()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mbc.bench.empty_router")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", default="")
    args = parser.parse_args(argv)
    asyncio.run(serve(ServerConfig(port=args.port, port_file=args.port_file, metrics_port=-1)))


if __name__ == "__main__":
    main()
