"""Prometheus metrics of one app instance, in its own `CollectorRegistry`, added up across workers.

Each `create_app` builds a fresh `ServiceMetrics`, so tests and several apps in one process never
share counters. With `sidrec serve --workers N` (N > 1), uvicorn's workers are separate processes
and any of them may answer a scrape, so the metrics use prometheus_client's multiprocess mode:
`prepare_multiprocess_dir` (called by the CLI before the workers start) points
PROMETHEUS_MULTIPROC_DIR at a directory emptied at start; every worker's values live in files
there, and /metrics renders all of them through a `MultiProcessCollector`: counters and
histograms are sums over the workers (dead ones included, so totals never go backwards), the
queue depth is the sum over live workers, the masked-item count and the model info the maximum
over live workers. One worker (the default) keeps plain in-memory metrics.
This module only defines and renders metrics; the middleware, batcher and index observe them.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BEAM_BUCKETS = (1, 10, 25, 50, 100, 200, 256, 512, 1024, 2048, 4096)

CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir(workers: int) -> Path | None:
    """For N > 1 workers, before they start: set PROMETHEUS_MULTIPROC_DIR (the operator's, or a
    fresh temporary directory) and empty it of an earlier run's files, which would otherwise be
    added in. The workers inherit the variable; prometheus_client reads it when first imported
    there. One worker: nothing to do (None), beyond making sure a directory named in the
    environment exists."""
    if workers <= 1:
        if os.environ.get(MULTIPROC_ENV):  # set by the operator: prometheus_client writes there, so it must exist
            Path(os.environ[MULTIPROC_ENV]).mkdir(parents=True, exist_ok=True)
        return None
    if os.environ.get(MULTIPROC_ENV):
        d = Path(os.environ[MULTIPROC_ENV])
        d.mkdir(parents=True, exist_ok=True)
    else:
        d = Path(tempfile.mkdtemp(prefix="sidrec-metrics-"))
        atexit.register(shutil.rmtree, d, True)  # ours: removed when the server exits
    for f in d.glob("*.db"):
        f.unlink()
    os.environ[MULTIPROC_ENV] = str(d)
    return d


def multiprocess_mode() -> bool:
    """Whether this process records into PROMETHEUS_MULTIPROC_DIR (decided when prometheus_client
    was first imported, as the library does)."""
    return values.ValueClass is not values.MutexValue


class ServiceMetrics:
    def __init__(self) -> None:
        self.multiprocess = multiprocess_mode()
        if self.multiprocess:
            # A worker that exits cleanly takes its live gauges (queue depth, ...) out of the sums.
            atexit.register(multiprocess.mark_process_dead, os.getpid())
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
        self.queue_depth = Gauge("sidrec_queue_depth", "Jobs waiting for the engine.", registry=r,
                                 multiprocess_mode="livesum")
        self.rejected = Counter("sidrec_rejected_total", "Requests refused before the engine.", ["reason"], registry=r)
        self.index_latency = Histogram("sidrec_index_lookup_seconds", "One inverse-index round trip (SID -> item id).",
                                       ["backend"], buckets=FAST_BUCKETS, registry=r)
        self.index_misses = Counter("sidrec_index_misses_total", "SIDs the inverse index could not map.", registry=r)
        self.index_degraded = Gauge("sidrec_index_degraded", "1 while Redis is unreachable and reads are answered "
                                    "from the in-process fallback.", registry=r, multiprocess_mode="livemax")
        self.index_fallback = Counter("sidrec_index_fallback_lookups_total",
                                      "Lookups answered from the in-process fallback (Redis unreachable).", registry=r)
        self.masked_items = Gauge("sidrec_masked_items", "Items masked out of recommendations.", registry=r,
                                  multiprocess_mode="livemax")
        # An info-style gauge (value 1 on the loaded bundle's labels): prometheus_client's Info
        # does not work in multiprocess mode; this gives the same `sidrec_model_info` series.
        self.model = Gauge("sidrec_model_info", "The loaded bundle.", ["version", "num_items", "device", "index_backend"],
                           registry=r, multiprocess_mode="livemax")
        self._model_labels: tuple[str, ...] | None = None
        # Engine watchdog (service.watchdog) and work-based admission (service.batcher).
        self.engine_up = Gauge("sidrec_engine_up", "1 while the engine answers; 0 from a detected fault to its restart.",
                               registry=r, multiprocess_mode="livemin")
        self.engine_faults = Counter("sidrec_engine_faults_total", "Engine faults detected, by kind (hung, dead).",
                                     ["kind"], registry=r)
        self.engine_restarts = Counter("sidrec_engine_restarts_total", "Engine restarts, by outcome (ok, failed).",
                                       ["outcome"], registry=r)
        self.engine_restart_time = Histogram("sidrec_engine_restart_seconds", "Spawn + load + warm-up of a new engine.",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.engine_failed_requests = Counter("sidrec_engine_failed_requests_total",
                                              "Requests answered 503 because the engine was hung, dead or restarting.",
                                              registry=r)
        self.queue_work = Gauge("sidrec_queue_work", "Work units (beams, scored candidates) waiting for the engine.",
                                registry=r, multiprocess_mode="livesum")
        # The living catalogue (service.catalogue_follow).
        self.catalogue_version = Gauge("sidrec_catalogue_version", "Catalogue version applied to this replica's engine.",
                                       registry=r, multiprocess_mode="livemin")
        self.catalogue_caught_up = Gauge("sidrec_catalogue_caught_up", "1 while the catalogue follower is caught up.",
                                         registry=r, multiprocess_mode="livemin")
        self.catalogue_resyncs = Gauge("sidrec_catalogue_resyncs", "Snapshot resyncs after a trimmed change log.",
                                       registry=r, multiprocess_mode="livesum")
        self.catalogue_apply_errors = Gauge("sidrec_catalogue_apply_errors",
                                            "Catalogue changes the engine refused (logged).", registry=r,
                                            multiprocess_mode="livesum")

    def set_model(self, version: str, num_items: int, device: str, index_backend: str) -> None:
        labels = (version, str(num_items), device, index_backend)
        if self._model_labels is not None and self._model_labels != labels:
            # 0, not removed: a removed series would linger in a worker's multiprocess file
            self.model.labels(*self._model_labels).set(0)
        self.model.labels(*labels).set(1)
        self._model_labels = labels

    def watch_catalogue(self, follower) -> None:
        """Read the follower's state at scrape time (no bookkeeping on the hot path)."""
        self.catalogue_version.set_function(lambda: follower.applied)
        self.catalogue_caught_up.set_function(lambda: float(follower.caught_up))
        self.catalogue_resyncs.set_function(lambda: follower.resyncs)
        self.catalogue_apply_errors.set_function(lambda: follower.apply_errors)

    def render(self) -> bytes:
        """The exposition: this app's registry, or with several workers every worker's files."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when absent): used by tests and benchmarks."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else float(v)
