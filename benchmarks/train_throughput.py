"""Training throughput of the TIGER-sized model on Beauty-shaped windows, alternatives side by side:
fp32 vs bf16 autocast, length-bucketed batches vs batches padded to the full 20-item history, and a
Hugging Face T5 of the same size (the usual TIGER re-implementation) at the same batch.

Windows are drawn with Beauty's real history-length distribution (or a geometric stand-in when
the data is absent). Prints a table, then one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import SIDLayout  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.train import WindowSet, build_model, collate, make_batches, token_table  # noqa: E402


def beauty_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    path = ROOT.parent / "shared" / "data" / "amazon-beauty" / "sequential_data.txt"
    if path.is_file():
        from training.data import read_p5, leave_one_out, sliding_windows

        sp = leave_one_out(read_p5(path.parent))
        _, length, _ = sliding_windows(sp.train, 20)
        return rng.choice(length, n)
    return np.clip(rng.geometric(0.25, n), 1, 20)


def time_ours(cfg: TrainConfig, ws: WindowSet, sid: torch.Tensor, lay: SIDLayout, padded: bool, steps: int) -> float:
    torch.manual_seed(0)
    m = build_model(cfg, lay)
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    tab = token_table(sid, m.offsets)
    rng = np.random.default_rng(0)
    lengths = np.full_like(ws.length, 20) if padded else ws.length
    batches = make_batches(lengths, cfg.batch_size, rng)[: steps + 2]
    dt = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    n, t = 0, 0.0
    for i, idx in enumerate(batches):
        if i == 2:
            t, n = time.perf_counter(), 0
        src, mask, tgt = collate(ws if not padded else WindowSet(ws.hist, lengths, ws.target), idx, tab, sid)
        with torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
            lg = m(src, mask, tgt)
            loss = sum(F.cross_entropy(x.float(), tgt[:, j]) for j, x in enumerate(lg))
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(idx)
    return n / (time.perf_counter() - t)


def time_hf(ws: WindowSet, sid: torch.Tensor, lay: SIDLayout, batch: int, steps: int) -> float | None:
    try:
        from transformers import T5Config, T5ForConditionalGeneration
    except ImportError:
        return None
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=lay.vocab_size, d_model=128, d_kv=64, d_ff=1024, num_layers=4, num_decoder_layers=4,
                   num_heads=6, dropout_rate=0.1, pad_token_id=0, decoder_start_token_id=1, eos_token_id=None)
    m = T5ForConditionalGeneration(cfg)
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    tab = token_table(sid, tuple(lay.offsets))
    rng = np.random.default_rng(0)
    # The usual re-implementation pads every history to the same length.
    batches = make_batches(np.full_like(ws.length, 20), batch, rng)[: steps + 2]
    n, t = 0, 0.0
    for i, idx in enumerate(batches):
        if i == 2:
            t, n = time.perf_counter(), 0
        src, mask, tgt = collate(WindowSet(ws.hist, np.full_like(ws.length, 20), ws.target), idx, tab, sid)
        labels = tgt + torch.tensor(lay.offsets)
        out = m(input_ids=src, attention_mask=mask.long(), labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        n += len(idx)
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    N, H = 12101, 20
    lay = SIDLayout((256, 256, 256, 10))
    sid = torch.stack([torch.randint(0, c, (N,)) for c in lay.cardinalities])
    S = a.batch * (a.steps + 4)
    lengths = beauty_lengths(S, rng)
    hist = np.full((S, H), -1, dtype=np.int64)
    for i, l in enumerate(lengths):
        hist[i, H - l:] = rng.integers(0, N, l)
    ws = WindowSet(hist, lengths.astype(np.int64), rng.integers(0, N, S))
    rows = {}
    for name, dtype, padded in (("fp32 padded", "float32", True), ("fp32 bucketed", "float32", False),
                                ("bf16 padded", "bfloat16", True), ("bf16 bucketed", "bfloat16", False)):
        rows[name] = time_ours(TrainConfig(dtype=dtype, batch_size=a.batch), ws, sid, lay, padded, a.steps)
        print(f"{name:16s} {rows[name]:8.1f} samples/s", flush=True)
    hf = time_hf(ws, sid, lay, a.batch, max(4, a.steps // 3))
    if hf:
        print(f"{'HF T5 fp32 padded':16s} {hf:8.1f} samples/s")
    epoch = 131413
    best = max(rows.values())
    print(json.dumps({"bench": "train_throughput", "threads": a.threads, "batch": a.batch,
                      "mean_history_items": float(lengths.mean()),
                      "samples_per_s": {k: round(v, 1) for k, v in rows.items()},
                      "hf_t5_samples_per_s": round(hf, 1) if hf else None,
                      "speedup_vs_hf": round(best / hf, 2) if hf else None,
                      "beauty_epoch_minutes_best": round(epoch / best / 60, 1)}))


if __name__ == "__main__":
    main()
