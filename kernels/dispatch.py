"""Chooses the beam-step implementation once: Triton on CUDA when available, else the reference.

The choice is made when the engine starts, never per step. 'triton' on a CPU device is only
meaningful under the Triton interpreter (TRITON_INTERPRET=1, used by the tests); without it the
request is refused with a message saying what would work.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

from sidrec.kernels.beam_step_ref import beam_step_reference

BeamStepFn = Callable[..., object]
BACKENDS = ("auto", "reference", "triton")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _load_triton() -> BeamStepFn:
    from sidrec.kernels.beam_step_triton import beam_step_triton  # imported only when asked for

    return beam_step_triton


def get_beam_step(device: torch.device | str, backend: str = "auto") -> BeamStepFn:
    """backend: 'auto' (Triton on CUDA, reference elsewhere), 'reference' or 'triton'."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"beam-step backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference" or (backend == "auto" and device.type != "cuda"):
        return beam_step_reference
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
        raise ValueError(f"beam-step backend 'triton' needs a CUDA device (got {device.type!r}); on CPU it "
                         "runs only under the Triton interpreter (TRITON_INTERPRET=1, slow: for tests). "
                         "Use backend 'reference' or 'auto' on CPU.")
    try:
        return _load_triton()
    except ImportError as e:
        if backend == "triton":
            raise ValueError(f"beam-step backend 'triton' was asked for but Triton cannot be imported ({e}); "
                             "install triton or use backend 'reference'") from None
        warnings.warn(f"Triton is not importable ({e}); using the PyTorch reference beam step on CUDA")
        return beam_step_reference
