"""Makes slowpoke's dialog take SLOWPOKE_SECONDS (default 30): a receiver that hangs mid-transfer."""

import asyncio
import os


def setup(bot):
    @bot.on_intent("safe_deposit_box")
    async def slow(turn):
        await asyncio.sleep(float(os.environ.get("SLOWPOKE_SECONDS", "30")))
        return "Safe deposit boxes start at $60 a year."
