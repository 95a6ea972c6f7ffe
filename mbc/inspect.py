"""Human-readable views of the mesh for the CLI."""

from __future__ import annotations

import grpc

from mbc.channels import ChannelPool
from mbc.v1 import common_pb2, router_pb2


def rating_name(rating: int) -> str:
    return common_pb2.Rating.Name(rating).removeprefix("RATING_").replace("_", " ")


def format_candidates(candidates) -> str:
    if not candidates:
        return "  (no candidates)"
    rows = [f"  {'bot':<20} {'intent':<28} {'score':>6}  {'rating':<10} best phrase"]
    for c in candidates:
        rows.append(f"  {c.bot_id:<20} {c.intent:<28} {c.score:6.3f}  {rating_name(c.rating):<10} {c.matched_phrase!r}")
    return "\n".join(rows)


async def print_match(router: str, text: str, bot: str, group: str, n: int) -> int:
    pool = ChannelPool()
    try:
        response = await pool.router(router).Match(
            router_pb2.MatchRequest(text=text, bot_id=bot, group=group, max_candidates=n), timeout=10
        )
    except grpc.aio.AioRpcError as e:
        print(f"mbc match: {e.code().name}: {e.details()}")
        return 1
    finally:
        await pool.close()
    print(f"{text!r}  (index revision {response.index_revision})")
    print(format_candidates(response.candidates))
    return 0
