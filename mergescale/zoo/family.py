"""The scale family: one recipe, members by size × base quality × seed (docs/ALGORITHMS.md#zoo-families).

A member is built in a child process whose numeric kernels are pinned (:data:`PINNED_ENV`: torch's
AVX2 kernels, MKL's strict conditional-numerical-reproducibility AVX2 branch, oneDNN capped at AVX2,
``TRAIN_THREADS`` threads), so that a seed gives the same bytes on any x86-64 host with AVX2 and under
any thread setting of the caller.  The child reports progress as JSON lines on its standard output;
the parent draws the bar.

Stages of a member (every model is trained from the one before it, same batch and data order for
every size):

1. **base** — ``base_steps`` on ``scale_base_mixture()``; the same bytes for ``pretrained`` and
   ``instruct`` members of a size and seed (an instruct build starts from the pretrained member's base
   when that member is in the cache);
2. **instruct** (instruct members only) — ``instruct_steps`` more on ``instruct_mixture()``;
3. **experts** — from the member's base, one per held-in task, each with its own steps, learning rate
   and data size (:func:`expert_recipe`), half of each batch replaying the mixture the base was last
   trained on;
4. **multitask** — from the member's base, ``multitask_steps`` on all held-in tasks at once (same
   replay): the upper reference of the paper.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

from mergescale.errors import MergescaleError
from mergescale.zoo.build import TRAIN_THREADS  # the bytes were checked equal under 1 and 2: tests/test_zoo.py

THREADS_ENV = "MERGESCALE_TRAIN_THREADS"
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "PYTHONHASHSEED": "0",
}
#: data sizes of the experts: distinct training inputs, log-uniform in [2^8, 2^12]
POOL_LOG2 = (8, 12)


def expert_recipe(spec, task: str) -> dict:
    """Steps, learning rate and data size of ``task``'s expert: the preset's values times multipliers
    drawn log-uniformly in [2^-spread, 2^spread] from the task's name alone, so they are the same for
    every size and seed (no factor of the study is confounded with an expert's budget)."""
    if not spec.spread:
        return {"steps": spec.expert_steps, "lr": spec.expert_lr, "pool": None}
    rng = random.Random(f"expert-recipe/{task}")
    steps = 2 ** rng.uniform(-spec.spread, spec.spread)
    lr = 2 ** rng.uniform(-spec.spread, spec.spread)
    pool = round(2 ** rng.uniform(*POOL_LOG2))
    return {"steps": max(2, round(spec.expert_steps * steps)), "lr": float(f"{spec.expert_lr * lr:.4g}"), "pool": pool}


def parameters(spec) -> int:
    """Parameters of a member's model (untied embeddings and head, head_dim 64)."""
    from mergescale.zoo.tokenizer import vocab

    h, kv, inter, v = spec.hidden, 64 * spec.kv_heads, spec.intermediate, len(vocab())
    layer = 2 * h * h + h + 2 * (h * kv + kv) + 3 * h * inter + 2 * h
    return spec.layers * layer + 2 * v * h + h


# ---------------------------------------------------------------- parent side
def build_in_child(spec, root: Path, progress) -> dict:
    """Build ``spec``'s member into ``root`` in a child process with pinned kernels; returns its meta.
    ``progress(description, advance, total)`` is called for every report of the child."""
    import dataclasses

    threads = os.environ.get(THREADS_ENV, str(TRAIN_THREADS))
    env = {**os.environ, **PINNED_ENV, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, THREADS_ENV: threads}
    cmd = [sys.executable, "-m", "mergescale.zoo.family", json.dumps(dataclasses.asdict(spec)), str(root)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)  # stderr: the session's log
    meta = None
    for line in child.stdout:
        event = json.loads(line)
        if "meta" in event:
            meta = event["meta"]
        else:
            progress(event["stage"], event["advance"], event["total"])
    if child.wait() != 0 or meta is None:
        raise MergescaleError(
            f"bug: the zoo build of preset {spec.preset} (seed {spec.seed}, {spec.base_quality}) failed in its "
            f"training process (exit {child.returncode}); its traceback is in the log"
        )
    return meta


# ---------------------------------------------------------------- child side
def _emit(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _state_sha(state: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def _pretrained_base(spec):
    """The pretrained member's base state from the cache, or None when that member is not built."""
    import dataclasses

    from safetensors.torch import load_file

    from mergescale.cache import cache_root

    twin = dataclasses.replace(spec, base_quality="pretrained", instruct_steps=0)
    path = cache_root() / "zoo" / twin.key()
    if not (path / "zoo.json").is_file():
        return None
    return load_file(path / "base" / "model.safetensors")


def build_member(spec, root: Path) -> dict:
    """The child's work: train and save every model of the member, score them, return the meta."""
    import time

    from mergescale.zoo.tasks import EDITING_TASKS

    if spec.tasks == EDITING_TASKS:
        from mergescale.zoo import editing

        return editing.build_member(spec, root)

    import torch
    from transformers import Qwen2ForCausalLM

    from mergescale.zoo import tasks as T
    from mergescale.zoo.build import evaluate_model, save_model
    from mergescale.zoo.train import model_config, train

    started = time.perf_counter()
    torch.set_num_threads(int(os.environ.get(THREADS_ENV, TRAIN_THREADS)))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    held_in = list(T.HELD_IN)
    eval_tasks = held_in + list(T.SCALE_HELD_OUT) + list(T.HELD_OUT)
    recipes = {t.name: expert_recipe(spec, t.name) for t in held_in}
    instruct = spec.base_quality == "instruct"
    total = spec.base_steps + (spec.instruct_steps if instruct else 0)
    total += sum(r["steps"] for r in recipes.values()) + spec.multitask_steps

    def tick(stage: str):
        return lambda: _emit(stage=stage, advance=1, total=total)

    torch.manual_seed(spec.seed)
    cfg = model_config(spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.intermediate)
    model = Qwen2ForCausalLM(cfg)
    log = {}
    pretrained = _pretrained_base(spec) if instruct else None
    if pretrained is not None:
        model.load_state_dict(pretrained)
        _emit(stage="base (from the cached pretrained member)", advance=spec.base_steps, total=total)
        log["base"] = {"reused": "pretrained member's base"}
    else:
        loss = train(model, T.scale_base_mixture(), steps=spec.base_steps, lr=spec.base_lr, warmup=spec.base_warmup,
                     batch=spec.batch, seed=spec.seed, weight_decay=0.01, progress=tick("base"))  # fmt: skip
        log["base"] = {"steps": spec.base_steps, "lr": spec.base_lr, "final_loss": round(loss, 4)}
    log["base"]["pretrained_sha256"] = _state_sha(model.state_dict())
    replay = T.scale_base_mixture()
    if instruct:
        loss = train(model, T.instruct_mixture(), steps=spec.instruct_steps, lr=spec.base_lr,
                     warmup=spec.base_warmup, batch=spec.batch, seed=spec.seed * 1000 + 500,
                     weight_decay=0.01, progress=tick("instruct"))  # fmt: skip
        log["instruct"] = {"steps": spec.instruct_steps, "lr": spec.base_lr, "final_loss": round(loss, 4)}
        replay = T.instruct_mixture()
    from mergescale.zoo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    hashes = {"base": save_model(model, root / "base")}
    scores = {"base": evaluate_model(model, tokenizer, eval_tasks, spec.eval_examples)}
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    norms = {}
    for i, task in enumerate(held_in):
        model.load_state_dict(base_state)
        r = recipes[task.name]
        loss = train(model, T.family_expert_mixture([task], replay, r["pool"]), steps=r["steps"], lr=r["lr"],
                     warmup=min(spec.expert_warmup, r["steps"] // 2), batch=spec.batch, seed=spec.seed * 1000 + i + 1,
                     weight_decay=0.0, progress=tick(f"expert {task.name}"))  # fmt: skip
        state = model.state_dict()
        norms[task.name] = math.sqrt(sum(float((state[k] - base_state[k]).double().pow(2).sum()) for k in state))
        log[task.name] = {**r, "final_loss": round(loss, 4), "task_vector_norm": round(norms[task.name], 4)}
        hashes[task.name] = save_model(model, root / "experts" / task.name)
        scores[task.name] = evaluate_model(model, tokenizer, eval_tasks, spec.eval_examples)
    model.load_state_dict(base_state)
    loss = train(model, T.family_expert_mixture(held_in, replay), steps=spec.multitask_steps, lr=spec.expert_lr,
                 warmup=spec.expert_warmup, batch=spec.batch, seed=spec.seed * 1000 + 900, weight_decay=0.0,
                 progress=tick("multitask"))  # fmt: skip
    log["multitask"] = {"steps": spec.multitask_steps, "lr": spec.expert_lr, "final_loss": round(loss, 4)}
    hashes["multitask"] = save_model(model, root / "multitask")
    scores["multitask"] = evaluate_model(model, tokenizer, eval_tasks, spec.eval_examples)
    return {
        "experts": {t.name: f"experts/{t.name}" for t in held_in},
        "multitask": "multitask",
        "tasks": {
            "held_in": [t.name for t in held_in],
            "held_out": [t.name for t in T.SCALE_HELD_OUT],
            "retention": [t.name for t in T.HELD_OUT],
        },
        "factors": {"size": spec.preset, "n_parameters": parameters(spec), "base_quality": spec.base_quality,
                    "zoo_seed": spec.seed},  # fmt: skip
        "training": log,
        "kernels": {"aten": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                    **{k: os.environ.get(k) for k in PINNED_ENV}},  # fmt: skip
        "weights_sha256": hashes,
        "scores": {"test": scores, "n_examples": spec.eval_examples},
        "build_seconds": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    from mergescale.zoo.build import ZooSpec

    member = ZooSpec(**json.loads(sys.argv[1]))
    _emit(meta=build_member(member, Path(sys.argv[2])))
