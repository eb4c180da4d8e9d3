"""The search space of a coefficient search: one parameter vector ↔ one merge spec, both ways.

A search declares, beside any merge spec, which of the method's parameters it searches and at which
granularity (``docs/ALGORITHMS.md#search-space``)::

    space:
      weight: {low: 0.1, high: 1.0, per: expert}                   # one weight per expert
      density: {low: 0.1, high: 0.9, per: expert, layer_groups: 4}  # per expert and layer group
      lambda: {low: 0.3, high: 3.0, log: true, submodules: [attention, mlp, default]}
      t: {values: [0.25, 0.5, 0.75]}                               # a choice (or a grid axis)
      normalize: false                                             # a fixed value, not searched

Each searched entry becomes one or more named *coordinates* (``weight/expert=1``,
``density/expert=0/group=3``, ``lambda/attention``); a vector is a mapping from every coordinate name to
a value in its domain.  :meth:`SearchSpace.to_spec` writes a vector into the merge spec as ordinary
settings (per-expert ``parameters``, ``{attention: …, default: …}``, ``{groups: [...]}``, resolved by
``merge_ops/granularity.py`` like any hand-written spec), and :meth:`SearchSpace.from_spec` reads it back.
No Ray here: the orchestrator turns :class:`Domain` into Tune's search space.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergescale.errors import SpecError
from mergescale.merge_ops.granularity import SUBMODULES
from mergescale.methods import get_method
from mergescale.specs import MergeSpec, Setting, known_hint

Scalar = float | int | bool | str


class Dimension(BaseModel):
    """One searched parameter (a ``space:`` entry that is not a fixed value)."""

    model_config = ConfigDict(extra="forbid")
    low: float | None = None
    high: float | None = None
    log: bool = False  # sample uniformly in log(value); needs low > 0
    values: list[Scalar] | None = None  # a choice among these instead of a range
    per: Literal["merge", "expert"] = "merge"  # one value for the merge, or one per expert
    layer_groups: int | None = Field(None, ge=1)  # the layers cut into K contiguous groups, one value each
    submodules: list[str] | None = None  # one value per named submodule (and `default` for the rest)


@dataclass(frozen=True)
class Domain:
    """Where one coordinate's values lie: a range (``low``..``high``, ``log``) or ``values`` to choose from."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    values: tuple | None = None

    def contains(self, v: Any) -> bool:
        if self.values is not None:
            return any(v == c and type(v) is type(c) for c in self.values)
        return isinstance(v, int | float) and not isinstance(v, bool) and self.low <= v <= self.high


@dataclass(frozen=True)
class Coordinate:
    """One number (or choice) of the vector: parameter ``key``, for expert ``expert`` (None: every expert),
    submodule ``submodule`` (None: every one) and layer group ``group`` (None: every layer)."""

    name: str
    key: str
    domain: Domain
    expert: int | None = None
    submodule: str | None = None
    group: int | None = None


class SearchSpace:
    """The coordinates of ``space`` (the parsed ``space:`` block) on the merge ``spec`` of a model with
    ``num_layers`` transformer layers.  ``where`` prefixes error messages (the file and ``space``)."""

    def __init__(self, spec: MergeSpec, space: Mapping[str, Any], num_layers: int, where: str = "space"):
        self.spec, self.num_layers, self.where = spec, num_layers, where
        self.method = get_method(spec.method)
        self.fixed: dict[str, Setting] = {}
        self.dimensions: dict[str, Dimension] = {}
        for key, entry in space.items():
            self._check_key(key)
            # a mapping with any of Dimension's keys is searched; anything else is a fixed setting (a scalar,
            # a gradient, {attention: …, default: …}, {groups: […]}: no key of those is one of Dimension's)
            if isinstance(entry, dict) and set(entry) & set(Dimension.model_fields):
                self.dimensions[key] = self._dimension(key, entry)
            else:
                self.fixed[key] = entry
        if not self.dimensions:
            raise SpecError(f"{where}: nothing to search; give at least one parameter a range or values")
        self.coordinates = [c for key, d in self.dimensions.items() for c in self._coordinates(key, d)]
        self._by_name = {c.name: c for c in self.coordinates}

    # ------------------------------------------------------------------ declaration

    def _check_key(self, key: str) -> None:
        fields = sorted(f.alias or n for n, f in self.method.Params.model_fields.items())
        if key not in fields:
            raise SpecError(
                f"{self.where}.{key}: not a parameter of method {self.spec.method}{known_hint(fields, key)}"
            )
        places = [("parameters", self.spec.parameters)] + [
            (f"experts.{i}.parameters", e.parameters) for i, e in enumerate(self.spec.experts)
        ]
        for place, parameters in places:
            if key in parameters:
                raise SpecError(f"{self.where}.{key}: also set in the merge spec's {place}.{key}; keep one of the two")

    def _dimension(self, key: str, entry: dict) -> Dimension:
        where = f"{self.where}.{key}"
        try:
            d = Dimension.model_validate(entry)
        except ValidationError as err:
            e = err.errors()[0]
            loc = ".".join(str(p) for p in e["loc"])
            raise SpecError(f"{where}.{loc}: {e['msg']}") from None
        if d.values is not None:
            if d.low is not None or d.high is not None or d.log:
                raise SpecError(f"{where}: give either `values` or `low`/`high`, not both")
            if not d.values:
                raise SpecError(f"{where}.values: an empty list; give at least one value")
        elif d.low is None or d.high is None:
            raise SpecError(f"{where}: give `low` and `high` (a range), or `values` (a choice)")
        elif not (math.isfinite(d.low) and math.isfinite(d.high) and d.low < d.high):
            raise SpecError(f"{where}: empty range low = {d.low}, high = {d.high}; need finite low < high")
        elif d.log and d.low <= 0:
            raise SpecError(f"{where}.log: a log scale needs low > 0 (low = {d.low})")
        if d.per == "expert" and key not in self.method.per_expert:
            raise SpecError(
                f"{where}.per: `{key}` is one value for all experts in {self.spec.method}; drop `per: expert`"
            )
        structured = d.layer_groups is not None or d.submodules is not None
        if structured and key in self.method.whole_merge_keys({**self.spec.parameters, **self.fixed}):
            raise SpecError(
                f"{where}: `{key}` is one value for the whole merge in {self.spec.method}; "
                "drop `layer_groups` / `submodules`"
            )
        if d.layer_groups is not None and d.layer_groups > self.num_layers:
            raise SpecError(f"{where}.layer_groups: {d.layer_groups} groups but the model has {self.num_layers} layers")
        if d.submodules is not None:
            unknown = [s for s in d.submodules if s not in (*SUBMODULES, "default")]
            if unknown or not d.submodules or len(set(d.submodules)) < len(d.submodules):
                raise SpecError(
                    f"{where}.submodules: {d.submodules} must be distinct names among {', '.join(SUBMODULES)}, default"
                )
            if "default" not in d.submodules and set(SUBMODULES) - set(d.submodules):
                raise SpecError(
                    f"{where}.submodules: add `default` (the value for "
                    f"{', '.join(s for s in SUBMODULES if s not in d.submodules)})"
                )
        return d

    def _coordinates(self, key: str, d: Dimension) -> list[Coordinate]:
        domain = Domain(d.low, d.high, d.log, tuple(d.values) if d.values is not None else None)
        experts = range(len(self.spec.experts)) if d.per == "expert" else [None]
        submodules = d.submodules or [None]
        groups = range(d.layer_groups) if d.layer_groups is not None else [None]
        out = []
        for e in experts:
            for s in submodules:
                for g in groups:
                    parts = [key] + ([f"expert={e}"] if e is not None else []) + ([s] if s else [])
                    parts += [f"group={g}"] if g is not None else []
                    out.append(Coordinate("/".join(parts), key, domain, e, s, g))
        return out

    # ------------------------------------------------------------------ vector <-> spec

    def to_spec(self, vector: Mapping[str, Any]) -> MergeSpec:
        """The merge spec of ``vector`` (every coordinate name → a value in its domain)."""
        unknown = sorted(set(vector) - set(self._by_name))
        if unknown:
            raise SpecError(f"{self.where}: unknown coordinate `{unknown[0]}`{known_hint(self._by_name, unknown[0])}")
        for c in self.coordinates:
            if c.name not in vector:
                raise SpecError(f"{self.where}: no value for coordinate `{c.name}`")
            if not c.domain.contains(vector[c.name]):
                raise SpecError(f"{self.where}: {c.name} = {vector[c.name]!r} is outside its domain {c.domain}")
        merged = dict(self.spec.parameters) | self.fixed
        experts = [dict(e.parameters) for e in self.spec.experts]
        for key, d in self.dimensions.items():
            if d.per == "expert":
                for i, params in enumerate(experts):
                    params[key] = self._setting(key, d, vector, i)
            else:
                merged[key] = self._setting(key, d, vector, None)
        return self.spec.model_copy(
            update={
                "parameters": merged,
                "experts": [
                    e.model_copy(update={"parameters": p}) for e, p in zip(self.spec.experts, experts, strict=True)
                ],
            }
        )

    def _setting(self, key: str, d: Dimension, vector: Mapping[str, Any], expert: int | None) -> Setting:
        def at(submodule: str | None) -> Setting:
            values = [vector[c.name] for c in self.coordinates
                      if c.key == key and c.expert == expert and c.submodule == submodule]  # fmt: skip
            return {"groups": values} if d.layer_groups is not None else values[0]

        return {s: at(s) for s in d.submodules} if d.submodules else at(None)

    def from_spec(self, spec: MergeSpec) -> dict[str, Any]:
        """The vector that :meth:`to_spec` turns into ``spec`` (a spec this space wrote, or one written the
        same way); an error names the setting that does not have the space's form."""
        vector: dict[str, Any] = {}
        for c in self.coordinates:
            d = self.dimensions[c.key]
            place = f"experts.{c.expert}.parameters" if c.expert is not None else "parameters"
            params = spec.experts[c.expert].parameters if c.expert is not None else spec.parameters
            setting = params.get(c.key)
            path = f"{place}.{c.key}"
            if d.submodules:
                if not isinstance(setting, dict) or set(setting) != set(d.submodules):
                    raise SpecError(f"{path}: expected one value for each of {d.submodules}, got {setting!r}")
                setting, path = setting[c.submodule], f"{path}.{c.submodule}"
            if d.layer_groups is not None:
                groups = setting.get("groups") if isinstance(setting, dict) else None
                if not isinstance(groups, list) or len(groups) != d.layer_groups:
                    raise SpecError(f"{path}: expected {{groups: [{d.layer_groups} values]}}, got {setting!r}")
                setting = groups[c.group]
            if not c.domain.contains(setting):
                raise SpecError(f"{path}: {setting!r} is not a value of coordinate {c.name} ({c.domain})")
            vector[c.name] = setting
        return vector
