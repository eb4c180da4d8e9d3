"""Stacked merges (`slices:`, `modules:`, `passthrough`): mergekit's tensors on the real zoo, an output config
whose per-layer lists follow the layers (where mergekit 0.1.5 under transformers 5 fails), the stacked model
evaluated by the real vLLM engine through lm-eval; bad input refused at planning with nothing written."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_merge import assert_refused, mergekit_merge, rel_diff, tiny_model, write_spec

from mergescale.checkpoints import ModelDir
from mergescale.errors import ModelError, SpecError
from mergescale.orchestrator.merge import run_merge
from mergescale.specs import load_merge_spec


def stacks(zoo) -> dict[str, dict]:
    """mergekit configs of every stacked form: passthrough frankenmerges (a duplicated layer, per-tensor
    scales), merges within slices (gradients over each slice, per-source and slice-level parameters, a slice's
    own base), and the `modules: {default: …}` spelling."""
    b, e = str(zoo.base), {k: str(v) for k, v in zoo.experts.items()}

    def src(model, first, end, **parameters):
        return {"model": model, "layer_range": [first, end], **({"parameters": parameters} if parameters else {})}

    three_slices = [{"sources": [src(e["upper"], 0, 3)]}, {"sources": [src(e["shift1"], 2, 4)]},
                    {"sources": [src(e["upper"], 3, 4)]}]  # fmt: skip
    return {
        "passthrough": {"merge_method": "passthrough", "slices": three_slices},
        "passthrough_scale": {
            "merge_method": "passthrough", "base_model": e["digit"],
            "slices": [{"sources": [src(e["digit"], 0, 2)]},
                       {"sources": [src(e["rot13"], 1, 4)],
                        "parameters": {"scale": [{"filter": "o_proj", "value": 0.0},
                                                 {"filter": "down_proj", "value": 0.5}, {"value": 1.0}]}}],
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic", "base_model": b, "parameters": {"weight": [0.2, 1.0], "lambda": 0.9},
            "slices": [
                {"sources": [src(b, 0, 3), src(e["upper"], 0, 3), src(e["shift1"], 0, 3, weight=0.5)]},
                {"sources": [src(b, 1, 4), src(e["upper"], 1, 4), src(e["digit"], 1, 4)],
                 "parameters": {"lambda": 0.6}},
            ],
        },
        "slerp": {
            "merge_method": "slerp", "base_model": b,
            "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.7, 1.0]}, {"value": [1.0, 0.2]}]},
            "slices": [
                {"sources": [src(b, 0, 2), src(e["rot13"], 0, 2)]},
                {"sources": [src(e["upper"], 1, 4), src(e["rot13"], 1, 4)], "base_model": e["upper"]},
            ],
        },
        "modules": {
            "merge_method": "linear",
            "modules": {"default": {
                "parameters": {"weight": 1.0},
                "slices": [{"sources": [src(e["upper"], 0, 2), src(e["atbash"], 0, 2, weight=3.0)]},
                           {"sources": [src(b, 2, 4), src(e["upper"], 2, 4)], "parameters": {"weight": [1.0, 0.2]}}],
            }},
        },
    }  # fmt: skip


def mergekit_tensors(config: dict, out: Path) -> dict[str, torch.Tensor]:
    """mergekit 0.1.5's tensors for ``config``.  Under transformers 5 its stacked output config is invalid (it
    keeps the template's `layer_types`), so the merge writes the weights and then raises on the config."""
    try:
        mergekit_merge(config, out)
    except Exception as err:  # noqa: BLE001  (mergekit's own error type varies with the transformers version)
        assert "layer_types" in str(err), err
    tensors = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def merged_by_both(config: dict, tmp_path: Path, form: str) -> ModelDir:
    """A stack's mergekit ``config`` merged by mergekit and by mergescale; asserts every tensor of ours is within
    1e-4 (relative) of mergekit's.  Returns our output."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    theirs = mergekit_tensors(config, tmp_path / "mergekit")
    run_merge(load_merge_spec(path), tmp_path / "mergescale", progress=False)
    ours = ModelDir(tmp_path / "mergescale")
    assert sorted(ours.names) == sorted(theirs)
    for name, t in theirs.items():
        diff = rel_diff(ours.tensor(name), t)
        assert diff <= 1e-4, f"{form}: {name} differs from mergekit by {diff:.2e} (relative)"
    return ours


@pytest.mark.zoo
@pytest.mark.parametrize("form", ["passthrough", "passthrough_scale", "task_arithmetic", "slerp", "modules"])
def test_stacks_agree_with_mergekit_and_their_configs_follow_the_layers(form, tiny_zoo, tmp_path):
    from transformers import AutoConfig

    config = {**stacks(tiny_zoo)[form], "dtype": "float32"}
    ours = merged_by_both(config, tmp_path, form)
    slices = config.get("slices") or config["modules"]["default"]["slices"]
    depth = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in slices)
    assert {int(n.split(".")[2]) for n in ours.names if ".layers." in n} == set(range(depth))
    cfg = json.loads((tmp_path / "mergescale" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == depth and len(cfg["layer_types"]) == depth
    assert AutoConfig.from_pretrained(tmp_path / "mergescale").num_hidden_layers == depth  # transformers' checks


@pytest.mark.zoo
def test_a_stacked_passthrough_copies_layers_exactly_and_takes_per_layer_config_from_its_sources(tiny_zoo, tmp_path):
    """Each output layer is its source layer, bit for bit; each per-layer config entry is its source layer's
    (made-up layer types show where every entry came from)."""
    upper, shift1 = tiny_zoo.experts["upper"], tiny_zoo.experts["shift1"]
    marked = tmp_path / "marked"
    marked.mkdir()
    for f in shift1.iterdir():
        (marked / f.name).symlink_to(f)
    cfg = json.loads((shift1 / "config.json").read_text())
    (marked / "config.json").unlink()
    (marked / "config.json").write_text(json.dumps({**cfg, "layer_types": [f"shift1-{i}" for i in range(4)]}))
    spec = write_spec(tmp_path, {"method": "passthrough", "slices": [
        {"sources": [{"model": str(upper), "layers": [1, 3]}]},
        {"sources": [{"model": str(marked), "layers": [0, 4]}]},
    ]})  # fmt: skip
    run_merge(load_merge_spec(spec), tmp_path / "out", progress=False)
    out, a, b = ModelDir(tmp_path / "out"), ModelDir(upper), ModelDir(shift1)
    for name in out.names:
        parts = name.split(".")
        if ".layers." not in name:
            source, same = (a if "embed" in name else b), name  # embeddings: first slice; norm, lm_head: last
        else:
            layer = int(parts[2])
            source, at = (a, layer + 1) if layer < 2 else (b, layer - 2)
            same = ".".join([*parts[:2], str(at), *parts[3:]])
        assert torch.equal(out.tensor(name), source.tensor(same)), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["layer_types"] == ["full_attention"] * 2 + [f"shift1-{i}" for i in range(4)]
    assert config["num_hidden_layers"] == 6
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Slice 1: output layers 2–5" in card and f"`{marked}` layers [0, 4)" in card


@pytest.mark.zoo
@pytest.mark.ray
def test_a_stack_writes_the_same_bytes_on_ray_as_in_process(tiny_zoo, ray_session, tmp_path):
    config = {**stacks(tiny_zoo)["task_arithmetic"], "dtype": "bfloat16"}
    spec = load_merge_spec(write_spec(tmp_path, config))
    ray = run_merge(spec, tmp_path / "ray", progress=False, local=False)
    local = run_merge(spec, tmp_path / "local", progress=False, local=True)
    assert ray.runner == "ray" and local.runner == "local" and ray.shards == local.shards == 8
    files = sorted(p.name for p in (tmp_path / "ray").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "local").iterdir())
    shards = [f"model-{i:05d}-of-00008.safetensors" for i in range(1, 9)]
    assert [f for f in files if f.endswith(".safetensors")] == shards
    for f in files:
        assert (tmp_path / "ray" / f).read_bytes() == (tmp_path / "local" / f).read_bytes(), f


@pytest.mark.zoo
@pytest.mark.engine
def test_a_stacked_zoo_model_is_evaluated_by_the_vllm_engine(tiny_zoo, tmp_path):
    """The zoo's evaluator (vLLM, through lm-eval) loads stacked outputs: upper cut in two and stacked back scores
    exactly as upper; upper with its layer 2 repeated (5 layers) loads and is scored."""
    from mergescale.eval.evaluator import Evaluator
    from mergescale.eval.harness import load_tasks, run_tasks
    from mergescale.eval.lm import MergescaleLM
    upper = str(tiny_zoo.experts["upper"])
    models = {}
    for name, ranges in {"cut": [(0, 2), (2, 4)], "repeated": [(0, 3), (2, 4)]}.items():
        spec = write_spec(tmp_path, {"method": "passthrough",
                                     "slices": [{"sources": [{"model": upper, "layers": list(r)}]} for r in ranges]})
        models[name] = run_merge(load_merge_spec(spec), tmp_path / name, progress=False).path
    evaluators = {4: Evaluator("vllm", threads=2), 5: Evaluator("vllm", threads=2)}  # one engine per architecture
    scores = {name: run_tasks(MergescaleLM(evaluators[ModelDir(path).config["num_hidden_layers"]], str(path)),
                              load_tasks(["zoo_upper"]), limit=40)["zoo_upper"]
              for name, path in {"upper": upper, **models}.items()}  # fmt: skip
    assert scores["cut"].metrics == scores["upper"].metrics
    assert scores["upper"].metrics[scores["upper"].primary] >= 0.9
    assert scores["repeated"].n == 40 and 0 <= scores["repeated"].metrics[scores["repeated"].primary] <= 1


# ------------------------------------------------------------------ bad input (tiny hand-written models, fast)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stack")
    return {name: tiny_model(root / name, seed) for seed, name in enumerate(["base", "a", "b"])}


TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def _mk(models, slices, method="passthrough", **extra) -> dict:
    return {"merge_method": method, **extra,
            "slices": [{"sources": [{"model": str(models[m]), "layer_range": list(r)} for m, r in s]} for s in slices]}


REFUSED = {
    "unequal-ranges": (lambda m: _mk(m, [[("a", (0, 2)), ("b", (0, 1))]], "linear"), SpecError,
                       "slices.0: its sources' layer ranges hold 1 and 2 layers"),
    "beyond-the-layers": (lambda m: _mk(m, [[("a", (1, 3))]]), SpecError,
                          "slices.0.sources.0: layers [1, 3) but"),
    "empty-range": (lambda m: _mk(m, [[("a", (1, 1))]]), SpecError, "is not a layer range"),
    "base-not-a-source": (lambda m: _mk(m, [[("a", (0, 2)), ("b", (0, 2))]], "ties", base_model=str(m["base"])),
                          SpecError, "slices.0: the base"),
    "two-sources-for-passthrough": (lambda m: _mk(m, [[("a", (0, 2)), ("b", (0, 2))]]), SpecError,
                                    "slices.0: method passthrough merges exactly 1 expert"),
    "models-and-slices": (lambda m: {**_mk(m, [[("a", (0, 2))]]), "models": [{"model": str(m["a"])}]}, SpecError,
                          "exactly one of"),
    "residual-weight": (lambda m: {**_mk(m, []), "slices": [{"sources": [{"model": str(m["a"]), "layer_range": [0, 2]}],
                                                               "residual_weight": 0.5}]},
                        SpecError, "residual_weight`: mergekit 0.1.5 reads it but never uses it"),
    "other-module": (lambda m: {"merge_method": "passthrough",
                                "modules": {"vision": {"models": [{"model": str(m["a"])}]}}},
                     SpecError, "whose one module is `default`"),
    "passthrough-of-two-models": (lambda m: {"merge_method": "passthrough", "models": [{"model": str(m["a"])},
                                                                                       {"model": str(m["b"])}]},
                                  SpecError, "passthrough copies exactly one model"),
    "missing-source": (lambda m: _mk({"a": m["a"] / "gone"}, [[("a", (0, 2))]]), ModelError, "no such model directory"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_stacks_are_one_line_and_write_nothing(case, models, tmp_path, capfd):
    build, error, message = REFUSED[case]
    spec = write_spec(tmp_path, build(models))
    assert_refused(spec, tmp_path / "out", error, message, capfd)


def test_a_stack_of_one_slice_per_layer_is_the_model_itself(models, tmp_path):
    """Every layer its own slice, in order: the output is the source, tensor for tensor (and the error
    of a later slice does not depend on earlier slices' plans)."""
    spec = write_spec(tmp_path, _mk(models, [[("a", (0, 1))], [("a", (1, 2))]], dtype="float32"))
    run_merge(load_merge_spec(spec), tmp_path / "out", progress=False)
    out, a = ModelDir(tmp_path / "out"), ModelDir(models["a"])
    assert sorted(out.names) == sorted(a.names)
    assert all(torch.equal(out.tensor(n), a.tensor(n)) for n in a.names)


def test_a_stacks_card_holds_the_whole_stack_and_auto_takes_the_template_of_any_slices_model(models, tmp_path):
    """The card's configuration is the stack's spec (every slice, so the leaderboard names every parent), and
    `chat_template: auto` looks at every model of the stack, as mergekit's does: here only the second slice's
    source has a template."""
    from mergescale.leaderboard.queue import provenance

    b = tmp_path / "b"
    shutil.copytree(models["b"], b)
    (b / "chat_template.jinja").write_text(TEMPLATE)
    config = {**_mk({"a": models["a"], "b": b}, [[("a", (0, 1))], [("b", (1, 2))]]), "chat_template": "auto"}
    run_merge(load_merge_spec(write_spec(tmp_path, config)), tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == TEMPLATE
    card = (tmp_path / "out" / "README.md").read_text()
    stored = json.loads(card.split("## Configuration")[1].split("```json")[1].split("```")[0])
    assert [[s["model"] for s in piece["sources"]] for piece in stored["slices"]] == [[str(models["a"])], [str(b)]]
    assert provenance(tmp_path / "out")["parents"] == [str(models["a"]), str(b)]
