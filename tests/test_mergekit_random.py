"""Agreement with mergekit 0.1.5 beyond the zoo: the same mergekit YAML on random fp32 Qwen2-layout models
of a square (hidden 256, the shape where breadcrumbs once differed) and an odd, non-square shape; stacks of
layer ranges; and bf16 models, where mergescale (fp32 arithmetic, one cast) is mergekit computing in fp32
(`dtype: float32, out_dtype: bfloat16`).  In-process merges on both sides: no zoo, no Ray."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import save_file
from test_merge import (
    MERGEKIT_METHODS,
    assert_equal_but_for_boundary_ties,
    bf16_ulp,
    configs,
    max_rel_diff,
    mergekit_merge,
)

from mergescale.checkpoints import ModelDir
from mergescale.orchestrator.merge import run_merge
from mergescale.specs import load_merge_spec
from mergescale.zoo.synthetic import qwen2_tensors

SHAPES = {
    "h256": {"vocab_size": 64, "hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 264,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "odd": {"vocab_size": 37, "hidden_size": 36, "num_hidden_layers": 2, "intermediate_size": 53,
            "num_attention_heads": 3, "num_key_value_heads": 1},
}  # fmt: skip
EXPERTS = ("upper", "shift1", "atbash", "rot13", "digit")  # the names configs() asks for


def write_model(path: Path, cfg: dict, tensors: dict[str, torch.Tensor], dtype: str = "float32") -> Path:
    path.mkdir(parents=True)
    tensors = {n: t.to(getattr(torch, dtype)) for n, t in tensors.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": dtype, **cfg}
    (path / "config.json").write_text(json.dumps(config))
    return path


def random_family(root: Path, cfg: dict, dtype: str = "float32") -> SimpleNamespace:
    gen = torch.Generator().manual_seed(7)
    base = {n: 0.02 * torch.randn(s, generator=gen) for n, s in qwen2_tensors(cfg).items()}
    experts = {}
    for name in EXPERTS:
        tensors = {n: t + 2e-3 * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        experts[name] = write_model(root / name, cfg, tensors, dtype)
    return SimpleNamespace(base=write_model(root / "base", cfg, base, dtype), experts=experts)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def family(request, tmp_path_factory) -> SimpleNamespace:
    """A random base (weights 0.02·N(0,1)) and five experts = base + 2e-3·N(0,1) each, in fp32: the task
    vectors' magnitudes repeat often enough (fp32 rounding of the differences) that some cut of a kept
    set lands on equal magnitudes."""
    return random_family(tmp_path_factory.mktemp(request.param), SHAPES[request.param])


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory) -> SimpleNamespace:
    """The odd shape, stored in bf16 (the dtype most checkpoints ship in)."""
    return random_family(tmp_path_factory.mktemp("bf16"), SHAPES["odd"], "bfloat16")


def agree(config: dict, tmp_path: Path, out_dtype: str | None = None) -> None:
    """mergescale and mergekit on ``config``, both computing in fp32 (``out_dtype``: the dtype both write)."""
    config = {**config, "dtype": "float32", **({"out_dtype": out_dtype} if out_dtype else {})}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    mergekit_merge(config, tmp_path / "mergekit")
    run_merge(load_merge_spec(path), tmp_path / "mergescale", progress=False)
    if config["merge_method"] == "ties":
        assert_equal_but_for_boundary_ties(config, tmp_path / "mergescale", tmp_path / "mergekit")
        return
    if out_dtype == "bfloat16":
        assert_within_one_rounding(tmp_path / "mergescale", tmp_path / "mergekit")
        return
    worst, where = max_rel_diff(tmp_path / "mergescale", tmp_path / "mergekit")
    assert worst <= 1e-4, f"{config['merge_method']}: max relative difference {worst:.2e} at {where}"


def assert_within_one_rounding(ours: Path, theirs: Path) -> None:
    """Two bf16 outputs of the same fp32 arithmetic: equal, but where the fp32 values (summed in another order)
    sit on either side of a bf16 rounding boundary, one unit in the last place apart — at few elements."""
    ma, mb = ModelDir(ours), ModelDir(theirs)
    assert sorted(ma.names) == sorted(mb.names)
    for name in ma.names:
        x, y = ma.tensor(name), mb.tensor(name)
        assert x.dtype == y.dtype == torch.bfloat16, name
        ulp = bf16_ulp(y)
        off = (x.float() - y.float()).abs()
        assert bool((off <= ulp).all()), f"{name}: {float((off / ulp).max()):.1f} bf16 units apart"
        assert int((off > 0).sum()) <= max(2, 0.01 * y.numel()), f"{name}: {int((off > 0).sum())} elements differ"


@pytest.mark.parametrize("method", MERGEKIT_METHODS)
def test_agrees_with_mergekit_on_random_models(method, family, tmp_path):
    agree(configs(family)[method], tmp_path)


@pytest.mark.parametrize("method", MERGEKIT_METHODS)
def test_agrees_with_mergekit_computing_in_fp32_on_bf16_models(method, bf16_family, tmp_path):
    """bf16 in, bf16 out: mergescale computes in fp32 and casts once, which is mergekit with `dtype: float32`.
    (mergekit with `dtype: bfloat16` computes in bf16 and rounds at every step; see the README's table.)"""
    agree(configs(bf16_family)[method], tmp_path, out_dtype="bfloat16")


def _src(model: Path, first: int, end: int, **parameters) -> dict:
    return {"model": str(model), "layer_range": [first, end], **({"parameters": parameters} if parameters else {})}


def stacks(family) -> dict[str, dict]:
    """Stacked configs for 2-layer models: a passthrough stack repeating layers, a merge within each slice with
    a gradient, per-source and slice-level parameters."""
    b, e = family.base, family.experts
    return {
        "passthrough": {"merge_method": "passthrough", "slices": [
            {"sources": [_src(e["upper"], 0, 2)]}, {"sources": [_src(e["rot13"], 1, 2)]},
            {"sources": [_src(e["digit"], 0, 1)], "parameters": {"scale": 0.5}}]},
        "dare_ties": {"merge_method": "dare_ties", "base_model": str(b), "parameters": {"weight": [1.0, 0.3]},
                      "slices": [
            {"sources": [_src(b, 0, 2), _src(e["upper"], 0, 2), _src(e["shift1"], 0, 2, weight=-0.5)]},
            {"sources": [_src(b, 1, 2), _src(e["atbash"], 1, 2), _src(e["digit"], 1, 2)],
             "parameters": {"lambda": 0.5}}]},
    }  # fmt: skip


@pytest.mark.parametrize("form", ["passthrough", "dare_ties"])
def test_stacks_agree_with_mergekit_on_random_models(form, family, tmp_path):
    from test_stack import merged_by_both

    merged_by_both({**stacks(family)[form], "dtype": "float32"}, tmp_path, form)


@pytest.mark.parametrize(("density", "gamma", "weights"), [
    (0.8, 0.05, [1.0, 1.0, 1.0]), (0.3, 0.1, [0.7, 0.4, 1.3]),
    (0.35, 0.7, [1.0, 1.0, 1.0]),  # γ beyond 1 − density: the outlier cut shrinks to keep the density
    (0.6, 0.05, [0.7, -0.4, 1.3]),
])  # fmt: skip
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties", "ties"])
def test_sparsifying_methods_agree_over_parameters(method, density, gamma, weights, family, tmp_path):
    """Every cut of the kept set, across densities, γ and weights (TIES: density only); a negative weight
    elects on the weighted value w·τ', as mergekit does."""
    models = [{"model": str(family.experts[n]), "parameters": {"weight": w}}
              for n, w in zip(EXPERTS, weights, strict=False)]  # fmt: skip
    if method == "ties":
        for m in models:
            m["parameters"]["density"] = density
        params = {}
    else:
        params = {"density": density, "gamma": gamma}
    agree({"merge_method": method, "base_model": str(family.base), "models": models, "parameters": params}, tmp_path)


@pytest.mark.parametrize(("density", "gamma"), [(0.8, 0.05), (0.5, 0.2), (0.3, 0.69), (0.99, 0.0)])
@pytest.mark.parametrize("shape", [(256, 256), (37, 53), (1001,)])
def test_breadcrumbs_mask_is_mergekits_where_magnitudes_tie_at_the_cuts(shape, density, gamma):
    """Magnitudes drawn from 7 values, so both cuts fall inside long runs of equal magnitudes: the kept
    set is exactly mergekit's ``magnitude_outliers`` (a stable sort keeps other elements of the runs)."""
    from mergekit.sparsify import magnitude_outliers

    from mergescale.merge_ops.sparsify import breadcrumbs_mask

    gen = torch.Generator().manual_seed(3)
    x = torch.randint(1, 8, shape, generator=gen).float() * 0.01
    x = torch.where(torch.rand(shape, generator=gen) < 0.5, -x, x)
    mask = breadcrumbs_mask(x, density, gamma)
    assert int(mask.sum()) == int(density * x.numel())
    assert torch.equal(mask, magnitude_outliers(x, density, gamma=gamma) != 0)
