"""Multi-stage merge configs (mergekit's multi-merge form): stages in dependency order, intermediates beside the
output, the final published atomically, errors naming the stage, completed stages reused.  Fast tier: a tiny
synthetic family, in-process merges, no zoo, no Ray."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergescale.errors import MergescaleError, SpecError
from mergescale.orchestrator.merge import run_merge
from mergescale.orchestrator.stages import run_stages, stages_dir
from mergescale.specs import MergeSpec, load_merge_stages
from mergescale.zoo.synthetic import write_family

TINY = {
    "vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96,
    "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 64,
}  # fmt: skip
MERGESCALE = Path(sys.executable).parent / "mergescale"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("family"), TINY, n_experts=3, dtype=torch.float32)


def tensors(path: Path) -> dict:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def two_stage(family, tmp_path: Path, final_first: bool = True, final_method: str = "task_arithmetic") -> Path:
    base, (a, b, c) = family
    stage = f"name: ab\nmerge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\ndtype: float32\n"
    final = (f"merge_method: {final_method}\nbase_model: {base}\nmodels:\n"
             f"  - model: ab\n    parameters: {{weight: 0.5}}\n"
             f"  - model: {c}\n    parameters: {{weight: 0.3}}\ndtype: float32\n")  # fmt: skip
    path = tmp_path / "multi.yaml"
    path.write_text("# two stages\n" + ("---\n".join([final, stage]) if final_first else "---\n".join([stage, final])))
    return path


def test_stages_run_in_dependency_order_and_equal_the_merges_run_one_by_one(family, tmp_path):
    base, (a, b, c) = family
    stages = load_merge_stages(two_stage(family, tmp_path))
    assert [s.name for s in stages] == ["ab", None] and stages[1].uses == ("ab",)
    out = tmp_path / "out"
    reports = run_stages(stages, out, progress=False)
    assert len(reports) == 2 and not stages_dir(out).exists()  # the intermediates are gone once OUT is published
    by_hand = run_merge(MergeSpec.model_validate({"method": "linear", "experts": [str(a), str(b)],
                                                  "semantics": "mergekit", "parameters": {"normalize": True}}),
                        tmp_path / "ab", progress=False)  # fmt: skip
    final = run_merge(MergeSpec.model_validate({
        "method": "task_arithmetic", "base": str(base), "semantics": "mergekit",
        "parameters": {"normalize": False},
        "experts": [{"model": str(by_hand.path), "parameters": {"weight": 0.5}},
                    {"model": str(c), "parameters": {"weight": 0.3}}]}),
        tmp_path / "final", progress=False)  # fmt: skip
    got, want = tensors(out), tensors(final.path)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_failing_stage_is_named_leaves_no_output_and_a_rerun_reuses_the_finished_stages(family, tmp_path):
    path = two_stage(family, tmp_path, final_method="slerp")  # slerp needs parameter t: the final stage fails
    out = tmp_path / "out"
    stages = load_merge_stages(path)
    with pytest.raises(MergescaleError, match=r"^stage final \(unnamed\): .*slerp"):
        run_stages(stages, out, progress=False)
    assert not out.exists()
    kept = list(stages_dir(out).iterdir())
    assert len(kept) == 1 and kept[0].name.startswith("ab-") and (kept[0] / "config.json").is_file()
    path.write_text(path.read_text().replace("merge_method: slerp", "merge_method: task_arithmetic"))
    seen = []
    run_stages(load_merge_stages(path), out, progress=False, on_stage=lambda s, r: seen.append((s.name, r is None)))
    assert seen == [("ab", True), (None, False)]  # the first stage reused, not merged again
    assert (out / "config.json").is_file() and not stages_dir(out).exists()


def test_changing_a_stage_redoes_it_and_what_uses_it(family, tmp_path):
    path = two_stage(family, tmp_path, final_method="slerp")  # the final stage fails: the intermediates stay
    out = tmp_path / "out"
    seen = []
    b = family[1][1]
    changed = path.read_text().replace(f"  - model: {b}\n", f"  - model: {b}\n    parameters: {{weight: 2.0}}\n")
    for text in (path.read_text(), changed):
        path.write_text(text)
        with pytest.raises(MergescaleError, match="^stage final"):
            run_stages(load_merge_stages(path), out, progress=False, on_stage=lambda s, r: seen.append(r is None))
    assert seen == [False, False]  # "ab" merged both times: its document changed
    assert len(list(stages_dir(out).iterdir())) == 2  # each version under its own key


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: a\nmerge_method: linear\nmodels: [{model: b}]\n---\nname: b\nmerge_method: linear\n"
         "models: [{model: a}]\n---\nmerge_method: linear\nmodels: [{model: a}]\n", "cycle: a -> b -> a"),
        ("name: a\nmerge_method: linear\nmodels: [{model: x}]\n---\nname: a\nmerge_method: linear\n"
         "models: [{model: y}]\n", "two stages are named 'a'"),
        ("name: a\nmerge_method: linear\nmodels: [{model: x}]\n---\nname: b\nmerge_method: linear\n"
         "models: [{model: y}]\n", "stages 'a', 'b' are all final"),
        ("merge_method: linear\nmodels: [{model: x}]\n---\nmerge_method: linear\nmodels: [{model: y}]\n",
         "two documents have no `name:`"),
        ("merge_method: linear\nmodels: [{model: a}]\n---\n- just a list\n", "document 2 is not a mapping"),
    ],
)  # fmt: skip
def test_bad_stage_graphs_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "multi.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        load_merge_stages(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_bad_key_in_a_later_stage_names_its_line_in_the_file(family, tmp_path):
    path = two_stage(family, tmp_path, final_first=False)
    path.write_text(path.read_text().replace("dtype: float32\n", "dtype: float32\nbogus: 1\n"))
    stages = load_merge_stages(path)
    with pytest.raises(SpecError) as err:
        run_stages(stages, tmp_path / "out", progress=False)
    line = path.read_text().splitlines().index("bogus: 1") + 1
    assert f"stage ab: {path}:{line}: key `bogus`" in str(err.value)


def test_a_single_document_is_not_a_multi_stage_config(family, tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text("---\nmerge_method: linear\nmodels: [{model: a}]\n")
    assert load_merge_stages(path) is None


def test_the_cli_runs_a_multi_stage_config(family, tmp_path):
    import subprocess

    out = tmp_path / "out"
    res = subprocess.run([str(MERGESCALE), "merge", str(two_stage(family, tmp_path)), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(out)
    assert "stage ab: merged in" in res.stderr and "stage final (unnamed): merged in" in res.stderr


def test_a_stack_takes_an_earlier_stages_output_as_a_slice_source(family, tmp_path):
    """A frankenmerge of a merged stage: the stage's name in a slice's sources is its output directory."""
    base, (a, b, c) = family
    stage = f"name: ab\nmerge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\ndtype: float32\n"
    final = ("merge_method: passthrough\ndtype: float32\nslices:\n"
             "  - sources: [{model: ab, layer_range: [0, 2]}]\n"
             f"  - sources: [{{model: {c}, layer_range: [1, 2]}}]\n")  # fmt: skip
    path = tmp_path / "multi.yaml"
    path.write_text(stage + "---\n" + final)
    stages = load_merge_stages(path)
    assert [s.name for s in stages] == ["ab", None] and stages[1].uses == ("ab",)
    run_stages(stages, tmp_path / "out", progress=False)
    ab = run_merge(MergeSpec.model_validate({"method": "linear", "experts": [str(a), str(b)],
                                             "semantics": "mergekit", "parameters": {"normalize": True}}),
                   tmp_path / "ab", progress=False)  # fmt: skip
    out, ab, c = tensors(tmp_path / "out"), tensors(ab.path), tensors(c)
    assert {int(n.split(".")[2]) for n in out if ".layers." in n} == {0, 1, 2}
    for name, t in out.items():
        if ".layers.2." in name:
            assert torch.equal(t, c[name.replace(".layers.2.", ".layers.1.")]), name
        elif "embed" in name:
            assert torch.equal(t, ab[name]), name
        elif ".layers." not in name:  # the final norm and lm_head: the last slice's source
            assert torch.equal(t, c[name]), name
        else:
            assert torch.equal(t, ab[name]), name
