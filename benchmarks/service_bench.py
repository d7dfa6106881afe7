"""Service throughput/latency sweep: HTTP at 1, 8, 32 clients x beam 100, 256, batching on vs off,
and the engine alone (no HTTP) at the batch sizes the batcher formed — all in one run.

    .venv/bin/python benchmarks/service_bench.py [BUNDLE] [--threads 2] [--seconds 6] [--device cuda]

The server is the real app under uvicorn in a subprocess on 127.0.0.1 (one worker, the CLI's
`serve`); the clients are keep-alive connections of a minimal asyncio HTTP/1.1 client in this
process, each sending its next request when the last answers (closed loop; cheap enough not to be
the bottleneck).
Each config first runs `--warmup` seconds at its full concurrency, untimed, then is measured in
steady state, bounded by a request count AND a time cap; the slowest request of the cold start
(the first wave of clients at an idle server) is reported beside it as `first_wave_ms`. Without BUNDLE a
random-weight bundle (12,101 items, 256x256x256 + dedup; `--model small` by default, `--model tiger`
for the TIGER size) is built once under build/bench-bundle-<model>. Prints a table, then one JSON line with rps, p50, p99 per
config and the ratios the targets need:
  service@32 (batching on) / engine throughput at the batch size formed  >= 0.8
    (against the engine alone, timed in this process in every round right after the service ran
    that beam, at the batch size the batcher formed; and against the server's own engine, requests
    per engine-second from its metrics in the same window, which drift on a shared host cannot bias)
  batching on / off at 32 clients                                       >= 2
  p99@32 (batching on) / p50@1                                          <= 4
This is a script, not a test; it measures ratios within one run on one machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONCURRENCY = (1, 8, 32)
BEAMS = (100, 256)
TOP_N = 10
HISTORY = 20


MODEL_SIZES = {
    # TIGER/GRID size: 4+4 layers, d_model 128, 6 heads of 64, d_ff 1024 (~50 ms/request at beam 256, 1 core)
    "tiger": dict(d_model=128, n_heads=6, d_head=64, d_ff=1024, n_enc_layers=4, n_dec_layers=4),
    # ~8x cheaper: lets the whole sweep fit in ~2 minutes on a shared 2-core CPU
    "small": dict(d_model=64, n_heads=4, d_head=16, d_ff=256, n_enc_layers=2, n_dec_layers=2),
}


def synthetic_bundle(path: Path, size: str = "small", n_items: int = 12_101, seed: int = 0) -> Path:
    import torch

    from sidrec.model.bundle import save_bundle
    from sidrec.model.config import ModelConfig, SIDLayout
    from sidrec.model.transformer import SIDTransformer

    if (path / "config.json").is_file():
        return path
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layout = SIDLayout((256, 256, 256, 4))
    model = SIDTransformer(ModelConfig(layout, **MODEL_SIZES[size]))
    # RQ-style codes: clustered first level, so the trie is not uniformly bushy
    c0 = torch.randint(0, 64, (n_items * 2,), generator=g) * 4 % 256
    cells = torch.stack([c0, torch.randint(0, 256, (n_items * 2,), generator=g),
                         torch.randint(0, 256, (n_items * 2,), generator=g)], 1)
    cells = torch.unique(cells, dim=0)[torch.randperm(len(torch.unique(cells, dim=0)), generator=g)[:n_items]]
    sid_map = torch.cat([cells, torch.zeros(n_items, 1, dtype=torch.int64)], 1).t().contiguous()
    return save_bundle(path, model, sid_map, [f"S{i:07d}" for i in range(n_items)], overwrite=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, port: int, batching: bool, threads: int, dtype: str,
                 device: str = "cpu") -> subprocess.Popen:
    env = dict(os.environ, SIDREC_MAX_BEAM_WIDTH="256", SIDREC_DEFAULT_BEAM_WIDTH="100", SIDREC_MAX_BATCH_SIZE="32",
               SIDREC_MAX_QUEUE_SIZE="512", SIDREC_LOG_LEVEL="warning", OMP_NUM_THREADS=str(threads),
               SIDREC_DTYPE=dtype, SIDREC_DEVICE=device)
    env.pop("SIDREC_REDIS_URL", None)
    cmd = [sys.executable, "-m", "service", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
           "--port", str(port), "--num-threads", str(threads)] + ([] if batching else ["--no-batching"])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise RuntimeError("server did not become ready within 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def histories(item_ids: list[str], n: int, seed: int = 0) -> list[list[str]]:
    rnd = random.Random(seed)
    return [rnd.sample(item_ids, HISTORY) for _ in range(n)]


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> int:
    """One keep-alive HTTP/1.1 POST; returns the status. uvicorn always sends Content-Length."""
    writer.write(raw)
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def sweep_one(url: str, concurrency: int, beam: int, hist: list[list[str]], max_requests: int,
                    seconds: float, warmup: float = 1.0) -> dict:
    """Closed loop: `concurrency` connections, each posting its next request when the last answers.

    The clients run `warmup` seconds at full concurrency before the measured window starts (they
    keep running through it: the window sees the steady state, not the cold start); only requests
    started inside the window are timed. The cold start is reported apart: `first_wave_ms` is the
    slowest of the first `concurrency` requests, a burst of that many clients arriving at an idle
    server. A minimal asyncio HTTP/1.1 client rather than httpx: on a 2-core host shared with the
    server, httpx's ~2 ms of client CPU per request made the client the bottleneck at 32 connections.
    """
    host, port = url.split("//")[1].split(":")
    bodies = [json.dumps({"history": h, "top_n": TOP_N, "beam_width": beam}).encode() for h in hist]
    raws = [b"POST /v1/recommend HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (host.encode(), len(b), b) for b in bodies]
    lat: list[float] = []
    first_wave: list[float] = []
    errors = 0
    counter = iter(range(10 ** 9))
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(concurrency)]
    try:
        t_start = time.perf_counter()
        t_measure = t_start + warmup
        t_end = t_measure + seconds
        measured = 0

        async def worker(reader, writer) -> None:
            nonlocal errors, measured
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                timed = t0 >= t_measure
                if timed:
                    if measured >= max_requests:
                        return
                    measured += 1
                i = next(counter)
                status = await _post(reader, writer, raws[i % len(raws)])
                dt = time.perf_counter() - t0
                if i < concurrency:
                    first_wave.append(dt)
                if not timed:
                    continue
                if status == 200:
                    lat.append(dt)
                else:
                    errors += 1

        await asyncio.gather(*[worker(r, w) for r, w in conns])
        wall = time.perf_counter() - t_measure
    finally:
        for _, w in conns:
            w.close()
    return {"lat": lat, "errors": errors, "wall": wall, "first_wave": max(first_wave, default=0.0)}


def summarize(runs: list[dict]) -> dict:
    """Pool the rounds of one config: rps = requests / wall over all rounds, percentiles over all latencies."""
    lat = sorted(x for r in runs for x in r["lat"])
    wall = sum(r["wall"] for r in runs)
    q = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else None  # noqa: E731
    return {"requests": len(lat), "errors": sum(r["errors"] for r in runs), "rps": round(len(lat) / wall, 2),
            "p50_ms": q(0.5), "p99_ms": q(0.99), "mean_ms": round(statistics.fmean(lat) * 1000, 1) if lat else None,
            "rps_per_round": [round(len(r["lat"]) / r["wall"], 1) for r in runs],
            "first_wave_ms": round(max(r["first_wave"] for r in runs) * 1000, 1)}


def batch_stats(url: str) -> tuple[float, float, float]:
    """(requests, calls, engine seconds) of the server's recommend calls so far, from its metrics."""
    import httpx

    want = {'sidrec_batch_size_sum{kind="recommend"}': 0, 'sidrec_batch_size_count{kind="recommend"}': 1,
            'sidrec_engine_call_seconds_sum{kind="recommend"}': 2}
    out = [0.0, 0.0, 0.0]
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        name = line.split(" ")[0]
        if name in want:
            out[want[name]] = float(line.split()[-1])
    return out[0], out[1], out[2]


class EngineAlone:
    """The bundle's engine in this process (no HTTP), timed at given (beam, batch) points."""

    def __init__(self, bundle: Path, threads: int, dtype: str, hist_ids: list[list[str]], device: str = "cpu"):
        import torch

        from sidrec.model.engine import EngineOptions, RecommendEngine

        torch.set_num_threads(threads)
        self.engine = RecommendEngine.from_path(str(bundle), EngineOptions(num_threads=threads, dtype=dtype,
                                                                            device=device))
        self.hist = [self.engine.to_internal(h)[0] for h in hist_ids]

    def time(self, beam: int, b: int, seconds: float) -> tuple[int, float]:
        """(requests, seconds) of back-to-back calls of batch b for about `seconds`."""
        batches = [[self.hist[(j * b + i) % len(self.hist)] for i in range(b)] for j in range(16)]
        # The first calls at a new shape are several times slower (oneDNN/allocator warm-up), as
        # they are for the server, which the sweep warms with the same traffic: warm for ~1 s.
        n, t0 = 0, time.perf_counter()
        while n < 3 or (time.perf_counter() - t0 < 1.0 and n < 50):
            self.engine.recommend(batches[n % 16], beam, TOP_N, exclude=batches[n % 16])
            n += 1
        n, t0 = 0, time.perf_counter()
        while n < 3 or (time.perf_counter() - t0 < seconds and n < 200):
            res = self.engine.recommend(batches[n % 16], beam, TOP_N, exclude=batches[n % 16])
            n += 1
        res.items.cpu()  # on a GPU, wait for the queued work (the server's answers read it back too)
        return n * b, time.perf_counter() - t0


def plot_sweep(results: list[dict], ratios: dict, path: Path) -> Path:
    """Per beam width: p50/p99 latency and throughput against clients, batching on and off, with
    the p99 target (4x the single-client p50) drawn in. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, len(BEAMS), figsize=(5 * len(BEAMS), 6.5), sharex=True, squeeze=False)
    for col, beam in enumerate(BEAMS):
        lat, thr = axes[0][col], axes[1][col]
        for batching, style in ((True, "-"), (False, "--")):
            rows = sorted((r for r in results if r["beam"] == beam and r["batching"] == batching),
                          key=lambda r: r["concurrency"])
            c = [r["concurrency"] for r in rows]
            tag = "batching on" if batching else "batching off"
            lat.plot(c, [r["p50_ms"] for r in rows], style, marker="o", color="C0", label=f"p50, {tag}")
            lat.plot(c, [r["p99_ms"] for r in rows], style, marker="o", color="C3", label=f"p99, {tag}")
            thr.plot(c, [r["rps"] for r in rows], style, marker="o", color="C2", label=tag)
        p50_1 = next(r["p50_ms"] for r in results if r["beam"] == beam and r["batching"] and r["concurrency"] == 1)
        lat.axhline(4 * p50_1, color="grey", lw=0.8, ls=":", label="p99 target (4x p50 at 1 client)")
        lat.set_title(f"beam {beam}: p99@32 / p50@1 = {ratios[f'beam{beam}']['p99_at32_over_p50_at1']}")
        lat.set_ylabel("latency (ms)")
        lat.set_yscale("log")
        thr.set_ylabel("requests/s")
        thr.set_xlabel("concurrent clients")
        thr.set_xscale("log", base=2)
        thr.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
        lat.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        for ax in (lat, thr):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("sidrec service sweep (closed loop, steady state)")
    from sidrec.figures import save_figure

    return save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", nargs="?", help="bundle directory (default: a synthetic TIGER-sized one)")
    ap.add_argument("--model", choices=sorted(MODEL_SIZES), default="small",
                    help="size of the synthetic bundle built when no BUNDLE is given")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and the engine-alone run "
                    "(1: on a shared 2-core host, 2 OpenMP threads stall whenever one is descheduled)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="engine dtype of the servers and the engine-alone run (bfloat16 pays on CPUs with AMX)")
    ap.add_argument("--device", default="cpu", help="engine device of the servers and the engine-alone run (cpu, cuda)")
    ap.add_argument("--seconds", type=float, default=5.0, help="time cap per config and round (measured window)")
    ap.add_argument("--plot", type=Path, help="also draw latency and throughput against clients into this PNG")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds each config runs at full concurrency "
                    "before its measured window (steady state; the cold start is reported as first_wave_ms)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of the whole sweep (pooled)")
    ap.add_argument("--max-requests", type=int, default=96, help="request cap per config at 32 clients "
                    "(scaled down for fewer clients)")
    a = ap.parse_args()
    bundle = Path(a.bundle) if a.bundle else synthetic_bundle(ROOT / "build" / f"bench-bundle-{a.model}", a.model)
    item_ids = json.loads((bundle / "item_ids.json").read_text())
    hist = histories(item_ids, 512)
    # Both servers run side by side (an idle one costs nothing) and every config is measured on
    # and off back to back, so load drifting on a shared host biases neither side.
    servers = {}
    try:
        for batching in (True, False):
            port = free_port()
            servers[batching] = (start_server(bundle, port, batching, a.threads, a.dtype, a.device),
                                f"http://127.0.0.1:{port}")
        alone = EngineAlone(bundle, a.threads, a.dtype, hist, a.device)
        raw: dict[tuple, list] = {}
        batches: dict[tuple, list] = {}
        eng_runs: dict[tuple, list] = {}  # (beam, "1" | "formed") -> [(batch, requests, seconds)] over rounds
        for rnd in range(a.rounds):
            for beam in BEAMS:
                for c in CONCURRENCY:
                    for batching in (True, False):
                        url = servers[batching][1]
                        s0, n0, e0 = batch_stats(url)
                        cap = max(16, a.max_requests * c // 32) if c > 1 else 24
                        run = asyncio.run(sweep_one(url, c, beam, hist, cap, a.seconds, a.warmup))
                        s1, n1, e1 = batch_stats(url)
                        raw.setdefault((batching, beam, c), []).append(run)
                        batches.setdefault((batching, beam, c), []).append((s1 - s0, n1 - n0, e1 - e0))
                # The engine alone, right after the service ran it (the servers idle meanwhile), at
                # the batch size the batcher formed in this run so far: the two throughputs are
                # measured minutes apart at most, not a whole sweep apart.
                s_, n_, _ = batches[(True, beam, 32)][-1]
                for kind, b in (("1", 1), ("formed", max(1, round(s_ / n_)) if n_ else 1)):
                    eng_runs.setdefault((beam, kind), []).append((b, *alone.time(beam, b, min(a.seconds, 3.0))))
            print(f"round {rnd + 1}/{a.rounds} done", flush=True)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    results = []
    for (batching, beam, c), runs in raw.items():
        r = summarize(runs)
        s_, n_, e_ = map(sum, zip(*batches[(batching, beam, c)]))
        # The server's own engine, timed per call in the same run: requests per engine-second.
        r.update(batching=batching, concurrency=c, beam=beam, mean_batch=round(s_ / n_, 2) if n_ else None,
                 engine_rps_in_server=round(s_ / e_, 2) if e_ else None)
        results.append(r)
        print(f"batching={'on ' if batching else 'off'} beam={beam:4d} clients={c:3d}  rps={r['rps']:8.2f}  "
              f"p50={r['p50_ms']:8.1f} ms  p99={r['p99_ms']:8.1f} ms  batch={r['mean_batch']}  "
              f"n={r['requests']} err={r['errors']}  first wave {r['first_wave_ms']} ms  rounds={r['rps_per_round']}",
              flush=True)
    by = {(r["batching"], r["beam"], r["concurrency"]): r for r in results}
    eng = {}
    for (beam, kind), runs in sorted(eng_runs.items()):
        sizes, n_req, secs = zip(*runs)
        calls = sum(n / b for b, n in zip(sizes, n_req))
        eng[(beam, kind)] = {"beam": beam, "batch": round(sum(n_req) / calls, 1), "batches": list(sizes),
                             "ms_per_call": round(sum(secs) / calls * 1000, 1), "rps": round(sum(n_req) / sum(secs), 2)}
    for e in eng.values():
        print(f"engine alone beam={e['beam']:4d} batch={e['batch']:5.1f} (per round {e['batches']})  "
              f"{e['ms_per_call']:8.1f} ms/call  rps={e['rps']:8.2f}")
    ratios = {}
    for beam in BEAMS:
        on32, off32, on1 = by[(True, beam, 32)], by[(False, beam, 32)], by[(True, beam, 1)]
        ratios[f"beam{beam}"] = {
            "service32_over_engine": round(on32["rps"] / eng[(beam, "formed")]["rps"], 3),
            "engine_batch": eng[(beam, "formed")]["batch"],
            # The same ratio against the server's own engine time (same run, same moments): the
            # share of the engine's throughput that HTTP, JSON, queueing and the index leave.
            "service32_over_engine_in_server": round(on32["rps"] / on32["engine_rps_in_server"], 3),
            "batching_on_over_off_at32": round(on32["rps"] / off32["rps"], 3) if off32["rps"] else None,
            "p99_at32_over_p50_at1": round(on32["p99_ms"] / on1["p50_ms"], 3),
        }
        print(f"beam {beam}: " + ", ".join(f"{k}={v}" for k, v in ratios[f'beam{beam}'].items()))
    targets = {"service32_over_engine": ">=0.8", "batching_on_over_off_at32": ">=2", "p99_at32_over_p50_at1": "<=4"}
    if a.plot:
        print(f"plot: {plot_sweep(results, ratios, a.plot)}", flush=True)
    print(json.dumps({"bench": "service", "bundle": str(bundle), "device": a.device, "threads": a.threads,
                      "dtype": a.dtype, "rounds": a.rounds, "warmup_s": a.warmup, "seconds": a.seconds,
                      "configs": results,
                      "engine": list(eng.values()), "ratios": ratios, "targets": targets}))


if __name__ == "__main__":
    main()
