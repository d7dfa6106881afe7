"""Training throughput of the TIGER-sized model on Beauty's training sequences, alternatives side by
side: fp32 vs bf16 autocast, length-bucketed batches vs batches padded to the full 20-item history,
the decoder-only variant on sliding windows vs packed samples (every target of a user in one causal
pass), 4-level SIDs (with the dedup digit) vs 3-level ones (spread collisions, no digit), and a
Hugging Face T5 of the same size (the usual TIGER re-implementation) at the same batch.

Throughput counts training targets (windows) per second, the unit an epoch is made of. Uses
Beauty's real sequences (or a geometric stand-in when the data is absent). Prints a table, then
one JSON line last.
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

from sidrec.model.config import SIDLayout  # noqa: E402
from sidrec.training.config import TrainConfig  # noqa: E402
from sidrec.training.data import sliding_windows  # noqa: E402
from sidrec.training.packing import PackedSet  # noqa: E402
from sidrec.training.train import (WindowSet, autocast_dtype, batch_logits, build_model, collate,  # noqa: E402
                            make_batches, token_table)


def train_sequences(rng: np.random.Generator) -> tuple[list[np.ndarray], int]:
    """Beauty's training sequences (seq[:-2] per user) with their real items, or a stand-in with
    geometric lengths when the data is absent. -> (sequences, number of items)."""
    path = ROOT.parent / "shared" / "data" / "amazon-beauty" / "sequential_data.txt"
    if path.is_file():
        from sidrec.training.data import leave_one_out, read_p5

        data = read_p5(path.parent)
        return leave_one_out(data).train, data.num_items
    N = 12101
    return [rng.integers(0, N, n) for n in np.clip(rng.geometric(0.12, 22363), 1, 200)], N


def representative(batches: list[np.ndarray], data: WindowSet | PackedSet, n: int) -> list[np.ndarray]:
    """n batches evenly spaced over the epoch's batches sorted by token count: a short timing
    run sees the epoch's mix of short and long histories (a random few can be 2x off)."""
    if isinstance(data, PackedSet):
        cost = [int((np.diff(data.h_off)[b] + np.diff(data.t_off)[b]).sum()) for b in batches]
    else:
        cost = [int(data.length[b].sum()) for b in batches]
    order = np.argsort(cost)
    pick = order[np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int)]
    return [batches[i] for i in np.random.default_rng(0).permutation(pick)]


def time_ours(cfg: TrainConfig, data: WindowSet | PackedSet, sid: torch.Tensor, lay: SIDLayout, padded: bool,
              steps: int) -> float:
    """Targets per second over `steps` optimiser steps (after 2 warm-up steps)."""
    torch.manual_seed(0)
    m = build_model(cfg, lay)
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    tab = token_table(sid, m.offsets)
    rng = np.random.default_rng(0)
    if padded:
        data = WindowSet(data.hist, np.full_like(data.length, data.hist.shape[1]), data.target)
    batches = representative(data.batches(cfg.batch_size, rng), data, steps + 2)
    dt = autocast_dtype(cfg.dtype, torch.device("cpu"))
    n, t = 0, 0.0
    for i, idx in enumerate(batches):
        if i == 2:
            t, n = time.perf_counter(), 0
        with torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
            lg, tgt = batch_logits(m, data, idx, tab, sid, torch.device("cpu"))
            loss = sum(F.cross_entropy(x.float(), tgt[:, j]) for j, x in enumerate(lg))
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(tgt)
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
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-hf", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from sidrec.model.engine import tune_glibc_malloc

    tune_glibc_malloc()  # as train_model does on CPU
    rng = np.random.default_rng(0)
    seqs, N = train_sequences(rng)
    lay = SIDLayout((256, 256, 256, 10))
    sid = torch.stack([torch.randint(0, c, (N,)) for c in lay.cardinalities])
    ws = WindowSet(*sliding_windows(seqs, 20))
    ps = PackedSet.from_sequences(seqs, 20)
    rows = {}
    ed, do = "encoder_decoder", "decoder_only"
    # The decoder-only rows run in the dtype training picks here (bf16 only with native support).
    fast = "bfloat16" if autocast_dtype("auto", torch.device("cpu")) == torch.bfloat16 else "float32"
    specs = (("enc-dec fp32 padded", ed, 4, "float32", ws, True),
             ("enc-dec fp32 bucketed", ed, 4, "float32", ws, False),
             (f"dec-only 8L {fast} windows", do, 8, fast, ws, False),
             (f"dec-only 8L {fast} packed", do, 8, fast, ps, False),
             (f"dec-only 4L {fast} packed", do, 4, fast, ps, False),
             (f"dec-only 4L {fast} packed, no attn/ff dropout", do, 4, fast, ps, False),
             ("dec-only 4L float32 packed, no attn/ff dropout", do, 4, "float32", ps, False),
             # sid.spread_collisions with no tuple left shared: no dedup digit, 3 tokens an item
             (f"dec-only 4L {fast} packed, no attn/ff dropout, 3-level SIDs", do, 4, fast, ps, False),
             ("enc-dec bf16 padded", ed, 4, "bfloat16", ws, True),
             ("enc-dec bf16 bucketed", ed, 4, "bfloat16", ws, False))
    # Keyed by name: where fp32 is the fast dtype the recipe's fp32 row is the row above it.
    # Emulated bf16 (no native support) is slow enough that one row of it says all.
    todo = {r[0]: r for r in specs if fast == "bfloat16" or r[0] != "enc-dec bf16 padded"}
    for name, arch, layers, dtype, data, padded in todo.values():
        steps = a.steps if fast == "bfloat16" or "bf16" not in name else 3
        drops = {"attn_dropout": 0.0, "ff_dropout": 0.0} if "no attn/ff dropout" in name else {}
        cfg = TrainConfig(arch=arch, n_dec_layers=layers, dtype=dtype, batch_size=a.batch,
                          objective="packed" if data is ps else "windows", **drops)
        three = name.endswith("3-level SIDs")
        rows[name] = time_ours(cfg, data, sid[:3] if three else sid, SIDLayout(lay.cardinalities[:3]) if three else lay,
                               padded, steps)
        print(f"{name:44s} {rows[name]:8.1f} targets/s", flush=True)
    hf = None if a.no_hf else time_hf(ws, sid, lay, a.batch, max(4, a.steps // 3))
    if hf:
        print(f"{'HF T5 fp32 padded':44s} {hf:8.1f} targets/s")
    best_ed = max(v for k, v in rows.items() if k.startswith("enc-dec"))
    print(json.dumps({"bench": "train_throughput", "threads": a.threads, "batch": a.batch,
                      "targets_per_epoch": len(ws), "mean_history_items": float(ws.length.mean()),
                      "samples_per_s": {k: round(v, 1) for k, v in rows.items()},
                      "hf_t5_samples_per_s": round(hf, 1) if hf else None,
                      "speedup_vs_hf": round(best_ed / hf, 2) if hf else None,
                      "native_bf16": fast == "bfloat16",
                      "packed_vs_windows_dec_only_8L": round(rows[f"dec-only 8L {fast} packed"]
                                                            / rows[f"dec-only 8L {fast} windows"], 2),
                      "epoch_minutes": {k: round(len(ws) / v / 60, 1) for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
