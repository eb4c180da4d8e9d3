"""Agreement with mergekit 0.1.5 beyond the zoo: the same mergekit YAML on random fp32 Qwen2-layout models
of a square (hidden 256, the shape where breadcrumbs once differed) and an odd, non-square shape.
In-process merges on both sides: no zoo, no Ray."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import save_file
from test_merge import MERGEKIT_METHODS, assert_equal_but_for_boundary_ties, configs, max_rel_diff, mergekit_merge

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


def write_model(path: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": "float32", **cfg}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module", params=sorted(SHAPES))
def family(request, tmp_path_factory) -> SimpleNamespace:
    """A random base (weights 0.02·N(0,1)) and five experts = base + 2e-3·N(0,1) each, in fp32: the task
    vectors' magnitudes repeat often enough (fp32 rounding of the differences) that some cut of a kept
    set lands on equal magnitudes."""
    cfg = SHAPES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    gen = torch.Generator().manual_seed(7)
    base = {n: 0.02 * torch.randn(s, generator=gen) for n, s in qwen2_tensors(cfg).items()}
    experts = {}
    for name in EXPERTS:
        tensors = {n: t + 2e-3 * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        experts[name] = write_model(root / name, cfg, tensors)
    return SimpleNamespace(base=write_model(root / "base", cfg, base), experts=experts)


def agree(config: dict, tmp_path: Path) -> None:
    config = {**config, "dtype": "float32"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    mergekit_merge(config, tmp_path / "mergekit")
    run_merge(load_merge_spec(path), tmp_path / "mergescale", progress=False)
    if config["merge_method"] == "ties":
        assert_equal_but_for_boundary_ties(config, tmp_path / "mergescale", tmp_path / "mergekit")
        return
    worst, where = max_rel_diff(tmp_path / "mergescale", tmp_path / "mergekit")
    assert worst <= 1e-4, f"{config['merge_method']}: max relative difference {worst:.2e} at {where}"


@pytest.mark.parametrize("method", MERGEKIT_METHODS)
def test_agrees_with_mergekit_on_random_models(method, family, tmp_path):
    agree(configs(family)[method], tmp_path)


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
