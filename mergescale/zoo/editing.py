"""The editing zoo (preset ``edit``): the models task-vector editing experiments need
(docs/ALGORITHMS.md#the-editing-zoo).  Built like a scale-family member, in a child process with pinned
kernels (``zoo/family.py``); tiny's architecture.

1. **base** — ``base_steps`` on ``editing_base_mixture()``: the mixture and its upper versions on every
   letter, and three analogy pairs (shift1 / ushift1, rot13 / urot13, atbash / uatbash) on each lowercase
   map's known letters.  The state after each ``base_steps / checkpoints`` steps is kept: the pretraining
   checkpoints M1 … Mk (Mk is the base itself);
2. **next version** (``v2``) — Mk trained ``next_steps`` more on shifted data: the same mixture with the
   analogy pairs' known letters drawn anew;
3. **experts** — from Mk, one per analogy task (the three maps and their upper versions), half of each
   batch replaying the base's mixture;
4. **transfer experts** — ``ft-M1`` … ``ft-M(k-1)`` and ``ft-v2``: the transfer task (rot13) fine-tuned
   from each checkpoint and from v2, with the rot13 expert's recipe and data order (FT(Mk) is the
   rot13 expert itself), replaying the mixture that checkpoint was trained on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

#: the zoo.json name of every checkpoint model (Mk is "base"), the next version and the transfer experts
NEXT = "v2"


def checkpoint_names(spec) -> list[str]:
    return [f"M{i}" for i in range(1, spec.checkpoints + 1)]


def build_member(spec, root: Path) -> dict:
    """Train and save every model of the editing zoo, score them, return the meta (the child's work)."""
    import torch
    from transformers import Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    from mergescale.zoo import tasks as T
    from mergescale.zoo.build import TRAIN_THREADS, evaluate_model, save_model
    from mergescale.zoo.family import THREADS_ENV, _emit, parameters
    from mergescale.zoo.tokenizer import build_tokenizer
    from mergescale.zoo.train import model_config, train

    started = time.perf_counter()
    torch.set_num_threads(int(os.environ.get(THREADS_ENV, TRAIN_THREADS)))
    hf_logging.disable_progress_bar()
    tokenizer = build_tokenizer()
    experts = list(T.EDITING_HELD_IN)
    transfer = T.get_task(T.TRANSFER_TASK)
    names = checkpoint_names(spec)
    total = spec.base_steps + spec.next_steps + spec.expert_steps * (len(experts) + len(names))
    eval_tasks = experts + list(T.HELD_OUT)

    def tick(stage: str):
        return lambda: _emit(stage=stage, advance=1, total=total)

    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(model_config(spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.intermediate))
    every = spec.base_steps // spec.checkpoints
    states: dict[str, dict] = {}

    def keep(step: int) -> None:
        if step % every == 0 and step // every <= spec.checkpoints:
            states[f"M{step // every}"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    log: dict = {}
    loss = train(model, T.editing_base_mixture(), steps=spec.base_steps, lr=spec.base_lr,
                 warmup=spec.base_warmup, batch=spec.batch, seed=spec.seed, weight_decay=0.01, progress=tick("base"),
                 after_step=keep)  # fmt: skip
    log["base"] = {"steps": spec.base_steps, "checkpoints_every": every, "final_loss": round(loss, 4)}
    paths = {name: f"checkpoints/{name}" for name in names[:-1]} | {names[-1]: "base"}
    hashes, scores = {}, {}

    def save(name: str, rel: str) -> None:
        hashes[name] = save_model(model, root / rel)
        scores[name] = evaluate_model(model, tokenizer, eval_tasks, spec.eval_examples)

    for name in names:
        model.load_state_dict(states[name])
        save(name if name != names[-1] else "base", paths[name])
    # the next version: the last checkpoint trained further on shifted data
    model.load_state_dict(states[names[-1]])
    loss = train(model, T.editing_base_mixture(NEXT), steps=spec.next_steps, lr=spec.base_lr,
                 warmup=spec.base_warmup, batch=spec.batch, seed=spec.seed * 1000 + 700, weight_decay=0.01,
                 progress=tick("next version"))  # fmt: skip
    log[NEXT] = {"steps": spec.next_steps, "final_loss": round(loss, 4)}
    states[NEXT] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save(NEXT, "next")

    def fine_tune(start: str, task, seed: int, replay: list) -> float:
        model.load_state_dict(states[start])
        return train(model, T.family_expert_mixture([task], replay), steps=spec.expert_steps, lr=spec.expert_lr,
                     warmup=spec.expert_warmup, batch=spec.batch, seed=seed, weight_decay=0.0,
                     progress=tick(f"expert {task.name} from {start}"))  # fmt: skip

    seeds = {t.name: spec.seed * 1000 + i + 1 for i, t in enumerate(experts)}
    for task in experts:
        loss = fine_tune(names[-1], task, seeds[task.name], T.editing_base_mixture())
        log[task.name] = {"steps": spec.expert_steps, "lr": spec.expert_lr, "final_loss": round(loss, 4)}
        save(task.name, f"experts/{task.name}")
    models = {name: paths[name] for name in names[:-1]} | {NEXT: "next"}
    models[f"ft-{names[-1]}"] = f"experts/{transfer.name}"
    for start in [*names[:-1], NEXT]:
        replay = T.editing_base_mixture(NEXT if start == NEXT else "")
        loss = fine_tune(start, transfer, seeds[transfer.name], replay)
        log[f"ft-{start}"] = {"steps": spec.expert_steps, "lr": spec.expert_lr, "final_loss": round(loss, 4)}
        save(f"ft-{start}", f"transfer/ft-{start}")
        models[f"ft-{start}"] = f"transfer/ft-{start}"
    return {
        "experts": {t.name: f"experts/{t.name}" for t in experts},
        "models": models,  # zoo:NAME references besides base and the experts
        "checkpoints": names,
        "transfer_task": transfer.name,
        "tasks": {"held_in": [t.name for t in experts], "held_out": [t.name for t in T.HELD_OUT]},
        "factors": {"size": spec.preset, "n_parameters": parameters(spec), "base_quality": spec.base_quality,
                    "zoo_seed": spec.seed},  # fmt: skip
        "training": log,
        "kernels": {"aten": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()},
        "weights_sha256": hashes,
        "scores": {"test": scores, "n_examples": spec.eval_examples},
        "build_seconds": round(time.perf_counter() - started, 1),
    }
