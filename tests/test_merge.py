"""`mergescale merge`: agreement with mergekit, determinism and atomic output on the real tiny zoo (Ray);
bad input on tiny hand-written models, refused at planning before Ray starts (the fast tier)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergescale.checkpoints import ModelDir
from mergescale.cli import main
from mergescale.errors import ModelError, SpecError
from mergescale.orchestrator.merge import run_merge
from mergescale.specs import load_merge_spec
from mergescale.zoo.synthetic import qwen2_tensors


def mergekit_merge(config: dict, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mk_run_merge

    mk_run_merge(MergeConfiguration.model_validate(config), str(out), options=MergeOptions(quiet=True))


def rel_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """The largest difference of ``x`` from ``y``, relative to ``y``'s largest magnitude."""
    x, y = x.double(), y.double()
    return ((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item()


def max_rel_diff(a: Path, b: Path) -> tuple[float, str]:
    ma, mb = ModelDir(a), ModelDir(b)
    assert sorted(ma.names) == sorted(mb.names)
    worst, where = 0.0, ""
    for name in ma.names:
        d = rel_diff(ma.tensor(name), mb.tensor(name))
        if d > worst:
            worst, where = d, name
    return worst, where


def configs(zoo) -> dict[str, dict]:
    b = str(zoo.base)
    e = {k: str(v) for k, v in zoo.experts.items()}

    def models(names, **per):
        return [{"model": e[n], "parameters": {k: v[i] for k, v in per.items()}} for i, n in enumerate(names)]

    three = ["upper", "shift1", "atbash"]
    return {
        "linear": {
            "merge_method": "linear", "base_model": b,
            "models": [{"model": b, "parameters": {"weight": 0.5}}, *models(["upper", "rot13"], weight=[1.0, 2.0])],
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic", "base_model": b,
            "models": models(three, weight=[1.0, 0.5, -0.3]), "parameters": {"lambda": 0.7},
        },
        "ties": {
            "merge_method": "ties", "base_model": b,
            "models": models(three, weight=[1.0, 0.8, 0.6], density=[0.3, 0.5, 0.2]),
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs", "base_model": b,
            "models": models(three, weight=[1.0, 1.0, 1.0]), "parameters": {"density": 0.8, "gamma": 0.05},
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties", "base_model": b,
            "models": models(three, weight=[1.0, 1.0, 1.0]), "parameters": {"density": 0.8, "gamma": 0.05},
        },
        "dare_ties": {
            "merge_method": "dare_ties", "base_model": b,
            "models": models(three, weight=[1.0, 1.0, 1.0]), "parameters": {"density": 1.0},
        },
        "dare_linear": {
            "merge_method": "dare_linear", "base_model": b,
            "models": models(three, weight=[0.5, 0.5, 0.5]), "parameters": {"density": 1.0},
        },
        "della": {
            "merge_method": "della", "base_model": b,
            "models": models(three, weight=[1.0, 1.0, 1.0]), "parameters": {"density": 1.0},
        },
        "della_linear": {
            "merge_method": "della_linear", "base_model": b,
            "models": models(three, weight=[1.0, 1.0, 1.0]), "parameters": {"density": 1.0},
        },
        "slerp": {
            "merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": e["digit"]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                                 {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]}, {"value": 0.5}]},
        },
        "nuslerp": {
            "merge_method": "nuslerp", "base_model": b, "models": models(["upper", "digit"], weight=[1.0, 3.0]),
        },
        "multislerp": {"merge_method": "multislerp", "base_model": b, "models": models(three, weight=[1.0, 2.0, 1.0])},
        "karcher": {"merge_method": "karcher", "models": models(three)},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "models": models(three)},
        "sce": {"merge_method": "sce", "base_model": b, "models": models(three), "parameters": {"select_topk": 0.4}},
        "nearswap": {"merge_method": "nearswap", "base_model": b, "models": [{"model": b}, {"model": e["digit"]}],
                     "parameters": {"t": 0.001}},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": b,
                         "models": [{"model": b}, {"model": e["rot13"]}]},
        "ram": {"merge_method": "ram", "base_model": b, "models": models(three), "parameters": {"epsilon": 1e-3}},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": b, "models": models(three),
                       "parameters": {"r": 0.5, "alpha": 0.8, "epsilon": 1e-3}},
    }  # fmt: skip


MERGEKIT_METHODS = [
    "linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "dare_linear",
    "della", "della_linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce", "nearswap",
    "arcee_fusion", "ram", "ramplus_tl",
]  # fmt: skip


@pytest.mark.zoo
@pytest.mark.ray
@pytest.mark.parametrize("method", MERGEKIT_METHODS)
def test_agrees_with_mergekit(method, tiny_zoo, ray_session, tmp_path):
    config = {**configs(tiny_zoo)[method], "dtype": "float32"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    mergekit_merge(config, tmp_path / "mergekit")
    run_merge(load_merge_spec(path), tmp_path / "mergescale", progress=False)
    if method == "ties":
        assert_equal_but_for_boundary_ties(config, tmp_path / "mergescale", tmp_path / "mergekit")
        return
    worst, where = max_rel_diff(tmp_path / "mergescale", tmp_path / "mergekit")
    assert worst <= 1e-4, f"{method}: max relative difference {worst:.2e} at {where}"


def bf16_ulp(y: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at each element of ``y``."""
    return torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(y.float().abs().clamp(min=1e-30))))


def assert_equal_but_for_boundary_ties(config: dict, ours: Path, theirs: Path) -> None:
    """TIES agrees with mergekit within 1e-4 everywhere except where an expert's task vector has several
    elements of exactly the k-th largest magnitude: both keep exactly k, but mergekit keeps the ones its
    unstable argsort lists first and mergescale the lowest flat indices (docs/ALGORITHMS.md#ties).  Which
    zoo tensors have such ties depends on the host that trained the zoo.  bf16 outputs: within one bf16 unit
    (the last rounding) rather than 1e-4."""
    base = ModelDir(config["base_model"])
    experts = [(ModelDir(m["model"]), m["parameters"]) for m in config["models"]]
    ma, mb = ModelDir(ours), ModelDir(theirs)
    for name in ma.names:
        x, y = ma.tensor(name).double(), mb.tensor(name).double()
        slack = bf16_ulp(y) if mb.dtype(name) == torch.bfloat16 else 1e-4 * y.abs().max().clamp(min=1e-12)
        off = (x - y).abs() > slack
        if not off.any():
            continue
        tied = torch.zeros_like(off)
        b = base.tensor(name).float()
        vote, scale = torch.zeros_like(b), torch.zeros_like(b)
        for model, params in experts:
            tau = model.tensor(name).float() - b
            mag = tau.abs()
            k = int(params["density"] * mag.numel())
            thr = mag.reshape(-1).sort(descending=True).values[k - 1]
            if int((mag > thr).sum()) < k < int((mag >= thr).sum()):  # the k-th magnitude is shared
                tied |= mag == thr
            kept = tau * (mag >= thr) * params.get("weight", 1.0)
            vote, scale = vote + kept, scale + kept.abs()
        # and where the elected sign's vote Σ w·τ' is zero but for fp32 rounding (bf16 inputs cancel exactly):
        # its sign then depends on the order of rounding (mergekit multiplies, then sums)
        tied |= vote.abs() <= 1e-6 * scale
        assert not (off & ~tied).any(), f"ties: {name} differs from mergekit away from a top-k or sign tie"



@pytest.mark.zoo  # the CLI subprocess merges in its own process: a one-off merge starts no Ray
def test_merged_model_is_a_working_hugging_face_model(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergescale.eval.greedy import score_tasks
    from mergescale.zoo.tasks import get_task

    spec = {
        "method": "task_arithmetic",
        "base": str(tiny_zoo.base),
        "experts": [str(tiny_zoo.experts["upper"]), str(tiny_zoo.experts["rot13"])],
        "parameters": {"lambda": 0.5},
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = subprocess.run(
        [sys.executable, "-m", "mergescale.cli", "merge", str(path), "--out", str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    card = (out / "README.md").read_text()
    assert "task_arithmetic" in card and str(tiny_zoo.experts["rot13"]) in card and "sha256" in card.lower()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    scores = score_tasks(model, tok, {t: get_task(t).examples("test", 50) for t in ("upper", "rot13", "copy")})
    assert scores["upper"].exact_match >= 0.5 and scores["rot13"].exact_match >= 0.5, scores
    assert scores["copy"].exact_match >= 0.9, scores


@pytest.mark.zoo
@pytest.mark.ray
def test_same_spec_and_seed_give_the_same_bytes(tiny_zoo, ray_session, tmp_path):
    spec = {
        "method": "dare_ties", "base": str(tiny_zoo.base), "seed": 3,
        "experts": [str(tiny_zoo.experts[t]) for t in ("upper", "digit", "pairswap")],
    }  # fmt: skip
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(spec))
    for out in ("a", "b"):
        run_merge(load_merge_spec(path), tmp_path / out, progress=False)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    spec["seed"] = 4
    path.write_text(yaml.safe_dump(spec))
    run_merge(load_merge_spec(path), tmp_path / "c", progress=False)
    shard = next(f for f in files if f.startswith("model-00002"))
    a, c = load_file(tmp_path / "a" / shard), load_file(tmp_path / "c" / shard)
    assert any(not torch.equal(a[k], c[k]) for k in a), "another seed must draw other DARE masks"


# ------------------------------------------------------------------ tiny hand-written models

TINY = {"vocab_size": 32, "hidden_size": 8, "num_hidden_layers": 2, "intermediate_size": 16,
        "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
Q = "model.layers.1.self_attn.q_proj.weight"  # (8, 8)
SPEC = "merge.yaml"


def tiny_model(path: Path, seed: int) -> Path:
    """A Qwen2-layout model directory of random fp32 weights: config.json and one model.safetensors."""
    gen = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    tensors = {n: 0.02 * torch.randn(s, generator=gen) for n, s in qwen2_tensors(TINY).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": "float32", **TINY}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny base and two experts (each its own random weights)."""
    root = tmp_path_factory.mktemp("tiny")
    return tiny_model(root / "base", 0), tiny_model(root / "a", 1), tiny_model(root / "b", 2)


def copy_model(src: Path, dst: Path, edit=None, config_edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit:
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def pickled(path: Path) -> Path:
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return path


def write_spec(tmp: Path, spec: dict | str) -> Path:
    path = tmp / SPEC
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    return path


def ties(base: Path | None, *experts, **parameters) -> dict:
    return {"method": "ties", "experts": [str(e) for e in experts], "parameters": parameters} | (
        {"base": str(base)} if base else {}
    )


def assert_refused(spec: Path, out: Path, error: type, message: str, capfd) -> None:
    """Merging ``spec`` into ``out`` raises ``error`` naming ``message``; the CLI prints that error as one line
    (besides the line naming its log) and exits 2; and nothing is left beside ``out`` but the CLI's log:
    no output, no staging directory."""
    before = set(out.parent.rglob("*"))
    with pytest.raises(error) as err:
        run_merge(load_merge_spec(spec), out, progress=False)
    assert message in str(err.value)
    capfd.readouterr()  # what the CLI prints, only
    assert main(["merge", str(spec), "--out", str(out), "--quiet"]) == 2
    printed = capfd.readouterr()
    assert [line for line in printed.err.splitlines() if not line.startswith("log: ")] == [
        f"mergescale: error: {err.value}"
    ]
    assert printed.out == ""
    assert not list(out.parent.glob(f".{out.name}.staging-*")), "a staging directory was left behind"
    assert set(out.parent.rglob("*")) - before <= {out.with_name(out.name + ".log")}, "the merge left files behind"


# ------------------------------------------------------------------ bad input


def _drop(t):
    del t[Q]


def _reshape(t):
    t[Q] = t[Q][:, :4].contiguous()


def _nan(t):
    t[Q][0, 0] = float("nan")


def _inf(t):
    t[Q][3, 5] = float("-inf")


def _huge(t):
    t[Q][2, 2] = 3e38  # finite in fp32 (max 3.4e38); twice it is not


def _method(method: str, base: Path | None, *experts, **parameters) -> dict:
    return {**ties(base, *experts, **parameters), "method": method}


#: bad input -> (base, expert, tmp) -> (the spec, or its YAML text; the error; what its message names)
BAD_INPUTS = {
    "missing-model-dir": lambda b, e, tmp: (
        ties(b, tmp / "nowhere"), ModelError, f"{tmp / 'nowhere'}: no such model directory"),
    "malformed-yaml": lambda b, e, tmp: (
        "method: ties\nbase: b\n  experts: [a]\n", SpecError, f"{tmp / SPEC}: line 3 is not valid YAML"),
    "unknown-key": lambda b, e, tmp: (
        f"method: ties\nbase: {b}\nexperts: [{e}]\nsed: 3\n", SpecError, f"{tmp / SPEC}:4: key `sed`"),
    "unknown-method": lambda b, e, tmp: (
        {**ties(b, e), "method": "tie"}, SpecError, "unknown merge method 'tie'"),
    "unknown-parameter": lambda b, e, tmp: (
        ties(b, e, densty=0.2), SpecError, "unknown parameter `densty` for method ties"),
    "bad-value": lambda b, e, tmp: (
        ties(b, e, density=2), SpecError, "parameter `density` of method ties (tensor "),
    "missing-base": lambda b, e, tmp: (
        ties(None, e), SpecError, "method ties needs a base model: add `base:`"),
    "per-expert-global": lambda b, e, tmp: (
        {**ties(b), "experts": [{"model": str(e), "parameters": {"lambda": 2}}]}, SpecError,
        "experts.0.parameters.lambda"),
    "architecture": lambda b, e, tmp: (
        ties(b, copy_model(e, tmp / "arch", config_edit=lambda c: c.update(num_hidden_layers=5))), ModelError,
        f"{tmp / 'arch'}/config.json: num_hidden_layers = 5 but {b} has 2"),
    "missing-tensor": lambda b, e, tmp: (
        ties(b, copy_model(e, tmp / "drop", edit=_drop)), ModelError, f"{tmp / 'drop'}: tensor {Q} is missing"),
    "shape": lambda b, e, tmp: (
        ties(b, copy_model(e, tmp / "shape", edit=_reshape)), ModelError,
        f"{tmp / 'shape'}: tensor {Q} has shape [8, 4] but {b} has [8, 8]"),
    "pickle": lambda b, e, tmp: (
        ties(b, pickled(copy_model(e, tmp / "pickle"))), ModelError,
        f"{tmp / 'pickle'}: pickled checkpoint (pytorch_model.bin) refused"),
    # planning reads headers only: the shard that reads the tensor finds it, and the merge publishes nothing
    "nan": lambda b, e, tmp: (
        ties(b, copy_model(e, tmp / "nan", edit=_nan)), ModelError,
        f"{tmp / 'nan' / 'model.safetensors'}: tensor {Q} holds NaN or Inf"),
    # task arithmetic and linear too: an Inf, a NaN in an expert of weight 0, an Inf in the base
    "inf-task-arithmetic": lambda b, e, tmp: (
        _method("task_arithmetic", b, copy_model(e, tmp / "inf", edit=_inf)), ModelError,
        f"{tmp / 'inf' / 'model.safetensors'}: tensor {Q} holds NaN or Inf"),
    "nan-linear-weight-0": lambda b, e, tmp: (
        {"method": "linear", "experts": [str(b), {"model": str(copy_model(e, tmp / "nan", edit=_nan)),
                                                  "parameters": {"weight": 0.0}}]}, ModelError,
        f"{tmp / 'nan' / 'model.safetensors'}: tensor {Q} holds NaN or Inf"),
    "inf-in-the-base": lambda b, e, tmp: (
        _method("task_arithmetic", copy_model(b, tmp / "infbase", edit=_inf), e), ModelError,
        f"{tmp / 'infbase' / 'model.safetensors'}: tensor {Q} holds NaN or Inf"),
    # task arithmetic checks its result, not its inputs (Method.nonfinite_propagates): finite inputs whose
    # merge overflows fp32 are refused too, naming the tensor, instead of writing Inf
    "inf-task-arithmetic-weight-0-lambda-0": lambda b, e, tmp: (
        {"method": "task_arithmetic", "base": str(b), "parameters": {"lambda": 0.0},
         "experts": [str(e), {"model": str(copy_model(e, tmp / "inf0", edit=_inf)), "parameters": {"weight": 0.0}}]},
        ModelError, f"{tmp / 'inf0' / 'model.safetensors'}: tensor {Q} holds NaN or Inf"),
    "overflow-task-arithmetic": lambda b, e, tmp: (
        _method("task_arithmetic", b, copy_model(e, tmp / "huge", edit=_huge), **{"lambda": 2.0}), ModelError,
        f"tensor {Q}: the task_arithmetic merge overflows float32"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(case, tiny, tmp_path, capfd):
    spec, error, message = BAD_INPUTS[case](tiny[0], tiny[1], tmp_path)
    out = tmp_path / "outputs" / "merged"
    out.parent.mkdir()
    assert_refused(write_spec(tmp_path, spec), out, error, message, capfd)
    assert not out.exists()


def test_output_directory_is_never_overwritten(tiny, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    spec = write_spec(tmp_path, {"method": "linear", "experts": [str(tiny[1])]})
    assert_refused(spec, out, ModelError, f"{out} exists and is not empty", capfd)
    assert (out / "mine.txt").read_text() == "keep"


def test_pickle_is_accepted_when_allowed(tiny, tmp_path):
    expert = tiny[1]
    src = pickled(copy_model(expert, tmp_path / "pickled"))
    spec = load_merge_spec(write_spec(tmp_path, {"method": "linear", "experts": [str(src), str(expert)]}))
    run_merge(spec, tmp_path / "y", allow_pickle=True, progress=False)
    got, want = ModelDir(tmp_path / "y"), ModelDir(expert)
    assert sorted(got.names) == sorted(want.names)
    for name in want.names:  # the average of a model with itself
        assert torch.equal(got.tensor(name), want.tensor(name)), name


def test_vocabulary_rows_beyond_the_common_ones_come_from_the_model_that_has_them(tiny, tmp_path):
    base, a, b = (ModelDir(p) for p in tiny)
    emb = "model.embed_tokens.weight"
    extra = torch.randn(3, TINY["hidden_size"], generator=torch.Generator().manual_seed(3))

    def grow(t):
        t[emb] = torch.cat([t[emb], extra])
        t["lm_head.weight"] = torch.cat([t["lm_head.weight"], extra])

    big = ModelDir(copy_model(a.path, tmp_path / "big", edit=grow,
                              config_edit=lambda c: c.update(vocab_size=c["vocab_size"] + 3)))  # fmt: skip
    spec = {"method": "task_arithmetic", "base": str(base.path), "experts": [str(big.path), str(b.path)]}
    run_merge(load_merge_spec(write_spec(tmp_path, spec)), tmp_path / "out", progress=False)
    out = ModelDir(tmp_path / "out")
    rows = TINY["vocab_size"]
    assert out.shape(emb)[0] == rows + 3 and out.config["vocab_size"] == rows + 3
    assert torch.equal(out.tensor(emb)[rows:], extra)
    want = base.tensor(emb) + (big.tensor(emb)[:rows] - base.tensor(emb)) + (b.tensor(emb) - base.tensor(emb))
    assert torch.allclose(out.tensor(emb)[:rows], want, atol=1e-6)


# ------------------------------------------------------------------ reduce → map on the zoo


@pytest.mark.zoo
@pytest.mark.ray
def test_reduce_map_methods_on_the_zoo(tiny_zoo, ray_session, tmp_path):
    base = ModelDir(tiny_zoo.base)
    experts = [ModelDir(tiny_zoo.experts[t]) for t in ("upper", "digit")]
    names = base.names
    sq = [sum(float((e.tensor(n).double() - base.tensor(n).double()).square().sum()) for n in names) for e in experts]
    lam = [s / sum(sq) for s in sq]
    spec = {"method": "metagpt", "base": str(base.path), "experts": [str(e.path) for e in experts]}
    run_merge(load_merge_spec(write_spec(tmp_path, spec)), tmp_path / "metagpt", progress=False)
    out = ModelDir(tmp_path / "metagpt")
    for n in names:
        want = base.tensor(n) + sum(w * (e.tensor(n) - base.tensor(n)) for w, e in zip(lam, experts, strict=True))
        assert torch.allclose(out.tensor(n), want, atol=1e-6), n

    # TIES with scope: global keeps exactly int(d * N) entries of the whole task vector
    spec = {"method": "ties", "base": str(base.path), "experts": [str(experts[0].path)],
            "parameters": {"density": 0.1, "scope": "global"}}  # fmt: skip
    run_merge(load_merge_spec(write_spec(tmp_path, spec)), tmp_path / "ties", progress=False)
    out = ModelDir(tmp_path / "ties")
    total = sum(base.tensor(n).numel() for n in names)
    kept = sum(int((out.tensor(n) != base.tensor(n)).sum()) for n in names)
    assert kept == int(0.1 * total)

    # AWD subtracts one vector δ (over the whole model) from both task vectors: out − θ0 = λ (τ1 + τ2 − 2δ).
    # δ read back from the merge is not 0 and makes the two task vectors more orthogonal.
    spec = {"method": "awd", "base": str(base.path), "experts": [str(e.path) for e in experts],
            "parameters": {"lambda": 0.5}}  # fmt: skip
    run_merge(load_merge_spec(write_spec(tmp_path, spec)), tmp_path / "awd", progress=False)
    out = ModelDir(tmp_path / "awd")

    def flat(model: ModelDir) -> torch.Tensor:
        return torch.cat([(model.tensor(n).double() - base.tensor(n).double()).reshape(-1) for n in names])

    taus = [flat(e) for e in experts]
    delta = (taus[0] + taus[1] - flat(out) / 0.5) / 2
    cos = torch.nn.functional.cosine_similarity
    before, after = abs(float(cos(*taus, dim=0))), abs(float(cos(taus[0] - delta, taus[1] - delta, dim=0)))
    assert float(delta.norm()) > 1e-3 * float(taus[0].norm()), "AWD removed nothing"
    assert after < 0.5 * before, (before, after)


@pytest.mark.zoo
@pytest.mark.ray
def test_examples_run_as_documented(tiny_zoo, ray_session, tmp_path, monkeypatch):
    """The README's merge examples, run from a checkout whose zoo/ is the tiny zoo."""
    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "examples", tmp_path / "examples")
    (tmp_path / "zoo").symlink_to(tiny_zoo.root)
    monkeypatch.chdir(tmp_path)
    examples = (("merge_ties", "ties global"), ("mergekit_slerp", "slerp"), ("mergekit_stack", "passthrough"))
    for example, label in examples:
        spec = load_merge_spec(Path("examples") / f"{example}.yaml")
        out = run_merge(spec, Path("merged") / example, progress=False).path
        assert f"using **{label}**" in (out / "README.md").read_text(), example  # the card says what ran
        if example == "mergekit_stack":  # 6 layers: the base's tensors with layers 4 and 5 added
            assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
            names = ModelDir(out).names
            assert {n.replace("layers.4.", "layers.0.").replace("layers.5.", "layers.1.") for n in names} == set(
                ModelDir(tiny_zoo.base).names
            )
            continue
        assert sorted(ModelDir(out).names) == sorted(ModelDir(tiny_zoo.base).names), example
