import pytest

from mergescale.errors import SpecError
from mergescale.specs import load_merge_spec, load_study_spec


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
    # TIES: mergekit trims per tensor; mergescale's own spec trims each whole task vector (the paper)
    ties = load_merge_spec(write(tmp_path, "merge_method: ties\nbase_model: base\nmodels: [{model: a}]\n"))
    assert ties.parameters == {"density": 1.0, "normalize": True, "scope": "tensor"}
    from mergescale.methods import get_method

    assert get_method("ties").Params().scope == "global" and get_method("ties").label(ties.parameters) == "ties tensor"


@pytest.mark.parametrize(
    "text, message",
    [
        ("merge_method: frankenstein\nmodels: [{model: a}]\n",
         "merge_method 'frankenstein' is not one mergescale imports"),
        ("merge_method: ties\nmodels: [{model: a}]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]\n",
         "c.yaml:3: a mergekit config needs exactly one of `models:` (whole models) or `slices:` (layer ranges) or "
         "`modules:`; it has `models:` and `slices:`"),
        ("merge_method: ties\nslices: [{sources: [{model: a, layer_range: [0, 1], weight: 1}]}]\n",
         "key `slices.0.sources.0.weight`: not a mergekit key"),
        ("merge_method: ties\nmodels: [{model: a}]\ntokenizer: {source: union}\ntokenizer_source: base\n",
         "c.yaml:3: give `tokenizer_source:` or a `tokenizer:` block, not both"),
        ("merge_method: ties\nmodels: [{model: a}]\ntokenizer: {source: union, pad: 8}\n",
         "key `tokenizer.pad`: not a mergekit key"),
        ("merge_method: ties\nmodels: [{model: a}]\nfoo: 1\n", "c.yaml:3: key `foo`: not a mergekit key; known keys:"),
        ("method: ties\nexperts: [a]\nfoo: 1\n", "c.yaml:3: key `foo`: Extra inputs are not permitted"),
        ("method: ties\nexperts: []\n", "key `experts`"),
        ("method: ties\nexperts: [a\n", "is not valid YAML"),
        ("- just\n- a list\n", "a merge config is a YAML mapping"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, message):
    with pytest.raises(SpecError) as err:
        load_merge_spec(write(tmp_path, text))
    assert message in str(err.value)
    assert str(tmp_path / "c.yaml") in str(err.value)
    assert "\n" not in str(err.value)


STUDY = "name: s\nbase: b\nexperts: zoo\nsubsets: {sizes: [2]}\nmethods: [{method: ties}]\n"


@pytest.mark.parametrize(
    "load, text, line, key, guess",
    [
        (load_study_spec, STUDY.replace("subsets:", "subset:"), 4, "subset", "subsets"),
        (load_study_spec, STUDY.replace("{sizes: [2]}", "\n  size: [2]"), 5, "subsets.size", "sizes"),
        (load_study_spec, STUDY + "eval:\n  limit: 5\n  held_outt: [x]\n", 8, "eval.held_outt", "held_out"),
        (load_study_spec, STUDY + "resources:\n  merge_worker: 2\n", 7, "resources.merge_worker", "merge_workers"),
        (load_study_spec, STUDY.replace("[{method: ties}]", "\n  - method: ties\n  - methd: ties"), 7,
         "methods.1.methd", "method"),
        (load_study_spec, STUDY.replace("zoo\n", "\n  a: {model: x, tsk: t}\n"), 4, "experts.a.tsk", "task"),
        (load_merge_spec, "method: ties\nexperts:\n  - a\n  - modle: b\n", 4, "experts.1.modle", "model"),
        (load_merge_spec, "method: ties\nexperts: [a]\nparameter: {density: 0.2}\n", 3, "parameter", "parameters"),
        (load_merge_spec, "merge_method: ties\nbase_modle: b\nmodels: [{model: a}]\n", 2, "base_modle", "base_model"),
        (load_merge_spec, "merge_methd: ties\nmodels: [{model: a}]\n", 1, "merge_methd", "merge_method"),
        (load_merge_spec, "merge_method: ties\nbase_model: b\nmodels:\n  - model: b\n  - model: a\n"
         "    parameter: {weight: 1}\n", 6, "models.1.parameter", "parameters"),
    ],
)  # fmt: skip
def test_a_misspelt_key_is_named_with_the_closest_known_one(tmp_path, load, text, line, key, guess):
    """Not the "Field required" of the key it was meant to be: the unknown key, its line, a suggestion."""
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: key `{key}`: ")
    assert f"did you mean `{guess}`? known keys: " in message
    assert "required" not in message and "\n" not in message


def test_other_errors_name_the_line_and_the_key_without_union_member_names(tmp_path):
    path = write(tmp_path, STUDY.replace("{sizes: [2]}", "{sizes: [2], sample: {x: 1}}"))
    with pytest.raises(SpecError, match=rf"^{path}:4: key `subsets.sample.x`: Input should be a valid integer"):
        load_study_spec(path)
    path = write(tmp_path, STUDY.replace("zoo\n", "\n  Math: {task: t}\n"))
    with pytest.raises(SpecError, match=rf"^{path}:4: key `experts.Math.model`: Field required$"):
        load_study_spec(path)
    path = write(tmp_path, "merge_method: ties\nbase_model: b\nmodels:\n  - model: b\n  - model: a\nout_dtype: bf16\n")
    with pytest.raises(SpecError, match=rf"^{path}:6: key `out_dtype`: Input should be 'float32'"):
        load_merge_spec(path)
    path = write(tmp_path, "merge_method: ties\nmodels:\n  - model: a\n    parameters: 3\n")
    with pytest.raises(SpecError, match=rf"^{path}:4: key `models.0.parameters`: write a mapping"):
        load_merge_spec(path)


def test_every_method_of_mergekit_is_imported():
    """mergekit 0.1.5's registry, method by method: each has mergescale's import (and defaults) in MERGEKIT."""
    from mergekit.merge_methods.registry import registered_methods

    from mergescale.methods import get_method
    from mergescale.specs import MERGEKIT

    theirs = {m.spec.name if hasattr(m, "spec") else m.name() for m in registered_methods()}
    assert len(theirs) == 20 and theirs == set(MERGEKIT)
    assert all(get_method(name).name == name for name in theirs)


def test_mergekit_tokenizer_keys_become_a_merged_vocabulary(tmp_path):
    """tokenizer_source and the tokenizer: block are one TokenizerSpec; under linear the listed base stays the
    vocabulary's base; no key at all keeps the plain copy of the base's tokenizer."""
    from mergescale.specs import TokenizerSpec

    def spec(text: str):
        (tmp_path / "c.yaml").write_text(text)
        return load_merge_spec(tmp_path / "c.yaml")

    models = "models: [{model: b}, {model: a}]\n"
    assert spec("merge_method: ties\nbase_model: b\n" + models).tokenizer == "base"
    union = spec("merge_method: ties\nbase_model: b\ntokenizer_source: union\nchat_template: chatml\n" + models)
    assert union.tokenizer == TokenizerSpec(source="union") and union.chat_template == "chatml"
    block = spec("merge_method: linear\nbase_model: b\ntokenizer: {tokens: {x: {source: {kind: zero}}}}\n" + models)
    assert block.base is None and block.tokenizer.base == "b" and block.tokenizer.source == "union"
    assert block.tokenizer.tokens == {"x": {"source": {"kind": "zero"}}}
