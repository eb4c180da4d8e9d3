"""RAM and RAM+ (tensor-local): Reinforced Agent Merging (Yuan et al. 2026, arXiv 2601.13572):
average what several experts changed, keep whole what one expert changed (``docs/ALGORITHMS.md#ram``)."""

from __future__ import annotations

import torch
from pydantic import Field

from mergescale.merge_ops.registry import Method, MethodParams, register


def _parts(base: torch.Tensor, experts: list[torch.Tensor], epsilon: float):
    """The task vectors (n × elements) with their changed entries only (|τ| > ε), which entries each expert
    changed, and how many experts changed each element."""
    tau = torch.stack([(e - base).reshape(-1) for e in experts])
    changed = tau.abs() > epsilon
    count = changed.sum(dim=0, keepdim=True)
    return tau * changed, changed, count


def _combine(base, tau, count, unique_scale) -> torch.Tensor:
    unique = (count == 1).to(tau.dtype)
    shared = (count > 1).to(tau.dtype)
    merged = (tau * unique * unique_scale + tau * shared / count.clamp(min=1)).sum(dim=0)
    return base + merged.reshape(base.shape)


@register
class RAM(Method):
    """θ0 + Σ over elements: the one expert's τ where exactly one expert changed it (|τ| > ε), the mean of the
    changed τ where several did, nothing where none did.  Per tensor, in fp32."""

    name = "ram"
    per_expert = frozenset()

    class Params(MethodParams):
        epsilon: float = Field(1e-5, ge=0)

    def rowwise(self, params):
        return True  # every element is decided by its own values

    def merge(self, base, experts, params, ctx):
        tau, _, count = _parts(base, experts, params[0].epsilon)
        return _combine(base, tau, count, 1.0)


@register
class RAMPlusTL(Method):
    """RAM with each expert's unique entries scaled by 1 + r · clamp(ρi, 0, α), ρi = (its changed entries that
    others changed too) / (its changed entries no other changed, floored at ε), counted **in this tensor**
    (mergekit's tensor-local RAM+; the paper's RAM+ counts over the whole model)."""

    name = "ramplus_tl"
    per_expert = frozenset()

    class Params(MethodParams):
        r: float = Field(0.1, ge=0)
        alpha: float = Field(0.2, ge=0)
        epsilon: float = Field(1e-5, ge=0)

    def merge(self, base, experts, params, ctx):
        p = params[0]
        tau, changed, count = _parts(base, experts, p.epsilon)
        shared_n = (changed & (count > 1)).sum(dim=1)
        unique_n = (changed & (count == 1)).sum(dim=1)
        rho = shared_n / unique_n.clamp(min=p.epsilon)
        scale = (1 + p.r * rho.clamp(min=0, max=p.alpha)).unsqueeze(-1)
        return _combine(base, tau, count, scale)
