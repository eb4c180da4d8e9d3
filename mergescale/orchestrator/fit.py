"""Running a data-driven method's fit step: its inputs prepared with the evaluator pool, the fit itself
as one Ray task (a GPU when the cluster has one, a CPU otherwise).

Inputs: for every expert, ``count`` prompts of its task's split (seeded), and the expert's greedy
continuations and next-token distributions along them, decoded by an evaluator (vLLM by default) and
cached under ``$MERGESCALE_CACHE/fit-inputs`` (keyed by the expert's weights, the backend, the task, the
prompts and the cap): every later fit on the same data reuses them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import ray
import torch

from mergescale.cache import cache_root
from mergescale.checkpoints import weights_sha256
from mergescale.errors import MergescaleError
from mergescale.fit.data import task_prompts
from mergescale.fit.method import FIT_THREADS, ExpertData, FitInputs, FitResult
from mergescale.methods import get_method
from mergescale.orchestrator.cluster import cluster_device, connect
from mergescale.orchestrator.plan import MergePlan, whole_merge_params

log = logging.getLogger(__name__)

#: ``references(expert_dir, prompts, max_tokens, out_file)`` writes an evaluator reference file
References = Callable[[str, list[str], int, str], object]


def _inputs_dir() -> Path:
    return cache_root() / "fit-inputs"


def fit_params(plan: MergePlan):
    """The method's parameters: a data-driven method's are all whole-merge values (data, optimiser)."""
    return whole_merge_params(plan)[0]


def prepare(plan: MergePlan, references: References, backend: str, include_paths: Sequence[str | Path] = (),
            hashes: Mapping[str, str] | None = None) -> list[ExpertData]:  # fmt: skip
    """Each expert's prompts, and its reference file (written through ``references``, an evaluator of
    ``backend``, unless cached)."""
    from mergescale.orchestrator.evaluate import _reference_name

    method = get_method(plan.spec.method)
    params = fit_params(plan)
    count = method.count(params)
    out = []
    for path, expert in zip(plan.experts, plan.spec.experts, strict=True):
        prompts, cap = task_prompts(expert.task, params.split, count, plan.spec.seed, include_paths)
        cap = params.max_tokens or cap
        digest = (hashes or {}).get(str(path)) or weights_sha256(path)
        file = _inputs_dir() / _reference_name(digest, backend, expert.task, prompts, cap)
        if not file.exists():
            file.parent.mkdir(parents=True, exist_ok=True)
            references(str(path), prompts, cap, str(file))
        out.append(ExpertData(expert.task, params.split, count, len(prompts), plan.spec.seed, str(file), cap))
    return out


@ray.remote(max_retries=1)
def _fit_task(method: str, inputs: FitInputs, params) -> FitResult:
    torch.set_num_threads(FIT_THREADS)
    torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.perf_counter()
    result = get_method(method).fit(inputs, params)
    result.data = [d.describe() for d in inputs.data]
    result.seconds = time.perf_counter() - started
    return result


def run_fit(plan: MergePlan, workdir: Path, *, references: tuple[References, str] | None = None,
            include_paths: Sequence[str | Path] = (), hashes: Mapping[str, str] | None = None,
            address: str | None = None, device: str = "auto") -> FitResult:  # fmt: skip
    """Prepare the inputs and run the fit as a Ray task.  ``references``: a writer of reference files and
    its backend (a study lends its evaluator pool); None starts a pool of one actor of the method's
    ``backend`` for the time of the preparation."""
    connect(address)
    params = fit_params(plan)
    pool = None
    if references is None:
        from mergescale.orchestrator.eval_pool import EvaluatorPool

        pool = EvaluatorPool(params.backend, actors=1)

        def write(model, prompts, cap, out):
            return pool.run(lambda lease, m: lease.reference(m, prompts, cap, out), model)

        references = (write, params.backend)
    try:
        data = prepare(plan, references[0], references[1], include_paths, hashes)
    finally:
        if pool is not None:
            pool.shutdown()
    gpu = cluster_device(device) == "cuda"
    inputs = FitInputs(
        base=str(plan.base) if plan.base else None, experts=[str(p) for p in plan.experts], data=data,
        seed=plan.spec.seed, workdir=str(workdir), device="cuda" if gpu else "cpu",
    )  # fmt: skip
    opts = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": FIT_THREADS}
    try:
        result = ray.get(_fit_task.options(**opts).remote(plan.spec.method, inputs, params))
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, MergescaleError):
            raise err.cause from None  # a user error, as raised (it names what to fix)
        raise RuntimeError(f"{plan.spec.method} fit: {type(err.cause).__name__}: {err.cause}") from err
    log.debug("%s fit in %.1f s", plan.spec.method, result.seconds)
    return result

