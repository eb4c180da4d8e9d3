"""Submodule-linearity task arithmetic (arXiv 2504.10902): a closed form per submodule
(``docs/ALGORITHMS.md#slta``).

For each submodule g (level ``layer``: a decoder block; ``attn_mlp``: its attention — with the norm
before it — and its MLP — with the norm before it — apart) and inputs h captured in expert t's model on
task t's inputs (real tokens only), Δk(h) = g(h; φ0 + τk) − g(h; φ0).  Coefficients α minimise
Σ_t Σ_h ‖Σ_k αk Δk(h) − Δt(h)‖² + ρ‖α‖²: (A + ρI) α = b with A_jk = Σ⟨Δj, Δk⟩ and b_j = Σ⟨Δj, Δt⟩, only the
n×n sums kept.  ρ = ``ridge`` × the mean diagonal of A.  Embeddings, the final norm and the head take
task arithmetic with λ = 1/n.  A second pass reports each submodule's non-linearity: the relative error
‖g(φ0 + Σ α τ) − g(φ0) − Σ αk Δk‖ / ‖g(φ0 + Σ α τ) − g(φ0)‖ over the same inputs.

Llama-family decoder blocks (``model.layers[i]`` with ``input_layernorm``, ``self_attn``,
``post_attention_layernorm``, ``mlp``: Llama, Qwen2, Mistral) are supported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.func import functional_call

from mergescale.errors import MergescaleError
from mergescale.fit.data import read_examples
from mergescale.fit.method import CoefficientMethod, DataParams, FitInputs, FitResult
from mergescale.fit.model import Batch, TaskVectors, pad_id
from mergescale.merge_ops.registry import register

BATCH = 16  # sequences per capture pass


@dataclass
class Submodule:
    label: str
    prefix: str  # tensors whose names start with one of these prefixes belong to it
    prefixes: tuple[str, ...]
    call: Callable  # (captured inputs, parameters by full name) -> output [B, W, hidden]


def _sub(prefix: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def submodules(tv: TaskVectors, level: str) -> list[Submodule]:
    layers = getattr(getattr(tv.module, "model", None), "layers", None)
    needed = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    if layers is None or not all(hasattr(layers[0], a) for a in needed):
        raise MergescaleError(
            f"slta: {type(tv.module).__name__} is not a Llama-family decoder (model.layers[i] with "
            "input_layernorm, self_attn, post_attention_layernorm, mlp); use another method"
        )
    out = []
    for i, layer in enumerate(layers):
        p = f"model.layers.{i}."
        if level == "layer":

            def block(cap, params, layer=layer, p=p):
                args, kwargs = cap["layer"]
                return functional_call(layer, _sub(p, params), args, kwargs, strict=False)

            out.append(Submodule(f"layer {i}", p, (p,), block))
            continue

        def attention(cap, params, layer=layer, p=p):
            normed = functional_call(layer.input_layernorm, _sub(p + "input_layernorm.", params),
                                     (cap["layer"][0][0],), strict=False)  # fmt: skip
            _, kwargs = cap["attn"]
            got = functional_call(layer.self_attn, _sub(p + "self_attn.", params), (),
                                  {**kwargs, "hidden_states": normed}, strict=False)  # fmt: skip
            return got[0]

        def mlp(cap, params, layer=layer, p=p):
            normed = functional_call(layer.post_attention_layernorm,
                                     _sub(p + "post_attention_layernorm.", params), (cap["mlp"],),
                                     strict=False)  # fmt: skip
            return functional_call(layer.mlp, _sub(p + "mlp.", params), (normed,), strict=False)

        out.append(Submodule(f"layer {i} attention", p, (p + "input_layernorm.", p + "self_attn."), attention))
        out.append(Submodule(f"layer {i} mlp", p, (p + "post_attention_layernorm.", p + "mlp."), mlp))
    return out


@torch.no_grad()
def capture(tv: TaskVectors, params: dict[str, torch.Tensor], batch: Batch) -> list[dict]:
    """Run the model with ``params`` and keep, for every decoder block, what its submodules received."""
    layers = tv.module.model.layers
    caps: list[dict] = [{} for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):

        def keep_layer(mod, args, kwargs, i=i):
            kw = dict(kwargs)  # the call's own dict: never mutated
            hidden = args[0] if args else kw.pop("hidden_states")
            caps[i]["layer"] = ((hidden.detach(), *args[1:]), kw)

        def keep_attn(mod, args, kwargs, i=i):
            caps[i]["attn"] = (args, {k: v for k, v in kwargs.items() if k != "hidden_states"})

        def keep_mlp(mod, args, i=i):
            caps[i]["mlp"] = args[0].detach()

        hooks += [layer.register_forward_pre_hook(keep_layer, with_kwargs=True),
                  layer.self_attn.register_forward_pre_hook(keep_attn, with_kwargs=True),
                  layer.post_attention_layernorm.register_forward_pre_hook(keep_mlp)]  # fmt: skip
    try:
        functional_call(tv.module, params, (), {"input_ids": batch.ids, "attention_mask": batch.mask,
                                                "use_cache": False}, strict=False)  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    return caps


def _deltas(sub: Submodule, cap: dict, tv: TaskVectors, base_out: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Δk(h) of every expert on the real tokens: ``[n, tokens × hidden]`` (fp64)."""
    rows = []
    for k in range(tv.n):
        params = {n: tv.base[n] + tv.tau[n][k] if n.startswith(sub.prefixes) else tv.base[n] for n in tv.names
                  if n.startswith(sub.prefix)}  # fmt: skip
        rows.append((sub.call(cap, params) - base_out)[real].double().reshape(-1))
    return torch.stack(rows)


@register
class SLTA(CoefficientMethod):
    name = "slta"
    default_count = 30

    class Params(DataParams):
        level: Literal["layer", "attn_mlp"] = "layer"
        ridge: float = 1e-4  # ρ relative to the mean diagonal of A

    @torch.no_grad()
    def fit(self, inputs: FitInputs, params) -> FitResult:
        tv = TaskVectors(inputs.base, inputs.experts, "task", inputs.device)
        subs = submodules(tv, params.level)
        pad = pad_id(tv.module)
        data = [read_examples(d.reference) for d in inputs.data]
        A = {s.label: torch.zeros(tv.n, tv.n, dtype=torch.float64, device=tv.device) for s in subs}
        b = {s.label: torch.zeros(tv.n, dtype=torch.float64, device=tv.device) for s in subs}

        def passes(each):
            for t, examples in enumerate(data):
                for first in range(0, len(examples), BATCH):
                    part = examples[first : first + BATCH]
                    batch = Batch.of([e.ids for e in part], [len(e.prompt) for e in part], pad, tv.device)
                    caps = capture(tv, tv.expert(t), batch)
                    real = batch.mask.bool()
                    for sub in subs:
                        cap = caps[int(sub.label.split()[1])]
                        base_params = {n: v for n, v in tv.base.items() if n.startswith(sub.prefix)}
                        base_out = sub.call(cap, base_params)
                        each(t, sub, cap, base_out, real, _deltas(sub, cap, tv, base_out, real))

        def gram(t, sub, cap, base_out, real, d):
            A[sub.label] += d @ d.T
            b[sub.label] += d @ d[t]

        passes(gram)
        alpha = {}
        for sub in subs:
            a = A[sub.label]
            rho = params.ridge * float(a.diagonal().mean()) if float(a.diagonal().mean()) > 0 else params.ridge
            eye = torch.eye(tv.n, dtype=torch.float64, device=tv.device)
            alpha[sub.label] = torch.linalg.solve(a + rho * eye, b[sub.label])
        err = {s.label: 0.0 for s in subs}
        norm = {s.label: 0.0 for s in subs}

        def nonlinearity(t, sub, cap, base_out, real, d):
            al = alpha[sub.label]
            params = {n: tv.base[n] + torch.tensordot(al.float(), tv.tau[n], dims=1) if n.startswith(sub.prefixes)
                      else tv.base[n] for n in tv.names if n.startswith(sub.prefix)}  # fmt: skip
            actual = (sub.call(cap, params) - base_out)[real].double().reshape(-1)
            err[sub.label] += float(((actual - al @ d) ** 2).sum())
            norm[sub.label] += float((actual**2).sum())

        passes(nonlinearity)
        coefficients = {n: [1.0 / tv.n] * tv.n for n in tv.names}
        for sub in subs:
            for n in tv.names:
                if n.startswith(sub.prefixes):
                    coefficients[n] = [float(v) for v in alpha[sub.label]]
        report = {s.label: {"alpha": [round(float(v), 6) for v in alpha[s.label]],
                            "nonlinearity": math.sqrt(err[s.label] / norm[s.label]) if norm[s.label] else None}
                  for s in subs}  # fmt: skip
        return FitResult(coefficients=coefficients, summary={"level": params.level, "submodules": report})
