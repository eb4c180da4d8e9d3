import pytest

from mergescale.errors import MergescaleError
from mergescale.specs import load_merge_spec


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_own_spec_paths_are_relative_to_the_spec(tmp_path):
    (tmp_path / "sub").mkdir()
    spec = load_merge_spec(write(tmp_path / "sub", "method: linear\nexperts: [../a, {model: /abs/b}]\n"))
    assert spec.experts[0].model == str(tmp_path / "a")
    assert spec.experts[1].model == "/abs/b"
    assert spec.semantics == "mergescale" and spec.parameters == {}


def test_mergekit_yaml_gets_mergekit_defaults(tmp_path):
    text = """
merge_method: dare_ties
base_model: base
models:
  - model: base
  - model: a
    parameters: {weight: 0.5, density: 0.4}
parameters: {rescale: true, int8_mask: true}
dtype: bfloat16
"""
    spec = load_merge_spec(write(tmp_path, text))
    assert spec.semantics == "mergekit" and spec.base == "base"
    assert [e.model for e in spec.experts] == ["a"]  # the base listed among the models is the base
    assert spec.parameters == {"density": 1.0, "normalize": False, "rescale": "l1"}
    assert spec.experts[0].parameters == {"weight": 0.5, "density": 0.4}
    assert spec.dtype == "bfloat16"


@pytest.mark.parametrize(
    "text, message",
    [
        ("merge_method: sce\nmodels: [{model: a}]\n", "merge_method 'sce' is not one mergescale imports"),
        ("merge_method: ties\nslices: []\n", "`slices:` / `modules:` configs are not supported"),
        ("merge_method: ties\nmodels: [{model: a}]\ntokenizer: {source: union}\n", "`tokenizer:` block"),
        ("merge_method: ties\nmodels: [{model: a}]\nfoo: 1\n", "unknown mergekit key(s) ['foo']"),
        ("method: ties\nexperts: [a]\nfoo: 1\n", "key `foo`: Extra inputs are not permitted"),
        ("method: ties\nexperts: []\n", "key `experts`"),
        ("method: ties\nexperts: [a\n", "is not valid YAML"),
        ("- just\n- a list\n", "a merge config is a YAML mapping"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, message):
    with pytest.raises(MergescaleError) as err:
        load_merge_spec(write(tmp_path, text))
    assert message in str(err.value)
    assert str(tmp_path / "c.yaml") in str(err.value)
    assert "\n" not in str(err.value)
