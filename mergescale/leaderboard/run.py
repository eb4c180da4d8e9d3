"""``mergescale leaderboard run``: evaluate the queue's PENDING requests (and RUNNING ones whose lease died)
on the leaderboard's suite, through the evaluator pool on the Ray cluster this process joins.

A run is one *tick* of the schedule: it takes what is waiting, evaluates it, and records itself in
``runs/run-NNNN.json`` (which requests it evaluated: the site's "new since the last run").  A tick with
nothing waiting touches neither Ray nor the models (seconds).  The suite is a study's: held-in tasks are
the reference experts' tasks, normalized against each task's expert; held-out tasks are normalized against
the base (``docs/ALGORITHMS.md#evaluation-quantities``); the reference models are evaluated once and kept
in the results store's ``references/``.  Each evaluated request is one unit of the store,
``results/jobs/<request id>.parquet`` (``job_kind`` = ``submission``), written before the request is marked
FINISHED (``queue.py`` says why that makes a killed run safe to rerun).

A request whose model cannot be evaluated (its weights changed since it was submitted, an architecture no
engine loads, an engine error) is marked FAILED with a one-line reason and the run goes on; the traceback is
in the run's log.  An error of the run itself (the suite, the references, Ray) puts what it took back to
PENDING and fails the run, so the schedule's job shows FAILED with the reason in its log.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mergescale import console, files, provenance
from mergescale.errors import MergescaleError, ModelError
from mergescale.leaderboard import queue
from mergescale.leaderboard.queue import Board
from mergescale.orchestrator import results as store
from mergescale.specs import LeaderboardSpec, load_leaderboard_spec

log = logging.getLogger(__name__)


@dataclass
class LeaderboardRun:
    run: str
    evaluated: list[str] = field(default_factory=list)  # request ids FINISHED by this run
    failed: list[str] = field(default_factory=list)  # request ids FAILED by this run
    recovered: list[str] = field(default_factory=list)  # found evaluated (a killed run's) and marked FINISHED
    seconds: float = 0.0


def _run_id(board: Board) -> tuple[str, str]:
    """This run's id and start time: the next number, or the last run's when that run never finished (it was
    killed: this run completes it, so its evaluations stay one run's "new")."""
    runs = sorted(board.runs.glob("run-*.json"))
    if runs:
        last = json.loads(runs[-1].read_text())
        if last.get("finished_at") is None:
            return last["id"], last["started_at"]
    return f"run-{len(runs) + 1:04d}", queue.now()


def _write_run(board: Board, record: dict) -> None:
    files.write_text(board.runs / f"{record['id']}.json", json.dumps(record, indent=1, sort_keys=True) + "\n")


def run_leaderboard(root: Path | str, *, address: str | None = None, progress: bool = True,
                    lease_seconds: float | None = None) -> LeaderboardRun:  # fmt: skip
    """One tick: evaluate every waiting request of the leaderboard at ``root``."""
    started = time.perf_counter()
    board = Board(Path(root)).check()
    spec = load_leaderboard_spec(board.spec)
    lease = float(lease_seconds or spec.lease_seconds)
    with store.locked(board.results):  # one run at a time per leaderboard
        run_id, started_at = _run_id(board)
        record = {"id": run_id, "started_at": started_at, "finished_at": None, "evaluated": [], "failed": [],
                  "recovered": []}  # fmt: skip
        previous = board.runs / f"{run_id}.json"
        if previous.is_file():  # completing a killed run: keep what it recorded
            record = {**record, **{k: v for k, v in json.loads(previous.read_text()).items() if k != "finished_at"}}
        _write_run(board, record)
        taken, recovered = queue.take(board, run_id, lease, store.done_keys(board.results, store.JOBS))
        out = LeaderboardRun(run_id, recovered=[r["id"] for r in recovered])
        if taken:
            log.info("leaderboard %s, %s: %d requests to evaluate", spec.name, run_id, len(taken))
            _evaluate(board, spec, taken, out, address, progress, lease)
        else:
            log.info("leaderboard %s, %s: nothing waiting", spec.name, run_id)
        # what this run id ended, this process or a killed one it completes: the site's "new since the last run"
        mine = [r for r in board.requests() if r["run"] == run_id]
        record["evaluated"] = sorted(r["id"] for r in mine if r["state"] == queue.FINISHED)
        record["failed"] = sorted(r["id"] for r in mine if r["state"] == queue.FAILED)
        record["recovered"] = sorted(set(record["recovered"]) | set(out.recovered))
        record["finished_at"] = queue.now()
        _write_run(board, record)
    out.seconds = time.perf_counter() - started
    return out


class _Leases:
    """Renew this process's leases on the requests in flight every third of the lease, in a thread."""

    def __init__(self, board: Board, ids: list[str], lease: float):
        self.board, self.ids, self.lease = board, set(ids), lease
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._loop, name="leases", daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.lease / 3):
            with self.lock:
                ids = sorted(self.ids)
            queue.renew(self.board, ids, self.lease)

    def drop(self, request_id: str) -> None:
        with self.lock:
            self.ids.discard(request_id)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _evaluate(board, spec: LeaderboardSpec, taken: list[dict], out: LeaderboardRun, address, progress, lease) -> None:
    from mergescale.orchestrator.cluster import connect
    from mergescale.orchestrator.hashes import weight_hashes
    from mergescale.orchestrator.jobs import reference_units
    from mergescale.orchestrator.study import StudyContext, evaluate_references, make_pool, make_suite
    from mergescale.orchestrator.study_models import resolve_models

    # a leaderboard reports scores, not divergences to the experts: no reference continuations to write
    spec = spec.model_copy(update={"eval": spec.eval.model_copy(update={"divergences": False})})
    pending = [r["id"] for r in taken]
    pool = None
    with _Leases(board, pending, lease) as leases:
        try:
            models = resolve_models(spec, board.root, progress)
            refs_paths = [models.base, *(p for p, _ in models.experts.values())]
            models.hashes = weight_hashes(refs_paths)
            suite, held_out = make_suite(spec, models, board.results)
            connect(address)
            pool = make_pool(spec)
            ctx = StudyContext(spec, models, board.results, suite, pool, held_out)
            evaluate_references(ctx, reference_units(spec, models), store.done_keys(board.results, store.REFERENCES))
            bar = console.progress(enabled=progress)
            with bar, ThreadPoolExecutor(pool.size, thread_name_prefix="request") as ex:
                task = bar.add_task("evaluated", total=len(taken))
                futures = [ex.submit(_one, board, spec, ctx, request) for request in taken]
                for request, future in zip(taken, futures, strict=True):
                    state, reason = future.result()
                    queue.end(board, request["id"], state, reason)
                    leases.drop(request["id"])
                    pending.remove(request["id"])
                    (out.evaluated if state == queue.FINISHED else out.failed).append(request["id"])
                    bar.update(task, advance=1)
        except BaseException:
            queue.release(board, pending)  # not the models' fault: they wait for the next run
            raise
        finally:
            if pool is not None:
                pool.shutdown()


def _one(board: Board, spec: LeaderboardSpec, ctx, request: dict) -> tuple[str, str | None]:
    """Evaluate one request and store its rows; (FINISHED, None) or (FAILED, the reason)."""
    from mergescale.checkpoints import weights_sha256

    path = request["path"]
    try:
        if not Path(path, "config.json").is_file():
            raise ModelError(f"{path}: the model directory is gone (no config.json); resubmit it")
        if weights_sha256(path) != request["weights_sha256"]:
            raise ModelError(f"{path}: its weights changed since it was submitted; submit it again (a new entry)")
        outcome, env = ctx.pool.run(lambda lease, m: (ctx.suite.evaluate(lease, m), lease.info()), path)
    except MergescaleError as err:
        log.info("%s (%s): FAILED: %s", request["id"], request["name"], err)
        return queue.FAILED, str(err)
    except Exception as err:  # an engine error on this model: the model fails, the run goes on
        log.warning("%s (%s): evaluation error", request["id"], request["name"], exc_info=True)
        first = str(err).splitlines()[0] if str(err) else ""
        return queue.FAILED, f"evaluation error: {type(err).__name__}: {first} (the traceback is in the run's log)"
    rows = ctx.suite.rows({path: outcome}, {path: request["weights_sha256"]}, ctx.reference_rows)
    about = request["provenance"]
    rows = store.complete(
        [{**r, "model": request["name"]} for r in rows],
        study=spec.name, job_key=request["id"], job_kind=store.SUBMISSION, method=about.get("method"),
        label="merge" if request["merge"] else "model", parameters=json.dumps(about.get("parameters") or {},
        sort_keys=True), experts=about.get("parents") or [], n_experts=len(about.get("parents") or []),
        model_path=path, n_parameters=request["n_parameters"], zoo_key=ctx.models.zoo_key,
        zoo_host=ctx.models.zoo_host, **{c: env.get(c) for c in provenance.COLUMNS},
    )  # fmt: skip
    store.write_unit(board.results, store.JOBS, request["id"], rows)
    return queue.FINISHED, None
