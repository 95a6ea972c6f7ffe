"""`mbc chat`: talk to the mesh from a terminal, seeing which bot answers and every transfer.

Lines are read from stdin (a terminal or a pipe); each is sent as a consumer message through
`mbc.client.gateway.Conversation`, which follows the owner of the conversation. `/quit` (or end of input)
ends the chat. Each message gets its own trace id, printed so that it can be looked up in the logs.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

import grpc

from mbc.cli.inspect import rating_name
from mbc.client.gateway import Conversation
from mbc.runtime import tracing
from mbc.runtime.config import TlsConfig
from mbc.v1 import bot_pb2


def _how(match: bot_pb2.MatchInfo) -> str:
    if not match.intent:
        return ""
    return f"intent {match.intent} ({rating_name(match.rating)}, {match.score:.2f})"


def describe(response: bot_pb2.RespondResponse, asked: str) -> list[str]:
    """Notes on what happened to one message, shown between brackets."""
    notes: list[str] = []
    chain = [asked]
    for reply in response.replies:
        if reply.bot_id and reply.bot_id != chain[-1]:
            chain.append(reply.bot_id)
    if response.owner.bot_id and response.owner.bot_id != chain[-1]:
        chain.append(response.owner.bot_id)
    outcome = response.outcome
    if outcome == bot_pb2.OUTCOME_TRANSFERRED:
        notes.append(
            f"transfer {' → '.join(chain)}: {_how(response.match) or 'no intent'}"
            + (f", transfer id {response.transfer_id[:8]}" if response.transfer_id else "")
        )
    elif outcome == bot_pb2.OUTCOME_ANSWERED:
        if response.match.intent and not response.match.rating:
            notes.append(f"{asked} goes on with intent {response.match.intent} (it was waiting for this answer)")
        else:
            how = _how(response.match)
            notes.append(f"{asked} answers: {how}" if how else f"{asked} answers (it was waiting for this answer)")
    elif outcome == bot_pb2.OUTCOME_CLARIFY:
        notes.append(f"{asked} is not sure which bot you mean and asks")
    elif outcome == bot_pb2.OUTCOME_FALLBACK:
        notes.append(f"no bot can take this: {response.owner.bot_id or asked}'s fallback")
    if response.owner.bot_id and response.owner.bot_id != asked:
        notes.append(f"the conversation now belongs to {response.owner.bot_id}")
    return notes


async def run_chat(
    entry: str,
    store: str = "",
    conversation_id: str = "",
    consumer_id: str = "terminal",
    timeout: float = 10.0,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    tls: TlsConfig = TlsConfig(),
) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty()

    def say(line: str = "") -> None:
        print(line, file=stdout, flush=True)

    async with Conversation(
        entry, conversation_id or None, consumer_id, timeout_seconds=timeout, store_address=store, tls=tls
    ) as chat:
        say(f"conversation {chat.conversation_id} (entry bot at {entry}{', store at ' + store if store else ''}); /quit to leave")
        while True:
            if interactive:
                print("you > ", end="", file=stdout, flush=True)
            line = await asyncio.to_thread(stdin.readline)
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit", "/q"):
                break
            if not interactive:
                say(f"you > {text}")
            asked = chat.owner_bot_id
            trace_id = tracing.new_trace_id()
            token = tracing.set_trace_id(trace_id)
            try:
                response = await chat.send(text)
            except grpc.aio.AioRpcError as e:
                say(f"    [error {e.code().name}: {e.details()}; trace {trace_id}]")
                continue
            finally:
                tracing.reset_trace_id(token)
            asked = asked or (response.replies[0].bot_id if response.replies else response.owner.bot_id)
            notes = describe(response, asked)
            notes.append(f"trace {trace_id}")
            say("    [" + "; ".join(notes) + "]")
            for reply in response.replies:
                say(f"  {reply.bot_id} > {reply.text}")
    say("bye")
    return 0
