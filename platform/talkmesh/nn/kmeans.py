"""k-means in torch: k-means++ seeding (Arthur & Vassilvitskii, 2007) and Lloyd iterations,
deterministic for a seed (its own ``torch.Generator``; the global RNG is untouched).

    result = kmeans(x, k=8, iters=50, seed=0)   # x (N, D)
    labels = assign(y, result.centroids)        # (M,)

An empty cluster in an iteration is re-seeded with the point farthest from its centroid
(deterministic), so exactly ``k`` distinct clusters come back whenever ``x`` holds at least
``k`` distinct points.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["KMeansResult", "assign", "kmeans", "pairwise_sq_dists"]


class KMeansResult(NamedTuple):
    centroids: torch.Tensor  # (k, D)
    labels: torch.Tensor  # (N,) long
    inertia: float  # sum of squared distances to the assigned centroids
    iterations: int  # Lloyd iterations run (stops early when the labels no longer change)


def pairwise_sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances (N, k) between rows of x (N, D) and c (k, D)."""
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.t() + c.pow(2).sum(1)[None]).clamp_min(0.0)


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Nearest-centroid labels (N,) of x (N, D), in chunks of ``chunk`` rows."""
    if x.ndim != 2 or centroids.ndim != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"assign: x (N, D) and centroids (k, D) expected, got {tuple(x.shape)}, {tuple(centroids.shape)}"
        )
    c = centroids.to(x)
    return torch.cat([pairwise_sq_dists(x[i : i + chunk], c).argmin(1) for i in range(0, x.shape[0], chunk)])


def _plusplus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [x[first]]
    d2 = pairwise_sq_dists(x, x[first : first + 1])[:, 0]  # (N,)
    for _ in range(1, k):
        total = d2.sum()
        if float(total) <= 0.0:  # every point sits on a centroid: take any not chosen
            nxt = int(torch.randint(n, (1,), generator=gen))
        else:
            nxt = int(torch.multinomial((d2 / total).to(torch.float64).cpu(), 1, generator=gen))
        centroids.append(x[nxt])
        d2 = torch.minimum(d2, pairwise_sq_dists(x, x[nxt : nxt + 1])[:, 0])
    return torch.stack(centroids)


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0, tol: float = 0.0) -> KMeansResult:
    """Cluster x (N, D) into k clusters: k-means++ seeds, then up to ``iters`` Lloyd steps.
    Float32/64 on x's device; the seeding generator lives on the CPU."""
    if x.ndim != 2:
        raise ValueError(f"kmeans: x must be (N, D), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if k < 1:
        raise ValueError(f"kmeans: k must be >= 1, got {k}")
    if n < k:
        raise ValueError(f"kmeans: {n} points cannot form k={k} clusters (need at least k)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("kmeans: x holds non-finite values")
    x = x.to(torch.float32) if not x.is_floating_point() else x
    gen = torch.Generator().manual_seed(int(seed))
    centroids = _plusplus(x, k, gen)
    labels = torch.full((n,), -1, dtype=torch.long, device=x.device)
    it = 0
    for it in range(1, iters + 1):
        d2 = pairwise_sq_dists(x, centroids)  # (N, k)
        new = d2.argmin(1)
        if torch.equal(new, labels):
            it -= 1
            break
        labels = new
        counts = torch.bincount(labels, minlength=k)  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)  # (k, D)
        moved = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:  # re-seed empty clusters with the worst-fitted points (distinct, deterministic)
            err = d2.gather(1, labels[:, None])[:, 0]
            worst = torch.argsort(err, descending=True, stable=True)[: len(empty)]
            moved[empty] = x[worst]
        shift = float((moved - centroids).pow(2).sum())
        centroids = moved
        if shift <= tol and not empty:
            break
    labels = assign(x, centroids)
    inertia = float(pairwise_sq_dists(x, centroids).gather(1, labels[:, None]).sum())
    return KMeansResult(centroids, labels, inertia, it)
