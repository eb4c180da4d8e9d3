"""Sparsification masks of task vectors (TIES trimming, DARE, breadcrumbs, DELLA).

Every selection is exact and deterministic: equal magnitudes are ordered by flat index,
and random masks come from a generator seeded by (seed, tensor name, expert) — never
from global or worker state.
"""

from __future__ import annotations

import torch


def topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest magnitudes (ties: lowest flat index first)."""
    n = x.numel()
    k = int(density * n)
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    w = x.abs().reshape(-1)
    thr = torch.kthvalue(w, n - k + 1).values  # the k-th largest magnitude
    mask = w > thr
    need = k - int(mask.sum())
    if need > 0:
        mask[torch.nonzero(w == thr).reshape(-1)[:need]] = True
    return mask.reshape(x.shape)


def breadcrumbs_mask(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Drop the largest ``gamma`` fraction (outliers) and the smallest, so that ``int(density*n)`` remain."""
    n = x.numel()
    keep = int(density * n)
    if keep >= n:
        return torch.ones_like(x, dtype=torch.bool)
    n_top = int(gamma * n)
    n_bottom = max(0, n - keep - n_top)
    order = torch.sort(x.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_bottom : n_bottom + keep]] = True
    return mask.reshape(x.shape)


def bernoulli_probs(x: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: every element kept with probability ``density``."""
    return torch.full_like(x, float(density), dtype=torch.float32)


def della_probs(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA (MagPrune): per row, keep probability rises linearly with magnitude rank from d−ε to d+ε."""
    if not (0 < density - epsilon and density + epsilon <= 1):
        raise ValueError(f"della needs 0 < density - epsilon and density + epsilon <= 1 (got {density}, {epsilon})")
    rows = x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)
    m = rows.shape[1]
    ranks = torch.empty_like(rows, dtype=torch.float32)
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks.scatter_(1, order, torch.arange(m, dtype=torch.float32).expand_as(rows).contiguous())
    norm = ranks / max(m - 1, 1)
    return ((density - epsilon) + 2 * epsilon * norm).reshape(x.shape)


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A boolean mask drawn elementwise with ``probs`` from ``generator``."""
    return torch.rand(probs.shape, generator=generator) < probs


def rescale(masked: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, probs, how: str) -> torch.Tensor:
    """Rescale the survivors: ``inverse`` (÷ keep probability, unbiased), ``l1`` (match the L1 norm), ``none``."""
    if how == "none":
        return masked
    if how == "inverse":
        return torch.where(mask, masked / probs, masked)
    if how == "l1":
        before = original.abs().sum(dtype=torch.float64)
        after = masked.abs().sum(dtype=torch.float64)
        if before < 1e-7 or after < 1e-7:
            return masked
        return masked * (before / after).to(masked.dtype)
    raise ValueError(f"unknown rescale {how!r}")
