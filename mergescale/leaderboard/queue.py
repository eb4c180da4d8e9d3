"""A leaderboard's request queue: one JSON file per request in ``LEADERBOARD/queue/``, a directory every
node sees.

A *request* asks for one evaluation of one *entry*; an entry is a model name with the sha256 of its
weights (``entry`` = 12 hex digits of the hash of both), so a model whose weights changed under the same
name is a new entry.  A request's id is ``<entry>-<evaluation>``: evaluation 1 is the first, an operator's
``submit --reevaluate`` adds evaluation 2, and so on (the score history).

States::

    PENDING --take--> RUNNING --finish--> FINISHED
                         |  \\--fail----> FAILED (reason: one line)
                         \\-- lease expired, or its runner is gone --> taken again

Every change of a request is one atomic rename of its file (``files.write_text``) made while holding the
queue's lock (``queue/.lock``, an flock held for milliseconds), so two runners never take the same request
and a reader never sees half a request.  A runner holds a *lease* on what it took — ``owner``
(host:pid) and ``expires_at`` — and renews it while it works; a request RUNNING under a lease that
expired, or whose owner process on this host is gone (killed), is taken again.  The rows of a finished
evaluation are a unit of the leaderboard's results store (``results/jobs/<request id>.parquet``) written
*before* the request is marked FINISHED: a runner killed between the two finds the unit and only marks
the request, so no model is evaluated twice and none is lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from mergescale import files
from mergescale.errors import ModelError, SpecError

QUEUE, RESULTS, RUNS, SPEC = "queue", "results", "runs", "leaderboard.yaml"
PENDING, RUNNING, FINISHED, FAILED = "PENDING", "RUNNING", "FINISHED", "FAILED"
STATES = (PENDING, RUNNING, FINISHED, FAILED)


def now() -> str:
    """The time as the queue writes it: ISO-8601 UTC to the second."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def entry_id(name: str, weights_sha256: str) -> str:
    return hashlib.sha256(json.dumps([name, weights_sha256]).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Board:
    """The paths of one leaderboard directory."""

    root: Path

    @property
    def spec(self) -> Path:
        return self.root / SPEC

    @property
    def queue(self) -> Path:
        return self.root / QUEUE

    @property
    def results(self) -> Path:
        return self.root / RESULTS

    @property
    def runs(self) -> Path:
        return self.root / RUNS

    def request_file(self, request_id: str) -> Path:
        return self.queue / f"{request_id}.json"

    def check(self) -> Board:
        if not self.spec.is_file():
            raise SpecError(f"{self.root}: not a leaderboard directory (no {SPEC}); create it with the suite "
                            "(name:, base:, experts:, eval:), e.g. from examples/leaderboard/leaderboard.yaml")
        return self

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The queue's lock: every read-modify-write of requests happens under it (milliseconds)."""
        self.queue.mkdir(parents=True, exist_ok=True)
        with open(self.queue / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def requests(self) -> list[dict]:
        """Every request, in submission order (then id)."""
        out = []
        for path in sorted(self.queue.glob("*.json")) if self.queue.is_dir() else []:
            if not path.name.startswith("."):
                out.append(json.loads(path.read_text()))
        return sorted(out, key=lambda r: (r["submitted_at"], r["id"]))

    def write(self, request: dict) -> None:
        files.write_text(self.request_file(request["id"]), json.dumps(request, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------- what a model says about itself
def _front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    if not match:
        return {}
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in (value if isinstance(value, list) else [value])]


def _parents(models, slices) -> list[str]:
    """The models a merge was made of: its whole models, and each slice's sources (a stack's), once each."""
    parents = [m.get("model") if isinstance(m, dict) else m for m in models or []]
    for piece in slices or []:
        parents += [s.get("model") for s in (piece or {}).get("sources") or [] if isinstance(s, dict)]
    return list(dict.fromkeys(str(p) for p in parents if p))


def provenance(model: Path) -> dict:
    """What a model's card says about how it was made: mergescale's card (its ``## Configuration`` JSON),
    mergekit's (``mergekit_config.yml`` beside the weights, the card's front matter), or nothing."""
    card_path = model / "README.md"
    card = card_path.read_text(errors="replace") if card_path.is_file() else ""
    meta = _front_matter(card)
    tags = _as_list(meta.get("tags"))
    out = {"card": None, "method": None, "parents": [], "parameters": {}, "base_model": None, "tags": tags}
    config = re.search(r"## Configuration\s*```json\n(.*?)\n```", card, re.S)
    if "mergescale" in tags and config:
        try:
            spec = json.loads(config.group(1))
        except json.JSONDecodeError:
            spec = {}
        out.update(card="mergescale", method=spec.get("method"), base_model=spec.get("base"),
                   parents=_parents(spec.get("experts"), spec.get("slices")),
                   parameters=spec.get("parameters") or {})  # fmt: skip
        return out
    mk = model / "mergekit_config.yml"
    if mk.is_file() or "mergekit" in tags:
        try:
            config = yaml.safe_load(mk.read_text()) if mk.is_file() else {}
        except yaml.YAMLError:
            config = {}
        config = config if isinstance(config, dict) else {}
        base = config.get("base_model") or next(iter(_as_list(meta.get("base_model"))), None)
        out.update(card="mergekit", method=config.get("merge_method"), parameters=config.get("parameters") or {},
                   parents=_parents(config.get("models"), config.get("slices")), base_model=base)  # fmt: skip
        return out
    out["base_model"] = next(iter(_as_list(meta.get("base_model"))), None)
    return out


def _n_parameters(model: Path) -> int:
    from mergescale.checkpoints import ModelDir

    weights = ModelDir(model)
    total = 0
    for name in weights.names:
        count = 1
        for dim in weights.shape(name):
            count *= dim
        total += count
    return total


# ---------------------------------------------------------------- submit
def submit(board: Board, model: str, path: Path, *, name: str | None = None, tags: list[str] = (),
           base_model: str | None = None, reevaluate: bool = False) -> tuple[dict, bool]:  # fmt: skip
    """Queue ``model`` (its directory ``path``; ``model`` as the user gave it: a path or a hub id).  Returns
    (the request, whether it is new).  Submitting an entry again is a no-op unless ``reevaluate`` (then a
    new evaluation is queued once the last one ended)."""
    from mergescale.checkpoints import weights_sha256

    board.check()
    if not (path / "config.json").is_file():
        raise ModelError(f"{model}: not a Hugging Face model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"{model}: no *.safetensors weights; save the model with safe_serialization")
    name = name or (model if not Path(model).exists() else Path(model).resolve().name)
    if not name.strip() or "\n" in name:
        raise SpecError(f"--name {name!r}: give a one-line, non-empty name")
    digest = weights_sha256(path)
    entry = entry_id(name, digest)
    about = provenance(path)
    user_tags = [t.strip() for t in tags if t.strip()]
    all_tags = list(dict.fromkeys([*about.pop("tags"), *user_tags]))
    is_merge = about["card"] is not None or "merge" in all_tags
    if is_merge and "merge" not in all_tags:
        all_tags.append("merge")
    with board.lock():
        mine = [r for r in board.requests() if r["entry"] == entry]
        if mine:
            last = max(mine, key=lambda r: r["evaluation"])
            if not reevaluate or last["state"] in (PENDING, RUNNING):
                return last, False
            evaluation = last["evaluation"] + 1
        else:
            evaluation = 1
        request = {
            "id": f"{entry}-{evaluation}", "entry": entry, "evaluation": evaluation, "name": name,
            "source": model, "path": str(path.resolve()), "weights_sha256": digest,
            "base_model": base_model or about.pop("base_model"), "tags": all_tags, "merge": is_merge,
            "provenance": {k: v for k, v in about.items() if k != "base_model"},
            "n_parameters": _n_parameters(path), "submitted_at": now(), "state": PENDING, "lease": None,
            "attempts": 0, "reason": None, "started_at": None, "evaluated_at": None, "run": None,
        }  # fmt: skip
        board.write(request)
    return request, True


# ---------------------------------------------------------------- run: take, renew, finish, fail
def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _lease_dead(lease: dict | None, at: float) -> bool:
    """A lease nobody holds any more: expired, or held by a process of this host that is gone."""
    if not lease or lease["expires_at"] <= at:
        return True
    host, _, pid = lease["owner"].rpartition(":")
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return int(pid) != os.getpid() and _is_zombie(int(pid))


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def take(board: Board, run: str, lease_seconds: float, done: set[str]) -> tuple[list[dict], list[dict]]:
    """Take every PENDING request, and every RUNNING one whose lease is dead, under a lease of ``lease_seconds``
    for this process.  A taken request whose rows are already in the store (``done``: its runner was
    killed after writing them) is marked FINISHED instead.  Returns (taken, finished on the way)."""
    taken, recovered = [], []
    with board.lock():
        at = time.time()
        for request in board.requests():
            if request["state"] == PENDING or (request["state"] == RUNNING and _lease_dead(request["lease"], at)):
                if request["id"] in done:
                    request.update(state=FINISHED, lease=None, evaluated_at=request["evaluated_at"] or now())
                    board.write(request)
                    recovered.append(request)
                    continue
                request.update(state=RUNNING, run=run, started_at=now(), attempts=request["attempts"] + 1,
                               lease={"owner": owner(), "expires_at": at + lease_seconds})  # fmt: skip
                board.write(request)
                taken.append(request)
    return taken, recovered


def renew(board: Board, ids: list[str], lease_seconds: float) -> None:
    """Extend this process's leases on ``ids`` (those still RUNNING under it)."""
    with board.lock():
        for request_id in ids:
            path = board.request_file(request_id)
            request = json.loads(path.read_text())
            if request["state"] == RUNNING and request["lease"] and request["lease"]["owner"] == owner():
                request["lease"]["expires_at"] = time.time() + lease_seconds
                board.write(request)


def end(board: Board, request_id: str, state: str, reason: str | None = None) -> dict:
    """Mark a request FINISHED or FAILED (with a one-line ``reason``)."""
    with board.lock():
        request = json.loads(board.request_file(request_id).read_text())
        request.update(state=state, lease=None, evaluated_at=now(),
                       reason=" ".join(reason.split()) if reason else None)  # fmt: skip
        board.write(request)
    return request


def release(board: Board, ids: list[str]) -> None:
    """Put this process's RUNNING requests ``ids`` back to PENDING (the run failed, not the models)."""
    with board.lock():
        for request_id in ids:
            request = json.loads(board.request_file(request_id).read_text())
            if request["state"] == RUNNING and request["lease"] and request["lease"]["owner"] == owner():
                request.update(state=PENDING, lease=None)
                board.write(request)
