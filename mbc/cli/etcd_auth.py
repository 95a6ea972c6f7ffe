"""etcd users and roles for the mesh (`mbc etcd-auth setup`): one user per component, allowed only
the key prefixes it needs. The prefixes come from the modules that own the key layout.

| etcd user (and role)  | may                                                                  |
| --------------------- | -------------------------------------------------------------------- |
| `mbc-router`          | read `/mbc/v1/participants/`, `/mbc/v1/definitions/`, `/mbc/v1/groups/`; |
|                       | read and write `/mbc/v1/calibration/` (the calibration set)            |
| `mbc-store`           | read and write `/mbc/v1/context/` and `/mbc/v1/conversations/`       |
| `<bot_id>@<group>`    | read and write `/mbc/v1/participants/<group>/<bot_id>/` (its own     |
|                       | instances); read `/mbc/v1/participants/<group>/` (whether the owner  |
|                       | of a conversation is still registered) and `/mbc/v1/groups/<group>/`; |
|                       | read and write `/mbc/v1/definitions/<group>/<bot_id>` (its definition) |
| `root`                | everything; only for this command and `mbc group`                    |

Leases need no permission of their own in etcd 3.4, except that revoking one needs write access to
its keys: a bot can revoke only its own registration.
"""

from __future__ import annotations

import dataclasses
import secrets
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bot_server.definition import BotDefinition
from context_store.core import CONVERSATIONS
from context_store.core import PREFIX as CONTEXT_PREFIX
from discovery.errors import EtcdAuthFailed, EtcdError
from discovery.etcd_client import EtcdClient, KeyPermission
from discovery.groups import GROUPS_PREFIX, group_prefix
from discovery.keys import (
    CALIBRATION_PREFIX,
    DEFINITIONS_PREFIX,
    PARTICIPANTS_PREFIX,
    ROUTERS_PREFIX,
    bot_prefix,
    definition_key,
    group_participants_prefix,
)
from mbc.runtime.config import EtcdAccess

ROOT_USER = "root"
ROUTER_USER = "mbc-router"
STORE_USER = "mbc-store"


@dataclass(frozen=True)
class Grant:
    prefix: str
    permission: str
    """"read", "write" or "readwrite"."""
    exact: bool = False
    """On the key `prefix` alone, not on the keys under it."""


def bot_user(group: str, bot_id: str) -> str:
    bot_prefix(group, bot_id)  # validates both names
    return f"{bot_id}@{group}"


def component_grants(bots: Iterable[tuple[str, str]]) -> dict[str, tuple[Grant, ...]]:
    """The permissions of each component's user; `bots` are (group, bot_id) pairs."""
    grants: dict[str, tuple[Grant, ...]] = {
        ROUTER_USER: (
            Grant(PARTICIPANTS_PREFIX, "read"),
            Grant(DEFINITIONS_PREFIX, "read"),
            Grant(GROUPS_PREFIX, "read"),
            Grant(ROUTERS_PREFIX, "readwrite"),
            Grant(CALIBRATION_PREFIX, "readwrite"),  # read by every replica, seeded from --calibration
        ),
        STORE_USER: (Grant(CONTEXT_PREFIX, "readwrite"), Grant(CONVERSATIONS, "readwrite")),
    }
    for group, bot_id in bots:
        grants[bot_user(group, bot_id)] = (
            Grant(bot_prefix(group, bot_id), "readwrite"),
            Grant(group_participants_prefix(group), "read"),
            Grant(group_prefix(group), "read"),
            Grant(definition_key(group, bot_id), "readwrite", exact=True),
            Grant(ROUTERS_PREFIX, "read"),
        )
    return grants


def password_from(path: Path, create: bool) -> tuple[str, bool]:
    """The password in `path`; with `create`, a new random one is written there (mode 0600) when the
    file does not exist. Returns (password, whether it was created)."""
    if path.exists():
        password = path.read_text().rstrip("\r\n")
        if not password:
            raise ValueError(f"password file {path} is empty")
        return password, False
    if not create:
        raise ValueError(f"password file {path} does not exist")
    password = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(password + "\n")
    return password, True


async def apply(
    etcd: EtcdClient, grants: Mapping[str, tuple[Grant, ...]], passwords: Mapping[str, str], root_password: str | None
) -> list[str]:
    """Make etcd's users and roles match `grants` (a role per user, same name, exactly these
    permissions) with `passwords`, and return what changed.

    `etcd` is authenticated as root, or etcd has no auth yet: then `root_password` creates the root
    user and authentication is enabled last. Users and roles not in `grants` are left alone.
    """
    changes: list[str] = []
    users = set(await etcd.users())
    roles = set(await etcd.roles())
    for name, wanted in grants.items():
        if name not in roles:
            await etcd.add_role(name)
            changes.append(f"role {name} created")
        have = await etcd.role_permissions(name)
        want = {
            KeyPermission.on_key(g.prefix, g.permission) if g.exact else KeyPermission.on_prefix(g.prefix, g.permission)
            for g in wanted
        }
        for permission in sorted(have - want, key=str):
            await etcd.revoke_permission(name, permission)
            changes.append(f"role {name}: {permission} revoked")
        for permission in sorted(want - have, key=str):
            await etcd.grant_permission(name, permission)
            changes.append(f"role {name}: {permission} granted")
        if name in users:
            await etcd.change_password(name, passwords[name])
        else:
            await etcd.add_user(name, passwords[name])
            changes.append(f"user {name} created")
        if name not in await etcd.user_roles(name):
            await etcd.grant_role(name, name)
            changes.append(f"user {name}: role {name} granted")
    if root_password is not None:
        if ROOT_USER not in users:
            await etcd.add_user(ROOT_USER, root_password)
            changes.append("user root created")
        if "root" not in await etcd.user_roles(ROOT_USER):
            await etcd.grant_role(ROOT_USER, "root")
        await etcd.enable_auth()
        changes.append("authentication enabled")
    return changes


def parse_bot(spec: str) -> tuple[str, str]:
    """(group, bot_id) of "GROUP/BOT_ID" or of a bot definition file."""
    if spec.endswith((".yaml", ".yml")):
        definition = BotDefinition.from_file(spec)
        return definition.group, definition.bot_id
    group, sep, bot_id = spec.partition("/")
    if not sep:
        raise ValueError(f"--bot {spec!r}: give GROUP/BOT_ID or a definition .yaml file")
    bot_user(group, bot_id)
    return group, bot_id


async def run_setup(endpoints: list[str], tls: EtcdAccess, password_dir: str, root_password_file: str, bots: list[str]) -> int:
    """`mbc etcd-auth setup`: the exit status (0 done, 2 bad input, 1 etcd refused or unreachable).

    With a root password file etcd is entered as root; when etcd answers that it has no
    authentication yet (or there is no such file and it lets us in without a user) that password
    (made now when missing) becomes root's and authentication is enabled after the users.
    """
    directory = Path(password_dir)
    root_file = Path(root_password_file) if root_password_file else directory / f"{ROOT_USER}.password"
    created: list[Path] = []
    try:
        grants = component_grants(parse_bot(spec) for spec in bots)
        passwords = {}
        for user in grants:
            passwords[user], made = password_from(directory / f"{user}.password", create=True)
            if made:
                created.append(directory / f"{user}.password")
    except (OSError, ValueError) as e:
        print(f"mbc etcd-auth setup: {e}", file=sys.stderr)
        return 2
    anonymous = dataclasses.replace(tls, username="", password_file="")
    try:
        try:
            if not root_file.exists():
                raise EtcdAuthFailed("no root password file: try etcd without authentication")
            async with EtcdClient(
                endpoints, access=dataclasses.replace(tls, username=ROOT_USER, password_file=str(root_file))
            ) as etcd:
                changes = await apply(etcd, grants, passwords, None)
        except EtcdAuthFailed as e:
            if root_file.exists() and "not enabled" not in str(e):
                raise
            async with EtcdClient(endpoints, access=anonymous) as etcd:
                await etcd.users()  # fails unless etcd has no authentication yet
                root_password, made = password_from(root_file, create=True)
                if made:
                    created.append(root_file)
                changes = await apply(etcd, grants, passwords, root_password)
    except EtcdError as e:
        hint = "" if root_file.exists() else f" (etcd has authentication enabled? give root's password in {root_file})"
        print(f"mbc etcd-auth setup: {e}{hint}", file=sys.stderr)
        return 1
    for path in created:
        print(f"password written to {path}")
    for line in changes or ["nothing to change"]:
        print(line)
    for user, wanted in grants.items():
        print(f"{user}: {', '.join(f'{g.permission} {g.prefix}' + ('' if g.exact else '*') for g in wanted)}")
    return 0
