"""Adaptive Weight Disentanglement (arXiv 2411.18729): remove a shared redundant vector δ from the
task vectors before task arithmetic, chosen to make them as orthogonal as possible.

δ (init 0, fp32) minimizes  mean over pairs i≠j of |cos(τi − δ, τj − δ)| + α‖δ‖₂ / mean‖τi‖₂
(|x| smoothed near 0) with Adam.  The norm penalty is taken relative to the mean task-vector norm
so that α is scale-free: with the raw ‖δ‖₂ the penalty outweighs the cosine term (≤ 1) as soon as
the task vectors' norms exceed ~1/α, as they do for any real model, and δ stays at 0.
The merge is then θ0 + λ Σ wi (τi − δ).  ``scope: global`` (default) fits one δ
over the whole model: its statistics pass holds every task vector in memory (n × model size), so
for models that do not fit use ``scope: tensor``, which fits δ per tensor and streams.
Defaults (α 0.1, 300 steps, lr 0.01) come from a reimplementation; the paper body was not available.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mergescale.merge_ops.registry import Method, MethodParams, register

SMOOTH = 1e-8


def _abs_cos(gram: torch.Tensor, proj: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of the smoothed |cos(τi − δ, τj − δ)| from ⟨τi, τj⟩ (``gram``), ⟨τi, δ⟩ (``proj``)
    and ⟨δ, δ⟩ (``dd``): ⟨τi − δ, τj − δ⟩ = ⟨τi, τj⟩ − ⟨τi, δ⟩ − ⟨τj, δ⟩ + ⟨δ, δ⟩."""
    dots = gram - proj[:, None] - proj[None, :] + dd
    norms = torch.sqrt(dots.diagonal().clamp(min=0) + SMOOTH)
    i, j = torch.triu_indices(len(gram), len(gram), offset=1)
    cos = dots[i, j] / (norms[i] * norms[j])
    return torch.sqrt(cos.square() + SMOOTH).mean()


def _gram(stacked: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """⟨τi, τj⟩ in fp64, accumulated over column chunks (no fp64 copy of the task vectors)."""
    gram = torch.zeros(len(stacked), len(stacked), dtype=torch.float64)
    for start in range(0, stacked.shape[1], chunk):
        block = stacked[:, start : start + chunk].double()
        gram += block @ block.T
    return gram


def mean_abs_cos(taus: list[torch.Tensor], delta: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of the smoothed |cos(τi − δ, τj − δ)| of flattened vectors."""
    stacked = torch.stack(taus)
    return _abs_cos(_gram(stacked), (stacked @ delta).double(), torch.dot(delta, delta).double()).float()


def fit_delta(taus: list[torch.Tensor], alpha: float, steps: int, lr: float) -> torch.Tensor:
    """The redundant vector δ of flattened task vectors ``taus`` (all the same length).

    The n × n Gram matrix of the task vectors is computed once (fp64); a step then costs two
    matrix-vector products with the stacked task vectors, whatever the number of pairs."""
    if len(taus) < 2:
        return torch.zeros_like(taus[0])
    stacked = torch.stack(taus)
    gram = _gram(stacked)
    scale = gram.diagonal().sqrt().mean().clamp(min=1e-12)
    delta = torch.zeros_like(taus[0], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr, fused=True)
    with torch.enable_grad():
        for _ in range(steps):
            dd = torch.dot(delta, delta).double()
            loss = _abs_cos(gram, (stacked @ delta).double(), dd) + alpha * torch.sqrt(dd + SMOOTH) / scale
            opt.zero_grad()
            loss.backward()
            opt.step()
    return delta.detach()


@register
class AWD(Method):
    name = "awd"

    class Params(MethodParams):
        weight: float = 1.0
        lambda_: float = Field(1.0, alias="lambda")
        alpha: float = Field(0.1, ge=0)
        steps: int = Field(300, ge=0)
        lr: float = Field(0.01, gt=0)
        scope: Literal["global", "tensor"] = "global"

    def stats_passes(self, params):
        return 1 if params[0].scope == "global" else 0

    def tensor_stats(self, step, base, experts, params, ctx):
        return [(e - base).reshape(-1) for e in experts], params[0]

    def reduce(self, step, per_tensor, previous):
        names = sorted(per_tensor)
        p = per_tensor[names[0]][1]
        n = len(per_tensor[names[0]][0])
        taus = [torch.cat([per_tensor[name][0][i] for name in names]) for i in range(n)]
        delta = fit_delta(taus, p.alpha, p.steps, p.lr)
        out, start = {}, 0
        for name in names:
            size = per_tensor[name][0][0].numel()
            out[name] = delta[start : start + size].clone()
            start += size
        return out

    def merge(self, base, experts, params, ctx):
        p = params[0]
        taus = [(e - base).reshape(-1) for e in experts]
        delta = ctx.stats[ctx.name] if p.scope == "global" else fit_delta(taus, p.alpha, p.steps, p.lr)
        merged = sum(q.weight * (t - delta) for q, t in zip(params, taus, strict=True))
        return base + p.lambda_ * merged.reshape(base.shape)
