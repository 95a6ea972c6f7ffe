"""Shared fixtures: a real etcd for the whole session and a client per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import pytest_asyncio

from discovery import EtcdClient
from mbc.client.context import ContextClient
from mbc.testing.etcd import LocalEtcd


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[LocalEtcd]:
    with LocalEtcd() as server:
        yield server


@pytest.fixture(scope="module")
def own_etcd() -> Iterator[LocalEtcd]:
    """An etcd of the module's own, for modules that stop or fill theirs, or start a mesh of the
    example group beside the session's."""
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
    from mbc.runtime.encoder import Encoder

    encoder = Encoder()
    yield encoder
    encoder.close()


_EXAMPLE_MESH: dict = {}


@pytest_asyncio.fixture(scope="session")
async def example_mesh(etcd_server, tmp_path_factory):
    """The store, the router and the three example bots as processes (tests/meshlib.py), started
    once per session: tests/test_mesh.py and tests/test_operating.py share it (it costs ~1 min).

    Its tests run one after the other (`pytest_collection_modifyitems`) and it is stopped after the
    last of them (`pytest_runtest_teardown`): its bots must not stay registered in the shared etcd
    while another module runs a mesh of the same group."""
    from meshlib import start_example_mesh

    async with start_example_mesh(etcd_server.endpoint, tmp_path_factory.mktemp("mesh")) as mesh:
        _EXAMPLE_MESH["mesh"] = mesh
        yield mesh
        _EXAMPLE_MESH.pop("mesh", None)


# What makes a test `integration` (pyproject.toml registers the markers): these fixtures start etcd,
# load the model or start processes. A test of neither mark is `integration` (never in `make
# test-fast`); a test marked `unit` that uses one of these fixtures is an error.
INTEGRATION_FIXTURES = {"etcd_server", "own_etcd", "etcd_client", "encoder", "example_mesh", "mesh", "store"}


def pytest_itemcollected(item):
    unit, integration = item.get_closest_marker("unit"), item.get_closest_marker("integration")
    if unit is not None and integration is not None:
        raise pytest.UsageError(f"{item.nodeid}: marked both unit and integration")
    if unit is None:
        if integration is None:
            item.add_marker(pytest.mark.integration)
        return
    heavy = INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    if heavy:
        raise pytest.UsageError(f"{item.nodeid}: marked unit but uses {', '.join(sorted(heavy))} (mark it integration)")


def _uses_example_mesh(item) -> bool:
    return item is not None and "example_mesh" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    users = [item for item in items if _uses_example_mesh(item)]
    if users:
        first = items.index(users[0])
        rest = [item for item in items[first:] if not _uses_example_mesh(item)]
        items[first:] = users + rest


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if _uses_example_mesh(item) and not _uses_example_mesh(nextitem):
        mesh = _EXAMPLE_MESH.pop("mesh", None)
        if mesh is not None:
            mesh.stop()


@pytest.fixture
async def store(mesh):
    """A Context Store client of the module's `mesh` fixture."""
    channel = grpc.aio.insecure_channel(mesh.store.address)
    yield ContextClient(channel)
    await channel.close()
