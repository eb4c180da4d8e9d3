"""What an evaluator actor runs: one backend, kept alive across models.

Every call names the model it is for; the evaluator makes that model the loaded one first
(kept, swapped in place, or — for the first model — started).  The orchestrator wraps this class
in a Ray actor (``orchestrator/eval_pool.py``); it also works in-process, which is how the
lm-eval bridge can be used without Ray.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence

import torch

from mergescale import files, provenance
from mergescale.eval.backend import Backend, GenerateRequest
from mergescale.eval.divergence import example_divergences
from mergescale.eval.engines import make_backend


class Evaluator:
    def __init__(self, backend: str = "vllm", device: str = "cpu", threads: int | None = None,
                 max_model_len: int | None = None, trust_remote_code: bool = False):  # fmt: skip
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        self.backend: Backend = make_backend(backend, device=device, threads=threads, max_model_len=max_model_len,
                                             trust_remote_code=trust_remote_code)  # fmt: skip
        self.busy_seconds = 0.0
        self.seen: set[str] = set()  # digests of every prompt / context scored (seen_prompts)

    def load(self, model: str) -> str:
        return self.backend.load(model)

    def generate(self, model: str, requests: Sequence[GenerateRequest]) -> list[str]:
        self.backend.load(model)
        self.seen.update(prompt_digest(r.prompt) for r in requests)
        return self._timed(self.backend.generate, requests)

    def loglikelihood(self, model: str, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        self.backend.load(model)
        self.seen.update(prompt_digest(context) for context, _ in pairs)
        return self._timed(self.backend.loglikelihood, pairs)

    def loglikelihood_rolling(self, model: str, texts: Sequence[str]) -> list[float]:
        self.backend.load(model)
        self.seen.update(prompt_digest(t) for t in texts)
        return self._timed(self.backend.loglikelihood_rolling, texts)

    def seen_prompts(self) -> list[str]:
        """Digests (:func:`prompt_digest`) of every prompt this evaluator was asked to score or continue: the
        audit a search keeps of what its trials read (never a test document before the end)."""
        return sorted(self.seen)

    def reference(self, model: str, prompts: Sequence[str], max_tokens: int, out: str) -> str:
        """Write ``model``'s greedy continuation of every prompt (until EOS, which is kept, or
        ``max_tokens``) and its full next-token distributions along it to ``out`` (safetensors,
        written under a temporary name and renamed)."""
        from safetensors.torch import save_file

        self.backend.load(model)
        self.seen.update(prompt_digest(p) for p in prompts)
        started = time.perf_counter()
        b = self.backend
        ids = [b._fit(b.encode(p), 0, room=max_tokens)[0] for p in prompts]
        conts = b.generate_ids(ids, [max_tokens] * len(ids), [()] * len(ids))
        conts = [c + [b.eos_id] if len(c) < max_tokens else c for c in conts]
        dists = b.full_logprobs([p + c for p, c in zip(ids, conts, strict=True)], [len(p) for p in ids])
        tensors = {
            "prompt_ids": torch.tensor([t for p in ids for t in p], dtype=torch.int64),
            "prompt_lengths": torch.tensor([len(p) for p in ids], dtype=torch.int64),
            "continuation_ids": torch.tensor([t for c in conts for t in c], dtype=torch.int64),
            "continuation_lengths": torch.tensor([len(c) for c in conts], dtype=torch.int64),
            "logprobs": torch.cat(dists).contiguous(),
        }
        with files.atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata={"model": str(model), "signature": b.signature or ""})
        self.busy_seconds += time.perf_counter() - started
        return out

    def divergence(self, model: str, reference: str) -> dict[str, float]:
        """Mean over examples of the per-example mean JS and KL(reference ‖ model) along the
        reference's continuations (the reference model's distributions are p, ``model``'s are q)."""
        from safetensors.torch import load_file

        self.backend.load(model)
        started = time.perf_counter()
        ref = load_file(reference)
        prompts = _unflatten(ref["prompt_ids"], ref["prompt_lengths"])
        conts = _unflatten(ref["continuation_ids"], ref["continuation_lengths"])
        mine = self.backend.full_logprobs(
            [p + c for p, c in zip(prompts, conts, strict=True)], [len(p) for p in prompts]
        )
        theirs = torch.split(ref["logprobs"], ref["continuation_lengths"].tolist())
        pairs = [example_divergences(p, q) for p, q in zip(theirs, mine, strict=True)]
        self.busy_seconds += time.perf_counter() - started
        return {
            "js": sum(js for js, _ in pairs) / len(pairs),
            "kl": sum(kl for _, kl in pairs) / len(pairs),
            "examples": len(pairs),
            "tokens": int(ref["continuation_lengths"].sum()),
        }

    def info(self) -> dict:
        """The backend's state, and the provenance of this process's scores (``provenance.environment``)."""
        return {**self.backend.info(), "pid": os.getpid(), "busy_seconds": self.busy_seconds,
                **provenance.environment()}  # fmt: skip

    def _timed(self, fn, arg):
        started = time.perf_counter()
        try:
            return fn(arg)
        finally:
            self.busy_seconds += time.perf_counter() - started


def prompt_digest(text: str) -> str:
    """A short fingerprint of one prompt (an evaluator's request audit compares these, not the texts)."""
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _unflatten(flat: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [part.tolist() for part in torch.split(flat, lengths.tolist())]
