"""A random direction of a task vector's norm: the control of a negation experiment (Ilharco et al. 2023,
*Editing Models with Task Arithmetic*, §3).  ``docs/ALGORITHMS.md#random_direction``."""

from __future__ import annotations

import torch

from mergescale.merge_ops.registry import Method, MethodParams, register


@register
class RandomDirection(Method):
    """θ0 + w · r, where r is a Gaussian direction rescaled to ‖r‖ = ‖θ1 − θ0‖ tensor by tensor.

    One expert: its task vector gives only the norm.  r is drawn from the merge seed and the tensor's
    name (``TensorContext.generator``), so the bytes do not depend on how the merge is sharded.  In fp64,
    cast to fp32.  ``weight`` −λ is the baseline of a negation θ0 − λ τ.
    """

    name = "random_direction"
    n_experts = 1

    class Params(MethodParams):
        weight: float = 1.0

    def merge(self, base, experts, params, ctx):
        base64 = base.to(torch.float64)
        norm = (experts[0].to(torch.float64) - base64).norm()
        r = torch.randn(base.shape, generator=ctx.generator(0), dtype=torch.float64)
        length = r.norm()
        if length == 0 or norm == 0:  # an empty tensor, or the expert did not change it
            return base64.to(torch.float32)
        return (base64 + (params[0].weight * norm / length) * r).to(torch.float32)
