"""The factor report (orchestrator/factor_report.py) on a store of several family members with known values."""

from __future__ import annotations

import itertools
import math
import statistics
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from test_study_report import merge_job

from mergescale.eval.scores import HELD_IN, HELD_OUT, SUMMARY_TASK
from mergescale.orchestrator import factor_report, results
from mergescale.orchestrator.report import read_stores, write_report

TASKS = ["upper", "rot13", "reverse", "caesar", "sort", "vowel"]
SUBSETS = {2: [("upper", "rot13"), ("reverse", "caesar"), ("sort", "vowel")], 6: [tuple(TASKS)]}
SIZES = {"a": 1000, "b": 4000}  # two doublings apart
METHODS = {"linear": 0.0, "ties": 0.06}
INSTRUCT = 0.1  # instruct adds this to every held-in score
MULTITASK_OUT = 1.05
BASE_EM, MERGED_EM = 0.05, 0.25  # raw held-out exact match


def held_in_value(size: str, quality: str, method: str, n: int, seed: int, task: str) -> float:
    """Held-in normalized score: +0.1 for instruct, +0.05 per doubling, a drop with n that halves per
    doubling, a method gap that halves per doubling, +-0.01 per seed and a task effect."""
    doublings = math.log2(SIZES[size] / 1000)
    return (0.4 + INSTRUCT * (quality == "instruct") + 0.05 * doublings - 0.04 * (n - 2) / 2**doublings
            + METHODS[method] / 2**doublings + (0.01 if seed else -0.01) + 0.01 * TASKS.index(task))  # fmt: skip


def _summary(job_kind: str, model: str, key: str, member: dict, held_in: float | None, held_out: float) -> list[dict]:
    rows = [dict(task=SUMMARY_TASK[HELD_OUT], role=HELD_OUT, kind="summary", metric="char_acc", value=0.3,
                 normalized=held_out),
            dict(task=SUMMARY_TASK[HELD_OUT], role=HELD_OUT, kind="summary", metric="exact_match",
                 value=BASE_EM if job_kind == results.BASE else 0.5)]  # fmt: skip
    if held_in is not None:
        rows.append(dict(task=SUMMARY_TASK[HELD_IN], role=HELD_IN, kind="summary", metric="exact_match",
                         value=0.2, normalized=held_in, primary=True))  # fmt: skip
    return results.complete(rows, model=model, job_key=key, job_kind=job_kind, study="toy", **member)


def build_family_store(store) -> dict:
    """Two sizes x two qualities x two seeds; per member linear and ties at n = 2 (three subsets) and 6."""
    expected: dict = {}
    for size, quality, seed in itertools.product(SIZES, ("pretrained", "instruct"), (0, 1)):
        member = dict(size=size, n_parameters=SIZES[size], base_quality=quality, zoo_seed=seed)
        prefix = f"[{size} {quality} seed={seed}] "
        base = _summary(results.BASE, prefix + "base", prefix + "base", member, None, 1.0)
        multitask = _summary(results.MULTITASK, prefix + "multitask", prefix + "mt", member, 0.9, MULTITASK_OUT)
        results.write_unit(store, results.REFERENCES, f"{size}-{quality}-{seed}-base", base)
        results.write_unit(store, results.REFERENCES, f"{size}-{quality}-{seed}-mt", multitask)
        for method, n in itertools.product(METHODS, SUBSETS):
            for subset in SUBSETS[n]:
                norm = {t: held_in_value(size, quality, method, n, seed, t) for t in subset}
                # merge_job's char_acc is half its exact_match: held-out char_acc normalized = 1.1
                _, rows = merge_job(method, subset, 0, norm, dict.fromkeys(subset, 0.1), {"copy": 2.2}, **member)
                key = f"{prefix}{method}-{'-'.join(subset)}"
                for r in rows:
                    r["job_key"], r["model"] = key, prefix + r["model"]
                    if (r["kind"], r["role"], r["metric"]) == ("summary", HELD_OUT, "exact_match"):
                        r["value"] = MERGED_EM
                results.write_unit(store, results.JOBS, key, rows)
                expected.setdefault((size, quality, method, n), {}).setdefault(seed, []).append(
                    statistics.fmean(norm.values())
                )
    return expected


@pytest.fixture
def family(tmp_path):
    path = tmp_path / "results"
    return path, build_family_store(path)


def _cell(expected, **want) -> float:
    """Equal-weight mean over matching cells of (mean over seeds of each seed's mean)."""
    keys = ("size", "quality", "method", "n")
    chosen = [by_seed for k, by_seed in expected.items() if all(want.get(x, k[i]) == k[i] for i, x in enumerate(keys))]
    cells = [statistics.fmean(statistics.fmean(v) for v in by_seed.values()) for by_seed in chosen]
    return statistics.fmean(cells)


def test_findings_are_the_papers_measures_on_known_values(family):
    path, expected = family
    f, held_in, _, multitask, findings = factor_report.analyse(read_stores([path]), "exact_match")
    assert [m.size for m in f.members] == ["a"] * 4 + ["b"] * 4 and f.ns == [2, 6] and f.labels == ["linear", "ties"]
    by = {x.number: x for x in findings}
    assert by["1"].estimate.mean == pytest.approx(INSTRUCT)
    assert by["1"].estimate.interval == pytest.approx((INSTRUCT, INSTRUCT))  # paired by seed and task
    assert by["1"].verdict == "reproduced"
    slope = (_cell(expected, size="b") - _cell(expected, size="a")) / 2
    assert by["2"].estimate.mean == pytest.approx(slope) and by["2"].verdict == "reproduced"
    assert by["3a"].estimate.mean == pytest.approx(0.1) and by["3a"].verdict == "reproduced"
    assert by["3a'"].estimate.mean == pytest.approx(MERGED_EM - BASE_EM) and by["3a'"].verdict == "reproduced"
    assert by["3b"].estimate.mean == pytest.approx(1.1 - MULTITASK_OUT) and by["3b"].verdict == "reproduced"
    drop = {s: _cell(expected, size=s, n=2) - _cell(expected, size=s, n=6) for s in SIZES}
    assert drop["a"] == pytest.approx(0.16) and drop["b"] == pytest.approx(0.04)
    assert by["4"].estimate.mean == pytest.approx((drop["b"] - drop["a"]) / 2) and by["4"].verdict == "reproduced"
    assert by["5a"].estimate.mean == pytest.approx((0.015 - 0.06) / 2) and by["5a"].verdict == "reproduced"
    assert by["5b"].estimate.mean == pytest.approx(0.0) and by["5b"].verdict == "inconclusive"  # no gap to close
    assert multitask["held_in"][("a", "instruct")].mean == pytest.approx(0.9)
    # one subset per seed (n = 6): the interval comes from the seeds alone and lies between their means
    cell = held_in.cells[("a", "pretrained", "ties", 6)]
    seeds = [v[0] for v in expected[("a", "pretrained", "ties", 6)].values()]
    lo, hi = cell.interval
    assert min(seeds) - 1e-12 <= lo < hi <= max(seeds) + 1e-12 and cell.mean == pytest.approx(statistics.fmean(seeds))
    # n = 2: three disjoint subsets per seed, so the expert bootstrap widens the interval beyond the seeds'
    wide = held_in.cells[("a", "pretrained", "ties", 2)]
    seed_means = [statistics.fmean(v) for v in expected[("a", "pretrained", "ties", 2)].values()]
    assert wide.interval[0] < min(seed_means) and wide.interval[1] > max(seed_means)


def test_a_claim_the_data_contradicts_is_called_so():
    est = factor_report.Estimate(-0.05, np.linspace(-0.08, -0.02, 101))
    finding = factor_report.Finding("1", "claim", "measure", est, ">", 0.0, "")
    assert finding.verdict == "contradicted"
    assert factor_report.Finding("1", "c", "m", factor_report.Estimate(0.01, np.linspace(-0.02, 0.04, 101)), ">",
                                 0.0, "").verdict == "inconclusive"  # fmt: skip
    assert factor_report.Finding("1", "c", "m", factor_report.Estimate(None), ">", 0.0, "").verdict == "not measured"
    # "at every size": the overall interval alone is not enough
    up, flat = (
        factor_report.Estimate(0.1, np.linspace(0.05, 0.15, 101)),
        factor_report.Estimate(0.0, np.linspace(-0.1, 0.1, 101)),
    )
    partly = factor_report.Finding("1", "c", "m", up, ">", 0.0, "", every_size=[up, flat])
    assert partly.verdict == "partly reproduced: 1 of 2 sizes"
    assert factor_report.Finding("1", "c", "m", up, ">", 0.0, "", every_size=[up, up]).verdict == "reproduced"


def test_write_report_adds_the_factor_pages_and_is_reproducible(family, tmp_path):
    path, _ = family
    written = write_report(path, tmp_path / "out")
    names = {p.name for p in written}
    stems = ("factors_held_in", "factors_held_out", "factors_2_vs_n")
    assert {"factors.md", "factors.html", *(f"{s}.{e}" for s in stems for e in ("png", "svg"))} <= names
    for stem in stems:
        ET.parse(tmp_path / "out" / f"{stem}.svg")
    md = (tmp_path / "out" / "factors.md").read_text()
    for claim in ("Instruction-tuned bases", "Bigger models are easier", "beat the base", "multitask", "converge"):
        assert claim in md
    assert md.count("| reproduced |") == 7
    assert "the members were built on a CPU not recorded" in md  # the store has no zoo_host
    assert "| a | pretrained | 16 | 16 | 110.0 |" in md  # every merge's held-out normalized is 110 %
    assert "factors.md" in (tmp_path / "out" / "leaderboard.md").read_text()
    page = (tmp_path / "out" / "factors.html").read_text()
    assert page.count("<svg") == 3
    again = write_report(path, tmp_path / "again")
    assert {p.name: p.read_bytes() for p in again} == {p.name: p.read_bytes() for p in written}


def test_one_member_store_has_no_factor_report(tmp_path):
    from test_study_report import build_store

    build_store(tmp_path / "results")
    assert not any(p.name.startswith("factors") for p in write_report(tmp_path / "results", tmp_path / "out"))
