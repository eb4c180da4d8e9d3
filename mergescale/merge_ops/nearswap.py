"""NearSwap: take the other model where it is near the base (``docs/ALGORITHMS.md#nearswap``)."""

from __future__ import annotations

from pydantic import Field

from mergescale.merge_ops.registry import Method, MethodParams, register


@register
class NearSwap(Method):
    """Per element, the weight w = clamp(t / |θ1 − θ0|, 0, 1) of the one expert: w θ1 + (1 − w) θ0.

    Where the two models differ by at most ``t`` the expert's value is taken whole; where they differ by
    more, the result moves towards the expert by t only (a step of fixed size).  |θ1 − θ0| is floored at
    1e-6.  No paper: the method is defined by mergekit's implementation and its model card; this is that
    behaviour, in fp32.
    """

    name = "nearswap"
    n_experts = 1
    per_expert = frozenset()

    class Params(MethodParams):
        t: float = Field(ge=0)

    def rowwise(self, params):
        return True

    def merge(self, base, experts, params, ctx):
        near = params[0].t / (base - experts[0]).abs().clamp(min=1e-6)
        weight = near.clamp(min=0.0, max=1.0)
        return weight * experts[0] + (1 - weight) * base
