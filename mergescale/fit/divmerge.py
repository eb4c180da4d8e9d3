"""DivMerge (arXiv 2509.02108): coefficients that minimise the divergence of the merged model from each
expert on that expert's task (``docs/ALGORITHMS.md#divmerge``).

For an input of task t with expert t's greedy continuation and next-token distributions p along it
(precomputed once by an evaluator and cached), the loss is the mean over continuation positions of
D(p ‖ q), q the merged model's distributions from one teacher-forced pass of θ(Γ); D is Jensen–Shannon
(default) or KL(expert ‖ merged), fp32 over the full vocabulary.  A step takes ``batch`` inputs of every
task; Adam updates Γ only.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch

from mergescale.errors import MergescaleError
from mergescale.eval.divergence import js_rows, kl_rows
from mergescale.fit.data import Example, read_examples
from mergescale.fit.method import CoefficientMethod, DataParams, FitInputs, FitResult
from mergescale.fit.model import Batch, TaskVectors, continuation_logprobs, pad_id
from mergescale.merge_ops.registry import register

log = logging.getLogger(__name__)


def divergences(tv: TaskVectors, gamma: torch.Tensor, examples: list[Example], kind: str, pad: int) -> torch.Tensor:
    """For each example, the mean over its continuation positions of D(expert ‖ θ(Γ))."""
    batch = Batch.of([e.ids for e in examples], [len(e.prompt) for e in examples], pad, tv.device)
    q = continuation_logprobs(tv.module, tv.merged(gamma), batch)
    p = torch.cat([e.logprobs for e in examples]).to(q.device)
    if p.shape != q.shape:
        raise MergescaleError(
            f"expert distributions have {p.shape[-1]} entries per position but the model's vocabulary has "
            f"{q.shape[-1]}; the reference files were written for another tokenizer"
        )
    rows = js_rows(p, q) if kind == "js" else kl_rows(p, q)
    return batch.per_sequence_mean(rows)


@torch.no_grad()
def mean_divergence(tv: TaskVectors, gamma: torch.Tensor, examples: list[Example], kind: str, pad: int,
                    chunk: int = 64) -> float:  # fmt: skip
    """The loss over all ``examples`` (in chunks: no gradient, bounded memory)."""
    total = sum(float(divergences(tv, gamma, examples[i : i + chunk], kind, pad).sum())
                for i in range(0, len(examples), chunk))  # fmt: skip
    return total / len(examples)


def task_batches(examples: list[list[Example]], batch: int, epochs: int, seed: int):
    """Per step, ``batch`` examples of every task; each epoch walks the largest task once (smaller ones
    wrap around), every task in its own seeded order."""
    gen = torch.Generator().manual_seed(seed)
    steps = math.ceil(max(len(e) for e in examples) / batch)
    for epoch in range(epochs):
        orders = [torch.randperm(len(e), generator=gen).tolist() for e in examples]
        for s in range(steps):
            picked = [ex[order[(s * batch + j) % len(ex)]] for ex, order in zip(examples, orders, strict=True)
                      for j in range(batch)]  # fmt: skip
            yield epoch, picked


@register
class DivMerge(CoefficientMethod):
    name = "divmerge"

    class Params(DataParams):
        level: Literal["task", "layer", "tensor"] = "task"  # layer = transformer block (embeddings, head apart)
        divergence: Literal["js", "kl"] = "js"
        lr: float = 1e-2
        epochs: int = 4
        batch: int = 4  # inputs of each task per step (the paper's batch 4 × n)
        init: float | None = None  # initial coefficient (None: 1/n)

    def count(self, params):
        return params.count or (200 if params.level == "task" else 400)

    def fit(self, inputs: FitInputs, params) -> FitResult:
        torch.manual_seed(inputs.seed)
        tv = TaskVectors(inputs.base, inputs.experts, params.level, inputs.device)
        examples = [read_examples(d.reference) for d in inputs.data]
        init = params.init if params.init is not None else 1.0 / tv.n
        gamma = torch.full((tv.n, len(tv.labels)), init, device=tv.device, requires_grad=True)
        opt = torch.optim.Adam([gamma], lr=params.lr)
        pad = pad_id(tv.module)
        everything = [e for ex in examples for e in ex]
        initial = mean_divergence(tv, gamma, everything, params.divergence, pad)
        steps: list[dict] = []
        for epoch, batch in task_batches(examples, params.batch, params.epochs, inputs.seed):
            loss = divergences(tv, gamma, batch, params.divergence, pad).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps.append({"step": len(steps), "epoch": epoch, "loss": float(loss.detach()),
                          "coefficients": gamma.detach().cpu().tolist()})  # fmt: skip
            log.debug("divmerge step %d loss %.6f", len(steps) - 1, steps[-1]["loss"])
        final = mean_divergence(tv, gamma, everything, params.divergence, pad)
        return FitResult(
            coefficients=tv.per_tensor(gamma),
            summary={"level": params.level, "divergence": params.divergence, "steps": len(steps),
                     "loss_initial": initial, "loss_final": final,
                     "coefficients": tv.per_group(gamma)},
            log=steps,
        )  # fmt: skip
