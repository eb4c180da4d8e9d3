"""Task-vector editing experiments as study kinds (``kind: negation``): the spec and its errors, the jobs, the
random-direction baseline, the selection rule, and a real run on the tiny zoo (real Ray, vLLM, lm-eval):
λ = 0 is the base, both splits are stored, a rerun does nothing, the report is written."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from mergescale.errors import SpecError
from mergescale.merge_ops import TensorContext
from mergescale.methods import get_method
from mergescale.orchestrator import results as store
from mergescale.orchestrator.editing_report import _Point, select
from mergescale.orchestrator.jobs import expand, reference_units
from mergescale.orchestrator.study_models import StudyModels
from mergescale.specs import StudySpec, load_study_spec

NAMES = ["upper", "shift1", "rot13"]


def _models() -> StudyModels:
    experts = {n: (f"/m/{n}", f"zoo_{n}") for n in NAMES}
    return StudyModels("/m/base", experts, {"/m/base": "b" * 64, **{f"/m/{n}": n * 8 for n in NAMES}})


def _raw(**overrides) -> dict:
    return {"name": "neg", "kind": "negation", "base": "/m/base",
            "experts": {n: {"model": f"/m/{n}", "task": f"zoo_{n}"} for n in NAMES},
            "negation": {"lambdas": [0, 0.5, 1.0]}, **overrides}  # fmt: skip


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------- the spec
@pytest.mark.parametrize(
    "change, key",
    [
        ({"negation": None}, "`negation`"),  # kind negation without its block
        ({"methods": [{"method": "ties"}]}, "`methods`"),  # a merge study's block in an editing study
        ({"negation": {"lambdas": [0.5, -1]}}, "negation.lambdas"),
        ({"negation": {"lambdas": []}}, "negation.lambdas"),
        ({"negation": {"lambdas": [1], "targets": ["upper", "nope"]}}, "negation.targets.1"),
        ({"negation": {"lambdas": [1], "control_keep": 1.5}}, "negation.control_keep"),
        ({"eval": {"split": "validation"}}, "eval.split"),
        ({"kind": "merge", "negation": None}, "`subsets`"),  # a merge study needs subsets and methods
        ({"zoo": {"preset": ["xs", "s"]}}, "`zoo`"),  # one zoo per editing study
    ],
)
def test_spec_errors_name_the_key(tmp_path, change, key):
    raw = {k: v for k, v in {**_raw(), **change}.items() if v is not None}
    with pytest.raises(SpecError) as err:
        load_study_spec(_write(tmp_path, raw))
    assert key in str(err.value) and str(tmp_path / "study.yaml") in str(err.value)
    assert "\n" not in str(err.value)


def test_a_merge_study_is_still_the_default_kind(tmp_path):
    raw = {k: v for k, v in _raw(subsets={"sizes": [2]}, methods=[{"method": "ties"}]).items()
           if k not in ("kind", "negation")}  # fmt: skip
    assert load_study_spec(_write(tmp_path, raw)).kind == "merge"


# ---------------------------------------------------------------- the jobs
def test_negation_jobs_are_minus_lambda_times_each_target_and_random_directions_per_seed(tmp_path):
    spec = load_study_spec(_write(tmp_path, _raw(seeds=[0, 1], negation={"lambdas": [0, 0.5], "targets": ["rot13"]})))
    jobs = expand(spec, _models())
    # one target x 2 λ x (the task vector once + a random direction per seed)
    assert [(j.method, j.experts, json.loads(j.expert_parameters), j.seed) for j in jobs] == [
        ("task_arithmetic", ("rot13",), [{"weight": 0}], 0),
        ("random_direction", ("rot13",), [{"weight": 0}], 0),
        ("random_direction", ("rot13",), [{"weight": 0}], 1),
        ("task_arithmetic", ("rot13",), [{"weight": -0.5}], 0),
        ("random_direction", ("rot13",), [{"weight": -0.5}], 0),
        ("random_direction", ("rot13",), [{"weight": -0.5}], 1),
    ]
    assert len({j.key for j in jobs}) == len(jobs)
    edit = json.loads(jobs[3].edit)
    assert edit == {"experiment": "negation", "target": "rot13", "task": "zoo_rot13", "lambda": 0.5,
                    "direction": "task"}  # fmt: skip
    merge = jobs[3].merge_spec(_models())
    assert (merge.base, [e.model for e in merge.experts], merge.experts[0].parameters) == (
        "/m/base", ["/m/rot13"], {"weight": -0.5})  # fmt: skip
    # every target by default; the keys do not collide with a merge study's references
    assert len(expand(load_study_spec(_write(tmp_path, _raw())), _models())) == 3 * 3 * 2
    merge_study = StudySpec.model_validate({**_raw(), "kind": "merge", "negation": None,
                                            "subsets": {"sizes": [1]}, "methods": [{"method": "ties"}]})  # fmt: skip
    assert {u["key"] for u in reference_units(spec, _models())}.isdisjoint(
        u["key"] for u in reference_units(merge_study, _models()))  # fmt: skip


ANALOGY_NAMES = ["shift1", "ushift1", "rot13", "urot13"]


def _analogy_raw(**overrides) -> dict:
    return {"name": "an", "kind": "analogy", "base": "/m/base",
            "experts": {n: {"model": f"/m/{n}", "task": f"zoo_{n}"} for n in ANALOGY_NAMES},
            "analogy": {"analogies": [{"a": "shift1", "b": "ushift1", "c": "rot13", "d": "urot13"}]},
            **overrides}  # fmt: skip


def _analogy_models() -> StudyModels:
    experts = {n: (f"/m/{n}", f"zoo_{n}") for n in ANALOGY_NAMES}
    return StudyModels("/m/base", experts, {"/m/base": "b" * 64, **{f"/m/{n}": n * 8 for n in ANALOGY_NAMES}})


def test_the_analogy_vector_is_c_plus_b_minus_a_from_the_named_experts_in_that_order(tmp_path):
    spec = load_study_spec(_write(tmp_path, _analogy_raw(analogy={"lambdas": [0.5, 1.0], "analogies": [
        {"a": "shift1", "b": "ushift1", "c": "rot13", "d": "urot13"}]})))  # fmt: skip
    jobs = expand(spec, _analogy_models())
    assert [j.model_id for j in jobs] == ["rot13 + (ushift1 - shift1) λ=0.5", "rot13 alone λ=0.5",
                                          "rot13 + (ushift1 - shift1) λ=1", "rot13 alone λ=1"]  # fmt: skip
    merge = jobs[2].merge_spec(_analogy_models())
    assert merge.method == "task_arithmetic" and merge.parameters == {"lambda": 1.0}
    assert [(e.model, e.parameters["weight"]) for e in merge.experts] == [
        ("/m/rot13", 1.0), ("/m/ushift1", 1.0), ("/m/shift1", -1.0)]  # fmt: skip
    alone = jobs[1].merge_spec(_analogy_models())
    assert [(e.model, e.parameters["weight"]) for e in alone.experts] == [("/m/rot13", 1.0)]
    assert alone.parameters == {"lambda": 0.5}
    edit = json.loads(jobs[2].edit)
    assert (edit["target"], edit["task"], edit["source"]) == ("urot13", "zoo_urot13", "shift1:ushift1::rot13:urot13")
    # D is never an input of an edit: its expert is the ceiling
    assert all("urot13" not in j.experts for j in jobs)


@pytest.mark.parametrize(
    "analogy, key",
    [
        ({"a": "shift1", "b": "ushift1", "c": "nope", "d": "urot13"}, "analogy.analogies.0.c"),
        ({"a": "shift1", "b": "ushift1", "c": "rot13"}, "analogy.analogies.0"),  # neither d nor d_task
        ({"a": "shift1", "b": "ushift1", "c": "rot13", "d_task": "zoo_urot13"}, "analogy.analogies.0.d_task"),
        ({"a": "shift1", "b": "shift1", "c": "rot13", "d": "urot13"}, "analogy.analogies.0"),  # not distinct
        ({"a": "shift1", "b": "ushift1", "c": "rot13", "d": "urot13", "e": "x"}, "analogy.analogies.0.e"),
    ],
)
def test_analogy_spec_errors_name_the_key(tmp_path, analogy, key):
    with pytest.raises(SpecError) as err:
        load_study_spec(_write(tmp_path, _analogy_raw(analogy={"analogies": [analogy]})))
    assert key in str(err.value) and "\n" not in str(err.value)


def _transfer_raw(**overrides) -> dict:
    return {"name": "tr", "kind": "transfer", "base": "/m/v3",
            "experts": {"rot13": {"model": "/m/ft3", "task": "zoo_rot13"}},
            "transfer": {"versions": {f"v{i}": {"base": f"/m/v{i}", "finetuned": f"/m/ft{i}"} for i in (1, 2, 3)}},
            **overrides}  # fmt: skip


def _transfer_models() -> StudyModels:
    versions = {f"v{i}": (f"/m/v{i}", f"/m/ft{i}") for i in (1, 2, 3)}
    hashes = {p: p[3:] * 16 for v in versions.values() for p in v}
    return StudyModels("/m/v3", {"rot13": ("/m/ft3", "zoo_rot13")}, hashes, versions=versions)


def test_transfer_jobs_are_each_target_alone_and_with_every_sources_difference(tmp_path):
    spec = load_study_spec(_write(tmp_path, _transfer_raw()))
    jobs = expand(spec, _transfer_models())
    assert [j.model_id for j in jobs[:4]] == ["v1 alone", "v1 + Δv1", "v1 + Δv2", "v1 + Δv3"]
    assert len(jobs) == 3 * 4 and len({j.key for j in jobs}) == 12
    cell = next(j for j in jobs if j.model_id == "v1 + Δv3")
    merge = cell.merge_spec(_transfer_models())
    # target base + λ (source fine-tune − source base): transfer's experts are, in order, the fine-tune and its base
    assert (merge.method, merge.base, [e.model for e in merge.experts]) == ("transfer", "/m/v1", ["/m/ft3", "/m/v3"])
    assert merge.parameters == {"lambda": 1.0}
    alone = jobs[0].merge_spec(_transfer_models())
    assert (alone.base, alone.parameters) == ("/m/v1", {"lambda": 0.0})
    assert json.loads(cell.edit) == {"experiment": "transfer", "target": "v1", "source": "v3", "lambda": 1.0,
                                     "direction": "transfer"}  # fmt: skip


@pytest.mark.parametrize(
    "change, key",
    [
        ({"transfer": {"versions": {"v1": {"base": "/m/v1", "finetuned": "/m/ft1"}}}}, "transfer.versions"),
        ({"transfer": {"versions": {"v1": {"base": "/m/v1"}, "v2": {"base": "/m/v2", "finetuned": "/m/f"}}}},
         "transfer.versions.v1.finetuned"),
        ({"transfer": {"lambda": "x", "versions": {}}}, "transfer"),
        ({"negation": {"lambdas": [1]}}, "`negation`"),
    ],
)  # fmt: skip
def test_transfer_spec_errors_name_the_key(tmp_path, change, key):
    with pytest.raises(SpecError) as err:
        load_study_spec(_write(tmp_path, _transfer_raw(**change)))
    assert key in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- the random direction
def test_a_random_direction_has_the_task_vectors_norm_per_tensor_and_depends_only_on_seed_and_name():
    method = get_method("random_direction")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=gen)
    expert = base + 0.01 * torch.randn(64, 32, generator=gen)
    params = [method.Params(weight=-2.0)]
    ctx = TensorContext(name="model.layers.0.mlp.up_proj.weight", seed=3)
    out = method.merge(base, [expert], params, ctx)
    tau = (expert.double() - base.double()).norm()
    assert (out.double() - base.double()).norm().item() == pytest.approx(2.0 * tau.item(), rel=1e-5)
    assert torch.equal(out, method.merge(base, [expert], params, ctx))  # same seed and name: same bytes
    other = method.merge(base, [expert], params, TensorContext(name="model.layers.1.mlp.up_proj.weight", seed=3))
    assert not torch.equal(out, other)
    # nearly orthogonal to the task vector (a random direction, not τ itself)
    cos = torch.nn.functional.cosine_similarity((out - base).flatten().double(), (expert - base).flatten().double(), 0)
    assert abs(cos.item()) < 0.2
    # weight 0 is the base, bit for bit
    zero = method.merge(base, [expert], [method.Params(weight=0.0)], ctx)
    assert torch.equal(zero.view(torch.int32), base.view(torch.int32))


# ---------------------------------------------------------------- the selection rule
def test_selection_takes_the_lowest_target_whose_control_keeps_the_fraction_and_the_smaller_lambda_on_ties():
    curve = {0.5: _Point(0.5, 0.99, None, 1), 1.0: _Point(0.2, 0.96, None, 1), 1.5: _Point(0.2, 0.95, None, 1),
             2.0: _Point(0.0, 0.90, None, 1)}  # fmt: skip
    assert select(curve, 1.0, 0.95) == 1.0  # 2.0 forgets most but loses the control; 1.0 and 1.5 tie
    assert select(curve, 1.0, 0.999) is None  # no λ keeps 99.9 % of the control
    assert select({0.0: _Point(0.6, 1.0, None, 1)}, 1.0, 0.95) == 0.0


# ---------------------------------------------------------------- a real run
@pytest.mark.zoo
@pytest.mark.ray
@pytest.mark.engine
def test_a_negation_study_runs_on_the_zoo_resumes_and_reports(tiny_zoo, ray_session, tmp_path):
    from safetensors.torch import load_file

    from mergescale.orchestrator.report import write_report
    from mergescale.orchestrator.study import run_study

    raw = {"name": "neg", "kind": "negation", "zoo": {"preset": "tiny", "seed": 0}, "base": "zoo:base",
           "experts": {n: f"zoo:{n}" for n in NAMES}, "negation": {"lambdas": [0, 1.0], "targets": ["upper"]},
           "eval": {"held_out": ["zoo_copy"], "limit": 20}, "keep_models": True, "results": "res"}  # fmt: skip
    path = _write(tmp_path, raw)
    run = run_study(load_study_spec(path), path, progress=False)
    assert (run.jobs, run.ran, run.references_evaluated) == (4, 4, 4)
    rows = store.read_results(tmp_path / "res").to_pylist()
    scores = [r for r in rows if r["kind"] == "score" and r["metric"] == "char_acc"]
    # every model, references included, is scored on every task on both splits
    tasks = {"zoo_upper", "zoo_shift1", "zoo_rot13", "zoo_copy"}
    for model in {r["model"] for r in scores}:
        for split in (None, "validation"):
            assert {r["task"] for r in scores if r["model"] == model and r["split"] == split} == tasks, (model, split)
    edits = [r for r in scores if r["job_kind"] == store.EDIT]
    assert {(r["edit_direction"], r["edit_lambda"]) for r in edits} == {("task", 0), ("task", 1), ("random", 0),
                                                                        ("random", 1)}  # fmt: skip
    assert {(r["experiment"], r["edit_target"], r["edit_task"]) for r in edits} == {("negation", "upper", "zoo_upper")}
    base = {(r["task"], r["split"]): r["value"] for r in scores if r["job_kind"] == store.BASE}
    # λ = 0 is the base: the same tensors bit for bit, so the same scores on every task and split
    zero = next(r for r in edits if r["edit_direction"] == "task" and r["edit_lambda"] == 0)
    kept = {}
    for f in Path(zero["model_path"]).glob("*.safetensors"):
        kept.update(load_file(f))
    original = load_file(tiny_zoo.base / "model.safetensors")
    assert set(kept) == set(original)
    assert all(torch.equal(kept[k].view(torch.int32), original[k].view(torch.int32)) for k in original)
    for r in edits:
        if r["edit_lambda"] == 0:
            assert r["value"] == base[(r["task"], r["split"])], r
    # negating the task vector forgets the target (the base's known letters), the random step does not
    neg = {(r["task"], r["split"]): r["value"] for r in edits if (r["edit_direction"], r["edit_lambda"]) == ("task", 1)}
    assert neg[("zoo_upper", None)] < base[("zoo_upper", None)] - 0.2
    # resumable: a rerun finds every unit and runs nothing
    again = run_study(load_study_spec(path), path, progress=False)
    assert (again.jobs, again.skipped, again.ran, again.references_evaluated) == (4, 4, 0, 0)
    written = write_report(tmp_path / "res", tmp_path / "report")
    assert {p.name for p in written} == {"negation.md", "negation.html", "negation.png", "negation.svg"}
    md = (tmp_path / "report" / "negation.md").read_text()
    assert "| upper |" in md and "validation split" in md and "Ilharco" in md
    assert written[0].read_bytes() == write_report(tmp_path / "res", tmp_path / "again")[0].read_bytes()


@pytest.mark.zoo
def test_the_editing_zoo_has_checkpoints_a_next_version_and_a_fine_tune_from_each(edit_zoo):
    from safetensors.torch import load_file

    models = edit_zoo.models
    for name in ("M1", "M2", "M3", "M4", "v2", "ft-M1", "ft-M2", "ft-M3", "ft-M4", "ft-M5", "ft-v2", "urot13"):
        assert (models[name] / "config.json").is_file(), name
    assert models["ft-M5"] == edit_zoo.experts["rot13"]  # FT(M5) is the rot13 expert: M5 is the base
    scores = edit_zoo.meta["scores"]["test"]
    # each expert solves its task; the checkpoints grow more capable at the transfer task's known letters
    assert all(scores[t][t]["exact_match"] >= 0.9 for t in edit_zoo.meta["experts"])
    assert scores["ft-M1"]["rot13"]["exact_match"] > 0.5
    char = [scores[m]["rot13"]["char_acc"] for m in ("M1", "M3", "base")]
    assert char[0] < char[-1], char
    # the checkpoints are distinct states of one run, the next version moved on from M5
    a, b, v2 = (load_file(models[m] / "model.safetensors") for m in ("M4", "base", "v2"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(a[name], b[name]) and not torch.equal(b[name], v2[name])


@pytest.mark.zoo
@pytest.mark.ray
@pytest.mark.engine
def test_transfer_and_analogy_studies_run_on_the_editing_zoo(edit_zoo, ray_session, tmp_path):
    """Transfer: the diagonal is each version's own fine-tune bit for bit and each target alone is that
    version; analogy: one analogy, D's expert as the ceiling.  Both resumable, both reported."""
    from safetensors.torch import load_file

    from mergescale.orchestrator.report import write_report
    from mergescale.orchestrator.study import run_study

    def tensors(path) -> dict:
        out = {}
        for f in Path(path).glob("*.safetensors"):
            out.update(load_file(f))
        return out

    def same(a: dict, b: dict) -> bool:
        return set(a) == set(b) and all(torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)

    raw = {"name": "tr", "kind": "transfer", "zoo": {"preset": "edit"}, "base": "zoo:base",
           "experts": {"rot13": "zoo:rot13"}, "eval": {"held_out": ["zoo_copy"], "limit": 20}, "keep_models": True,
           "transfer": {"versions": {"M2": {"base": "zoo:M2", "finetuned": "zoo:ft-M2"},
                                     "M5": {"base": "zoo:base", "finetuned": "zoo:rot13"}}},
           "results": "transfer"}  # fmt: skip
    path = _write(tmp_path, raw)
    run = run_study(load_study_spec(path), path, progress=False)
    assert (run.jobs, run.ran) == (6, 6)
    rows = [r for r in store.read_results(tmp_path / "transfer").to_pylist() if r["job_kind"] == store.EDIT]
    kept = {(r["edit_target"], r["edit_source"], r["edit_direction"]): r for r in rows}
    zoo = edit_zoo.models
    assert same(tensors(kept[("M2", "M2", "transfer")]["model_path"]), tensors(zoo["ft-M2"]))  # the diagonal
    assert same(tensors(kept[("M5", "M5", "transfer")]["model_path"]), tensors(zoo["rot13"]))
    assert same(tensors(kept[("M2", "M2", "base")]["model_path"]), tensors(zoo["M2"]))  # the target alone
    off = kept[("M5", "M2", "transfer")]
    assert 0 < off["edit_distance"] < 1 and off["edit_base_cosine"] > 0.5 and -1 <= off["edit_delta_cosine"] <= 1
    assert kept[("M2", "M2", "transfer")]["edit_distance"] == 0
    again = run_study(load_study_spec(path), path, progress=False)
    assert (again.skipped, again.ran) == (6, 0)
    written = write_report(tmp_path / "transfer", tmp_path / "transfer-report")
    assert {p.name for p in written} == {"transfer.md", "transfer.html", "transfer.png", "transfer.svg"}
    assert "| M5 |" in written[0].read_text() and "Spearman" in written[0].read_text()

    raw = {"name": "an", "kind": "analogy", "zoo": {"preset": "edit"}, "base": "zoo:base",
           "experts": {n: f"zoo:{n}" for n in ("shift1", "ushift1", "rot13", "urot13")},
           "analogy": {"analogies": [{"a": "shift1", "b": "ushift1", "c": "rot13", "d": "urot13"}]},
           "eval": {"held_out": ["zoo_copy"], "limit": 20}, "results": "analogy"}  # fmt: skip
    path = _write(tmp_path, raw)
    run = run_study(load_study_spec(path), path, progress=False)
    assert (run.jobs, run.ran) == (2, 2)
    rows = store.read_results(tmp_path / "analogy").to_pylist()
    d = {r["edit_direction"]: r for r in rows if r["job_kind"] == store.EDIT and r["task"] == "zoo_urot13"
         and r["metric"] == "exact_match"}  # fmt: skip
    assert set(d) == {"analogy", "c_alone"} and d["analogy"]["edit_source"] == "shift1:ushift1::rot13:urot13"
    written = write_report(tmp_path / "analogy", tmp_path / "analogy-report")
    assert {p.name for p in written} == {"analogy.md", "analogy.html", "analogy.png", "analogy.svg"}
    assert "shift1:ushift1::rot13:urot13" in written[0].read_text()
