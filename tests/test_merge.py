"""`mergescale merge` on the real tiny zoo: agreement with mergekit, validation, atomic output."""

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
from mergescale.errors import MergescaleError
from mergescale.orchestrator.merge import run_merge
from mergescale.specs import load_merge_spec

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


def mergekit_merge(config: dict, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mk_run_merge

    mk_run_merge(MergeConfiguration.model_validate(config), str(out), options=MergeOptions(quiet=True))


def max_rel_diff(a: Path, b: Path) -> tuple[float, str]:
    ma, mb = ModelDir(a), ModelDir(b)
    assert sorted(ma.names) == sorted(mb.names)
    worst, where = 0.0, ""
    for name in ma.names:
        x, y = ma.tensor(name).double(), mb.tensor(name).double()
        d = ((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item()
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
    }  # fmt: skip


MERGEKIT_METHODS = [
    "linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "dare_linear",
    "della", "della_linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock",
]  # fmt: skip


@pytest.mark.parametrize("method", MERGEKIT_METHODS)
def test_agrees_with_mergekit(method, tiny_zoo, tmp_path):
    config = {**configs(tiny_zoo)[method], "dtype": "float32"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    mergekit_merge(config, tmp_path / "mergekit")
    run_merge(load_merge_spec(path), tmp_path / "mergescale", progress=False)
    worst, where = max_rel_diff(tmp_path / "mergescale", tmp_path / "mergekit")
    assert worst <= 1e-4, f"{method}: max relative difference {worst:.2e} at {where}"


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


def test_same_spec_and_seed_give_the_same_bytes(tiny_zoo, tmp_path):
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


# ------------------------------------------------------------------ bad input


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


def bad_cases(zoo, tmp: Path):
    base, up = zoo.base, zoo.experts["upper"]
    q = "model.layers.1.self_attn.q_proj.weight"

    def nan(t):
        t[q][0, 0] = float("nan")

    def drop(t):
        del t[q]

    def reshape(t):
        t[q] = t[q][:, :64].contiguous()

    def pickled(path):
        torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
        return path

    return {
        "unknown method": ({"method": "tie", "base": str(base), "experts": [str(up)]}, "unknown merge method 'tie'"),
        "unknown parameter": (
            {"method": "ties", "base": str(base), "experts": [str(up)], "parameters": {"densty": 0.2}},
            "unknown parameter `densty` for method ties",
        ),
        "bad value": (
            {"method": "ties", "base": str(base), "experts": [str(up)], "parameters": {"density": 2}},
            "parameter `density` of method ties",
        ),
        "missing base": ({"method": "ties", "experts": [str(up)]}, "needs a base model: add `base:`"),
        "architecture": (
            {"method": "ties", "base": str(base),
             "experts": [str(copy_model(up, tmp / "arch", config_edit=lambda c: c.update(num_hidden_layers=5)))]},
            "num_hidden_layers = 5",
        ),
        "missing tensor": (
            {"method": "ties", "base": str(base), "experts": [str(copy_model(up, tmp / "drop", edit=drop))]},
            f"tensor {q} is missing",
        ),
        "shape": (
            {"method": "ties", "base": str(base), "experts": [str(copy_model(up, tmp / "shape", edit=reshape))]},
            f"tensor {q} has shape [128, 64]",
        ),
        "nan": (
            {"method": "ties", "base": str(base), "experts": [str(copy_model(up, tmp / "nan", edit=nan))]},
            f"tensor {q} holds NaN or Inf",
        ),
        "pickle": (
            {"method": "ties", "base": str(base), "experts": [str(pickled(copy_model(up, tmp / "pickle")))]},
            "pickled checkpoint (pytorch_model.bin) refused",
        ),
        "per-expert global": (
            {"method": "ties", "base": str(base), "experts": [{"model": str(up), "parameters": {"lambda": 2}}]},
            "experts.0.parameters.lambda",
        ),
    }  # fmt: skip


def test_bad_input_is_one_line_and_writes_nothing(tiny_zoo, tmp_path):
    cases = bad_cases(tiny_zoo, tmp_path)
    for label, (spec, message) in cases.items():
        path = tmp_path / f"{label.replace(' ', '_')}.yaml"
        path.write_text(yaml.safe_dump(spec))
        out = tmp_path / "out" / label.replace(" ", "_")
        res = subprocess.run(
            [sys.executable, "-m", "mergescale.cli", "merge", str(path), "--out", str(out), "--quiet"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert res.returncode == 2, (label, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (label, res.stderr)
        assert not out.exists(), label
    assert not list((tmp_path / "out").glob(".*staging*")) if (tmp_path / "out").exists() else True


def test_pickle_is_accepted_when_allowed(tiny_zoo, tmp_path):
    up = tiny_zoo.experts["upper"]
    src = copy_model(up, tmp_path / "pickled")
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    spec = load_merge_spec(_write(tmp_path, {"method": "linear", "experts": [str(src), str(up)]}))
    with pytest.raises(MergescaleError, match="refused"):
        run_merge(spec, tmp_path / "x", progress=False)
    run_merge(spec, tmp_path / "y", allow_pickle=True, progress=False)
    got = ModelDir(tmp_path / "y").tensor("lm_head.weight")
    assert torch.equal(got, ModelDir(up).tensor("lm_head.weight"))


def test_vocabulary_rows_beyond_the_common_ones_come_from_the_model_that_has_them(tiny_zoo, tmp_path):
    emb = "model.embed_tokens.weight"
    extra = torch.randn(3, 128)

    def grow(t):
        t[emb] = torch.cat([t[emb], extra])
        t["lm_head.weight"] = torch.cat([t["lm_head.weight"], extra])

    big = copy_model(tiny_zoo.experts["upper"], tmp_path / "big", edit=grow,
                     config_edit=lambda c: c.update(vocab_size=c["vocab_size"] + 3))  # fmt: skip
    spec = {"method": "task_arithmetic", "base": str(tiny_zoo.base),
            "experts": [str(big), str(tiny_zoo.experts["digit"])]}  # fmt: skip
    run_merge(load_merge_spec(_write(tmp_path, spec)), tmp_path / "out", progress=False)
    out = ModelDir(tmp_path / "out")
    rows = ModelDir(tiny_zoo.base).shape(emb)[0]
    assert out.shape(emb)[0] == rows + 3 and out.config["vocab_size"] == rows + 3
    assert torch.equal(out.tensor(emb)[rows:], extra)
    base = ModelDir(tiny_zoo.base).tensor(emb)
    want = base + (ModelDir(big).tensor(emb)[:rows] - base) + (ModelDir(tiny_zoo.experts["digit"]).tensor(emb) - base)
    assert torch.allclose(out.tensor(emb)[:rows], want, atol=1e-6)


def test_output_directory_is_never_overwritten(tiny_zoo, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    spec = load_merge_spec(_write(tmp_path, {"method": "linear", "experts": [str(tiny_zoo.experts["upper"])]}))
    with pytest.raises(MergescaleError, match="exists and is not empty"):
        run_merge(spec, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"


def _write(tmp: Path, spec: dict) -> Path:
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_reduce_map_methods_on_the_zoo(tiny_zoo, tmp_path):
    base = ModelDir(tiny_zoo.base)
    experts = [ModelDir(tiny_zoo.experts[t]) for t in ("upper", "digit")]
    names = base.names
    sq = [sum(float((e.tensor(n).double() - base.tensor(n).double()).square().sum()) for n in names) for e in experts]
    lam = [s / sum(sq) for s in sq]
    spec = {"method": "metagpt", "base": str(base.path), "experts": [str(e.path) for e in experts]}
    run_merge(load_merge_spec(_write(tmp_path, spec)), tmp_path / "metagpt", progress=False)
    out = ModelDir(tmp_path / "metagpt")
    for n in names:
        want = base.tensor(n) + sum(w * (e.tensor(n) - base.tensor(n)) for w, e in zip(lam, experts, strict=True))
        assert torch.allclose(out.tensor(n), want, atol=1e-6), n

    # TIES with scope: global keeps exactly int(d * N) entries of the whole task vector
    spec = {"method": "ties", "base": str(base.path), "experts": [str(experts[0].path)],
            "parameters": {"density": 0.1, "scope": "global"}}  # fmt: skip
    run_merge(load_merge_spec(_write(tmp_path, spec)), tmp_path / "ties", progress=False)
    out = ModelDir(tmp_path / "ties")
    total = sum(base.tensor(n).numel() for n in names)
    kept = sum(int((out.tensor(n) != base.tensor(n)).sum()) for n in names)
    assert kept == int(0.1 * total)

    spec = {"method": "awd", "base": str(base.path), "experts": [str(e.path) for e in experts],
            "parameters": {"steps": 20, "lambda": 0.5}}  # fmt: skip
    run_merge(load_merge_spec(_write(tmp_path, spec)), tmp_path / "awd", progress=False)
    assert all(torch.isfinite(ModelDir(tmp_path / "awd").tensor(n)).all() for n in names)


def test_examples_run_as_documented(tiny_zoo, tmp_path, monkeypatch):
    """The README's merge examples, run from a checkout whose zoo/ is the tiny zoo."""
    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "examples", tmp_path / "examples")
    (tmp_path / "zoo").symlink_to(tiny_zoo.root)
    monkeypatch.chdir(tmp_path)
    for example in ("merge_ties", "mergekit_slerp"):
        spec = load_merge_spec(Path("examples") / f"{example}.yaml")
        out = run_merge(spec, Path("merged") / example, progress=False).path
        assert (out / "model.safetensors.index.json").is_file()
