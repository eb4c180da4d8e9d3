"""Passthrough: one model's tensors, optionally scaled (``docs/ALGORITHMS.md#passthrough``)."""

from __future__ import annotations

from mergescale.merge_ops.registry import Method, MethodParams, register


@register
class Passthrough(Method):
    """θ1, or s · θ1 where ``scale`` s is given (per tensor, through granularity: e.g. 0 for one projection).

    The method of stacked merges (``slices:``): each slice takes its layers from one model.  No paper; the
    behaviour of mergekit's method of the same name."""

    name = "passthrough"
    needs_base = False
    accepts_base = False
    n_experts = 1
    per_expert = frozenset({"scale"})
    nonfinite_propagates = True

    class Params(MethodParams):
        scale: float | None = None

    def rowwise(self, params):
        return True

    def merge(self, base, experts, params, ctx):
        scale = params[0].scale
        return experts[0] if scale is None else experts[0] * scale
