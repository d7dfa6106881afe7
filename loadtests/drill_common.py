"""What the drills share: a synthetic bundle, the real server as a subprocess, RSS sampling, stats.

`Server` starts `python -m sidrec serve` from this checkout on a free loopback port (settings as
SIDREC_* variables, logs to a file), waits for /readyz, samples the RSS of the server and of its
engine child with psutil, and stops it (SIGINT, then SIGKILL) however the drill ends. A drill
never touches a remote host. This module is not a load generator (each drill drives its own
httpx clients) and not a benchmark: drills report what failed and how fast things recovered.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's sidrec, not an installed one
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402


def build_bundle(path: Path, n_items: int = 3000, seed: int = 0) -> Path:
    """A random-weight bundle in the real format: (16, 16, 16, 4) SIDs, 2+2 layers of width 64.
    Big enough that beam 1,024 is not clipped by the catalogue, small enough for a 2-core drill."""
    if (path / "config.json").is_file():
        return path
    import torch

    from sidrec.model.bundle import save_bundle
    from sidrec.model.config import ModelConfig, SIDLayout
    from sidrec.model.transformer import SIDTransformer

    layout = (16, 16, 16, 4)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = ModelConfig(SIDLayout(layout), d_model=64, n_heads=4, d_head=16, d_ff=256, n_enc_layers=2,
                      n_dec_layers=2)
    model = SIDTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3, generator=g)
    cells = torch.randperm(layout[0] * layout[1] * layout[2], generator=g)[:n_items]
    dedup = torch.randint(0, layout[3], (n_items,), generator=g)
    sid_map = torch.stack([cells // 256, (cells // 16) % 16, cells % 16, dedup])  # (L, N), unique rows
    return save_bundle(path, model, sid_map, [f"item{i}" for i in range(n_items)], overwrite=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The real service in a subprocess. Use as a context manager; `url`, `pid`, `engine_pid()`."""

    def __init__(self, bundle: Path, log_path: Path, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bundle, self.log_path = bundle, log_path
        self.env = dict(os.environ, SIDREC_LOG_LEVEL="warning", SIDREC_NUM_THREADS="1", **(env or {}))
        self.env.pop("SIDREC_REDIS_URL", None)
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.proc: subprocess.Popen | None = None
        self.peak_rss_mb = {"server": 0.0, "engine": 0.0, "total": 0.0}
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> "Server":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "sidrec", "serve", "--bundle", str(self.bundle),
                                      "--port", str(self.port)], cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        end = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the server was not ready within 180 s; see {self.log_path}")
            time.sleep(0.2)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self._sampling.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    child.kill()
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def engine_pid(self) -> int | None:
        """The engine child: the multiprocessing spawn child that is not the resource tracker."""
        try:
            for child in psutil.Process(self.pid).children():
                cmd = " ".join(child.cmdline())
                if "spawn_main" in cmd and "resource_tracker" not in cmd and child.status() != psutil.STATUS_ZOMBIE:
                    return child.pid
        except psutil.Error:
            pass
        return None

    def _sample(self) -> None:
        while not self._sampling.wait(0.2):
            try:
                server = psutil.Process(self.pid).memory_info().rss / 2**20
                epid = self.engine_pid()
                engine = psutil.Process(epid).memory_info().rss / 2**20 if epid else 0.0
            except psutil.Error:
                continue
            for k, v in (("server", server), ("engine", engine), ("total", server + engine)):
                self.peak_rss_mb[k] = max(self.peak_rss_mb[k], round(v, 1))


def metric_values(url: str, names: tuple[str, ...], buckets: tuple[str, ...] = ()) -> dict[str, float]:
    """Prometheus samples whose name starts with one of `names`, keyed `name{labels}`; histogram
    buckets only for the names in `buckets`."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=5).text):
        for s in fam.samples:
            if s.name.endswith("_bucket") and not s.name.startswith(buckets):
                continue
            if s.name.startswith(names) and not s.name.endswith("_created"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]  # nearest rank


def write_json(path: Path, obj: dict) -> Path:
    """Atomic write (temp + rename) of what a drill saw."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)
    return path


def histogram_quantile(before: dict, after: dict, name: str, labels: dict[str, str], q: float) -> float | None:
    """The upper bound of the bucket holding quantile q of a histogram's observations between two
    scrapes (as Prometheus' histogram_quantile, without interpolation: coarse, never optimistic)."""
    rows = []
    for key, v in after.items():
        if not key.startswith(name + "_bucket{"):
            continue
        lab = dict(kv.split("=", 1) for kv in key[len(name) + 8:-1].split(","))
        if all(lab.get(k) == v_ for k, v_ in labels.items()):
            rows.append((float(lab["le"]), v - before.get(key, 0.0)))
    rows.sort()
    if not rows or rows[-1][1] <= 0:
        return None
    total = rows[-1][1]
    return next(le for le, c in rows if c >= q / 100 * total)
