"""The model card (``README.md``) of a merged model: what was merged, how, and the sha256 of every shard."""

from __future__ import annotations

import json

import mergescale
from mergescale.checkpoints import ShardInfo
from mergescale.methods import get_method
from mergescale.orchestrator.plan import MergePlan
from mergescale.specs import MergeSpec


def _fit_card(fit) -> list[str]:
    """The model card's account of a data-driven fit: its data and what it produced."""
    if fit is None:
        return []
    lines = ["## Data-driven fit", "", f"Fitted in {fit.seconds:.1f} s on (task, split, documents, seed):", ""]
    lines += [f"- `{d['task']}` {d['split']}: {d['count']} documents (asked {d['requested']}), seed {d['seed']}"
              for d in fit.data]  # fmt: skip
    lines += ["", "Fitted coefficients and statistics (every step in `fit.json`):", "", "```json",
              json.dumps(fit.summary, indent=1, sort_keys=True), "```", ""]  # fmt: skip
    return lines


def _stats_card(stats: dict | None) -> list[str]:
    """The model card's account of what the method's statistics passes found (e.g. AWD's fit)."""
    if stats is None:
        return []
    return ["## Statistics passes", "", "What the method computed over the whole model before merging:", "",
            "```json", json.dumps(stats, indent=1, sort_keys=True), "```", ""]  # fmt: skip


def _inputs(plan: MergePlan) -> list[str]:
    """The model card's list of one plan's inputs (a slice's with their layer ranges)."""
    ranges = plan.slice.ranges if plan.slice else [None] * len(plan.sources)

    def at(i: int) -> str:
        return f" layers [{ranges[i][0]}, {ranges[i][1]})" if ranges[i] else ""

    out = [f"- base: `{plan.base}`{at(0)}" if plan.base else "- base: none"]
    first = 1 if plan.base else 0
    for i, (path, expert) in enumerate(zip(plan.experts, plan.spec.experts, strict=True)):
        out.append(f"- expert: `{path}`{at(first + i)}" + (f" {json.dumps(expert.parameters)}" if expert.parameters
                                                           else ""))  # fmt: skip
    return out


def model_card(
    spec: MergeSpec, plans: list[MergePlan], shards: list[ShardInfo], fit=None, stats: dict | None = None
) -> str:
    """The card of a merge (one plan) or of a stack (one plan per slice, ``orchestrator/stack.py``); its
    configuration is ``spec``, the whole merge's (a slice's plan holds only that slice's)."""
    if plans[0].slice is None:
        inputs = [*_inputs(plans[0]), f"- parameters: `{json.dumps(spec.parameters, sort_keys=True)}`"]
    else:
        inputs = [f"A stack of {len(plans)} slice(s), {sum(p.num_layers for p in plans)} layers:", ""]
        for i, plan in enumerate(plans):
            first = plan.slice.offset
            inputs += [f"### Slice {i}: output layers {first}–{first + plan.num_layers - 1}"
                       + (" (and the embeddings)" if plan.slice.pre else "")
                       + (" (and the final norm, lm_head)" if plan.slice.post else ""), "", *_inputs(plan),
                       f"- parameters: `{json.dumps(plan.spec.parameters, sort_keys=True)}`", ""]  # fmt: skip
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, mergescale]",
        "---",
        "# Merged model",
        "",
        f"Merged with mergescale {mergescale.__version__} using **{get_method(spec.method).label(spec.parameters)}**"
        + (" (mergekit semantics)" if spec.semantics == "mergekit" else "") + ".",
        "",
        *inputs,
        f"- seed: {spec.seed}",
        f"- output dtype: {str(plans[0].out_dtype).removeprefix('torch.')}",
        "",
        "## Configuration",
        "",
        "```json",
        spec.model_dump_json(indent=2, exclude_none=True),
        "```",
        "",
        *_fit_card(fit),
        *_stats_card(stats),
        "## Shards (sha256)",
        "",
        *[f"- `{s.file}`: `{s.sha256}`" for s in shards],
        "",
    ]  # fmt: skip
    return "\n".join(lines)
