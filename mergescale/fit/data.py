"""A fit's inputs: unlabeled prompts drawn from an lm-eval task's split, and the experts' greedy
continuations of them (read back from the reference files an evaluator wrote)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergescale.errors import MergescaleError

DEFAULT_MAX_TOKENS = 64  # continuation cap of a task that does not generate (multiple choice, perplexity)


def task_prompts(task_name: str, split: str, count: int, seed: int,
                 include_paths: Sequence[str | Path] = ()) -> tuple[list[str], int]:  # fmt: skip
    """``count`` prompts of ``task_name``'s ``split`` (a seeded sample, in sample order; fewer when the split
    is smaller) as lm-eval builds them zero-shot, and the task's generation cap.  The split lm-eval
    evaluates (what a study reports) is refused."""
    from mergescale.eval.harness import _quiet, leaf_tasks, load_tasks

    tasks = leaf_tasks(load_tasks([task_name], include_paths))
    if len(tasks) != 1:
        raise MergescaleError(f"task {task_name}: a group of {len(tasks)} tasks; name one task per expert")
    task = next(iter(tasks.values()))
    cfg = task.config
    evaluated = cfg.test_split or cfg.validation_split
    available = {"train": cfg.training_split, "validation": cfg.validation_split}
    if not available[split]:
        raise MergescaleError(f"task {task_name} has no {split} split; set the method's `split:` to one it has")
    if available[split] == evaluated:
        raise MergescaleError(
            f"task {task_name} is evaluated on its {split} split ({evaluated}); fitting on it would report "
            "scores on the fit's own data: set `split: train`"
        )
    with _quiet():
        docs = list(task.training_docs() if split == "train" else task.validation_docs())
    if not docs:
        raise MergescaleError(f"task {task_name}: its {split} split is empty")
    picked = random.Random(f"{seed}/{task_name}/{split}").sample(range(len(docs)), min(count, len(docs)))
    with _quiet():
        prompts = [str(task.fewshot_context(docs[i], num_fewshot=0)) for i in picked]
    gen = cfg.generation_kwargs or {}
    cap = int(gen.get("max_gen_toks", 256)) if task.OUTPUT_TYPE == "generate_until" else DEFAULT_MAX_TOKENS
    return prompts, cap


@dataclass(frozen=True)
class Example:
    """One input: prompt and continuation token ids, and the expert's log-probabilities over the
    vocabulary at each continuation token (``[len(continuation), vocab]``)."""

    prompt: list[int]
    continuation: list[int]
    logprobs: torch.Tensor

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.continuation


def read_examples(reference: str | Path) -> list[Example]:
    """The examples of a reference file (``eval.evaluator.Evaluator.reference``)."""
    from safetensors.torch import load_file

    ref = load_file(str(reference))
    prompts = torch.split(ref["prompt_ids"], ref["prompt_lengths"].tolist())
    conts = torch.split(ref["continuation_ids"], ref["continuation_lengths"].tolist())
    dists = torch.split(ref["logprobs"].float(), ref["continuation_lengths"].tolist())
    return [Example(p.tolist(), c.tolist(), d) for p, c, d in zip(prompts, conts, dists, strict=True)]
