"""Evaluation speed, side by side in one run: the evaluator pool hot-swapping weights vs restarting the
engine for every model, and the vLLM vs the Hugging Face backend, on the tiny zoo's task suite.

    python benchmarks/eval_speed.py --models 8 --restart-models 3 --limit 100

- **hot swap**: one pool (one vLLM CPU actor, 2 threads); the zoo's experts evaluated one after the
  other on every zoo task (8 held-in + 4 held-out, ``--limit`` documents each) through lm-eval. The
  first model pays the engine start; the others are swapped in place.
- **restart**: the same, but a new pool (a new actor and engine) for every model — what running
  lm-eval once per model does.
- **hf**: the hot-swap loop with the Hugging Face backend.
Per model it records the wall time, the time the actor spent computing (the engine's own work), the
time the swap (weight reload + prefix-cache reset) took, and the rest — lm-eval building requests and
scoring in the driver, Ray calls — as the per-model overhead. Medians over models (the first,
engine-starting model excluded from the hot-swap medians). Raw figures go to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")


def _one(pool, model: str, tasks: dict, limit: int) -> dict:
    from mergescale.eval.harness import run_tasks
    from mergescale.eval.lm import MergescaleLM

    def work(lease, m):
        before = lease.info()
        t0 = time.perf_counter()
        results = run_tasks(MergescaleLM(lease, m), tasks, limit)
        wall = time.perf_counter() - t0
        after = lease.info()
        return {
            "model": m,
            "wall_s": wall,
            "engine_s": after["busy_seconds"] - before["busy_seconds"],
            "load_s": after["load_seconds"] - before["load_seconds"],
            "docs": sum(r.n for r in results.values()),
            "exact_match": {t: r.metrics["exact_match"] for t, r in results.items()},
        }

    return pool.map(work, [model])[0]


def _loop(pools, models: list[str], tasks: dict, limit: int) -> list[dict]:
    out = []
    for model in models:
        pool = pools()
        t0 = time.perf_counter()
        rec = _one(pool, model, tasks, limit)
        rec["with_start_s"] = time.perf_counter() - t0
        out.append(rec)
    return out


def _summary(name: str, recs: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in recs)  # noqa: E731
    return {
        "run": name,
        "models": len(recs),
        "per_model_s": med("with_start_s"),
        "engine_s": med("engine_s"),
        "load_s": med("load_s"),
        "overhead_s": statistics.median(r["with_start_s"] - r["engine_s"] for r in recs),
        "docs_per_model": recs[0]["docs"],
        "examples_per_s": statistics.median(r["docs"] / r["with_start_s"] for r in recs),
        "engine_examples_per_s": statistics.median(r["docs"] / r["engine_s"] for r in recs),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--restart-models", type=int, default=3)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="/tmp/eval_speed.json")
    args = ap.parse_args()

    import ray

    from mergescale.eval.harness import load_tasks
    from mergescale.orchestrator.eval_pool import EvaluatorPool
    from mergescale.zoo.build import build_zoo, preset_spec

    zoo = build_zoo(preset_spec("tiny"), progress=False)
    experts = [str(p) for p in zoo.experts.values()]
    models = (experts * 4)[: args.models]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    tasks = load_tasks(["zoo"])
    print(f"suite: {len(tasks['tasks'])} tasks x {args.limit} docs; {len(models)} models")

    runs = {}
    for backend in ("vllm", "hf"):
        pool = EvaluatorPool(backend, actors=1, threads=args.threads)
        t0 = time.perf_counter()
        recs = _loop(lambda p=pool: p, models, tasks, args.limit)
        pool.shutdown()
        runs[f"{backend} hot swap"] = recs
        print(f"{backend} hot swap: {time.perf_counter() - t0:.1f} s for {len(models)} models "
              f"(first, with engine start: {recs[0]['with_start_s']:.1f} s)")  # fmt: skip

    pools: list = []

    def fresh():
        for p in pools:
            p.shutdown()
        pools.append(EvaluatorPool("vllm", actors=1, threads=args.threads))
        return pools[-1]

    runs["vllm restart"] = _loop(fresh, models[: args.restart_models], tasks, args.limit)
    for p in pools:
        p.shutdown()

    # the same models score the same whichever way they were evaluated
    for rec in runs["vllm restart"]:
        twin = next(r for r in runs["vllm hot swap"] if r["model"] == rec["model"])
        assert rec["exact_match"] == twin["exact_match"], (rec["model"], rec["exact_match"], twin["exact_match"])

    table = [
        _summary("vllm, hot swap (models 2..n)", runs["vllm hot swap"][1:]),
        _summary("vllm, engine restarted per model", runs["vllm restart"]),
        _summary("hf, weights copied in place (models 2..n)", runs["hf hot swap"][1:]),
    ]
    print("\n| run | models | s / model | engine compute s | swap s | overhead s | examples/s | engine examples/s |")
    print("|---|---|---|---|---|---|---|---|")
    for s in table:
        print(f"| {s['run']} | {s['models']} | {s['per_model_s']:.2f} | {s['engine_s']:.2f} | {s['load_s']:.3f} | "
              f"{s['overhead_s']:.2f} | {s['examples_per_s']:.0f} | {s['engine_examples_per_s']:.0f} |")  # fmt: skip
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "runs": runs, "summary": table}, f, indent=1)
    print(f"\nraw figures: {args.json}")


if __name__ == "__main__":
    main()
