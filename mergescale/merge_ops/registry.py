"""The method registry: a name maps to a merge method; a method declares its parameters.

A method is one class in one file under ``merge_ops/``, decorated with ``@register``::

    @register
    class Linear(Method):
        name = "linear"
        needs_base = False

        class Params(MethodParams):
            weight: float = 1.0
            normalize: bool = True

        def merge(self, base, experts, params, ctx): ...

``merge`` receives one tensor name's inputs, already cast to fp32 (experts: see
``experts_as_stored``), and ``params``: one
resolved ``Params`` per expert (granularity is resolved before the method sees them, see
``granularity.py``).  Fields listed in ``per_expert`` may differ between experts; the others
are the same in every element.  Methods are pure functions of their inputs: no files, no Ray.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict


class MethodParams(BaseModel):
    """Base of every method's parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


@dataclass(frozen=True)
class TensorContext:
    """What a method may know about the tensor it merges besides its values.

    ``stats`` is the reduced result of the method's statistics passes (None without them).
    For a data-driven method, ``stats`` is its fit's state and ``aux`` the fit's statistics tensors
    of this tensor, one per expert (``mergescale/fit/``).
    When the engine streams a big tensor in blocks of rows (see ``Method.rowwise``), ``block`` is
    the block's index among ``blocks`` and ``local`` the reduced result of the method's block passes
    over this tensor.
    """

    name: str
    seed: int = 0
    stats: Any = None
    block: int = 0
    blocks: int = 1
    local: Any = None
    aux: Any = None  # a data-driven method's per-expert statistics tensors of this tensor (None without)

    def generator(self, expert: int) -> torch.Generator:
        """A generator seeded by (seed, tensor name, expert index): masks never depend on sharding."""
        digest = hashlib.blake2b(f"{self.seed}/{self.name}/{expert}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "big") & ((1 << 63) - 1))


class Method:
    name: ClassVar[str]
    #: whether the method needs the base model θ0 (task-vector methods do)
    needs_base: ClassVar[bool] = True
    #: whether a base may be given at all (a method that copies its one expert takes none)
    accepts_base: ClassVar[bool] = True
    #: parameters that may take a different value per expert
    per_expert: ClassVar[frozenset[str]] = frozenset({"weight"})
    #: parameters that are one value for the whole merge (how the statistics passes or a fit run, e.g.
    #: TIES' ``scope``): a list over layers, a per-submodule mapping or a per-expert value for one of
    #: them is a spec error, so every tensor sees the same value
    whole_merge: ClassVar[frozenset[str]] = frozenset()
    #: number of experts the method accepts (None = any number ≥ ``min_experts``)
    n_experts: ClassVar[int | None] = None
    min_experts: ClassVar[int] = 1
    #: experts may arrive in their stored float dtype (bf16, fp16) rather than fp32: the method
    #: uses an expert only in arithmetic with the fp32 base (``e - base``), which promotes exactly,
    #: so skipping the separate upcast changes no bit and saves a pass over every expert
    experts_as_stored: ClassVar[bool] = False
    #: the merge only adds and multiplies every one of its inputs, base included, so a NaN or Inf in any
    #: input (even of weight 0: 0 · Inf is NaN) makes the fp32 result non-finite: the engine checks each
    #: result block once instead of every input, and reads the inputs for the culprit only when the result
    #: fails (``docs/ALGORITHMS.md#rules``).  Only for methods without statistics or block passes (those
    #: read inputs that the result check never sees).
    nonfinite_propagates: ClassVar[bool] = False
    #: a fit step on data runs before the map (``mergescale/fit/``); the experts name their tasks
    data_driven: ClassVar[bool] = False

    class Params(MethodParams):
        pass

    def merge(
        self,
        base: torch.Tensor | None,
        experts: list[torch.Tensor],
        params: list[MethodParams],
        ctx: TensorContext,
    ) -> torch.Tensor:
        raise NotImplementedError

    #: parameters whose value the default report label states (see :meth:`label`)
    label_keys: ClassVar[frozenset[str]] = frozenset()

    def label(self, parameters: dict) -> str:
        """The method's default label in a study's report, given the merge's top-level ``parameters``."""
        return self.name

    def whole_merge_keys(self, parameters: dict | None = None) -> frozenset[str]:
        """The YAML keys of the parameters that are one value for the whole merge (see ``whole_merge``),
        given the merge's top-level ``parameters`` (a setting may make another one whole-merge)."""
        return self.whole_merge

    # ---- reduce → map: statistics passes over the whole model, before the merge pass

    def stats_passes(self, params: list[MethodParams]) -> int:
        """How many statistics passes run before the merge pass (0: a pure per-tensor map)."""
        return 0

    def tensor_stats(self, step: int, base, experts, params, ctx: TensorContext) -> Any:
        """Pass ``step``'s small statistics of one tensor (``ctx.stats`` holds the previous passes' result)."""
        raise NotImplementedError

    def reduce(self, step: int, per_tensor: dict[str, Any], previous: Any) -> Any:
        """Combine pass ``step``'s per-tensor statistics (keyed by tensor name) into the new state."""
        raise NotImplementedError

    def describe(self, state: Any) -> dict | None:
        """What the statistics passes found (``state``: the last reduce's result), as JSON for the model
        card; None records nothing."""
        return None

    # ---- streaming one tensor in blocks of rows (bounded memory for big tensors)

    def rowwise(self, params: list[MethodParams]) -> bool:
        """Whether ``merge`` applied to blocks of rows, given ``ctx.local``, gives the rows of the whole
        tensor's merge exactly.  Then the engine reads and merges big tensors block by block."""
        return False

    def block_passes(self, params: list[MethodParams]) -> int:
        """How many passes over one tensor's blocks compute ``ctx.local`` before its merge pass."""
        return 0

    def block_stats(self, step: int, base, experts, params, ctx: TensorContext) -> Any:
        """Pass ``step``'s statistics of one block (``ctx.local`` holds the previous passes' result)."""
        raise NotImplementedError

    def reduce_blocks(self, step: int, per_block: list[Any], previous: Any) -> Any:
        """Combine pass ``step``'s per-block statistics (in block order) into the tensor's new state."""
        raise NotImplementedError


#: every registered method by name.  ``mergescale.methods.get_method`` is the lookup: it also imports
#: the data-driven methods of ``mergescale.fit``, which this package must not know about.
METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise RuntimeError(f"bug: merge method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls
