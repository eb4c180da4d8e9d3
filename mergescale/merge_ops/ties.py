"""Sparsified and sign-elected task arithmetic: TIES, DARE, breadcrumbs, DELLA (ALGORITHMS.md).

Every member computes, for each expert i, a sparsified task vector τ'i = sparsify(θi − θ0),
weights it by wi, optionally elects a sign per element (TIES: the sign of Σ wi τ'i; only
entries agreeing with it survive), sums, optionally divides by the summed weights of the
surviving entries (``normalize``: TIES' disjoint mean), scales by λ and adds θ0.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from mergescale.merge_ops import sparsify as sp
from mergescale.merge_ops.registry import Method, MethodParams, TensorContext, register

Rescale = Literal["inverse", "l1", "none"]


def combine(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    elect: bool,
    normalize: bool,
    lam: float,
) -> torch.Tensor:
    """θ0 + λ · (Σ wi τ'i [agreeing]) / (Σ wi [agreeing] if normalize)."""
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, *([1] * base.dim()))
    weighted = stacked * w
    if elect:
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        keep = stacked.sign() == majority
        mixed = (weighted * keep).sum(0)
        divisor = (w * keep).sum(0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(0)
        divisor = w.sum()
        divisor = divisor if divisor.abs() >= 1e-8 else torch.ones_like(divisor)
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


class _Family(Method):
    needs_base = True
    elect: ClassVar[bool]
    per_expert = frozenset({"weight", "density", "gamma", "epsilon"})

    def sparsify(self, delta: torch.Tensor, p, ctx: TensorContext, i: int) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, base, experts, params, ctx):
        deltas = [self.sparsify(e - base, p, ctx, i) for i, (e, p) in enumerate(zip(experts, params, strict=True))]
        p0 = params[0]
        return combine(
            base, deltas, [p.weight for p in params], elect=self.elect, normalize=p0.normalize, lam=p0.lambda_
        )


class _TopK(_Family):
    def sparsify(self, delta, p, ctx, i):
        return delta * sp.topk_mask(delta, p.density)


class _Dare(_Family):
    def sparsify(self, delta, p, ctx, i):
        if p.density >= 1:
            return delta
        probs = sp.bernoulli_probs(delta, p.density)
        mask = sp.sample(probs, ctx.generator(i))
        return sp.rescale(delta * mask, delta, mask, probs, p.rescale)


class _Breadcrumbs(_Family):
    def sparsify(self, delta, p, ctx, i):
        return delta * sp.breadcrumbs_mask(delta, p.density, p.gamma)


class _Della(_Family):
    def sparsify(self, delta, p, ctx, i):
        if p.density >= 1:
            return delta
        probs = sp.della_probs(delta, p.density, p.epsilon)
        mask = sp.sample(probs, ctx.generator(i))
        return sp.rescale(delta * mask, delta, mask, probs, p.rescale)


class _Common(MethodParams):
    weight: float = 1.0
    lambda_: float = Field(1.0, alias="lambda")


@register
class Ties(_TopK):
    """TIES.  ``scope: tensor`` trims each task vector per tensor (mergekit's choice);
    ``scope: global`` keeps each expert's top-d magnitudes over its whole task vector (the
    paper's), found exactly by two statistics passes without materializing the model."""

    name = "ties"
    elect = True

    class Params(_Common):
        density: float = Field(0.2, ge=0, le=1)
        normalize: bool = True
        scope: Literal["tensor", "global"] = "tensor"

    def stats_passes(self, params):
        return 2 if params[0].scope == "global" else 0

    def tensor_stats(self, step, base, experts, params, ctx):
        deltas = [e - base for e in experts]
        if step == 0:
            return [(sp.bit_histogram(d), d.numel(), p.density) for d, p in zip(deltas, params, strict=True)]
        return [sp.bin_values(d, b) for d, (b, _) in zip(deltas, ctx.stats["bins"], strict=True)]

    def reduce(self, step, per_tensor, previous):
        names = sorted(per_tensor)
        n_experts = len(per_tensor[names[0]])
        if step == 0:
            bins = []
            for i in range(n_experts):
                hist = sum(per_tensor[n][i][0] for n in names)
                total = sum(per_tensor[n][i][1] for n in names)
                k = int(per_tensor[names[0]][i][2] * total)
                bins.append((-1, 0) if k <= 0 else (BINS_ALL, 0) if k >= total else sp.boundary_bin(hist, k))
            return {"bins": bins}
        keep = []
        for i, (b, need) in enumerate(previous["bins"]):
            if b == -1:  # keep nothing
                keep.append(((1 << 31) - 1, dict.fromkeys(names, 0)))
            elif b == BINS_ALL:  # keep everything
                keep.append((-1, dict.fromkeys(names, 0)))
            else:
                thr, counts = sp.global_threshold([per_tensor[n][i] for n in names], need)
                keep.append((thr, dict(zip(names, counts, strict=True))))
        return {"bins": previous["bins"], "keep": keep}

    def sparsify(self, delta, p, ctx, i):
        if p.scope == "tensor":
            return super().sparsify(delta, p, ctx, i)
        thr, counts = ctx.stats["keep"][i]
        return delta * sp.threshold_mask(delta, thr, counts[ctx.name])


BINS_ALL = sp.BINS  # a sentinel bin index: keep every element


class _DareParams(_Common):
    density: float = Field(0.5, gt=0, le=1)
    rescale: Rescale = "inverse"
    normalize: bool = False


class _BreadcrumbsParams(_Common):
    density: float = Field(0.9, ge=0, le=1)
    gamma: float = Field(0.01, ge=0, le=1)
    normalize: bool = False


class _DellaParams(_Common):
    density: float = Field(0.7, gt=0, le=1)
    epsilon: float = Field(0.14, ge=0, lt=1)
    rescale: Rescale = "inverse"
    normalize: bool = False


# the *_ties variants elect signs and, in mergescale's own spec, take TIES' disjoint mean


@register
class DareLinear(_Dare):
    name = "dare_linear"
    elect = False
    Params = _DareParams


@register
class DareTies(_Dare):
    name = "dare_ties"
    elect = True

    class Params(_DareParams):
        normalize: bool = True


@register
class Breadcrumbs(_Breadcrumbs):
    name = "breadcrumbs"
    elect = False
    Params = _BreadcrumbsParams


@register
class BreadcrumbsTies(_Breadcrumbs):
    name = "breadcrumbs_ties"
    elect = True

    class Params(_BreadcrumbsParams):
        normalize: bool = True


@register
class Della(_Della):
    name = "della"
    elect = True

    class Params(_DellaParams):
        normalize: bool = True


@register
class DellaLinear(_Della):
    name = "della_linear"
    elect = False
    Params = _DellaParams
