"""Plots for the bundle's report: learning curves. (Codebook usage lives in `training.sids`.)"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sidrec.figures import save_figure  # noqa: E402


def plot_learning_curves(history: list[dict], path: str | Path) -> Path:
    """Training loss and validation Recall/NDCG@10 per epoch, one PNG (written atomically)."""
    path = Path(path)
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(ep, [h["train_loss"] for h in history], marker="o")
    a1.set_xlabel("epoch")
    a1.set_ylabel("train loss (sum of per-level CE)")
    a1.set_title("training loss")
    for key, label in (("valid_recall@10", "Recall@10"), ("valid_ndcg@10", "NDCG@10"),
                       ("valid_recall@5", "Recall@5")):
        if history and key in history[0]:
            a2.plot(ep, [h[key] for h in history], marker="o", label=label)
    a2.set_xlabel("epoch")
    if a2.lines:
        a2.set_title("validation (sampled users)")
        a2.legend()
    else:  # fit on train + valid: no held-out validation set to plot
        a2.set_title("no validation set (trained on train + valid)")
        a2.plot(ep, [h["lr"] for h in history], marker="o", color="gray")
        a2.set_ylabel("learning rate at epoch end")
    a2.grid(alpha=0.3)
    a1.grid(alpha=0.3)
    return save_figure(fig, path, dpi=110)
