"""The Hugging Face transformers backend: the fallback for architectures vLLM does not serve, and the
one data-driven methods use where gradients are needed.

A model with the loaded model's signature is swapped in by copying its tensors into the loaded
parameters (a full reload when the checkpoint's names do not map one to one).  Generation is
batched with left padding, scoring with right padding, in batches bounded by a number of logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mergescale.errors import MergescaleError
from mergescale.eval.backend import Backend
from mergescale.eval.vllm_backend import engine_dtype

#: at most this many logits (batch × length × vocabulary) are materialized by one forward pass
LOGITS_PER_BATCH = 1 << 26
GENERATE_BATCH = 64


class HFBackend(Backend):
    name = "hf"

    def _start(self, path: str) -> None:
        from transformers import AutoModelForCausalLM

        if self.threads:
            torch.set_num_threads(self.threads)
        dtype = getattr(torch, engine_dtype(path))
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=self.trust_remote_code
        ).to(self.device).eval()
        self.vocab_size = self.model.config.vocab_size

    def _swap(self, path: str) -> None:
        from safetensors import safe_open

        params = self.model.state_dict()
        done: set[int] = set()
        copies = []
        for file in sorted(Path(path).glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                for name in f.keys():
                    if name not in params:
                        self._start(path)  # the checkpoint's names need transformers' conversion
                        return
                    copies.append((params[name], f.get_tensor(name)))
        for param, tensor in copies:
            if param.shape != tensor.shape:
                raise MergescaleError(f"{path}: tensor shapes differ from the loaded model's; it needs a new engine")
            with torch.no_grad():
                param.copy_(tensor)
            done.add(param.data_ptr())
        missing = [n for n, p in params.items() if p.data_ptr() not in done]
        if missing:
            raise MergescaleError(f"{path}: tensor {missing[0]} is missing from the checkpoint")

    @torch.inference_mode()
    def generate_ids(self, prompts, max_tokens, until) -> list[list[int]]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        out: list[list[int] | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: (max_tokens[i], len(prompts[i])))
        for first in range(0, len(order), GENERATE_BATCH):
            batch = order[first : first + GENERATE_BATCH]
            for cap in sorted({max_tokens[i] for i in batch}):
                group = [i for i in batch if max_tokens[i] == cap]
                width = max(len(prompts[i]) for i in group)
                ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in group])
                mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in group])
                gen = self.model.generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=cap,
                    do_sample=False, eos_token_id=self.eos_id, pad_token_id=pad,
                )  # fmt: skip
                for i, row in zip(group, gen[:, width:].tolist(), strict=True):
                    out[i] = row[: row.index(self.eos_id)] if self.eos_id in row else row
        return out

    def _forward(self, seqs: Sequence[list[int]]):
        """Log-softmax rows of right-padded batches: yields (index, log-probabilities [len, vocab])."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        first = 0
        while first < len(order):
            last = first + 1
            while (
                last < len(order) and (last - first + 1) * len(seqs[order[last]]) * self.vocab_size <= LOGITS_PER_BATCH
            ):
                last += 1
            batch = order[first:last]
            width = max(len(seqs[i]) for i in batch)
            ids = torch.tensor([seqs[i] + [self.eos_id] * (width - len(seqs[i])) for i in batch])
            mask = torch.tensor([[1] * len(seqs[i]) + [0] * (width - len(seqs[i])) for i in batch])
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, i in enumerate(batch):
                yield i, logp[row, : len(seqs[i])]
            first = last

    @torch.inference_mode()
    def token_logprobs(self, seqs, starts) -> list[tuple[float, bool]]:
        out: list = [None] * len(seqs)
        for i, logp in self._forward(seqs):
            targets = torch.tensor(seqs[i][starts[i] :])
            rows = logp[starts[i] - 1 : len(seqs[i]) - 1]
            picked = rows.gather(1, targets[:, None])[:, 0]
            out[i] = (float(picked.double().sum()), bool((rows.argmax(dim=1) == targets).all()))
        return out

    @torch.inference_mode()
    def full_logprobs(self, seqs, starts) -> list[torch.Tensor]:
        out: list = [None] * len(seqs)
        for i, logp in self._forward(seqs):
            out[i] = logp[starts[i] - 1 : len(seqs[i]) - 1].clone()
        return out
