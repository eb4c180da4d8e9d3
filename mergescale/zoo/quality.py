"""The zoo's merge-quality bars: is this zoo one where model merging is meaningful?

* every expert solves its own task (test exact match ≥ 85 %);
* the base does not (≤ 30 % on every held-in task);
* task arithmetic of any two experts keeps ≥ 40 % of each expert's own score (the trained bytes depend
  on the host's floating-point kernels: the worst pair measured 61 % on one host, 42 % on another);
* the plain average of all eight experts scores clearly below the two-expert merges
  (interference grows with the number of experts, as it does at scale).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from rich.table import Table
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2ForCausalLM

from mergescale import console as terminal
from mergescale.eval.greedy import score_tasks
from mergescale.merge_ops.linear import task_arithmetic
from mergescale.zoo.build import Zoo

EXPERT_MIN, BASE_MAX, PAIR_KEEP = 0.85, 0.30, 0.40
PAIR_LAMBDAS = (0.5, 1.0)


@dataclass
class Quality:
    expert: dict[str, float]  # expert's exact match on its own task
    base: dict[str, float]  # base's exact match on each held-in task
    #: λ -> (task a, task b) -> (merged score on a, merged score on b)
    pairs: dict[float, dict[tuple[str, str], tuple[float, float]]] = field(default_factory=dict)
    average_all: dict[str, float] = field(default_factory=dict)  # plain average of every expert, per held-in task

    def normalized_pairs(self, lam: float) -> list[float]:
        """Each two-expert merge's score on each member's task, over that expert's own score."""
        return [
            score / max(self.expert[task], 1e-9)
            for pair, scores in self.pairs[lam].items()
            for task, score in zip(pair, scores, strict=True)
        ]

    def pair_keep(self, lam: float) -> float:
        """Worst fraction of an expert's own score kept by a two-expert merge at ``lam``."""
        return min(self.normalized_pairs(lam))

    def pair_mean(self, lam: float) -> float:
        """Mean normalized held-in score of the two-expert merges at ``lam``."""
        vals = self.normalized_pairs(lam)
        return sum(vals) / len(vals)

    def average_all_mean(self) -> float:
        vals = [s / self.expert[t] for t, s in self.average_all.items()]
        return sum(vals) / len(vals)


def _merged(base_sd: dict, expert_sds: list[dict], lam: float) -> dict:
    ones = [1.0] * len(expert_sds)
    return {k: task_arithmetic(v, [e[k] for e in expert_sds], ones, lam) for k, v in base_sd.items()}


@torch.inference_mode()
def measure_quality(zoo: Zoo) -> Quality:
    n = zoo.meta["scores"]["n_examples"]
    names = [t.name for t in zoo.held_in]
    tasks = {t.name: t for t in zoo.held_in}
    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    model = Qwen2ForCausalLM.from_pretrained(zoo.base)
    base_sd = load_file(zoo.base / "model.safetensors")
    expert_sds = {name: load_file(path / "model.safetensors") for name, path in zoo.experts.items()}
    examples = {name: tasks[name].examples("test", n) for name in names}

    def run(state: dict, on: list[str]) -> list[float]:
        model.load_state_dict(state)
        scores = score_tasks(model, tokenizer, {t: examples[t] for t in on})
        return [scores[t].exact_match for t in on]

    q = Quality(
        expert={t: zoo.scores(t)[t]["exact_match"] for t in names},
        base={t: zoo.scores("base")[t]["exact_match"] for t in names},
    )
    for lam in PAIR_LAMBDAS:
        q.pairs[lam] = {}
        for a, b in itertools.combinations(names, 2):
            sa, sb = run(_merged(base_sd, [expert_sds[a], expert_sds[b]], lam), [a, b])
            q.pairs[lam][(a, b)] = (sa, sb)
    avg = run(_merged(base_sd, [expert_sds[t] for t in names], 1.0 / len(names)), names)
    q.average_all = dict(zip(names, avg, strict=False))
    return q


def print_quality(q: Quality) -> None:
    table = Table(title="zoo merge-quality bars (test exact match)")
    table.add_column("bar")
    table.add_column("measured", justify="right")
    table.add_column("required", justify="right")
    table.add_row("min expert score on own task", f"{min(q.expert.values()):.0%}", f">= {EXPERT_MIN:.0%}")
    table.add_row("max base score on a held-in task", f"{max(q.base.values()):.0%}", f"<= {BASE_MAX:.0%}")
    for lam in PAIR_LAMBDAS:
        table.add_row(
            f"worst kept fraction, 2-expert task arithmetic λ={lam}",
            f"{q.pair_keep(lam):.0%}",
            f">= {PAIR_KEEP:.0%}" if lam == PAIR_LAMBDAS[0] else "",
        )
        table.add_row(f"mean normalized score, 2-expert task arithmetic λ={lam}", f"{q.pair_mean(lam):.0%}", "")
    table.add_row(
        "mean normalized score, average of all experts", f"{q.average_all_mean():.0%}", "clearly below 2-expert"
    )
    terminal.results_console().print(table)
