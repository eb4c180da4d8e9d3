"""Fine-tuning transfer (arXiv 2503.20110): carry one model's fine-tuning over to another base.
``docs/ALGORITHMS.md#transfer``."""

from __future__ import annotations

import torch
from pydantic import Field

from mergescale.merge_ops.registry import Method, MethodParams, register


@register
class Transfer(Method):
    """Fine-tuning transfer (arXiv 2503.20110): target_base + λ (source_finetuned − source_base).

    ``base`` is the target base; the two experts are, in order, the source fine-tune and
    the source base.  The difference is taken in fp64.  Rows of a larger target vocabulary
    keep the target's values (the difference is zero there).
    """

    name = "transfer"
    n_experts = 2
    per_expert = frozenset()

    class Params(MethodParams):
        lambda_: float = Field(1.0, alias="lambda")

    def merge(self, base, experts, params, ctx):
        diff = experts[0].to(torch.float64) - experts[1].to(torch.float64)
        return (base.to(torch.float64) + params[0].lambda_ * diff).to(torch.float32)
