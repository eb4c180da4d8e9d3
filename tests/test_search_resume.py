"""A coefficient search killed at any moment resumes to the search an uninterrupted run makes: the searcher's
draws (``search.Draws``) on a real Optuna journal file, cut at every line a killed driver can leave it at,
then resumed and run to the end. No Ray: the trials' objectives are a fixed function of their vectors.

A kill lands between any two writes to the journal — in the middle of a draw too (a trial created with part
of its parameters, CMA-ES's state half written, a grid point enqueued but not asked), which is what a CI run
hit on the cluster resume test (``tests/test_search.py``) before the draw was completed on resume."""

import math
import shutil

import optuna
import pytest
from test_search_space import MERGE

from mergescale.orchestrator.search import Draws, open_study
from mergescale.search_space import SearchSpace
from mergescale.specs import SearchSpec

RANGES = {"weight": {"low": 0.1, "high": 1.0, "per": "expert"}, "density": {"low": 0.05, "high": 0.9},
          "lambda": {"low": 0.3, "high": 3.0, "log": True}}  # fmt: skip
GRID = {"density": {"values": [0.2, 0.5, 0.8]}, "lambda": {"values": [0.5, 1.0, 2.0]}}
CASES = {  # algorithm -> (space, trials, parallel); every last batch is cut short by the budget
    "cmaes": (RANGES, 10, 4),
    "optuna": (RANGES, 8, 3),
    "random": (RANGES, 8, 3),
    "grid": (GRID, None, 4),  # 9 points
}


def _setup(algorithm: str):
    space_spec, trials, parallel = CASES[algorithm]
    spec = SearchSpec.model_validate({
        "name": f"resume_{algorithm}", "base": "/models/base", "experts": {"a": "/models/a", "b": "/models/b",
                                                                          "c": "/models/c"},
        "merge": {"method": "ties", "parameters": {"scope": "tensor"}}, "space": space_spec,
        "search": {"algorithm": algorithm, "trials": trials, "parallel": parallel, "seed": 7},
    })  # fmt: skip
    return spec, SearchSpace(MERGE, space_spec, 6)


def _value(vector: dict) -> float | None:
    """A trial's objective: a fixed function of its vector (None, a pruned trial, for some)."""
    x = sum(math.sin(3 * v + i) for i, (_, v) in enumerate(sorted(vector.items())))
    return None if x > 1.8 else x


def _run_to_the_end(spec, space, out) -> dict[int, tuple[dict, float | None]]:
    """Open (or reopen) the search in ``out`` and run it to the end as the driver does: every trial offered is
    scored and told, lowest number first, each batch drawn once the one before is told."""
    study = open_study(spec, out)
    draws = Draws(spec, space, study)
    offered = draws.resume()
    while offered:
        number = min(offered)
        vector = offered.pop(number)
        assert vector == study.trials[number].params  # the journal holds what the trial runs
        offered |= draws.tell(number, _value(vector))
    study = open_study(spec, out)
    assert len(study.trials) == draws.total and all(t.state.is_finished() for t in study.trials)
    return {t.number: (t.params, t.value) for t in study.trials}


@pytest.mark.parametrize("algorithm", list(CASES))
def test_a_search_killed_at_any_line_of_its_journal_resumes_to_the_uninterrupted_search(tmp_path, algorithm):
    spec, space = _setup(algorithm)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    whole = tmp_path / "whole"
    whole.mkdir()
    reference = _run_to_the_end(spec, space, whole)
    assert len({tuple(sorted(v.items())) for v, _ in reference.values()}) == len(reference)  # distinct draws
    lines = (whole / "optuna.journal").read_bytes().splitlines(keepends=True)
    cut_mid_draw = 0
    for n in range(len(lines) + 1):
        out = tmp_path / f"cut{n}"
        out.mkdir()
        (out / "optuna.journal").write_bytes(b"".join(lines[:n]))
        if n:  # a study exists: count the kills that left a draw unfinished
            study = open_study(spec, out)
            cut_mid_draw += any(t.state.name == "WAITING" or (t.state.name == "RUNNING" and len(t.params) <
                                len(space.coordinates)) for t in study.trials)  # fmt: skip
        assert _run_to_the_end(spec, space, out) == reference, f"killed after line {n} of {len(lines)}"
        shutil.rmtree(out)
    assert cut_mid_draw >= 8  # the cuts include kills in the middle of draws
