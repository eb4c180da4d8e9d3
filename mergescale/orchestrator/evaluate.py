"""Evaluating model directories on lm-eval tasks with the evaluator pool: raw scores, normalized
scores against the base and the experts, ANP and divergences, as rows of ``eval.scores.SCHEMA``.

Two phases over the pool: the reference models (each held-in task's expert, the base) first — their
scores normalize everyone's, and each expert's greedy continuations and full distributions on its
task's prompts are written once to the reference cache — then the models asked for, with their
divergences to every held-in expert.  lm-eval runs in the driver (one task set per pool thread);
every model request goes to an actor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

import mergescale
from mergescale import console, files
from mergescale.cache import cache_root
from mergescale.checkpoints import weights_sha256
from mergescale.errors import MergescaleError, ModelError
from mergescale.eval import scores
from mergescale.eval.harness import generation_prompts, leaf_tasks, load_tasks, run_tasks, subset, use_split
from mergescale.eval.lm import MergescaleLM
from mergescale.orchestrator.cluster import connect
from mergescale.orchestrator.eval_pool import EvaluatorPool, Lease

log = logging.getLogger(__name__)


@dataclass
class EvalReport:
    rows: list[dict]
    seconds: float
    models: int  # models evaluated, references included
    pool: dict = field(default_factory=dict)  # EvaluatorPool.stats()


def _references_dir() -> Path:
    return cache_root() / "eval-references"


def _check_models(paths: Sequence[str | Path], trust_remote_code: bool = False) -> list[str]:
    """Absolute paths of model directories whose architecture an engine can load (checked before any
    engine starts: a model that needs custom code is refused unless ``trust_remote_code``)."""
    from mergescale.eval.architecture import check_architecture

    out = []
    for p in paths:
        path = Path(p)
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a Hugging Face model directory (no config.json)")
        check_architecture(path, trust_remote_code)
        out.append(str(path.resolve()))
    return out


class EvalSuite:
    """What models are evaluated on, and against what: lm-eval tasks with their roles (held-in = a task
    with an expert, held-out = the others), the reference models, document limits, and the expert
    references divergences are measured against (files under ``reference_dir``).

    ``evaluate`` scores one model on a lease of the evaluator pool; ``rows`` turns the outcomes of the
    models and of the references into normalized rows.  Thread-safe: lm-eval task objects are
    stateful, so each concurrent evaluation takes its own copy of the task set from a pool of them.
    """

    def __init__(self, tasks: Sequence[str], *, base: str | Path | None = None,
                 experts: Mapping[str, str | Path] | None = None, include_paths: Sequence[str | Path] = (),
                 limit: int | None | Mapping[str, int | None] = None, backend: str = "vllm",
                 divergences: bool = True, reference_dir: Path | None = None,
                 hashes: Mapping[str, str] | None = None, split: str | None = None):  # fmt: skip
        self.tasks, self.include_paths, self.backend, self.split = list(tasks), list(include_paths), backend, split
        self.task_dict = use_split(load_tasks(self.tasks, self.include_paths), split)
        self.names = list(leaf_tasks(self.task_dict))
        self.base = _check_models([base])[0] if base else None
        self.experts = {task: _check_models([p])[0] for task, p in (experts or {}).items()}
        for task in self.experts:
            if task not in self.names:
                raise MergescaleError(
                    f"--expert {task}=...: {task} is not among the evaluated tasks ({', '.join(self.names)})"
                )
        self.limits = {t: limit.get(t, limit.get("default")) if isinstance(limit, Mapping) else limit
                       for t in self.names}  # fmt: skip
        self.roles = {t: scores.HELD_IN if t in self.experts else scores.HELD_OUT for t in self.names}
        self.references = list(dict.fromkeys([*self.experts.values(), *([self.base] if self.base else [])]))
        self.hashes = dict(hashes or {})
        for m in self.references:
            self.hashes.setdefault(m, weights_sha256(m))
        # the inputs divergences are measured on: each held-in generation task's prompts
        tasks_ = leaf_tasks(self.task_dict)
        prompts = {t: generation_prompts(tasks_[t], self.limits[t]) for t in self.experts} if divergences else {}
        self.prompts = {t: p for t, p in prompts.items() if p is not None}
        reference_dir = reference_dir or _references_dir()
        self.ref_files = {t: reference_dir / _reference_name(self.hashes[self.experts[t]], backend, t, *p)
                          for t, p in self.prompts.items()}  # fmt: skip
        self._task_sets: queue.SimpleQueue = queue.SimpleQueue()
        self._task_sets.put(self.task_dict)

    def evaluate(self, lease: Lease, model: str, tasks: Sequence[str] | None = None,
                 divergences: Sequence[str] | None = None) -> dict:  # fmt: skip
        """Score ``model`` on ``tasks`` (default: all) and measure its divergence to the experts of the
        held-in tasks ``divergences`` (default: none).  The expert of a held-in task, evaluated here,
        also writes its reference file if it is missing."""
        t0 = time.perf_counter()
        try:
            mine = self._task_sets.get_nowait()
        except queue.Empty:
            mine = use_split(load_tasks(self.tasks, self.include_paths), self.split)
        try:
            wanted = self.names if tasks is None else list(tasks)
            part = mine if wanted == self.names else subset(mine, wanted)
            results = run_tasks(MergescaleLM(lease, model), part, self.limits) if wanted else {}
        finally:
            self._task_sets.put(mine)
        self.write_references(lease, model)
        divs = {t: lease.divergence(model, str(self.ref_files[t])) for t in divergences or () if t in self.ref_files}
        return {"results": results, "divergences": divs, "seconds": time.perf_counter() - t0}

    def write_references(self, lease: Lease, model: str) -> None:
        """If ``model`` is the expert of held-in tasks whose reference files are missing, write them."""
        for task, expert in self.experts.items():
            if expert == model and task in self.ref_files and not self.ref_files[task].exists():
                self.ref_files[task].parent.mkdir(parents=True, exist_ok=True)
                lease.reference(model, self.prompts[task][0], self.prompts[task][1], str(self.ref_files[task]))

    def rows(self, outcome: Mapping[str, dict], hashes: Mapping[str, str],
             references: Sequence[dict] = ()) -> list[dict]:  # fmt: skip
        """Normalized rows (``eval.scores.SCHEMA``) of every model in ``outcome`` ({model: what
        :meth:`evaluate` returned}).  The references' scores come from their outcomes (when they are
        among them) or from ``references``: earlier rows of theirs, ``model`` being their path."""
        rows: list[dict] = [dict(r) for r in references if r["kind"] == "score" and r["model"] not in outcome]
        for model, result in outcome.items():
            rows += [
                {**r, "weights_sha256": hashes[model], "eval_seconds": result["seconds"]}
                for r in scores.score_rows(model, result["results"], self.roles)
                + scores.divergence_rows(model, result["divergences"], self.experts)
            ]
        rows = [r for r in scores.normalize(rows, self.base, self.experts) if r["model"] in outcome]
        for r in rows:
            if r["kind"] == "summary":
                r["weights_sha256"], r["eval_seconds"] = hashes[r["model"]], outcome[r["model"]]["seconds"]
        from importlib.metadata import version

        return scores.complete(rows, backend=self.backend, mergescale_version=mergescale.__version__,
                               lm_eval_version=version("lm-eval"))  # fmt: skip


class SplitSuites:
    """One suite per split over the same tasks and references, used as one: an editing experiment scores each
    model on the validation split (where its λ is selected) and on the test split (what it reports; ``None``,
    lm-eval's default).  ``evaluate`` and ``rows`` are :class:`EvalSuite`'s; each row says its ``split``, and
    each split is normalized against the references' rows of the same split.  No divergences."""

    SPLITS = (None, "validation")

    def __init__(self, suites: Mapping[str | None, EvalSuite]):
        self.suites = dict(suites)
        first = self.suites[None]
        self.names, self.experts, self.roles, self.hashes = first.names, first.experts, first.roles, first.hashes
        self.ref_files: dict = {}

    def evaluate(self, lease: Lease, model: str, tasks: Sequence[str] | None = None,
                 divergences: Sequence[str] | None = None) -> dict:  # fmt: skip
        t0 = time.perf_counter()
        by_split = {split: suite.evaluate(lease, model, tasks) for split, suite in self.suites.items()}
        return {"splits": by_split, "seconds": time.perf_counter() - t0}

    def write_references(self, lease: Lease, model: str) -> None:
        pass  # no divergences, no reference files

    def rows(self, outcome: Mapping[str, dict], hashes: Mapping[str, str],
             references: Sequence[dict] = ()) -> list[dict]:  # fmt: skip
        out = []
        for split, suite in self.suites.items():
            mine = {m: o["splits"][split] for m, o in outcome.items()}
            refs = [r for r in references if r.get("split") == split]
            out += [{**r, "split": split} for r in suite.rows(mine, hashes, refs)]
        return out


def evaluate_models(
    models: Sequence[str | Path],
    tasks: Sequence[str],
    *,
    base: str | Path | None = None,
    experts: Mapping[str, str | Path] | None = None,
    known_experts: Mapping[str, str | Path] | None = None,
    include_paths: Sequence[str | Path] = (),
    limit: int | None = None,
    backend: str = "vllm",
    divergences: bool = True,
    address: str | None = None,
    actors: int | None = None,
    threads: int | None = None,
    device: str = "auto",
    max_model_len: int | None = None,
    pool: EvaluatorPool | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> EvalReport:
    """Score ``models`` (and the references: ``base``, ``experts`` = {held-in task: expert dir}) on
    ``tasks`` with lm-eval through the evaluator pool.  ``known_experts`` (a zoo's, say) are used
    for the held-in tasks among ``tasks`` and ignored for the others."""
    started = time.perf_counter()
    models = _check_models(models, trust_remote_code)
    names = list(leaf_tasks(load_tasks(tasks, include_paths)))
    experts = {**{t: p for t, p in (known_experts or {}).items() if t in names}, **(experts or {})}
    suite = EvalSuite(tasks, base=base, experts=experts, include_paths=include_paths, limit=limit, backend=backend,
                      divergences=divergences)  # fmt: skip
    references = suite.references
    hashes = {**suite.hashes, **{m: weights_sha256(m) for m in models if m not in suite.hashes}}
    held_in = list(suite.ref_files)

    own_pool = pool is None
    if own_pool:
        connect(address)
        pool = EvaluatorPool(backend, actors=actors, threads=threads, device=device, max_model_len=max_model_len,
                             trust_remote_code=trust_remote_code)  # fmt: skip
    outcome: dict[str, dict] = {}
    try:
        with _progress(progress, (len(references) + len(models)) * len(suite.names)) as advance:
            for model, result in zip(references, pool.map(suite.evaluate, references,
                                     lambda m, r: advance(len(suite.names), m)), strict=True):  # fmt: skip
                outcome[model] = result
            # the models asked for (one that is also a reference is only re-visited for its divergences)
            rest = [m for m in models if m not in outcome or held_in]

            def second(lease: Lease, model: str) -> dict:
                if model in outcome:
                    divs = suite.evaluate(lease, model, tasks=[], divergences=held_in)["divergences"]
                    return {**outcome[model], "divergences": divs}
                return suite.evaluate(lease, model, divergences=held_in)

            for model, result in zip(rest, pool.map(second, rest, lambda m, r: advance(len(suite.names), m)),
                                     strict=True):  # fmt: skip
                outcome[model] = result
        stats = pool.stats()
    finally:
        if own_pool:
            pool.shutdown()
    rows = suite.rows(outcome, hashes)
    return EvalReport(rows=rows, seconds=time.perf_counter() - started, models=len(outcome), pool=stats)


def _reference_name(expert_hash: str, backend: str, task: str, prompts: list[str], max_tokens: int) -> str:
    key = json.dumps([expert_hash, backend, task, prompts, max_tokens])
    return f"{task}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


class _progress:
    """A progress bar over models × tasks (or nothing)."""

    def __init__(self, enabled: bool, total: int):
        self.bar, self.total = console.progress("model x task", enabled=enabled), total

    def __enter__(self):
        self.bar.__enter__()
        job = self.bar.add_task("evaluating", total=self.total)
        return lambda n, model: self.bar.update(job, advance=n, description=f"evaluated {Path(model).name}")

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)


def write_rows(rows: list[dict], out_dir: Path | str, name: str) -> Path:
    """Write ``rows`` as ``out_dir/name.parquet``: under a temporary name, then renamed into place."""
    path = Path(out_dir) / f"{name}.parquet"
    with files.atomic_path(path) as tmp:
        pq.write_table(scores.to_table(rows), tmp)
    return path
