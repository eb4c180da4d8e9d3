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
import os
import queue
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

import mergescale
from mergescale.checkpoints import weights_sha256
from mergescale.errors import MergescaleError
from mergescale.eval import scores
from mergescale.eval.harness import generation_prompts, leaf_tasks, load_tasks, run_tasks
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
    from mergescale.zoo.build import cache_root

    return cache_root() / "eval-references"


def _check_models(paths: Sequence[str | Path]) -> list[str]:
    out = []
    for p in paths:
        path = Path(p)
        if not (path / "config.json").is_file():
            raise MergescaleError(f"{path}: not a Hugging Face model directory (no config.json)")
        out.append(str(path.resolve()))
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
) -> EvalReport:
    """Score ``models`` (and the references: ``base``, ``experts`` = {held-in task: expert dir}) on
    ``tasks`` with lm-eval through the evaluator pool.  ``known_experts`` (a zoo's, say) are used
    for the held-in tasks among ``tasks`` and ignored for the others."""
    started = time.perf_counter()
    models = _check_models(models)
    base = _check_models([base])[0] if base else None
    task_dict = load_tasks(tasks, include_paths)
    names = list(leaf_tasks(task_dict))
    experts = {**{t: p for t, p in (known_experts or {}).items() if t in names}, **(experts or {})}
    experts = {task: _check_models([p])[0] for task, p in experts.items()}
    for task in experts:
        if task not in names:
            raise MergescaleError(f"--expert {task}=...: {task} is not among the evaluated tasks ({', '.join(names)})")
    roles = {t: scores.HELD_IN if t in experts else scores.HELD_OUT for t in names}
    references = list(dict.fromkeys([*experts.values(), *([base] if base else [])]))
    hashes = {m: weights_sha256(m) for m in dict.fromkeys([*references, *models])}

    # the inputs divergences are measured on: each held-in generation task's prompts
    prompts = {t: generation_prompts(leaf_tasks(task_dict)[t], limit) for t in experts} if divergences else {}
    prompts = {t: p for t, p in prompts.items() if p is not None}
    ref_files = {t: _reference_file(hashes[experts[t]], backend, t, *p) for t, p in prompts.items()}

    task_sets: queue.SimpleQueue = queue.SimpleQueue()  # lm-eval task objects are stateful: one set per thread
    task_sets.put(task_dict)
    done_scores: dict[str, tuple[dict, float]] = {}

    def evaluate_one(lease: Lease, model: str, phase: int) -> dict:
        t0 = time.perf_counter()
        results, seconds = done_scores.get(model, (None, 0.0))
        if results is None:
            try:
                mine = task_sets.get_nowait()
            except queue.Empty:
                mine = load_tasks(tasks, include_paths)
            try:
                results = run_tasks(MergescaleLM(lease, model), mine, limit)
            finally:
                task_sets.put(mine)
        for task, expert in experts.items():
            if phase == 1 and expert == model and task in ref_files and not ref_files[task].exists():
                lease.reference(model, prompts[task][0], prompts[task][1], str(ref_files[task]))
        divs = {task: lease.divergence(model, str(ref_files[task])) for task in ref_files} if phase == 2 else {}
        return {"results": results, "divergences": divs, "seconds": seconds + time.perf_counter() - t0}

    own_pool = pool is None
    if own_pool:
        connect(address)
        pool = EvaluatorPool(backend, actors=actors, threads=threads, device=device, max_model_len=max_model_len)
    outcome: dict[str, dict] = {}
    try:
        with _progress(progress, (len(references) + len(models)) * len(names)) as advance:

            def finished(model, result):
                done_scores[model] = (result["results"], result["seconds"])
                advance(len(names), model)

            for model, result in zip(references, pool.map(lambda ls, m: evaluate_one(ls, m, 1), references, finished),
                                     strict=True):  # fmt: skip
                outcome[model] = result
            # the models asked for (one that is also a reference is only re-visited for its divergences)
            rest = [m for m in models if m not in outcome or ref_files]
            for model, result in zip(rest, pool.map(lambda ls, m: evaluate_one(ls, m, 2), rest, finished), strict=True):
                outcome[model] = result
        stats = pool.stats()
    finally:
        if own_pool:
            pool.shutdown()

    rows: list[dict] = []
    for model, result in outcome.items():
        rows += [
            {**r, "weights_sha256": hashes[model], "eval_seconds": result["seconds"]}
            for r in scores.score_rows(model, result["results"], roles)
            + scores.divergence_rows(model, result["divergences"], experts)
        ]
    rows = scores.normalize(rows, base, experts)
    for r in rows:
        if r["kind"] == "summary":
            r["weights_sha256"], r["eval_seconds"] = hashes[r["model"]], outcome[r["model"]]["seconds"]
    from importlib.metadata import version

    rows = scores.complete(rows, backend=backend, mergescale_version=mergescale.__version__,
                           lm_eval_version=version("lm-eval"))  # fmt: skip
    return EvalReport(rows=rows, seconds=time.perf_counter() - started, models=len(outcome), pool=stats)


def _reference_file(expert_hash: str, backend: str, task: str, prompts: list[str], max_tokens: int) -> Path:
    key = json.dumps([expert_hash, backend, task, prompts, max_tokens])
    return _references_dir() / f"{task}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


class _progress:
    """A rich progress bar over models × tasks (or nothing)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda n, model: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("model x task"), TimeElapsedColumn(), TimeRemainingColumn())  # fmt: skip
        self.bar.__enter__()
        job = self.bar.add_task("evaluating", total=self.total)
        return lambda n, model: self.bar.update(job, advance=n, description=f"evaluated {Path(model).name}")

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)


def write_rows(rows: list[dict], out_dir: Path | str, name: str) -> Path:
    """Write ``rows`` as ``out_dir/name.parquet``: under a temporary name, then renamed into place."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.parquet"
    tmp = out_dir / f".{name}.parquet.tmp-{os.getpid()}"
    try:
        pq.write_table(scores.to_table(rows), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
