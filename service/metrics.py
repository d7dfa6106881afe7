"""Prometheus metrics of one app instance, in its own `CollectorRegistry`.

Each `create_app` builds a fresh `ServiceMetrics`, so tests and several apps in one process never
share counters. With `--workers N` every worker exports its own series (scrape each pod/worker or
run one worker per container, as the k8s manifests do). This module only defines and renders
metrics; the middleware, batcher and index observe them.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BEAM_BUCKETS = (1, 10, 25, 50, 100, 200, 256, 512, 1024, 2048, 4096)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("sidrec_requests_total", "HTTP requests by endpoint and status.",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("sidrec_request_latency_seconds", "HTTP request latency.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("sidrec_queue_time_seconds", "Time a request waited before its engine call.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.engine_time = Histogram("sidrec_engine_call_seconds", "Duration of one engine call.", ["kind"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.engine_calls = Counter("sidrec_engine_calls_total", "Engine calls (batches) run.", ["kind"], registry=r)
        self.batch_size = Histogram("sidrec_batch_size", "Requests (users) per engine call.", ["kind"],
                                    buckets=SIZE_BUCKETS, registry=r)
        self.beams = Histogram("sidrec_beams_per_request", "Beam width asked for per recommendation.",
                               buckets=BEAM_BUCKETS, registry=r)
        self.queue_depth = Gauge("sidrec_queue_depth", "Jobs waiting for the engine.", registry=r)
        self.rejected = Counter("sidrec_rejected_total", "Requests refused before the engine.", ["reason"], registry=r)
        self.index_latency = Histogram("sidrec_index_lookup_seconds", "One inverse-index round trip (SID -> item id).",
                                       ["backend"], buckets=FAST_BUCKETS, registry=r)
        self.index_misses = Counter("sidrec_index_misses_total", "SIDs the inverse index could not map.", registry=r)
        self.masked_items = Gauge("sidrec_masked_items", "Items masked out of recommendations.", registry=r)
        self.catalogue_version = Gauge("sidrec_catalogue_version", "Catalogue version applied to this replica's engine.",
                                       registry=r)
        self.catalogue_caught_up = Gauge("sidrec_catalogue_caught_up", "1 while the catalogue follower is caught up.",
                                         registry=r)
        self.catalogue_resyncs = Gauge("sidrec_catalogue_resyncs", "Snapshot resyncs after a trimmed change log.",
                                       registry=r)
        self.catalogue_apply_errors = Gauge("sidrec_catalogue_apply_errors",
                                            "Catalogue changes the engine refused (logged).", registry=r)
        self.model = Info("sidrec_model", "The loaded bundle.", registry=r)

    def set_model(self, version: str, num_items: int, device: str, index_backend: str) -> None:
        self.model.info({"version": version, "num_items": str(num_items), "device": device,
                         "index_backend": index_backend})

    def watch_catalogue(self, follower) -> None:
        """Read the follower's state at scrape time (no bookkeeping on the hot path)."""
        self.catalogue_version.set_function(lambda: follower.applied)
        self.catalogue_caught_up.set_function(lambda: float(follower.caught_up))
        self.catalogue_resyncs.set_function(lambda: follower.resyncs)
        self.catalogue_apply_errors.set_function(lambda: follower.apply_errors)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when absent): used by tests and benchmarks."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else float(v)
