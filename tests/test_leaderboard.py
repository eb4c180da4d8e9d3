"""The leaderboard's queue (`mergescale leaderboard submit`), its leases, and `leaderboard run` killed with
SIGKILL and rerun.  The two nightly ticks under `ray job submit` are in test_ray_jobs.py, the site in a real
browser in test_leaderboard_site.py."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergescale.checkpoints import weights_sha256
from mergescale.leaderboard import queue
from mergescale.leaderboard.queue import Board
from mergescale.orchestrator import results as store

MERGESCALE = Path(sys.executable).parent / "mergescale"
ROOT = Path(__file__).parents[1]


def _board(tmp_path: Path) -> Path:
    board = tmp_path / "board"
    board.mkdir()
    shutil.copy(ROOT / "examples" / "leaderboard" / "leaderboard.yaml", board / "leaderboard.yaml")
    return board


def _model(path: Path, seed: int = 0, card: str | None = None, files: dict | None = None) -> Path:
    """A small Hugging Face model directory: a config and real safetensors weights."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    g = torch.Generator().manual_seed(seed)
    save_file({"embed.weight": torch.randn(8, 4, generator=g), "head.weight": torch.randn(3, 4, generator=g)},
              str(path / "model.safetensors"))  # fmt: skip
    if card is not None:
        (path / "README.md").write_text(card)
    for name, text in (files or {}).items():
        (path / name).write_text(text)
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MERGESCALE), "leaderboard", *map(str, args)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_submit_records_the_model_its_hash_and_size_and_a_second_submit_is_a_no_op(tmp_path):
    board = _board(tmp_path)
    model = _model(tmp_path / "m1")
    res = _cli("submit", board, model, "--tag", "nightly")
    assert res.returncode == 0, res.stderr
    (request,) = Board(board).requests()
    assert request["state"] == queue.PENDING and request["evaluation"] == 1
    assert request["weights_sha256"] == weights_sha256(model)
    assert request["n_parameters"] == 8 * 4 + 3 * 4
    assert request["name"] == "m1" and request["tags"] == ["nightly"] and request["merge"] is False
    assert res.stdout.startswith(request["id"])

    again = _cli("submit", board, model)
    assert again.returncode == 0 and "already queued (PENDING" in again.stdout
    assert _cli("submit", board, model, "--reevaluate").returncode == 0  # still PENDING: nothing new
    assert len(Board(board).requests()) == 1

    _model(model, seed=1)  # new weights under the same name: a new entry
    assert _cli("submit", board, model).returncode == 0
    first, second = Board(board).requests()
    assert first["name"] == second["name"] == "m1" and first["entry"] != second["entry"]


def test_a_finished_model_is_reevaluated_only_on_request_as_its_next_evaluation(tmp_path):
    b = Board(_board(tmp_path))
    model = _model(tmp_path / "m")
    request, new = queue.submit(b, str(model), model)
    assert new
    queue.end(b, request["id"], queue.FINISHED)
    assert queue.submit(b, str(model), model)[1] is False
    again, new = queue.submit(b, str(model), model, reevaluate=True)
    assert new and again["id"] == f"{request['entry']}-2" and again["evaluation"] == 2


def test_merges_are_tagged_from_their_cards(tmp_path):
    b = Board(_board(tmp_path))
    mergekit_card = "---\nbase_model:\n- org/base\ntags:\n- mergekit\n- merge\n---\n# merged\n"
    mergekit_config = ("merge_method: ties\nbase_model: /models/base\nparameters: {density: 0.5}\nmodels:\n"
                       "  - model: /models/a\n  - model: /models/b\n")  # fmt: skip
    mk, _ = queue.submit(b, "mk", _model(tmp_path / "mk", card=mergekit_card,
                                        files={"mergekit_config.yml": mergekit_config}))  # fmt: skip
    assert mk["merge"] and mk["tags"] == ["mergekit", "merge"]
    assert mk["provenance"] == {"card": "mergekit", "method": "ties", "parents": ["/models/a", "/models/b"],
                                "parameters": {"density": 0.5}}  # fmt: skip
    assert mk["base_model"] == "/models/base"
    spec = {"method": "task_arithmetic", "base": "/b", "experts": [{"model": "/x"}, {"model": "/y"}],
            "parameters": {"lambda": 0.3}}  # fmt: skip
    ours = ("---\ntags: [merge, mergescale]\n---\n# Merged model\n\n## Configuration\n\n"
            f"```json\n{json.dumps(spec)}\n```\n")
    ms, _ = queue.submit(b, "ms", _model(tmp_path / "ms", seed=2, card=ours))
    assert ms["merge"] and ms["provenance"]["card"] == "mergescale" and ms["provenance"]["parents"] == ["/x", "/y"]
    assert ms["base_model"] == "/b" and ms["provenance"]["parameters"] == {"lambda": 0.3}
    plain, _ = queue.submit(b, "plain", _model(tmp_path / "plain", seed=3, card="---\nbase_model: org/base\n---\n"))
    assert not plain["merge"] and plain["base_model"] == "org/base" and plain["provenance"]["card"] is None


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: t / "missing", "no such model directory"),
        (lambda t: (t / "empty").mkdir() or t / "empty", "not a Hugging Face model directory (no config.json)"),
        (lambda t: (_model(t / "bin"), (t / "bin" / "model.safetensors").unlink())[0], "no *.safetensors weights"),
        (lambda t: "no-such-org/no-such-model", "nor a reachable hub model"),  # a hub id not in the local cache
    ],
)
def test_a_bad_submission_is_one_line_and_queues_nothing(tmp_path, make, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is not reachable from here anyway: fail at once
    board = _board(tmp_path)
    res = _cli("submit", board, make(tmp_path))
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not list((board / "queue").glob("*.json"))


def test_a_directory_without_a_suite_or_with_a_bad_one_is_refused_naming_the_file(tmp_path):
    model = _model(tmp_path / "m")
    res = _cli("submit", tmp_path / "nowhere", model)
    assert res.returncode == 2 and "not a leaderboard directory (no leaderboard.yaml)" in res.stderr
    board = _board(tmp_path)
    (board / "leaderboard.yaml").write_text((board / "leaderboard.yaml").read_text() + "evaluators: 3\n")
    res = _cli("run", board)
    assert res.returncode == 2 and "leaderboard.yaml" in res.stderr and "evaluators" in res.stderr
    assert not (board / "runs").exists()


def _running(b: Board, tmp_path: Path, name: str, owner: str, expires_in: float) -> dict:
    request, _ = queue.submit(b, name, _model(tmp_path / name, seed=hash(name) % 1000))
    request.update(state=queue.RUNNING, lease={"owner": owner, "expires_at": time.time() + expires_in})
    b.write(request)
    return request


def test_take_claims_pending_requests_and_running_ones_whose_lease_died(tmp_path):
    b = Board(_board(tmp_path))
    host = socket.gethostname()
    sleeper = subprocess.Popen(["sleep", "60"])  # a live runner on this host
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        pending, _ = queue.submit(b, "p", _model(tmp_path / "p", seed=9))
        live = _running(b, tmp_path, "live", f"{host}:{sleeper.pid}", 600)
        killed = _running(b, tmp_path, "killed", f"{host}:{dead.pid}", 600)
        remote = _running(b, tmp_path, "remote", "another-host:1", 600)
        expired = _running(b, tmp_path, "expired", "another-host:2", -1)
        stored = _running(b, tmp_path, "stored", f"{host}:{dead.pid}", 600)
        store.write_unit(b.results, store.JOBS, stored["id"], [])  # its runner was killed after writing its rows
        taken, recovered = queue.take(b, "run-0001", 60, store.done_keys(b.results, store.JOBS))
        assert queue.take(b, "run-0002", 60, set()) == ([], [])  # this process holds them now; the sleeper lives
    finally:
        sleeper.kill()
    assert {r["id"] for r in taken} == {pending["id"], killed["id"], expired["id"]}
    assert [r["id"] for r in recovered] == [stored["id"]]
    states = {r["id"]: r for r in b.requests()}
    assert states[stored["id"]]["state"] == queue.FINISHED
    assert states[live["id"]]["lease"] == live["lease"] and states[remote["id"]]["lease"] == remote["lease"]
    for r in taken:
        mine = states[r["id"]]
        assert mine["state"] == queue.RUNNING and mine["lease"]["owner"] == f"{host}:{os.getpid()}"
        assert mine["run"] == "run-0001" and mine["attempts"] == 1

    queue.release(b, [r["id"] for r in taken])
    assert {r["id"] for r in b.requests() if r["state"] == queue.PENDING} == {r["id"] for r in taken}


@pytest.mark.zoo
@pytest.mark.ray
@pytest.mark.engine
def test_a_run_killed_at_any_point_and_rerun_evaluates_no_model_twice_and_loses_none(tiny_zoo, tmp_path):
    from test_study import _kill_tree

    board = _board(tmp_path)
    changed = tmp_path / "changed"
    shutil.copytree(tiny_zoo.experts["digit"], changed)
    for model in (tiny_zoo.experts["upper"], tiny_zoo.experts["rot13"], tiny_zoo.experts["shift1"], changed):
        assert _cli("submit", board, model).returncode == 0
    shard = sorted(changed.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\0")  # its weights change after it was submitted
    b = Board(board)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the command starts its own Ray

    first = subprocess.Popen([str(MERGESCALE), "leaderboard", "run", str(board), "--quiet"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not store.done_keys(b.results, store.JOBS):  # SIGKILL the moment the first rows are stored
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no model evaluated in 5 minutes"
            time.sleep(0.02)
    finally:
        _kill_tree(first.pid)
    done = {p.name: p.stat().st_mtime_ns for p in (b.results / store.JOBS).glob("*.parquet")}
    assert 1 <= len(done) < 3
    assert any(r["state"] == queue.RUNNING for r in b.requests())  # the kill left leases behind

    second = _cli("run", board, "--quiet")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "run-0001:" in second.stderr  # it completes the killed run
    states = {r["name"]: r for r in b.requests()}
    assert {n: r["state"] for n, r in states.items()} == {"upper": queue.FINISHED, "rot13": queue.FINISHED,
                                                          "shift1": queue.FINISHED, "changed": queue.FAILED}
    assert "weights changed since it was submitted" in states["changed"]["reason"]
    after = {p.name: p.stat().st_mtime_ns for p in (b.results / store.JOBS).glob("*.parquet")}
    assert len(after) == 3 and all(after[n] == t for n, t in done.items())  # none evaluated twice, none lost
    rows = store.read_results(b.results).to_pylist()
    keys = [(r["job_key"], r["task"], r["kind"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys))
    own = [r for r in rows if r["model"] == "upper" and r["task"] == "zoo_upper" and r["primary"]]
    assert len(own) == 1 and own[0]["normalized"] == pytest.approx(1.0)  # the expert is its own task's reference
    record = json.loads((b.runs / "run-0001.json").read_text())
    evaluated = sorted(r["id"] for r in states.values() if r["name"] != "changed")
    assert record["finished_at"] and record["evaluated"] == evaluated

    third = _cli("run", board, "--quiet")
    assert third.returncode == 0 and "run-0002: 0 evaluated, 0 failed" in third.stderr


def test_a_leaderboard_is_evaluated_and_keyed_as_a_merge_study_is():
    """The study functions a leaderboard shares (models, suite, reference units) read a study's kind and
    transfer versions: a leaderboard is a merge study's evaluation, so its reference keys are a merge study's."""
    from mergescale.orchestrator.jobs import reference_units
    from mergescale.orchestrator.study_models import StudyModels
    from mergescale.specs import LeaderboardSpec, StudySpec

    raw = {"name": "lb", "base": "/m/base", "experts": {"upper": {"model": "/m/upper", "task": "zoo_upper"}},
           "eval": {"held_out": ["zoo_copy"], "limit": 20}}  # fmt: skip
    models = StudyModels("/m/base", {"upper": ("/m/upper", "zoo_upper")}, {"/m/base": "b" * 64, "/m/upper": "u" * 64})
    board = LeaderboardSpec.model_validate(raw)
    study = StudySpec.model_validate({**raw, "subsets": {"sizes": [1]}, "methods": [{"method": "linear"}]})
    assert (board.kind, board.transfer) == ("merge", None)
    assert [u["key"] for u in reference_units(board, models)] == [u["key"] for u in reference_units(study, models)]
