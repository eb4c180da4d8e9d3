"""What a finished search writes beside its stores, from a real Optuna study (in memory, no Ray): the
trials table, the best merge's card section and its publication, the plots, the grid order."""

import json

import optuna
import pyarrow.parquet as pq
from test_search_space import MERGE, SPACE, L

from mergescale.orchestrator.search import METRIC, best_trial, distributions, grid_point
from mergescale.orchestrator.search_report import publish_best, search_card, write_plots, write_table
from mergescale.search_space import SearchSpace
from mergescale.specs import SearchSpec

SPEC = SearchSpec.model_validate({
    "name": "unit", "base": "/models/base", "experts": {"a": "/models/a", "b": "/models/b", "c": "/models/c"},
    "merge": {"method": "ties", "parameters": {"scope": "tensor"}}, "space": SPACE,
    "search": {"algorithm": "random", "trials": 6},
})  # fmt: skip


def _study(space: SearchSpace, n: int = 6):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(n):
        trial = study.ask(distributions(space))
        attrs = {"held_in": 0.1 * i, "divergence": 0.01, "held_out_loss": 0.0, "job_key": f"k{i}", "limit": 50,
                 "merge_seconds": 1.0, "eval_seconds": 2.0, "seconds": 3.0, "cached": False}  # fmt: skip
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        if i == 4:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, [0.5, 0.2, 0.7, 0.1, None, 0.7][i])
    return study


def test_the_trials_table_has_a_row_per_trial_and_a_column_per_coordinate(tmp_path):
    space = SearchSpace(MERGE, SPACE, L)
    table = write_table(_study(space), space, SPEC, tmp_path)
    rows = pq.read_table(tmp_path / "trials.parquet").to_pylist()
    assert rows == table.to_pylist() and [r["trial"] for r in rows] == list(range(6))
    assert [r["state"] for r in rows] == ["complete"] * 4 + ["pruned", "complete"]
    assert rows[4]["objective"] is None and rows[2]["objective"] == 0.7
    for r in rows:
        vector = json.loads(r["parameters"])
        assert vector == {c.name: r[f"param:{c.name}"] for c in space.coordinates}
        assert space.to_spec(vector)  # every row is a vector of the space


def test_the_best_is_the_earliest_of_the_highest_complete_trials_and_its_card_shows_validation_and_test():
    space = SearchSpace(MERGE, SPACE, L)
    best = best_trial(_study(space), 50)
    assert best["trial"] == 2 and best[METRIC] == 0.7
    test = {METRIC: 0.6, "held_in": 0.6, "divergence": float("nan"), "held_out_loss": 0.0, "job_key": "t"}
    card = search_card(SPEC, space, best, test, 6)
    assert "searcher **random** (seed 0), 6 trials, objective = 1 × held-in normalized (validation)" in card
    assert "| objective | 0.7000 | 0.6000 |" in card and "| divergence to the experts (js) | 0.0100 | – |" in card


def test_publishing_replaces_an_earlier_best_only_once_the_new_one_is_complete(tmp_path):
    space = SearchSpace(MERGE, SPACE, L)
    best = best_trial(_study(space), 50)
    test = {METRIC: 0.6, "held_in": 0.6, "divergence": 0.02, "held_out_loss": 0.0, "job_key": "t2"}
    old, new = tmp_path / "best", tmp_path / "models" / "t2"
    old.mkdir()
    (old / "README.md").write_text("an earlier best, test job `t1`")
    new.mkdir(parents=True)
    (new / "README.md").write_text("# Merged model\n")
    assert publish_best(new, old, SPEC, space, best, test, 6) == old
    assert not new.exists() and "test job `t2`" in (old / "README.md").read_text()
    assert not list(tmp_path.glob(".best.old"))
    # a rerun of the finished search: the model was published, nothing to do
    assert publish_best(new, old, SPEC, space, best, test, 6) == old


def test_the_plots_show_the_objective_and_the_best_value_of_every_layer_group(tmp_path):
    space = SearchSpace(MERGE, SPACE, L)
    table = write_table(_study(space), space, SPEC, tmp_path)
    paths = write_plots(table, space, SPEC, tmp_path)
    assert [p.name for p in paths] == ["objective.png", "best_parameters.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_grid_points_come_in_the_order_a_study_expands_its_grid():
    import itertools

    spec = MERGE.model_copy(update={"parameters": {}})
    space = SearchSpace(spec, {"density": {"values": [0.2, 0.5]}, "lambda": {"values": [0.5, 1.0, 2.0]}}, L)
    points = [grid_point(space, n) for n in range(6)]
    assert points == [{"density": d, "lambda": v} for d, v in itertools.product([0.2, 0.5], [0.5, 1.0, 2.0])]
