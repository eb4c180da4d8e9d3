"""Coefficient search (`mergescale search`) on the tiny zoo with real Ray Tune, real vLLM and real lm-eval:
examples/search_ci.yaml end to end, a driver killed with SIGKILL and resumed on a running cluster, a grid
search against the same grid run as a study, what the evaluators were asked before the end, bad specs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mergescale.orchestrator import results as store

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "examples" / "search_ci.yaml"
MERGESCALE = Path(sys.executable).parent / "mergescale"

pytestmark = [pytest.mark.zoo]


def _search(spec: Path, out: Path, *extra: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(MERGESCALE), "search", str(spec), "--out", str(out), "--quiet", *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip


def _trials(out: Path) -> list[dict]:
    return pq.read_table(out / "trials.parquet").to_pylist()


def _units(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "trials" / store.JOBS).glob("*.parquet")}


@pytest.fixture(scope="module")
def ci_search(tiny_zoo, tmp_path_factory):
    """examples/search_ci.yaml, uninterrupted, through the CLI."""
    out = tmp_path_factory.mktemp("search") / "ci"
    res = _search(CI, out)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


@pytest.mark.ray
@pytest.mark.engine
def test_the_ci_search_writes_the_best_merge_its_card_the_trials_and_the_plots(ci_search):
    out, res = ci_search
    assert res.stdout.strip() == str(out / "best")
    assert "search search_ci: 8 trials, 8 finished now" in res.stderr
    best = out / "best"
    assert (best / "config.json").is_file() and list(best.glob("*.safetensors"))
    card = (best / "README.md").read_text()
    assert "## Coefficient search" in card and "searcher **cmaes** (seed 0), 8 trials" in card
    trials = _trials(out)
    assert [t["trial"] for t in trials] == list(range(8)) and {t["state"] for t in trials} == {"complete"}
    assert all(0.1 <= t["param:density"] <= 0.9 and 0.5 <= t["param:lambda"] <= 2.0 for t in trials)
    top = max(trials, key=lambda t: (t["objective"], -t["trial"]))
    assert f"| | validation (trial {top['trial']}) | test |" in card
    assert json.loads(top["parameters"]) == {"density": top["param:density"], "lambda": top["param:lambda"]}
    # the objective is the mean normalized held-in score of the trial's rows in the trials store
    rows = store.read_unit(out / "trials", store.JOBS, top["job_key"])
    anp = next(r for r in rows if r["kind"] == "summary" and r["role"] == "held_in" and r["primary"])
    assert anp["normalized"] == pytest.approx(top["objective"]) and anp["label"] == f"ties trial {top['trial']}"
    # the best merge scored once on the test split, in the test store, with the test split's references
    test_jobs = list((out / "test" / store.JOBS).glob("*.parquet"))
    assert len(test_jobs) == 1 and test_jobs[0].stem in card
    assert (out / "plots" / "objective.png").stat().st_size > 10_000
    assert list((out / "tune").glob("run-000/trial_*"))  # Tune's own logs, in the results directory
    # the trials store is a study store, and its report says which split it scored
    report = subprocess.run([str(MERGESCALE), "study", "report", str(out / "trials"), "--out", str(out / "report")],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert report.returncode == 0, report.stderr[-2000:]
    board = (out / "report" / "leaderboard.md").read_text()
    assert "validation split (a coefficient search's trials)" in board and f"ties trial {top['trial']}" in board


@pytest.mark.ray
@pytest.mark.engine
def test_the_trials_never_read_a_test_document(ci_search):
    """The evaluators' request audit, taken before the best is scored on the test split, holds every
    validation prompt of the merged experts' tasks and the held-out task, and no prompt of a test document."""
    from mergescale.eval.evaluator import prompt_digest
    from mergescale.eval.harness import generation_prompts, leaf_tasks, load_tasks, use_split

    out, _ = ci_search
    seen = set(json.loads((out / "audit.json").read_text())["trials"])
    tasks = ["zoo_upper", "zoo_shift1", "zoo_copy"]
    prompts = {}
    for split in ("validation", None):
        loaded = leaf_tasks(use_split(load_tasks(tasks), split))
        prompts[split] = {prompt_digest(p) for t in loaded.values() for p in generation_prompts(t, 16)[0]}
    test_only = prompts[None] - prompts["validation"]
    assert len(test_only) > 30  # the splits' documents differ
    assert prompts["validation"] <= seen
    assert not test_only & seen


@pytest.mark.ray
@pytest.mark.engine
def test_a_rerun_of_a_finished_search_runs_nothing_and_keeps_the_best(ci_search):
    out, first = ci_search
    shards = {p.name: p.stat().st_mtime_ns for p in (out / "best").glob("*.safetensors")}
    before, table = _units(out), _trials(out)
    res = _search(CI, out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "8 trials, 0 finished now" in res.stderr
    assert _units(out) == before and _trials(out) == table
    assert {p.name: p.stat().st_mtime_ns for p in (out / "best").glob("*.safetensors")} == shards


@pytest.mark.ray
@pytest.mark.engine
def test_a_killed_search_resumes_on_a_cluster_without_repeating_a_trial_and_finds_what_an_uninterrupted_one_did(
    ci_search, tmp_path
):
    """SIGKILL of the driver once the first batch is told and the second asked; the same command, rerun
    against a running two-node cluster, runs the second batch's trials with their own parameters: the trials
    table equals the uninterrupted run's, and no finished job was scored again."""
    import optuna
    from ray.cluster_utils import Cluster

    reference, _ = ci_search
    out = tmp_path / "killed"
    driver = subprocess.Popen([str(MERGESCALE), "search", str(CI), "--out", str(out), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.5)
        if not (out / "optuna.journal").is_file():
            continue
        journal = optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal"))
        storage = optuna.storages.JournalStorage(journal)
        try:
            trials = optuna.load_study(study_name="search_ci", storage=storage).trials
        except KeyError:
            continue
        if sum(t.state.name == "COMPLETE" for t in trials) >= 4 and len(trials) > 4:
            break
    assert driver.poll() is None, "the search ended before it could be killed"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(3)
    told = sum(t.state.name == "COMPLETE" for t in optuna.load_study(study_name="search_ci", storage=storage).trials)
    before = _units(out)
    assert 4 <= told <= len(before) < 8  # a trial's unit is written before the searcher is told of it

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        res = _search(CI, out, "--address", cluster.address)
    finally:
        cluster.shutdown()
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"8 trials, {8 - told} finished now" in res.stderr
    after = _units(out)
    assert {k: after[k] for k in before} == before  # finished jobs untouched
    table = _trials(out)
    assert len(after) == len({t["job_key"] for t in table}) == 8  # each vector merged and scored once
    strip = [{k: t[k] for k in ("trial", "parameters", "objective", "held_in", "job_key")} for t in table]
    assert strip == [{k: t[k] for k in ("trial", "parameters", "objective", "held_in", "job_key")}
                     for t in _trials(reference)]  # fmt: skip
    assert (out / "best" / "README.md").read_text().split("## Coefficient search")[1] == (
        reference / "best" / "README.md").read_text().split("## Coefficient search")[1]  # fmt: skip


@pytest.mark.ray
@pytest.mark.engine
def test_a_grid_search_scores_exactly_what_the_same_grid_run_as_a_study_on_the_validation_split_does(
    ray_session, tmp_path
):
    from mergescale.orchestrator.search import run_search
    from mergescale.orchestrator.study import run_study
    from mergescale.specs import load_search_spec, load_study_spec

    raw = yaml.safe_load(CI.read_text())
    raw.update(name="grid", merge={"method": "task_arithmetic"}, space={"lambda": {"values": [0.5, 1.0]}},
               search={"algorithm": "grid", "parallel": 2})  # fmt: skip
    raw["eval"]["held_out"] = []
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    run = run_search(load_search_spec(path), path, tmp_path / "search", progress=False)
    study = {"name": "grid", "zoo": raw["zoo"], "base": "zoo:base", "experts": raw["experts"],
             "subsets": {"sizes": [2]}, "resources": raw["resources"],
             "methods": [{"method": "task_arithmetic", "grid": {"lambda": [0.5, 1.0]}}],
             "eval": {**raw["eval"], "split": "validation"}}  # fmt: skip
    spath = tmp_path / "study.yaml"
    spath.write_text(yaml.safe_dump(study))
    run_study(load_study_spec(spath), spath, tmp_path / "study", progress=False)

    def scores(folder: Path) -> dict:
        rows = store.read_results(folder).to_pylist()
        return {(r["job_key"], r["task"], r["kind"], r["metric"]): r["value"] for r in rows
                if r["job_kind"] == store.MERGE and r["kind"] != "summary"}  # fmt: skip

    searched, studied = scores(tmp_path / "search" / "trials"), scores(tmp_path / "study")
    assert len({k[0] for k in searched}) == 2 and searched == studied  # same job keys, identical values
    assert {t["param:lambda"] for t in _trials(run.results)} == {0.5, 1.0}


@pytest.mark.ray
@pytest.mark.engine
def test_asha_scores_trials_on_growing_document_budgets_and_only_a_full_budget_trial_can_be_best(tiny_zoo, tmp_path):
    raw = yaml.safe_load(CI.read_text())
    raw.update(name="asha", search={"algorithm": "optuna", "trials": 6, "parallel": 3, "seed": 1,
                                    "asha": {"min_limit": 4, "reduction_factor": 2}})  # fmt: skip
    raw["eval"]["held_out"] = []
    path = tmp_path / "asha.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    res = _search(path, tmp_path / "out")
    assert res.returncode == 0, res.stderr[-3000:]
    trials = _trials(tmp_path / "out")
    assert len(trials) == 6 and {t["state"] for t in trials} <= {"complete", "pruned"}
    assert all((t["limit"] == 16) == (t["state"] == "complete") for t in trials)
    assert all(t["objective"] is None for t in trials if t["state"] == "pruned")
    # every rung normalized against references scored on the same budget: one reference set per budget
    refs = store.read_results(tmp_path / "out" / "trials").to_pylist()
    n_docs = {r["n"] for r in refs if r["job_kind"] == store.BASE and r["kind"] == "score"}
    assert n_docs == {4, 8, 16}
    best = max((t for t in trials if t["state"] == "complete"), key=lambda t: (t["objective"], -t["trial"]))
    assert f"| | validation (trial {best['trial']}) | test |" in (tmp_path / "out" / "best" / "README.md").read_text()


BAD = [
    ({"space": {"densty": {"low": 0.1, "high": 0.9}, "lambda": {"low": 0.5, "high": 2.0}}},
     "space.densty: not a parameter of method ties; did you mean `density`?"),
    ({"space": {"density": {"low": 0.9, "high": 0.9}, "lambda": {"low": 0.5, "high": 2.0}}},
     "space.density: empty range low = 0.9, high = 0.9"),
    ({"objective": {"held_in": 1.0, "tasks": ["zoo_rot13"]}},
     "objective.tasks: zoo_rot13 is no expert's task (the experts' tasks: zoo_upper, zoo_shift1)"),
    ({"search": {"algorithm": "grid"}}, "space.density: a grid search needs `values`, not a range"),
    ({"search": {"algorithm": "cmaes", "asha": {"min_limit": 4}}}, "search.asha: CMA-ES needs every member"),
    ({"search": {"algorithm": "optuna", "asha": {"min_limit": 16}}}, "search.asha.min_limit: 16 is not below"),
    ({"serach": {}}, "key `serach`: Extra inputs are not permitted; did you mean `search`?"),
    ({"search": {"algorithm": "cmaes", "loggers": ["mlflow"]}}, "search.loggers: mlflow needs the mlflow package"),
]  # fmt: skip


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_a_bad_search_spec_is_one_line_naming_the_key_and_nothing_is_written(tiny_zoo, tmp_path, change, message):
    raw = {**yaml.safe_load(CI.read_text()), **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    res = _search(path, tmp_path / "out", timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("mergescale: error:")]
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "out" / "optuna.journal").exists() and not (tmp_path / "out" / "trials").exists()
