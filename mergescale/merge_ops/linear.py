"""Weight averaging and task arithmetic (ALGORITHMS.md, "linear" and "task_arithmetic")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergescale.merge_ops.registry import Method, MethodParams, register


def task_arithmetic(
    base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float], lam: float = 1.0
) -> torch.Tensor:
    """θ0 + λ Σ wi (θi − θ0), computed in fp32 and cast back to the base's dtype.

    Negation is a negative weight; an analogy C + B − A is weights (+1, +1, −1).
    """
    if len(experts) != len(weights):
        raise ValueError(f"task_arithmetic: {len(experts)} experts but {len(weights)} weights")
    base32 = base.to(torch.float32)
    delta = torch.zeros_like(base32)
    diff = torch.empty_like(base32)  # one scratch buffer: no fresh allocation per expert
    for expert, w in zip(experts, weights, strict=True):
        torch.sub(expert, base32, out=diff)  # a bf16 / fp16 expert is promoted exactly, in the kernel
        delta.add_(diff, alpha=float(w))
    return delta.mul_(lam).add_(base32).to(base.dtype)


@register
class Linear(Method):
    """Σ wi θi / Σ wi (model soups); a plain weighted sum when ``normalize`` is false."""

    name = "linear"
    needs_base = False

    class Params(MethodParams):
        weight: float = 1.0
        normalize: bool = True

    def rowwise(self, params):
        return True

    def merge(self, base, experts, params, ctx):
        weights = [p.weight for p in params]
        out = sum(w * e for w, e in zip(weights, experts, strict=True))
        total = sum(weights)
        if params[0].normalize and abs(total) >= 1e-8:
            out = out / total
        return out


@register
class TaskArithmetic(Method):
    """θ0 + λ Σ wi τi (negation: a negative weight; analogies: signed weights)."""

    name = "task_arithmetic"
    experts_as_stored = True

    class Params(MethodParams):
        weight: float = 1.0
        lambda_: float = Field(1.0, alias="lambda")
        normalize: bool = False

    def rowwise(self, params):
        return True

    def merge(self, base, experts, params, ctx):
        weights = [p.weight for p in params]
        total = sum(weights)
        if params[0].normalize and abs(total) >= 1e-8:
            weights = [w / total for w in weights]
        return task_arithmetic(base, experts, weights, params[0].lambda_)
