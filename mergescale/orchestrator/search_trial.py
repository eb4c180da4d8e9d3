"""One Tune trial of a coefficient search (``search.py``), in a module of its own: a trial's actor
imports this module to run it, and it imports Ray and nothing else — no torch, no lm-eval — since the
trial only hands its vector to the search's runner actor and reports what comes back."""

from __future__ import annotations

import ray


def trial(config: dict, runner, budgets: list) -> None:
    """Wait for trial ``config["trial"]``'s vector (drawn when its batch may start), then score it on each
    document budget in turn (one ASHA rung each), reporting the objective and its parts to Tune after each."""
    from ray import tune

    vector = ray.get(runner.vector.remote(config["trial"]))
    for rung, limit in enumerate(budgets):
        metrics = ray.get(runner.evaluate.remote(config["trial"], vector, limit))
        tune.report({**{k: v for k, v in metrics.items() if k != "model_path"}, "rung": rung})
