"""mbc.v1.RouterPeers over gRPC: what one router replica does for another (router/peers.py)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from mbc.runtime.security import Authorizer
from mbc.runtime.status import abort
from mbc.v1 import peers_pb2, peers_pb2_grpc
from router.core import RouterCore
from router.model_cache import heads_to_bytes
from router.peers import MAX_PHRASES

MAX_WAIT_MS = 60_000
"""Longest wait a GetHeads may ask for: a caller that needs longer asks again."""


class RouterPeersServicer(peers_pb2_grpc.RouterPeersServicer):
    def __init__(self, core: RouterCore, authorizer: Authorizer | None = None) -> None:
        self.core = core
        self.authorizer = authorizer or Authorizer(False)

    async def _router_only(self, context: grpc.aio.ServicerContext) -> None:
        caller = await self.authorizer.caller(context)
        if caller is not None and caller.kind != "router":
            reason = f"{caller} is not a router: RouterPeers is for router replicas"
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, reason)

    async def EmbedPhrases(
        self, request: peers_pb2.EmbedPhrasesRequest, context: grpc.aio.ServicerContext
    ) -> peers_pb2.EmbedPhrasesResponse:
        await self._router_only(context)
        if not request.phrases or len(request.phrases) > MAX_PHRASES:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{len(request.phrases)} phrases; send 1 to {MAX_PHRASES}")
        model_id = self.core.encoder.model_id
        if request.model_id != model_id:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this replica embeds with {model_id!r}, not {request.model_id!r}",
            )
        vectors = await self.core.embeddings.embed(list(request.phrases), local_only=True)
        return peers_pb2.EmbedPhrasesResponse(dimension=vectors.shape[1], vectors=np.ascontiguousarray(vectors, "<f4").tobytes())

    async def GetHeads(self, request: peers_pb2.GetHeadsRequest, context: grpc.aio.ServicerContext) -> peers_pb2.GetHeadsResponse:
        await self._router_only(context)
        if not request.key:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "key is empty")
        heads = await self.core.published_heads(request.key, min(request.wait_ms, MAX_WAIT_MS) / 1000)
        if heads is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no heads {request.key} here (yet)")
        assert heads is not None  # abort raised
        return peers_pb2.GetHeadsResponse(heads=await asyncio.to_thread(heads_to_bytes, heads))
