"""Submodule-linearity task arithmetic (arXiv 2504.10902): a closed form per submodule
(``docs/ALGORITHMS.md#slta``).

For each submodule g (level ``layer``: a decoder block; ``attn_mlp``: its attention — with the norm
before it — and its MLP — with the norm before it — apart) and inputs h captured in expert t's model on
task t's inputs (real tokens only), Δk(h) = g(h; φ0 + τk) − g(h; φ0).  Coefficients α minimise
Σ_t Σ_h ‖Σ_k αk Δk(h) − Δt(h)‖² + ρ‖α‖²: (A + ρI) α = b with A_jk = Σ⟨Δj, Δk⟩ and b_j = Σ⟨Δj, Δt⟩, only the
n×n sums kept.  ρ = ``ridge`` × the mean diagonal of A.  Embeddings, the final norm and the head take
task arithmetic with λ = 1/n.  A second pass reports each submodule's ``fit_relative_error``: the relative
error ‖g(φ0 + Σ α τ) − g(φ0) − Σ αk Δk‖ / ‖g(φ0 + Σ α τ) − g(φ0)‖ over the same inputs.

A third pass gives the paper's linearity diagnostics (``linearity``): for each expert t alone and each
module (the full model's logits, each layer, each attention and each MLP block), the module's outputs
f(α) = f(h; φ0 + α τt) on a grid of α in [0, 1] (the module's inputs h held at those captured in expert t),
and from them the ``non_linearity_score`` and the ``projection_distance`` (functions of the same names).

Llama-family decoder blocks (``model.layers[i]`` with ``input_layernorm``, ``self_attn``,
``post_attention_layernorm``, ``mlp``: Llama, Qwen2, Mistral) are supported.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch.func import functional_call

from mergescale.errors import MergescaleError
from mergescale.fit.data import read_examples
from mergescale.fit.method import CoefficientMethod, DataParams, FitInputs, FitResult
from mergescale.fit.model import Batch, TaskVectors, logits, pad_id
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


def _grid(points: int) -> list[float]:
    """α = 0, 1/points, …, 1."""
    return [i / points for i in range(points + 1)]


def non_linearity_score(outputs: list[torch.Tensor]) -> float:
    """Non-linearity Score of one module along θ0 + α τ, from its outputs ``[tokens, d]`` at α = i / m,
    i = 0 … m: the mean over α (trapezoid rule on [0, 1]) and over tokens of
    ‖f(α) − ((1 − α) f(0) + α f(1))‖ / ‖(1 − α) f(0) + α f(1)‖."""
    m = len(outputs) - 1
    f0, f1 = outputs[0].double(), outputs[-1].double()
    per_alpha = []
    for i, out in enumerate(outputs):
        a = i / m
        line = (1 - a) * f0 + a * f1
        per_alpha.append(float(((out.double() - line).norm(dim=-1) / line.norm(dim=-1).clamp_min(1e-12)).mean()))
    return sum(per_alpha[1:-1]) / m + (per_alpha[0] + per_alpha[-1]) / (2 * m)


def projection_distance(outputs: list[torch.Tensor]) -> float:
    """Projection distance of one module's output path: the mean over α (trapezoid rule) and over tokens of
    the distance from f(α) to the straight line through f(0) and f(1), relative to ‖f(1) − f(0)‖."""
    m = len(outputs) - 1
    f0 = outputs[0].double()
    chord = outputs[-1].double() - f0
    length = chord.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    unit = chord / length
    per_alpha = []
    for out in outputs:
        off = out.double() - f0
        rest = off - (off * unit).sum(-1, keepdim=True) * unit
        per_alpha.append(float((rest.norm(dim=-1) / length[..., 0]).mean()))
    return sum(per_alpha[1:-1]) / m + (per_alpha[0] + per_alpha[-1]) / (2 * m)


@register
class SLTA(CoefficientMethod):
    name = "slta"
    default_count = 30

    class Params(DataParams):
        level: Literal["layer", "attn_mlp"] = "layer"
        ridge: float = 1e-4  # ρ relative to the mean diagonal of A
        alpha_points: int = Field(4, ge=2)  # the linearity diagnostics' grid: α = 0, 1/m, …, 1 (m = this)

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
                            "fit_relative_error": math.sqrt(err[s.label] / norm[s.label]) if norm[s.label] else None}
                  for s in subs}  # fmt: skip
        rows = linearity(tv, data, pad, _grid(params.alpha_points))
        medians = {kind: {q: statistics.median(r[q] for r in rows if r["kind"] == kind)
                          for q in ("non_linearity_score", "projection_distance")}
                   for kind in dict.fromkeys(r["kind"] for r in rows)}  # fmt: skip
        summary = {"level": params.level, "submodules": report, "linearity": rows, "linearity_median": medians}
        return FitResult(coefficients=coefficients, summary=summary)


@torch.no_grad()
def linearity(tv: TaskVectors, data: list[list], pad: int, alphas: list[float]) -> list[dict]:
    """The paper's diagnostics, one row per (expert, module): each expert t on task t's inputs, each module
    moved alone along φ0 + α τt (the full model: every tensor), token-weighted over the batches."""
    modules = [("layer", m) for m in submodules(tv, "layer")]
    modules += [(m.label.split()[-1], m) for m in submodules(tv, "attn_mlp")]  # "attention" / "mlp"
    sums: dict[tuple[int, str, str], list[float]] = {}
    for t, examples in enumerate(data):
        along = [{n: tv.base[n] + a * tv.tau[n][t] for n in tv.names} for a in alphas]
        for first in range(0, len(examples), BATCH):
            part = examples[first : first + BATCH]
            batch = Batch.of([e.ids for e in part], [len(e.prompt) for e in part], pad, tv.device)
            real = batch.mask.bool()
            tokens = int(real.sum())
            caps = capture(tv, tv.expert(t), batch)
            rows = [("model", "model", lambda p, batch=batch: logits(tv.module, p, batch))]
            rows += [(kind, m.label, lambda p, m=m, caps=caps: m.call(caps[int(m.label.split()[1])], p))
                     for kind, m in modules]  # fmt: skip
            for kind, label, call in rows:
                outs = [call(p)[real] for p in along]
                acc = sums.setdefault((t, kind, label), [0.0, 0.0, 0])
                acc[0] += non_linearity_score(outs) * tokens
                acc[1] += projection_distance(outs) * tokens
                acc[2] += tokens
    return [{"expert": t, "module": label, "kind": kind, "non_linearity_score": s / n, "projection_distance": d / n}
            for (t, kind, label), (s, d, n) in sums.items()]  # fmt: skip
