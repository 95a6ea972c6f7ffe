"""slowpoke's dialog for the fault suite (tests/test_faults.py), chosen by FAULT_MODE:

- `die_after_answer`: record the reservation (the message) in the store, then SIGKILL this process before the
  reply leaves it: a receiver that committed ownership and answered, but whose answer is lost.
- `slow_write` (default): log `slow_dialog_started`, wait FAULT_SECONDS (default 3), then record
  the reservation: a write the test can freeze the bot in the middle of.
"""

import asyncio
import os
import signal

from mbc.runtime.logs import get_logger

log = get_logger("fault_handlers")
REPLY = "Your safe deposit box is reserved."


def setup(bot):
    mode = os.environ.get("FAULT_MODE", "slow_write")

    @bot.on_intent("safe_deposit_box")
    async def reserve(turn):
        if mode == "die_after_answer":
            await turn.remember("reservation", turn.text)
            os.kill(os.getpid(), signal.SIGKILL)
        log.info("slow_dialog_started", conversation_id=turn.conversation_id)
        await asyncio.sleep(float(os.environ.get("FAULT_SECONDS", "3")))
        await turn.remember("reservation", turn.text)
        return REPLY
