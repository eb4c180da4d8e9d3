"""Fisher merging (arXiv 2111.09832): a weighted average by diagonal Fisher information
(``docs/ALGORITHMS.md#fisher``).

Fit: for expert i on its inputs, Fi = the mean over examples of the squared gradient of the expert's
log-likelihood of its own greedy continuation (one backward pass per example), written to
``expert-<i>.safetensors``.  Map: θ* = Σ wi (Fi + ε) θi / Σ wi (Fi + ε) — with ε = 1e-6, a tensor no
example touched falls back to the weighted average.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergescale.fit.method import DataParams, StatisticsMethod
from mergescale.fit.model import Batch, continuation_logprobs
from mergescale.merge_ops.registry import register


def diagonal_fisher(module, params: dict[str, torch.Tensor], examples, pad: int) -> dict[str, torch.Tensor]:
    """Mean over ``examples`` of (∇ log p(continuation | prompt))², per tensor (fp32)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    for e in examples:
        batch = Batch.of([e.ids], [len(e.prompt)], pad, next(iter(params.values())).device)
        logp = continuation_logprobs(module, leaves, batch)
        targets = torch.tensor(e.continuation, device=logp.device)
        ll = logp.gather(1, targets[:, None]).sum()
        grads = torch.autograd.grad(ll, list(leaves.values()), allow_unused=True)
        for (k, _), g in zip(leaves.items(), grads, strict=True):
            if g is not None:
                fisher[k] += g.detach() ** 2
    return {k: v / max(len(examples), 1) for k, v in fisher.items()}


@register
class Fisher(StatisticsMethod):
    name = "fisher"
    per_expert = frozenset({"weight"})
    default_count = 256

    class Params(DataParams):
        weight: float = 1.0
        epsilon: float = Field(1e-6, ge=0.0)

    def expert_statistics(self, module, params, examples, pad, hp):
        return diagonal_fisher(module, params, examples, pad)

    def digest(self, statistics):
        return round(float(sum(v.double().sum() for v in statistics.values())), 6)

    def summarize(self, digests, hp):
        return {"fisher_trace": digests}

    def merge(self, base, experts, params, ctx):
        eps = params[0].epsilon
        if ctx.aux is None:
            fishers = [torch.zeros_like(e) for e in experts]
        else:
            fishers = [f.to(e.device, torch.float32) for f, e in zip(ctx.aux, experts, strict=True)]
        num = sum(p.weight * (f + eps) * e for p, f, e in zip(params, fishers, experts, strict=True))
        den = sum(p.weight * (f + eps) for p, f in zip(params, fishers, strict=True))
        return num / den
