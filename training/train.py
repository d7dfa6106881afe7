"""Training loop for the SID transformer: sliding windows, length-bucketed batches, bf16 autocast,
AdamW with warmup + cosine decay, early stopping on validation Recall@10, safetensors checkpoints,
and DDP through `torchrun` (gloo on CPU, nccl on GPU).

Why length buckets: Beauty histories average ~4 items in a window, but the longest is 20; padding
every batch to 20 items would spend ~4x the compute on pad tokens. Batches are cut from windows
sorted by history length and shuffled as whole batches, so each batch is nearly pad-free.
This module does not read data files or build SIDs (see `training.pipeline`).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from sidrec.kernels.trie import PrefixTrie
from sidrec.model.config import PAD_ID, ModelConfig, SIDLayout
from sidrec.model.engine import fast_dtype, tune_glibc_malloc
from sidrec.model.transformer import SIDTransformer
from sidrec.training import distributed as dist_utils
from sidrec.training.config import TrainConfig
from sidrec.training.evaluate import evaluate
from sidrec.training.packing import PackedSet


@dataclass
class WindowSet:
    """Sliding-window samples: history items (S, H) left-padded with -1, lengths (S,), targets (S,)."""

    hist: np.ndarray
    length: np.ndarray
    target: np.ndarray

    def __len__(self) -> int:
        return len(self.target)

    def batches(self, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        return make_batches(self.length, batch_size, rng)


def token_table(sid_map: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor:
    """(N + 1, L) token ids per item; row N (item -1) is all padding."""
    tab = sid_map.t().to(torch.int64) + torch.tensor(offsets, dtype=torch.int64)
    return torch.cat([tab, torch.full((1, tab.shape[1]), PAD_ID, dtype=torch.int64)], 0)


def make_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices grouped into batches of near-equal history length, in random batch order."""
    jitter = rng.random(len(lengths))
    order = np.lexsort((jitter, lengths))
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(ws: WindowSet, idx: np.ndarray, table: torch.Tensor, sid_map: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> src (B, n*L) left-padded tokens, mask (B, n*L), target codes (B, L)."""
    n = max(1, int(ws.length[idx].max()))
    items = torch.from_numpy(ws.hist[idx, -n:])  # (B, n), -1 = pad
    items = torch.where(items < 0, torch.full_like(items, table.shape[0] - 1), items)
    src = table[items].reshape(len(idx), -1)  # (B, n*L)
    mask = src != PAD_ID
    tgt = sid_map[:, torch.from_numpy(ws.target[idx])].t().contiguous()  # (B, L)
    return src, mask, tgt


def batch_logits(model: torch.nn.Module, data: WindowSet | PackedSet, idx: np.ndarray, table: torch.Tensor,
                 sid_map: torch.Tensor, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One training batch through the model -> (per-level logits, target codes (T, L))."""
    if isinstance(data, PackedSet):
        tokens, pos, mask, branch, tgt = (t.to(device) for t in data.collate(idx, table, sid_map))
        return model(tokens, mask, tgt, packed=(pos, branch)), tgt
    src, mask, tgt = (t.to(device) for t in collate(data, idx, table, sid_map))
    return model(src, mask, tgt), tgt


def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """The training autocast dtype for `train.dtype`: "auto" is bf16 on CUDA and on CPUs with
    native bf16, fp32 elsewhere (`model.engine.fast_dtype`, as serving decides)."""
    if name == "auto":
        name = fast_dtype(device)
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "inverse_sqrt":  # TIGER's: lr * sqrt(warmup / step), floored
        return cfg.lr * max(cfg.min_lr_ratio, math.sqrt(max(1, cfg.warmup_steps) / (step + 1)))
    p = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def build_model(cfg: TrainConfig, layout: SIDLayout) -> SIDTransformer:
    return SIDTransformer(ModelConfig(layout=layout, **cfg.model_kwargs()))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_weights(model: SIDTransformer, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


@dataclass
class TrainResult:
    model: SIDTransformer
    history: list[dict] = field(default_factory=list)  # one entry per epoch
    best_epoch: int = -1
    best_valid: float = -1.0
    train_seconds: float = 0.0
    samples_per_second: float = 0.0


def train_model(cfg: TrainConfig, layout: SIDLayout, sid_map: torch.Tensor, windows: WindowSet | PackedSet,
                valid_histories: list[np.ndarray], valid_targets: np.ndarray, out_dir: str | Path | None = None,
                progress: bool = True, log: Callable[[str], None] = print,
                init_state: dict[str, torch.Tensor] | None = None) -> TrainResult:
    """Train from sliding windows (or packed samples, decoder-only); keep the weights with the
    best validation Recall@10.

    With no validation users every epoch counts as the best (used by the refit on train + valid).
    `init_state` starts from given weights instead of a fresh initialisation."""
    ctx = dist_utils.setup(cfg.device)
    device = ctx.device
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if device.type == "cpu":
        # Keep freed activation buffers in the process: by default glibc returns every block above
        # a few MB to the OS and the next step page-faults it back in (~70k faults/s, a sixth of a
        # Beauty training step spent in the kernel, measured).
        tune_glibc_malloc()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = build_model(cfg, layout)
    if init_state is not None:
        model.load_state_dict(init_state)
    model = model.to(device)
    ddp_model = dist_utils.wrap(model, ctx)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    table = token_table(sid_map, model.offsets)
    sid_cpu = sid_map.to(torch.int64).cpu()
    trie = PrefixTrie.build(sid_cpu, layout.cardinalities).to(device)
    dtype = autocast_dtype(cfg.dtype, device)
    n_batches = math.ceil(len(windows) / cfg.batch_size)
    # Every rank must take the same number of steps or DDP's all-reduce would hang.
    steps_per_epoch = n_batches if ctx.world == 1 else max(1, n_batches // ctx.world)
    total_steps = steps_per_epoch * cfg.epochs
    out = Path(out_dir) if out_dir else None
    if out and ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    eval_rng = np.random.default_rng(cfg.seed + 1)
    n_eval = min(cfg.eval_users, len(valid_targets))
    eval_idx = np.sort(eval_rng.choice(len(valid_targets), n_eval, replace=False))
    result = TrainResult(model)
    step, bad_epochs, t0, seen = 0, 0, time.time(), 0
    best_state = None
    for epoch in range(cfg.epochs):
        model.train()
        batches = windows.batches(cfg.batch_size, rng)[ctx.rank:: ctx.world]
        batches = batches[:steps_per_epoch]
        loss_sum, n_sum, t_ep = 0.0, 0, time.time()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and ctx.is_main),
                   mininterval=2.0)
        for idx in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total_steps, cfg)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits, tgt = batch_logits(ddp_model, windows, idx, table, sid_cpu, device)
                loss = sum(F.cross_entropy(lg.float(), tgt[:, l], label_smoothing=cfg.label_smoothing)
                           for l, lg in enumerate(logits))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(tgt)
            n_sum += len(tgt)
            seen += len(tgt) * ctx.world
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / n_sum:.3f}", sps=f"{n_sum * ctx.world / (time.time() - t_ep):.0f}")
        ep_time = time.time() - t_ep
        if epoch == 0 and cfg.time_budget_min is not None:
            # Fit the cosine decay into the time budget: a schedule cut off mid-decay loses the
            # low-learning-rate phase that most of the final recall comes from.
            per_epoch = ep_time * 1.08  # + validation, roughly
            fit = int(cfg.time_budget_min * 60 / per_epoch * steps_per_epoch)
            # Rank 0's estimate for all ranks: every rank must follow the same learning rate.
            total_steps = dist_utils.broadcast_int(max(steps_per_epoch, min(total_steps, fit)), ctx)
        entry = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(1, n_sum),
                 "samples_per_second": n_sum * ctx.world / max(ep_time, 1e-9), "epoch_seconds": ep_time,
                 "elapsed_minutes": (time.time() - t0) / 60, "lr": lr_at(step, total_steps, cfg)}
        stop = False
        if ctx.is_main:
            score = -1.0  # with no validation users the latest epoch is the best one
            if n_eval:
                m = evaluate(model, trie, sid_cpu, [valid_histories[i] for i in eval_idx], valid_targets[eval_idx],
                             beam=cfg.eval_beam, dtype=dtype)
                entry.update({f"valid_{k}": v for k, v in m.items() if k != "users"})
                score = m["recall@10"]
            result.history.append(entry)
            log(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in entry.items()}))
            if score > result.best_valid or not n_eval:
                result.best_valid, result.best_epoch, bad_epochs = score, epoch + 1, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if out:
                    save_weights(model, out / "best.safetensors")
            else:
                bad_epochs += 1
            if out:
                save_weights(model, out / "last.safetensors")
                tmp = out / "history.json.tmp"
                tmp.write_text(json.dumps(result.history, indent=1))
                os.replace(tmp, out / "history.json")
            # Stop when another epoch like the last one would overrun the budget.
            spent = (time.time() - t0) / 60
            over_time = cfg.time_budget_min is not None and spent + (time.time() - t_ep) / 60 > cfg.time_budget_min
            stop = bad_epochs >= cfg.patience or over_time
            if over_time:
                log(f"time budget of {cfg.time_budget_min} min reached after epoch {epoch + 1}")
            elif stop:
                log(f"early stop: no validation Recall@10 gain for {cfg.patience} epochs")
        if dist_utils.broadcast_flag(stop, ctx):
            break
    result.train_seconds = time.time() - t0
    result.samples_per_second = seen / max(result.train_seconds, 1e-9)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    dist_utils.teardown(ctx)
    return result
