"""Evaluation: backends, the lm-eval bridge, the evaluator pool on a real local Ray with the real vLLM CPU
engine, scores and the `mergescale eval` command."""

from __future__ import annotations

import filecmp
import math
import os
import signal
import threading
import time

import psutil
import pyarrow.parquet as pq
import pytest
import torch

from mergescale.errors import MergescaleError
from mergescale.eval import scores
from mergescale.eval.backend import GenerateRequest
from mergescale.eval.divergence import js_rows, kl_rows
from mergescale.eval.evaluator import Evaluator
from mergescale.eval.greedy import score_tasks
from mergescale.eval.harness import TASKS_DIR, TaskResult, load_tasks, run_tasks
from mergescale.eval.lm import MergescaleLM
from mergescale.zoo.tasks import get_task

ZOO_TASKS = ("upper", "shift1", "copy")


def _requests(n: int = 20) -> tuple[list[GenerateRequest], list[tuple[str, str]]]:
    examples = [e for t in ZOO_TASKS for e in get_task(t).examples("test", n)]
    gen = [GenerateRequest(p, ("</s>", "\n"), 7) for p, _ in examples]
    pairs = examples + [("", "abc"), ("up:abc=", "XYZ")]
    return gen, pairs


# ---------------------------------------------------------------- no engine
def test_shipped_zoo_task_files_are_what_the_generator_writes(tmp_path):
    from mergescale.zoo.lm_eval_tasks import write_task_files

    written = write_task_files(tmp_path)
    # held-in, held-out, the scale family's held-out (post) tasks and the editing zoo's upper versions
    assert len(written) == (12 + 8 + 3) * 3
    for path in written:
        shipped = TASKS_DIR / "zoo" / path.relative_to(tmp_path)
        assert filecmp.cmp(path, shipped, shallow=False), f"{shipped} is stale: regenerate it"


def test_divergences():
    p = torch.log_softmax(torch.randn(5, 67), -1)
    q = torch.log_softmax(torch.randn(5, 67), -1)
    assert torch.allclose(js_rows(p, p), torch.zeros(5), atol=1e-6)
    assert torch.allclose(kl_rows(p, p), torch.zeros(5), atol=1e-6)
    assert torch.allclose(js_rows(p, q), js_rows(q, p), atol=1e-6)
    assert (kl_rows(p, q) > 0).all() and (js_rows(p, q) <= math.log(2) + 1e-6).all()
    # two disjoint point masses: JS = ln 2, KL = 1 · (ln 1 − ln 1e-12)
    a, b = torch.tensor([[0.0, -math.inf]]), torch.tensor([[-math.inf, 0.0]])
    assert js_rows(a, b).item() == pytest.approx(math.log(2), rel=1e-5)
    assert kl_rows(a, b).item() == pytest.approx(-math.log(1e-12), rel=1e-5)


def test_normalized_scores_and_anp_by_hand():
    def res(task, value):
        return TaskResult(task, {"exact_match": value}, {"exact_match": None}, 10, "exact_match")

    roles = {"a": scores.HELD_IN, "b": scores.HELD_IN, "c": scores.HELD_OUT}
    rows = []
    for model, values in {
        "m": (0.4, 0.3, 0.5),
        "ea": (0.8, 0.1, 0.9),
        "eb": (0.2, 0.6, 0.9),
        "base": (0.1, 0.0, 1.0),
    }.items():
        rows += scores.score_rows(model, {t: res(t, v) for t, v in zip("abc", values, strict=True)}, roles)
    rows = scores.normalize(rows, "base", {"a": "ea", "b": "eb"})
    got = {(r["model"], r["task"]): r["normalized"] for r in rows}
    assert got[("m", "a")] == pytest.approx(0.5) and got[("m", "b")] == pytest.approx(0.5)
    assert got[("m", "c")] == pytest.approx(0.5)
    assert got[("m", "(held-in)")] == pytest.approx(0.5)  # ANP
    assert got[("eb", "(held-in)")] == pytest.approx((0.2 / 0.8 + 1.0) / 2)
    assert got[("base", "b")] == 0.0 and got[("m", "(held-out)")] == pytest.approx(0.5)
    table = scores.to_table(scores.complete(rows, backend="hf"))
    assert table.schema == scores.SCHEMA and table.num_rows == 4 * 3 + 4 * 2


def test_unknown_task_and_bad_model_dir_are_one_line_errors(tmp_path):
    from mergescale.cli import main

    with pytest.raises(MergescaleError, match="unknown lm-eval task 'zoo_nope'.*--include-path"):
        load_tasks(["zoo_nope"])
    assert main(["eval", str(tmp_path / "missing"), "--tasks", "zoo_upper"]) == 2


# ---------------------------------------------------------------- in-process Hugging Face backend
@pytest.fixture(scope="module")
def hf(tiny_zoo):
    return Evaluator("hf", threads=2)


@pytest.mark.zoo
@pytest.mark.engine
def test_lm_eval_through_our_lm_reports_the_direct_scorers_accuracy(tiny_zoo, hf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = str(tiny_zoo.experts["shift1"])
    results = run_tasks(MergescaleLM(hf, model), load_tasks(["zoo_shift1", "zoo_upper", "zoo_copy"]), limit=100)
    direct = score_tasks(
        AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model),
        {t: get_task(t).examples("test", 100) for t in ZOO_TASKS},
    )  # fmt: skip
    for t in ZOO_TASKS:
        res = results[f"zoo_{t}"]
        assert res.n == 100 and res.primary == "exact_match"
        assert res.metrics["exact_match"] == pytest.approx(direct[t].exact_match), t
        assert res.metrics["char_acc"] == pytest.approx(direct[t].char_acc), t
    assert results["zoo_shift1"].metrics["exact_match"] >= 0.9  # the expert on its own task
    assert results["zoo_upper"].metrics["exact_match"] < 0.5


@pytest.mark.zoo
@pytest.mark.engine
def test_lm_eval_multiple_choice_runs_on_loglikelihoods(tiny_zoo, hf):
    """A loglikelihood task (lm-eval's multiple_choice, defined inline) through our LM: its accuracy
    is the share of documents whose right answer has the highest log-likelihood, computed by hand."""
    from mergescale.eval.lm_tasks.zoo.utils import load_zoo_task

    upper = get_task("upper")
    config = {
        "task": "zoo_upper_choice",
        "custom_dataset": load_zoo_task,
        "dataset_kwargs": {"zoo_task": "upper"},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{[answer, answer.lower(), prompt[3:-1][::-1].upper()]}}",
        "doc_to_target": 0,
        "target_delimiter": "",
        "metric_list": [{"metric": "acc"}],
    }
    model = str(tiny_zoo.experts["upper"])
    result = run_tasks(MergescaleLM(hf, model), _inline(config), limit=40)["zoo_upper_choice"]
    docs = upper.examples("test", 40)
    right = 0
    for prompt, answer in docs:
        choices = [answer, answer.lower(), prompt[3:-1][::-1].upper()]
        ll = [x for x, _ in hf.loglikelihood(model, [(prompt, c) for c in choices])]
        right += int(max(range(3), key=ll.__getitem__) == 0)
    assert result.metrics["acc"] == pytest.approx(right / 40) and right / 40 > 0.8


def _inline(*configs: dict) -> dict:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False).load(list(configs))


# ---------------------------------------------------------------- vLLM evaluator actors on Ray
@pytest.fixture(scope="module")
def pool(ray_session, tiny_zoo):
    from mergescale.orchestrator.eval_pool import EvaluatorPool

    p = EvaluatorPool("vllm", actors=1, threads=1)
    yield p
    p.shutdown()


def _lease_call(pool, model, fn):
    return pool.map(lambda lease, m: fn(lease, m), [str(model)])[0]


@pytest.mark.zoo
@pytest.mark.ray
@pytest.mark.engine
def test_vllm_and_hf_agree_on_the_zoo(tiny_zoo, pool, hf, tmp_path):
    gen, pairs = _requests()
    model = str(tiny_zoo.experts["upper"])
    ref_hf = hf.reference(model, [r.prompt for r in gen[:20]], 7, str(tmp_path / "ref_hf.safetensors"))

    def ask(lease, m):
        ref = lease.reference(m, [r.prompt for r in gen[:20]], 7, str(tmp_path / "ref_vllm.safetensors"))
        return (lease.generate(m, gen), lease.loglikelihood(m, pairs), lease.loglikelihood_rolling(m, ["up:abc=ABC"]),
                lease.divergence(str(tiny_zoo.experts["shift1"]), ref), lease.divergence(m, ref))  # fmt: skip

    v_gen, v_ll, v_roll, v_div, v_self = _lease_call(pool, model, ask)
    assert v_gen == hf.generate(model, gen)
    assert v_gen[0] == get_task("upper").answer(gen[0].prompt[3:-1])
    h_ll = hf.loglikelihood(model, pairs)
    assert [g for _, g in v_ll] == [g for _, g in h_ll]
    assert max(abs(a - b) for (a, _), (b, _) in zip(v_ll, h_ll, strict=True)) < 1e-3
    assert v_roll[0] == pytest.approx(hf.loglikelihood_rolling(model, ["up:abc=ABC"])[0], abs=1e-3)
    h_div = hf.divergence(str(tiny_zoo.experts["shift1"]), ref_hf)
    assert v_div["js"] == pytest.approx(h_div["js"], rel=1e-3) and v_div["kl"] == pytest.approx(h_div["kl"], rel=1e-3)
    assert (
        v_div["js"] > 0.01 and v_self["js"] == pytest.approx(0, abs=1e-6) and v_self["kl"] == pytest.approx(0, abs=1e-5)
    )


@pytest.mark.zoo
@pytest.mark.ray
@pytest.mark.engine
def test_hot_swapped_weights_give_exactly_a_fresh_engines_outputs(tiny_zoo, pool, ray_session):
    from mergescale.orchestrator.eval_pool import EvaluatorPool

    gen, pairs = _requests()
    a, b = str(tiny_zoo.experts["atbash"]), str(tiny_zoo.experts["upper"])
    before = pool.stats()

    def ask(lease, m):
        return lease.generate(m, gen), lease.loglikelihood(m, pairs), lease.info()

    _lease_call(pool, a, ask)
    swapped = _lease_call(pool, b, ask)
    assert pool.stats()["engines_started"] == before["engines_started"], "the engine was restarted, not swapped"
    assert swapped[2]["swaps"] >= 1 and swapped[2]["path"] == b
    fresh_pool = EvaluatorPool("vllm", actors=1, threads=1)
    try:
        fresh = _lease_call(fresh_pool, b, ask)
    finally:
        fresh_pool.shutdown()
    assert fresh[2]["swaps"] == 0 and fresh[2]["starts"] == 1
    assert swapped[0] == fresh[0] and swapped[1] == fresh[1]  # exactly, not approximately


def _evaluator_processes(method: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith(f"ray::Evaluator.{method}"):
            found.append(proc)
    return found


@pytest.mark.zoo
@pytest.mark.ray
@pytest.mark.engine
def test_an_actor_killed_mid_evaluation_is_replaced_and_no_result_is_lost_or_doubled(tiny_zoo, pool):
    from mergescale.orchestrator.evaluate import evaluate_models

    models = [str(tiny_zoo.experts[t]) for t in ("upper", "shift1", "rot13")]
    kwargs = dict(tasks=["zoo_upper", "zoo_copy"], limit=30, divergences=False, pool=pool, progress=False)
    clean = evaluate_models(models, **kwargs)
    killed: list[int] = []

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for proc in _evaluator_processes("generate"):
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
            time.sleep(0.05)

    lost_before = pool.stats()["actors_lost"]
    thread = threading.Thread(target=killer)
    thread.start()
    try:
        report = evaluate_models(models, **kwargs)
    finally:
        killed.append(-1)
        thread.join()
    assert killed[0] > 0, "no evaluator was seen mid-evaluation"
    assert pool.stats()["actors_lost"] == lost_before + 1

    def key(rows):
        return sorted((r["model"], r["task"], r["metric"], r["value"]) for r in rows if r["kind"] == "score")

    assert len(key(report.rows)) == len(models) * 2 * 2  # models x tasks x metrics, each once
    assert key(report.rows) == key(clean.rows)


# ---------------------------------------------------------------- scores are lm-eval's own
def _llama_like_copy(src: str, dst) -> str:
    """A copy of a zoo model whose tokenizer, like a Llama-family one, has a BOS token ``<s>`` that it
    prepends to every text, and a space token (the zoo's tokenizer drops spaces), so that a context's
    trailing whitespace changes what is scored.  The two new embedding and output rows are random."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)

    def edit(name, fn):
        data = json.loads((dst / name).read_text())
        fn(data)
        (dst / name).write_text(json.dumps(data, indent=1))

    config = json.loads((dst / "config.json").read_text())
    bos, space = config["vocab_size"], config["vocab_size"] + 1
    edit("config.json", lambda c: c.update(vocab_size=bos + 2, bos_token_id=bos))
    edit("generation_config.json", lambda c: c.update(bos_token_id=bos))
    edit("tokenizer_config.json", lambda c: c.update(bos_token="<s>"))

    def tokenizer(t):
        t["model"]["vocab"].update({"<s>": bos, " ": space})
        t["added_tokens"].append({"id": bos, "content": "<s>", "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True})  # fmt: skip
        seq = {"Sequence": {"id": "A", "type_id": 0}}
        t["post_processor"] = {
            "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, seq],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, seq, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [bos], "tokens": ["<s>"]}},
        }  # fmt: skip

    edit("tokenizer.json", tokenizer)
    tensors = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t = tensors[name]
        tensors[name] = torch.cat([t, torch.randn(2, t.shape[1], generator=g) * t.std()])
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def _per_document(lm, limit: int = 20) -> dict[str, list]:
    """lm-eval's own responses, per task in document order, for a log-likelihood task (about half the
    contexts empty, the rest ending in a space), a rolling log-likelihood task and the zoo's upper
    generation task."""
    from lm_eval.evaluator import evaluate

    from mergescale.eval.lm_tasks.zoo.utils import load_zoo_task

    common = {"custom_dataset": load_zoo_task, "dataset_kwargs": {"zoo_task": "upper"}, "test_split": "test"}
    inline = _inline(
        {**common, "task": "zoo_upper_ll", "output_type": "loglikelihood", "target_delimiter": "",
         "doc_to_text": "{% if prompt[3] < 'n' %}{{prompt}} {% endif %}", "doc_to_target": "{{answer}}",
         "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}]},
        {**common, "task": "zoo_upper_rolling", "output_type": "loglikelihood_rolling", "doc_to_text": "",
         "doc_to_target": "{{prompt}} {{answer}}", "metric_list": [{"metric": "byte_perplexity"}]},
    )  # fmt: skip
    tasks = {"tasks": {**inline["tasks"], **load_tasks(["zoo_upper"])["tasks"]}, "groups": {}, "group_map": {}}
    got = evaluate(lm, tasks, limit=limit, log_samples=True, verbosity="ERROR")
    return {t: [s["resps"][0][0] for s in sorted(got["samples"][t], key=lambda s: s["doc_id"])] for t in tasks["tasks"]}


def _logprob(response) -> float:
    """A log-likelihood response's value: ``(logprob, is_greedy)``, or a rolling task's plain number."""
    return response[0] if isinstance(response, tuple | list) else response


@pytest.mark.zoo
@pytest.mark.ray
@pytest.mark.engine
@pytest.mark.parametrize("tokenizer", ["zoo", "bos"])
def test_scores_are_lm_evals_own_hf_model_document_by_document(tiny_zoo, pool, tokenizer, tmp_path):
    """lm-eval's own ``hf`` model and mergescale's HF and vLLM backends on the same model: equal greedy
    outputs, log-likelihoods within 1e-4, with the zoo's tokenizer and with a Llama-like one (BOS)."""
    from lm_eval.models.huggingface import HFLM

    model = str(tiny_zoo.experts["upper"])
    if tokenizer == "bos":
        model = _llama_like_copy(model, tmp_path / "bos")
    theirs = _per_document(HFLM(pretrained=model, device="cpu", batch_size=1))
    ours = {
        "hf": _per_document(MergescaleLM(Evaluator("hf", threads=2), model)),
        "vllm": pool.run(lambda lease, m: _per_document(MergescaleLM(lease, m)), model),
    }
    assert len(theirs["zoo_upper_ll"]) == len(theirs["zoo_upper_rolling"]) == len(theirs["zoo_upper"]) == 20
    for backend, got in ours.items():
        assert got["zoo_upper"] == theirs["zoo_upper"], backend
        assert [g for _, g in got["zoo_upper_ll"]] == [g for _, g in theirs["zoo_upper_ll"]], backend
        for task in ("zoo_upper_ll", "zoo_upper_rolling"):
            mine, ref = (torch.tensor([_logprob(x) for x in r[task]], dtype=torch.float64) for r in (got, theirs))
            assert (mine - ref).abs().max() < 1e-4, (backend, task, (mine - ref).abs().max())


@pytest.mark.zoo
@pytest.mark.ray
@pytest.mark.engine
def test_cli_eval_scores_a_merged_model_against_the_zoo(tiny_zoo, pool, tmp_path):
    """`mergescale eval` end to end: a task-arithmetic merge of two experts, the zoo's base and experts
    as references, raw / normalized / ANP / divergence rows in Parquet."""
    from mergescale.cli import main
    from mergescale.orchestrator.merge import run_merge
    from mergescale.specs import MergeSpec

    spec = MergeSpec.model_validate({
        "method": "task_arithmetic", "base": str(tiny_zoo.base), "parameters": {"lambda": 0.5},
        "experts": [str(tiny_zoo.experts["upper"]), str(tiny_zoo.experts["shift1"])],
    })  # fmt: skip
    merged = run_merge(spec, tmp_path / "merged", progress=False).path
    pool.shutdown()  # the command starts its own pool; give it the CPU
    code = main(["eval", str(merged), "--zoo", str(tiny_zoo.root), "--tasks", "zoo_upper,zoo_shift1,zoo_copy",
                 "--limit", "50", "--threads", "1", "--out", str(tmp_path / "res"), "--quiet"])  # fmt: skip
    assert code == 0
    table = pq.read_table(tmp_path / "res" / "eval.parquet")
    assert table.schema == scores.SCHEMA
    rows = table.to_pylist()
    mine = {(r["task"], r["kind"], r["metric"]): r for r in rows if r["model"] == str(merged.resolve())}
    assert mine[("zoo_upper", "score", "exact_match")]["reference"] == str(tiny_zoo.experts["upper"].resolve())
    assert mine[("zoo_copy", "score", "exact_match")]["reference"] == str(tiny_zoo.base.resolve())
    anp = mine[("(held-in)", "summary", "exact_match")]["normalized"]
    held_in = [mine[(t, "score", "exact_match")]["normalized"] for t in ("zoo_upper", "zoo_shift1")]
    assert anp == pytest.approx(sum(held_in) / 2) and 0.5 < anp <= 1.05
    assert 0 < mine[("zoo_upper", "divergence", "js")]["value"] < math.log(2)
    experts = {r["model"] for r in rows if r["task"] == "zoo_upper" and r["kind"] == "score"}
    assert len(experts) == 4  # merged, base and the two held-in experts, each scored once


@pytest.mark.zoo
@pytest.mark.engine
def test_a_users_task_yaml_runs_through_include_path(tiny_zoo, hf, tmp_path):
    """A task the user writes (here: the zoo's copy task under another name, few-shot) is found by
    --include-path and scored like any other."""
    (tmp_path / "my_copy.yaml").write_text(
        (TASKS_DIR / "zoo" / "zoo_copy.yaml").read_text().replace("task: zoo_copy", "task: my_copy")
        .replace("!function utils.", "!function my_utils.")
        .replace("  - zoo_held_out\n", "  - mine\n").replace("  - zoo\n", "")
    )  # fmt: skip
    (tmp_path / "my_utils.py").write_text("from mergescale.eval.lm_tasks.zoo.utils import *  # noqa\n")
    model = str(tiny_zoo.base)
    mine = run_tasks(MergescaleLM(hf, model), load_tasks(["mine"], include_paths=[tmp_path]), limit=30)
    ours = run_tasks(MergescaleLM(hf, model), load_tasks(["zoo_copy"]), limit=30)
    assert list(mine) == ["my_copy"] and mine["my_copy"].metrics == ours["zoo_copy"].metrics
