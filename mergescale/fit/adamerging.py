"""AdaMerging (arXiv 2310.02575) for language models (``docs/ALGORITHMS.md#adamerging``).

Coefficients (task-wise, per transformer block, or per tensor — the paper's "layer-wise") minimise the
mean token-level entropy of the merged model's next-token distributions along its *own* greedy
continuations of unlabeled prompts: each step decodes the batch's prompts with the current θ(Γ)
(no gradient), then one teacher-forced pass with gradients scores them.  Γ starts at ``init`` and is
clamped to [0, 1] after every Adam step.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from mergescale.fit.data import read_examples
from mergescale.fit.divmerge import task_batches
from mergescale.fit.method import CoefficientMethod, DataParams, FitInputs, FitResult
from mergescale.fit.model import Batch, TaskVectors, continuation_logprobs, eos_id, greedy, pad_id
from mergescale.merge_ops.registry import register

log = logging.getLogger(__name__)


def entropies(tv: TaskVectors, gamma: torch.Tensor, prompts: list[list[int]], max_tokens: int, eos: int,
              pad: int) -> torch.Tensor:  # fmt: skip
    """For each prompt, the mean entropy of θ(Γ)'s next-token distributions along its own greedy continuation."""
    conts = greedy(tv.module, {k: v.detach() for k, v in tv.merged(gamma).items()}, prompts, max_tokens, eos, pad)
    batch = Batch.of([p + c for p, c in zip(prompts, conts, strict=True)], [len(p) for p in prompts], pad, tv.device)
    logp = continuation_logprobs(tv.module, tv.merged(gamma), batch)
    return batch.per_sequence_mean(-(logp.exp() * logp).sum(-1))


@register
class AdaMerging(CoefficientMethod):
    name = "adamerging"

    class Params(DataParams):
        level: Literal["task", "layer", "tensor"] = "task"  # the paper's "layer-wise" is per tensor
        lr: float = 1e-3
        steps: int = 500
        batch: int = 4  # prompts of each task per step
        init: float = 0.3

    def fit(self, inputs: FitInputs, params) -> FitResult:
        torch.manual_seed(inputs.seed)
        tv = TaskVectors(inputs.base, inputs.experts, params.level, inputs.device)
        examples = [read_examples(d.reference) for d in inputs.data]
        cap = max(d.max_tokens for d in inputs.data)
        eos, pad = eos_id(tv.module), pad_id(tv.module)
        gamma = torch.full((tv.n, len(tv.labels)), params.init, device=tv.device, requires_grad=True)
        opt = torch.optim.Adam([gamma], lr=params.lr)
        steps: list[dict] = []
        batches = task_batches(examples, params.batch, epochs=1 << 30, seed=inputs.seed)
        for _ in range(params.steps):
            epoch, batch = next(batches)
            loss = entropies(tv, gamma, [e.prompt for e in batch], cap, eos, pad).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                gamma.clamp_(0.0, 1.0)
            steps.append({"step": len(steps), "epoch": epoch, "loss": float(loss.detach()),
                          "coefficients": gamma.detach().cpu().tolist()})  # fmt: skip
            log.debug("adamerging step %d entropy %.6f", len(steps) - 1, steps[-1]["loss"])
        return FitResult(
            coefficients=tv.per_tensor(gamma),
            summary={"level": params.level, "steps": len(steps), "loss_first": steps[0]["loss"] if steps else None,
                     "loss_last": steps[-1]["loss"] if steps else None, "coefficients": tv.per_group(gamma)},
            log=steps,
        )  # fmt: skip
