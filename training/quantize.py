"""Residual quantisers that turn item embeddings into code tuples (the SID before its dedup digit).

- `rq_kmeans`: residual k-means (faiss.Kmeans on the residual at each level) as in GRID, with an
  optional balanced variant (OneRec-style capped clusters: every cluster holds at most
  ceil(N / C) items), which spreads items evenly over the codes.
- `rq_vae`: a small residual-quantised autoencoder in torch (TIGER's RQ-VAE, scaled down):
  MLP encoder -> latent, L residual codebooks (straight-through estimator, commitment loss,
  k-means initialisation, dead-code reset), MLP decoder.
- `assign_codes`: residual nearest-centroid codes for new items, with codebooks kept in a bundle.
- `spread_last_level`: collision-aware last level (as LC-Rec's uniform semantic mapping): items
  that share a whole code tuple move, within their prefix, to the nearest last-level codes no
  other item of the prefix holds, so the dedup digit is needed only where a prefix holds more
  items than the last codebook has codes.

Level cardinality is `codebook_size` clamped to the number of items, so tiny catalogues work;
`RQResult.cardinalities` reports the real sizes. Thread counts (faiss/torch) are the caller's.
This module does not add the dedup digit nor judge the codes (see `training.sids`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class RQResult:
    codes: np.ndarray  # (N, levels) int64
    codebooks: list[np.ndarray]  # per level (C_l, D') float32; D' = input dim, or latent dim for rq_vae
    method: str  # "rq_kmeans", "rq_kmeans_balanced" or "rq_vae"
    encoder: dict[str, np.ndarray] | None = None  # rq_vae only: "layer{i}.weight/bias", ReLU between layers

    @property
    def levels(self) -> int:
        return len(self.codebooks)

    @property
    def cardinalities(self) -> tuple[int, ...]:
        return tuple(int(cb.shape[0]) for cb in self.codebooks)

    def latent(self, X: np.ndarray) -> np.ndarray:
        """Map inputs into the codebooks' space: identity for RQ-KMeans, the encoder for RQ-VAE."""
        X = _as_matrix(X)
        if self.encoder is None:
            return X
        n = len(self.encoder) // 2
        h = X
        for i in range(n):
            h = h @ self.encoder[f"layer{i}.weight"].T + self.encoder[f"layer{i}.bias"]  # (N, out_i)
            if i < n - 1:
                h = np.maximum(h, 0.0)
        return h.astype(np.float32)

    def assign(self, X: np.ndarray) -> np.ndarray:
        """(N, levels) codes for new items (nearest centroid; balanced caps do not apply)."""
        return assign_codes(self.latent(X), self.codebooks)


def _as_matrix(X: np.ndarray, name: str = "X") -> np.ndarray:
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty (N, D) matrix, got shape {X.shape}")
    if not np.isfinite(X).all():
        bad = int(np.flatnonzero(~np.isfinite(X).all(axis=1))[0])
        raise ValueError(f"{name} row {bad} holds NaN or inf")
    return X


def _nearest(R: np.ndarray, C: np.ndarray) -> np.ndarray:
    """(N,) index of the nearest row of C for each row of R (exact L2, faiss flat index)."""
    import faiss

    index = faiss.IndexFlatL2(C.shape[1])
    index.add(np.ascontiguousarray(C, dtype=np.float32))
    _, idx = index.search(np.ascontiguousarray(R, dtype=np.float32), 1)  # (N, 1)
    return idx[:, 0].astype(np.int64)


def sq_dists(R: np.ndarray, C: np.ndarray) -> np.ndarray:
    """(N, K) squared L2 distances, ||r||^2 - 2 r.c + ||c||^2."""
    d = (R * R).sum(1)[:, None] - 2.0 * (R @ C.T) + (C * C).sum(1)[None, :]
    return np.maximum(d, 0.0, out=d)


def _balanced_assign(R: np.ndarray, C: np.ndarray, cap: int) -> np.ndarray:
    """Capacity-constrained assignment: every unassigned item proposes to its nearest cluster
    that still has room; each cluster accepts its closest proposers up to its remaining room.
    Every round fills at least one cluster, so there are at most K rounds (a few in practice)."""
    N, K = len(R), len(C)
    if cap * K < N:
        raise ValueError(f"capacity {cap} x {K} clusters cannot hold {N} items")
    d = sq_dists(R, C)  # (N, K)
    assign = np.full(N, -1, dtype=np.int64)
    load = np.zeros(K, dtype=np.int64)
    todo = np.arange(N)
    while len(todo):
        sub = d[todo]  # (M, K)
        sub[:, load >= cap] = np.inf
        choice = sub.argmin(1)  # (M,)
        dist = sub[np.arange(len(todo)), choice]
        order = np.lexsort((dist, choice))  # grouped by cluster, closest first
        ch = choice[order]
        rank = np.arange(len(ch)) - np.searchsorted(ch, ch, side="left")  # rank inside its cluster
        ok = rank < (cap - load)[ch]
        assign[todo[order[ok]]] = ch[ok]
        load += np.bincount(ch[ok], minlength=K)
        todo = todo[order[~ok]]
    return assign


def _kmeans_pp(R: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (as scikit-learn): each step draws 2 + ln k candidates by D^2
    sampling and keeps the one that lowers the potential most. Much more reliable than faiss's
    random init (which often merges two true clusters); costs O(N k D log k) in matrix products."""
    N = len(R)
    sq = (R * R).sum(1)  # (N,)
    trials = 2 + int(np.log(k))
    first = int(rng.integers(N))
    centers = [first]
    d2 = np.maximum(sq - 2.0 * (R @ R[first]) + sq[first], 0.0)  # (N,) to the nearest chosen center
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k: take any unchosen ones
            rest = np.setdiff1d(np.arange(N), centers)
            centers.extend(rest[: k - len(centers)].tolist())
            break
        cand = np.searchsorted(np.cumsum(d2, dtype=np.float64), rng.random(trials) * total, side="right")
        cand = np.minimum(cand, N - 1)  # (trials,)
        dc = np.maximum(sq[:, None] - 2.0 * (R @ R[cand].T) + sq[cand][None, :], 0.0)  # (N, trials)
        pot = np.minimum(d2[:, None], dc).sum(0)  # (trials,)
        best = int(pot.argmin())
        centers.append(int(cand[best]))
        d2 = np.minimum(d2, dc[:, best])
    return R[np.array(centers[:k])].copy()


def _kmeans(R: np.ndarray, k: int, niter: int, seed: int, verbose: bool) -> np.ndarray:
    import faiss

    km = faiss.Kmeans(R.shape[1], k, niter=niter, seed=seed, verbose=verbose,
                      min_points_per_centroid=1, max_points_per_centroid=1 << 20)
    km.train(R, init_centroids=_kmeans_pp(R, k, np.random.default_rng(seed)))
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, R.shape[1])  # (k, D)


def rq_kmeans(X: np.ndarray, levels: int = 3, codebook_size: int = 256, *, balanced: bool = False,
              niter: int = 25, seed: int = 0, verbose: bool = False, balanced_iters: int = 10) -> RQResult:
    """Residual k-means: level l clusters the residual left by levels < l.

    With `balanced`, each level starts from plain k-means and runs `balanced_iters` rounds of
    capped assignment (cap = ceil(N / C)) + centroid update; its codes respect the cap.
    """
    X = _as_matrix(X)
    if levels < 1 or codebook_size < 1:
        raise ValueError(f"levels and codebook_size must be >= 1, got {levels}, {codebook_size}")
    N = len(X)
    k = min(codebook_size, N)
    R = X.copy()  # (N, D) residual
    codes = np.empty((N, levels), dtype=np.int64)
    codebooks = []
    for level in range(levels):
        C = _kmeans(R, k, niter, seed + level, verbose)
        if balanced:
            cap = -(-N // k)
            for _ in range(balanced_iters):
                a = _balanced_assign(R, C, cap)
                sums = np.zeros_like(C)
                np.add.at(sums, a, R)
                counts = np.bincount(a, minlength=k)
                nz = counts > 0
                C[nz] = sums[nz] / counts[nz, None]
            a = _balanced_assign(R, C, cap)
        else:
            a = _nearest(R, C)
        codes[:, level] = a
        codebooks.append(C)
        R = R - C[a]
        if verbose:
            print(f"rq_kmeans level {level}: {len(np.unique(a))}/{k} codes used, "
                  f"residual mse {float((R * R).sum(1).mean()):.5f}")
    return RQResult(codes, codebooks, "rq_kmeans_balanced" if balanced else "rq_kmeans")


def assign_codes(X: np.ndarray, codebooks: list[np.ndarray]) -> np.ndarray:
    """(N, levels) int64 residual nearest-centroid codes of X against per-level codebooks."""
    R = _as_matrix(X).copy()
    if not codebooks:
        raise ValueError("assign_codes needs at least one codebook")
    codes = np.empty((len(R), len(codebooks)), dtype=np.int64)
    for level, cb in enumerate(codebooks):
        cb = np.ascontiguousarray(cb, dtype=np.float32)
        if cb.ndim != 2 or cb.shape[1] != R.shape[1]:
            raise ValueError(f"codebook {level} has shape {cb.shape}; expected (C, {R.shape[1]}) to match X")
        codes[:, level] = _nearest(R, cb)
        R = R - cb[codes[:, level]]
    return codes


def last_level_residual(Z: np.ndarray, codes: np.ndarray, codebooks: list[np.ndarray]) -> np.ndarray:
    """(N, D) float64: what the last level quantises, Z minus the centroids of the levels before."""
    R = np.asarray(Z, dtype=np.float64).copy()
    for level in range(len(codebooks) - 1):
        R -= codebooks[level][codes[:, level]]
    return R


def spread_last_level(rq: RQResult, X: np.ndarray) -> tuple[RQResult, int]:
    """-> (codes with distinct last codes inside each prefix where the codebook allows, items moved).

    Inside every prefix (the first levels - 1 codes) that holds a collision, last codes are
    matched greedily by distance over all (item, code) pairs of the prefix: the closest pair is
    fixed first, then the closest pair among the items and codes still free, and so on. An item
    whose nearest code no closer item claims keeps it. Prefixes without a collision are not
    touched. Where a prefix holds more items than the codebook has codes, the items left over
    keep their nearest code and collide (the dedup digit tells them apart).
    """
    X = _as_matrix(X)
    if len(X) != len(rq.codes):
        raise ValueError(f"X has {len(X)} rows but the codes cover {len(rq.codes)} items")
    codes = rq.codes.copy()
    N, L = codes.shape
    R = last_level_residual(rq.latent(X), codes, rq.codebooks)
    C = np.asarray(rq.codebooks[-1], dtype=np.float64)
    K = len(C)
    prefix = (np.unique(codes[:, :-1], axis=0, return_inverse=True)[1].reshape(-1) if L > 1
              else np.zeros(N, dtype=np.int64))
    _, full, sizes = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    crowded = np.unique(prefix[sizes[full.reshape(-1)] > 1])
    order = np.argsort(prefix, kind="stable")
    start = np.searchsorted(prefix[order], crowded, side="left")
    stop = np.searchsorted(prefix[order], crowded, side="right")
    for a, b in zip(start, stop):
        members = order[a:b]  # (m,) items of this prefix
        m = len(members)
        d = sq_dists(R[members], C)  # (m, K)
        new = d.argmin(1)  # leftovers (m > K) keep their nearest code
        free_item, free_code = np.ones(m, dtype=bool), np.ones(K, dtype=bool)
        left = min(m, K)
        for f in np.argsort(d, axis=None, kind="stable"):
            i, c = divmod(int(f), K)
            if free_item[i] and free_code[c]:
                new[i], free_item[i], free_code[c] = c, False, False
                left -= 1
                if not left:
                    break
        codes[members, -1] = new
    moved = int((codes[:, -1] != rq.codes[:, -1]).sum())
    return RQResult(codes, rq.codebooks, rq.method, rq.encoder), moved


def rq_vae(X: np.ndarray, levels: int = 3, codebook_size: int = 256, *, epochs: int = 100,
           latent_dim: int = 32, hidden: tuple[int, ...] = (256, 128), batch_size: int = 1024,
           lr: float = 1e-3, beta: float = 0.25, warmup_epochs: int | None = None, seed: int = 0,
           show_progress: bool = False) -> RQResult:
    """Train a small RQ-VAE and return its codes, latent-space codebooks and encoder weights.

    Schedule: `warmup_epochs` (default epochs // 10) of plain autoencoder training, then residual
    k-means on the encoded data initialises the codebooks, then `epochs` of RQ-VAE training with
    loss = recon MSE + sum_l (||sg(r_l) - e_l||^2 + beta ||r_l - sg(e_l)||^2). Codes unused during
    an epoch are reset to random residuals of that level (dead-code reset).
    """
    import torch
    from torch import nn
    from tqdm import tqdm

    X = _as_matrix(X)
    N, D = X.shape
    k = min(codebook_size, N)
    warmup = max(1, epochs // 10) if warmup_epochs is None else warmup_epochs

    def mlp(dims: list[int]) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = mlp([D, *hidden, latent_dim])
        dec = mlp([latent_dim, *reversed(hidden), D])
        books = nn.Parameter(torch.zeros(levels, k, latent_dim))  # (levels, k, latent)
        Xt = torch.from_numpy(X)
        gen = torch.Generator().manual_seed(seed)
        ae_opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=lr)
        for _ in range(warmup):
            for idx in torch.randperm(N, generator=gen).split(batch_size):
                loss = nn.functional.mse_loss(dec(enc(Xt[idx])), Xt[idx])
                ae_opt.zero_grad(set_to_none=True)
                loss.backward()
                ae_opt.step()
        with torch.no_grad():
            init = rq_kmeans(enc(Xt).numpy(), levels, k, niter=10, seed=seed)
            books.copy_(torch.from_numpy(np.stack(init.codebooks)))

        opt = torch.optim.Adam([*enc.parameters(), *dec.parameters(), books], lr=lr)
        bar = tqdm(range(epochs), desc="rq_vae", disable=not show_progress)
        for epoch in bar:
            used = torch.zeros(levels, k, dtype=torch.bool)
            for idx in torch.randperm(N, generator=gen).split(batch_size):
                x = Xt[idx]  # (B, D)
                z = enc(x)  # (B, latent)
                r, zq, qloss, last_res = z, torch.zeros_like(z), z.new_zeros(()), []
                for level in range(levels):
                    e_all = books[level]  # (k, latent)
                    code = torch.cdist(r.detach(), e_all.detach()).argmin(1)  # (B,)
                    e = e_all[code]  # (B, latent)
                    qloss = qloss + nn.functional.mse_loss(e, r.detach()) + beta * nn.functional.mse_loss(r, e.detach())
                    used[level, code] = True
                    last_res.append(r.detach())
                    zq = zq + e
                    r = r - e.detach()
                zst = z + (zq - z).detach()  # straight-through: decoder gradient flows to the encoder
                recon = nn.functional.mse_loss(dec(zst), x)
                loss = recon + qloss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if epoch < epochs - 1:
                with torch.no_grad():
                    for level in range(levels):
                        dead = (~used[level]).nonzero()[:, 0]
                        if len(dead):
                            pick = torch.randint(len(last_res[level]), (len(dead),), generator=gen)
                            books[level, dead] = last_res[level][pick]
            bar.set_postfix(recon=f"{recon.item():.5f}", q=f"{qloss.item():.5f}")

        with torch.no_grad():
            encoder = {}
            for i, lin in enumerate(m for m in enc if isinstance(m, nn.Linear)):
                encoder[f"layer{i}.weight"] = lin.weight.detach().numpy().astype(np.float32).copy()
                encoder[f"layer{i}.bias"] = lin.bias.detach().numpy().astype(np.float32).copy()
            codebooks = [books[level].detach().numpy().astype(np.float32).copy() for level in range(levels)]
    result = RQResult(np.zeros((N, levels), np.int64), codebooks, "rq_vae", encoder)
    return RQResult(result.assign(X), codebooks, "rq_vae", encoder)
