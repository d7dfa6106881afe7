"""Chooses the beam-step implementation once: Triton on CUDA when available, else the reference."""
from __future__ import annotations

from typing import Callable

import torch

from kernels.beam_step_ref import beam_step_reference

BeamStepFn = Callable[..., object]


def get_beam_step(device: torch.device | str, backend: str = "auto") -> BeamStepFn:
    """backend: 'auto' (Triton on CUDA, reference elsewhere), 'reference' or 'triton'."""
    device = torch.device(device)
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"beam-step backend must be 'auto', 'reference' or 'triton', got {backend!r}")
    if backend == "reference" or (backend == "auto" and device.type != "cuda"):
        return beam_step_reference
    from kernels.beam_step_triton import beam_step_triton  # imported only when asked for

    return beam_step_triton
