"""Arcee Fusion: take the expert's change only where it is an outlier of importance
(``docs/ALGORITHMS.md#arcee_fusion``)."""

from __future__ import annotations

import torch

from mergescale.merge_ops.registry import Method, MethodParams, register


@register
class ArceeFusion(Method):
    """θ0 + (θ1 − θ0) ⊙ [importance ≥ median + 1.5 IQR], one expert beside the base, per tensor.

    importance = |θ1 − θ0| times, per row (the last axis), KL(softmax(θ1) ‖ softmax(θ0)) of that row's values
    (each softmax + 1e-8).  The quartiles are order statistics of the whole tensor's importance at the
    indices ⌊q (N − 1)⌋, q = 1/4, 1/2, 3/4.  No paper: defined by mergekit's implementation; mergekit
    estimates the quartiles of a tensor of more than 10^6 elements from an unseeded random sample, where
    mergescale uses the exact order statistics (same bytes on every run).  In fp32.
    """

    name = "arcee_fusion"
    n_experts = 1
    per_expert = frozenset()

    class Params(MethodParams):
        pass

    def merge(self, base, experts, params, ctx):
        expert = experts[0]
        p = torch.softmax(expert, dim=-1) + 1e-8
        q = torch.softmax(base, dim=-1) + 1e-8
        kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
        importance = (expert - base).abs() * kl
        flat = importance.reshape(-1)
        n = flat.numel()
        q1, median, q3 = (flat.kthvalue((n - 1) * k // 4 + 1).values for k in (1, 2, 3))
        keep = (importance >= median + 1.5 * (q3 - q1)).to(base.dtype)
        return base + (expert - base) * keep
