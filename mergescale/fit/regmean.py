"""RegMean (arXiv 2212.09849): each linear layer merged in closed form from its inputs' Gram matrices
(``docs/ALGORITHMS.md#regmean``).

Fit: for every linear layer, Gi = Xiᵀ Xi / N over the real tokens its input takes in expert i on
expert i's inputs (prompt + the expert's greedy continuation), accumulated in fp64 and written to
``expert-<i>.safetensors`` keyed by the layer's weight name.  Map: G̃i = a·Gi + (1 − a)·diag(Gi),
W* = (Σ G̃i)⁻¹ Σ G̃i Wiᵀ (transposed back), solved in fp64 with a ridge of ``ridge`` × the mean diagonal.
Every other tensor (embeddings, norms, biases) is the plain average.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergescale.fit.method import DataParams, StatisticsMethod
from mergescale.fit.model import Batch
from mergescale.merge_ops.registry import register

BATCH = 16


def linear_inputs_gram(module, params: dict[str, torch.Tensor], batches: list[Batch]) -> dict[str, torch.Tensor]:
    """Σ xᵀx / N (fp64) of the input of every ``nn.Linear`` whose weight is in ``params``, over real tokens."""
    from torch.func import functional_call

    grams: dict[str, torch.Tensor] = {}
    tokens = 0
    real: torch.Tensor | None = None
    hooks = []
    for name, mod in module.named_modules():
        if isinstance(mod, torch.nn.Linear) and f"{name}.weight" in params:

            def keep(m, args, key=f"{name}.weight"):
                x = args[0][real].double()
                grams[key] = grams.get(key, 0) + x.T @ x

            hooks.append(mod.register_forward_pre_hook(keep))
    try:
        with torch.no_grad():
            for batch in batches:
                real = batch.mask.bool()
                tokens += int(real.sum())
                kwargs = {"input_ids": batch.ids, "attention_mask": batch.mask, "use_cache": False}
                functional_call(module, params, (), kwargs, strict=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: v / max(tokens, 1) for k, v in grams.items()}


def regmean(weights: list[torch.Tensor], grams: list[torch.Tensor], alpha: float, ridge: float) -> torch.Tensor:
    """W* = (Σ G̃i)⁻¹ Σ G̃i Wiᵀ, transposed back to ``[out, in]``; G̃ = α·G + (1 − α)·diag(G); fp64."""
    scaled = [alpha * g.double() + (1 - alpha) * torch.diag(torch.diagonal(g.double())) for g in grams]
    total = sum(scaled)
    rhs = sum(g @ w.double().T for g, w in zip(scaled, weights, strict=True))
    eye = torch.eye(total.shape[0], dtype=torch.float64, device=total.device)
    return torch.linalg.solve(total + ridge * float(torch.diagonal(total).mean()) * eye, rhs).T


@register
class RegMean(StatisticsMethod):
    name = "regmean"
    default_count = 256

    class Params(DataParams):
        alpha: float = Field(0.1, ge=0.0, le=1.0)  # scale of the Gram matrices' off-diagonal entries
        ridge: float = Field(1e-6, ge=0.0)  # relative to the mean diagonal of Σ G̃i

    def expert_statistics(self, module, params, examples, pad, hp):
        device = next(iter(params.values())).device
        parts = [examples[j : j + BATCH] for j in range(0, len(examples), BATCH)]
        batches = [Batch.of([e.ids for e in part], [len(e.prompt) for e in part], pad, device) for part in parts]
        return linear_inputs_gram(module, params, batches)

    def digest(self, statistics):
        return len(statistics)

    def summarize(self, digests, hp):
        return {"linear_layers": digests[-1] if digests else 0, "alpha": hp.alpha}

    def merge(self, base, experts, params, ctx):
        if ctx.aux is None or experts[0].dim() != 2:
            return sum(experts) / len(experts)
        return regmean(experts, ctx.aux, params[0].alpha, params[0].ridge).float()
