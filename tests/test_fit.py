"""Data-driven methods on the real tiny zoo: the fit's mathematics checked against independent
computations, its reproducibility, and the methods end to end (CLI, Ray fit task, vLLM references)."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergescale.errors import MergescaleError
from mergescale.eval.evaluator import Evaluator
from mergescale.fit.data import read_examples, task_prompts
from mergescale.fit.divmerge import DivMerge, divergences
from mergescale.fit.method import ExpertData, FitInputs
from mergescale.fit.model import Batch, TaskVectors, load_module, pad_id, read_tensors, weight_names
from mergescale.fit.regmean import regmean
from mergescale.fit.slta import SLTA, non_linearity_score, projection_distance
from mergescale.specs import MergeSpec

MERGESCALE = Path(sys.executable).parent / "mergescale"
TASKS = ("upper", "shift1")


@pytest.fixture(scope="module")
def hf_evaluator():
    """A real evaluator (transformers backend, in this process) writing the experts' reference files."""
    return Evaluator(backend="hf", threads=2)


def _data(evaluator, tmp: Path, model: Path, task: str, count: int, seed: int = 0) -> ExpertData:
    prompts, cap = task_prompts(f"zoo_{task}", "validation", count, seed)
    out = tmp / f"{model.name}-{task}-{count}-{seed}.safetensors"
    if not out.exists():
        evaluator.reference(str(model), prompts, cap, str(out))
    return ExpertData(f"zoo_{task}", "validation", count, len(prompts), seed, str(out), cap)


def _experts(zoo) -> list[Path]:
    return [zoo.experts[t] for t in TASKS]


@pytest.mark.zoo
@pytest.mark.engine
def test_the_divergence_is_zero_when_the_merge_is_the_expert(tiny_zoo, hf_evaluator, tmp_path):
    experts = _experts(tiny_zoo)
    tv = TaskVectors(str(tiny_zoo.base), [str(e) for e in experts], "layer")
    examples = read_examples(_data(hf_evaluator, tmp_path, experts[0], TASKS[0], 24).reference)
    pad = pad_id(tv.module)
    itself, other = torch.zeros(2, len(tv.labels)), torch.zeros(2, len(tv.labels))
    itself[0], other[1] = 1.0, 1.0
    for kind in ("js", "kl"):
        with torch.no_grad():
            same = divergences(tv, itself, examples, kind, pad)
            different = divergences(tv, other, examples, kind, pad)
        assert same.shape == (24,) and float(same.abs().max()) < 1e-6, kind
        assert float(different.mean()) > 1e-3, kind  # the loss does see a different model


@pytest.mark.zoo
@pytest.mark.engine
def test_the_js_gradient_matches_finite_differences(tiny_zoo, hf_evaluator, tmp_path):
    experts = _experts(tiny_zoo)
    tv = TaskVectors(str(tiny_zoo.base), [str(e) for e in experts], "layer")
    examples = [e for path, task in zip(experts, TASKS, strict=True)
                for e in read_examples(_data(hf_evaluator, tmp_path, path, task, 6).reference)]  # fmt: skip
    pad = pad_id(tv.module)
    gamma = (0.4 + 0.2 * torch.rand(2, len(tv.labels), generator=torch.Generator().manual_seed(1))).requires_grad_()
    loss = divergences(tv, gamma, examples, "js", pad).mean()
    (grad,) = torch.autograd.grad(loss, gamma)
    eps = 1e-2
    for k, g in [(0, 0), (1, 1), (0, len(tv.labels) - 1), (1, 2)]:
        with torch.no_grad():
            up, down = gamma.detach().clone(), gamma.detach().clone()
            up[k, g] += eps
            down[k, g] -= eps
            fd = divergences(tv, up, examples, "js", pad).mean() - divergences(tv, down, examples, "js", pad).mean()
        fd = float(fd) / (2 * eps)
        assert abs(fd) > 1e-5  # a coordinate the loss depends on
        assert math.isclose(float(grad[k, g]), fd, rel_tol=2e-2, abs_tol=1e-6), (k, g, float(grad[k, g]), fd)


def _linear_experts(zoo, tmp: Path) -> list[Path]:
    """Two experts that differ from the base only in every block's MLP down-projection: each block's
    output is then exactly linear in the coefficients of its task vectors."""
    base = load_file(str(zoo.base / "model.safetensors"))
    out = []
    for i in range(2):
        gen = torch.Generator().manual_seed(100 + i)
        tensors = {n: (t + 0.3 * t.std() * torch.randn(t.shape, generator=gen) if "down_proj" in n else t).contiguous()
                   for n, t in base.items()}  # fmt: skip
        target = tmp / f"linear-{i}"
        shutil.copytree(zoo.base, target)
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
        out.append(target)
    return out


@pytest.mark.zoo
@pytest.mark.engine
def test_slta_recovers_the_coefficients_of_a_model_exactly_linear_in_them(tiny_zoo, hf_evaluator, tmp_path):
    experts = _linear_experts(tiny_zoo, tmp_path)
    data = [_data(hf_evaluator, tmp_path, e, t, 8) for e, t in zip(experts, TASKS, strict=True)]
    inputs = FitInputs(str(tiny_zoo.base), [str(e) for e in experts], data, seed=0, workdir=str(tmp_path / "w"))
    method = SLTA()
    fit = method.fit(inputs, SLTA.Params(level="layer", count=8))
    # by hand: Δk(h) = x(h) τkᵀ where x is the down-projection's input, captured in expert t on task t
    tv = TaskVectors(str(tiny_zoo.base), [str(e) for e in experts])
    layers = tv.module.model.layers
    A = {i: torch.zeros(2, 2, dtype=torch.float64) for i in range(len(layers))}
    b = {i: torch.zeros(2, dtype=torch.float64) for i in range(len(layers))}
    name = "model.layers.{}.mlp.down_proj.weight"
    seen: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
             for i, layer in enumerate(layers)]  # fmt: skip
    for t, d in enumerate(data):
        examples = read_examples(d.reference)
        for first in range(0, len(examples), 16):
            part = examples[first : first + 16]
            batch = Batch.of([e.ids for e in part], [len(e.prompt) for e in part], pad_id(tv.module))
            with torch.no_grad():
                torch.func.functional_call(tv.module, tv.expert(t), (), {"input_ids": batch.ids,
                                           "attention_mask": batch.mask, "use_cache": False})  # fmt: skip
            for i in range(len(layers)):
                x = seen[i][batch.mask.bool()].double()
                deltas = torch.stack([(x @ tv.tau[name.format(i)][k].double().T).reshape(-1) for k in range(2)])
                A[i] += deltas @ deltas.T
                b[i] += deltas @ deltas[t]
    for h in hooks:
        h.remove()
    for i in range(len(layers)):
        rho = 1e-4 * float(A[i].diagonal().mean())
        expected = torch.linalg.solve(A[i] + rho * torch.eye(2, dtype=torch.float64), b[i])
        got = torch.tensor(fit.coefficients[name.format(i)], dtype=torch.float64)
        assert torch.allclose(got, expected, rtol=1e-4), (i, got, expected)
        assert fit.summary["submodules"][f"layer {i}"]["fit_relative_error"] < 1e-3  # exactly linear, up to fp32
    assert fit.coefficients["model.embed_tokens.weight"] == [0.5, 0.5]  # outside the blocks: λ = 1/n
    # attention and MLP apart: only the MLP moved, so its coefficients are the block's
    split = method.fit(inputs, SLTA.Params(level="attn_mlp", count=8))
    for i in range(len(layers)):
        assert split.coefficients[name.format(i)] == pytest.approx(fit.coefficients[name.format(i)], rel=1e-4)
    # on the real zoo's experts the blocks are not linear, and the score says so
    real = [_data(hf_evaluator, tmp_path, e, t, 8) for e, t in zip(_experts(tiny_zoo), TASKS, strict=True)]
    zoo_fit = method.fit(FitInputs(str(tiny_zoo.base), [str(e) for e in _experts(tiny_zoo)], real, 0, ""),
                         SLTA.Params(count=8))  # fmt: skip
    assert max(s["fit_relative_error"] for s in zoo_fit.summary["submodules"].values()) > 1e-2
    # the paper's diagnostics: only down_proj moved, and it is linear in its weight, so each layer, MLP
    # and (unmoved) attention is linear along θ0 + α τt; the full model, with later layers after it, is not
    rows = {(r["expert"], r["module"]): r for r in fit.summary["linearity"]}
    assert len(rows) == 2 * (1 + 3 * len(layers))
    for t in range(2):
        for i in range(len(layers)):
            for label in (f"layer {i}", f"layer {i} attention", f"layer {i} mlp"):
                assert rows[t, label]["non_linearity_score"] < 1e-4, (t, label, rows[t, label])
                assert rows[t, label]["projection_distance"] < 1e-4, (t, label, rows[t, label])
        assert rows[t, "model"]["non_linearity_score"] > 1e-3
    zoo_rows = zoo_fit.summary["linearity"]
    assert {r["kind"] for r in zoo_rows} == {"model", "layer", "attention", "mlp"}
    assert all(r["non_linearity_score"] > 0 and r["projection_distance"] > 0 for r in zoo_rows)
    # the paper's claim, measured on this zoo (docs/ALGORITHMS.md#slta has the numbers): every kind of
    # submodule is more linear than the full model, by both quantities
    med = zoo_fit.summary["linearity_median"]
    for kind in ("layer", "attention", "mlp"):
        for q in ("non_linearity_score", "projection_distance"):
            assert med[kind][q] < med["model"][q], (kind, q, med)


def test_non_linearity_score_and_projection_distance_by_hand():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64)  # 7 tokens
    w0, tau = (torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    alphas = [i / 4 for i in range(5)]
    # a linear layer is exactly linear in its weights: both are 0
    linear = [x @ (w0 + a * tau).T for a in alphas]
    assert non_linearity_score(linear) < 1e-12 and projection_distance(linear) < 1e-12
    # f(α) = (α, α²) on one token: the line is (α, α), off it by |α − α²|, ‖line‖ = α√2, chord (1, 1)
    curve = [torch.tensor([[a, a * a]], dtype=torch.float64) for a in alphas]
    score = [0.0] + [(a - a * a) / (a * math.sqrt(2)) for a in alphas[1:]]
    dist = [(a - a * a) / 2 for a in alphas]
    trapezoid = lambda v: (sum(v[1:-1]) + (v[0] + v[-1]) / 2) / 4  # noqa: E731
    assert non_linearity_score(curve) == pytest.approx(trapezoid(score), rel=1e-12)
    assert projection_distance(curve) == pytest.approx(trapezoid(dist), rel=1e-12)
    # moving along the chord at an uneven pace is non-linear but on the line: distance 0, score > 0
    pace = [torch.tensor([[a * a, 1.0]], dtype=torch.float64) for a in alphas]
    assert projection_distance(pace) < 1e-12 and non_linearity_score(pace) > 0.05


def test_regmean_of_one_linear_layer_is_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(50, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    ws = [torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    grams = [x.T @ x / len(x) for x in xs]
    got = regmean(ws, grams, alpha=0.1, ridge=0.0)
    # by hand: G̃ = 0.1 G + 0.9 diag(G); W* minimises Σ ‖Xi W*ᵀ − Xi Wiᵀ‖² under the shrunk Grams
    shrunk = [0.1 * g + 0.9 * torch.diag(torch.diag(g)) for g in grams]
    expected = (torch.inverse(sum(shrunk)) @ sum(g @ w.T for g, w in zip(shrunk, ws, strict=True))).T
    assert torch.allclose(got, expected, atol=1e-10)
    # alpha = 1 is RegMean without shrinkage: the exact least-squares merge of the layers' outputs
    exact = regmean(ws, grams, alpha=1.0, ridge=0.0)
    scaled_x = torch.cat([x / math.sqrt(len(x)) for x in xs])  # each expert's inputs weigh 1 / N
    scaled_y = torch.cat([x @ w.T / math.sqrt(len(x)) for x, w in zip(xs, ws, strict=True)])
    lstsq = torch.linalg.lstsq(scaled_x, scaled_y).solution.T
    assert torch.allclose(exact, lstsq, atol=1e-8)


@pytest.mark.zoo
@pytest.mark.ray
@pytest.mark.engine
def test_regmean_merges_the_zoo_with_grams_of_the_experts_inputs(tiny_zoo, ray_session, hf_evaluator, tmp_path):
    """End to end (Ray fit task, references decoded by an evaluator actor): a merged linear layer equals
    the closed form from Gram matrices computed here, independently, from the same documents."""
    from mergescale.orchestrator.merge import run_merge

    experts = _experts(tiny_zoo)
    spec = MergeSpec.model_validate({
        "method": "regmean", "parameters": {"count": 12, "backend": "hf"},
        "experts": [{"model": str(e), "task": f"zoo_{t}"} for e, t in zip(experts, TASKS, strict=True)],
    })  # fmt: skip
    out = tmp_path / "out"
    run_merge(spec, out, progress=False)
    merged = {}
    for f in out.glob("model-*.safetensors"):
        merged |= load_file(str(f))
    record = json.loads((out / "fit.json").read_text())
    assert [(d["task"], d["split"], d["count"], d["seed"]) for d in record["data"]] == [
        ("zoo_upper", "validation", 12, 0), ("zoo_shift1", "validation", 12, 0)]  # fmt: skip
    assert "`zoo_upper` validation: 12 documents" in (out / "README.md").read_text()
    name = "model.layers.1.mlp.up_proj.weight"
    module = load_module(str(experts[0]))
    grams, weights, norms = [], [], []
    for path, task in zip(experts, TASKS, strict=True):
        examples = read_examples(_data(hf_evaluator, tmp_path, path, task, 12).reference)
        batch = Batch.of([e.ids for e in examples], [len(e.prompt) for e in examples], 0)
        params = read_tensors(str(path), weight_names(module, str(path)))
        seen = []
        hook = module.model.layers[1].mlp.up_proj.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0]))
        with torch.no_grad():
            torch.func.functional_call(module, params, (), {"input_ids": batch.ids, "attention_mask": batch.mask,
                                                            "use_cache": False})  # fmt: skip
        hook.remove()
        x = seen[0][batch.mask.bool()].double()
        grams.append(x.T @ x / len(x))
        weights.append(params[name].double())
        norms.append(params["model.layers.1.input_layernorm.weight"])
    shrunk = [0.1 * g + 0.9 * torch.diag(torch.diag(g)) for g in grams]
    total = sum(shrunk)
    total = total + 1e-6 * float(torch.diagonal(total).mean()) * torch.eye(len(total), dtype=torch.float64)
    expected = (torch.inverse(total) @ sum(g @ w.T for g, w in zip(shrunk, weights, strict=True))).T
    assert torch.allclose(merged[name].double(), expected, atol=1e-5)
    assert not torch.allclose(merged[name], (weights[0] + weights[1]).float() / 2, atol=1e-4)  # not an average
    # a tensor outside the linear layers is the plain average
    assert torch.allclose(merged["model.layers.1.input_layernorm.weight"], (norms[0] + norms[1]) / 2)


@pytest.mark.zoo
@pytest.mark.engine
def test_a_fit_is_reproducible_for_a_seed(tiny_zoo, hf_evaluator, tmp_path):
    experts = _experts(tiny_zoo)

    def fit(seed):
        data = [_data(hf_evaluator, tmp_path, e, t, 12, seed) for e, t in zip(experts, TASKS, strict=True)]
        inputs = FitInputs(str(tiny_zoo.base), [str(e) for e in experts], data, seed=seed, workdir="")
        return DivMerge().fit(inputs, DivMerge.Params(level="layer", count=12, epochs=2, batch=4))

    first, again, other = fit(0), fit(0), fit(1)
    assert len(first.log) == 2 * 3 and all(len(s["coefficients"]) == 2 for s in first.log)
    assert first.log == again.log and first.coefficients == again.coefficients
    assert first.log[0]["coefficients"] != [[0.5] * 6] * 2  # Adam moved the coefficients
    assert other.log != first.log  # another seed draws other documents in another order


@pytest.mark.zoo
def test_data_driven_specs_fail_early_with_the_key_and_the_fix(tiny_zoo):
    from mergescale.orchestrator.plan import plan_merge

    experts = _experts(tiny_zoo)
    spec = MergeSpec.model_validate({"method": "divmerge", "base": str(tiny_zoo.base),
                                     "experts": [str(e) for e in experts]})  # fmt: skip
    with pytest.raises(MergescaleError, match=r"experts\.0: method divmerge fits on data of each expert's task"):
        plan_merge(spec)
    with pytest.raises(MergescaleError, match="task zoo_upper has no train split"):
        task_prompts("zoo_upper", "train", 4, 0)
    spec = MergeSpec.model_validate({"method": "divmerge", "base": str(tiny_zoo.base), "parameters": {"split": "test"},
                                     "experts": [{"model": str(e), "task": "zoo_upper"} for e in experts]})  # fmt: skip
    with pytest.raises(MergescaleError, match="parameter `split` of method divmerge"):
        plan_merge(spec)


@pytest.mark.zoo
@pytest.mark.ray
@pytest.mark.engine
def test_divmerge_from_the_cli_with_vllm_references_records_every_step(tiny_zoo, tmp_path):
    raw = {"method": "divmerge", "base": str(tiny_zoo.base), "seed": 3,
           "experts": [{"model": str(e), "task": f"zoo_{t}"} for e, t in zip(_experts(tiny_zoo), TASKS, strict=True)],
           "parameters": {"level": "layer", "count": 16, "epochs": 2, "batch": 4}}  # fmt: skip
    (tmp_path / "divmerge.yaml").write_text(yaml.safe_dump(raw))
    for out in ("a", "b"):
        res = subprocess.run([str(MERGESCALE), "merge", str(tmp_path / "divmerge.yaml"), "--out", str(tmp_path / out)],
                             capture_output=True, text=True, timeout=900)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        assert "divmerge fit in" in res.stderr and "16 zoo_upper/validation" in res.stderr
    record = json.loads((tmp_path / "a" / "fit.json").read_text())
    assert len(record["log"]) == 2 * 4  # epochs × ceil(16 / 4)
    assert all(math.isfinite(s["loss"]) and len(s["coefficients"]) == 2 for s in record["log"])
    assert record["summary"]["loss_final"] < record["summary"]["loss_initial"]  # the fit lowered the divergence
    assert set(record["summary"]["coefficients"]) == {"embedding", "layer 0", "layer 1", "layer 2", "layer 3", "head"}
    card = (tmp_path / "a" / "README.md").read_text()
    assert "## Data-driven fit" in card and "`zoo_shift1` validation: 16 documents (asked 16), seed 3" in card
    # same spec and seed, same bytes (the second run reused the cached expert continuations)
    for f in sorted((tmp_path / "a").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


@pytest.mark.zoo
@pytest.mark.ray
@pytest.mark.engine
def test_every_data_driven_method_runs_inside_a_study_and_records_its_data_and_coefficients(
    tiny_zoo, ray_session, tmp_path
):
    from mergescale.orchestrator import results as store
    from mergescale.orchestrator.study import run_study
    from mergescale.specs import load_study_spec

    small = {"count": 8}
    raw = {
        "name": "fit-study", "zoo": {"preset": "tiny", "seed": 0}, "base": "zoo:base",
        "experts": {"upper": "zoo:upper", "shift1": "zoo:shift1"}, "subsets": {"sizes": [2]},
        "methods": [
            {"method": "divmerge", "parameters": {**small, "epochs": 1, "level": "layer"}},
            {"method": "adamerging", "parameters": {**small, "steps": 3}},
            {"method": "slta", "parameters": {**small, "level": "attn_mlp"}},
            {"method": "regmean", "parameters": small},
            {"method": "fisher", "parameters": small},
        ],
        "eval": {"held_out": ["zoo_copy"], "limit": 10}, "resources": {"merge_workers": 1, "eval_threads": 1},
        "results": "res",
    }  # fmt: skip
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = run_study(load_study_spec(path), path, progress=False)
    assert (run.jobs, run.ran) == (5, 5)
    rows = [r for r in store.read_results(tmp_path / "res").to_pylist() if r["job_kind"] == "merge"]
    fits = {r["method"]: json.loads(r["fit"]) for r in rows}
    assert set(fits) == {"divmerge", "adamerging", "slta", "regmean", "fisher"}
    for method, fit in fits.items():
        assert [(d["task"], d["split"], d["count"], d["seed"]) for d in fit["data"]] == [
            ("zoo_upper", "validation", 8, 0), ("zoo_shift1", "validation", 8, 0)], method  # fmt: skip
        assert fit["seconds"] > 0
    assert len(fits["divmerge"]["summary"]["coefficients"]["layer 2"]) == 2
    assert fits["adamerging"]["summary"]["steps"] == 3
    assert {"layer 0 attention", "layer 0 mlp"} <= set(fits["slta"]["summary"]["submodules"])
    assert len(fits["fisher"]["summary"]["fisher_trace"]) == 2
    key = next(r["job_key"] for r in rows if r["method"] == "divmerge")
    record = json.loads((tmp_path / "res" / store.FITS / f"{key}.json").read_text())
    assert len(record["log"]) == 2 and "coefficients" in record["log"][0]  # every step, in the store
    assert all(r["fit"] is None for r in store.read_results(tmp_path / "res").to_pylist() if r["job_kind"] != "merge")
    # the report draws the loss and coefficients of the fits that logged steps
    from mergescale.orchestrator.report import write_report

    written = {p.name for p in write_report(tmp_path / "res", tmp_path / "report")}
    assert {"fits.png", "fits.svg"} <= written
    assert "## Data-driven fits" in (tmp_path / "report" / "leaderboard.md").read_text()
