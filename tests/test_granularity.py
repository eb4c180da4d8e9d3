import pytest

from mergescale.errors import MergescaleError
from mergescale.merge_ops.granularity import locate, resolve

L = 5


def site(name):
    return locate(name, L)


def test_locate_reads_layer_and_submodule_from_qwen2_names():
    assert site("model.embed_tokens.weight").submodule == "embedding"
    assert site("lm_head.weight").submodule == "lm_head"
    assert site("model.norm.weight").submodule == "norm" and site("model.norm.weight").layer is None
    s = site("model.layers.3.self_attn.k_proj.weight")
    assert (s.layer, s.submodule, s.t) == (3, "attention", 0.75)
    assert site("model.layers.0.mlp.gate_proj.weight").submodule == "mlp"
    assert site("model.layers.4.post_attention_layernorm.weight").submodule == "norm"


def test_scalars_and_gradients_over_layers():
    assert resolve(0.3, site("model.layers.2.mlp.up_proj.weight")) == 0.3
    grad = [0.0, 1.0]
    assert resolve(grad, site("model.layers.0.mlp.up_proj.weight")) == 0.0
    assert resolve(grad, site("model.layers.2.mlp.up_proj.weight")) == pytest.approx(0.5)
    assert resolve(grad, site("model.layers.4.mlp.up_proj.weight")) == 1.0
    # three points over five layers: layer 1 sits at t = .25 -> halfway between points 0 and 1
    assert resolve([0.0, 1.0, 0.0], site("model.layers.1.mlp.up_proj.weight")) == pytest.approx(0.5)
    # tensors outside the layers take t = 0, as mergekit does
    assert resolve(grad, site("lm_head.weight")) == 0.0
    # booleans are picked, not interpolated
    assert resolve([True, False], site("model.layers.4.mlp.up_proj.weight")) is False


def test_per_submodule_values():
    setting = {"attention": 0.2, "mlp": [0.0, 1.0], "default": 0.9}
    assert resolve(setting, site("model.layers.1.self_attn.q_proj.weight")) == 0.2
    assert resolve(setting, site("model.layers.4.mlp.down_proj.weight")) == 1.0
    assert resolve(setting, site("model.embed_tokens.weight")) == 0.9
    with pytest.raises(MergescaleError, match="add a `default:` entry"):
        resolve({"attention": 0.2}, site("lm_head.weight"), "parameters.t")
    with pytest.raises(MergescaleError, match=r"unknown submodule key\(s\) \['atention'\]"):
        resolve({"atention": 0.2}, site("lm_head.weight"))


def test_mergekit_filters_first_match_wins():
    setting = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.7}, {"value": 0.5}]
    assert resolve(setting, site("model.layers.4.self_attn.o_proj.weight")) == 1.0
    assert resolve(setting, site("model.layers.4.mlp.up_proj.weight")) == 0.7
    assert resolve(setting, site("model.norm.weight")) == 0.5


def test_layer_groups_are_contiguous_and_piecewise_constant():
    # five layers in two groups: layers 0-2 in group 0 (i*2//5 = 0, 0, 0), layers 3-4 in group 1
    setting = {"groups": [0.1, 0.7]}
    got = [resolve(setting, site(f"model.layers.{i}.mlp.up_proj.weight")) for i in range(L)]
    assert got == [0.1, 0.1, 0.1, 0.7, 0.7]  # exact: picked, not interpolated
    assert resolve({"groups": [0.1, 0.2, 0.3, 0.4, 0.5]}, site("model.layers.3.self_attn.q_proj.weight")) == 0.4
    # tensors outside the layers take group 0 (t = 0 of a gradient); groups nest in submodules and vice versa
    assert resolve(setting, site("lm_head.weight")) == 0.1
    nested = {"attention": {"groups": [1.0, 2.0]}, "default": 0.5}
    assert resolve(nested, site("model.layers.4.self_attn.v_proj.weight")) == 2.0
    assert resolve(nested, site("model.layers.4.mlp.up_proj.weight")) == 0.5
    per_group = {"groups": [{"attention": 1.0, "default": 3.0}, 4.0]}
    assert resolve(per_group, site("model.layers.0.mlp.up_proj.weight")) == 3.0


def test_bad_layer_groups_name_the_key():
    with pytest.raises(MergescaleError, match=r"parameters.density: 6 layer groups but the model has 5 layers"):
        resolve({"groups": [0.1] * 6}, site("model.layers.0.mlp.up_proj.weight"), "parameters.density")
    for bad in ({"groups": []}, {"groups": 0.3}, {"groups": [0.1], "default": 0.2}):
        with pytest.raises(MergescaleError, match=r"parameters.t: layer groups are written"):
            resolve(bad, site("model.layers.0.mlp.up_proj.weight"), "parameters.t")
