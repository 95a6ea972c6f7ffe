"""Shared fixtures: a real etcd for the whole session and a client per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from discovery import EtcdClient, LocalEtcd


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[LocalEtcd]:
    with LocalEtcd() as server:
        yield server


@pytest_asyncio.fixture
async def etcd_client(etcd_server: LocalEtcd) -> AsyncIterator[EtcdClient]:
    client = EtcdClient([etcd_server.endpoint], timeout=2.0, heartbeat=1.0)
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="session")
def encoder():
    """The real embedding model (offline), loaded once."""
    from mbc.encoder import Encoder

    encoder = Encoder()
    yield encoder
    encoder.close()
