"""Evaluation results as rows: raw metrics, normalized scores, average normalized performance and
divergences (``docs/ALGORITHMS.md#evaluation-quantities``).  Pure functions on plain dicts; ``SCHEMA`` is
the pyarrow schema of the rows, so any list of them can become a Parquet file.

Row kinds:

* ``score`` — one lm-eval metric of one model on one task.  ``normalized`` = value / the same
  metric of the task's expert (held-in) or of the base (held-out); null without a reference or
  when the reference scored 0.
* ``divergence`` — ``js`` or ``kl`` (KL(expert ‖ model)) of the model against a held-in task's
  expert, on that task's prompts along the expert's greedy continuations; ``reference`` names the
  expert, ``n`` counts examples.
* ``summary`` — per model and metric, over its held-in tasks (task ``(held-in)``) or its held-out
  tasks (task ``(held-out)``): ``value`` is the mean raw metric, ``normalized`` the mean normalized
  score — for held-in that is the average normalized performance (ANP).  Held-out is never averaged
  into ANP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pyarrow as pa

HELD_IN, HELD_OUT = "held_in", "held_out"
SUMMARY_TASK = {HELD_IN: "(held-in)", HELD_OUT: "(held-out)"}

SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),  # the model directory as given
        pa.field("weights_sha256", pa.string()),  # checkpoints.weights_sha256 of the model's weights
        pa.field("task", pa.string(), nullable=False),  # lm-eval task name, or a SUMMARY_TASK label
        pa.field("role", pa.string(), nullable=False),  # held_in | held_out
        pa.field("kind", pa.string(), nullable=False),  # score | divergence | summary
        pa.field("metric", pa.string(), nullable=False),  # lm-eval metric (filter appended as /name), js, kl
        pa.field("value", pa.float64()),  # raw value (summary: mean raw value)
        pa.field("stderr", pa.float64()),  # lm-eval's standard error of the metric, when it reports one
        pa.field("normalized", pa.float64()),  # see the module docstring; summary: ANP (held-in)
        pa.field("reference", pa.string()),  # the model normalized against / measured against
        pa.field("n", pa.int64()),  # documents scored (score), examples (divergence), tasks (summary)
        pa.field("primary", pa.bool_()),  # the task's headline metric (its first listed metric)
        pa.field("backend", pa.string()),  # vllm | hf
        pa.field("eval_seconds", pa.float64()),  # wall time of the model's whole evaluation
        pa.field("mergescale_version", pa.string()),
        pa.field("lm_eval_version", pa.string()),
    ]
)


def score_rows(model: str, results: Mapping, roles: Mapping[str, str]) -> list[dict]:
    """Rows of kind ``score`` from one model's ``{task: TaskResult}``."""
    rows = []
    for task, res in results.items():
        for metric, value in res.metrics.items():
            rows.append(dict(model=model, task=task, role=roles[task], kind="score", metric=metric, value=value,
                             stderr=res.stderr.get(metric), n=res.n, primary=metric == res.primary))  # fmt: skip
    return rows


def divergence_rows(model: str, divergences: Mapping[str, dict], experts: Mapping[str, str]) -> list[dict]:
    """Rows of kind ``divergence`` from ``{held-in task: {"js", "kl", "examples"}}``."""
    return [
        dict(
            model=model,
            task=task,
            role=HELD_IN,
            kind="divergence",
            metric=metric,
            value=d[metric],
            reference=experts[task],
            n=d["examples"],
            primary=metric == "js",
        )  # fmt: skip
        for task, d in divergences.items()
        for metric in ("js", "kl")
    ]


def normalize(rows: list[dict], base: str | None, experts: Mapping[str, str]) -> list[dict]:
    """Fill ``normalized`` and ``reference`` of score rows from the rows of the reference models, and
    append one summary row per model, role and metric.  Returns the rows (the input list, extended)."""
    scores = {(r["model"], r["task"], r["metric"]): r["value"] for r in rows if r["kind"] == "score"}
    for r in rows:
        if r["kind"] != "score":
            continue
        ref = experts.get(r["task"]) if r["role"] == HELD_IN else base
        ref_value = scores.get((ref, r["task"], r["metric"])) if ref else None
        r["reference"] = ref
        r["normalized"] = r["value"] / ref_value if ref_value else None
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["kind"] == "score":
            groups.setdefault((r["model"], r["role"], r["metric"]), []).append(r)
    for (model, role, metric), members in groups.items():
        normalized = [r["normalized"] for r in members]
        rows.append(dict(
            model=model, task=SUMMARY_TASK[role], role=role, kind="summary", metric=metric,
            value=sum(r["value"] for r in members) / len(members),
            normalized=sum(normalized) / len(normalized) if None not in normalized else None,
            n=len(members), primary=all(r["primary"] for r in members),
        ))  # fmt: skip
    return rows


def complete(rows: Iterable[dict], **common) -> list[dict]:
    """Every row with every schema column (``common`` fills columns the rows leave out)."""
    return [{f.name: r.get(f.name, common.get(f.name)) for f in SCHEMA} for r in rows]


def to_table(rows: Iterable[dict]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)
