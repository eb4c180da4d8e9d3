"""Fisher merging (arXiv 2111.09832): a weighted average by diagonal Fisher information
(ALGORITHMS.md, "fisher").

Fit: for expert i on its inputs, Fi = the mean over examples of the squared gradient of the expert's
log-likelihood of its own greedy continuation (one backward pass per example), written to
``expert-<i>.safetensors``.  Map: θ* = Σ wi (Fi + ε) θi / Σ wi (Fi + ε) — with ε = 1e-6, a tensor no
example touched falls back to the weighted average.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from mergescale.fit.data import read_examples
from mergescale.fit.method import DataDriven, DataParams, FitInputs, FitResult
from mergescale.fit.model import Batch, continuation_logprobs, load_module, read_tensors, weight_names
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
class Fisher(DataDriven):
    name = "fisher"
    needs_base = False
    per_expert = frozenset({"weight"})
    default_count = 256

    class Params(DataParams):
        weight: float = 1.0
        epsilon: float = Field(1e-6, ge=0.0)

    def fit(self, inputs: FitInputs, params) -> FitResult:
        module = load_module(inputs.experts[0], inputs.device)
        names = weight_names(module, inputs.experts[0])
        pad = module.config.pad_token_id if module.config.pad_token_id is not None else 0
        out = Path(inputs.workdir)
        out.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        totals = []
        for i, (path, data) in enumerate(zip(inputs.experts, inputs.data, strict=True)):
            params_i = read_tensors(path, names, inputs.device)
            fisher = diagonal_fisher(module, params_i, read_examples(data.reference), pad)
            save_file({k: v.cpu().contiguous() for k, v in fisher.items()}, str(out / f"expert-{i}.safetensors"))
            totals.append(float(sum(v.double().sum() for v in fisher.values())))
        return FitResult(statistics=str(out), summary={"fisher_trace": [round(t, 6) for t in totals]})

    def merge(self, base, experts, params, ctx):
        eps = params[0].epsilon
        if ctx.aux is None:
            fishers = [torch.zeros_like(e) for e in experts]
        else:
            fishers = [f.to(e.device, torch.float32) for f, e in zip(ctx.aux, experts, strict=True)]
        num = sum(p.weight * (f + eps) * e for p, f, e in zip(params, fishers, experts, strict=True))
        den = sum(p.weight * (f + eps) for p, f in zip(params, fishers, strict=True))
        return num / den
