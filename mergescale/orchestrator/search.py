"""Coefficient search: Ray Tune trials that each merge one parameter vector and score it on the validation
split, the best merge written out and scored once on the test split.

One run (``docs/ALGORITHMS.md#coefficient-search``):

* the search space (``search_space.py``) turns a vector into a merge spec; the vectors come from an Optuna
  study — grid, random, TPE or CMA-ES, seeded — kept in a journal file under the results directory;
* Ray Tune runs the trials, at most ``search.parallel`` at once; the vectors are drawn in batches of that
  size (CMA-ES's population), a batch once the one before is told, and handed to the trials through the
  runner; with ``search.asha`` an ASHA scheduler stops the worst trials on a small document budget;
* a trial is a tiny Tune actor that asks the :class:`TrialRunner` actor to merge its vector (a sharded Ray
  merge) and score it on the runner's one evaluator pool, shared by every trial (vLLM is never started in
  a trial's placement group); every trial is a job of the *trials store* (``RESULTS/trials``, a study
  store on the validation split), so a vector is merged and scored once;
* the best vector's merge is scored on the test split — the first time anything reads it — into the
  *test store* (``RESULTS/test``) and published as ``RESULTS/best``, a Hugging Face model directory whose
  card records the search.

Resuming: the Optuna journal is the record of the search.  A rerun of a killed search reopens it; the
trials that were running when the driver died are run again with their own parameters before anything
new is asked (a draw the kill cut short completed first: ``Draws``), so the sequence of vectors is the one
an uninterrupted run draws (every sampler is seeded per trial number).  Each run is a fresh Tune experiment
in ``RESULTS/tune`` (Tune's logs).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from mergescale import console, files
from mergescale.errors import MergescaleError, SpecError
from mergescale.orchestrator import results as store
from mergescale.orchestrator.jobs import Job, canonical, job_key, reference_units
from mergescale.orchestrator.search_trial import trial
from mergescale.orchestrator.study import (
    StudyContext,
    evaluate_references,
    make_pool,
    make_suite,
    merge_and_evaluate,
    results_dir,
)
from mergescale.orchestrator.study_models import StudyModels, resolve_models
from mergescale.search_space import SearchSpace
from mergescale.specs import MergeSpec, SearchSpec

log = logging.getLogger(__name__)

TRIALS, TEST, BEST, TUNE = "trials", "test", "best", "tune"
JOURNAL, TABLE, AUDIT = "optuna.journal", "trials.parquet", "audit.json"
DEFAULT_TRIALS = 32
METRIC = "objective"


# ---------------------------------------------------------------- the objective
def objective(rows: list[dict], spec: SearchSpec, tasks: list[str]) -> dict:
    """A trial's objective and its parts from its evaluation rows (``ObjectiveSpec``)."""
    o = spec.objective
    scores = {r["task"]: r["normalized"] for r in rows
              if r["kind"] == "score" and r["primary"] and r["role"] == "held_in"}  # fmt: skip
    missing = [t for t in tasks if scores.get(t) is None]
    if o.held_in and missing:
        raise MergescaleError(
            f"objective.tasks: {missing[0]} has no normalized score (its expert scores 0 on these documents); "
            "leave it out of objective.tasks or raise eval.limit"
        )
    divs = {r["task"]: r["value"] for r in rows if r["kind"] == "divergence" and r["metric"] == o.metric}
    if o.divergence and any(t not in divs for t in tasks):
        t = next(t for t in tasks if t not in divs)
        raise SpecError(f"objective.divergence: no {o.metric} divergence on {t} (a generation task with "
                        "eval.divergences: true is needed)")  # fmt: skip
    held_out = [r["normalized"] for r in rows
                if r["kind"] == "score" and r["primary"] and r["role"] == "held_out" and r["normalized"] is not None]
    parts = {
        "held_in": sum(scores[t] for t in tasks) / len(tasks) if not missing else math.nan,
        "divergence": sum(divs[t] for t in tasks) / len(tasks) if all(t in divs for t in tasks) else math.nan,
        "held_out_loss": sum(max(0.0, 1 - n) for n in held_out) / len(held_out) if held_out else 0.0,
    }
    value = (o.held_in * parts["held_in"] if o.held_in else 0.0) - (
        o.divergence * parts["divergence"] if o.divergence else 0.0) - o.held_out * parts["held_out_loss"]  # fmt: skip
    return {METRIC: value, **parts}


# ---------------------------------------------------------------- the runner actor
class TrialRunner:
    """Merges and scores trials for every Tune trial (a Ray actor with threads): one evaluator pool, one
    study context per document budget (its references scored once), the trials store as a cache."""

    def __init__(self, spec: SearchSpec, models: StudyModels, space: SearchSpace, results: str):
        self.spec, self.models, self.space, self.results = spec, models, space, Path(results)
        self.names = tuple(models.experts)
        self.tasks = spec.objective.tasks or [models.task_of(e) for e in self.names]
        self.pool = make_pool(spec.study("validation", spec.eval.limit))
        self.contexts: dict = {}
        self.lock = threading.Lock()
        self.busy: list[tuple[float, float]] = []  # wall-clock intervals spent merging or scoring
        self.vectors: dict[int, dict] = {}  # trial number -> the vector the searcher drew
        self.drawn = threading.Condition()

    def _context(self, split: str | None, limit) -> StudyContext:
        key = (split, json.dumps(limit))
        with self.lock:
            if key not in self.contexts:
                self.contexts[key] = (threading.Lock(), None)
            gate, ctx = self.contexts[key]
        with gate:
            if ctx is None:
                view = self.spec.study(split, limit)
                view = view if split else view.model_copy(update={"keep_models": True})  # the best is published
                where = self.results / (TRIALS if split else TEST)
                suite, held_out = make_suite(view, self.models, where)
                ctx = StudyContext(view, self.models, where, suite, self.pool, held_out,
                                   device=view.resources.device,
                                   merge_slots=threading.Semaphore(view.resources.merges_in_flight))  # fmt: skip
                started = time.time()
                refs = reference_units(view, self.models)
                evaluate_references(ctx, refs, store.done_keys(where, store.REFERENCES))
                self.busy.append((started, time.time()))
                ctx.references_ready.set()
                self.contexts[key] = (gate, ctx)
            return ctx

    def evaluate(self, trial: int, vector: dict, limit, split: str | None = "validation") -> dict:
        """Merge ``vector`` and score it (``limit`` documents of ``split``: a trial; None: the best, once, on
        the test split, its model kept for publishing); its objective, its parts, the job's key and seconds."""
        ctx = self._context(split, limit)
        merge = self.space.to_spec(vector)
        params = merge.parameters
        own = [e.parameters for e in merge.experts]
        own = own if any(own) else None
        key = job_key(ctx.spec, self.models, self.names, merge.method, params, merge.seed, own)
        label = f"{merge.method} trial {trial}" if split else f"{merge.method} search best"
        job = Job(key, merge.method, label, canonical(params), self.names, merge.seed, label,
                  canonical(own) if own else "")  # fmt: skip
        started = time.time()
        model = ctx.results / store.MODELS / key
        cached = (ctx.results / store.JOBS / f"{key}.parquet").is_file()  # a finished unit (renamed into place)
        if not split:  # the best's test unit is reused only while its model (or the published one) is there
            cached = cached and (model.is_dir() or key in _card(self.results / BEST))
        if cached:
            rows = store.read_unit(ctx.results, store.JOBS, key)
        else:
            rows = merge_and_evaluate(job, ctx)
            self.busy.append((started, time.time()))
        log.debug("trial %s (%s, %s documents): %s in %.2f s", trial, split or "test", limit,
                  "read from the store" if cached else "merged and scored", time.time() - started)  # fmt: skip
        merge_s = next((r["merge_seconds"] for r in rows if r["merge_seconds"] is not None), None)
        eval_s = next((r["eval_seconds"] for r in rows if r["eval_seconds"] is not None), None)
        return {**objective(rows, self.spec, self.tasks), "job_key": key, "limit": limit or 0,
                "merge_seconds": merge_s, "eval_seconds": eval_s, "cached": cached,
                "seconds": time.time() - started, "started": started,
                "model_path": None if split else str(model)}  # fmt: skip

    def offer(self, number: int, vector: dict) -> None:
        """The driver's searcher drew trial ``number``'s vector: the trial waiting for it may go."""
        with self.drawn:
            self.vectors[number] = vector
            self.drawn.notify_all()

    def vector(self, number: int) -> dict:
        """Trial ``number``'s vector, once the searcher has drawn it (its batch starts when the one before is told)."""
        with self.drawn:
            self.drawn.wait_for(lambda: number in self.vectors)
            return self.vectors[number]

    def prepare(self, limit) -> None:
        """Score the reference models on the first budget now, while Tune starts its trials."""
        self._context("validation", limit)

    def audit(self) -> list[str]:
        return sorted(self.pool.seen_prompts())

    def busy_intervals(self) -> list[tuple[float, float]]:
        return list(self.busy)

    def stats(self) -> dict:
        return self.pool.stats()

    def shutdown(self) -> None:
        self.pool.shutdown()


def _card(model: Path) -> str:
    card = model / "README.md"
    return card.read_text() if card.is_file() else ""


# ---------------------------------------------------------------- the searcher
def _sampler(spec: SearchSpec, space: SearchSpace, number: int):
    """The Optuna sampler that draws trial ``number`` — seeded by (seed, number), so a resumed search draws
    what an uninterrupted one would (a sampler's own random state does not survive a killed driver)."""
    import optuna

    s = spec.search
    seed = (s.seed * 1_000_003 + number) % 2**31
    if s.algorithm in ("random", "grid"):  # grid: the point is enqueued (grid_point), the sampler not asked
        return optuna.samplers.RandomSampler(seed=seed)
    if s.algorithm == "optuna":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, budget(spec, space) // 4)))
    return optuna.samplers.CmaEsSampler(seed=seed, popsize=parallel(spec, space), warn_independent_sampling=False)


def grid_point(space: SearchSpace, number: int) -> dict:
    """Grid trial ``number``: the points in the order of ``itertools.product`` over the coordinates' values
    (the last coordinate fastest), as a study's grid expands."""
    point = {}
    for c in reversed(space.coordinates):
        number, i = divmod(number, len(c.domain.values))
        point[c.name] = c.domain.values[i]
    return {c.name: point[c.name] for c in space.coordinates}


def distributions(space: SearchSpace) -> dict:
    import optuna.distributions as d

    return {c.name: d.CategoricalDistribution(list(c.domain.values)) if c.domain.values is not None
            else d.FloatDistribution(c.domain.low, c.domain.high, log=c.domain.log)
            for c in space.coordinates}  # fmt: skip


def budget(spec: SearchSpec, space: SearchSpace) -> int:
    if spec.search.algorithm == "grid":
        return math.prod(len(c.domain.values) for c in space.coordinates)
    return spec.search.trials or DEFAULT_TRIALS


def parallel(spec: SearchSpec, space: SearchSpace) -> int:
    """Trials per batch: ``search.parallel``, else CMA-ES's default population 4 + ⌊3 ln n⌋, else 2."""
    if spec.search.parallel:
        return spec.search.parallel
    n = len(space.coordinates)
    return 4 + int(3 * math.log(n)) if spec.search.algorithm == "cmaes" else 2


def open_study(spec: SearchSpec, results: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    journal = optuna.storages.journal.JournalFileBackend(str(results / JOURNAL))
    return optuna.create_study(storage=optuna.storages.JournalStorage(journal), study_name=spec.name,
                               direction="maximize", load_if_exists=True)  # fmt: skip


class Draws:
    """The searcher's side of the Optuna study, without Ray: which vector each trial number runs, and when
    the next batch is drawn.

    Trial n belongs to batch n // parallel.  A batch's vectors are drawn (``study.ask``) only once every
    trial of the batch before it is told, so the sequence is the batch sequence whichever trial finishes
    first.  A rerun of a killed search resumes from the journal at whatever line the kill left it: the
    unfinished trials keep their own parameters, a draw the kill cut short (a trial created with part of its
    parameters, or a grid point enqueued and not yet asked) is completed with the values the uninterrupted
    draw gives, and the rest of a batch the kill cut short is drawn."""

    def __init__(self, spec: SearchSpec, space: SearchSpace, study):
        self.spec, self.space, self.study = spec, space, study
        self.p, self.total, self.dists = parallel(spec, space), budget(spec, space), distributions(space)
        self.told = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}

    def resume(self) -> dict[int, dict]:
        """Trial number -> vector for every trial a killed run left unfinished, then the next batch if due."""
        from optuna.trial import TrialState

        out = {}
        for t in self.study.get_trials(deepcopy=False):
            if t.state == TrialState.WAITING:  # a grid point enqueued by a killed run, not yet asked
                out[t.number] = self._ask(t.number)
            elif t.state == TrialState.RUNNING:
                out[t.number] = t.params if set(t.params) == set(self.dists) else self._complete(t)
        n = self._asked()
        if n < self.total and (n % self.p or len(self.told) == n):  # a batch cut short while drawn, or the next
            out |= self.draw(n // self.p)
        return out

    def tell(self, number: int, value: float | None) -> dict[int, dict]:
        """Trial ``number`` finished (``value`` None: pruned); the next batch's vectors once its batch is told."""
        from optuna.trial import TrialState

        if value is None:
            self.study.tell(number, state=TrialState.PRUNED)
        else:
            self.study.tell(number, value)
        self.told.add(number)
        batch = number // self.p
        if all(n in self.told for n in range(batch * self.p, min((batch + 1) * self.p, self.total))):
            if (batch + 1) * self.p < self.total and self._asked() == (batch + 1) * self.p:
                return self.draw(batch + 1)
        return {}

    def draw(self, batch: int) -> dict[int, dict]:
        """Ask the rest of batch ``batch`` (all of it, unless a killed run asked part)."""
        out = {}
        for number in range(self._asked(), min((batch + 1) * self.p, self.total)):
            if self.spec.search.algorithm == "grid":
                self.study.enqueue_trial(grid_point(self.space, number))
            out[number] = self._ask(number)
        return out

    def _asked(self) -> int:
        """Trials in the journal (``study.trials`` would deep-copy them all to count them)."""
        return len(self.study.get_trials(deepcopy=False))

    def _ask(self, number: int) -> dict:
        self.study.sampler = _sampler(self.spec, self.space, number)
        return self.study.ask(self.dists).params

    def _complete(self, trial) -> dict:
        """A trial whose draw a kill cut short: its draw rerun on a copy of the trials before it (the study
        as the uninterrupted draw saw it — every sampler is seeded by trial number), and what the copy's draw
        wrote and the journal lacks (parameters, the sampler's records such as CMA-ES's state) written to it."""
        import optuna

        copy = optuna.create_study(direction="maximize")
        copy.add_trials(self.study.get_trials(deepcopy=True)[: trial.number])
        if self.spec.search.algorithm == "grid":
            copy.enqueue_trial(grid_point(self.space, trial.number))
        copy.sampler = _sampler(self.spec, self.space, trial.number)
        params = copy.ask(self.dists).params
        drawn, storage = copy.trials[trial.number], self.study._storage
        for key, value in drawn.system_attrs.items():
            if trial.system_attrs.get(key) != value:
                storage.set_trial_system_attr(trial._trial_id, key, value)
        for name, value in params.items():
            if name not in trial.params:
                storage.set_trial_param(trial._trial_id, name, self.dists[name].to_internal_repr(value),
                                        self.dists[name])  # fmt: skip
        return params


def _searcher(draws: Draws, full_limit, runner):
    """A Tune searcher over the study of ``draws`` that hands Tune trial *numbers* and the runner their vectors.

    The vectors of a batch are offered to the runner as they are drawn; the trials wait there for them.  Tune
    meanwhile starts the next batch's trials as soon as slots free up, on the actors the finished trials leave
    (an actor per batch would cost seconds of start-up per batch).  A failed trial stays running in the
    journal, so a rerun repeats it."""
    from ray.tune.search import Searcher

    study = draws.study

    class StudySearcher(Searcher):
        def __init__(self):
            super().__init__(metric=METRIC, mode="max")
            self.cursor = 0  # the next number for Tune (told ones are skipped)
            self.live: dict[str, int] = {}
            self._offer(draws.resume())

        __reduce__ = _driver_only  # Tune pickles its searcher into its experiment state; the journal is ours

        @staticmethod
        def _offer(vectors: dict[int, dict]) -> None:
            for number, vector in vectors.items():
                runner.offer.remote(number, vector)

        def suggest(self, trial_id: str):
            while self.cursor in draws.told:
                self.cursor += 1
            if self.cursor >= draws.total:
                return Searcher.FINISHED
            self.live[trial_id], self.cursor = self.cursor, self.cursor + 1
            return {"trial": self.live[trial_id]}

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            number = self.live.pop(trial_id, None)
            if number is None or error or not result:  # a failed trial stays running: a rerun repeats it
                return
            frozen = study.get_trials(deepcopy=False)[number]
            for k in ("held_in", "divergence", "held_out_loss", "job_key", "limit", "merge_seconds",
                      "eval_seconds", "cached", "seconds", "started"):  # fmt: skip
                if k in result:
                    study._storage.set_trial_user_attr(frozen._trial_id, k, result[k])
            pruned = result["limit"] != (full_limit or 0)  # stopped by ASHA below the full budget
            self._offer(draws.tell(number, None if pruned else result[METRIC]))

        def save(self, checkpoint_path: str):  # the journal is the search's state; Tune's copy is not needed
            pass

        def restore(self, checkpoint_path: str):
            pass

    return StudySearcher()


def _driver_only(self):
    """``__reduce__`` of the driver's Tune plug-ins (the searcher over the study, the progress callback):
    Tune pickles them into its experiment state, which a search never restores (the journal is its state)."""
    return (type(None), ())


def budgets(spec: SearchSpec) -> list:
    """The document budgets a trial is scored on: the full ``eval.limit``, or ASHA's rungs up to it."""
    a, full = spec.search.asha, spec.eval.limit
    if a is None:
        return [full]
    if not isinstance(full, int):
        raise SpecError("search.asha: needs one number of documents per task as eval.limit (the full budget)")
    if a.min_limit >= full:
        raise SpecError(f"search.asha.min_limit: {a.min_limit} is not below eval.limit {full}")
    out, n = [], a.min_limit
    while n < full:
        out.append(n)
        n *= a.reduction_factor
    return out + [full]


# ---------------------------------------------------------------- the driver
@dataclass
class SearchRun:
    results: Path
    best_dir: Path
    trials: int  # trials in the search (its budget)
    ran: int  # trials this run finished
    best: dict  # the best trial: number, vector, objective and its parts
    test: dict  # the best merge's held-in / held-out scores on the test split
    seconds: float
    overhead: float | None = None  # share of the trial phase (runner start to the end) not merging or scoring
    steady_overhead: float | None = None  # the same from the first trial's start to the last trial's end
    pool: dict = field(default_factory=dict)


def check_search(spec: SearchSpec, spec_path: Path, progress: bool = False):
    """The search's models, space and document budgets; a bad spec fails here, before anything runs."""
    from mergescale.orchestrator.hashes import weight_hashes
    from mergescale.orchestrator.plan import plan_merge

    view = spec.study("validation", spec.eval.limit)
    if isinstance(spec.experts, dict) and len(spec.experts) < 1:
        raise SpecError(f"{spec_path}: experts: give at least one expert")
    if spec.zoo and any(isinstance(v, list) and len(v) > 1 for v in spec.zoo.values()):
        raise SpecError(f"{spec_path}: zoo: a search merges one zoo member; give single values")
    models = resolve_models(view, spec_path.parent, progress)
    models.hashes = weight_hashes([models.base, *(p for p, _ in models.experts.values())])
    tasks = [models.task_of(e) for e in models.experts]
    for t in spec.objective.tasks or []:
        if t not in tasks:
            raise SpecError(f"{spec_path}: objective.tasks: {t} is no expert's task (the experts' tasks: "
                            f"{', '.join(tasks)})")  # fmt: skip
    if not (spec.objective.held_in or spec.objective.divergence):
        raise SpecError(f"{spec_path}: objective: give held_in or divergence a positive weight")
    if spec.objective.divergence and not spec.eval.divergences:
        raise SpecError(f"{spec_path}: objective.divergence needs eval.divergences: true")
    merge = MergeSpec.model_validate({
        "method": spec.merge.method, "base": models.base, "seed": spec.merge.seed, "dtype": spec.merge.dtype,
        "experts": [{"model": p, "task": t} for p, t in models.experts.values()],
        "parameters": spec.merge.parameters,
    })  # fmt: skip
    config = json.loads((Path(models.base) / "config.json").read_text())
    space = SearchSpace(merge, spec.space, int(config.get("num_hidden_layers", 1)), where=f"{spec_path}: space")
    if spec.search.algorithm == "grid":
        ranged = next((c for c in space.coordinates if c.domain.values is None), None)
        if ranged:
            raise SpecError(f"{spec_path}: space.{ranged.key}: a grid search needs `values`, not a range")
        if spec.search.trials and spec.search.trials != budget(spec, space):
            raise SpecError(f"{spec_path}: search.trials: a grid search runs its {budget(spec, space)} points; "
                            "drop `trials`")  # fmt: skip
    if spec.search.algorithm == "cmaes":
        if sum(c.domain.values is None for c in space.coordinates) < 2:
            raise SpecError(f"{spec_path}: search.algorithm: CMA-ES needs at least two searched ranges; "
                            "use optuna (TPE) or random")  # fmt: skip
        if spec.search.asha:
            raise SpecError(f"{spec_path}: search.asha: CMA-ES needs every member of a generation scored on "
                            "the full budget; use optuna (TPE) or random with asha")  # fmt: skip
    for name in spec.search.loggers:
        pkg = {"tensorboard": "tensorboardX", "mlflow": "mlflow"}[name]
        if importlib.util.find_spec(pkg) is None:
            raise SpecError(f"{spec_path}: search.loggers: {name} needs the {pkg} package; pip install {pkg}")
    try:
        rungs = budgets(spec)
    except SpecError as err:
        raise SpecError(f"{spec_path}: {err}") from None
    middle = {c.name: c.domain.values[0] if c.domain.values is not None
              else (math.sqrt(c.domain.low * c.domain.high) if c.domain.log else (c.domain.low + c.domain.high) / 2)
              for c in space.coordinates}  # fmt: skip
    try:
        plan_merge(space.to_spec(middle))  # the method's parameters, checked on headers
    except MergescaleError as err:
        raise type(err)(f"{spec_path}: space: {err}") from None
    return models, space, rungs


def run_search(spec: SearchSpec, spec_path: Path | str, out: Path | str | None = None, *,
               address: str | None = None, progress: bool = True) -> SearchRun:  # fmt: skip
    """Run (or resume) the search of ``spec`` into ``out`` (default: the spec's ``results``, else
    ``results/<name>``), then score its best merge on the test split and publish it."""
    from mergescale.orchestrator.cluster import connect

    started = time.perf_counter()
    spec_path = Path(spec_path)
    results = results_dir(spec, spec_path, out).absolute()
    paths = [str(p if Path(p).is_absolute() else (spec_path.parent / p).resolve()) for p in spec.eval.include_paths]
    spec = spec.model_copy(update={"eval": spec.eval.model_copy(update={"include_paths": paths})})
    models, space, rungs = check_search(spec, spec_path, progress)
    with store.locked(results):
        files.write_text(results / "search.yaml", spec_path.read_text())
        study = open_study(spec, results)
        _check_same_search(study, spec, space, results)
        connect(address)
        runner = ray.remote(TrialRunner).options(num_cpus=0, max_concurrency=2 * parallel(spec, space) + 4).remote(
            spec, models, space, str(results))  # fmt: skip
        try:
            done_before = _finished(study)
            trials_started = time.time()
            prepared = runner.prepare.remote(rungs[0])  # the references, while Tune starts
            _tune(spec, space, study, runner, rungs, results, progress)
            ray.get(prepared)
            if _finished(study) < budget(spec, space):  # Tune stopped early (a signal): the test split waits
                raise KeyboardInterrupt
            tune_seconds = time.time() - trials_started if _finished(study) > done_before else 0.0
            busy = ray.get(runner.busy_intervals.remote())
            files.write_text(results / AUDIT, json.dumps({"trials": ray.get(runner.audit.remote())}) + "\n")
            best = best_trial(study, rungs[-1])
            test = ray.get(runner.evaluate.remote(best["trial"], best["vector"], spec.eval.limit, None))
            pool = ray.get(runner.stats.remote())
        finally:
            ray.get(runner.shutdown.remote())
            ray.kill(runner)
        from mergescale.orchestrator.search_report import publish_best, write_plots, write_table

        table = write_table(study, space, spec, results)
        best_dir = publish_best(Path(test["model_path"]), results / BEST, spec, space, best, test, len(table))
        write_plots(table, space, spec, results)
    overhead = 1 - _union(busy) / tune_seconds if tune_seconds and busy else None
    steady = _steady_overhead(study, busy, done_before)
    return SearchRun(results, best_dir, budget(spec, space), _finished(study) - done_before, best,
                     {k: test[k] for k in ("held_in", "held_out_loss", "divergence", METRIC, "job_key")},
                     time.perf_counter() - started, overhead, steady, pool)  # fmt: skip


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _check_same_search(study, spec: SearchSpec, space: SearchSpace, results: Path) -> None:
    """A rerun continues the same search; a changed space, searcher or objective is refused (its trials
    would not be comparable) — with the fix."""
    fingerprint = canonical({"space": spec.space, "merge": spec.merge.model_dump(), "search": spec.search.model_dump(),
                             "objective": spec.objective.model_dump(), "eval": spec.eval.model_dump(),
                             "coordinates": [c.name for c in space.coordinates]})  # fmt: skip
    old = study.user_attrs.get("spec")
    if old is None:
        study.set_user_attr("spec", fingerprint)
    elif old != fingerprint:
        raise SpecError(f"{results}: holds a search with another space, searcher, objective or evaluation; give "
                        "--out another directory (or delete this one) to start a new search")  # fmt: skip


def _tune(spec: SearchSpec, space: SearchSpace, study, runner, rungs: list, results: Path, progress: bool) -> None:
    """Run the trials not yet finished with Ray Tune."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's console tables off: the progress bar says it
    n_batch = parallel(spec, space)
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(n_batch)  # start a whole batch at once (Tune's default: 1)
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Ctrl-C interrupts the command; the journal keeps the search
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    total = budget(spec, space)
    if _finished(study) >= total:
        return
    scheduler = None
    if spec.search.asha:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=len(rungs), grace_period=1,
                                  reduction_factor=spec.search.asha.reduction_factor)  # fmt: skip
    searcher = ConcurrencyLimiter(_searcher(Draws(spec, space, study), rungs[-1], runner), max_concurrent=n_batch)
    trainable = tune.with_resources(tune.with_parameters(trial, runner=runner, budgets=rungs),
                                    {"cpu": 0, "memory": 1})  # a trial only waits for the runner  # fmt: skip
    runs = sorted(p.name for p in (results / TUNE).glob("run-*")) if (results / TUNE).is_dir() else []
    with _TrialBar(progress, study, total) as bar:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=total,
                                        metric=METRIC, mode="max", trial_dirname_creator=_dirname,
                                        reuse_actors=True),  # a batch's trials start without new actors
            run_config=tune.RunConfig(name=f"run-{len(runs):03d}", storage_path=str(results / TUNE), verbose=0,
                                      callbacks=[bar.callback(), *_loggers(spec, results)],
                                      failure_config=tune.FailureConfig(fail_fast=True)),
        )  # fmt: skip
        grid = tuner.fit()
    if grid.errors:
        raise _trial_error(grid.errors[0])


def _dirname(trial) -> str:
    return f"trial_{trial.config['trial']:04d}"


def _trial_error(err: BaseException) -> BaseException:
    """A failed trial's error: a user error (a ``MergescaleError``) as itself — the innermost one, not Ray's
    wrapper of it, whose text is the remote traceback — anything else as it came."""
    found, cause, seen = None, err, set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        found = cause if isinstance(cause, MergescaleError) else found
        cause = getattr(cause, "cause", None) or cause.__cause__
    return type(found)(str(found)) if found is not None else err


def _loggers(spec: SearchSpec, results: Path) -> list:
    """Tune's TensorBoard / MLflow callbacks the spec asks for (their packages checked in ``check_search``)."""
    out = []
    for name in spec.search.loggers:
        if name == "tensorboard":
            from ray.tune.logger import TBXLoggerCallback

            out.append(TBXLoggerCallback())
        elif name == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            out.append(MLflowLoggerCallback(tracking_uri=(results / "mlruns").as_uri(), experiment_name=spec.name))
    return out


def best_trial(study, full_limit) -> dict:
    """The finished trial with the highest objective on the full budget (ties: the earliest)."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise MergescaleError("the search finished no trial on the full document budget")
    t = max(done, key=lambda t: (t.value, -t.number))
    return {"trial": t.number, "vector": t.params, METRIC: t.value,
            **{k: t.user_attrs.get(k) for k in ("held_in", "divergence", "held_out_loss", "job_key")}}  # fmt: skip


def _steady_overhead(study, busy: list, done_before: int) -> float | None:
    """The overhead between this run's first trial start and its last trial end (engine start and the
    references excluded): 1 - |busy ∩ that window| / window."""
    spans = [(t.user_attrs["started"], t.user_attrs["started"] + t.user_attrs["seconds"])
             for t in study.get_trials(deepcopy=False)[done_before:]
             if "started" in t.user_attrs and not t.user_attrs.get("cached")]  # fmt: skip
    if not spans:
        return None
    a, b = min(x for x, _ in spans), max(y for _, y in spans)
    inside = [(max(x, a), min(y, b)) for x, y in busy if y > a and x < b]
    return 1 - _union(inside) / (b - a) if b > a else None


def _union(intervals: list[tuple[float, float]]) -> float:
    """The total length of the union of the intervals."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


class _TrialBar:
    """A progress bar over the trials (finished / budget, best so far), advanced by a Tune callback."""

    def __init__(self, enabled: bool, study, total: int):
        self.bar, self.study, self.total = console.progress(enabled=enabled), study, total

    def __enter__(self):
        self.bar.__enter__()
        self.task = self.bar.add_task(self._text(), total=self.total, completed=_finished(self.study))
        return self

    def _text(self) -> str:
        from optuna.trial import TrialState

        values = [t.value for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        return f"trials (best {max(values):.4f})" if values else "trials"

    def callback(self):
        from ray.tune import Callback

        bar = self

        class Advance(Callback):
            __reduce__ = _driver_only

            def on_trial_complete(self, iteration, trials, trial, **info):
                bar.bar.update(bar.task, completed=_finished(bar.study), description=bar._text())

        return Advance()

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

