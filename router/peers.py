"""Router replicas share the work of becoming ready instead of each doing all of it.

A replica that starts cold (or sees a group change) needs each phrase's embedding and each group's
trained heads. Both are pure functions of their inputs (the model and the text; the heads key of
router/model_cache.py), so one replica can compute a piece and the others fetch it: every piece
has an owner, the live replica (in etcd, discovery/routers.py) that wins rendezvous hashing of the
piece's key, and the others ask the owner (`mbc.v1.RouterPeers`, protos/mbc/v1/peers.proto),
which computes it once for all. On three replicas each computes about a third of the phrases and
trains about a third of the groups.

Asking never blocks progress: a replica that cannot reach the owner, gets an error, or waits
longer than `RouterConfig.peer_wait_seconds` does the work itself, with the same result (training
is deterministic); an owner that cannot be reached owns nothing for `DOWN_SECONDS`. A replica
alone, or with `--share-work off`, does everything itself.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence

import grpc
import numpy as np

from mbc.runtime.channels import ChannelPool
from mbc.runtime.logs import get_logger
from mbc.v1 import peers_pb2, peers_pb2_grpc

log = get_logger(__name__)

MAX_PHRASES = 4096
"""Most phrases in one EmbedPhrases call (the server refuses more)."""
EMBED_BATCH = 512
"""Phrases per EmbedPhrases call made by `Peers.embed`."""
EMBED_TIMEOUT_SECONDS = 120.0
"""Deadline of one EmbedPhrases call: the owner may be encoding for every replica at once."""
DOWN_SECONDS = 10.0
"""A replica that could not be reached owns nothing for this long (its record may outlive it by
the lease TTL): its keys go to the next replica by rendezvous hashing, without a wait per key."""


class PeerError(Exception):
    """A peer could not do the work asked (unreachable, refused, overloaded): do it here."""


def owner_of(key: str, replicas: Iterable[str]) -> str:
    """The replica (by address) that owns `key`: the highest hash of (replica, key) (rendezvous
    hashing: when a replica joins or leaves, only the keys it wins or held move)."""
    return max(replicas, key=lambda r: hashlib.blake2b(f"{r}\0{key}".encode(), digest_size=8).digest())


class Peers:
    """The other live replicas, as `update` was last told (a `RouterWatcher` callback), and calls to them."""

    def __init__(self, own_address: str, pool: ChannelPool, model_id: str) -> None:
        self.own = own_address
        self.model_id = model_id
        self._pool = pool
        self._replicas: tuple[str, ...] = (own_address,)
        self._down: dict[str, float] = {}
        """Replicas that could not be reached, until when (monotonic) they own nothing."""

    def update(self, addresses: Sequence[str]) -> None:
        """The registered replicas' addresses (this one is always counted, registered or not yet)."""
        self._replicas = tuple(sorted({*addresses, self.own}))

    @property
    def others(self) -> tuple[str, ...]:
        return tuple(r for r in self._replicas if r != self.own)

    def owner(self, key: str) -> str | None:
        """The replica that owns `key`, or None when it is this one."""
        replicas = self._replicas
        if self._down:
            now = time.monotonic()
            self._down = {r: until for r, until in self._down.items() if until > now}
            replicas = tuple(r for r in replicas if r not in self._down)
        owner = owner_of(key, replicas)
        return None if owner == self.own else owner

    def _failed(self, address: str, error: grpc.aio.AioRpcError) -> None:
        if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            self._down[address] = time.monotonic() + DOWN_SECONDS

    def _stub(self, address: str) -> peers_pb2_grpc.RouterPeersStub:
        return peers_pb2_grpc.RouterPeersStub(self._pool.channel(address))

    async def embed(self, owner: str, phrases: Sequence[str], dim: int) -> np.ndarray:
        """The embeddings of `phrases` from `owner`; PeerError when it cannot give them."""
        out = np.empty((len(phrases), dim), np.float32)
        for start in range(0, len(phrases), EMBED_BATCH):
            chunk = list(phrases[start : start + EMBED_BATCH])
            try:
                response = await self._stub(owner).EmbedPhrases(
                    peers_pb2.EmbedPhrasesRequest(model_id=self.model_id, phrases=chunk), timeout=EMBED_TIMEOUT_SECONDS
                )
            except grpc.aio.AioRpcError as e:
                self._failed(owner, e)
                raise PeerError(f"{owner}: EmbedPhrases: {e.code().name}: {e.details()}") from e
            if response.dimension != dim or len(response.vectors) != 4 * dim * len(chunk):
                raise PeerError(f"{owner}: EmbedPhrases answered {len(response.vectors)} bytes of dimension {response.dimension}")
            out[start : start + len(chunk)] = np.frombuffer(response.vectors, "<f4").reshape(len(chunk), dim)
        return out

    async def heads(self, owner: str, key: str, wait_seconds: float) -> bytes | None:
        """The heads of `key` from `owner`, waiting up to `wait_seconds` for it to train them; None
        when it has none by then; PeerError when it cannot answer."""
        try:
            response = await self._stub(owner).GetHeads(
                peers_pb2.GetHeadsRequest(key=key, wait_ms=int(wait_seconds * 1000)), timeout=wait_seconds + 10
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            self._failed(owner, e)
            raise PeerError(f"{owner}: GetHeads: {e.code().name}: {e.details()}") from e
        return response.heads
