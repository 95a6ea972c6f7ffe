"""Shared leases for expiring keys: one etcd lease per time bucket, not one per key.

A key that must live `ttl` seconds gets the lease of the bucket its expiry falls in, so it
expires between `ttl` and `ttl + bucket_seconds` after the write. Reads compare the exact expiry
stored with the value, so callers never see a value past its TTL; the lease only reclaims space.
The number of live leases is about (longest TTL / bucket_seconds), whatever the number of keys.
"""

from __future__ import annotations

import asyncio
import math
import time

from discovery import EtcdClient


class LeaseBuckets:
    def __init__(self, etcd: EtcdClient, bucket_seconds: int = 60) -> None:
        self._etcd = etcd
        self._bucket = bucket_seconds
        self._leases: dict[int, int] = {}
        self._lock = asyncio.Lock()

    @property
    def live_leases(self) -> int:
        return len(self._leases)

    async def lease_for(self, ttl_seconds: int) -> int:
        now = time.time()
        bucket_end = math.ceil((now + ttl_seconds) / self._bucket) * self._bucket
        lease = self._leases.get(bucket_end)
        if lease is not None:
            return lease
        async with self._lock:
            lease = self._leases.get(bucket_end)
            if lease is None:
                lease = await self._etcd.grant_lease(max(1, math.ceil(bucket_end - now)) + 1)
                self._leases[bucket_end] = lease
                for end in [e for e in self._leases if e < now]:
                    del self._leases[end]
            return lease

    def forget(self, lease_id: int) -> None:
        """Drop a lease etcd no longer knows (it expired early, e.g. after an etcd restart)."""
        for end, lease in list(self._leases.items()):
            if lease == lease_id:
                del self._leases[end]
