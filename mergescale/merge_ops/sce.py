"""SCE: select, calculate, erase (FuseChat-2, arXiv 2408.07990; ``docs/ALGORITHMS.md#sce``)."""

from __future__ import annotations

import torch
from pydantic import Field

from mergescale.merge_ops.registry import Method, MethodParams, register


@register
class SCE(Method):
    """θ0 + Σ wi mi τi / max(Σ wi mi, 1e-6), per tensor:

    1. *select*: with ``select_topk`` < 1, keep the int(select_topk × #nonzero) elements whose task values
       vary most across the experts (population variance; one mask for every expert), zero the rest;
    2. *calculate*: wi = mean(τi²) over the tensor, normalized to sum 1 (uniform when the sum is below 1e-6);
    3. *erase*: mi keeps the elements whose sign agrees with the sign of Σ τ (+ where the sum is 0; a zero
       element agrees with neither sign and is dropped).

    In fp32.  The paper and mergekit agree on these steps; the top-k ties are broken as ``torch.topk`` does.
    """

    name = "sce"
    per_expert = frozenset()

    class Params(MethodParams):
        select_topk: float = Field(1.0, ge=0, le=1)

    def merge(self, base, experts, params, ctx):
        tau = torch.stack([e - base for e in experts])
        keep = params[0].select_topk
        if keep < 1:
            tau = tau * _select(tau, keep).unsqueeze(0)
        majority = torch.where(tau.sum(dim=0) >= 0, 1.0, -1.0)
        agree = (tau.sign() == majority).to(tau.dtype)
        energy = tau.square().reshape(len(experts), -1).mean(dim=1)
        total = energy.sum().item()
        weights = torch.full_like(energy, 1.0 / len(experts)) if abs(total) < 1e-6 else energy / total
        weights = weights.reshape(-1, *([1] * base.dim())) * agree
        return base + (tau * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)


def _select(tau: torch.Tensor, keep: float) -> torch.Tensor:
    """The mask of the int(keep × #nonzero) elements of highest variance across the experts."""
    variance = torch.var(tau, dim=0, unbiased=False)
    mask = torch.zeros_like(variance)
    k = int(torch.count_nonzero(variance) * keep)
    if k > 0:
        mask.view(-1)[torch.topk(variance.abs().view(-1), k=k).indices] = 1
    return mask
