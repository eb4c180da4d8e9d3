"""What every data-driven method shares: its data parameters, what its fit receives and returns, and
the coefficient map θ = θ0 + Σ_k c_k(tensor) τ_k."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from mergescale.merge_ops.linear import task_arithmetic
from mergescale.merge_ops.registry import Method, MethodParams

#: the threads a fit uses: reductions split by thread count round differently, so a seed gives the
#: same coefficients on any machine only with a fixed count
FIT_THREADS = 1


class DataParams(MethodParams):
    """Where a data-driven method's inputs come from: ``count`` documents of each expert's lm-eval task
    (``experts[i].task``), drawn from ``split`` with the merge's seed; never the split a study reports."""

    split: Literal["train", "validation"] = "validation"
    count: int | None = Field(None, ge=1)  # None: the method's paper default
    max_tokens: int | None = Field(None, ge=1)  # cap of the experts' continuations (None: the task's max_gen_toks)
    backend: Literal["vllm", "hf"] = "vllm"  # the engine that decodes the experts' continuations


@dataclass(frozen=True)
class ExpertData:
    """One expert's fit inputs: documents of its task and, in ``reference`` (a safetensors file written by
    an evaluator), its greedy continuation of each prompt and its next-token log-probabilities along it."""

    task: str
    split: str
    requested: int
    count: int  # documents used (fewer than requested when the split is smaller)
    seed: int
    reference: str
    max_tokens: int  # the continuations' cap

    def describe(self) -> dict:
        return {"task": self.task, "split": self.split, "count": self.count, "requested": self.requested,
                "seed": self.seed}  # fmt: skip


@dataclass(frozen=True)
class FitInputs:
    base: str | None
    experts: list[str]
    data: list[ExpertData]
    seed: int
    workdir: str  # where a fit writes statistics files
    device: str = "cpu"


@dataclass
class FitResult:
    """What a fit produced.  ``coefficients``: tensor name → one coefficient per expert (coefficient
    methods); ``statistics``: a directory of ``expert-<i>.safetensors`` files keyed by tensor name
    (statistics methods).  ``summary`` is small and goes to the model card and the results store;
    ``log`` holds every optimisation step (loss and coefficients)."""

    coefficients: dict[str, list[float]] = field(default_factory=dict)
    statistics: str | None = None
    summary: dict = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)
    data: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def state(self) -> FitState:
        """The map's view of the fit: its coefficients and its statistics files (listed once, here)."""
        files = Path(self.statistics).glob("expert-*.safetensors") if self.statistics else ()
        ordered = sorted(files, key=lambda f: int(f.stem.split("-")[1]))
        return FitState(self.coefficients, tuple(str(f) for f in ordered))

    def record(self) -> dict:
        """Everything, JSON-ready (``fit.json`` of the merged model)."""
        return {"data": self.data, "summary": self.summary, "seconds": round(self.seconds, 3),
                "coefficients": self.coefficients, "log": self.log}  # fmt: skip


@dataclass(frozen=True)
class FitState:
    """What the map pass needs from a fit (``TensorContext.stats``): never the step log."""

    coefficients: dict[str, list[float]]
    statistics: tuple[str, ...]  # the statistics files, one per expert in expert order (empty without)


class DataDriven(Method):
    """A method with a fit step.  ``fit`` runs once, before the map, in a Ray task of its own."""

    data_driven = True
    per_expert: ClassVar[frozenset[str]] = frozenset()
    #: documents per task when ``count`` is not given
    default_count: ClassVar[int] = 200

    def count(self, params: MethodParams) -> int:
        return params.count or self.default_count

    def whole_merge_keys(self, parameters=None) -> frozenset[str]:
        """Every parameter but the per-expert ones: the data and the optimiser are set once per merge."""
        return frozenset(f.alias or n for n, f in self.Params.model_fields.items()) - self.per_expert

    def fit(self, inputs: FitInputs, params: MethodParams) -> FitResult:
        raise NotImplementedError


class StatisticsMethod(DataDriven):
    """A method whose fit writes per-expert statistics tensors (RegMean, Fisher): each expert's model runs
    on its own task's inputs; ``expert_statistics`` returns tensors keyed by tensor name, written to
    ``expert-<i>.safetensors`` in the work directory, which the map reads back as ``TensorContext.aux``."""

    needs_base = False

    def expert_statistics(self, module, params: dict[str, torch.Tensor], examples: list, pad: int,
                          hp: MethodParams) -> dict[str, torch.Tensor]:  # fmt: skip
        raise NotImplementedError

    def digest(self, statistics: dict[str, torch.Tensor]) -> object:
        """A small account of one expert's statistics (kept; the tensors themselves are not)."""
        return None

    def summarize(self, digests: list, hp: MethodParams) -> dict:
        """The experts' digests as the summary that goes to the model card and the store."""
        return {}

    def fit(self, inputs: FitInputs, params: MethodParams) -> FitResult:
        from safetensors.torch import save_file

        from mergescale.fit.data import read_examples
        from mergescale.fit.model import load_module, pad_id, read_tensors, weight_names

        module = load_module(inputs.experts[0], inputs.device)
        names = weight_names(module, inputs.experts[0])
        out = Path(inputs.workdir)
        out.mkdir(parents=True, exist_ok=True)
        digests = []
        for i, (path, data) in enumerate(zip(inputs.experts, inputs.data, strict=True)):
            tensors = read_tensors(path, names, inputs.device)
            stats = self.expert_statistics(module, tensors, read_examples(data.reference), pad_id(module), params)
            save_file({k: v.cpu().contiguous() for k, v in stats.items()}, str(out / f"expert-{i}.safetensors"))
            digests.append(self.digest(stats))
        return FitResult(statistics=str(out), summary=self.summarize(digests, params))


class CoefficientMethod(DataDriven):
    """θ = θ0 + Σ_k c_k τ_k with the fitted coefficients of the tensor (DivMerge, AdaMerging, SLTA)."""

    experts_as_stored = True

    def rowwise(self, params):
        return True

    def merge(self, base, experts, params, ctx):
        return task_arithmetic(base, experts, ctx.stats.coefficients[ctx.name])
