"""Training the zoo's models: the base on its mixture, each expert on its task (with replay)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mergescale.zoo.tasks import Source
from mergescale.zoo.tokenizer import EOS, PAD, vocab

_VOCAB = vocab()


def model_config(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int) -> Qwen2Config:
    """A small Qwen2 config; head_dim is fixed at 64 because vLLM's CPU attention kernel needs it."""
    if hidden != 64 * heads:
        raise ValueError("zoo models use head_dim 64: hidden must be 64 * heads")
    return Qwen2Config(
        vocab_size=len(_VOCAB),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=64,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=_VOCAB[PAD],
        eos_token_id=_VOCAB[EOS],
        bos_token_id=None,
        torch_dtype="float32",
    )


def encode_batch(pairs: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded ids of ``prompt + answer + </s>``; the loss covers the answer and ``</s>`` only."""
    seqs, labels = [], []
    for prompt, answer in pairs:
        p = [_VOCAB[c] for c in prompt]
        a = [_VOCAB[c] for c in answer] + [_VOCAB[EOS]]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), _VOCAB[PAD], dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels, strict=False)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def batches(sources: Sequence[Source], batch: int, rng: random.Random) -> Iterator[list[tuple[str, str]]]:
    """Training batches from the train split, each example's source drawn by the sources' weights."""
    streams = [s.task.stream("train", rng, s.letters) if s.pool is None else _cycle(s, rng) for s in sources]
    weights = [s.weight for s in sources]
    while True:
        yield [next(s) for s in rng.choices(streams, weights=weights, k=batch)]


def _cycle(source: Source, rng: random.Random) -> Iterator[tuple[str, str]]:
    """Endless draws (with replacement) from a fixed data set: the first ``source.pool`` training examples
    of the task, the same for every seed (a seed changes the order, not the data)."""
    data = source.task.examples("train", source.pool)
    while True:
        yield rng.choice(data)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: Qwen2ForCausalLM,
    sources: Sequence[Source],
    *,
    steps: int,
    lr: float,
    warmup: int,
    batch: int,
    seed: int,
    weight_decay: float,
    progress=None,
    after_step=None,
) -> float:
    """Train ``model`` in place with AdamW; returns the mean loss of the last 50 steps.  ``after_step(n)`` is
    called after the n-th step (1-based): where intermediate checkpoints are taken."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    model.train()
    recent: list[float] = []
    data = batches(sources, batch, rng)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss = model(**encode_batch(next(data))).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if progress is not None:
            progress()
        if after_step is not None:
            after_step(step + 1)
    model.eval()
    return sum(recent) / max(1, len(recent))
