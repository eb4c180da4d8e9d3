import json
import subprocess
import sys
import textwrap

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergescale.errors import MergescaleError
from mergescale.eval.greedy import greedy_generate, score_examples
from mergescale.zoo.build import build_zoo, preset_spec
from mergescale.zoo.quality import BASE_MAX, EXPERT_MIN, PAIR_KEEP, PAIR_LAMBDAS, measure_quality
from mergescale.zoo.tasks import HELD_IN, HELD_OUT, get_task


def micro(seed: int):
    """The tiny preset with very few steps: the real build path, in seconds."""
    return preset_spec(
        "tiny", seed=seed, base_steps=20, base_warmup=5, expert_steps=4, expert_warmup=2, eval_examples=6
    )


@pytest.mark.zoo  # builds micro zoos (the real build path)
def test_build_is_deterministic_reused_and_atomic(tmp_path):
    a = build_zoo(micro(3), out=tmp_path / "a", progress=False)
    b = build_zoo(micro(3), out=tmp_path / "b", progress=False)
    c = build_zoo(micro(4), out=tmp_path / "c", progress=False)
    assert a.meta["weights_sha256"] == b.meta["weights_sha256"]
    assert a.meta["scores"] == b.meta["scores"]
    assert set(a.meta["weights_sha256"]) == {"base"} | {t.name for t in HELD_IN}
    assert a.meta["weights_sha256"]["base"] != c.meta["weights_sha256"]["base"]
    # reused, not rebuilt
    stamp = (tmp_path / "a" / "base" / "model.safetensors").stat().st_mtime_ns
    assert build_zoo(micro(3), out=tmp_path / "a", progress=False).meta == a.meta
    assert (tmp_path / "a" / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    # a zoo of another spec, or a foreign directory, is never overwritten
    with pytest.raises(MergescaleError, match="another spec"):
        build_zoo(micro(4), out=tmp_path / "a", progress=False)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(MergescaleError, match="is not a zoo"):
        build_zoo(micro(3), out=tmp_path / "d", progress=False)
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "d"], "no staging directory left"


def micro_member(base: str, seed: int = 0):
    """The xs size of the scale family with very few steps: the real family build path, in seconds."""
    return preset_spec("xs", seed=seed, base=base, base_steps=20, base_warmup=5, instruct_steps=10, expert_steps=4,
                       expert_warmup=2, multitask_steps=8, eval_examples=6)  # fmt: skip


@pytest.mark.zoo  # builds micro family members (the real build path, in its pinned-kernel child process)
def test_family_member_bytes_do_not_depend_on_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MERGESCALE_TRAIN_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = build_zoo(micro_member("pretrained"), out=tmp_path / "one", progress=False)
    monkeypatch.setenv("MERGESCALE_TRAIN_THREADS", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    two = build_zoo(micro_member("pretrained"), out=tmp_path / "two", progress=False)
    assert one.meta["kernels"]["threads"] == 1 and two.meta["kernels"]["threads"] == 2
    assert one.meta["kernels"]["aten"] == "AVX2"  # the pinned kernels, whatever this host has
    assert one.meta["weights_sha256"] == two.meta["weights_sha256"]
    assert one.meta["scores"] == two.meta["scores"]
    assert set(one.meta["weights_sha256"]) == {"base", "multitask"} | {t.name for t in HELD_IN}
    assert one.meta["host"]["cpu"] and one.meta["disk_bytes"] > 0
    # a layout a study can use: the multitask model is a Hugging Face directory too
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (one.multitask / f).is_file()
    # heterogeneous experts: learning rates and data sizes differ (steps too, at real budgets), so do the norms
    training = one.meta["training"]
    for key in ("lr", "pool"):
        assert len({training[t.name][key] for t in HELD_IN}) == len(HELD_IN), key
    assert len({training[t.name]["task_vector_norm"] for t in HELD_IN}) == len(HELD_IN)
    assert one.factors == {"size": "xs", "n_parameters": 214400, "base_quality": "pretrained", "zoo_seed": 0}


@pytest.mark.zoo
def test_an_instruct_member_continues_the_pretrained_base(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESCALE_CACHE", str(tmp_path / "empty"))
    alone = build_zoo(micro_member("instruct"), out=tmp_path / "alone", progress=False)  # trains the base itself
    monkeypatch.setenv("MERGESCALE_CACHE", str(tmp_path / "cache"))
    pre = build_zoo(micro_member("pretrained"), progress=False)  # into the cache, where the instruct build finds it
    inst = build_zoo(micro_member("instruct"), progress=False)
    assert inst.meta["training"]["base"]["reused"] == "pretrained member's base"
    assert "reused" not in alone.meta["training"]["base"]
    sha = {z.meta["training"]["base"]["pretrained_sha256"] for z in (pre, inst, alone)}
    assert len(sha) == 1  # the same pretrained base, trained or reused
    assert inst.meta["weights_sha256"] == alone.meta["weights_sha256"]
    assert inst.meta["weights_sha256"]["base"] != pre.meta["weights_sha256"]["base"]  # the instruct stage ran
    assert inst.meta["training"]["instruct"]["steps"] == 10 and "instruct" not in pre.meta["training"]
    assert inst.meta["key"] != pre.meta["key"]


def test_unknown_preset_is_a_user_error():
    with pytest.raises(MergescaleError, match="unknown zoo preset 'huge'"):
        preset_spec("huge")


@pytest.mark.zoo
def test_zoo_layout_is_hugging_face(tiny_zoo):
    meta = json.loads((tiny_zoo.root / "zoo.json").read_text())
    assert meta["tasks"]["held_in"] == [t.name for t in HELD_IN]
    assert meta["tasks"]["held_out"] == [t.name for t in HELD_OUT]
    for name, path in [("base", tiny_zoo.base), *tiny_zoo.experts.items()]:
        for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
            assert (path / f).is_file(), f"{path / f}"
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["head_dim"] == 64
        assert set(meta["scores"]["test"][name]) == {t.name for t in HELD_IN + HELD_OUT}


@pytest.mark.zoo
def test_recorded_scores_reproduce_from_disk(tiny_zoo):
    path = tiny_zoo.experts["atbash"]
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    n = tiny_zoo.meta["scores"]["n_examples"]
    for task in ("atbash", "copy"):
        s = score_examples(model, tok, get_task(task).examples("test", n))
        assert s.exact_match == tiny_zoo.scores("atbash")[task]["exact_match"]
        assert s.char_acc == pytest.approx(tiny_zoo.scores("atbash")[task]["char_acc"])


@pytest.mark.zoo
def test_quality_bars(tiny_zoo):
    q = measure_quality(tiny_zoo)
    assert min(q.expert.values()) >= EXPERT_MIN, q.expert
    assert max(q.base.values()) <= BASE_MAX, q.base
    assert q.pair_keep(PAIR_LAMBDAS[0]) >= PAIR_KEEP, q.pairs[PAIR_LAMBDAS[0]]
    assert q.average_all_mean() <= q.pair_mean(PAIR_LAMBDAS[0]) - 0.15, (q.average_all, q.pair_mean(PAIR_LAMBDAS[0]))


VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        path, prompts = sys.argv[1], json.loads(sys.argv[2])
        # on CPU, gpu_memory_utilization is the fraction of the NUMA node's memory vLLM reserves
        llm = LLM(model=path, dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
                  gpu_memory_utilization=0.1)
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
        print("OUTPUTS=" + json.dumps([o.outputs[0].text for o in outs]))
    """
)


@pytest.mark.zoo
@pytest.mark.engine
def test_vllm_serves_a_zoo_expert_unchanged(tiny_zoo, tmp_path):
    path = tiny_zoo.experts["upshift"]
    prompts = [p for task in ("upshift", "copy") for p, _ in get_task(task).examples("test", 16)]
    script = tmp_path / "serve.py"
    script.write_text(VLLM_SCRIPT)
    res = subprocess.run(
        [sys.executable, str(script), str(path), json.dumps(prompts)], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("OUTPUTS="))
    vllm_out = json.loads(line[len("OUTPUTS=") :])
    hf_out = greedy_generate(
        AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), prompts, max_new_tokens=12
    )
    assert vllm_out == hf_out
    assert vllm_out[0] == get_task("upshift").answer(prompts[0][3:-1])
