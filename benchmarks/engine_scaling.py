"""The engine alone (no HTTP) on a bundle: ms per call at batch 1..32 and beams 100 and 256, split
into prefill / decoder steps / beam step, and what that implies for the service's p99 target.

    .venv/bin/python benchmarks/engine_scaling.py [BUNDLE] [--threads 2] [--dtype bfloat16] [--reps 5]

With 32 closed-loop clients, latency is at least 32 / throughput, so the service's target
p99(32 clients) <= 4 x p50(1 client) needs throughput at batch 32 >= 8x that at batch 1 even with
free HTTP and perfect batching. This measures that bound directly: `p99_bound_over_p50` is
(ms per call at batch 32) / (ms per call at batch 1); the target needs it <= 4. Each config
reports the median and the best of `--reps` timed calls after two warm-up calls; the bounds use
the best (on a shared VM the median carries the neighbours' load, the best the code's cost).
Histories are 20 random catalogue items. With `--device cuda` each call ends with its answer on the
host (the phase split then shows only launch time: the GPU runs asynchronously). Without BUNDLE the service benchmark's synthetic bundle is built (or reused). To compare
two versions of the code, run this script from a worktree of each, alternately. Prints a table,
then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP workers sleep (see engine_bench.py)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCHES = (1, 8, 16, 32)
BEAMS = (100, 256)
TOP_N, HISTORY = 10, 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", nargs="?", help="bundle directory (default: a synthetic TIGER-size bundle)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "auto"))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu", help="cpu, cuda ...")
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--beams", type=int, nargs="+", default=list(BEAMS))
    ap.add_argument("--ab-cpu-kernel", action="store_true",
                    help="time every config twice, with the fused CPU kernels (kernels.cpu_fused) "
                         "and with torch ops, alternating call by call, and report the speedup")
    a = ap.parse_args()

    import torch

    from engine_bench import Timed
    from sidrec.model.engine import EngineOptions, RecommendEngine

    if a.bundle:
        bundle = Path(a.bundle)
    else:
        from service_bench import synthetic_bundle

        bundle = synthetic_bundle(ROOT / "build" / "bench-bundle-tiger", "tiger")
    torch.set_num_threads(a.threads)
    eng = RecommendEngine.from_path(str(bundle), EngineOptions(dtype=a.dtype, num_threads=a.threads, device=a.device))
    sync = torch.cuda.synchronize if eng.device.type == "cuda" else (lambda: None)
    phases = Timed(eng.decoder, eng.beam_step)  # the engine now searches through the timing wrapper
    eng.decoder, eng.beam_step = phases, phases.beam_step
    rng = random.Random(0)
    rows, out, ab = [], {}, {}
    variants = ("torch", "kernel") if a.ab_cpu_kernel else (None,)
    if a.ab_cpu_kernel:
        from sidrec.kernels import cpu_fused

        os.environ["SIDREC_CPU_KERNELS"] = "1"
        if not cpu_fused.available():
            raise SystemExit("--ab-cpu-kernel: the fused CPU kernels are not available here")

    def use(variant: str | None) -> None:
        if variant is not None:
            os.environ["SIDREC_CPU_KERNELS"] = "1" if variant == "kernel" else "0"

    for beam in a.beams:
        for b in a.batches:
            hist = [[rng.randrange(eng.num_items) for _ in range(HISTORY)] for _ in range(b)]
            for v in variants:
                use(v)
                for _ in range(2):
                    eng.recommend(hist, beam, TOP_N)
            times = {v: [] for v in variants}
            split = {v: {} for v in variants}
            for _ in range(a.reps):
                for v in variants:  # interleaved: drift on a shared host hits both alike
                    use(v)
                    phases.t = dict.fromkeys(phases.t, 0.0)
                    sync()
                    t0 = time.perf_counter()
                    eng.recommend(hist, beam, TOP_N).items.cpu()  # the answer on the host, as a caller needs it
                    times[v].append(time.perf_counter() - t0)
                    for k, x in phases.t.items():
                        split[v].setdefault(k, []).append(x)
            for v in variants:
                ms = statistics.median(times[v]) * 1000
                r = {"beam": beam, "batch": b, **({"variant": v} if v else {}), "ms_per_call": round(ms, 1),
                     "best_ms": round(min(times[v]) * 1000, 1), "rps": round(b / ms * 1000, 1),
                     **{f"{k}_ms": round(statistics.median(x) * 1000, 1) for k, x in split[v].items()}}
                rows.append(r)
                print(f"beam {beam:4d} batch {b:3d} {v or '':6s} {ms:7.1f} ms/call (best {r['best_ms']:.1f})  "
                      f"{r['rps']:7.1f} rps   " + "  ".join(f"{k} {r[f'{k}_ms']:.1f}" for k in ("prefill", "decoder", "beam_step")),
                      flush=True)
            if a.ab_cpu_kernel:
                ab[f"beam{beam}_batch{b}"] = round(min(times["torch"]) / min(times["kernel"]), 3)
                print(f"beam {beam:4d} batch {b:3d} kernel speedup (best of {a.reps}): {ab[f'beam{beam}_batch{b}']}x")
        for v in variants:
            by = {r["batch"]: r["best_ms"] for r in rows if r["beam"] == beam and r.get("variant") == v}
            if 1 in by and 32 in by:
                key = f"beam{beam}" + (f"_{v}" if v else "")
                out[key] = {"scaling_32_over_1": round(32 * by[1] / by[32], 2),
                            "p99_bound_over_p50": round(by[32] / by[1], 2)}
                print(f"beam {beam}{' ' + v if v else ''}: throughput at batch 32 = {out[key]['scaling_32_over_1']}x batch 1; "
                      f"p99(32 clients) / p50(1 client) >= {out[key]['p99_bound_over_p50']} (target <= 4)")
    print(json.dumps({"bench": "engine_scaling", "bundle": str(bundle), "device": a.device, "threads": a.threads,
                      "dtype": eng.options.dtype, "reps": a.reps, "rows": rows, "bounds": out,
                      **({"kernel_speedup": ab} if ab else {}),
                      "loadavg_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
