"""Granularity: one rule, shared by every method, turns a parameter setting into a value per tensor.

A setting may be

* a scalar (``0.5``, ``true``) — the same everywhere;
* a list of numbers — a *gradient* over the transformer layers: layer ``i`` of ``L`` sits at
  ``t = i / (L - 1)`` and the value is linearly interpolated between the list's points
  (booleans and strings are picked, not interpolated).  Tensors outside the layers
  (embeddings, final norm, lm_head) take ``t = 0``, as mergekit does;
* a mapping by submodule — ``{attention: …, mlp: …, norm: …, embedding: …, lm_head: …,
  default: …}`` — each value itself a scalar or a gradient; the submodule is read from the
  tensor name through the architecture's naming (``locate``), never by a method;
* a list of ``{filter: str, value: …}`` conditions (mergekit's form): the first whose
  ``filter`` is a substring of the tensor name (or is absent / ``"*"``) applies;
* layer groups — ``{groups: [v0, …, vK-1]}``: the ``L`` layers cut into ``K`` contiguous groups, layer
  ``i`` in group ``⌊i·K/L⌋``, each group its own value (piecewise constant, no interpolation; a search's
  ``layer_groups``, as mergekit-evolve's genotype).  Tensors outside the layers take group 0's value,
  as they take ``t = 0`` in a gradient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mergescale.errors import MergescaleError

SUBMODULES = ("attention", "mlp", "norm", "embedding", "lm_head")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class TensorSite:
    """Where a tensor sits in the model: its transformer layer (if any) and submodule."""

    name: str
    layer: int | None
    num_layers: int
    submodule: str

    @property
    def t(self) -> float:
        if self.layer is None:
            return 0.0
        return self.layer / (self.num_layers - 1) if self.num_layers > 1 else 1.0


def layer_of(name: str) -> int | None:
    """The transformer layer a tensor name belongs to (None outside the layers)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def with_layer(name: str, layer: int) -> str:
    """``name`` with its layer index replaced by ``layer`` (a layer tensor's name in a stacked model)."""
    m = _LAYER.search(name)
    if m is None:
        raise ValueError(f"bug: {name} is not a layer tensor")
    return f"{name[: m.start(1)]}{layer}{name[m.end(1) :]}"


def locate(name: str, num_layers: int) -> TensorSite:
    """Layer index and submodule of a decoder tensor name (Llama / Qwen2 / Mistral naming)."""
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    if "embed_tokens" in name or "wte" in name or "embed_in" in name:
        sub = "embedding"
    elif name.startswith("lm_head") or "embed_out" in name:
        sub = "lm_head"
    elif "norm" in name or "ln_" in name:
        sub = "norm"
    elif "attn" in name or "attention" in name:
        sub = "attention"
    elif "mlp" in name or "feed_forward" in name:
        sub = "mlp"
    else:
        sub = "other"
    return TensorSite(name=name, layer=layer, num_layers=num_layers, submodule=sub)


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float, bool, str))


def resolve(setting: Any, site: TensorSite, key: str = "parameter") -> Any:
    """The value of ``setting`` for the tensor at ``site`` (``key`` names the setting in errors)."""
    if _is_scalar(setting) or setting is None:
        return setting
    if isinstance(setting, dict):
        if "filter" in setting or "value" in setting:
            return resolve([setting], site, key)
        if "groups" in setting:
            return _group(setting, site, key)
        unknown = set(setting) - set(SUBMODULES) - {"default"}
        if unknown:
            raise MergescaleError(
                f"{key}: unknown submodule key(s) {sorted(unknown)}; use {', '.join(SUBMODULES)} or default"
            )
        if site.submodule in setting:
            return resolve(setting[site.submodule], site, key)
        if "default" in setting:
            return resolve(setting["default"], site, key)
        raise MergescaleError(
            f"{key}: no value for tensor {site.name} (submodule {site.submodule}); add a `default:` entry"
        )
    if isinstance(setting, list):
        if not setting:
            raise MergescaleError(f"{key}: an empty list is not a value; give a number or a list over layers")
        if all(_is_scalar(v) for v in setting):
            return _gradient(setting, site.t)
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond:
                raise MergescaleError(f"{key}: a list must hold only numbers, or only {{filter, value}} entries")
            f = cond.get("filter")
            if f is None or f == "*" or f in site.name:
                return resolve(cond["value"], site, key)
        return None
    raise MergescaleError(f"{key}: cannot read {setting!r} as a value")


def _group(setting: dict, site: TensorSite, key: str) -> Any:
    """The value of a ``{groups: [...]}`` setting at ``site`` (module docstring)."""
    values = setting["groups"]
    if set(setting) != {"groups"} or not isinstance(values, list) or not values:
        raise MergescaleError(
            f"{key}: layer groups are written `{{groups: [v0, v1, ...]}}`, a non-empty list and no other key"
        )
    if len(values) > max(site.num_layers, 1):
        raise MergescaleError(
            f"{key}: {len(values)} layer groups but the model has {site.num_layers} layers; "
            f"use at most {site.num_layers}"
        )
    group = 0 if site.layer is None else site.layer * len(values) // site.num_layers
    return resolve(values[group], site, key)


def _gradient(values: list, t: float) -> Any:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numeric:
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]
