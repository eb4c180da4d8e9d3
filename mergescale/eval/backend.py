"""The inference backend interface: one loaded model answers three questions.

* **generate** — greedy continuation of a prompt until a stop string, the end-of-sequence
  token or a token cap;
* **log-likelihood** — of a continuation given a context (and whether greedy decoding
  would produce it), plus lm-eval's rolling log-likelihood of a whole text;
* **distributions** — the full-vocabulary next-token log-probabilities at every position
  of a given continuation (divergences between models).

Text is tokenized here, once, the same way for every engine and exactly as lm-eval's own ``hf``
model tokenizes it (:class:`LMEvalTokens`, a ``TemplateLM``); engines (``vllm_backend``,
``hf_backend``) implement the token-level primitives.  A backend loads a model and then
*swaps* in the weights of the next model with the same :func:`model_signature`
(architecture, shapes, tokenizer) in place; a model with another signature needs a new
engine (:class:`IncompatibleModel`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM

from mergescale.checkpoints import TOKENIZER_FILES
from mergescale.errors import MergescaleError, ModelError

log = logging.getLogger(__name__)

#: config keys that do not change what an engine computes or how it is built
_NOT_SIGNATURE = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}


class IncompatibleModel(MergescaleError):
    """The model needs a new engine: its architecture, shapes or tokenizer differ from the loaded one."""


@dataclass(frozen=True)
class GenerateRequest:
    """Greedy generation of ``prompt`` until one of ``until``, the EOS token, or ``max_tokens`` tokens."""

    prompt: str
    until: tuple[str, ...] = ()
    max_tokens: int = 256


def model_signature(path: str | Path) -> str:
    """A hash of everything an engine is built from except the weights' values: the model config
    (architecture, shapes, rope, vocabulary) and the tokenizer files."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: no config.json; evaluate a Hugging Face model directory") from None
    h = hashlib.sha256(
        json.dumps({k: v for k, v in config.items() if k not in _NOT_SIGNATURE}, sort_keys=True).encode()
    )
    for name in TOKENIZER_FILES:
        if (path / name).exists():
            h.update(name.encode() + b"\0" + (path / name).read_bytes())
    return h.hexdigest()[:16]


def weights_fingerprint(path: str | Path) -> tuple:
    """Names, sizes and modification times of the weight files: changes when the weights are rewritten."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.safetensors.index.json"))
    if not files:
        raise ModelError(f"{path}: no *.safetensors weights; evaluate a Hugging Face model directory")
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def truncate_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class Backend(ABC):
    """One inference engine holding one model at a time.  Subclasses implement the token-level methods."""

    name: str = ""

    def __init__(self, device: str = "cpu", threads: int | None = None, max_model_len: int | None = None,
                 trust_remote_code: bool = False):  # fmt: skip
        self.device = device
        self.trust_remote_code = trust_remote_code  # a model's own code (config ``auto_map``) may run
        self.threads = threads
        self.max_model_len_override = max_model_len
        self.path: str | None = None
        self.signature: str | None = None
        self.fingerprint: tuple | None = None
        self.tokenizer = None
        self.lm_tokens: LMEvalTokens | None = None  # lm-eval's tokenization with that tokenizer
        self.max_model_len = 0
        self.starts = 0
        self.swaps = 0
        self.load_seconds = 0.0

    # ---------------------------------------------------------------- loading
    def load(self, path: str | Path) -> str:
        """Make ``path`` the loaded model: ``"kept"`` (already loaded), ``"swapped"`` (weights replaced
        in place) or ``"started"`` (first model).  Raises :class:`IncompatibleModel` when the model
        needs a new engine."""
        from mergescale.eval.architecture import check_architecture

        path = str(Path(path).resolve())
        signature, fingerprint = model_signature(path), weights_fingerprint(path)
        if self.path == path and self.fingerprint == fingerprint:
            return "kept"
        check_architecture(path, self.trust_remote_code)  # before any engine code reads the config
        started = time.perf_counter()
        if self.signature is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=self.trust_remote_code)
            self.lm_tokens = LMEvalTokens(self.tokenizer)
            config = json.loads((Path(path) / "config.json").read_text())
            self.max_model_len = self.max_model_len_override or min(config.get("max_position_embeddings", 2048), 4096)
            self._start(path)
            self.starts += 1
            how = "started"
        elif signature != self.signature:
            raise IncompatibleModel(
                f"{path}: architecture or tokenizer differs from the loaded model {self.path}; it needs a new engine"
            )
        else:
            self._swap(path)
            self.swaps += 1
            how = "swapped"
        self.path, self.signature, self.fingerprint = path, signature, fingerprint
        self.load_seconds += time.perf_counter() - started
        log.debug("%s %s in %.3f s", how, path, time.perf_counter() - started)
        return how

    @abstractmethod
    def _start(self, path: str) -> None:
        """Build the engine on the model at ``path``."""

    @abstractmethod
    def _swap(self, path: str) -> None:
        """Replace the engine's weights with those at ``path`` (same signature), in place."""

    # ---------------------------------------------------------------- token-level primitives
    @abstractmethod
    def generate_ids(
        self, prompts: Sequence[list[int]], max_tokens: Sequence[int], until: Sequence[tuple[str, ...]]
    ) -> list[list[int]]:
        """Greedy continuations (token ids, without the EOS token) of each prompt; generation may stop
        early at a stop string (the caller truncates the text), must stop at EOS or ``max_tokens``."""

    @abstractmethod
    def token_logprobs(self, seqs: Sequence[list[int]], starts: Sequence[int]) -> list[tuple[float, bool]]:
        """For each sequence: the summed log-probability of its tokens from ``start`` on, each given all
        before it, and whether every one of them is the argmax."""

    @abstractmethod
    def full_logprobs(self, seqs: Sequence[list[int]], starts: Sequence[int]) -> list[torch.Tensor]:
        """For each sequence: fp32 log-probabilities over the whole vocabulary, one row per token from
        ``start`` on (the distribution that token was drawn from) — shape ``[len - start, vocab]``."""

    # ---------------------------------------------------------------- text level
    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt as lm-eval's ``hf`` model encodes it (:meth:`LMEvalTokens.tok_encode`)."""
        return self.lm_tokens.tok_encode(text)

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """Token ids of each (context, continuation), split as lm-eval's ``TemplateLM`` splits them."""
        return self.lm_tokens.encode_pairs(pairs)

    def _fit(self, seq: list[int], start: int, room: int = 0) -> tuple[list[int], int]:
        """Drop tokens from the left so the sequence (plus ``room``) fits the model; keep ``start`` aligned."""
        limit = self.max_model_len - room
        if len(seq) <= limit:
            return seq, start
        cut = len(seq) - limit
        if cut >= start:
            raise MergescaleError(
                f"a continuation of {len(seq) - start} tokens does not fit the model's {self.max_model_len} tokens"
            )
        return seq[cut:], start - cut

    def generate(self, requests: Sequence[GenerateRequest]) -> list[str]:
        prompts = [self._fit(self.encode(r.prompt), 0, room=r.max_tokens)[0] for r in requests]
        ids = self.generate_ids(prompts, [r.max_tokens for r in requests], [tuple(r.until) for r in requests])
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True) if ids else []
        return [truncate_at_stop(t, r.until) for t, r in zip(texts, requests, strict=True)]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        seqs, starts = [], []
        for ctx, cont in self.encode_pairs(pairs):
            seq, start = self._fit(ctx + cont, len(ctx))
            seqs.append(seq)
            starts.append(start)
        return self.token_logprobs(seqs, starts)

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Log-likelihood of each whole text as lm-eval's ``hf`` model computes it: the text's ids
        (:meth:`LMEvalTokens.tok_encode`) in disjoint windows of the model's length, each window
        conditioned on as much preceding text as fits, the first token on lm-eval's prefix token."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        seqs, starts, owner = [], [], []
        for i, text in enumerate(texts):
            windows = get_rolling_token_windows(
                token_list=self.encode(text),
                prefix_token=self.lm_tokens.prefix_token_id,
                max_seq_len=self.max_model_len,
                context_len=1,
            )
            for context, target in map(make_disjoint_window, windows):
                seqs.append(list(context) + list(target))
                starts.append(len(context))
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (logprob, _) in zip(owner, self.token_logprobs(seqs, starts), strict=True):
            totals[i] += logprob
        return totals

    def info(self) -> dict:
        return {"backend": self.name, "path": self.path, "starts": self.starts, "swaps": self.swaps,
                "load_seconds": self.load_seconds}  # fmt: skip


class LMEvalTokens(TemplateLM):
    """lm-eval's tokenization, so that scores are lm-eval's: ``TemplateLM`` itself splits a context
    from its continuation (trailing whitespace of the context moves into the continuation; an empty
    context becomes the prefix token, or the continuation's first token when that is the prefix
    token), and ``tok_encode`` and ``prefix_token_id`` follow lm-eval's ``hf`` model (``HFLM``,
    lm-eval 0.4.13) with its default arguments: the tokenizer's own special tokens (a Llama-family
    tokenizer's BOS) unless the text already starts with the prefix token; prefix token = BOS,
    else EOS.  Only the tokenization is used: scoring is the backends'."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.tokenizer.decode(self.prefix_token_id))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        from lm_eval.api.instance import Instance

        requests = [Instance("loglikelihood", {}, tuple(pair), i) for i, pair in enumerate(pairs)]
        return self.loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[list[int], list[int]]]:
        # TemplateLM.loglikelihood hands over ((context, continuation), context ids, continuation ids)
        return [(list(ctx), list(cont)) for _, ctx, cont in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("tokenization only: Backend.loglikelihood_rolling scores")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("tokenization only: Backend.generate generates")
