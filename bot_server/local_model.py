"""A bot's own intents matched by the encoder model: the optional in-bot model (`BotConfig.local_model`).

Loading it pulls torch (or onnxruntime), sentence-transformers and faiss into the bot process:
hundreds of MB and seconds of start. A bot uses it only when asked to; by default it matches its
own intents by words (bot_server/lexical.py) and leaves the model to the router.
"""

from __future__ import annotations

from collections.abc import Callable

from bot_server.bot import Bot
from mbc.runtime.config import BotConfig
from mbc.runtime.encoder import Encoder
from mbc.runtime.matching import IntentCatalog, IntentPhrases
from mbc.v1 import common_pb2


class ModelIntents:
    """The intents of one bot, matched by embedding similarity, rated per `config.ratings`."""

    def __init__(self, bot: Bot, config: BotConfig, encoder: Encoder | None = None) -> None:
        """`encoder`: one to share (not closed by `close`); default: a new one per `config.encoder`."""
        self.bot = bot
        self.config = config
        self.encoder = encoder or Encoder(config.encoder)
        self._owns_encoder = encoder is None
        self._catalog: IntentCatalog | None = None

    async def prepare(self) -> None:
        """Embed the bot's training phrases."""
        intents = [IntentPhrases(self.bot.bot_id, i.name, i.phrases) for i in self.bot.definition.intents]
        vectors = await self.encoder.aencode_phrases(IntentCatalog.phrases_of(intents))
        self._catalog = IntentCatalog(intents, vectors, self.encoder.dim)

    async def best(self, text: str) -> tuple[str, float, int]:
        """(intent, score, rating) of the best intent; intent "" when it is rated below GOOD."""
        if self._catalog is None:
            raise RuntimeError("the bot's intent catalog is not built: await prepare() first")
        query = (await self.encoder.aencode([text]))[0]
        ranked = self._catalog.rank(query, self.config.ratings, self.config.neighbours, limit=1)
        if not ranked:
            return "", 0.0, common_pb2.RATING_UNSPECIFIED
        top = ranked[0]
        return (top.intent if top.rating >= common_pb2.RATING_GOOD else ""), top.score, top.rating

    def close(self) -> None:
        if self._owns_encoder:
            self.encoder.close()


def model_intents(config: BotConfig) -> Callable[[Bot], ModelIntents]:
    """`ModelIntents` for each bot of a host, all sharing one encoder (it lives as long as the process)."""
    encoder = Encoder(config.encoder)
    return lambda bot: ModelIntents(bot, config, encoder)
