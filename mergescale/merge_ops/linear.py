"""Weight averaging and task arithmetic (ALGORITHMS.md, "linear" and "task_arithmetic")."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
    for expert, w in zip(experts, weights, strict=False):
        delta.add_(expert.to(torch.float32) - base32, alpha=float(w))
    return (base32 + lam * delta).to(base.dtype)
