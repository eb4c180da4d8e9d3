"""What a finished search leaves beside its stores: the table of every trial (``trials.parquet``), the best
merge published with a model card that records the search (``best/``), plots of the objective over the
trials and of the best parameters per layer group (``plots/``), and a page that links them (``search.md``)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mergescale import files
from mergescale.search_space import SearchSpace
from mergescale.specs import SearchSpec

PLOTS = "plots"
#: the columns of trials.parquet before the parameters (one column per coordinate, ``param:<name>``)
COLUMNS = [
    ("trial", pa.int64()),  # the Optuna trial number: the order the searcher drew the vectors in
    ("state", pa.string()),  # complete | pruned (stopped by ASHA) | fail
    ("objective", pa.float64()),  # the objective on the full validation budget (null when pruned)
    ("held_in", pa.float64()),  # mean normalized held-in score, validation split (last budget scored)
    ("divergence", pa.float64()),  # mean divergence to the experts (objective.metric), validation inputs
    ("held_out_loss", pa.float64()),  # mean 1 - held-out normalized score, where below 1
    ("limit", pa.int64()),  # documents per task of the last budget scored (0: every document)
    ("merge_seconds", pa.float64()),
    ("eval_seconds", pa.float64()),
    ("seconds", pa.float64()),  # the trial's wall time in the runner (waits for a merge slot or evaluator included)
    ("cached", pa.bool_()),  # scored earlier (the same vector, or a resumed run's finished job)
    ("job_key", pa.string()),  # its unit in the trials store (RESULTS/trials/jobs/<key>.parquet)
    ("parameters", pa.string()),  # the vector as canonical JSON
]


def write_table(study, space: SearchSpace, spec: SearchSpec, results: Path) -> pa.Table:
    """``trials.parquet``: one row per finished trial, in trial order."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            continue
        a = t.user_attrs
        row = {"trial": t.number, "state": t.state.name.lower(), "objective": t.value,
               "parameters": json.dumps(t.params, sort_keys=True),
               **{name: a.get(name) for name, _ in COLUMNS if name in a}}  # fmt: skip
        row.update({f"param:{c.name}": t.params.get(c.name) for c in space.coordinates})
        rows.append(row)
    fields = [pa.field(n, tp) for n, tp in COLUMNS]
    fields += [pa.field(f"param:{c.name}", pa.string() if c.domain.values is not None and
                        not all(isinstance(v, int | float) for v in c.domain.values) else pa.float64())
               for c in space.coordinates]  # fmt: skip
    schema = pa.schema(fields)
    for r in rows:
        for f in schema:
            if f.type == pa.float64() and r.get(f.name) is not None:
                r[f.name] = float(r[f.name])
            elif f.type == pa.string() and f.name.startswith("param:") and r.get(f.name) is not None:
                r[f.name] = str(r[f.name])
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
    with files.atomic_path(results / "trials.parquet") as tmp:
        pq.write_table(table, tmp)
    return table


def search_card(spec: SearchSpec, space: SearchSpace, best: dict, test: dict, trials: int) -> str:
    """The model card's account of the search that chose this merge."""
    o = spec.objective
    formula = " − ".join(x for x in (
        f"{o.held_in:g} × held-in normalized (validation)" if o.held_in else "",
        f"{o.divergence:g} × mean {o.metric.upper()} to the experts (validation inputs)" if o.divergence else "",
        f"{o.held_out:g} × held-out loss" if o.held_out else "") if x)  # fmt: skip
    lines = [
        "", "## Coefficient search", "",
        f"Chosen by a `mergescale search` ({spec.name}): searcher **{spec.search.algorithm}** "
        f"(seed {spec.search.seed}{', ASHA' if spec.search.asha else ''}), {trials} trials, objective = {formula}.",
        "The trials were scored on the tasks' validation split; this model was then scored once on the test split.",
        "", f"| | validation (trial {best['trial']}) | test |", "|---|---:|---:|",
        f"| objective | {best['objective']:.4f} | {test['objective']:.4f} |",
        f"| held-in normalized (mean over tasks) | {_num(best['held_in'])} | {_num(test['held_in'])} |",
        f"| divergence to the experts ({o.metric}) | {_num(best['divergence'])} | {_num(test['divergence'])} |",
        f"| held-out loss | {_num(best['held_out_loss'])} | {_num(test['held_out_loss'])} |",
        "", "Best parameters:", "", "```json", json.dumps(best["vector"], indent=1, sort_keys=True), "```", "",
        f"Search job `{best['job_key']}`, test job `{test['job_key']}`.", "",
    ]  # fmt: skip
    return "\n".join(lines)


def _num(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def publish_best(model: Path, out: Path, spec: SearchSpec, space: SearchSpace, best: dict, test: dict,
                 trials: int) -> Path:  # fmt: skip
    """Publish the best merge (kept at ``model`` by its test evaluation) as ``out`` with the search in its
    card: the card is completed first, then the directory is renamed into place (an earlier best is
    replaced only once the new one is complete).  A rerun of a finished search keeps what is there."""
    card = out / "README.md"
    if not model.is_dir():
        if card.is_file() and test["job_key"] in card.read_text():
            return out
        raise FileNotFoundError(f"{model}: the best merge is missing (a bug: it should have been kept)")
    (model / "README.md").write_text((model / "README.md").read_text() + search_card(spec, space, best, test, trials))
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(model, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def write_plots(table: pa.Table, space: SearchSpace, spec: SearchSpec, results: Path) -> list[Path]:
    """The objective of every trial and the best so far (``objective.png``), and the best vector per layer
    group (``best_parameters.png``, when a parameter has layer groups)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = results / PLOTS
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in table.to_pylist() if r["state"] == "complete"]
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    if rows:
        xs, ys = [r["trial"] for r in rows], [r["objective"] for r in rows]
        best, so_far = -math.inf, []
        for y in ys:
            best = max(best, y)
            so_far.append(best)
        ax.scatter(xs, ys, s=14, color="tab:blue", label="trial")
        ax.step(xs, so_far, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial (the order the searcher drew them)")
    ax.set_ylabel("objective (validation)")
    ax.set_title(f"{spec.name}: {spec.search.algorithm}, {spec.merge.method}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    written.append(_save(fig, out / "objective.png"))
    grouped = [k for k, d in space.dimensions.items() if d.layer_groups]
    if rows and grouped:
        top = max(rows, key=lambda r: (r["objective"], -r["trial"]))
        vector = json.loads(top["parameters"])
        names = list(spec.experts) if isinstance(spec.experts, dict) else []
        fig, axes = plt.subplots(1, len(grouped), figsize=(4.5 * len(grouped), 3.6), squeeze=False)
        for ax, key in zip(axes[0], grouped, strict=True):
            series: dict[str, list] = {}
            for c in space.coordinates:
                if c.key == key:
                    expert = (names[c.expert] if c.expert < len(names) else f"expert {c.expert}") \
                        if c.expert is not None else ""  # fmt: skip
                    name = " ".join(x for x in (expert, c.submodule or "") if x) or key
                    series.setdefault(name, []).append((c.group, vector[c.name]))
            for name, points in series.items():
                ax.plot([g for g, _ in points], [v for _, v in points], marker="o", label=name)
            ax.set_xticks(range(space.dimensions[key].layer_groups))
            ax.set_xlabel("layer group (input side → output side)")
            ax.set_ylabel(key)
            ax.set_title(f"best {key} (trial {top['trial']})")
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out / "best_parameters.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
