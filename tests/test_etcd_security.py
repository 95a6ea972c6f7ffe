"""etcd with TLS, client certificates and a user per component (`mbc etcd-auth setup`), and
registrations that cannot be overwritten: real etcd processes, the real mesh as subprocesses."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_asyncio

from discovery import (
    EtcdClient,
    EtcdPermissionDenied,
    EtcdUnavailable,
    Registration,
    RegistrationConflict,
)
from discovery.etcd_client import KeyPermission
from discovery.groups import settings_key
from discovery.keys import DEFINITIONS_PREFIX, definition_key, participant_key
from mbc.cli.etcd_auth import ROUTER_USER, STORE_USER, bot_user
from mbc.runtime.config import EtcdAccess
from mbc.testing.etcd import LocalEtcd, ServerTls
from mbc.testing.mesh import EXAMPLES, LocalMesh, eventually
from mbc.v1 import bot_pb2, participant_pb2
from meshlib import LEASE_TTL, ROOT, match, respond
from pki import TestCA

pytestmark = pytest.mark.integration

pytestmark = pytest.mark.timeout(300)

GROUP = "retail-bank"
BOTS = ("personal-banking", "business-banking", "cards")
TOKEN_TTL = 3
"""etcd's --auth-token-ttl here: every component's token expires whenever it idles this long."""


class SecureEtcd:
    """An etcd serving TLS only, asking for client certificates, with authentication enabled by
    `mbc etcd-auth setup` (a user per component, passwords in `secrets`)."""

    def __init__(self, directory: Path) -> None:
        self.ca = TestCA(directory / "pki")
        server = self.ca.issue("etcd-server", client=False)
        self.etcd = LocalEtcd(directory / "etcd", tls=ServerTls(server.cert, server.key, server.ca), auth_token_ttl=TOKEN_TTL)
        self.secrets = directory / "secrets"
        self.setup_cert = self.ca.issue("mbc-setup", server=False)

    def tls_flags(self, cert) -> list[str]:
        return ["--etcd-ca", str(cert.ca), "--etcd-cert", str(cert.cert), "--etcd-key", str(cert.key)]

    def setup(self) -> subprocess.CompletedProcess:
        """Run the operator's command, as an operator would."""
        bots = [arg for name in BOTS for arg in ("--bot", str(EXAMPLES / f"{name.replace('-', '_')}.yaml"))]
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "mbc",
                "etcd-auth",
                "setup",
                "--etcd",
                f"https://{self.etcd.endpoint}",
                *self.tls_flags(self.setup_cert),
                "--password-dir",
                str(self.secrets),
                *bots,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )

    def access(self, user: str, password_file: Path | None = None) -> EtcdAccess:
        """What component `user` uses: its own client certificate (CN = its user) and password."""
        cert = self.ca.issue(user, server=False)
        return EtcdAccess(
            ca_file=str(cert.ca),
            cert_file=str(cert.cert),
            key_file=str(cert.key),
            username=user,
            password_file=str(password_file or self.secrets / f"{user}.password"),
        )

    def flags(self, user: str) -> list[str]:
        a = self.access(user)
        return [
            "--etcd-ca",
            a.ca_file,
            "--etcd-cert",
            a.cert_file,
            "--etcd-key",
            a.key_file,
            "--etcd-user",
            a.username,
            "--etcd-password-file",
            a.password_file,
        ]

    def client(self, user: str, **kwargs) -> EtcdClient:
        return EtcdClient([f"https://{self.etcd.endpoint}"], timeout=3.0, access=self.access(user, **kwargs))


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    secure = SecureEtcd(tmp_path_factory.mktemp("secure-etcd"))
    secure.etcd.start()
    try:
        result = secure.setup()
        assert result.returncode == 0, result.stderr
        secure.first_setup_output = result.stdout
        yield secure
    finally:
        secure.etcd.cleanup()


def component_name_to_user(name: str) -> str:
    return {"router": ROUTER_USER, "store": STORE_USER}.get(name) or bot_user(GROUP, name)


MESH_BOTS = ("personal-banking", "cards")
"""Two bots are enough for a transfer; the machine is small."""


@pytest_asyncio.fixture(scope="module")
async def secure_mesh(secure, tmp_path_factory):
    """The store, the router and two example bots, each with its own etcd user and certificate."""
    mesh = LocalMesh(
        tmp_path_factory.mktemp("secure-mesh"),
        f"https://{secure.etcd.endpoint}",
        etcd_flags=lambda name: secure.flags(component_name_to_user(name)),
        lease_ttl=LEASE_TTL,
    )
    try:
        await asyncio.gather(mesh.start_store(), mesh.start_router())
        await asyncio.gather(*(mesh.start_bot(EXAMPLES / f"{name.replace('-', '_')}.yaml", name) for name in MESH_BOTS))
        await mesh.wait_indexed(MESH_BOTS, timeout=120)
        yield mesh
    finally:
        mesh.stop()


def participant(bot_id: str, instance_id: str = "i1") -> participant_pb2.Participant:
    return participant_pb2.Participant(
        group=GROUP, bot_id=bot_id, instance_id=instance_id, address="127.0.0.1:1", collaboration=True
    )


async def test_setup_gives_each_component_a_user_and_is_idempotent(secure):
    out = secure.first_setup_output
    for user in (ROUTER_USER, STORE_USER, *(bot_user(GROUP, b) for b in BOTS)):
        assert f"user {user} created" in out
        assert (secure.secrets / f"{user}.password").stat().st_mode & 0o077 == 0
    assert "authentication enabled" in out
    again = secure.setup()
    assert again.returncode == 0, again.stderr
    assert "nothing to change" in again.stdout
    # A valid client certificate alone (its CN is no etcd user) reads nothing.
    async with EtcdClient(
        [f"https://{secure.etcd.endpoint}"],
        timeout=3.0,
        access=EtcdAccess(
            ca_file=str(secure.setup_cert.ca), cert_file=str(secure.setup_cert.cert), key_file=str(secure.setup_cert.key)
        ),
    ) as anonymous:
        with pytest.raises(EtcdPermissionDenied):
            await anonymous.get_prefix("/mbc/v1/participants/")


async def test_setup_takes_back_a_permission_granted_by_hand(secure):
    async with secure.client("root") as root:
        await root.grant_permission(ROUTER_USER, KeyPermission.on_prefix("/mbc/v1/conversations/", "readwrite"))
        result = secure.setup()
        assert result.returncode == 0, result.stderr
        assert f"role {ROUTER_USER}: readwrite /mbc/v1/conversations/* revoked" in result.stdout
        assert KeyPermission.on_prefix("/mbc/v1/conversations/", "readwrite") not in await root.role_permissions(ROUTER_USER)


def test_etcd_access_comes_from_the_environment_like_any_setting():
    from mbc.cli.settings import resolve
    from mbc.runtime.config import BotConfig

    config = resolve(
        "bot",
        BotConfig(),
        environ={
            "MBC_BOT__ETCD__USERNAME": "cards@retail-bank",
            "MBC_BOT__ETCD__PASSWORD_FILE": "/run/secrets/cards",
            "MBC_BOT__ETCD__CA_FILE": "/etc/mbc/ca.crt",
        },
    ).config
    assert config.etcd == EtcdAccess(ca_file="/etc/mbc/ca.crt", username="cards@retail-bank", password_file="/run/secrets/cards")
    assert config.etcd.tls


async def test_plaintext_client_is_refused_with_a_hint_about_tls(secure):
    client = EtcdClient([secure.etcd.endpoint], timeout=2.0)
    with pytest.raises(EtcdUnavailable, match="etcd serves TLS"):
        await asyncio.wait_for(client.connect(), 30)
    await client.close()


async def test_client_without_certificate_is_refused_with_a_hint(secure):
    access = secure.access(ROUTER_USER)
    client = EtcdClient(
        [secure.etcd.endpoint],
        timeout=2.0,
        access=EtcdAccess(ca_file=access.ca_file, username=access.username, password_file=access.password_file),
    )
    with pytest.raises(EtcdUnavailable, match="TLS handshake failed"):
        await asyncio.wait_for(client.connect(), 30)
    await client.close()


def test_wrong_password_stops_the_router_at_start_with_a_clear_message(secure, tmp_path):
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    a = secure.access(ROUTER_USER, password_file=wrong)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mbc",
            "router",
            "--port",
            "0",
            "--etcd",
            f"https://{secure.etcd.endpoint}",
            "--etcd-ca",
            a.ca_file,
            "--etcd-cert",
            a.cert_file,
            "--etcd-key",
            a.key_file,
            "--etcd-user",
            ROUTER_USER,
            "--etcd-password-file",
            str(wrong),
            "--metrics-port",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    tail = result.stderr[-3000:]
    assert result.returncode != 0, tail
    assert f"mbc router: etcd: etcd refused user '{ROUTER_USER}'" in result.stderr, tail
    assert "invalid user ID or password" in result.stderr, tail
    assert "Traceback" not in result.stderr, tail


async def test_router_user_reads_participants_but_cannot_write_them(secure):
    async with secure.client(ROUTER_USER) as router:
        await router.get_prefix("/mbc/v1/participants/")
        await router.get_prefix(DEFINITIONS_PREFIX)  # the bots' definitions, which outlive their instances
        await router.get(settings_key(GROUP))
        with pytest.raises(EtcdPermissionDenied):
            await router.put(definition_key(GROUP, "cards"), participant("cards").SerializeToString())
        with pytest.raises(EtcdPermissionDenied, match=ROUTER_USER):
            await router.put(participant_key(GROUP, "cards", "forged"), participant("cards").SerializeToString())
        with pytest.raises(EtcdPermissionDenied):
            await router.put("/mbc/v1/conversations/c1/owner", b"x")


async def test_bot_user_writes_only_its_own_registrations(secure):
    async with secure.client(bot_user(GROUP, "cards")) as cards:
        own = Registration(cards, participant("cards", "own"), ttl=5)
        await own.start()
        assert (await cards.get(own.key)).lease == own.lease_id
        assert (await cards.get(definition_key(GROUP, "cards"))).lease == 0  # its definition, without a lease
        # Through the real registration code and a raw put: another bot's key is refused.
        forged = Registration(cards, participant("business-banking", "forged"), ttl=5)
        with pytest.raises(EtcdPermissionDenied, match=bot_user(GROUP, "cards")):
            await forged.start()
        with pytest.raises(EtcdPermissionDenied):
            await cards.put(participant_key(GROUP, "business-banking", "x"), b"")
        # Nor another bot's definition (nor a key that only starts like its own).
        with pytest.raises(EtcdPermissionDenied):
            await cards.put(definition_key(GROUP, "business-banking"), participant("cards").SerializeToString())
        with pytest.raises(EtcdPermissionDenied):
            await cards.delete(definition_key(GROUP, "business-banking"))
        with pytest.raises(EtcdPermissionDenied):
            await cards.put(definition_key(GROUP, "cards-forged"), b"")
        with pytest.raises(EtcdPermissionDenied):
            await cards.put(settings_key(GROUP), participant_pb2.GroupSettings(return_to_sender=True).SerializeToString())
        with pytest.raises(EtcdPermissionDenied):
            await cards.get_prefix("/mbc/v1/context/")
        await cards.get(settings_key(GROUP))  # its group's settings and participants: readable
        await cards.get_prefix(f"/mbc/v1/participants/{GROUP}/")
        with pytest.raises(EtcdPermissionDenied):
            await cards.get_prefix("/mbc/v1/participants/other-group/")
        await own.stop(forget=True)
        assert await cards.get(own.key) is None
        assert await cards.get(definition_key(GROUP, "cards")) is None


async def test_expired_token_is_renewed_without_the_caller_noticing(secure):
    async with secure.client(ROUTER_USER) as router:
        await router.get_prefix("/mbc/v1/participants/")
        await asyncio.sleep(TOKEN_TTL + 2)  # the token expires while the client idles
        await router.get_prefix("/mbc/v1/participants/")


async def test_concurrent_requests_on_an_expired_token_all_succeed(secure):
    """Every request in flight sees the token expire: one connection is made anew and each request
    retries on it (none drops another's new connection, none fails UNAVAILABLE)."""
    async with secure.client(ROUTER_USER) as router:
        await router.get_prefix("/mbc/v1/participants/")
        for _ in range(2):
            await asyncio.sleep(TOKEN_TTL + 2)
            results = await asyncio.gather(*(router.get(f"/mbc/v1/participants/{i}") for i in range(24)), return_exceptions=True)
            assert [r for r in results if isinstance(r, BaseException)] == []


async def test_mesh_runs_over_tls_etcd_with_a_user_per_component(secure, secure_mesh):
    r = await respond(secure_mesh.bots["personal-banking"].address, "I lost my debit card")
    assert r.outcome == bot_pb2.OUTCOME_TRANSFERRED
    assert r.replies[-1].bot_id == "cards" and r.owner.bot_id == "cards"
    # Idle longer than the token TTL: every component must authenticate again and go on.
    await asyncio.sleep(TOKEN_TTL + 2)
    r = await respond(secure_mesh.bots["cards"].address, "what's my checking balance")
    assert r.outcome == bot_pb2.OUTCOME_TRANSFERRED and r.replies[-1].bot_id == "personal-banking"
    async with secure.client(ROUTER_USER) as router:
        items, _ = await router.get_prefix("/mbc/v1/participants/")
    assert sorted(kv.key.split("/")[-2] for kv in items) == sorted(MESH_BOTS)


async def test_mesh_survives_an_etcd_restart_with_auth(secure, secure_mesh):
    """A restart forgets every token: components re-authenticate, bots keep their registration."""
    secure.etcd.restart()

    async def transferred():
        r = await respond(secure_mesh.bots["personal-banking"].address, "I lost my debit card")
        return r.outcome == bot_pb2.OUTCOME_TRANSFERRED and r.replies[-1].bot_id == "cards"

    await eventually(transferred, timeout=60, interval=1.0)

    async def all_registered():
        async with secure.client(ROUTER_USER) as router:
            items, _ = await router.get_prefix("/mbc/v1/participants/")
        return len(items) == len(MESH_BOTS)

    await eventually(all_registered, timeout=60, interval=1.0)
    assert (await match(secure_mesh.router.address, "I lost my debit card", group=GROUP)).candidates[0].bot_id == "cards"


# -- without authentication: registration itself never overwrites another live instance --------


async def test_second_instance_with_the_same_key_is_refused(etcd_client):
    first = Registration(etcd_client, participant("dup-bot", "same"), ttl=2)
    await first.start()
    try:
        second = Registration(etcd_client, participant("dup-bot", "same"), ttl=2)
        with pytest.raises(RegistrationConflict, match="registered by another instance"):
            await asyncio.wait_for(second.start(), 30)  # waits out the first one's TTL: it stays alive
        kv = await etcd_client.get(first.key)
        assert kv.lease == first.lease_id
    finally:
        await first.stop()


async def test_key_of_a_dead_instance_is_taken_over_once_its_lease_expires(etcd_client):
    key = participant_key(GROUP, "crashed-bot", "same")
    dead_lease = await etcd_client.grant_lease(2)  # nobody refreshes it: its process is gone
    await etcd_client.put(key, participant("crashed-bot", "same").SerializeToString(), dead_lease)
    restarted = Registration(etcd_client, participant("crashed-bot", "same"), ttl=5)
    await asyncio.wait_for(restarted.start(), 30)
    try:
        assert (await etcd_client.get(key)).lease == restarted.lease_id != dead_lease
    finally:
        await restarted.stop()


async def test_update_does_not_overwrite_a_key_taken_by_another_lease(etcd_client):
    registration = Registration(etcd_client, participant("moved-bot", "i1"), ttl=5)
    await registration.start()
    try:
        other = await etcd_client.grant_lease(30)
        await etcd_client.put(registration.key, b"someone else", other)  # as if another process took it
        with pytest.raises(RegistrationConflict):
            await registration.update(participant("moved-bot", "i1"))
        assert (await etcd_client.get(registration.key)).value == b"someone else"
        await etcd_client.revoke_lease(other)
    finally:
        await registration.stop()


def test_bad_etcd_settings_fail_before_connecting(tmp_path):
    from discovery import EtcdSettingsError

    with pytest.raises(EtcdSettingsError, match="cert_file and etcd.key_file go together"):
        EtcdClient(["127.0.0.1:2379"], access=EtcdAccess(cert_file="x.crt"))
    with pytest.raises(EtcdSettingsError, match="cannot read the etcd password file"):
        EtcdClient(["127.0.0.1:2379"], access=EtcdAccess(username="u", password_file=str(tmp_path / "missing")))
    with pytest.raises(EtcdSettingsError, match="mix http"):
        EtcdClient(["http://127.0.0.1:2379"], access=EtcdAccess(ca_file=str(tmp_path / "ca.crt")))
