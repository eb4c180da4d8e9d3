"""Model Stock (arXiv 2403.19522): interpolate the experts' mean toward the base by their agreement."""

from __future__ import annotations

import torch

from mergescale.merge_ops.registry import Method, MethodParams, register


@register
class ModelStock(Method):
    """c = mean pairwise cos(τi, τj); t = n·c / (1 + (n−1)c); result t·mean(θi) + (1−t)·θ0.

    ``clamp`` keeps t in [0, 1] (the paper's range; mergekit does not clamp, and its
    configs are imported with ``clamp: false``).  ``filter_wise`` measures angles per row.
    """

    name = "model_stock"
    min_experts = 2  # the angle between task vectors needs two of them
    per_expert = frozenset()

    class Params(MethodParams):
        clamp: bool = True
        filter_wise: bool = False

    def merge(self, base, experts, params, ctx):
        p = params[0]
        shape = base.shape
        if p.filter_wise:
            b = base.unsqueeze(0) if base.dim() == 1 else base
            xs = [e.unsqueeze(0) if e.dim() == 1 else e for e in experts]
        else:
            b, xs = base.reshape(-1), [e.reshape(-1) for e in experts]
        deltas = [x - b for x in xs]
        cosines = []
        for i in range(len(deltas)):
            for j in range(i + 1, len(deltas)):
                den = torch.linalg.vector_norm(deltas[i], dim=-1) * torch.linalg.vector_norm(deltas[j], dim=-1)
                cosines.append(((deltas[i] * deltas[j]).sum(-1) / den.clamp(min=1e-6)).clamp(-1, 1))
        c = torch.stack(cosines).mean(0).unsqueeze(-1)
        n = len(experts)
        den = 1 + (n - 1) * c
        singular = den.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))
        if p.clamp:
            t = t.clamp(0, 1)
        mean = sum(xs) / n
        return (t * mean + (1 - t) * b).reshape(shape)
