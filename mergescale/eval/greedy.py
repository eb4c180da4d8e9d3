"""A minimal Hugging Face greedy scorer: exact match (and character accuracy) of greedy generations.

This is the reference scorer the zoo uses to record its score table; the evaluator
pool (vLLM actors, lm-eval) must agree with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Score:
    exact_match: float
    char_acc: float
    n: int


def char_accuracy(pred: str, target: str) -> float:
    """Matching characters at equal positions over the longer of the two strings (1.0 for two empty strings)."""
    longest = max(len(pred), len(target))
    if longest == 0:
        return 1.0
    return sum(p == t for p, t in zip(pred, target, strict=False)) / longest


def score(preds: Sequence[str], targets: Sequence[str]) -> Score:
    if len(preds) != len(targets) or not targets:
        raise ValueError("score needs as many predictions as targets, and at least one")
    em = sum(p == t for p, t in zip(preds, targets, strict=False)) / len(targets)
    ca = sum(char_accuracy(p, t) for p, t in zip(preds, targets, strict=False)) / len(targets)
    return Score(exact_match=em, char_acc=ca, n=len(targets))


@torch.inference_mode()
def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 2048) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), stopped at the tokenizer's EOS."""
    model.eval()
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return outputs


def score_examples(model, tokenizer, examples: Sequence[tuple[str, str]]) -> Score:
    """Greedy-generate an answer for every (prompt, answer) pair and score it."""
    return score_tasks(model, tokenizer, {"": examples})[""]


def score_tasks(model, tokenizer, examples: Mapping[str, Sequence[tuple[str, str]]]) -> dict[str, Score]:
    """Score several tasks' (prompt, answer) pairs with one batched generation; one Score per task."""
    pairs = [pair for exs in examples.values() for pair in exs]
    targets = [a for _, a in pairs]
    preds = greedy_generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens=max(map(len, targets)) + 1)
    out, start = {}, 0
    for name, exs in examples.items():
        out[name] = score(preds[start : start + len(exs)], targets[start : start + len(exs)])
        start += len(exs)
    return out
