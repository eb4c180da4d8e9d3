"""Running lm-evaluation-harness tasks: finding them, building their requests, reading their metrics.

Tasks are found in mergescale's own task directory (the zoo's tasks with local data), in the
directories the user names (``--include-path``), and among lm-eval's built-in tasks (indexed only
when a name is not found in the first two: indexing all of them takes seconds).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergescale.errors import MergescaleError

TASKS_DIR = Path(__file__).parent / "lm_tasks"


@dataclass(frozen=True)
class TaskResult:
    task: str
    metrics: dict[str, float]  # lm-eval's aggregated value per metric (the "none" filter, or "metric/filter")
    stderr: dict[str, float | None]
    n: int  # documents evaluated
    primary: str  # the task's first metric: what normalized scores and ANP use


_QUIET_LOCK = threading.Lock()
_quiet_depth = 0
_saved_levels: list[int] = []


@contextlib.contextmanager
def _quiet():
    """lm-eval logs a warning per task about custom datasets and an info line per request type.  Nested
    and concurrent uses (evaluations and fits in threads) restore the levels only when the last one ends."""
    global _quiet_depth
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    with _QUIET_LOCK:
        if _quiet_depth == 0:
            _saved_levels[:] = [lg.level for lg in loggers]
            for lg in loggers:
                lg.setLevel(logging.ERROR)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                for lg, level in zip(loggers, _saved_levels, strict=True):
                    lg.setLevel(level)


def load_tasks(names: Sequence[str], include_paths: Sequence[str | Path] = ()) -> dict:
    """lm-eval's task dict (``{"tasks", "groups", "group_map"}``) for task, group or tag names."""
    from lm_eval.tasks import TaskManager

    paths = [TASKS_DIR, *map(Path, include_paths)]
    for p in paths[1:]:
        if not p.is_dir():
            raise MergescaleError(f"--include-path {p}: not a directory of lm-eval task YAMLs")
    with _quiet():
        manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
        if any(n not in manager.all_tasks for n in names):
            manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=True)
        unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
        if unknown:
            raise MergescaleError(
                f"unknown lm-eval task {unknown[0]!r}: not a zoo task (zoo, zoo_held_in, zoo_held_out, zoo_upper, ...) "
                "nor an lm-eval task; pass --include-path DIR for a directory holding its YAML"
            )
        return manager.load(list(names))


def use_split(task_dict: dict, split: str | None) -> dict:
    """Score ``task_dict``'s leaf tasks on ``split``: ``None`` leaves lm-eval's choice (the test split when a
    task has one), ``validation`` scores the validation documents instead (a task without one is an error:
    a search must never select on the split it reports)."""
    if split is None:
        return task_dict
    if split != "validation":
        raise MergescaleError(f"eval.split: {split!r}; give `validation` or leave it out (lm-eval's test split)")
    for name, task in leaf_tasks(task_dict).items():
        if not task.has_validation_docs():
            raise MergescaleError(
                f"task {name}: has no validation split, so it cannot be scored without its test documents; "
                "give it a `validation_split:` in its YAML or leave it out of the objective"
            )
        task.config.test_split = None  # lm-eval's eval_docs: the test split if any, else the validation split
    return task_dict


def leaf_tasks(task_dict: dict) -> dict:
    return dict(task_dict["tasks"])


def generation_prompts(task, limit: int | None) -> tuple[list[str], int] | None:
    """The prompts of a ``generate_until`` task (as lm-eval builds them, ``limit`` applied) and its token
    cap — the inputs divergences are measured on; ``None`` for other task types."""
    if task.OUTPUT_TYPE != "generate_until":
        return None
    with _quiet():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
    prompts = [inst.args[0] for inst in task.instances]
    caps = [int(inst.args[1].get("max_gen_toks", 256)) for inst in task.instances]
    return prompts, max(caps, default=256)


def run_tasks(lm, task_dict: dict, limit: int | None | Mapping[str, int | None] = None) -> dict[str, TaskResult]:
    """Evaluate ``lm`` on every leaf task of ``task_dict`` with lm-eval; one :class:`TaskResult` per task.

    ``limit``: documents per task, one number for all or ``{task: n}`` (lm-eval takes one limit per
    call, so tasks are evaluated in one call per distinct limit)."""
    from lm_eval.evaluator import evaluate

    tasks = leaf_tasks(task_dict)
    limits = {name: limit.get(name) if isinstance(limit, Mapping) else limit for name in tasks}
    out = {"results": {}, "n-samples": {}}
    for value in dict.fromkeys(limits.values()):
        part = {"tasks": {n: t for n, t in tasks.items() if limits[n] == value}, "groups": {}, "group_map": {}}
        part = task_dict if len(set(limits.values())) == 1 else part
        with _quiet():
            got = evaluate(lm, part, limit=value, bootstrap_iters=1000, log_samples=False, verbosity="ERROR")
        out["results"].update(got["results"])
        out["n-samples"].update(got.get("n-samples", {}))
    results = {}
    for name, task in tasks.items():
        raw = out["results"][name]
        metrics, stderr = {}, {}
        for key, value in raw.items():
            if "," not in key or "_stderr," in key or not isinstance(value, int | float):
                continue
            metric, filt = key.split(",", 1)
            label = metric if filt == "none" else f"{metric}/{filt}"
            metrics[label] = float(value)
            se = raw.get(f"{metric}_stderr,{filt}")
            stderr[label] = float(se) if isinstance(se, int | float) else None
        listed = [m["metric"] for m in (task.config.metric_list or []) if isinstance(m.get("metric"), str)]
        primary = next((m for m in listed if m in metrics), next(iter(metrics)))
        n = out["n-samples"].get(name, {}).get("effective", 0)
        results[name] = TaskResult(name, metrics, stderr, int(n), primary)
    return results


def subset(task_dict: dict, names: Sequence[str]) -> dict:
    """A task dict holding only the leaf tasks ``names`` (the same task objects; groups dropped)."""
    tasks = leaf_tasks(task_dict)
    return {"tasks": {n: tasks[n] for n in names}, "groups": {}, "group_map": {}}
