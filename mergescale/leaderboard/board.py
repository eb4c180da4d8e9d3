"""``mergescale leaderboard publish``: the leaderboard as one ``board`` dict (what ``site.write_site``
renders), read from files only — the queue, the results store and the runs' records; no Ray, no model.

One row per *entry* (a name with its weights): its state is its latest request's, its scores are its latest
finished evaluation's, its history is every finished evaluation.  A task's score is the normalized value of
the task's primary metric (held-in: against the task's expert; held-out: against the base); held-in and
held-out are the means over the tasks of each role (null when a task has no normalized value), as in a
study's report.  "New" = evaluated by the last finished run.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

from mergescale.eval.scores import HELD_IN, HELD_OUT
from mergescale.leaderboard import queue
from mergescale.leaderboard.queue import Board
from mergescale.orchestrator import results as store
from mergescale.specs import load_leaderboard_spec


def _last_run(board: Board) -> dict | None:
    runs = [json.loads(p.read_text()) for p in sorted(board.runs.glob("run-*.json"))]
    finished = [r for r in runs if r.get("finished_at")]
    if not finished:
        return None
    last = finished[-1]
    return {"id": last["id"], "started_at": last["started_at"], "finished_at": last["finished_at"],
            "evaluated": len(last["evaluated"]), "evaluated_ids": last["evaluated"]}  # fmt: skip


def _tasks(rows: list[dict]) -> list[dict]:
    roles = {r["task"]: r["role"] for r in rows if r["kind"] == "score"}
    return [{"name": t, "role": role} for role in (HELD_IN, HELD_OUT) for t in sorted(roles) if roles[t] == role]


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values and None not in values else None


def _scores(rows: list[dict], tasks: list[dict]) -> dict:
    """Per-task normalized primary scores of one evaluation's rows, and the held-in / held-out means."""
    by_task = {r["task"]: r["normalized"] for r in rows if r["kind"] == "score" and r["primary"]}
    scores = {t["name"]: by_task.get(t["name"]) for t in tasks}
    means = {role: _mean([scores[t["name"]] for t in tasks if t["role"] == role]) for role in (HELD_IN, HELD_OUT)}
    return {"scores": scores, **means}


def build_board(root: Path | str) -> dict:
    board = Board(Path(root)).check()
    spec = load_leaderboard_spec(board.spec)
    requests = board.requests()
    stored = store.done_keys(board.results, store.JOBS)
    units = {r["id"]: store.read_unit(board.results, store.JOBS, r["id"])
             for r in requests if r["state"] == queue.FINISHED and r["id"] in stored}  # fmt: skip
    references = [row for key in sorted(store.done_keys(board.results, store.REFERENCES))
                  for row in store.read_unit(board.results, store.REFERENCES, key)]  # fmt: skip
    tasks = _tasks(references + [row for rows in units.values() for row in rows])
    last = _last_run(board)
    new_ids = set(last.pop("evaluated_ids")) if last else set()
    entries: dict[str, list[dict]] = {}
    for r in requests:
        entries.setdefault(r["entry"], []).append(r)
    models = []
    for entry, mine in entries.items():
        mine.sort(key=lambda r: r["evaluation"])
        latest = mine[-1]
        finished = [r for r in mine if r["id"] in units]
        history = [{"evaluation": r["evaluation"], "run": r["run"], "evaluated_at": r["evaluated_at"],
                    **_scores(units[r["id"]], tasks)} for r in finished]  # fmt: skip
        current = history[-1] if history else {"scores": {t["name"]: None for t in tasks}, HELD_IN: None,
                                               HELD_OUT: None}  # fmt: skip
        models.append({
            "id": entry, "name": latest["name"], "source": latest["source"], "weights_sha256": latest["weights_sha256"],
            "base_model": latest["base_model"], "tags": latest["tags"], "merge": latest["merge"],
            "provenance": latest["provenance"], "n_parameters": latest["n_parameters"],
            "submitted_at": mine[0]["submitted_at"], "evaluated_at": finished[-1]["evaluated_at"] if finished else None,
            "state": latest["state"], "reason": latest["reason"],
            "new": bool(finished) and finished[-1]["id"] in new_ids,
            "scores": current["scores"], "held_in": current[HELD_IN], "held_out": current[HELD_OUT],
            "history": history,
        })  # fmt: skip
    stamps = [r["evaluated_at"] or r["submitted_at"] for r in requests] + ([last["finished_at"]] if last else [])
    generated = max(stamps, default=queue.now())
    return {"name": spec.name, "generated_at": generated, "last_run": last, "base_model": spec.base, "tasks": tasks,
            "models": models}  # fmt: skip


def publish(root: Path | str, out: Path | str) -> Path:
    """Write the leaderboard at ``root`` as a static site into ``out`` (one publish into ``out`` at a time:
    an flock on ``.<out>.lock`` beside it)."""
    from mergescale.leaderboard.site import write_site

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return write_site(build_board(root), out)
