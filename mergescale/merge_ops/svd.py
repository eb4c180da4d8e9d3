"""Spectral methods on 2-D weight matrices: TSV-Merge (arXiv 2412.00081), Iso-C and Iso-CTS
(arXiv 2502.04959).  Tensors that are not matrices (norms, biases) take the mean task vector.
Every SVD runs in fp32; results are scaled by α and added to the base.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergescale.merge_ops.registry import Method, MethodParams, register


def _orthogonalize(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix nearest to ``m`` (polar factor, via SVD): whitens concatenated bases."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def _mean_delta(base, experts):
    return sum(e - base for e in experts) / len(experts)


class _Spectral(Method):
    per_expert = frozenset()

    class Params(MethodParams):
        alpha: float = Field(1.0, description="scale of the merged task matrix")

    def merge(self, base, experts, params, ctx):
        alpha = params[0].alpha
        if base.dim() != 2 or min(base.shape) < 2:
            return base + alpha * _mean_delta(base, experts)
        return base + alpha * self.matrix([e - base for e in experts], params[0])

    def matrix(self, deltas: list[torch.Tensor], p) -> torch.Tensor:
        raise NotImplementedError


@register
class TSV(_Spectral):
    """Each task keeps its top 1/n singular triplets; the concatenated U and V are orthogonalized."""

    name = "tsv"

    def matrix(self, deltas, p):
        n = len(deltas)
        k = max(1, min(deltas[0].shape) // n)
        us, ss, vs = [], [], []
        for d in deltas:
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
            us.append(u[:, :k])
            ss.append(s[:k])
            vs.append(vh[:k].T)
        u, s, v = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
        return _orthogonalize(u) @ torch.diag(s) @ _orthogonalize(v).T


@register
class IsoC(_Spectral):
    """The summed task matrix with a flat (isotropic) spectrum: mean singular value × U Vᵀ."""

    name = "iso_c"

    def matrix(self, deltas, p):
        u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
        return s.mean() * (u @ vh)


@register
class IsoCTS(_Spectral):
    """Iso-C on a common subspace (top ``common`` fraction of the summed matrix) plus each task's
    top directions outside it; the joined bases are orthogonalized and given a flat spectrum."""

    name = "iso_cts"

    class Params(_Spectral.Params):
        common: float = Field(0.8, gt=0, le=1, description="fraction of the rank given to the common subspace")

    def matrix(self, deltas, p):
        n = len(deltas)
        total = sum(deltas)
        rank = min(total.shape)
        k = max(1, int(p.common * rank))
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        uc, sc, vc = u[:, :k], s[:k], vh[:k].T
        per_task = (rank - k) // n
        us, ss, vs = [uc], [sc], [vc]
        if per_task > 0:
            for d in deltas:
                rest = d - uc @ (uc.T @ d)  # the part of the task outside the common subspace
                ut, st, vht = torch.linalg.svd(rest, full_matrices=False)
                us.append(ut[:, :per_task])
                ss.append(st[:per_task])
                vs.append(vht[:per_task].T)
        u_all, v_all = _orthogonalize(torch.cat(us, 1)), _orthogonalize(torch.cat(vs, 1))
        return torch.cat(ss).mean() * (u_all @ v_all.T)
