"""Running a study: many expert subsets × many methods, each merged model evaluated held-in and held-out.

The spec expands to keyed jobs (``jobs.py``); jobs whose key is in the results store are skipped, so a
study is resumable and a rerun of a finished study does nothing.  Running: the reference models (the
base and every expert) are evaluated once, on every task of the study, and stored as their own units;
the jobs then flow through a bounded pipeline of threads — a job merges (at most ``merges_in_flight``
at a time, each a sharded Ray merge of ``merge_workers`` tasks) and is then evaluated on the evaluator
pool (held-in = the tasks of its experts, plus every held-out task, with divergences to its experts);
at most ``merges_in_flight + evaluators`` jobs are in flight, so at most that many merged models are on
disk.  A finished job writes its rows as one Parquet file (temporary name, then rename) and its model is
deleted unless ``keep_models``.  Killing the driver loses only the jobs in flight.

:func:`merge_and_evaluate` is one job, callable on its own (a coefficient search will run it per trial).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from mergescale import console, files, provenance
from mergescale.checkpoints import weights_sha256
from mergescale.errors import MergescaleError
from mergescale.orchestrator import results as store
from mergescale.orchestrator.hashes import weight_hashes
from mergescale.orchestrator.jobs import Job, expand, reference_units
from mergescale.orchestrator.study_models import StudyModels, resolve_members
from mergescale.specs import StudySpec

log = logging.getLogger(__name__)


@dataclass
class StudyContext:
    """What a job needs to run: the models, the evaluation suite, the pool, the reference rows."""

    spec: StudySpec
    models: StudyModels
    results: Path
    suite: object  # orchestrator.evaluate.EvalSuite
    pool: object  # orchestrator.eval_pool.EvaluatorPool
    held_out: list[str]  # leaf held-out tasks
    reference_rows: list[dict] = field(default_factory=list)  # score rows of the references, model = path
    merge_slots: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(1))
    references_ready: threading.Event = field(default_factory=threading.Event)
    failed: threading.Event = field(default_factory=threading.Event)  # the run is stopping on an error
    device: str = "auto"
    on_merged: object = None  # callback(job) after its merge

    def write_reference(self, model: str, prompts: list[str], max_tokens: int, out: str) -> None:
        """A data-driven fit's inputs: ``model``'s continuations of ``prompts`` decoded by the study's pool."""
        self.pool.run(lambda lease, m: lease.reference(m, prompts, max_tokens, out), model)


def merge_and_evaluate(job: Job, ctx: StudyContext) -> list[dict]:
    """Merge one job's model into ``results/models/<key>``, evaluate it (held-in tasks of its experts,
    every held-out task, divergences to its experts), write its rows as one unit of the store, and
    delete the model unless ``keep_models``.  Returns the rows."""
    from mergescale.orchestrator.merge import run_merge

    out = ctx.results / store.MODELS / job.key
    started = time.perf_counter()
    if not (out / "config.json").is_file():  # a complete model of an interrupted run is reused
        shutil.rmtree(out, ignore_errors=True)
        with ctx.merge_slots:
            try:
                run_merge(job.merge_spec(ctx.models), out, progress=False, device=ctx.device,
                          workers=ctx.spec.resources.merge_workers, references=(ctx.write_reference,
                          ctx.spec.eval.backend), include_paths=ctx.spec.eval.include_paths,
                          hashes=ctx.models.hashes)  # fmt: skip
            except MergescaleError as err:
                raise type(err)(f"job {job.model_id}: {err}") from None
    merge_seconds = time.perf_counter() - started
    if ctx.on_merged:
        ctx.on_merged(job)
    ctx.references_ready.wait()
    if ctx.failed.is_set():
        raise MergescaleError(f"job {job.model_id}: not evaluated, the study is stopping on an earlier error")
    held_in = [ctx.models.task_of(e) for e in job.experts]
    tasks = held_in + [t for t in ctx.held_out if t not in held_in]
    model = str(out)
    outcome, env = ctx.pool.run(lambda lease, m: (ctx.suite.evaluate(lease, m, tasks, held_in), lease.info()), model)
    rows = ctx.suite.rows({model: outcome}, {model: weights_sha256(out)}, ctx.reference_rows)
    edit = {f"edit_{k}" if k != "experiment" else k: v for k, v in json.loads(job.edit or "{}").items()}
    rows = store.complete(
        [{**r, "model": job.model_id} for r in rows],
        study=ctx.spec.name, job_key=job.key, job_kind=store.EDIT if edit else store.MERGE, method=job.method,
        label=job.label, **edit,
        parameters=job.parameters, experts=list(job.experts), n_experts=len(job.experts), seed=job.seed,
        merge_seconds=merge_seconds, model_path=model if ctx.spec.keep_models else None, split=ctx.spec.eval.split,
        fit=_fit_record(out, ctx.results, job.key), zoo_key=ctx.models.zoo_key, zoo_host=ctx.models.zoo_host,
        **ctx.models.factors,
        **{c: env.get(c) for c in provenance.COLUMNS},
    )  # fmt: skip
    store.write_unit(ctx.results, store.JOBS, job.key, rows)
    if not ctx.spec.keep_models:
        shutil.rmtree(out, ignore_errors=True)
    return rows


def _fit_record(model: Path, results: Path, key: str) -> str | None:
    """A data-driven merge's fit: its full record (every step) copied to ``results/fits/<key>.json``, and
    the compact part (data, coefficients, diagnostics, seconds) returned for the ``fit`` column."""
    source = model / "fit.json"
    if not source.is_file():
        return None
    text = source.read_text()
    record = json.loads(text)
    files.write_text(results / store.FITS / f"{key}.json", text)
    return json.dumps({k: record[k] for k in ("data", "summary", "seconds")}, sort_keys=True)


@dataclass
class StudyRun:
    results: Path
    jobs: int  # jobs in the study
    skipped: int  # already in the store
    ran: int
    references_evaluated: int
    seconds: float
    pool: dict = field(default_factory=dict)


def _tidy_models(results: Path, done: set[str], keep: bool) -> None:
    """Remove what a killed run left in ``models/``: staging directories, models of finished jobs
    (unless kept).  Complete models of unfinished jobs stay and are reused."""
    folder = results / store.MODELS
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.startswith(".") or (entry.name in done and not keep) or not (entry / "config.json").is_file():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    for kind in (store.JOBS, store.REFERENCES):
        for tmp in (results / kind).glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)


def results_dir(spec: StudySpec, spec_path: Path | str, out: Path | str | None = None) -> Path:
    """The study's results store: ``out``, else the spec's ``results`` (relative to the spec), else
    ``results/<name>``."""
    if out:
        return Path(out)
    if spec.results:
        p = Path(spec.results)
        return p if p.is_absolute() else (Path(spec_path).parent / p).resolve()
    return Path("results") / spec.name


def run_study(spec: StudySpec, spec_path: Path | str, out: Path | str | None = None, *,
              address: str | None = None, progress: bool = True) -> StudyRun:  # fmt: skip
    """Run every job of ``spec`` not yet in the results store ``out`` (default: the spec's ``results``,
    else ``results/<name>``)."""
    started = time.perf_counter()
    spec_path = Path(spec_path)
    results = results_dir(spec, spec_path, out)
    paths = [str(p if Path(p).is_absolute() else (spec_path.parent / p).resolve()) for p in spec.eval.include_paths]
    spec = spec.model_copy(update={"eval": spec.eval.model_copy(update={"include_paths": paths})})
    members = resolve_members(spec, spec_path.parent, progress)
    plans = []  # (models, jobs, references) of every member
    for models in members:
        models.hashes = weight_hashes([models.base, *(p for p, _ in models.experts.values()),
                                       *([models.multitask] if models.multitask else []),
                                       *(p for v in models.versions.values() for p in v)])  # fmt: skip
        jobs = expand(spec, models)
        if spec.kind == "transfer":  # the geometry of every (source, target): columns, not part of the keys
            from mergescale.orchestrator.geometry import version_geometry

            geo = version_geometry(models.versions, models.hashes)
            jobs = [_with_geometry(j, geo) for j in jobs]
        _validate_methods(jobs, models, spec.eval.include_paths)  # a bad spec fails here, before anything is written
        plans.append((models, jobs, reference_units(spec, models)))
    total = sum(len(jobs) for _, jobs, _ in plans)
    with store.locked(results):
        files.write_text(results / "study.yaml", spec_path.read_text())
        done = store.done_keys(results, store.JOBS)
        refs_done = store.done_keys(results, store.REFERENCES)
        _tidy_models(results, done, spec.keep_models)
        ran = refs_ran = 0
        stats: dict = {}
        for models, jobs, refs in plans:
            pending = [j for j in jobs if j.key not in done]
            if not pending:
                continue
            if models.member:
                log.info("study %s: member %s, %d jobs to run", spec.name, models.member, len(pending))
            n, r, stats = _run(spec, models, results, pending, refs, refs_done, address, progress)
            ran, refs_ran = ran + n, refs_ran + r
        if not ran:
            log.info("all %d jobs of study %s are in %s", total, spec.name, results)
    skipped = total - ran
    return StudyRun(results, total, skipped, ran, refs_ran, time.perf_counter() - started, stats)


def _with_geometry(job: Job, geometry: dict) -> Job:
    from dataclasses import replace

    edit = json.loads(job.edit)
    return replace(job, edit=json.dumps({**edit, **geometry[edit["source"]][edit["target"]]}, sort_keys=True))


def _validate_methods(jobs: list[Job], models: StudyModels, include_paths=()) -> None:
    """Plan (headers only) the first job of every method configuration and subset size: a bad
    parameter or an arity mismatch fails before any work.  A data-driven method's data (each expert's
    task and split) is checked too."""
    from mergescale.fit.data import task_prompts
    from mergescale.methods import get_method
    from mergescale.orchestrator.fit import fit_params
    from mergescale.orchestrator.plan import plan_merge

    seen = set()
    for job in jobs:
        if (job.label, len(job.experts)) in seen:  # one plan per method configuration and subset size
            continue
        seen.add((job.label, len(job.experts)))
        try:
            plan = plan_merge(job.merge_spec(models))
            if get_method(job.method).data_driven:
                params = fit_params(plan)
                for expert in plan.spec.experts:
                    task_prompts(expert.task, params.split, 1, job.seed, include_paths)
        except MergescaleError as err:
            raise type(err)(f"methods ({job.label}, {len(job.experts)} experts): {err}") from None


def _pool_size(spec: StudySpec) -> tuple[int | None, int]:
    import ray

    from mergescale.orchestrator.cluster import gpus_in_cluster

    r = spec.resources
    threads = r.eval_threads or 1
    if r.evaluators or (r.device != "cpu" and gpus_in_cluster()):
        return r.evaluators, threads
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, (cpus - r.merges_in_flight * r.merge_workers) // threads), threads


def make_suite(spec: StudySpec, models: StudyModels, results: Path):
    """The evaluation suite of ``models`` under ``spec.eval`` (held-in: the experts' tasks; divergence
    references under ``results``), and the tasks every job is scored on besides its own held-in ones: the
    leaf held-out tasks — or, in an editing experiment, every task, on both splits (``SplitSuites``)."""
    from mergescale.orchestrator.evaluate import EvalSuite, SplitSuites

    def suite(split: str | None, divergences: bool) -> EvalSuite:
        return EvalSuite(
            [t for _, t in models.experts.values()] + spec.eval.held_out,
            base=models.base, experts={t: p for p, t in models.experts.values()},
            include_paths=spec.eval.include_paths, limit=spec.eval.limit, backend=spec.eval.backend,
            divergences=divergences, reference_dir=results / store.REFERENCES, hashes=models.hashes, split=split,
        )  # fmt: skip

    if spec.kind == "negation":
        both = SplitSuites({split: suite(split, False) for split in SplitSuites.SPLITS})
        return both, list(both.names)
    if spec.kind != "merge":  # every model scored on every task
        one = suite(spec.eval.split, False)
        return one, list(one.names)
    one = suite(spec.eval.split, spec.eval.divergences)
    held_in_tasks = {t for _, t in models.experts.values()}
    return one, [t for t in one.names if t not in held_in_tasks]


def make_pool(spec: StudySpec):
    """The evaluator pool of ``spec.resources`` on the Ray cluster this process joined."""
    from mergescale.orchestrator.eval_pool import EvaluatorPool

    actors, threads = _pool_size(spec)
    return EvaluatorPool(spec.eval.backend, actors=actors, threads=threads, device=spec.resources.device,
                         max_model_len=spec.eval.max_model_len)  # fmt: skip


def evaluate_references(ctx: StudyContext, refs: list[dict], refs_done: set[str], on_done=None) -> int:
    """Evaluate the reference units ``refs`` not in ``refs_done`` on every task of the suite, write each
    as a unit of the store, and set ``ctx.reference_rows`` (old and new).  Returns the units evaluated."""
    spec, models, results, suite, pool = ctx.spec, ctx.models, ctx.results, ctx.suite, ctx.pool
    todo = [u for u in refs if u["key"] not in refs_done]
    outcome, envs = {}, {}
    if todo:
        paths = [u["path"] for u in todo]
        evaluated = pool.map(lambda lease, m: (suite.evaluate(lease, m), lease.info()), paths,
                             on_done and (lambda m, _: on_done()))  # fmt: skip
        for u, (got, env) in zip(todo, evaluated, strict=True):
            outcome[u["path"]], envs[u["path"]] = got, env
    old = [row for u in refs if u["key"] in refs_done for row in store.read_unit(results, store.REFERENCES, u["key"])]
    old = [{**row, "model": row["model_path"]} for row in old]
    rows = suite.rows(outcome, models.hashes, old) if outcome else []
    for u in todo:
        mine = [{**row, "model": u["model_id"]} for row in rows if row["model"] == u["path"]]
        store.write_unit(results, store.REFERENCES, u["key"], store.complete(
            mine, study=spec.name, job_key=u["key"], job_kind=u["kind"], label=u["kind"],
            experts=u["experts"], n_experts=len(u["experts"]), model_path=u["path"], split=spec.eval.split,
            zoo_key=models.zoo_key, zoo_host=models.zoo_host, **models.factors,
            **{c: envs[u["path"]].get(c) for c in provenance.COLUMNS}))  # fmt: skip
    ctx.reference_rows = [r for r in old + rows if r["kind"] == "score"]
    missing = [p for t, p in suite.experts.items() if t in suite.ref_files and not suite.ref_files[t].exists()]
    if missing:  # references evaluated earlier whose divergence files are gone
        pool.map(lambda lease, m: suite.write_references(lease, m), list(dict.fromkeys(missing)))
    return len(todo)


def _run(spec, models, results, pending, refs, refs_done, address, progress):
    from mergescale.orchestrator.cluster import connect

    suite, held_out = make_suite(spec, models, results)
    connect(address)
    pool = make_pool(spec)
    r = spec.resources
    ctx = StudyContext(spec, models, results, suite, pool, held_out, device=r.device,
                       merge_slots=threading.Semaphore(r.merges_in_flight))  # fmt: skip
    todo_refs = [u for u in refs if u["key"] not in refs_done]
    with _Bars(progress, len(pending), len(pending) + len(todo_refs)) as bars:
        ctx.on_merged = lambda job: bars.advance("merge")
        ran = 0
        ex = ThreadPoolExecutor(pool.size + r.merges_in_flight + 1, thread_name_prefix="job")
        try:

            def references_or_stop() -> None:
                try:
                    evaluate_references(ctx, refs, refs_done, lambda: bars.advance("eval"))
                except BaseException:
                    ctx.failed.set()  # before the jobs waiting for the references wake up
                    raise

            ref_future = ex.submit(references_or_stop)
            ref_future.add_done_callback(lambda f: ctx.references_ready.set())
            futures = {ex.submit(merge_and_evaluate, job, ctx): job for job in pending}
            waiting = {ref_future, *futures}
            while waiting:
                finished, waiting = wait(waiting, return_when=FIRST_COMPLETED)
                for fut in finished:
                    if fut.exception() is not None:
                        ctx.failed.set()  # jobs waiting for the references stop instead of writing rows
                        raise fut.exception()
                    if fut in futures:
                        ran += 1
                        bars.advance("eval")
            stats = pool.stats()
        finally:
            # an error or Ctrl-C: jobs not started are dropped, jobs in flight finish (or stop) first
            ex.shutdown(wait=True, cancel_futures=True)
            pool.shutdown()
    return ran, len(todo_refs), stats


class _Bars:
    """Two progress bars, merges and evaluations, advanced from the pipeline's threads."""

    def __init__(self, enabled: bool, merges: int, evals: int):
        self.bar, self.lock = console.progress(enabled=enabled), threading.Lock()
        self.ids = {"merge": self.bar.add_task("merged", total=merges),
                    "eval": self.bar.add_task("evaluated", total=evals)}  # fmt: skip

    def __enter__(self):
        self.bar.__enter__()
        return self

    def advance(self, which: str) -> None:
        with self.lock:
            self.bar.update(self.ids[which], advance=1)

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)
