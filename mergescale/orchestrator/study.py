"""Running a study: many expert subsets × many methods, each merged model evaluated held-in and held-out.

A study spec (``specs.StudySpec``) expands to *jobs*: one merge of one subset of the experts with one
method configuration and one seed.  Each job is keyed by a content hash — the models' weight hashes,
the method, its parameters, the subset, the seed, the evaluation suite and the mergescale version —
and a job whose key is already in the results store is skipped, so a study is resumable and a rerun
of a finished study does nothing.

Running: the reference models (the base and every expert) are evaluated once, on every task of the
study, and stored as their own units; the jobs then flow through a bounded pipeline — a job merges
(at most ``merges_in_flight`` at a time, each a sharded Ray merge of ``merge_workers`` tasks) and is
then evaluated on the evaluator pool (held-in = the tasks of its experts, plus every held-out task,
with divergences to its experts); at most ``merges_in_flight + evaluators`` jobs are in flight, so
at most that many merged models are on disk.  A finished job writes its rows as one Parquet file
(temporary name, then rename) and its model is deleted unless ``keep_models``.  Killing the driver
loses only the jobs in flight.

:func:`merge_and_evaluate` is one job, callable on its own (coefficient search runs it per trial).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import random
import re
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import mergescale
from mergescale.checkpoints import weights_sha256
from mergescale.errors import MergescaleError
from mergescale.orchestrator import results as store
from mergescale.specs import MergeSpec, StudySpec

log = logging.getLogger(__name__)

ZOO_PREFIX = "zoo:"


# ---------------------------------------------------------------- models
@dataclass
class StudyModels:
    """The study's models on disk: the base, and each expert with its held-in lm-eval task."""

    base: str
    experts: dict[str, tuple[str, str]]  # name -> (directory, held-in task)
    hashes: dict[str, str] = field(default_factory=dict)  # directory -> weights sha256

    def task_of(self, name: str) -> str:
        return self.experts[name][1]


def _hub_or_path(ref: str, root: Path, key: str) -> str:
    path = Path(ref) if Path(ref).is_absolute() else root / ref
    if path.exists():
        if not (path / "config.json").is_file():
            raise MergescaleError(f"{key}: {path} is not a Hugging Face model directory (no config.json)")
        return str(path.resolve())
    if re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not ref.startswith("."):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        except Exception as err:  # offline, unknown repo, gated model ...
            raise MergescaleError(
                f"{key}: {ref} is neither a directory (relative to the study file) nor a reachable hub model "
                f"({type(err).__name__}); download it first and give its path"
            ) from None
    raise MergescaleError(f"{key}: {path}: no such model directory (paths are relative to the study file)")


def resolve_models(spec: StudySpec, root: Path, progress: bool = True) -> StudyModels:
    """Directories of the base and the experts: paths (relative to ``root``), hub ids, ``zoo:`` references."""
    zoo = None
    uses_zoo = (
        spec.experts == "zoo"
        or spec.base.startswith(ZOO_PREFIX)
        or any(
            e.model.startswith(ZOO_PREFIX) for e in (spec.experts.values() if isinstance(spec.experts, dict) else [])
        )
    )
    if uses_zoo:
        if spec.zoo is None:
            raise MergescaleError("zoo: `zoo:` references need a `zoo:` block, e.g. `zoo: {preset: tiny, seed: 0}`")
        from mergescale.zoo.build import build_zoo, preset_spec
        from mergescale.zoo.lm_eval_tasks import PREFIX

        unknown = set(spec.zoo) - {"preset", "seed"}
        if unknown:
            raise MergescaleError(f"zoo.{sorted(unknown)[0]}: unknown key; a zoo is `{{preset: tiny, seed: 0}}`")
        preset = preset_spec(spec.zoo.get("preset", "tiny"), seed=int(spec.zoo.get("seed", 0)))
        zoo = build_zoo(preset, progress=progress)

    def resolve(ref: str, key: str) -> str:
        if not ref.startswith(ZOO_PREFIX):
            return _hub_or_path(ref, root, key)
        name = ref[len(ZOO_PREFIX) :]
        if name == "base":
            return str(zoo.base)
        if name not in zoo.experts:
            raise MergescaleError(f"{key}: {ref}: the zoo has base and experts {', '.join(zoo.experts)}")
        return str(zoo.experts[name])

    base = resolve(spec.base, "base")
    experts: dict[str, tuple[str, str]] = {}
    if spec.experts == "zoo":
        experts = {name: (str(path), PREFIX + name) for name, path in zoo.experts.items()}
    else:
        for name, entry in spec.experts.items():
            task = entry.task
            if task is None and entry.model.startswith(ZOO_PREFIX):
                task = "zoo_" + entry.model[len(ZOO_PREFIX) :]
            if task is None:
                raise MergescaleError(
                    f"experts.{name}: name its held-in lm-eval task: `{name}: {{model: {entry.model}, task: TASK}}`"
                )
            experts[name] = (resolve(entry.model, f"experts.{name}"), task)
    tasks = [t for _, t in experts.values()]
    if len(set(tasks)) != len(tasks):
        dup = next(t for t in tasks if tasks.count(t) > 1)
        raise MergescaleError(f"experts: two experts claim the held-in task {dup}; each task has one expert")
    return StudyModels(base, experts)


# ---------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    key: str
    method: str
    label: str
    parameters: str  # canonical JSON
    experts: tuple[str, ...]
    seed: int
    model_id: str  # display name: "<label>/<expert>+<expert>[/seed=N]"

    def merge_spec(self, models: StudyModels) -> MergeSpec:
        experts = [{"model": models.experts[e][0], "task": models.experts[e][1]} for e in self.experts]
        return MergeSpec.model_validate({
            "method": self.method, "base": models.base, "experts": experts,
            "parameters": json.loads(self.parameters), "seed": self.seed,
        })  # fmt: skip


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _digest(value) -> str:
    return hashlib.sha256(_canonical(value).encode()).hexdigest()


def subsets(spec: StudySpec, names: list[str]) -> list[tuple[str, ...]]:
    """All k-subsets of the experts (in the spec's order) for every listed k, or a seeded sample per k
    (``sample: n`` for every k, ``sample: {k: n}`` for some)."""
    out = []
    for k in spec.subsets.sizes:
        if not 1 <= k <= len(names):
            raise MergescaleError(f"subsets.sizes: {k} experts per merge, but the study has {len(names)} experts")
        every = list(itertools.combinations(names, k))
        sample = spec.subsets.sample
        sample = sample.get(k) if isinstance(sample, dict) else sample
        if sample is not None and sample < len(every):
            rng = random.Random(f"{spec.subsets.seed}:{k}")
            every = [every[i] for i in sorted(rng.sample(range(len(every)), sample))]
        out += every
    return out


def _configs(spec: StudySpec) -> list[tuple[str, str, dict]]:
    """(method, label, parameters) for every method and every point of its grid."""
    out = []
    for i, m in enumerate(spec.methods):
        clash = set(m.grid) & set(m.parameters)
        if clash:
            raise MergescaleError(f"methods.{i}: `{sorted(clash)[0]}` is both in parameters and in grid; keep one")
        for k, values in m.grid.items():
            if not values:
                raise MergescaleError(f"methods.{i}.grid.{k}: give at least one value")
        axes = list(m.grid)
        for point in itertools.product(*(m.grid[a] for a in axes)):
            grid = dict(zip(axes, point, strict=True))
            suffix = " ".join(f"{a}={_canonical(v).strip(chr(34))}" for a, v in grid.items())
            label = " ".join(x for x in (m.label or m.method, suffix) if x)
            out.append((m.method, label, {**m.parameters, **grid}))
    labels = [c[1] for c in out]
    if len(set(labels)) != len(labels):
        dup = next(label for label in labels if labels.count(label) > 1)
        raise MergescaleError(f"methods: two method entries are both labelled {dup!r}; give one a `label:`")
    return out


def suite_key(spec: StudySpec, held_in: list[str]) -> dict:
    e = spec.eval
    return {"held_in": held_in, "held_out": e.held_out, "limit": e.limit, "backend": e.backend,
            "divergences": e.divergences, "include_paths": e.include_paths}  # fmt: skip


def expand(spec: StudySpec, models: StudyModels) -> list[Job]:
    """Every job of the study, keyed.  Order: subset size, subset, method, seed (so a partial study
    already compares every method on the small subsets)."""
    names = list(models.experts)
    jobs = []
    for subset in subsets(spec, names):
        for method, label, params in _configs(spec):
            for seed in spec.seeds:
                held_in = [models.task_of(e) for e in subset]
                key = _digest({
                    "base": models.hashes[models.base],
                    "experts": [[e, models.hashes[models.experts[e][0]]] for e in subset],
                    "method": method, "parameters": params, "seed": seed,
                    "suite": suite_key(spec, held_in), "mergescale": mergescale.__version__,
                })  # fmt: skip
                model_id = f"{label}/{'+'.join(subset)}" + (f"/seed={seed}" if len(spec.seeds) > 1 else "")
                jobs.append(Job(key, method, label, _canonical(params), tuple(subset), seed, model_id))
    return jobs


def reference_units(spec: StudySpec, models: StudyModels) -> list[dict]:
    """The base and every expert, each evaluated once on every task of the study."""
    suite = suite_key(spec, [t for _, t in models.experts.values()])
    units = [{"kind": store.BASE, "name": "base", "path": models.base, "experts": []}]
    units += [{"kind": store.EXPERT, "name": n, "path": p, "experts": [n]} for n, (p, _) in models.experts.items()]
    for u in units:
        u["key"] = _digest({"model": models.hashes[u["path"]], "role": u["name"], "suite": suite,
                            "mergescale": mergescale.__version__})  # fmt: skip
        u["model_id"] = "base" if u["kind"] == store.BASE else f"expert:{u['name']}"
    return units


def _hashes(paths: list[str]) -> dict[str, str]:
    """Weight hashes of ``paths``, remembered in ``$MERGESCALE_CACHE/weight-hashes.json`` by file sizes
    and mtimes (hashing big checkpoints on every rerun would take minutes)."""
    from mergescale.zoo.build import cache_root

    memo_file = cache_root() / "weight-hashes.json"
    memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
    out, changed = {}, False
    for p in dict.fromkeys(paths):
        stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(Path(p).glob("*.safetensors"))]
        known = memo.get(p)
        if known and known["files"] == stamp:
            out[p] = known["sha256"]
        else:
            out[p], changed = weights_sha256(p), True
            memo[p] = {"files": stamp, "sha256": out[p]}
    if changed:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        _write_text(memo_file, json.dumps(memo, indent=1, sort_keys=True))
    return out


# ---------------------------------------------------------------- running
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
                raise MergescaleError(f"job {job.model_id}: {err}") from None
    merge_seconds = time.perf_counter() - started
    if ctx.on_merged:
        ctx.on_merged(job)
    ctx.references_ready.wait()
    if ctx.failed.is_set():
        raise MergescaleError(f"job {job.model_id}: not evaluated, the study is stopping on an earlier error")
    held_in = [ctx.models.task_of(e) for e in job.experts]
    model = str(out)
    outcome = ctx.pool.run(lambda lease, m: ctx.suite.evaluate(lease, m, held_in + ctx.held_out, held_in), model)
    rows = ctx.suite.rows({model: outcome}, {model: weights_sha256(out)}, ctx.reference_rows)
    rows = store.complete(
        [{**r, "model": job.model_id} for r in rows],
        study=ctx.spec.name, job_key=job.key, job_kind=store.MERGE, method=job.method, label=job.label,
        parameters=job.parameters, experts=list(job.experts), n_experts=len(job.experts), seed=job.seed,
        merge_seconds=merge_seconds, model_path=model if ctx.spec.keep_models else None,
        fit=_fit_record(out, ctx.results, job.key),
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
    _write_text(results / store.FITS / f"{key}.json", text)
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


@contextlib.contextmanager
def _locked(results: Path):
    results.mkdir(parents=True, exist_ok=True)
    with open(results / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MergescaleError(
                f"{results}: another `mergescale study run` is writing these results; wait for it or use another --out"
            ) from None
        yield


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


def default_results(spec: StudySpec, spec_path: Path) -> Path:
    if spec.results:
        p = Path(spec.results)
        return p if p.is_absolute() else (spec_path.parent / p).resolve()
    return Path("results") / spec.name


def run_study(spec: StudySpec, spec_path: Path | str, out: Path | str | None = None, *,
              address: str | None = None, progress: bool = True) -> StudyRun:  # fmt: skip
    """Run every job of ``spec`` not yet in the results store ``out`` (default: the spec's ``results``,
    else ``results/<name>``)."""
    started = time.perf_counter()
    spec_path = Path(spec_path)
    results = Path(out) if out else default_results(spec, spec_path)
    paths = [str(p if Path(p).is_absolute() else (spec_path.parent / p).resolve()) for p in spec.eval.include_paths]
    spec = spec.model_copy(update={"eval": spec.eval.model_copy(update={"include_paths": paths})})
    models = resolve_models(spec, spec_path.parent, progress)
    models.hashes = _hashes([models.base, *(p for p, _ in models.experts.values())])
    jobs = expand(spec, models)
    refs = reference_units(spec, models)
    _validate_methods(jobs, models, spec.eval.include_paths)  # a bad spec fails here, before anything is written
    with _locked(results):
        _write_text(results / "study.yaml", spec_path.read_text())
        done = store.done_keys(results, store.JOBS)
        pending = [j for j in jobs if j.key not in done]
        refs_done = store.done_keys(results, store.REFERENCES)
        _tidy_models(results, done, spec.keep_models)
        if not pending:
            log.info("all %d jobs of study %s are in %s", len(jobs), spec.name, results)
            return StudyRun(results, len(jobs), len(jobs), 0, 0, time.perf_counter() - started)
        ran, refs_ran, stats = _run(spec, models, results, pending, refs, refs_done, address, progress)
    return StudyRun(results, len(jobs), len(jobs) - len(pending), ran, refs_ran, time.perf_counter() - started, stats)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _validate_methods(jobs: list[Job], models: StudyModels, include_paths=()) -> None:
    """Plan (headers only) the first job of every method configuration and subset size: a bad
    parameter or an arity mismatch fails before any work.  A data-driven method's data (each expert's
    task and split) is checked too."""
    from mergescale.fit.data import task_prompts
    from mergescale.merge_ops import get_method
    from mergescale.orchestrator.fit import fit_params
    from mergescale.orchestrator.merge import plan_merge

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
            raise MergescaleError(f"methods ({job.label}, {len(job.experts)} experts): {err}") from None


def _pool_size(spec: StudySpec) -> tuple[int | None, int]:
    import ray

    from mergescale.orchestrator.cluster import gpus_in_cluster

    r = spec.resources
    threads = r.eval_threads or 1
    if r.evaluators or (r.device != "cpu" and gpus_in_cluster()):
        return r.evaluators, threads
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, (cpus - r.merges_in_flight * r.merge_workers) // threads), threads


def _run(spec, models, results, pending, refs, refs_done, address, progress):
    from mergescale.orchestrator.cluster import connect
    from mergescale.orchestrator.eval_pool import EvaluatorPool
    from mergescale.orchestrator.evaluate import EvalSuite

    suite = EvalSuite(
        [t for _, t in models.experts.values()] + spec.eval.held_out,
        base=models.base, experts={t: p for p, t in models.experts.values()},
        include_paths=spec.eval.include_paths,
        limit=spec.eval.limit, backend=spec.eval.backend, divergences=spec.eval.divergences,
        reference_dir=results / store.REFERENCES, hashes=models.hashes,
    )  # fmt: skip
    held_in_tasks = {t for _, t in models.experts.values()}
    held_out = [t for t in suite.names if t not in held_in_tasks]
    connect(address)
    actors, threads = _pool_size(spec)
    r = spec.resources
    pool = EvaluatorPool(spec.eval.backend, actors=actors, threads=threads, device=r.device,
                         max_model_len=spec.eval.max_model_len)  # fmt: skip
    ctx = StudyContext(spec, models, results, suite, pool, held_out, device=r.device,
                       merge_slots=threading.Semaphore(r.merges_in_flight))  # fmt: skip
    todo_refs = [u for u in refs if u["key"] not in refs_done]
    with _bars(progress, len(pending), len(pending) + len(todo_refs)) as bars:
        ctx.on_merged = lambda job: bars.advance("merge")

        def references() -> None:
            outcome = {}
            if todo_refs:
                paths = [u["path"] for u in todo_refs]
                for u, got in zip(todo_refs, pool.map(suite.evaluate, paths, lambda m, _: bars.advance("eval")),
                                  strict=True):  # fmt: skip
                    outcome[u["path"]] = got
            old = [row for u in refs if u["key"] in refs_done for row in store.read_unit(results, store.REFERENCES,
                                                                                        u["key"])]  # fmt: skip
            old = [{**row, "model": row["model_path"]} for row in old]
            rows = suite.rows(outcome, models.hashes, old) if outcome else []
            for u in todo_refs:
                mine = [{**row, "model": u["model_id"]} for row in rows if row["model"] == u["path"]]
                store.write_unit(results, store.REFERENCES, u["key"], store.complete(
                    mine, study=spec.name, job_key=u["key"], job_kind=u["kind"], label=u["kind"],
                    experts=u["experts"], n_experts=len(u["experts"]), model_path=u["path"]))  # fmt: skip
            ctx.reference_rows = [r for r in old + [r for r in rows if r["kind"] == "score"] if r["kind"] == "score"]
            missing = [p for t, p in suite.experts.items() if t in suite.ref_files and not suite.ref_files[t].exists()]
            if missing:  # references evaluated earlier whose divergence files are gone
                pool.map(lambda lease, m: suite.write_references(lease, m), list(dict.fromkeys(missing)))

        ran = 0
        ex = ThreadPoolExecutor(pool.size + r.merges_in_flight + 1, thread_name_prefix="job")
        try:

            def references_or_stop() -> None:
                try:
                    references()
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


class _bars:
    """Two rich progress bars: merges and evaluations, with ETA (or nothing)."""

    def __init__(self, enabled: bool, merges: int, evals: int):
        self.enabled, self.totals, self.lock = enabled, {"merge": merges, "eval": evals}, threading.Lock()

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
            self.bar.__enter__()
            self.ids = {
                "merge": self.bar.add_task("merged", total=self.totals["merge"]),
                "eval": self.bar.add_task("evaluated", total=self.totals["eval"]),
            }
        return self

    def advance(self, which: str) -> None:
        if self.enabled:
            with self.lock:
                self.bar.update(self.ids[which], advance=1)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
