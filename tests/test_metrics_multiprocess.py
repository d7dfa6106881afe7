"""Prometheus metrics add up across uvicorn workers (service/metrics.py, multiprocess mode).

Two levels: two plain processes recording into one PROMETHEUS_MULTIPROC_DIR (fast, exact: the
counters sum, the live-sum gauge drops a worker when it exits), and the real thing, `sidrec serve
--workers 2` on a loopback port, where whichever worker answers a scrape reports every worker's
requests, and a stale file left in the directory by an earlier run is not added in.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WRITER = r"""
import sys
from sidrec.service.metrics import ServiceMetrics
m = ServiceMetrics()
assert m.multiprocess
n, depth = int(sys.argv[1]), float(sys.argv[2])
for _ in range(n):
    m.requests.labels("/v1/recommend", "POST", "200").inc()
    m.latency.labels("/v1/recommend").observe(0.01)
m.queue_depth.set(depth)
m.set_model("v1", 300, "cpu", "redis")
print("ready", flush=True)
sys.stdin.readline()  # stay alive (a live worker) until the test closes stdin
"""

RENDER = r"""
from sidrec.service.metrics import ServiceMetrics
print(ServiceMetrics().render().decode())
"""


def sample(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return None if m is None else float(m.group(1))


def run_env(mp_dir: Path) -> dict[str, str]:
    return {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp_dir), "PYTHONPATH": str(ROOT)}


def render(mp_dir: Path) -> str:
    out = subprocess.run([sys.executable, "-c", RENDER], env=run_env(mp_dir), capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_two_processes_sum_in_one_exposition(tmp_path):
    mp = tmp_path / "mp"
    mp.mkdir()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(n), str(d)], env=run_env(mp), cwd=ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for n, d in ((3, 2), (4, 5))]
    try:
        for w in writers:
            assert w.stdout.readline().strip() == "ready"
        text = render(mp)
        rec = '{endpoint="/v1/recommend",method="POST",status="200"}'
        assert sample(text, "sidrec_requests_total", rec) == 7
        assert sample(text, "sidrec_request_latency_seconds_count", '{endpoint="/v1/recommend"}') == 7
        assert sample(text, "sidrec_queue_depth") == 7  # live workers' queues, summed
        assert sample(text, "sidrec_model_info",
                      '{device="cpu",index_backend="redis",num_items="300",version="v1"}') == 1
        writers[1].stdin.close()  # the second worker exits
        writers[1].wait(timeout=60)
        text = render(mp)
        assert sample(text, "sidrec_requests_total", rec) == 7  # a dead worker's counts still count
        assert sample(text, "sidrec_queue_depth") == 2  # its queue does not
    finally:
        for w in writers:
            if w.poll() is None:
                w.stdin.close()
                w.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def healthz_count(db: Path, scratch: Path) -> float:
    """One worker's /healthz count: its counter file alone, read by the multiprocess collector."""
    from prometheus_client import CollectorRegistry, multiprocess

    scratch.mkdir()
    (scratch / db.name).write_bytes(db.read_bytes())
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(scratch))
    v = registry.get_sample_value("sidrec_requests_total", {"endpoint": "/healthz", "method": "GET", "status": "200"})
    return v or 0.0


@pytest.mark.slow
def test_sidrec_serve_with_two_workers_adds_up(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from service_fixtures import make_bundle
    finally:
        sys.path.pop(0)
    bundle = make_bundle(tmp_path / "bundle", n_items=50)
    mp = tmp_path / "mp"
    mp.mkdir()
    (mp / "counter_999999.db").write_bytes(b"stale file of an earlier run")  # must be cleaned at start
    port = free_port()
    env = {**run_env(mp), "SIDREC_ENGINE_PROCESS": "false", "SIDREC_NUM_THREADS": "1", "SIDREC_WARMUP": "false",
           "SIDREC_LOG_LEVEL": "warning", "SIDREC_MAX_BEAM_WIDTH": "64", "SIDREC_DEFAULT_BEAM_WIDTH": "16"}
    env.pop("SIDREC_REDIS_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "sidrec", "serve", "--bundle", str(bundle), "--port", str(port),
                               "--workers", "2"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        pids: set[str] = set()
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                if get(base + "/readyz")[0] == 200:
                    pids = {p.stem.rsplit("_", 1)[1] for p in mp.glob("counter_*.db")}
                    if len(pids) >= 2:  # both workers up (each wrote its counter file)
                        break
            except OSError:
                pass
            time.sleep(0.3)
        assert not (mp / "counter_999999.db").exists()
        assert len(pids) == 2, f"expected two workers' files, found {sorted(pids)}"
        n = 60
        with ThreadPoolExecutor(8) as pool:  # concurrent connections: both workers take some
            statuses = list(pool.map(lambda _: get(base + "/healthz")[0], range(n)))
        assert statuses == [200] * n
        # The middleware counts a request after its response went out: let the last ones land.
        for _ in range(50):
            if sample(get(base + "/metrics")[1], "sidrec_requests_total",
                      '{endpoint="/healthz",method="GET",status="200"}') == n:
                break
            time.sleep(0.1)
        seen = []
        for _ in range(6):  # each scrape is answered by one worker or the other: all report the total
            status, text = get(base + "/metrics")
            assert status == 200
            seen.append(sample(text, "sidrec_requests_total", '{endpoint="/healthz",method="GET",status="200"}'))
        assert seen == [float(n)] * len(seen), seen
        per_worker = [healthz_count(f, tmp_path / f"only-{f.stem}") for f in sorted(mp.glob("counter_*.db"))]
        assert sum(per_worker) == n
        # Had one worker taken every request, any scrape would show the total even without the
        # multiprocess mode; that both took some is what makes the check above a real one.
        assert all(c > 0 for c in per_worker), per_worker
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_prepare_multiprocess_dir(monkeypatch, tmp_path):
    from sidrec.service.metrics import MULTIPROC_ENV, prepare_multiprocess_dir

    monkeypatch.setenv(MULTIPROC_ENV, "recorded")  # so that teardown restores the variable as it was ...
    monkeypatch.delenv(MULTIPROC_ENV)  # ... whatever prepare_multiprocess_dir sets below
    assert prepare_multiprocess_dir(1) is None and MULTIPROC_ENV not in os.environ  # one worker: in memory
    made = prepare_multiprocess_dir(2)  # none given: a fresh directory of its own
    assert made.is_dir() and not any(made.iterdir()) and os.environ[MULTIPROC_ENV] == str(made)
    made.rmdir()
    given = tmp_path / "mp"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"an earlier run")
    (given / "notes.txt").write_text("not ours")
    monkeypatch.setenv(MULTIPROC_ENV, str(given))
    assert prepare_multiprocess_dir(4) == given
    assert sorted(p.name for p in given.iterdir()) == ["notes.txt"]  # only the metric files go
    gone = tmp_path / "removed-since"
    monkeypatch.setenv(MULTIPROC_ENV, str(gone))  # inherited from a shell, its directory since removed
    assert prepare_multiprocess_dir(1) is None and gone.is_dir()  # made again: metrics would crash without it
