"""Adaptive Weight Disentanglement (arXiv 2411.18729): remove a shared redundant vector δ from the
task vectors before task arithmetic, chosen to make them as orthogonal as possible.

δ minimizes  L(δ) = mean over pairs i<j of |cos(τi − δ, τj − δ)| + α‖δ‖₂ / mean‖τi‖₂
and the merge is θ0 + λ Σ wi (τi − δ).  How δ is found, and why:

- The cosine term is a mean over pairs, so α weighs the same against it for any number of experts;
  the norm penalty is relative to the mean task-vector norm, so α is scale-free (with the raw ‖δ‖₂
  the penalty outweighs the cosine term, which is ≤ 1, as soon as norms exceed ~1/α).
- δ lies in the span of the task vectors, δ = mean‖τ‖ · Σj cj τj/‖τj‖, and Adam steps the n
  coefficients c from 0, its step size ``lr`` (in units of mean‖τ‖) decaying linearly to 0 so that it
  settles on the kinks of |cos| instead of oscillating around them.  The gradient of L lies in
  span{τ1..τn, δ}, so gradient descent from δ = 0 never leaves the span; a part of δ orthogonal to
  every τi only adds the same ‖δ⊥‖² to every inner product, pulling every cosine towards +1, and
  subtracts from the merge a direction no expert moved along.  The earlier fit, Adam on δ's raw
  coordinates with an absolute lr of 0.01, left the span through its per-coordinate steps (each about
  twice the RMS of the tiny zoo's task vectors) and entangled them: mean |cos| of upper + rot13 went
  from 0.097 to 0.869 with ‖δ‖ = 2.05 × mean‖τ‖.
- Everything is an inner product, so the fit needs only the task vectors' n × n Gram matrix (fp64):
  a statistics pass computes each tensor's, the driver sums them in tensor-name order (``scope:
  global``, one δ for the whole model) or keeps them apart (``scope: tensor``, one δ per tensor) and
  fits the n coefficients of δ = Σj kj τj; the merge pass builds δ's rows from the τ rows.  A step
  costs O(n²) whatever the model size, and neither scope holds more than one tensor in memory.
  Inner products are taken in units of mean‖τ‖² (|x| is smoothed as √(x² + 1e-8)), so the fit does
  not depend on the scale of the task vectors.
- Adam does not descend monotonically: the fit keeps the iterate with the lowest L and returns δ = 0
  when no iterate went below L(0).
``fit`` returns the coefficients with the fit's diagnostics (objective, mean |cos| before and after,
‖δ‖ / mean‖τ‖, best step), which the model card records (``describe``); ``fit_delta`` returns δ alone.
α is one value per merge; the paper's sweep is a study grid (``grid: {alpha: [...]}``), one merged
model per value.
Defaults (α 0.1, 300 steps, lr 0.01) come from a reimplementation; the paper body was not available.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from mergescale.merge_ops.registry import Method, MethodParams, register

#: smoothing of |x| and of the norms, in units of mean‖τ‖²
SMOOTH = 1e-8
#: columns of the task vectors per block of the Gram matrix (n × CHUNK fp64 at a time)
CHUNK = 1 << 20


@dataclass(frozen=True)
class Disentanglement:
    """A fitted redundant vector δ = Σj coefficients[j] · τj and what it did (the cosines: means over
    pairs of |cos|, not smoothed)."""

    coefficients: tuple[float, ...]  # all 0 when δ = 0
    objective_before: float  # L(0)
    objective_after: float  # L(δ); equal to L(0) when δ = 0
    cos_before: float  # mean |cos(τi, τj)|
    cos_after: float  # mean |cos(τi − δ, τj − δ)|
    delta_ratio: float  # ‖δ‖ / mean‖τi‖
    best_step: int  # the Adam step whose iterate δ is; 0 when δ = 0

    def delta(self, taus: list[torch.Tensor]) -> torch.Tensor:
        """δ from the task vectors (or the same rows of each: δ is linear in them)."""
        delta = torch.zeros_like(taus[0])
        if self.best_step > 0:
            for tau, k in zip(taus, self.coefficients, strict=True):
                delta.add_(tau, alpha=k)
        return delta

    def summary(self) -> dict:
        """The diagnostics, for the model card."""
        return {"objective": [round(self.objective_before, 6), round(self.objective_after, 6)],
                "mean_abs_cos": [round(self.cos_before, 6), round(self.cos_after, 6)],
                "delta_norm_ratio": round(self.delta_ratio, 6), "best_step": self.best_step}  # fmt: skip


def _gram(vectors: list[torch.Tensor]) -> torch.Tensor:
    """⟨vi, vj⟩ in fp64, accumulated over column blocks (neither a stacked copy nor an fp64 copy)."""
    gram = torch.zeros(len(vectors), len(vectors), dtype=torch.float64)
    for start in range(0, vectors[0].numel(), CHUNK):
        block = torch.stack([v[start : start + CHUNK] for v in vectors]).double()
        gram += block @ block.T
    return gram


def _cosines(gram: torch.Tensor, proj: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
    """cos(τi − δ, τj − δ) over pairs i<j from ⟨τi, τj⟩ (``gram``), ⟨τi, δ⟩ (``proj``) and ⟨δ, δ⟩ (``dd``),
    all in units of mean‖τ‖²: ⟨τi − δ, τj − δ⟩ = ⟨τi, τj⟩ − ⟨τi, δ⟩ − ⟨τj, δ⟩ + ⟨δ, δ⟩."""
    dots = gram - proj[:, None] - proj[None, :] + dd
    norms = torch.sqrt(dots.diagonal().clamp(min=0) + SMOOTH)
    i, j = torch.triu_indices(len(gram), len(gram), offset=1)
    return dots[i, j] / (norms[i] * norms[j])


def mean_abs_cos(taus: list[torch.Tensor], delta: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of |cos(τi − δ, τj − δ)| of flattened vectors."""
    gram = _gram([*taus, delta])
    scale = (gram.diagonal()[:-1].sqrt().mean() ** 2).clamp(min=1e-300)
    n = len(taus)
    return _cosines(gram[:n, :n] / scale, gram[:n, n] / scale, gram[n, n] / scale).abs().mean().float()


def fit(gram: torch.Tensor, alpha: float, steps: int, lr: float) -> Disentanglement:
    """Fit δ from the task vectors' fp64 Gram matrix ⟨τi, τj⟩ (n × n)."""
    n = len(gram)
    norms = gram.diagonal().clamp(min=0).sqrt()
    mean_norm = norms.mean()
    if n < 2 or mean_norm == 0:
        return Disentanglement((0.0,) * n, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
    g = gram / mean_norm**2  # ⟨τi, τj⟩ in units of mean‖τ‖²
    inv = torch.where(norms > 0, mean_norm / norms, torch.zeros_like(norms))  # τj/‖τj‖ = inv_j · τj/mean‖τ‖
    to_proj = g * inv[None, :]  # ⟨τi, δ⟩ = (to_proj @ c)_i
    to_dd = inv[:, None] * g * inv[None, :]  # ⟨δ, δ⟩ = cᵀ to_dd c

    def terms(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dd = c @ to_dd @ c
        return _cosines(g, to_proj @ c, dd), dd

    def objective(c: torch.Tensor) -> torch.Tensor:
        cos, dd = terms(c)
        return torch.sqrt(cos.square() + SMOOTH).mean() + alpha * torch.sqrt(dd + SMOOTH)

    c = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([c], lr=lr)
    losses = []
    best_c, best_step = c.detach().clone(), 0
    with torch.enable_grad():
        for step in range(steps + 1):
            loss = objective(c)
            losses.append(loss.item())
            if losses[-1] < losses[best_step]:
                best_c, best_step = c.detach().clone(), step
            if step == steps:
                break
            opt.zero_grad()
            loss.backward()
            opt.param_groups[0]["lr"] = lr * (1 - step / steps)
            opt.step()

    cos_before, _ = terms(torch.zeros_like(best_c))
    cos_after, dd = terms(best_c)
    return Disentanglement(
        coefficients=tuple((best_c * inv).tolist()) if best_step > 0 else (0.0,) * n,
        objective_before=losses[0],
        objective_after=losses[best_step],
        cos_before=cos_before.abs().mean().item(),
        cos_after=cos_after.abs().mean().item(),
        delta_ratio=dd.clamp(min=0).sqrt().item(),
        best_step=best_step,
    )


def disentangle(taus: list[torch.Tensor], alpha: float, steps: int, lr: float) -> Disentanglement:
    """Fit the redundant vector δ of flattened task vectors ``taus`` (all the same length)."""
    return fit(_gram(taus), alpha, steps, lr)


def fit_delta(taus: list[torch.Tensor], alpha: float, steps: int, lr: float) -> torch.Tensor:
    """The redundant vector δ of flattened task vectors ``taus`` (all the same length); see ``fit``."""
    return disentangle(taus, alpha, steps, lr).delta(taus)


#: the key of the whole model's fit in the statistics state (``scope: global``)
WHOLE_MODEL = "(whole model)"


@register
class AWD(Method):
    name = "awd"
    whole_merge = frozenset({"alpha", "steps", "lr", "scope"})  # one fit setting for every tensor

    class Params(MethodParams):
        weight: float = 1.0
        lambda_: float = Field(1.0, alias="lambda")
        alpha: float = Field(0.1, ge=0)
        steps: int = Field(300, ge=0)
        lr: float = Field(0.01, gt=0)
        scope: Literal["global", "tensor"] = "global"

    def stats_passes(self, params):
        return 1

    def rowwise(self, params):
        return True  # given the fitted coefficients, δ's rows are the same combination of the τ rows

    def tensor_stats(self, step, base, experts, params, ctx):
        return _gram([(e - base).reshape(-1) for e in experts]), params[0]

    def reduce(self, step, per_tensor, previous):
        """{tensor name: its fit} (``scope: tensor``) or {WHOLE_MODEL: one fit}, whose Gram matrix is the
        sum of the tensors' (in tensor-name order, so it does not depend on the sharding)."""
        names = sorted(per_tensor)
        p = per_tensor[names[0]][1]
        if p.scope == "tensor":
            return {name: fit(per_tensor[name][0], p.alpha, p.steps, p.lr) for name in names}
        gram = torch.zeros_like(per_tensor[names[0]][0])
        for name in names:
            gram += per_tensor[name][0]
        return {WHOLE_MODEL: fit(gram, p.alpha, p.steps, p.lr)}

    def describe(self, state):
        return {"scope": "global" if WHOLE_MODEL in state else "tensor",
                **{name: f.summary() for name, f in state.items()}}  # fmt: skip

    def merge(self, base, experts, params, ctx):
        p = params[0]
        taus = [e - base for e in experts]
        delta = ctx.stats[WHOLE_MODEL if p.scope == "global" else ctx.name].delta(taus)
        merged = sum(q.weight * (t - delta) for q, t in zip(params, taus, strict=True))
        return base + p.lambda_ * merged
