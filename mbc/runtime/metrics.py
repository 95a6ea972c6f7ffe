"""Prometheus metrics of every mbc server (prometheus-client, default registry).

Every `mbc.runtime.serving.GrpcServer` counts its RPCs through `ObservingInterceptor` (mbc/runtime/serving.py) and
serves `/metrics` over HTTP on `ServerConfig.metrics_port` (same host as the gRPC port; 0 picks a
free port, written to `<port file stem>.metrics-port` next to the port file and logged as
`metrics_serving`; -1 turns the endpoint off).

| metric | type | labels | what |
| --- | --- | --- | --- |
| `grpc_server_started_total` | counter | grpc_service, grpc_method | RPCs received |
| `grpc_server_handled_total` | counter | grpc_service, grpc_method, grpc_code | RPCs completed, by status code |
| `grpc_server_handling_seconds` | histogram | grpc_service, grpc_method | RPC latency |
| `mbc_router_matches_total` | counter | decision, rating, reason | Match answers: decision, rating of the best candidate ("NONE" without one), why NONE (UNSPECIFIED, or BOT_UNAVAILABLE: the best intent's bot has no live instance) |
| `mbc_router_participants` | gauge | group | live registered instances |
| `mbc_router_bots` | gauge | group | bots with at least one live instance |
| `mbc_router_index_phrases` | gauge | group | training phrases in the group's index |
| `mbc_router_index_intents` | gauge | group | intents (classes) in the group's index |
| `mbc_router_index_revision` | gauge | | etcd revision of the indexed participant snapshot |
| `mbc_router_groups_provisional` | gauge | | groups answered by a provisional model (no heads) while their heads train |
| `mbc_router_phrases_embedded` | counter | source | phrases this router needed a vector for since start, by who embedded them: `here` (its encoder) or `peer` (the replica that owns them) |
| `mbc_router_group_builds` | counter | how | group models built since start: `retrained`, `fetched` (heads trained by the replica that owns them), `restored` (its cache), `recalibrated`, `indexed`, `updated in place` |
| `mbc_encoder_batch_seconds` | histogram | stage | one micro-batch of concurrent calls on an encoder worker: `encode` (the model), `post` (the work done with its vectors: the router's scoring) |
| `mbc_encoder_batch_utterances` | histogram | | utterances encoded per micro-batch |
| `mbc_bot_transfers_total` | counter | outcome | sent, taken (the receiver took it), failed, loop_stopped (refused by the loop guard), fallback (no bot could take the message, or every transfer failed), unavailable (the best match's bot has no live instance: the group's unavailable message was sent), taken_over (a conversation whose owner instance was gone or unreachable taken over by this bot) |
| `mbc_bot_turns_total` | counter | rpc, outcome | Respond/Transfer results: ANSWERED, TRANSFERRED, FALLBACK, CLARIFY |

Health and reflection RPCs are counted like the others.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from pathlib import Path
from urllib.request import urlopen

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

RPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", ["grpc_service", "grpc_method"])
RPC_HANDLED = Counter(
    "grpc_server_handled_total", "RPCs completed on the server, by status code.", ["grpc_service", "grpc_method", "grpc_code"]
)
RPC_LATENCY = Histogram(
    "grpc_server_handling_seconds",
    "Time to handle an RPC, until its status.",
    ["grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)

ROUTER_MATCHES = Counter(
    "mbc_router_matches_total",
    "Match answers by decision, by rating of the best candidate and by reason of a NONE.",
    ["decision", "rating", "reason"],
)

ENCODER_BATCH_SECONDS = Histogram(
    "mbc_encoder_batch_seconds",
    "Time of one micro-batch on an encoder worker, by stage: encode (the model), post (the router's scoring).",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
ENCODER_BATCH_UTTERANCES = Histogram(
    "mbc_encoder_batch_utterances", "Utterances encoded per micro-batch.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)

BOT_TRANSFERS = Counter("mbc_bot_transfers_total", "Transfers by outcome (see mbc/runtime/metrics.py).", ["outcome"])
BOT_TURNS = Counter("mbc_bot_turns_total", "Respond and Transfer results by outcome.", ["rpc", "outcome"])
for _outcome in ("sent", "taken", "failed", "loop_stopped", "fallback", "unavailable", "taken_over"):
    BOT_TRANSFERS.labels(_outcome)  # reported as 0 before the first one, so that rates and alerts see them


def split_method(full_method: str) -> tuple[str, str]:
    """'/mbc.v1.Bot/Respond' → ('mbc.v1.Bot', 'Respond')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


class RouterCollector:
    """Gauges read from the live routers of this process at scrape time (participants, index size)."""

    def __init__(self) -> None:
        self._sources: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, core) -> None:
        with self._lock:
            self._sources.add(core)

    def remove(self, core) -> None:
        with self._lock:
            self._sources.discard(core)

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        participants = GaugeMetricFamily("mbc_router_participants", "Live registered bot instances.", labels=["group"])
        bots = GaugeMetricFamily("mbc_router_bots", "Bots with at least one live instance.", labels=["group"])
        phrases = GaugeMetricFamily("mbc_router_index_phrases", "Training phrases in the group's index.", labels=["group"])
        intents = GaugeMetricFamily("mbc_router_index_intents", "Intents in the group's index.", labels=["group"])
        revision = GaugeMetricFamily("mbc_router_index_revision", "etcd revision of the indexed participant snapshot.")
        embedded = CounterMetricFamily(
            "mbc_router_phrases_embedded", "Phrases embedded since start, by who embedded them (here, peer).", labels=["source"]
        )
        builds = CounterMetricFamily("mbc_router_group_builds", "Group models built since start, by how.", labels=["how"])
        provisional = GaugeMetricFamily(
            "mbc_router_groups_provisional", "Groups answered by a provisional model (no heads) while their heads train."
        )
        with self._lock:
            cores = list(self._sources)
        for core in cores:
            directory = core.directory
            if directory is None:
                continue
            revision.add_metric([], directory.revision)
            provisional.add_metric([], len(core.provisional))
            embedded.add_metric(["here"], core.embeddings.encoded)
            embedded.add_metric(["peer"], core.embeddings.fetched)
            for how, count in core.built.items():
                builds.add_metric([how], count)
            for group, members in directory.groups.items():
                participants.add_metric([group], sum(len(b.instances) for b in members.values()))
                bots.add_metric([group], len(members))
            for group, model in core.models.items():
                phrases.add_metric([group], len(getattr(model, "texts", ())))
                intents.add_metric([group], len(getattr(model, "classes", ())))
        return [participants, bots, phrases, intents, revision, embedded, builds, provisional]


ROUTER_COLLECTOR = RouterCollector()
REGISTRY.register(ROUTER_COLLECTOR)


class MetricsEndpoint:
    """The /metrics HTTP server of one process (a daemon thread)."""

    def __init__(self, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host)
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def metrics_port_file(port_file: str) -> str:
    """Where the metrics port is reported: `router.port` → `router.metrics-port` (same directory)."""
    return str(Path(port_file).with_suffix(".metrics-port")) if port_file else ""


def scrape_text(address: str, timeout: float = 5.0) -> str:
    """GET http://address/metrics (for tests and `mbc` tooling)."""
    with urlopen(f"http://{address}/metrics", timeout=timeout) as response:
        return response.read().decode()


def sample_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
    want = labels or {}
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in want.items()):
                total += sample.value
    return total
