"""Studies: spec validation, expansion to keyed jobs, and real runs on the tiny zoo (real Ray, real vLLM,
real lm-eval) — including a driver killed with SIGKILL mid-study and resumed."""

import math
import os
import signal
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import psutil
import pytest
import yaml

import mergescale
from mergescale.errors import MergescaleError
from mergescale.orchestrator import results as store
from mergescale.orchestrator.jobs import expand, reference_units
from mergescale.orchestrator.study_models import StudyModels
from mergescale.specs import StudySpec, load_study_spec

MERGESCALE = Path(sys.executable).parent / "mergescale"
NAMES = ["upper", "shift1", "shift3", "atbash", "rot13", "digit", "upshift", "pairswap"]


def _models() -> StudyModels:
    """Eight experts as the expansion sees them: names, directories, tasks and weight hashes."""
    experts = {n: (f"/m/{n}", f"zoo_{n}") for n in NAMES}
    return StudyModels("/m/base", experts, {"/m/base": "b" * 64, **{f"/m/{n}": n * 8 for n in NAMES}})


def _spec(**overrides) -> StudySpec:
    raw = {"name": "s", "base": "/m/base", "experts": {n: {"model": f"/m/{n}", "task": f"zoo_{n}"} for n in NAMES},
           "subsets": {"sizes": [2, 4]}, "methods": [{"method": "ties"}], **overrides}  # fmt: skip
    return StudySpec.model_validate(raw)


def test_ties_labels_say_the_scope_that_ran():
    spec = _spec(methods=[{"method": "ties", "grid": {"scope": ["global", "tensor"], "density": [0.2]}},
                          {"method": "ties", "parameters": {"scope": "tensor"}, "label": "mine"}])  # fmt: skip
    assert {j.label for j in expand(spec, _models())} == {"ties global density=0.2", "ties tensor density=0.2", "mine"}


def test_expansion_is_every_k_subset_times_every_grid_point_with_stable_distinct_keys(monkeypatch):
    spec = _spec(methods=[{"method": "task_arithmetic", "grid": {"lambda": [0.3, 1.0]}}, {"method": "ties"}])
    jobs = expand(spec, _models())
    assert len(jobs) == (math.comb(8, 2) + math.comb(8, 4)) * 3
    assert {j.experts for j in jobs} == {*combinations(NAMES, 2), *combinations(NAMES, 4)}
    assert {j.label for j in jobs} == {"task_arithmetic lambda=0.3", "task_arithmetic lambda=1.0", "ties global"}
    assert len({j.key for j in jobs}) == len(jobs)
    assert [j.key for j in expand(spec, _models())] == [j.key for j in jobs]  # same spec, same keys
    assert jobs[0].model_id == "task_arithmetic lambda=0.3/upper+shift1"
    # the key is content: renaming a label keeps it, a parameter, a limit, a weight hash or the version changes it
    first = jobs[0].key
    relabelled = _spec(methods=[{"method": "task_arithmetic", "label": "ta", "grid": {"lambda": [0.3, 1.0]}}])
    assert expand(relabelled, _models())[0].key == first
    other = _spec(methods=[{"method": "task_arithmetic", "grid": {"lambda": [0.31]}}])
    assert expand(other, _models())[0].key != first
    limited = _spec(methods=spec.model_dump()["methods"], eval={"limit": 10})
    assert expand(limited, _models())[0].key != first
    models = _models()
    models.hashes["/m/upper"] = "f" * 64
    assert expand(spec, models)[0].key != first
    monkeypatch.setattr(mergescale, "__version__", "9.9.9")
    assert expand(spec, _models())[0].key != first


def test_a_seeded_sample_of_subsets_is_reproducible_and_seeds_multiply_jobs():
    spec = _spec(subsets={"sizes": [2, 4], "sample": 5, "seed": 3}, seeds=[0, 1])
    jobs = expand(spec, _models())
    assert len(jobs) == 2 * 5 * 2
    assert [j.key for j in expand(spec, _models())] == [j.key for j in jobs]
    other = expand(_spec(subsets={"sizes": [2, 4], "sample": 5, "seed": 4}, seeds=[0, 1]), _models())
    assert {j.experts for j in other} != {j.experts for j in jobs}
    assert {j.model_id.rsplit("/", 1)[1] for j in jobs} == {"seed=0", "seed=1"}
    # references: the base and each expert, keyed apart from the jobs
    refs = reference_units(spec, _models())
    assert [u["model_id"] for u in refs] == ["base", *(f"expert:{n}" for n in NAMES)]
    assert not {u["key"] for u in refs} & {j.key for j in jobs}


def test_a_zoo_grid_expands_to_one_member_per_point_with_factor_keys():
    from mergescale.orchestrator.study_models import zoo_members
    from mergescale.zoo.build import preset_spec

    grid = {"preset": ["xs", "s", "m", "l"], "base": ["pretrained", "instruct"], "seed": [0, 1]}
    members = zoo_members(_spec(zoo=grid, base="zoo:base", experts="zoo"))
    assert [(m.preset, m.base_quality, m.seed) for m in members] == [
        (p, b, s) for p in grid["preset"] for b in grid["base"] for s in grid["seed"]]  # fmt: skip
    assert len({m.key() for m in members}) == 16
    assert members[1] == preset_spec("xs", seed=1, base="pretrained")
    # the original zoo's spec still names one member with the key it always had
    (tiny,) = zoo_members(_spec(zoo={"preset": "tiny", "seed": 0}))
    assert tiny.key() == "c026f8fdcc92658c"
    for bad, message in [({"preset": "tiny", "base": "instruct"}, "zoo: zoo preset 'tiny' has a pretrained base only"),
                         ({"preset": ["xs", "xs"]}, "zoo.preset: give a value or a list of distinct values"),
                         ({"seed": ["a"]}, "zoo.seed: 'a' is not an integer"),
                         ({"size": "m"}, "zoo.size: unknown key")]:  # fmt: skip
        with pytest.raises(MergescaleError, match=message):
            zoo_members(_spec(zoo=bad))
    # jobs of two members: the same subsets and methods, keyed apart by their models and factors, ids say which
    spec = _spec(subsets={"sizes": [2]})

    def member(size: str, quality: str, weights: str) -> StudyModels:
        models = _models()
        models.hashes = {k: weights + v[1:] for k, v in models.hashes.items()}
        models.factors = {"size": size, "n_parameters": 1, "base_quality": quality, "zoo_seed": 0}
        models.member = f"{size} {quality} seed=0"
        models.multitask = "/m/base"  # any directory with a hash
        return models

    a, b = expand(spec, member("xs", "pretrained", "1")), expand(spec, member("xs", "instruct", "2"))
    assert [j.experts for j in a] == [j.experts for j in b] and len(a) == math.comb(8, 2)
    assert not {j.key for j in a} & {j.key for j in b}
    assert a[0].model_id == "[xs pretrained seed=0] ties global/upper+shift1"
    same_weights = member("xs", "instruct", "1")  # the factors are in the key, not only the weights
    assert expand(spec, same_weights)[0].key != a[0].key
    refs = reference_units(spec, member("xs", "pretrained", "1"))
    assert [u["model_id"] for u in refs][0] == "[xs pretrained seed=0] base"
    assert refs[-1]["kind"] == store.MULTITASK and refs[-1]["model_id"] == "[xs pretrained seed=0] multitask"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"subsets": {"sizes": [9]}}, "subsets.sizes: 9 experts per merge, but the study has 8 experts"),
        ({"methods": [{"method": "ties", "parameters": {"density": 0.2}, "grid": {"density": [0.1]}}]},
         "methods.0: `density` is both in parameters and in grid; keep one"),
        ({"methods": [{"method": "ties"}, {"method": "ties"}]}, "two method entries are both labelled 'ties global'"),
        ({"methods": [{"method": "ties", "grid": {"density": []}}]}, "methods.0.grid.density: give at least one"),
    ],
)  # fmt: skip
def test_expansion_errors_name_the_key(change, message):
    with pytest.raises(MergescaleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        expand(_spec(**change), _models())


def test_spec_errors_name_the_file_line_and_key(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(
        "name: s\nbase: b\nexperts:\n  a: {model: x, tsk: t}\nsubsets: {sizes: [2]}\nmethods: [{method: ties}]\n"
    )
    want = (rf"^{path}:4: key `experts.a.tsk`: Extra inputs are not permitted; "
            r"did you mean `task`\? known keys: model, task$")
    with pytest.raises(MergescaleError, match=want):
        load_study_spec(path)
    path.write_text("name: s\nbase: b\nexperts: zoo\nsubsets: {sizes: [2]}\nmethods:\n  - method: ties\n    grid: 3\n")
    with pytest.raises(MergescaleError, match=rf"^{path}:7: key `methods.0.grid`: Input should be a valid dictionary"):
        load_study_spec(path)
    path.write_text("name: s\nbase: b\n  experts: zoo\n")
    with pytest.raises(MergescaleError, match=rf"^{path}: line 3 is not valid YAML"):
        load_study_spec(path)


def test_models_that_are_neither_directories_nor_reachable_hub_ids_are_one_line_errors(tmp_path, monkeypatch):
    from mergescale.orchestrator.study_models import resolve_models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a cluster without network
    spec = _spec(base="nobody/no-such-model")
    with pytest.raises(MergescaleError, match=r"^base: nobody/no-such-model is neither a directory .* nor a reachable"):
        resolve_models(spec, tmp_path)
    spec = _spec(base=str(tmp_path), experts={"a": {"model": "missing", "task": "t"}})
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MergescaleError, match=rf"^experts.a: {tmp_path / 'missing'}: no such model directory"):
        resolve_models(spec, tmp_path)
    with pytest.raises(MergescaleError, match="name its held-in lm-eval task"):
        resolve_models(_spec(base=str(tmp_path), experts={"a": str(tmp_path)}), tmp_path)


# ---------------------------------------------------------------- real runs
def _write_study(tmp_path: Path, **overrides) -> Path:
    raw = {
        "name": "tiny-study",
        "zoo": {"preset": "tiny", "seed": 0},
        "base": "zoo:base",
        "experts": {"upper": "zoo:upper", "rot13": "zoo:rot13", "digit": "zoo:digit"},
        "subsets": {"sizes": [2]},
        "methods": [{"method": "task_arithmetic", "parameters": {"lambda": 0.5}}, {"method": "ties"}],
        "eval": {"held_out": ["zoo_copy"], "limit": 20},
        "resources": {"merge_workers": 1, "eval_threads": 1},
        "results": "res",
        **overrides,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.zoo
def test_a_bad_method_parameter_fails_before_anything_is_written(tiny_zoo, tmp_path):
    from mergescale.orchestrator.study import run_study

    path = _write_study(tmp_path, methods=[{"method": "ties", "parameters": {"densty": 0.2}}])
    want = r"^methods \(ties global, 2 experts\): unknown parameter `densty` for method"
    with pytest.raises(MergescaleError, match=want):
        run_study(load_study_spec(path), path, progress=False)
    assert not (tmp_path / "res").exists()


def _key_rows(rows):
    return [(r["job_key"], r["model"], r["task"], r["kind"], r["metric"]) for r in rows]


@pytest.mark.zoo
@pytest.mark.ray
@pytest.mark.engine
def test_a_study_runs_merges_and_evaluations_and_its_rows_are_normalized(tiny_zoo, ray_session, tmp_path):
    """In-process run on the session's Ray with ``keep_models``: every job's rows, normalized against the
    reference rows of the store, divergences to its experts, the kept model equal to a direct merge."""
    from mergescale.checkpoints import weights_sha256
    from mergescale.orchestrator.merge import run_merge
    from mergescale.orchestrator.study import run_study

    path = _write_study(
        tmp_path, keep_models=True, eval={"held_out": ["zoo_copy"], "limit": {"default": 20, "zoo_copy": 10}}
    )
    run = run_study(load_study_spec(path), path, progress=False)
    assert (run.jobs, run.skipped, run.ran, run.references_evaluated) == (6, 0, 6, 4)
    rows = store.read_results(tmp_path / "res").to_pylist()
    assert len(_key_rows(rows)) == len(set(_key_rows(rows)))
    refs = {(r["model"], r["task"]): r["value"] for r in rows if r["kind"] == "score" and r["metric"] == "exact_match"
            and r["job_kind"] != store.MERGE}  # fmt: skip
    assert refs[("expert:upper", "zoo_upper")] > 0.9 and refs[("base", "zoo_copy")] > 0.9
    merges = [r for r in rows if r["job_kind"] == store.MERGE]
    assert {r["model"] for r in merges} == {
        f"{m}/{a}+{b}"
        for m in ("task_arithmetic", "ties global")
        for a, b in combinations(["upper", "rot13", "digit"], 2)
    }
    for r in merges:
        if r["kind"] == "score" and r["metric"] == "exact_match":
            ref = refs[(f"expert:{r['task'][4:]}", r["task"]) if r["role"] == "held_in" else ("base", r["task"])]
            assert r["normalized"] == pytest.approx(r["value"] / ref)
            assert r["n"] == (10 if r["task"] == "zoo_copy" else 20)  # limits per task
    ta = {(r["task"], r["kind"], r["metric"]): r for r in merges if r["model"] == "task_arithmetic/upper+rot13"}
    assert set(t for t, k, _ in ta if k == "score") == {"zoo_upper", "zoo_rot13", "zoo_copy"}
    anp = ta[("(held-in)", "summary", "exact_match")]["normalized"]
    assert anp == pytest.approx((ta[("zoo_upper", "score", "exact_match")]["normalized"]
                                 + ta[("zoo_rot13", "score", "exact_match")]["normalized"]) / 2)  # fmt: skip
    assert 0 < ta[("zoo_upper", "divergence", "js")]["value"] < math.log(2)
    assert ta[("zoo_upper", "divergence", "js")]["merge_seconds"] > 0
    # provenance on every row, references included: the zoo's key and the evaluator process's software and CPU
    import torch

    from mergescale.provenance import cpu_model

    for r in rows:
        assert r["zoo_key"] == tiny_zoo.meta["key"] and r["weights_sha256"]
        assert r["torch_version"] == torch.__version__ and r["host_cpu"] == cpu_model() and r["vllm_version"]
    # the kept model is the merge the spec describes, byte for byte
    kept = Path(ta[("zoo_upper", "score", "exact_match")]["model_path"])
    assert ta[("zoo_upper", "score", "exact_match")]["weights_sha256"] == weights_sha256(kept)
    direct = run_merge(_direct_spec(tiny_zoo), tmp_path / "direct", progress=False)
    assert weights_sha256(direct.path) == weights_sha256(kept)


def _direct_spec(zoo):
    from mergescale.specs import MergeSpec

    return MergeSpec.model_validate({"method": "task_arithmetic", "base": str(zoo.base), "parameters": {"lambda": 0.5},
                                     "experts": [str(zoo.experts["upper"]), str(zoo.experts["rot13"])]})  # fmt: skip


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (its embedded Ray, workers, engines): a power cut."""
    try:
        proc = psutil.Process(pid)
        tree = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


@pytest.mark.zoo
@pytest.mark.ray
@pytest.mark.engine
def test_a_killed_driver_loses_only_jobs_in_flight_and_a_rerun_completes_the_study(tiny_zoo, tmp_path):
    path = _write_study(tmp_path, subsets={"sizes": [1, 2]})  # 3 + 3 subsets x 2 methods = 12 jobs
    res = tmp_path / "res"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the command starts its own Ray
    first = subprocess.Popen([str(MERGESCALE), "study", "run", str(path), "--quiet"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while len(store.done_keys(res, store.JOBS)) < 2:
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no job finished in 5 minutes"
            time.sleep(0.05)
    finally:
        _kill_tree(first.pid)
    done = {p.name: p.stat().st_mtime_ns for p in (res / store.JOBS).glob("*.parquet")}
    assert 2 <= len(done) < 12, "the kill should land mid-study"

    second = subprocess.run([str(MERGESCALE), "study", "run", str(path), "--quiet"], env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"12 jobs, {len(done)} already done, {12 - len(done)} run now" in second.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (res / store.JOBS).glob("*.parquet")}
    assert len(after) == 12
    assert all(after[name] == mtime for name, mtime in done.items())  # no finished job was redone
    rows = store.read_results(res).to_pylist()
    assert len(_key_rows(rows)) == len(set(_key_rows(rows)))  # no duplicate rows
    assert len({r["job_key"] for r in rows if r["job_kind"] == store.MERGE}) == 12
    assert not list(res.rglob(".*.tmp-*"))
    assert not any((res / store.MODELS).iterdir())  # keep_models false: merged models deleted once evaluated
    # one-expert "merges" at lambda 0.5 and the experts' own scores: the pipeline is consistent end to end
    solo = [r for r in rows
            if r["model"] == "ties global/upper" and r["task"] == "(held-in)" and r["metric"] == "exact_match"]
    assert len(solo) == 1 and solo[0]["normalized"] > 0.5

    third = subprocess.run([str(MERGESCALE), "study", "run", str(path), "--quiet"], env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert third.returncode == 0 and "12 jobs, 12 already done, 0 run now" in third.stderr
    assert "ties" in third.stdout  # the leaderboard is printed from the store


@pytest.mark.zoo
@pytest.mark.ray
@pytest.mark.engine
def test_a_study_runs_unchanged_as_the_entrypoint_of_a_ray_job_on_a_two_node_cluster(tiny_zoo, tmp_path):
    """`ray job submit` runs the entrypoint with RAY_ADDRESS set: the command joins the cluster, spreads
    merges and the evaluator over its nodes, and leaves the cluster running."""
    from ray.cluster_utils import Cluster

    path = _write_study(tmp_path, methods=[{"method": "ties"}])
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        res = subprocess.run([str(MERGESCALE), "study", "run", str(path), "--quiet"], env=env, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        assert "3 jobs, 0 already done, 3 run now (4 reference models evaluated)" in res.stderr
        nodes = cluster.list_all_nodes()
        assert len(nodes) == 2 and all(n.remaining_processes_alive() for n in nodes)  # the cluster lives on
    finally:
        cluster.shutdown()
    rows = store.read_results(tmp_path / "res").to_pylist()
    assert {r["model"] for r in rows if r["job_kind"] == store.MERGE} == {
        "ties global/upper+rot13", "ties global/upper+digit", "ties global/rot13+digit"}  # fmt: skip


@pytest.mark.zoo  # builds (or reuses) the scale family's two xs members
@pytest.mark.ray
@pytest.mark.engine
def test_a_study_over_zoo_members_keys_and_normalizes_each_member_apart(ray_session, tmp_path):
    """examples/scale_ci.yaml: two members (xs pretrained, xs instruct), each with its own references —
    base, 8 experts, multitask — and every row carrying its factors."""
    from mergescale.orchestrator.study import run_study
    from mergescale.zoo.build import build_zoo, preset_spec

    spec_path = Path(__file__).parents[1] / "examples" / "scale_ci.yaml"
    run = run_study(load_study_spec(spec_path), spec_path, tmp_path / "res", progress=False)
    assert (run.jobs, run.skipped, run.ran, run.references_evaluated) == (12, 0, 12, 20)
    rows = store.read_results(tmp_path / "res").to_pylist()
    zoos = {q: build_zoo(preset_spec("xs", base=q), progress=False) for q in ("pretrained", "instruct")}
    for r in rows:
        zoo = zoos[r["base_quality"]]
        assert (r["size"], r["n_parameters"], r["zoo_seed"], r["zoo_key"]) == ("xs", 214400, 0, zoo.meta["key"])
        assert r["zoo_host"] == zoo.meta["host"]["cpu"]
        assert r["model"].startswith(f"[xs {r['base_quality']} seed=0] ")
    kinds = {(r["base_quality"], r["job_kind"]) for r in rows}
    assert kinds == {(q, k) for q in zoos for k in (store.BASE, store.EXPERT, store.MULTITASK, store.MERGE)}
    em = [r for r in rows if r["kind"] == "score" and r["metric"] == "char_acc"]
    refs = {(r["base_quality"], r["model"].split("] ")[1], r["task"]): r["value"] for r in em
            if r["job_kind"] != store.MERGE}  # fmt: skip
    assert {t for (_, m, t) in refs if m == "multitask"} == {f"zoo_{t}" for t in NAMES} | {
        f"zoo_{t}_post" for t in NAMES}  # fmt: skip
    merges = [r for r in em if r["job_kind"] == store.MERGE]
    assert len({r["job_key"] for r in merges}) == 12
    for r in merges:  # normalized against the member's own references, never the other member's
        ref = (r["base_quality"], f"expert:{r['task'][4:]}" if r["role"] == "held_in" else "base", r["task"])
        assert r["normalized"] == pytest.approx(r["value"] / refs[ref])
        assert r["role"] == "held_in" or r["task"].endswith("_post")
    again = run_study(load_study_spec(spec_path), spec_path, tmp_path / "res", progress=False)
    assert (again.jobs, again.skipped, again.ran) == (12, 12, 0)
    from mergescale.orchestrator.report import write_report

    # the factor report renders from the real store: base quality is measured, size needs two sizes
    names = {p.name for p in write_report(tmp_path / "res", tmp_path / "report")}
    assert {"factors.md", "factors_held_in.svg", "factors_held_out.svg"} <= names
    md = (tmp_path / "report" / "factors.md").read_text()
    first = next(line for line in md.splitlines() if line.startswith("| 1 |"))
    assert "instruct - pretrained" in first and "| xs: " in first and not first.endswith("| not measured |")
    assert next(line for line in md.splitlines() if line.startswith("| 2 |")).endswith("| not measured |")
