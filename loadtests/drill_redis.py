"""Redis-outage drill: the service keeps answering reads while its Redis is away, and recovers.

It starts a dedicated redis-server on a spare loopback port (never the shared 6379), the service
against it (`python -m sidrec serve`, engine process and all, as deployed), masks the items the
model recommends most (they stand for deleted items), then drives 8 clients of /v1/recommend.
After a warm-up, Redis is taken away for `--outage-s` seconds: `--mode pause` freezes it
(SIGSTOP: requests to it hang until the client timeout, the harsher case), `--mode restart`
shuts it down and starts it again on the same data (an append-only file). A monitor samples
/metrics and /readyz every 100 ms. Reported: requests and errors by status per phase (before,
during, after), latency percentiles, how long the service said it was degraded, the time from
Redis' return to the service reading from it again, the status of an admin write during the
outage, and whether any masked item was returned. Writes a JSON report (and the service's log
beside it); one JSON line last.

    python loadtests/drill_redis.py --outage-s 10 --out runs/drill-redis.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz import small_bundle, write_json  # noqa: E402

TOKEN = "drill-admin-" + os.urandom(6).hex()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}")


class DedicatedRedis:
    """A redis-server of our own on `port`, data in `workdir` (append-only, so a restart keeps it)."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port, self.workdir, self.proc = port, workdir, None
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed: the drill needs its own Redis (apt install redis-server)")
        self.exe = exe

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir),
                                      "--protected-mode", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, 10, f"redis-server on port {self.port}")

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return None if m is None else float(m.group(1))


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1)


def held_s(samples: list[tuple[float, object]], cond) -> float:
    """Seconds a sampled state satisfied `cond`: each sample's state holds until the next sample."""
    return round(sum(t1 - t0 for (t0, v), (t1, _) in zip(samples, samples[1:]) if cond(v)), 2)


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="sidrec-drill-redis-"))
    redis = DedicatedRedis(free_port(), work)
    server = None
    log_path = Path(args.out).with_suffix(".service.log")  # kept beside the report
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = log_path.open("w")
    try:
        bundle = Path(args.bundle) if args.bundle else small_bundle(work / "bundle", n_items=300)
        ids = json.loads((bundle / "item_ids.json").read_text())
        redis.start()
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "SIDREC_REDIS_URL": f"redis://127.0.0.1:{redis.port}/0",
               "SIDREC_REDIS_NAMESPACE": "drill", "SIDREC_ADMIN_TOKEN": TOKEN, "SIDREC_MASK_SYNC_INTERVAL_S": "0.5",
               "SIDREC_REDIS_TIMEOUT_S": str(args.redis_timeout_s), "SIDREC_NUM_THREADS": "1",
               "SIDREC_MAX_BEAM_WIDTH": "64", "SIDREC_DEFAULT_BEAM_WIDTH": "32", "SIDREC_LOG_LEVEL": "warning"}
        server = subprocess.Popen([sys.executable, "-m", "sidrec", "serve", "--bundle", str(bundle), "--port",
                                   str(port)], env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=base, timeout=30)
        wait_for(lambda: server.poll() is None and http.get("/readyz").status_code == 200, 180, "the service to be ready")

        rng = random.Random(args.seed)
        histories = [[rng.choice(ids) for _ in range(rng.randint(1, 8))] for _ in range(64)]
        # The items the model recommends most stand for deleted ones: masked, they must never come back.
        seen = Counter()
        for h in histories[:16]:
            seen.update(i["item_id"] for i in http.post("/v1/recommend", json={"history": h, "top_n": 10}).json()["items"])
        masked = [i for i, _ in seen.most_common(args.masked)]
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = http.post("/v1/admin/mask", json={"item_ids": masked, "masked": True}, headers=auth)
        r.raise_for_status()
        time.sleep(1.0)  # past the mask sync interval: every worker's mirror has them

        events: list[tuple[float, float, int, int]] = []  # (start, latency, status, masked items returned)
        samples: list[tuple[float, float | None]] = []  # (t, sidrec_index_degraded)
        ready: list[tuple[float, int]] = []  # (t, /readyz status)
        stop = threading.Event()
        masked_set = set(masked)

        def client(n: int) -> None:
            c = httpx.Client(base_url=base, timeout=30)
            r_ = random.Random(args.seed * 100 + n)
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    resp = c.post("/v1/recommend", json={"history": r_.choice(histories), "top_n": 10})
                    status = resp.status_code
                    bad = sum(i["item_id"] in masked_set for i in resp.json().get("items", [])) if status == 200 else 0
                except httpx.HTTPError:
                    status, bad = 0, 0  # connection-level failure
                events.append((t0, time.monotonic() - t0, status, bad))
            c.close()

        def monitor() -> None:  # the degraded gauge, every 100 ms
            c = httpx.Client(base_url=base, timeout=5)
            while not stop.is_set():
                t = time.monotonic()
                try:
                    samples.append((t, metric(c.get("/metrics").text, "sidrec_index_degraded")))
                except httpx.HTTPError:
                    samples.append((t, None))
                time.sleep(0.1)
            c.close()

        def readiness() -> None:  # separate: /readyz pings Redis, which hangs while Redis is paused
            c = httpx.Client(base_url=base, timeout=5)
            while not stop.is_set():
                t = time.monotonic()
                try:
                    ready.append((t, c.get("/readyz").status_code))
                except httpx.HTTPError:
                    ready.append((t, 0))
                time.sleep(0.1)
            c.close()

        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        threads += [threading.Thread(target=monitor), threading.Thread(target=readiness)]
        for t in threads:
            t.start()
        time.sleep(args.warmup_s)
        t_down = time.monotonic()
        if args.mode == "pause":
            redis.proc.send_signal(signal.SIGSTOP)
        else:
            redis.stop()
        time.sleep(args.outage_s / 2)
        w0 = time.monotonic()
        write = http.post("/v1/admin/mask", json={"item_ids": [ids[0]], "masked": True}, headers=auth)
        write_s = time.monotonic() - w0
        time.sleep(max(0.0, t_down + args.outage_s - time.monotonic()))
        if args.mode == "pause":
            redis.proc.send_signal(signal.SIGCONT)
        else:
            redis.start()
        t_back = time.monotonic()
        time.sleep(args.after_s)
        stop.set()
        for t in threads:
            t.join()
        fallback_total = metric(http.get("/metrics").text, "sidrec_index_fallback_lookups_total")
        http.close()
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        redis.stop()
        log_file.close()
        shutil.rmtree(work, ignore_errors=True)  # its Redis data and bundle

    def phase(t: float) -> str:
        return "before" if t < t_down else ("during" if t < t_back else "after")

    report: dict = {"drill": "redis_outage", "mode": args.mode, "outage_s": args.outage_s, "clients": args.clients,
                    "masked_items": len(masked)}
    for ph in ("before", "during", "after"):
        ev = [e for e in events if phase(e[0]) == ph]
        report[ph] = {"requests": len(ev), "by_status": dict(Counter(str(e[2]) for e in ev)),
                      "p50_ms": pct([e[1] for e in ev], 0.5), "p99_ms": pct([e[1] for e in ev], 0.99)}
    errors = Counter(str(e[2]) for e in events if e[2] != 200)
    after_ok = [t for t, d in samples if t >= t_back and d == 0]
    last_err_after = max((e[0] + e[1] for e in events if e[2] != 200 and e[0] + e[1] >= t_back), default=None)
    report.update({
        "requests": len(events), "errors_by_status": dict(errors), "errors": sum(errors.values()),
        "degraded_seen": any(d == 1 for _, d in samples),
        "degraded_s": held_s(samples, lambda d: d == 1),
        "fallback_lookups": fallback_total,
        "recovery_s": round(min(after_ok) - t_back, 2) if after_ok else None,
        "errors_after_return_until_s": None if last_err_after is None else round(last_err_after - t_back, 2),
        "readyz_unready_s": held_s(ready, lambda st: st != 200),
        "write_during_outage": {"status": write.status_code, "seconds": round(write_s, 2),
                                "code": (write.json().get("error") or {}).get("code") if write.status_code >= 400 else None},
        "masked_returned": sum(e[3] for e in events),
    })
    report["ok"] = (report["errors"] == 0 and report["masked_returned"] == 0 and report["degraded_seen"]
                    and report["recovery_s"] is not None and report["recovery_s"] <= 2.0
                    and report["write_during_outage"]["status"] == 503)
    report["service_log"] = str(log_path)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("pause", "restart"), default="pause")
    p.add_argument("--outage-s", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--after-s", type=float, default=6.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--masked", type=int, default=10, help="items masked (deleted) before the outage")
    p.add_argument("--redis-timeout-s", type=float, default=1.0, help="SIDREC_REDIS_TIMEOUT_S of the service")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bundle", help="bundle directory (default: a small random-weight bundle)")
    p.add_argument("--out", default="runs/drill-redis.json")
    args = p.parse_args(argv)
    report = run(args)
    write_json(Path(args.out), report)
    print(f"{'phase':<8}{'requests':>10}{'p50 ms':>9}{'p99 ms':>9}  statuses")
    for ph in ("before", "during", "after"):
        r = report[ph]
        print(f"{ph:<8}{r['requests']:>10}{str(r['p50_ms']):>9}{str(r['p99_ms']):>9}  {r['by_status']}")
    summary = {k: v for k, v in report.items() if k not in ("before", "during", "after")}
    summary.update({f"{ph}_requests": report[ph]["requests"] for ph in ("before", "during", "after")})
    summary["during_p99_ms"] = report["during"]["p99_ms"]
    summary["report"] = args.out
    print(json.dumps(summary))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
