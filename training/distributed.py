"""Rank helpers for multi-process training, in one place: a run started by `torchrun` uses DDP
(gloo on CPU, nccl on CUDA); a plain `python` run is a world of one and skips all of it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world: int
    device: torch.device
    initialised: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(0, 1, torch.device(device), False)
    rank = int(os.environ["RANK"])
    dev = torch.device(device)
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank, world, dev, True)


def wrap(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    if not ctx.initialised:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's decision (e.g. early stop) reaches every rank."""
    if not ctx.initialised:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64,
                     device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_int(value: int, ctx: DistContext) -> int:
    if not ctx.initialised:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return int(t.item())


def teardown(ctx: DistContext) -> None:
    if ctx.initialised and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
