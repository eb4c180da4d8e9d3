"""The model card (``README.md``) of a merged model: what was merged, how, and the sha256 of every shard."""

from __future__ import annotations

import json

import mergescale
from mergescale.checkpoints import ShardInfo
from mergescale.methods import get_method
from mergescale.orchestrator.plan import MergePlan


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


def model_card(plan: MergePlan, shards: list[ShardInfo], fit=None, stats: dict | None = None) -> str:
    spec = plan.spec
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
        f"- base: `{plan.base}`" if plan.base else "- base: none",
        *[f"- expert: `{p}`" + (f" {json.dumps(e.parameters)}" if e.parameters else "")
          for p, e in zip(plan.experts, spec.experts, strict=True)],
        f"- parameters: `{json.dumps(spec.parameters, sort_keys=True)}`",
        f"- seed: {spec.seed}",
        f"- output dtype: {str(plan.out_dtype).removeprefix('torch.')}",
        "",
        "## Configuration",
        "",
        "```json",
        spec.model_dump_json(indent=2),
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
