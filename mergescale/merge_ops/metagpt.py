"""MetaGPT (arXiv 2406.11385): task arithmetic with λt = ‖τt‖² / Σk ‖τk‖² over the whole model."""

from __future__ import annotations

from typing import Literal

import torch

from mergescale.merge_ops.registry import Method, MethodParams, register


def _sq_norms(base, experts) -> torch.Tensor:
    return torch.stack([(e.to(torch.float64) - base.to(torch.float64)).square().sum() for e in experts])


@register
class MetaGPT(Method):
    """One coefficient per expert, from its share of the squared task-vector norms (fp64, summed over
    every tensor; vocabularies: common rows only).  ``scope: tensor`` computes the shares per tensor
    — a streamable variant the paper does not define (non-canonical)."""

    name = "metagpt"
    whole_merge = frozenset({"scope"})
    per_expert = frozenset()

    class Params(MethodParams):
        scope: Literal["global", "tensor"] = "global"

    def stats_passes(self, params):
        return 1 if params[0].scope == "global" else 0

    def rowwise(self, params):
        return params[0].scope == "global"  # per-tensor shares need the whole tensor

    def tensor_stats(self, step, base, experts, params, ctx):
        return _sq_norms(base, experts)

    def reduce(self, step, per_tensor, previous):
        total = sum(per_tensor.values())
        return (total / total.sum()).tolist() if total.sum() > 0 else [1.0 / len(total)] * len(total)

    def merge(self, base, experts, params, ctx):
        if params[0].scope == "global":
            lam = ctx.stats
        else:
            sq = _sq_norms(base, experts)
            lam = (sq / sq.sum()).tolist() if sq.sum() > 0 else [1.0 / len(experts)] * len(experts)
        return base + sum(float(w) * (e - base) for w, e in zip(lam, experts, strict=True))
