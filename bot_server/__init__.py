"""Run a bot of the mesh from a definition file, with optional Python handlers."""

from bot_server.bot import Bot, Turn
from bot_server.definition import BotDefinition, DefinitionError

__all__ = ["Bot", "BotDefinition", "DefinitionError", "Turn"]
