"""The prepared GPU check: one script, run on a CUDA machine, done in under ~5 minutes.

What it does, in order (each part reports and carries on if it fails; the JSON says which):
1. kernel: `beam_step_triton` against `beam_step_reference` on the GPU, on fresh random inputs
   over a 1M-item trie (dense and CSR levels, B = 1 and 64, beams up to 4096, widths,
   exclusions, masks): n_valid equal, scores within 1e-4, and how many picks differ (only
   rounding near-ties may). Then both are timed per step (CUDA events, median).
2. engine: a random-weight TIGER-sized bundle (4+4 layers, d_model 128, 6 heads of 64, d_ff
   1024; SIDs 3 x 256 + dedup) for each catalogue size, loaded by `model.engine.RecommendEngine`
   with the Triton beam step; p50 / p99 ms per call and per request at beam 256 and 1000,
   batch 1 and 64, with a 20-item history:
   - eager: `engine.recommend` (host-side history encoding included);
   - cuda_graph: the whole `beam_search` (prefill + L decode steps + L beam steps) captured once
     per (batch, beam) with static shapes - it has no host sync inside - then replayed after
     copying the new histories into the static input buffers;
   - if capture fails, `torch.compile(mode="reduce-overhead")` of the decoder step instead,
     labelled as such.
3. The last stdout line is one JSON document (also written to --out when given).

It is not a test (tests/test_beam_step.py is, in the Triton interpreter) nor a CPU benchmark.

    python benchmarks/gpu_check.py                      # on the GPU machine, from the repo root
    python benchmarks/gpu_check.py --dry-run            # CPU, tiny sizes, Triton interpreter (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="sidrec GPU check: Triton beam step vs reference, engine latency")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny sizes, TRITON_INTERPRET=1: checks the script runs")
    ap.add_argument("--items", type=int, nargs="+", default=[12_000, 1_000_000])
    ap.add_argument("--beams", type=int, nargs="+", default=[256, 1000])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--reps", type=int, default=30, help="timed calls per configuration (batch 1; fewer at batch 64)")
    ap.add_argument("--budget-s", type=float, default=270.0, help="skip remaining engine configs after this")
    ap.add_argument("--out", type=str, default=None, help="also write the JSON document here")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.items, args.beams, args.batches, args.reps = [300], [8, 16], [1, 2], 2
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by kernels.beam_step_triton)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sidrec.kernels.beam_step_ref import beam_step_reference  # noqa: E402
from sidrec.kernels.level_mask import propagate  # noqa: E402
from sidrec.kernels.trie import PrefixTrie  # noqa: E402
from sidrec.model.sid_assign import append_dedup_digit  # noqa: E402

HISTORY = 20  # items per request history
TOP_N = 10


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def random_sids(n: int, g: torch.Generator, card: int = 256) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(4, n) unique SIDs: 3 uniform levels of `card` codes + a dedup digit (rank among collisions)."""
    c = torch.randint(0, card, (3, n), generator=g)
    sid, dedup_card = append_dedup_digit(c)
    return sid, (card, card, card, dedup_card)


class Timer:
    """Wall time of a device-synchronised call, in ms (CUDA events on GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def pct(xs: list[float], q: float) -> float:
    return round(float(torch.tensor(xs).quantile(q)), 4) if xs else float("nan")


# ---- 1. kernel check ---------------------------------------------------------------------------
def kernel_check(device: torch.device, dry: bool) -> dict:
    from sidrec.kernels.beam_step_triton import beam_step_triton

    g = torch.Generator().manual_seed(0)
    n = 300 if dry else 1_000_000
    sid, cards = random_sids(n, g, card=8 if dry else 256)
    trie = PrefixTrie.build(sid, cards, dense_levels=2 if dry else None).to(device)  # as at 1M: 2 dense
    timer = Timer(device)
    cases = [(B, K, level) for B in ((1, 2) if dry else (1, 64)) for K in ((4, 16) if dry else (256, 1000, 4096))
             for level in range(trie.num_levels)]
    rows, ok_all = [], True
    for B, K, level in cases:
        V, S = cards[level], trie.num_states[level]
        logits = (torch.randn(B, K, V, generator=g) * 3).to(device)
        alive = min(K, S)
        states = torch.full((B, K), -1, dtype=torch.int64)
        states[:, :alive] = torch.stack([torch.randperm(S, generator=g)[:alive] for _ in range(B)])
        scores = torch.where(states >= 0, -torch.rand(B, K, generator=g) * 10, torch.full((B, K), float("-inf")))
        states, scores = states.to(device), scores.to(device)
        widths = torch.randint(1, K + 1, (B,), generator=g).to(device) if B > 1 else None
        # per-request level masks (deletions + exclusions: 5% of the leaves), pruned at every level
        child_valid = propagate(trie, (torch.rand(B, n, generator=g) >= 0.05).to(device))[level]
        args = (logits, scores, states, level, trie, K, widths, child_valid)
        ref, got = beam_step_reference(*args), beam_step_triton(*args)
        same_n = bool(torch.equal(ref.n_valid, got.n_valid))
        fin = torch.isfinite(ref.scores)
        close = bool(torch.equal(fin, torch.isfinite(got.scores))) and \
            bool(torch.allclose(ref.scores[fin], got.scores[fin], atol=1e-4, rtol=1e-5))
        differ = int(((ref.parents != got.parents) | (ref.codes != got.codes)).sum())
        ok = same_n and close
        ok_all &= ok
        reps = 3 if dry else 20
        t_ref = sorted(timer(lambda: beam_step_reference(*args)) for _ in range(reps))[reps // 2]
        t_tri = sorted(timer(lambda: beam_step_triton(*args)) for _ in range(reps))[reps // 2]
        rows.append({"B": B, "K": K, "level": level, "dense": trie.dense[level] is not None, "ok": ok,
                     "n_valid_equal": same_n, "scores_close": close, "picks_differing": differ,
                     "reference_ms": round(t_ref, 4), "triton_ms": round(t_tri, 4)})
        log(f"kernel B={B:>3} K={K:>5} level={level} ok={ok} differing picks={differ:>4} "
            f"ref {t_ref:8.3f} ms  triton {t_tri:8.3f} ms")
    return {"ok": ok_all, "cases": rows}


# ---- 2. engine timing --------------------------------------------------------------------------
def make_bundle(path: Path, n: int, dry: bool):
    from sidrec.model.bundle import save_bundle
    from sidrec.model.config import ModelConfig, SIDLayout
    from sidrec.model.transformer import SIDTransformer

    g = torch.Generator().manual_seed(n)
    sid, cards = random_sids(n, g, card=8 if dry else 256)
    size = dict(d_model=32, n_heads=2, d_head=16, d_ff=64, n_enc_layers=1, n_dec_layers=1) if dry else \
        dict(d_model=128, n_heads=6, d_head=64, d_ff=1024, n_enc_layers=4, n_dec_layers=4)
    cfg = ModelConfig(layout=SIDLayout(cards), dropout=0.0, max_history=HISTORY, **size)
    torch.manual_seed(n)
    model = SIDTransformer(cfg).eval()
    return save_bundle(path, model, sid, [f"item{i}" for i in range(n)], overwrite=True)


def capture_search(engine, B: int, K: int, histories):
    """CUDA graph of one whole beam search at (B, K); returns a replay(histories) -> BeamResult."""
    from sidrec.model.beam_search import beam_search, encode_histories

    dev = engine.device
    src0, mask0 = encode_histories(histories, engine.sid_map, engine.model.offsets, HISTORY, dev)
    src, mask = src0.clone(), mask0.clone()  # the static input buffers
    decoder = getattr(engine, "decoder", engine.model)
    run = lambda: beam_search(decoder, engine.trie, src, mask, K, min(K, TOP_N),  # noqa: E731
                              beam_step=engine.beam_step)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):  # warm-up: Triton compiles, allocator settles, weights get packed
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = run()

    def replay(hist):
        s, m = encode_histories(hist, engine.sid_map, engine.model.offsets, HISTORY, dev)
        src.copy_(s)
        mask.copy_(m)
        graph.replay()
        return out

    return replay


def compiled_search(engine, K: int):
    """Fallback: torch.compile(mode='reduce-overhead') of the decoder step, eager beam search."""
    from sidrec.model.beam_search import beam_search

    model = engine.model
    step = torch.compile(model.decode_step, mode="reduce-overhead", dynamic=False)

    class Compiled:
        offsets = model.offsets
        prefill = staticmethod(model.prefill)
        new_cache = staticmethod(model.new_cache)
        decode_step = staticmethod(step)

    def call(hist):
        from sidrec.model.beam_search import encode_histories

        s, m = encode_histories(hist, engine.sid_map, model.offsets, HISTORY, engine.device)
        with torch.no_grad():
            return beam_search(Compiled(), engine.trie, s, m, K, min(K, TOP_N), beam_step=engine.beam_step)

    return call


def time_calls(fn, make_hist, reps: int, timer: Timer, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn(make_hist())
    return [timer(lambda: fn(make_hist())) for _ in range(reps)]


def engine_timing(device: torch.device, args, t_start: float) -> list[dict]:
    from sidrec.model.engine import EngineOptions, RecommendEngine

    rows = []
    timer = Timer(device)
    graph_error = None  # once capture has failed, later configs go straight to the fallback
    tmp = Path(tempfile.mkdtemp(prefix="sidrec-gpucheck-"))
    for n in args.items:
        t0 = time.perf_counter()
        path = make_bundle(tmp / f"bundle-{n}", n, args.dry_run)
        backend = "triton"
        engine = RecommendEngine.from_path(str(path), EngineOptions(device=str(device), beam_step=backend,
                                                                    max_beam_width=4096))
        log(f"engine: {n} items, bundle + load {time.perf_counter() - t0:.1f} s, "
            f"trie {engine.trie.nbytes() / n:.1f} B/item")
        g = torch.Generator().manual_seed(1)
        for B in args.batches:
            make_hist = lambda: torch.randint(0, n, (B, HISTORY), generator=g).tolist()  # noqa: E731
            for K in args.beams:
                if time.perf_counter() - t_start > args.budget_s:
                    rows.append({"items": n, "batch": B, "beam": K, "skipped": "time budget"})
                    continue
                reps = args.reps if B == 1 else max(2, args.reps // 3)
                row = {"items": n, "batch": B, "beam": K, "beam_step": backend}
                eager = time_calls(lambda h: engine.recommend(h, K, min(K, TOP_N)), make_hist, reps, timer)
                row["eager_p50_ms"], row["eager_p99_ms"] = pct(eager, 0.5), pct(eager, 0.99)
                row["eager_p50_ms_per_request"] = round(row["eager_p50_ms"] / B, 4)
                mode, fast = "cuda_graph", None
                if device.type != "cuda":
                    mode = "skipped (no CUDA)"
                else:
                    try:
                        if graph_error is not None:
                            raise RuntimeError(graph_error)
                        fast = capture_search(engine, B, K, make_hist())
                    except Exception as e:  # capture not possible with this code: say why, fall back
                        graph_error = row["cuda_graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                        log(f"  cuda graph capture failed ({graph_error}); trying torch.compile")
                        torch.cuda.synchronize()
                        try:
                            mode, fast = "torch.compile(reduce-overhead) decode step", compiled_search(engine, K)
                        except Exception as e2:
                            mode = f"failed: {type(e2).__name__}: {str(e2).splitlines()[0][:200]}"
                row["fast_mode"] = mode
                if fast is not None:
                    try:
                        ts = time_calls(fast, make_hist, reps, timer, warmup=3)
                        row["fast_p50_ms"], row["fast_p99_ms"] = pct(ts, 0.5), pct(ts, 0.99)
                        row["fast_p50_ms_per_request"] = round(row["fast_p50_ms"] / B, 4)
                        same = fast(h := make_hist())
                        want = engine.recommend(h, K, min(K, TOP_N))
                        row["fast_matches_eager"] = bool(torch.equal(same.items.cpu(), want.items.cpu()))
                    except Exception as e:
                        row["fast_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                log("  " + " ".join(f"{k}={v}" for k, v in row.items() if k not in ("items",)))
                rows.append(row)
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device (use --dry-run to check the script on a CPU)")
    else:
        device = torch.device("cuda")
    report = {"check": "sidrec_gpu", "dry_run": args.dry_run, "device": str(device),
              "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__}
    try:
        import triton

        report["triton"] = triton.__version__
        report["kernel"] = kernel_check(device, args.dry_run)
    except Exception as e:
        report["kernel"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
        traceback.print_exc()
    try:
        report["engine"] = engine_timing(device, args, t_start)
    except Exception as e:
        report["engine_error"] = f"{type(e).__name__}: {e}"[:500]
        traceback.print_exc()
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    return report


if __name__ == "__main__":
    report = main(ARGS)
    line = json.dumps(report)
    if ARGS.out:
        Path(ARGS.out).write_text(line + "\n")
    print(line)
    sys.exit(0 if report.get("kernel", {}).get("ok") and "engine_error" not in report else 1)
