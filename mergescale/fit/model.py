"""The merged model as a function of its coefficients: θ(Γ) = θ0 + Σ_k Γ[k, group(tensor)] τ_k.

One transformers module (built from the base) is never copied: every forward pass runs it through
``torch.func.functional_call`` with the tensors of θ(Γ), so only Γ carries gradients.  The task
vectors are held once, stacked per tensor (``[n, *shape]``, fp32).  Sequences are batched with right
padding; the rows that matter are those that predict a continuation token (prompt and padding
positions are masked out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call

from mergescale.checkpoints import ModelDir
from mergescale.errors import MergescaleError
from mergescale.merge_ops.granularity import locate


def load_module(path: str, device: str = "cpu"):
    """The transformers module of the model at ``path`` (fp32, eval mode, no parameter gradients)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    module = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _token_id(module, key: str) -> int | None:
    value = getattr(module.config, key, None)
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


def eos_id(module) -> int:
    value = _token_id(module, "eos_token_id")
    if value is None:
        raise MergescaleError(f"{module.config.name_or_path}: no eos_token_id in config.json; greedy decoding needs it")
    return value


def pad_id(module) -> int:
    """The id right padding uses (padding positions are masked, so any id works): pad, else EOS, else 0."""
    for key in ("pad_token_id", "eos_token_id"):
        value = _token_id(module, key)
        if value is not None:
            return value
    return 0


def read_tensors(path: str, names: Sequence[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """The float tensors ``names`` of the model at ``path``, fp32."""
    model = ModelDir(path)
    return {n: model.tensor(n).to(device=device, dtype=torch.float32) for n in names}


def weight_names(module, path: str) -> list[str]:
    """The float tensors of the checkpoint at ``path``, each a parameter of ``module`` (sorted)."""
    model = ModelDir(path)
    params = dict(module.named_parameters())
    names = [n for n in model.names if model.dtype(n).is_floating_point]
    missing = [n for n in names if n not in params]
    if missing:
        raise MergescaleError(
            f"{path}: tensor {missing[0]} is not a parameter of the transformers model it loads as; data-driven "
            "methods need checkpoints saved with transformers' own tensor names"
        )
    return sorted(names)


def group_of(name: str, num_layers: int, level: str) -> str:
    """The coefficient group of a tensor: one for the whole model (``task``), its transformer block
    (``layer``; embeddings and the head apart) or itself (``tensor``)."""
    if level == "task":
        return "all"
    if level == "tensor":
        return name
    site = locate(name, num_layers)
    if site.layer is not None:
        return f"layer {site.layer}"
    return "embedding" if site.submodule == "embedding" else "head"


class TaskVectors:
    """θ0, the stacked task vectors of n experts, and the module to run θ(Γ) through."""

    def __init__(self, base: str, experts: Sequence[str], level: str = "task", device: str = "cpu"):
        self.module = load_module(base, device)
        self.device = device
        self.names = weight_names(self.module, base)
        self.num_layers = int(self.module.config.num_hidden_layers)
        self.base = read_tensors(base, self.names, device)
        self.tau: dict[str, torch.Tensor] = {}
        for i, path in enumerate(experts):
            theirs = read_tensors(path, self.names, device)
            for n in self.names:
                if theirs[n].shape != self.base[n].shape:
                    raise MergescaleError(
                        f"{path}: tensor {n} has shape {list(theirs[n].shape)}, the base {list(self.base[n].shape)}; "
                        "data-driven methods merge experts of the base's exact shapes"
                    )
                if i == 0:
                    self.tau[n] = torch.empty((len(experts), *self.base[n].shape), device=device)
                self.tau[n][i] = theirs[n] - self.base[n]
        self.n = len(experts)
        self.labels = list(dict.fromkeys(group_of(n, self.num_layers, level) for n in self.names))
        self.index = {n: self.labels.index(group_of(n, self.num_layers, level)) for n in self.names}

    def merged(self, gamma: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ(Γ) for ``gamma`` of shape ``[n, groups]`` (differentiable in ``gamma``)."""
        return {n: self.base[n] + torch.tensordot(gamma[:, self.index[n]], self.tau[n], dims=1) for n in self.names}

    def expert(self, k: int) -> dict[str, torch.Tensor]:
        return {n: self.base[n] + self.tau[n][k] for n in self.names}

    def per_tensor(self, gamma: torch.Tensor) -> dict[str, list[float]]:
        """Each tensor's coefficients, one per expert (what the map pass applies)."""
        g = gamma.detach().double().cpu()
        return {n: [float(v) for v in g[:, self.index[n]]] for n in self.names}

    def per_group(self, gamma: torch.Tensor) -> dict[str, list[float]]:
        g = gamma.detach().double().cpu()
        return {label: [round(float(v), 6) for v in g[:, j]] for j, label in enumerate(self.labels)}


@dataclass(frozen=True)
class Batch:
    """Right-padded sequences and the rows predicting their continuation tokens."""

    ids: torch.Tensor  # [B, W]
    mask: torch.Tensor  # [B, W] 1 on real tokens
    rows: torch.Tensor  # [P] flat indices (b * W + position) of the positions predicting continuation tokens
    owner: torch.Tensor  # [P] the sequence each row belongs to
    lengths: torch.Tensor  # [B] continuation tokens of each sequence

    @classmethod
    def of(cls, seqs: Sequence[list[int]], starts: Sequence[int], pad: int, device: str = "cpu") -> Batch:
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        rows, owner = [], []
        for b, (s, start) in enumerate(zip(seqs, starts, strict=True)):
            rows += [b * width + p for p in range(start - 1, len(s) - 1)]
            owner += [b] * (len(s) - start)
        lengths = torch.tensor([len(s) - start for s, start in zip(seqs, starts, strict=True)], device=device)
        return cls(ids, mask, torch.tensor(rows, device=device), torch.tensor(owner, device=device), lengths)

    def per_sequence_mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of per-row ``values`` over each sequence's rows."""
        sums = torch.zeros(len(self.lengths), dtype=values.dtype, device=values.device).index_add(0, self.owner, values)
        return sums / self.lengths.clamp_min(1)


def logits(module, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    """Logits ``[B, W, vocab]`` of ``module`` run with ``params``."""
    kwargs = {"input_ids": batch.ids, "attention_mask": batch.mask, "use_cache": False}
    out = functional_call(module, params, (), kwargs, strict=False)
    return out.logits


def continuation_logprobs(module, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    """fp32 log-probabilities ``[P, vocab]`` at the rows predicting continuation tokens."""
    out = logits(module, params, batch)
    return torch.log_softmax(out.reshape(-1, out.shape[-1])[batch.rows].float(), dim=-1)


@torch.no_grad()
def greedy(module, params: dict[str, torch.Tensor], prompts: Sequence[list[int]], max_tokens: int, eos: int,
           pad: int) -> list[list[int]]:  # fmt: skip
    """Greedy continuations of ``prompts`` under ``params``, ending with EOS when it came before the cap
    (the convention of the evaluators' reference files).  ``params`` are copied into the module (whose
    own values are never used by the functional passes) so transformers' cached decoding runs them;
    prompts of one length decode together."""
    named = dict(module.named_parameters())
    for name, value in params.items():
        named[name].copy_(value)
    out: list[list[int] | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    device = next(iter(params.values())).device
    for length, group in sorted(by_length.items()):
        ids = torch.tensor([prompts[i] for i in group], device=device)
        got = module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                              do_sample=False, eos_token_id=eos, pad_token_id=pad)  # fmt: skip
        for row, i in enumerate(group):
            cont = got[row, length:].tolist()
            out[i] = cont[: cont.index(eos) + 1] if eos in cont else cont
    return out
