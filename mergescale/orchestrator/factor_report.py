"""The factor report of a study over several zoo family members (``zoo: {preset, base, seed}``).

Written by :func:`mergescale.orchestrator.report.write_report` beside the leaderboard when the store's
merge rows come from more than one member (their ``size`` / ``base_quality`` / ``zoo_seed`` columns):

* ``factors.md`` / ``factors.html`` — one row per finding of *What Matters for Model Merging at Scale?*
  (Yadav et al., 2024) with the zoo's estimate, its interval and a verdict; the cell tables (size x base
  quality x method x number of experts); the reference models of every member (base, multitask) and
  how often a merge's held-out normalized score exceeds 100 %.
* ``factors_held_in`` / ``factors_held_out`` (PNG, SVG) — normalized score against the number of merged
  experts: one panel per size, pretrained and instruct side by side (rows), one line per method label,
  the multitask model as a dashed reference line; ``factors_2_vs_n`` — the fewest vs the most experts
  across sizes, the paper's "merging 2 vs 8 experts" view.

Measures (``docs/ALGORITHMS.md#the-factor-report``): held-in normalized = the merge's ANP in the primary
metric (merged / the task's expert, mean over its tasks); held-out normalized = merged / the member's
base in :data:`HELD_OUT_METRIC`, mean over the held-out tasks (the base's exact match is 0 on most of the
family's held-out tasks, so that ratio is undefined); raw held-out scores beside it.  A cell (size,
quality, method, n) is the mean over zoo seeds, every seed weighing the same, of the mean over that
seed's merges.  Intervals: 95 % percentile intervals of :data:`report.RESAMPLES` resamples that
reweight both what was sampled — the zoo seeds (Dirichlet(1, ..., 1) weights) and, within a member, the
expert pool (the expert bootstrap of the leaderboard, the same expert weights in every member, since
the members' subsets are the same task subsets).  Every aggregate (differences, slopes, spreads) is
computed within each resample, so its interval carries both sources.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pyarrow as pa

from mergescale import files
from mergescale.eval.scores import HELD_IN, HELD_OUT, SUMMARY_TASK
from mergescale.orchestrator import report
from mergescale.orchestrator.results import BASE, MERGE, MULTITASK

#: the held-out normalized metric (the base's exact match is 0 on most held-out tasks of the family)
HELD_OUT_METRIC = "char_acc"
QUALITIES = ("pretrained", "instruct")
PAPER = "Yadav et al., What Matters for Model Merging at Scale? (2024)"
_SEED_STREAM = 1  # the seed weights' generator: report.BOOTSTRAP_SEED + this


@dataclass(frozen=True)
class Member:
    """One zoo family member (:func:`_member_order`: by size, then base quality, then seed)."""

    n_parameters: int
    size: str
    quality: str
    seed: int


@dataclass
class _Merge:
    member: Member
    label: str
    n: int
    experts: tuple[str, ...]
    held_in: float | None = None  # ANP, primary metric
    held_out: float | None = None  # normalized, HELD_OUT_METRIC
    held_out_raw: float | None = None  # raw HELD_OUT_METRIC
    held_out_raw_primary: float | None = None  # raw primary metric
    held_out_gain_primary: float | None = None  # raw primary metric, merged - the member's base


@dataclass
class _Reference:
    """The base's and the multitask model's summaries for one member."""

    base_held_in_raw: float | None = None
    base_held_out_raw: float | None = None
    base_held_out_raw_primary: float | None = None
    multitask_held_in: float | None = None
    multitask_held_out: float | None = None
    multitask_held_out_raw_primary: float | None = None


@dataclass
class _Factors:
    metric: str
    held_out_metric: str
    merges: list[_Merge]
    references: dict[Member, _Reference]
    members: list[Member]
    sizes: list[tuple[str, int]]  # (size, parameters), smallest first
    qualities: list[str]
    labels: list[str]
    ns: list[int]
    seeds: list[int]


def _quality_order(q: str) -> tuple[int, str]:
    return (QUALITIES.index(q) if q in QUALITIES else len(QUALITIES), q)


def _member_order(m: Member) -> tuple:
    return (m.n_parameters, m.size, _quality_order(m.quality), m.seed)


def members_of(table: pa.Table) -> list[Member]:
    """The family members of a store's merge rows (empty when its models are not a family's)."""
    columns = ("job_kind", "n_parameters", "size", "base_quality", "zoo_seed")
    seen = {tuple(r[c] for c in columns[1:]) for r in table.select(list(columns)).to_pylist() if r["job_kind"] == MERGE}
    return sorted((Member(*m) for m in seen if None not in m), key=_member_order)


def _factors(table: pa.Table, metric: str) -> _Factors:
    held_out_metric = HELD_OUT_METRIC
    rows = table.to_pylist()
    if not any(r["metric"] == HELD_OUT_METRIC and r["role"] == HELD_OUT for r in rows):
        held_out_metric = metric
    fills = [  # (job kind, role, metric): the row's column -> the attribute it fills
        (MERGE, HELD_IN, metric, "normalized", "held_in"),
        (MERGE, HELD_OUT, held_out_metric, "normalized", "held_out"),
        (MERGE, HELD_OUT, held_out_metric, "value", "held_out_raw"),
        (MERGE, HELD_OUT, metric, "value", "held_out_raw_primary"),
        (BASE, HELD_IN, metric, "value", "base_held_in_raw"),
        (BASE, HELD_OUT, held_out_metric, "value", "base_held_out_raw"),
        (BASE, HELD_OUT, metric, "value", "base_held_out_raw_primary"),
        (MULTITASK, HELD_IN, metric, "normalized", "multitask_held_in"),
        (MULTITASK, HELD_OUT, held_out_metric, "normalized", "multitask_held_out"),
        (MULTITASK, HELD_OUT, metric, "value", "multitask_held_out_raw_primary"),
    ]
    merges: dict[str, _Merge] = {}
    refs: dict[Member, _Reference] = {}
    for r in rows:
        if r["size"] is None or r["kind"] != "summary" or r["task"] != SUMMARY_TASK.get(r["role"]):
            continue
        member = Member(r["n_parameters"], r["size"], r["base_quality"], r["zoo_seed"])
        if r["job_kind"] == MERGE:
            experts = tuple(r["experts"] or ())
            label = r["label"] or r["method"] or "(unlabelled)"
            target = merges.setdefault(r["job_key"], _Merge(member, label, r["n_experts"] or len(experts), experts))
        elif r["job_kind"] in (BASE, MULTITASK):
            target = refs.setdefault(member, _Reference())
        else:
            continue
        for kind, role, name, column, attr in fills:
            if (kind, role, name) == (r["job_kind"], r["role"], r["metric"]):
                setattr(target, attr, r[column])
    for m in merges.values():
        base = refs.get(m.member, _Reference()).base_held_out_raw_primary
        if base is not None and m.held_out_raw_primary is not None:
            m.held_out_gain_primary = m.held_out_raw_primary - base
    ordered = sorted(merges.values(), key=lambda m: (_member_order(m.member), m.label, m.n, m.experts))
    members = sorted({m.member for m in ordered}, key=_member_order)
    return _Factors(
        metric=metric,
        held_out_metric=held_out_metric,
        merges=ordered,
        references=refs,
        members=members,
        sizes=sorted({(m.size, m.n_parameters) for m in members}, key=lambda s: (s[1], s[0])),
        qualities=sorted({m.quality for m in members}, key=_quality_order),
        labels=sorted({m.label for m in ordered}),
        ns=sorted({m.n for m in ordered}),
        seeds=sorted({m.seed for m in members}),
    )


# ------------------------------------------------------------------------------------- estimates


@dataclass
class Estimate:
    """A point estimate and its resamples (None: no interval, e.g. one seed and one subset)."""

    mean: float | None
    resamples: np.ndarray | None = field(default=None, repr=False)

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.mean is None or self.resamples is None:
            return None
        lo, hi = np.quantile(self.resamples, [0.025, 0.975])
        return float(lo), float(hi)


def _combine(estimates: Sequence[Estimate], point: Callable, each: Callable) -> Estimate:
    """``point`` of the means and ``each`` of the stacked resamples (None when any part lacks them)."""
    if not estimates or any(e.mean is None for e in estimates):
        return Estimate(None)
    mean = float(point(np.array([e.mean for e in estimates])))
    if any(e.resamples is None for e in estimates):
        return Estimate(mean)
    return Estimate(mean, each(np.stack([e.resamples for e in estimates])))


def mean_of(estimates: Sequence[Estimate]) -> Estimate:
    return _combine(estimates, np.mean, lambda s: s.mean(axis=0))


def difference(a: Estimate, b: Estimate) -> Estimate:
    return _combine([a, b], lambda m: m[0] - m[1], lambda s: s[0] - s[1])


def spread(estimates: Sequence[Estimate]) -> Estimate:
    """max - min over the estimates (within each resample)."""
    return _combine(estimates, np.ptp, lambda s: s.max(axis=0) - s.min(axis=0))


def slope(x: Sequence[float], estimates: Sequence[Estimate]) -> Estimate:
    """The least-squares slope of the estimates on ``x`` (within each resample); None under 2 points."""
    if len(x) < 2:
        return Estimate(None)
    centred = np.asarray(x, dtype=np.float64) - np.mean(x)
    coefficients = centred / (centred @ centred)
    return _combine(estimates, lambda m: coefficients @ m, lambda s: coefficients @ s)


class _Resampler:
    """Expert weights (the leaderboard's expert bootstrap) and zoo-seed weights, one row per resample."""

    def __init__(self, experts: Iterable[str], seeds: Sequence[int]):
        self.experts = report._Bootstrap(experts)
        self.seed_index = {s: i for i, s in enumerate(seeds)}
        rng = np.random.default_rng(report.BOOTSTRAP_SEED + _SEED_STREAM)
        self.seed_weights = rng.standard_exponential((report.RESAMPLES, len(seeds)))

    def cell(self, merges: Sequence[_Merge], attr: str) -> Estimate:
        """The mean over seeds (equal weight) of each seed's mean ``attr`` over its merges."""
        by_seed: dict[int, list[tuple[_Merge, float]]] = {}
        for m in merges:
            v = getattr(m, attr)
            if v is not None and math.isfinite(v):
                by_seed.setdefault(m.member.seed, []).append((m, float(v)))
        if not by_seed:
            return Estimate(None)
        seeds = sorted(by_seed)
        means = [statistics.fmean(v for _, v in by_seed[s]) for s in seeds]
        subsets = {m.experts for s in seeds for m, _ in by_seed[s]}
        if len(seeds) < 2 and len(subsets) < 2:
            return Estimate(means[0])
        per_seed = []
        for s, mean in zip(seeds, means, strict=True):
            pairs = by_seed[s]
            if len({m.experts for m, _ in pairs}) < 2:
                per_seed.append(np.full(report.RESAMPLES, mean))
            else:
                per_seed.append(self.experts.resampled_means([m for m, _ in pairs], [v for _, v in pairs]))
        w = self.seed_weights[:, [self.seed_index[s] for s in seeds]]
        return Estimate(statistics.fmean(means), (w * np.stack(per_seed, axis=1)).sum(axis=1) / w.sum(axis=1))

    def reference(self, values: dict[int, float | None]) -> Estimate:
        """A reference model's value per seed, combined over seeds like a cell."""
        values = {s: v for s, v in values.items() if v is not None and math.isfinite(v)}
        if not values:
            return Estimate(None)
        seeds = sorted(values)
        mean = statistics.fmean(values[s] for s in seeds)
        if len(seeds) < 2:
            return Estimate(mean)
        w = self.seed_weights[:, [self.seed_index[s] for s in seeds]]
        return Estimate(mean, (w @ np.array([values[s] for s in seeds])) / w.sum(axis=1))


class _Cells:
    """Cell estimates (size, quality, label, n) -> Estimate for one attribute, and their aggregates."""

    def __init__(self, f: _Factors, boot: _Resampler, attr: str):
        self.f = f
        groups: dict[tuple, list[_Merge]] = {}
        for m in f.merges:
            groups.setdefault((m.member.size, m.member.quality, m.label, m.n), []).append(m)
        self.cells = {key: boot.cell(merges, attr) for key, merges in groups.items()}

    def mean(self, size=None, quality=None, label=None, n=None) -> Estimate:
        """Equal-weight mean over the cells matching the given factors (None: every value)."""
        want = (size, quality, label, n)
        chosen = [
            e
            for key, e in sorted(self.cells.items())
            if all(w is None or w == k for w, k in zip(want, key, strict=True))
        ]
        return mean_of(chosen) if chosen else Estimate(None)


# -------------------------------------------------------------------------------------- findings


@dataclass
class Finding:
    number: str
    claim: str
    measure: str
    estimate: Estimate
    claimed: str  # ">" or "<": the side of ``null`` the paper's claim puts the estimate on
    null: float
    per_size: str
    #: for a claim "at every size": the per-size estimates, each judged by the same rule
    every_size: Sequence[Estimate] = ()

    def _side(self, estimate: Estimate) -> str:
        interval = estimate.interval
        if estimate.mean is None:
            return "not measured"
        if interval is None:
            return "inconclusive (no interval)"
        above, below = interval[0] > self.null, interval[1] < self.null
        if (above and self.claimed == ">") or (below and self.claimed == "<"):
            return "reproduced"
        if above or below:
            return "contradicted"
        return "inconclusive"

    @property
    def verdict(self) -> str:
        """From the interval of the estimate; a claim "at every size" is reproduced only when every size's
        interval is on the claimed side too (else "partly reproduced: k of K sizes")."""
        overall = self._side(self.estimate)
        if overall != "reproduced" or not self.every_size:
            return overall
        k = sum(self._side(e) == "reproduced" for e in self.every_size)
        return overall if k == len(self.every_size) else f"partly reproduced: {k} of {len(self.every_size)} sizes"


def _log2_sizes(f: _Factors) -> list[float]:
    return [math.log2(p) for _, p in f.sizes]


def _findings(
    f: _Factors, held_in: _Cells, held_out: _Cells, gain: _Cells, multitask: dict[tuple[str, str], Estimate]
) -> list[Finding]:
    sizes = [s for s, _ in f.sizes]
    x = _log2_sizes(f)
    pct = report._pct

    def per_size(values: Sequence[Estimate], unit: str = "", intervals: bool = False) -> str:
        if not values:  # the finding is not measured
            return ""
        text = _estimate_text if intervals else (lambda e: "-" if e.mean is None else f"{100 * e.mean:.1f}{unit}")
        return "; ".join(f"{s}: {text(e)}" for s, e in zip(sizes, values, strict=True))

    out = []
    if "instruct" in f.qualities and "pretrained" in f.qualities:
        deltas = [
            difference(held_in.mean(size=s, quality="instruct"), held_in.mean(size=s, quality="pretrained"))
            for s in sizes
        ]
        measure = "held-in normalized, instruct - pretrained (points; mean over sizes, methods, n)"
        estimate = mean_of(deltas)
    else:
        deltas, measure, estimate = [], "needs both base qualities", Estimate(None)
    out.append(
        Finding(
            "1",
            "Instruction-tuned bases make merging easier (higher held-in at every size)",
            measure,
            estimate,
            ">",
            0.0,
            per_size(deltas, intervals=True),
            every_size=deltas,
        )
    )

    by_size = [held_in.mean(size=s) for s in sizes]
    out.append(
        Finding(
            "2",
            "Bigger models are easier to merge",
            "slope of held-in normalized per doubling of parameters (points; mean over qualities, methods, n)",
            slope(x, by_size),
            ">",
            0.0,
            per_size(by_size, unit=" %"),
        )
    )

    out_by_size = [held_out.mean(size=s) for s in sizes]
    overall_out = held_out.mean()
    shifted = Estimate(
        None if overall_out.mean is None else overall_out.mean - 1.0,
        None if overall_out.resamples is None else overall_out.resamples - 1.0,
    )
    out.append(
        Finding(
            "3a",
            "Merging boosts zero-shot generalization: merged models beat the base on held-out",
            f"held-out normalized ({f.held_out_metric}, merged / base) - 100 % (points; mean over all cells)",
            shifted,
            ">",
            0.0,
            per_size(out_by_size, unit=" %"),
        )
    )

    out.append(
        Finding(
            "3a'",
            "(the same, in the raw primary metric: the base's exact match is near 0 on these tasks)",
            f"held-out {f.metric}, merged - base (raw points; mean over all cells)",
            gain.mean(),
            ">",
            0.0,
            per_size([gain.mean(size=s) for s in sizes], intervals=True),
        )
    )

    largest = sizes[-1] if sizes else None
    gaps = []
    for q in f.qualities:
        mt = multitask.get((largest, q), Estimate(None))
        gaps.append(difference(held_out.mean(size=largest, quality=q), mt))
    out.append(
        Finding(
            "3b",
            "At scale, merged models beat a multitask-trained model on held-out",
            f"held-out normalized, merged - multitask at the largest size ({largest}; points; mean over "
            "qualities, methods, n)",
            mean_of([g for g in gaps if g.mean is not None]) if gaps else Estimate(None),
            ">",
            0.0,
            "; ".join(f"{q}: {pct(g.mean)}" for q, g in zip(f.qualities, gaps, strict=True)),
        )
    )

    if len(f.ns) >= 2:
        lo, hi = f.ns[0], f.ns[-1]
        drops = [difference(held_in.mean(size=s, n=lo), held_in.mean(size=s, n=hi)) for s in sizes]
        out.append(
            Finding(
                "4",
                "Bigger models can merge more experts (the drop from 2 to 8 experts shrinks with size)",
                f"slope of the held-in drop from n={lo} to n={hi} per doubling of parameters (points)",
                slope(x, drops),
                "<",
                0.0,
                per_size(drops),
            )
        )
    else:
        out.append(
            Finding(
                "4",
                "Bigger models can merge more experts",
                "needs two numbers of experts",
                Estimate(None),
                "<",
                0.0,
                "",
            )
        )

    for number, cells, where in (("5a", held_in, "held-in"), ("5b", held_out, "held-out")):
        spreads = [spread([cells.mean(size=s, label=label) for label in f.labels]) for s in sizes]
        measure = (
            f"slope per doubling of parameters of the {where} spread between methods (max - min of the "
            "methods' means over qualities and n; points)"
        )
        if len(f.labels) < 2:
            measure, spreads = "needs two methods", []
        out.append(
            Finding(
                number,
                f"At large scale the merging methods converge ({where})",
                measure,
                slope(x, spreads) if spreads else Estimate(None),
                "<",
                0.0,
                per_size(spreads),
            )
        )
    return out


# ---------------------------------------------------------------------------------------- figures


def _band(ax, x, estimates: Sequence[Estimate], style: dict, label: str, linestyle: str = "-") -> bool:
    points = [(xi, e) for xi, e in zip(x, estimates, strict=True) if e.mean is not None]
    if not points:
        return False
    xs = [p for p, _ in points]
    y = np.array([e.mean for _, e in points])
    lo = np.array([(e.interval or (e.mean, e.mean))[0] for _, e in points])
    hi = np.array([(e.interval or (e.mean, e.mean))[1] for _, e in points])
    ax.plot(xs, y, label=label, linewidth=1.5, markersize=4, linestyle=linestyle, **style)
    ax.fill_between(xs, lo, hi, color=style["color"], alpha=0.13, linewidth=0)
    return True


def _facets(
    f: _Factors, cells: _Cells, multitask: dict[tuple[str, str], Estimate], title: str, ylabel: str, base_line: bool
) -> matplotlib.figure.Figure:
    rows, cols = len(f.qualities), len(f.sizes)
    fig = report._new_figure((2.9 * cols + 1.8, 2.5 * rows + 0.6))
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    for i, q in enumerate(f.qualities):
        for j, (size, params) in enumerate(f.sizes):
            ax = axes[i][j]
            for k, label in enumerate(f.labels):
                _band(
                    ax,
                    f.ns,
                    [cells.mean(size=size, quality=q, label=label, n=n) for n in f.ns],
                    report._style(k),
                    label,
                )
            mt = multitask.get((size, q), Estimate(None))
            if mt.mean is not None:
                ax.axhline(mt.mean, linestyle="--", color="0.25", linewidth=1.0, label="multitask model")
            if base_line:
                ax.axhline(1.0, linestyle=":", color="0.45", linewidth=1.0, label="base (1.0)")
            ax.set_title(f"{size} ({params / 1e6:.2f} M), {q}", fontsize=9)
            ax.set_xticks(f.ns)
            ax.grid(True, alpha=0.3)
            if i == rows - 1:
                ax.set_xlabel("merged experts")
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="outside right center", fontsize="small", frameon=False)
    fig.suptitle(title, fontsize=10)
    return fig


def _few_vs_many(f: _Factors, cells: _Cells) -> matplotlib.figure.Figure:
    lo, hi = f.ns[0], f.ns[-1]
    fig = report._new_figure((4.2 * len(f.qualities) + 1.8, 3.6))
    axes = fig.subplots(1, len(f.qualities), sharey=True, squeeze=False)[0]
    x = [p for _, p in f.sizes]
    for ax, q in zip(axes, f.qualities, strict=True):
        for k, label in enumerate(f.labels):
            style = report._style(k)
            _band(
                ax, x, [cells.mean(size=s, quality=q, label=label, n=lo) for s, _ in f.sizes], style, f"{label}, n={lo}"
            )
            if hi != lo:
                _band(
                    ax,
                    x,
                    [cells.mean(size=s, quality=q, label=label, n=hi) for s, _ in f.sizes],
                    style,
                    f"{label}, n={hi}",
                    linestyle="--",
                )
        ax.set_xscale("log")
        ax.set_xticks(x, [s for s, _ in f.sizes])
        ax.minorticks_off()
        ax.set_xlabel("model size (log parameters)")
        ax.set_title(q, fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"held-in normalized {f.metric} (1.0 = expert)", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small", frameon=False)
    fig.suptitle(f"Merging {lo} vs {hi} experts across sizes (solid: {lo}, dashed: {hi})", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------ pages


def _cell_table(f: _Factors, cells: _Cells) -> tuple[list[str], list[list[str]]]:
    header = ["size", "base", "method", *[f"n={n}" for n in f.ns], "all n"]
    rows = []
    for size, _ in f.sizes:
        for q in f.qualities:
            for label in [*f.labels, None]:
                values = [cells.mean(size=size, quality=q, label=label, n=n) for n in f.ns]
                rows.append(
                    [
                        size,
                        q,
                        label or "(all methods)",
                        *map(_with_interval, values),
                        _with_interval(cells.mean(size=size, quality=q, label=label)),
                    ]
                )
    return header, rows


def _with_interval(e: Estimate) -> str:
    if e.mean is None:
        return "-"
    return report._pct(e.mean) + ("" if e.interval is None else f" {report._span(e.interval)}")


def _estimate_text(e: Estimate) -> str:
    if e.mean is None:
        return "-"
    return f"{100 * e.mean:+.1f}" + (
        "" if e.interval is None else f" [{100 * e.interval[0]:+.1f}, {100 * e.interval[1]:+.1f}]"
    )


def findings_table(findings: Sequence[Finding]) -> tuple[list[str], list[list[str]]]:
    header = ["#", f"finding ({PAPER})", "measure on the zoo", "estimate [95 % interval]", "per size", "verdict"]
    rows = [[x.number, x.claim, x.measure, _estimate_text(x.estimate), x.per_size or "-", x.verdict] for x in findings]
    return header, rows


def _above_base(f: _Factors) -> list[list[str]]:
    rows = []
    for size, _ in f.sizes:
        for q in f.qualities:
            values = [
                m.held_out
                for m in f.merges
                if m.member.size == size and m.member.quality == q and m.held_out is not None
            ]
            if values:
                rows.append([size, q, str(len(values)), str(sum(v > 1.0 for v in values)), report._pct(max(values))])
    return rows


def _reference_rows(f: _Factors) -> list[list[str]]:
    rows = []
    for m in f.members:
        ref = f.references.get(m, _Reference())
        merged_raw = [x.held_out_raw_primary for x in f.merges if x.member == m]
        rows.append(
            [
                m.size,
                f"{m.n_parameters:,}",
                m.quality,
                str(m.seed),
                report._pct(ref.base_held_in_raw),
                report._pct(ref.base_held_out_raw_primary),
                report._pct(report._mean(merged_raw)),
                report._pct(ref.multitask_held_out_raw_primary),
                report._pct(ref.base_held_out_raw),
                report._pct(ref.multitask_held_in),
                report._pct(ref.multitask_held_out),
            ]
        )
    return rows


def analyse(table: pa.Table, metric: str) -> tuple[_Factors, _Cells, _Cells, dict, list[Finding]]:
    """The factors of a store, its held-in and held-out cells, the multitask references and the findings."""
    f = _factors(table, metric)
    boot = _Resampler((e for m in f.merges for e in m.experts), f.seeds)
    held_in, held_out = _Cells(f, boot, "held_in"), _Cells(f, boot, "held_out")
    multitask_in, multitask_out = {}, {}
    for size, _ in f.sizes:
        for q in f.qualities:
            refs = {m.seed: f.references.get(m, _Reference()) for m in f.members if m.size == size and m.quality == q}
            multitask_in[(size, q)] = boot.reference({s: r.multitask_held_in for s, r in refs.items()})
            multitask_out[(size, q)] = boot.reference({s: r.multitask_held_out for s, r in refs.items()})
    findings = _findings(f, held_in, held_out, _Cells(f, boot, "held_out_gain_primary"), multitask_out)
    return f, held_in, held_out, {"held_in": multitask_in, "held_out": multitask_out}, findings


def write(table: pa.Table, out: Path, metric: str, title: str) -> list[Path]:
    """Write the factor report of ``table`` (rows of several family members) into ``out``."""
    f, held_in, held_out, multitask, findings = analyse(table, metric)
    written: list[Path] = []
    with matplotlib.rc_context(report._RC):
        figures = {
            "factors_held_in": _facets(
                f,
                held_in,
                multitask["held_in"],
                f"Held-in: ANP ({f.metric}) by size and base",
                "normalized (1.0 = expert)",
                base_line=False,
            ),
            "factors_held_out": _facets(
                f,
                held_out,
                multitask["held_out"],
                f"Held-out (zero-shot): normalized {f.held_out_metric} by size and base",
                "normalized (1.0 = base)",
                base_line=True,
            ),
            "factors_2_vs_n": _few_vs_many(f, held_in),
        }
        for stem, fig in figures.items():
            written += report._save(fig, out, stem)
    seeds = ", ".join(map(str, f.seeds))
    hosts = sorted({h for h in table.column("zoo_host").to_pylist() if h}) or ["a CPU not recorded"]
    header, rows = findings_table(findings)
    in_header, in_rows = _cell_table(f, held_in)
    out_header, out_rows = _cell_table(f, held_out)
    blocks = [
        report._Block(
            "p",
            f"{len(f.merges)} merges of {len(f.members)} zoo family members (sizes {', '.join(s for s, _ in f.sizes)}; "
            f"bases {', '.join(f.qualities)}; zoo seeds {seeds}); methods: {', '.join(f.labels)}; "
            f"n = {', '.join(map(str, f.ns))} experts; the members were built on {', '.join(hosts)} (zoo.json's "
            "host: the bytes are pinned, not shown equal across CPU models). "
            f"Held-in normalized = ANP in {f.metric} (merged / the task's "
            f"expert of the same member). Held-out normalized = merged / the member's base in {f.held_out_metric}, "
            "mean over the zero-shot held-out tasks; raw scores in the references table. A cell is the mean over "
            "zoo seeds (equal weight) of each seed's mean over its merges; aggregates weigh cells equally. "
            f"Intervals: 95 % percentile intervals of {report.RESAMPLES} resamples reweighting the zoo seeds "
            "(Dirichlet) and, within each member, the expert pool (the expert bootstrap, the same weights for a "
            "task in every member); a difference, slope or spread is computed inside each resample. With few "
            "seeds the seed part of an interval is coarse: read narrow intervals with that in mind.",
        ),
        report._Block("h2", "Findings"),
        report._Block(
            "p",
            "Verdict: reproduced when the 95 % interval lies wholly on the side of 0 the paper's claim puts it, "
            "contradicted when it lies wholly on the other side, inconclusive when it holds 0. Slopes are in "
            "normalized points per doubling of the parameter count (least squares over the sizes).",
        ),
        report._Block("table", header=header, rows=rows),
        report._Block(
            "figure",
            "factors_held_in",
            caption="Held-in normalized score vs number of merged experts, per size and base (dashed: the "
            "multitask model)",
        ),
        report._Block(
            "figure",
            "factors_held_out",
            caption="Held-out normalized score vs number of merged experts (dotted: the base; dashed: the "
            "multitask model)",
        ),
        report._Block("figure", "factors_2_vs_n", caption="The fewest vs the most merged experts across sizes"),
        report._Block("h2", f"Held-in normalized % ({f.metric}) per cell"),
        report._Block("table", header=in_header, rows=in_rows),
        report._Block("h2", f"Held-out normalized % ({f.held_out_metric}, merged / base) per cell"),
        report._Block("table", header=out_header, rows=out_rows),
        report._Block("h2", "Does held-out normalized exceed 100 %?"),
        report._Block("table", header=["size", "base", "merges", "merges > 100 %", "max %"], rows=_above_base(f)),
        report._Block("h2", "Reference models per member"),
        report._Block(
            "p",
            f"Raw scores in %: the base's held-in {f.metric}; held-out {f.metric} of the base, of the member's "
            f"merges (mean) and of its multitask model; the base's held-out {f.held_out_metric}. Normalized: the "
            f"multitask model's held-in ANP ({f.metric}) and held-out ({f.held_out_metric}, / base).",
        ),
        report._Block(
            "table",
            header=[
                "size",
                "parameters",
                "base",
                "zoo seed",
                f"base held-in {f.metric}",
                f"base held-out {f.metric}",
                f"merges held-out {f.metric}",
                f"multitask held-out {f.metric}",
                f"base held-out {f.held_out_metric}",
                "multitask held-in norm.",
                "multitask held-out norm.",
            ],
            rows=_reference_rows(f),
        ),
    ]
    md, page = out / "factors.md", out / "factors.html"
    for path, text in ((md, report._markdown(title, blocks)), (page, report._html(title, blocks, out))):
        with files.atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return [md, page, *written]
