"""Decoding engine on the CPU: ms/request at beam 10 .. 1000, batch 1 and 16, against baselines.

One run measures, side by side on the same TIGER-sized random model (4+4 layers, d_model 128,
6 heads of 64, d_ff 1024) and a random catalogue of 12,101 unique SIDs (3 skewed levels of 256 +
dedup digit), with histories of 20 items (80 tokens):

* engine/torch-fp32, engine/torch-bf16 (bf16 autocast: bf16 matmuls and per-beam cache, as
  `RecommendEngine(dtype="bfloat16")` runs), engine/onnxruntime (fp32): the one `beam_search`,
  KV-cached, prefix K/V shared by a request's beams;
* no-cache: the same model and beam step, but each step re-runs the decoder's training layers
  over the whole decoded prefix of every beam (self-attention recomputed from scratch, the
  cross-attention K/V re-projected from the encoder memory every step; the encoder itself runs
  once per request, which is generous to the baseline);
* hf-t5: `T5ForConditionalGeneration.generate(num_beams=W, prefix_allowed_tokens_fn=<trie>)` on
  a T5 of the same size with random weights, the usual TIGER re-implementation.

It also reports, for the engine at each width, the decoder GFLOP/s (FLOPs of the matmuls actually
executed, counting only live beams per level) against this machine's measured matmul rate at the
same shapes and dtype in this run (the roofline fraction), and the share of step time spent in
the beam step (masking + top-K). Absolute times depend on what else runs on the machine; compare
ratios within one run (the JSON records the load average). OpenMP workers are set to sleep when
idle (OMP_WAIT_POLICY=PASSIVE unless set): spinning teams collapse on a shared machine.
Prints a table, then one JSON line.

    .venv/bin/python benchmarks/engine_bench.py [--threads 2] [--beams 10 100 256 1000] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Idle OpenMP workers must sleep, not spin: on a machine shared with other jobs a spinning
# 2-thread team waits on a descheduled peer at every barrier (measured 100x slower at beam 10).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sidrec.kernels.beam_step_ref import beam_step_reference  # noqa: E402
from sidrec.kernels.trie import PrefixTrie  # noqa: E402
from sidrec.model.sid_assign import append_dedup_digit  # noqa: E402
from sidrec.model.beam_search import beam_search, encode_histories  # noqa: E402
from sidrec.model.config import BOS_ID, ModelConfig, SIDLayout  # noqa: E402
from sidrec.model.engine import tune_glibc_malloc  # noqa: E402
from sidrec.model.transformer import SIDTransformer  # noqa: E402

TOP_N = 10


# ---- workload ------------------------------------------------------------------------------
def random_catalogue(n: int, seed: int = 0, card: int = 256) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(4, n) unique SIDs: 3 skewed levels (as RQ codes are) + dedup digit (rank within a collision)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(3, card, generator=g), -1)
    c = torch.stack([torch.multinomial(probs[l], n, replacement=True, generator=g) for l in range(3)])
    sid, dedup_card = append_dedup_digit(c)
    return sid, (card, card, card, dedup_card)


def live_beams(trie: PrefixTrie, K: int) -> list[int]:
    """Beams the decoder runs at each level: the same static bound `beam_search` uses."""
    out, live = [], 1
    for level in range(trie.num_levels):
        out.append(live)
        if level < trie.num_levels - 1:
            live = min(K, trie.row_ptr[level + 1].numel() - 1, live * max(1, trie.max_children[level]))
    return out


def linear_shapes(cfg: ModelConfig) -> list[tuple[int, int, int]]:
    """(in, out, count per layer) of one decoder layer's projections in the engine (fused q|k|v)."""
    D, I, Fd = cfg.d_model, cfg.n_heads * cfg.d_head, cfg.d_ff
    return [(D, 3 * I, 1), (I, D, 1), (D, I, 1), (I, D, 1), (D, Fd, 1), (Fd, D, 1)]


def decoder_flops(cfg: ModelConfig, cards, beams_per_level: list[int], T: int, B: int) -> float:
    """FLOPs of the decoder matmuls at each level (projections, attention scores/values, head)."""
    I = cfg.n_heads * cfg.d_head
    total = 0.0
    for level, k in enumerate(beams_per_level):
        rows = B * k
        per_row = sum(i * o * c for i, o, c in linear_shapes(cfg))
        per_row += 2 * T * I + 2 * (level + 1) * I  # cross-attention over T, self over level+1
        total += 2 * rows * (cfg.n_dec_layers * per_row + cfg.d_model * cards[level])
    return total


def matmul_rate(cfg: ModelConfig, rows: int, dtype: torch.dtype, budget_s: float = 0.4) -> float:
    """Measured GFLOP/s of F.linear at the decoder's shapes, `rows` rows, `dtype`."""
    flops, secs = 0.0, 0.0
    for i, o, c in linear_shapes(cfg):
        x, w = torch.randn(rows, i, dtype=dtype), torch.randn(o, i, dtype=dtype)
        F.linear(x, w)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < budget_s / 6:
            F.linear(x, w)
            n += 1
        secs += (time.perf_counter() - t0) / n * c
        flops += 2 * rows * i * o * c
    return flops / secs / 1e9


# ---- timing helpers ------------------------------------------------------------------------
class Timed:
    """Wraps a decoder and the beam step to split a search's time into prefill / decoder / beam step."""

    def __init__(self, dec, beam_step=beam_step_reference) -> None:
        self.dec, self.offsets, self._beam_step = dec, dec.offsets, beam_step
        self.t = {"prefill": 0.0, "decoder": 0.0, "beam_step": 0.0}

    def prefill(self, *a):
        t0 = time.perf_counter()
        out = self.dec.prefill(*a)
        self.t["prefill"] += time.perf_counter() - t0
        return out

    def new_cache(self, *a):
        return self.dec.new_cache(*a)

    def decode_step(self, *a):
        t0 = time.perf_counter()
        out = self.dec.decode_step(*a)
        self.t["decoder"] += time.perf_counter() - t0
        return out

    def beam_step(self, *a, **kw):
        t0 = time.perf_counter()
        out = self._beam_step(*a, **kw)
        self.t["beam_step"] += time.perf_counter() - t0
        return out


def timeit(fn, min_reps: int, max_reps: int, budget_s: float, warmup: bool = True) -> tuple[float, int]:
    """(median seconds of fn(), number of calls made incl. the warm-up); stops at budget_s or max_reps."""
    if warmup:
        fn()
    ts, t_start = [], time.perf_counter()
    while len(ts) < min_reps or (len(ts) < max_reps and time.perf_counter() - t_start < budget_s):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), len(ts) + int(warmup)


# ---- baselines -----------------------------------------------------------------------------
@torch.no_grad()
def nocache_search(model: SIDTransformer, trie: PrefixTrie, src, mask, K: int, top_n: int) -> torch.Tensor:
    """Beam search without any KV cache: every step re-runs the decoder over each beam's prefix."""
    B, L = src.shape[0], trie.num_levels
    mem = model.encode(src, mask)  # (B, T, D), once per request
    add_mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))[:, None, None, :]  # (B, 1, 1, T)
    dec_in = torch.full((B, 1, 1), BOS_ID, dtype=torch.int64)  # (B, Kc, l+1) decoder input tokens
    scores, states = torch.zeros(B, 1), torch.zeros(B, 1, dtype=torch.int64)
    widths = live_beams(trie, K)[1:] + [top_n]
    for level in range(L):
        Kc, t = dec_in.shape[1], dec_in.shape[2]
        x = model.tok_emb(dec_in.reshape(B * Kc, t)) + model.dec_pos.weight[:t]  # (B*Kc, t, D)
        for layer in model.decoder:
            x = x + layer.self_attn(layer.n1(x), causal=True)
            cross = layer.cross
            q = cross.q(layer.n2(x)).view(B, Kc * t, cross.h, cross.dh).transpose(1, 2)  # (B, H, Kc*t, dh)
            k, v = cross.kv(mem)  # (B, H, T, dh): re-projected every step, no cache
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=add_mask)
            x = x + cross.o(o.transpose(1, 2).reshape(B * Kc, t, -1))
            x = x + layer.ff(layer.n3(x))
        logits = model.level_logits(model.dec_norm(x[:, -1]), level).view(B, Kc, -1)
        out = beam_step_reference(logits, scores, states, level, trie, widths[level])
        scores, states = out.scores, out.states
        prev = torch.gather(dec_in, 1, out.parents[..., None].expand(-1, -1, t))
        dec_in = torch.cat([prev, (out.codes + model.offsets[level])[..., None]], 2)
    return scores


def hf_t5(cfg: ModelConfig, sid_map: torch.Tensor):
    """A random-weight T5 of the same size and a prefix_allowed_tokens_fn over the catalogue's trie."""
    from transformers import T5Config, T5ForConditionalGeneration

    c = T5Config(vocab_size=cfg.layout.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_head, d_ff=cfg.d_ff,
                 num_layers=cfg.n_enc_layers, num_decoder_layers=cfg.n_dec_layers, num_heads=cfg.n_heads,
                 decoder_start_token_id=BOS_ID, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(c).eval()
    offs = torch.tensor(cfg.layout.offsets)
    tok = (sid_map.T + offs).tolist()  # (N, L) token ids
    allowed: dict[tuple, set] = {}
    for item in tok:
        for l in range(len(item)):
            allowed.setdefault(tuple(item[:l]), set()).add(item[l])
    allowed_l = {k: sorted(v) for k, v in allowed.items()}

    def prefix_fn(batch_id, input_ids):
        return allowed_l.get(tuple(input_ids[1:].tolist()), [0])

    return model, prefix_fn


# ---- main ----------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beams", type=int, nargs="+", default=[10, 100, 256, 1000])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--items", type=int, default=12_101)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of repetitions per cell (min 1 rep)")
    ap.add_argument("--quick", action="store_true", help="smaller budget, baselines at batch 1 only")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    t_bench = time.perf_counter()
    load_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    tune_glibc_malloc()
    torch.manual_seed(0)
    sid_map, cards = random_catalogue(args.items)
    cfg = ModelConfig(layout=SIDLayout(cards))
    model = SIDTransformer(cfg).eval()
    trie = PrefixTrie.build(sid_map, cards)
    g = torch.Generator().manual_seed(1)
    hists = {b: torch.randint(0, args.items, (b, 20), generator=g).tolist() for b in args.batches}
    enc = {b: encode_histories(h, sid_map, model.offsets, cfg.max_history) for b, h in hists.items()}
    T = enc[args.batches[0]][0].shape[1]

    from sidrec.model.onnx_backend import OnnxDecoder

    t0 = time.perf_counter()
    onnx = OnnxDecoder.from_model(model, num_threads=args.threads)
    onnx_setup_s = time.perf_counter() - t0
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    fp32 = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    engines = {"torch-fp32": (model, fp32), "torch-bf16": (model, bf16), "onnxruntime": (onnx, fp32)}
    hf = None if args.no_hf else hf_t5(cfg, sid_map)
    budget = args.budget / (3 if args.quick else 1)

    # The no-cache baseline is the same search: check it ranks like the engine before timing it.
    src, mask = enc[args.batches[0]]
    ref = beam_search(model, trie, src, mask, 20, TOP_N)
    torch.testing.assert_close(nocache_search(model, trie, src, mask, 20, TOP_N), ref.scores, rtol=1e-4, atol=1e-4)

    rows, results = [], []
    rate_cache: dict[tuple, float] = {}
    for B in args.batches:
        src, mask = enc[B]
        for K in args.beams:
            cell = {"batch": B, "beam": K}
            beams = live_beams(trie, K)
            flops = decoder_flops(cfg, cards, beams, T, B)
            for name, (dec, ctx) in engines.items():
                timed = Timed(dec)

                def run():
                    with ctx():
                        beam_search(timed, trie, src, mask, K, TOP_N, beam_step=timed.beam_step)

                run()  # first call: weight packing, allocator warm-up
                timed.t = dict.fromkeys(timed.t, 0.0)
                s, n_runs = timeit(run, 1, 20, budget, warmup=False)
                dec_s, step_s = timed.t["decoder"] / n_runs, timed.t["beam_step"] / n_runs
                dt = torch.bfloat16 if name == "torch-bf16" else torch.float32
                key = (B * K, dt)
                if key not in rate_cache:
                    rate_cache[key] = matmul_rate(cfg, B * K, dt)
                gfs = flops / dec_s / 1e9
                cell[name] = {"ms_per_request": s * 1e3 / B, "decode_gflops": gfs,
                              "matmul_gflops": rate_cache[key], "roofline": gfs / rate_cache[key],
                              "beam_step_share": step_s / (dec_s + step_s),
                              "prefill_ms": timed.t["prefill"] / n_runs * 1e3}
            baselines_here = B == 1 or not args.quick
            if baselines_here:
                s, _ = timeit(lambda: nocache_search(model, trie, src, mask, K, TOP_N), 1, 5, budget,
                              warmup=B * K < 4000)
                cell["no-cache"] = {"ms_per_request": s * 1e3 / B}
            if hf is not None and baselines_here and not (B > 1 and K >= 1000):
                hm, fn = hf
                ids = src.clone()
                am = mask.long()

                def gen():
                    with torch.no_grad():
                        hm.generate(input_ids=ids, attention_mask=am, num_beams=K, num_return_sequences=TOP_N,
                                    prefix_allowed_tokens_fn=fn, max_new_tokens=cfg.num_levels,
                                    do_sample=False, early_stopping=False)

                s, _ = timeit(gen, 1, 3 if B * K < 1000 else 1, budget, warmup=B * K <= 256)
                cell["hf-t5"] = {"ms_per_request": s * 1e3 / B}
            results.append(cell)
            e = cell["torch-fp32"]
            best = min(cell[n]["ms_per_request"] for n in engines)
            line = (f"B={B:>2} K={K:>4} | " + " ".join(f"{cell[n]['ms_per_request']:>8.1f}" for n in engines)
                    + " | " + " ".join(f"{cell[n]['ms_per_request']:>9.1f}" if n in cell else f"{'-':>9}"
                                       for n in ("no-cache", "hf-t5"))
                    + f" | {cell['hf-t5']['ms_per_request'] / best if 'hf-t5' in cell else float('nan'):>6.1f}x"
                    + f" | {e['decode_gflops']:>5.0f}/{e['matmul_gflops']:<4.0f} {e['roofline']:>4.0%}"
                    + f" {cell['torch-bf16']['decode_gflops']:>5.0f}/{cell['torch-bf16']['matmul_gflops']:<4.0f}"
                    + f" {cell['torch-bf16']['roofline']:>4.0%} | {e['beam_step_share']:>5.1%}"
                    + f" {cell['torch-bf16']['beam_step_share']:>5.1%}")
            rows.append(line)
            print(line, flush=True)

    # bf16 vs fp32 on rankings: same histories, beam 256
    src, mask = enc[args.batches[-1]]
    r32 = beam_search(model, trie, src, mask, 256, TOP_N)
    with bf16():
        r16 = beam_search(model, trie, src, mask, 256, TOP_N)
    overlap = sum(len(set(a) & set(b)) for a, b in zip(r32.items.tolist(), r16.items.tolist())) / r32.items.numel()
    bf16_acc = {"top10_overlap": overlap, "max_abs_score_diff": float((r32.scores - r16.scores).abs().max()),
                "same_top1": float((r32.items[:, 0] == r16.items[:, 0]).float().mean())}

    hdr = (f"{'':12} | {'fp32':>8} {'bf16':>8} {'onnx':>8} | {'no-cache':>9} {'hf-t5':>9} | {'hf/eng':>7}"
           f" | decoder GF/s / matmul GF/s: fp32, bf16 | beam-step share fp32 bf16")
    print()
    print(f"ms/request, {args.threads} thread(s); model 4+4 x d128, {args.items} items, cards {cards}, "
          f"history 20 items ({T} tokens), top {TOP_N}; onnx export+load {onnx_setup_s:.1f}s")
    print(hdr)
    for r in rows:
        print(r)
    print(f"bf16 vs fp32 at beam 256: {bf16_acc}")

    def ratio(B, K, base):
        c = next((c for c in results if c["batch"] == B and c["beam"] == K), None)
        if c is None or base not in c:
            return None
        return c[base]["ms_per_request"] / min(c[n]["ms_per_request"] for n in engines)

    summary = {
        "bench": "engine_cpu", "threads": args.threads, "items": args.items, "cards": list(cards),
        "history_tokens": T, "top_n": TOP_N, "onnx_setup_s": onnx_setup_s, "bf16_vs_fp32_beam256": bf16_acc,
        "speedup_vs_hf": {f"b{B}_k{K}": ratio(B, K, "hf-t5") for B in args.batches for K in args.beams},
        "speedup_vs_nocache": {f"b{B}_k{K}": ratio(B, K, "no-cache") for B in args.batches for K in args.beams},
        "roofline_at_1000": {f"b{c['batch']}_{n}": c[n]["roofline"] for c in results if c["beam"] == 1000
                             for n in ("torch-fp32", "torch-bf16")},
        "max_beam_step_share": max(c[n]["beam_step_share"] for c in results for n in engines),
        "targets": {"hf_x8_at_256": (ratio(1, 256, "hf-t5") or 0) >= 8,
                    "hf_x15_at_1000": (ratio(1, 1000, "hf-t5") or 0) >= 15,
                    "roofline_50pct_at_1000": {f"b{c['batch']}_{n}": c[n]["roofline"] >= 0.5 for c in results
                                               if c["beam"] == 1000 for n in ("torch-fp32", "torch-bf16")},
                    "beam_step_share_le_15pct_at_beam_ge_100": all(
                        c[n]["beam_step_share"] <= 0.15 for c in results for n in engines if c["beam"] >= 100)},
        "results": results, "bench_seconds": time.perf_counter() - t_bench,
        "loadavg_1min_start_end": [load_start, os.getloadavg()[0]],  # others' jobs on the machine
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
