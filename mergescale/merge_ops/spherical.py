"""Spherical interpolation family: slerp, nuslerp, multislerp, karcher
(``docs/ALGORITHMS.md#slerp`` and the sections after it).

Angles are measured between whole flattened tensors (or rows, where a method says so).
Degenerate geometry never divides by ~0: (anti)parallel inputs fall back to linear
interpolation, cosines are clamped to [−1, 1], zero-norm inputs are skipped.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergescale.errors import SpecError
from mergescale.merge_ops.registry import Method, MethodParams, register

DOT_THRESHOLD = 0.9995


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.reshape(-1).to(torch.float64)).to(torch.float32)


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two tensors by the angle between them (lerp when |cos| > 0.9995)."""
    na, nb = _norm(a), _norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    cos = ((a.reshape(-1) / na) @ (b.reshape(-1) / nb)).clamp(-1, 1)
    if cos.abs() > DOT_THRESHOLD:
        return (1 - t) * a + t * b
    theta = torch.acos(cos)
    s = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / s) * a + (torch.sin(t * theta) / s) * b


def _slerp_rows(t: float, a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Slerp along the last dimension, independently per row (nuslerp's row-wise / column-wise form)."""
    ua = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1, 1)
    parallel = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(parallel, torch.zeros_like(cos), cos))
    s = torch.where(parallel, torch.ones_like(theta), torch.sin(theta))
    curved = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / s
    return torch.where(parallel, (1 - t) * a + t * b, curved)


@register
class Slerp(Method):
    """Spherical interpolation between the base (t = 0) and one other model (t = 1)."""

    name = "slerp"
    needs_base = True
    n_experts = 1
    per_expert = frozenset()

    class Params(MethodParams):
        t: float

    def merge(self, base, experts, params, ctx):
        return slerp(params[0].t, base, experts[0])


@register
class NuSlerp(Method):
    """Slerp of two experts with t = w2 / (w1 + w2); of their task vectors around the base if one is given."""

    name = "nuslerp"
    needs_base = False
    n_experts = 2

    class Params(MethodParams):
        weight: float = 1.0
        flatten: bool = True
        row_wise: bool = False

    def merge(self, base, experts, params, ctx):
        w1, w2 = params[0].weight, params[1].weight
        t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
        a, b = experts
        if base is not None:
            a, b = a - base, b - base
        if params[0].flatten:
            out = _slerp_rows(t, a.reshape(-1), b.reshape(-1)).reshape(a.shape)
        elif params[0].row_wise and a.dim() > 1:
            out = _slerp_rows(t, a.transpose(0, -1), b.transpose(0, -1)).transpose(0, -1)
        else:
            out = _slerp_rows(t, a, b)
        return out if base is None else base + out


@register
class MultiSlerp(Method):
    """Weighted mean direction on the hypersphere, one tangent-space step, rescaled by the mean norm."""

    name = "multislerp"
    needs_base = False

    class Params(MethodParams):
        weight: float = 1.0
        normalize_weights: bool = True
        eps: float = 1e-8

    def merge(self, base, experts, params, ctx):
        if len(experts) == 1:
            return experts[0]
        eps = params[0].eps
        x = torch.stack(experts)
        if base is not None:
            x = x - base
        flat = x.reshape(len(experts), -1)
        w = torch.tensor([p.weight for p in params], dtype=flat.dtype)
        if params[0].normalize_weights:
            w = w / w.sum()
        norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
        units = flat / (norms + eps)
        mean = (units * w[:, None]).sum(0)
        mean_norm = torch.linalg.vector_norm(mean)
        if mean_norm < eps:
            if len(experts) != 2:
                raise SpecError(f"{ctx.name}: multislerp's weighted directions cancel out; change the experts' weights")
            out = (flat * w[:, None]).sum(0)
        else:
            mean = mean / mean_norm
            tangent = ((units - (units @ mean)[:, None] * mean) * w[:, None]).sum(0)
            tn = torch.linalg.vector_norm(tangent) + eps
            out = (mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)) * (norms.squeeze(-1) * w).sum()
        out = out.reshape(experts[0].shape)
        return out if base is None else base + out


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """Riemannian (Karcher) mean of the unit directions, scaled by the mean norm; equal weights."""
    n = len(tensors)
    norms = [_norm(x) for x in tensors]
    keep = [i for i in range(n) if norms[i] > tol]
    if not keep:
        return torch.zeros_like(tensors[0])
    units = [(tensors[i] / norms[i]).reshape(-1) for i in keep]
    alpha = 1.0 / len(keep)
    mean = sum(alpha * u for u in units)
    mn = _norm(mean)
    mean = units[0].clone() if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            cos = torch.clamp(mean @ u, -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (u - cos * mean)
        tn = _norm(tangent)
        if tn < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = _norm(mean)
        if un > tol:
            mean = mean / un
    scale = sum(norms) / n
    return (scale * mean).reshape(tensors[0].shape)


@register
class Karcher(Method):
    """Karcher mean of every input (the base too, when one is given), as mergekit does."""

    name = "karcher"
    needs_base = False
    per_expert = frozenset()

    class Params(MethodParams):
        max_iter: int = Field(10, ge=1)
        tol: float = Field(1e-5, gt=0)

    def merge(self, base, experts, params, ctx):
        tensors = ([base] if base is not None else []) + list(experts)
        if len(tensors) == 1:
            return tensors[0]
        return karcher_mean(tensors, params[0].max_iter, params[0].tol)
