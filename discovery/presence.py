"""Whether a bot instance is still in the mesh: its registration is alive in etcd."""

from __future__ import annotations

from discovery.etcd_client import EtcdClient
from discovery.keys import bot_prefix, participant_key
from mbc.v1 import common_pb2


async def is_registered(client: EtcdClient, group: str, bot: common_pb2.BotRef) -> bool:
    """Whether `bot` has a live registration in `group`: its own instance's key when the ref names
    an instance, else any instance of the bot. A ref that cannot be a registration is not one.

    The key lives as long as the instance's lease: False means the instance stopped, died, or was
    cut off (frozen, partitioned) for longer than its lease TTL. Raises EtcdError when etcd
    cannot be asked."""
    try:
        if bot.instance_id:
            return await client.get(participant_key(group, bot.bot_id, bot.instance_id)) is not None
        return await client.count_prefix(bot_prefix(group, bot.bot_id)) > 0
    except ValueError:
        return False
