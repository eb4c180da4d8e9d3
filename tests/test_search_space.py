"""The search space of a coefficient search: parameter vector <-> merge spec (issue 17, item 1). No files,
no Ray: the merge spec's paths are never opened, and per-tensor values come from the planner's own
granularity resolution (``plan.params_for``), the path every merge takes."""

import random

import pytest
import torch
import yaml
from test_merge import TINY, tiny_model

from mergescale.checkpoints import ModelDir
from mergescale.errors import SpecError
from mergescale.merge_ops.granularity import locate
from mergescale.orchestrator.merge import run_merge
from mergescale.orchestrator.plan import params_for
from mergescale.search_space import SearchSpace
from mergescale.specs import MergeSpec
from mergescale.zoo.synthetic import qwen2_tensors

L = 6  # transformer layers of the model the space is declared on
NAMES = list(qwen2_tensors({"vocab_size": 32, "hidden_size": 8, "num_hidden_layers": L, "intermediate_size": 16,
                            "num_attention_heads": 2, "num_key_value_heads": 1}))  # fmt: skip

# TIES trimming each tensor apart: under the paper's global scope, density is one value for the whole merge
MERGE = MergeSpec.model_validate({"method": "ties", "base": "/models/base", "experts": ["/models/a", "/models/b",
                                  "/models/c"], "parameters": {"scope": "tensor"}, "seed": 3})  # fmt: skip
SPACE = yaml.safe_load("""
weight: {low: 0.1, high: 1.0, per: expert}
density: {low: 0.05, high: 0.9, per: expert, layer_groups: 3}
lambda: {low: 0.3, high: 3.0, log: true, submodules: [attention, mlp, default]}
normalize: false
""")


def random_vector(space: SearchSpace, rng: random.Random) -> dict:
    out = {}
    for c in space.coordinates:
        d = c.domain
        out[c.name] = rng.choice(d.values) if d.values is not None else rng.uniform(d.low, d.high)
    return out


def test_coordinates_are_named_by_parameter_expert_submodule_and_group():
    space = SearchSpace(MERGE, SPACE, L)
    names = [c.name for c in space.coordinates]
    assert names[:3] == ["weight/expert=0", "weight/expert=1", "weight/expert=2"]
    assert names[3:6] == ["density/expert=0/group=0", "density/expert=0/group=1", "density/expert=0/group=2"]
    assert names[-3:] == ["lambda/attention", "lambda/mlp", "lambda/default"]
    assert len(names) == 3 + 3 * 3 + 3
    assert space.fixed == {"normalize": False}


def test_vector_to_spec_and_back_is_the_identity():
    space = SearchSpace(MERGE, SPACE, L)
    rng = random.Random(0)
    for _ in range(20):
        vector = random_vector(space, rng)
        spec = space.to_spec(vector)
        assert space.from_spec(spec) == vector
        assert space.to_spec(space.from_spec(spec)) == spec
        # what is not searched stays as the merge spec had it
        assert (spec.method, spec.base, spec.seed) == ("ties", "/models/base", 3)
        assert [e.model for e in spec.experts] == [e.model for e in MERGE.experts]
        assert spec.parameters["normalize"] is False


def test_every_tensor_gets_its_coordinates_values_through_the_planner():
    space = SearchSpace(MERGE, SPACE, L)
    vector = random_vector(space, random.Random(1))
    spec = space.to_spec(vector)
    for name in NAMES:
        site = locate(name, L)
        group = 0 if site.layer is None else site.layer * 3 // L  # 6 layers, 3 groups: two layers each
        sub = site.submodule if site.submodule in ("attention", "mlp") else "default"
        for i, params in enumerate(params_for(spec, site)):
            assert params.weight == vector[f"weight/expert={i}"], name
            assert params.density == vector[f"density/expert={i}/group={group}"], name
            assert params.lambda_ == vector[f"lambda/{sub}"], name
            assert params.normalize is False
    # the groups are contiguous: layers 0-1, 2-3, 4-5
    layer = [locate(f"model.layers.{i}.mlp.up_proj.weight", L) for i in range(L)]
    density = [params_for(spec, s)[0].density for s in layer]
    assert density == [vector[f"density/expert=0/group={g}"] for g in (0, 0, 1, 1, 2, 2)]


def test_a_searched_spec_merges_with_each_group_and_submodule_value(tmp_path):
    """A vector written into a real task-arithmetic merge of real files (the one-off runner): every tensor is
    θ0 + λ Σ wi τi with the λ of its layer group / submodule and the weights of the vector."""
    base, a, b = (tiny_model(tmp_path / n, seed) for n, seed in (("base", 0), ("a", 1), ("b", 2)))
    spec = MergeSpec.model_validate({"method": "task_arithmetic", "base": str(base), "experts": [str(a), str(b)]})
    layers = TINY["num_hidden_layers"]  # 2 layers, 2 groups: one layer each
    space = SearchSpace(spec, {"weight": {"low": 0.0, "high": 1.0, "per": "expert"},
                               "lambda": {"low": 0.1, "high": 2.0, "layer_groups": 2,
                                          "submodules": ["mlp", "default"]}}, layers)  # fmt: skip
    vector = {"weight/expert=0": 0.25, "weight/expert=1": 0.75, "lambda/mlp/group=0": 0.5,
              "lambda/mlp/group=1": 1.5, "lambda/default/group=0": 1.0, "lambda/default/group=1": 2.0}  # fmt: skip
    out = run_merge(space.to_spec(vector), tmp_path / "merged", progress=False).path
    merged, models = ModelDir(out), [ModelDir(p) for p in (base, a, b)]
    for name in merged.names:
        site = locate(name, layers)
        group = 0 if site.layer is None else site.layer
        lam = vector[f"lambda/{'mlp' if site.submodule == 'mlp' else 'default'}/group={group}"]
        t0, t1, t2 = (m.tensor(name) for m in models)
        want = t0 + lam * (0.25 * (t1 - t0) + 0.75 * (t2 - t0))
        torch.testing.assert_close(merged.tensor(name), want, rtol=1e-6, atol=1e-7, msg=name)


def test_choices_are_kept_with_their_type():
    spec = MergeSpec.model_validate({"method": "slerp", "base": "/b", "experts": ["/a"]})
    space = SearchSpace(spec, {"t": {"values": [0.25, 0.5, 0.75]}}, L)
    assert space.to_spec({"t": 0.5}).parameters == {"t": 0.5}
    assert space.from_spec(space.to_spec({"t": 0.75})) == {"t": 0.75}
    with pytest.raises(SpecError, match=r"space: t = 0.3 is outside its domain"):
        space.to_spec({"t": 0.3})


#: a bad ``space:`` entry (or merge spec beside it) -> what the one-line error says
BAD_SPACES = {
    "unknown parameter": ({"densty": {"low": 0.1, "high": 0.5}}, r"space.densty: not a parameter of method ties; "
                                                                  r"did you mean `density`\?"),
    "empty range": ({"density": {"low": 0.5, "high": 0.5}}, r"space.density: empty range low = 0.5, high = 0.5"),
    "reversed range": ({"density": {"low": 0.9, "high": 0.1}}, r"space.density: empty range"),
    "no bounds": ({"density": {"per": "expert"}}, r"space.density: give `low` and `high` \(a range\), or `values`"),
    "half bounds": ({"density": {"low": 0.1}}, r"space.density: give `low` and `high`"),
    "empty values": ({"density": {"values": []}}, r"space.density.values: an empty list"),
    "values and range": ({"density": {"values": [0.1], "low": 0.1, "high": 0.2}}, r"either `values` or `low`/`high`"),
    "log of zero": ({"lambda": {"low": 0.0, "high": 1.0, "log": True}}, r"space.lambda.log: a log scale needs low > 0"),
    "unknown field": ({"density": {"low": 0.1, "high": 0.2, "groups": 2}}, r"space.density.groups: Extra inputs"),
    "zero groups": ({"density": {"low": 0.1, "high": 0.2, "layer_groups": 0}}, r"space.density.layer_groups: "),
    "too many groups": ({"density": {"low": 0.1, "high": 0.2, "layer_groups": 7}},
                        r"space.density.layer_groups: 7 groups but the model has 6 layers"),
    "per expert lambda": ({"lambda": {"low": 0.1, "high": 2.0, "per": "expert"}},
                          r"space.lambda.per: `lambda` is one value for all experts in ties"),
    "submodules without default": ({"lambda": {"low": 0.1, "high": 2.0, "submodules": ["attention", "mlp"]}},
                                   r"space.lambda.submodules: add `default` \(the value for norm, embedding, "),
    "unknown submodule": ({"lambda": {"low": 0.1, "high": 2.0, "submodules": ["atention", "default"]}},
                          r"space.lambda.submodules: \['atention', 'default'\] must be distinct names"),
    "nothing searched": ({"density": 0.2}, r"space: nothing to search"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_SPACES)
def test_bad_spaces_are_one_line_errors_naming_the_key(case):
    space, message = BAD_SPACES[case]
    with pytest.raises(SpecError, match=message) as err:
        SearchSpace(MERGE, space, L)
    assert "\n" not in str(err.value)


def test_fixed_settings_of_any_form_pass_through():
    fixed = {"normalize": False, "gamma": [0.01, 0.02], "lambda": {"attention": 0.8, "default": 1.0}}
    spec = MergeSpec.model_validate({"method": "breadcrumbs", "base": "/b", "experts": ["/a"]})
    space = SearchSpace(spec, fixed | {"density": {"values": [0.5, 0.9]}}, L)
    assert [c.name for c in space.coordinates] == ["density"]
    assert space.to_spec({"density": 0.9}).parameters == fixed | {"density": 0.9}


def test_whole_merge_parameters_take_one_value():
    global_ties = MERGE.model_copy(update={"parameters": {}})  # scope: global, the default
    with pytest.raises(SpecError, match=r"space.density: `density` is one value for the whole merge in ties"):
        SearchSpace(global_ties, {"density": {"low": 0.1, "high": 0.5, "layer_groups": 2}}, L)
    with pytest.raises(SpecError, match=r"space.scope: `scope` is one value for the whole merge in ties"):
        SearchSpace(global_ties, {"scope": {"values": ["global", "tensor"], "layer_groups": 2}}, L)
    # searched as one value, both are fine
    space = SearchSpace(global_ties, {"density": {"low": 0.1, "high": 0.5}, "scope": {"values": ["global"]}}, L)
    assert space.to_spec({"density": 0.3, "scope": "global"}).parameters == {"density": 0.3, "scope": "global"}


def test_a_parameter_is_searched_or_set_in_the_merge_spec_not_both():
    spec = MERGE.model_copy(update={"parameters": {"density": 0.2}})
    with pytest.raises(SpecError, match=r"space.density: also set in the merge spec's parameters.density"):
        SearchSpace(spec, {"density": {"low": 0.1, "high": 0.5}}, L)
    with_expert = MergeSpec.model_validate(
        {"method": "ties", "base": "/b", "experts": ["/a", {"model": "/c", "parameters": {"weight": 2.0}}]}
    )
    with pytest.raises(SpecError, match=r"space.weight: also set in the merge spec's experts.1.parameters.weight"):
        SearchSpace(with_expert, {"weight": {"low": 0.1, "high": 1.0, "per": "expert"}}, L)


def test_vectors_and_specs_that_do_not_fit_the_space_are_refused():
    space = SearchSpace(MERGE, SPACE, L)
    vector = random_vector(space, random.Random(2))
    with pytest.raises(SpecError, match=r"space: no value for coordinate `weight/expert=0`"):
        space.to_spec({k: v for k, v in vector.items() if k != "weight/expert=0"})
    with pytest.raises(SpecError, match=r"space: unknown coordinate `weight/expert=3`"):
        space.to_spec(vector | {"weight/expert=3": 0.5})
    with pytest.raises(SpecError, match=r"weight/expert=1 = 1.5 is outside its domain"):
        space.to_spec(vector | {"weight/expert=1": 1.5})
    spec = space.to_spec(vector)
    flat = spec.model_copy(update={"parameters": {**spec.parameters, "lambda": 1.0}})
    with pytest.raises(SpecError, match=r"parameters.lambda: expected one value for each of"):
        space.from_spec(flat)
    experts = [e.model_copy(update={"parameters": {**e.parameters, "density": 0.3}}) for e in spec.experts]
    with pytest.raises(SpecError, match=r"experts.0.parameters.density: expected \{groups: \[3 values\]\}"):
        space.from_spec(spec.model_copy(update={"experts": experts}))
