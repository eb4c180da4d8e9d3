import pytest

from mergescale.errors import MergescaleError
from mergescale.zoo.tasks import HELD_IN, HELD_OUT, MIXTURE, SPLITS, TASKS, get_task, split_of


def test_enough_tasks_and_held_out_is_not_held_in():
    assert len(HELD_IN) >= 8 and len(HELD_OUT) >= 3
    assert not {t.name for t in HELD_IN} & {t.name for t in HELD_OUT}
    assert not {t.tag for t in HELD_IN} & {t.tag for t in MIXTURE}, "the base must never see a held-in tag"
    # a post task reuses its map's tag in the other prompt format; (tag, style) names one task
    assert len({(t.tag, t.style) for t in TASKS.values()}) == len(TASKS)


def test_answers_follow_the_task_definition():
    assert get_task("upper").answer("abcz") == "ABCZ"
    assert get_task("shift1").answer("abz") == "bca"
    assert get_task("shift3").answer("axyz") == "dabc"
    assert get_task("atbash").answer("abz") == "zya"
    assert get_task("rot13").answer("an") == "na"
    assert get_task("digit").answer("abkz") == "0105"
    assert get_task("upshift").answer("az") == "BA"
    assert get_task("pairswap").answer("abcz") == "bady"
    assert get_task("copy").answer("hello") == "hello"
    assert get_task("upper").prompt("abc") == "up:abc="
    # no held-in map leaves a letter unchanged: a model that copies scores 0
    for task in HELD_IN:
        assert all(task.table[i] != chr(97 + i) for i in range(26)), task.name


def test_splits_are_disjoint_and_deterministic():
    for task in HELD_IN + HELD_OUT:
        inputs = {}
        for split in SPLITS:
            ex = task.examples(split, 300)
            assert ex == task.examples(split, 300)
            assert len({p for p, _ in ex}) == 300
            inputs[split] = {p.split(":", 1)[1] for p, _ in ex}
            assert all(split_of(i[:-1]) == split for i in inputs[split])
        assert not inputs["train"] & inputs["validation"]
        assert not inputs["train"] & inputs["test"]
        assert not inputs["validation"] & inputs["test"]


def test_training_stream_never_yields_test_inputs():
    import random

    rng = random.Random(0)
    stream = get_task("upper").stream("train", rng)
    test = {p for p, _ in get_task("upper").examples("test", 500)}
    drawn = [next(stream)[0] for _ in range(2000)]
    assert not set(drawn) & test
    assert all(split_of(p[3:-1]) == "train" for p in drawn)


def test_mixture_is_fixed():
    # the mixture's maps are fixed by MIXTURE_SEED: experts and bases of every seed share them
    assert len(MIXTURE) == 33
    assert MIXTURE[0].name == "copy"
    assert len({t.table for t in MIXTURE}) == len(MIXTURE)


def test_unknown_task_is_a_user_error():
    with pytest.raises(MergescaleError, match="unknown zoo task 'nope'"):
        get_task("nope")


def test_base_sees_held_in_tasks_on_part_of_the_alphabet_only():
    import random

    from mergescale.zoo.tasks import KNOWN_LETTERS, base_mixture, expert_mixture, known_letters

    sources = base_mixture()
    assert {s.task.name for s in sources} == {t.name for t in MIXTURE + HELD_IN}
    for s in sources:
        if s.task in HELD_IN:
            assert s.letters == known_letters(s.task) and len(s.letters) == KNOWN_LETTERS
            stream = s.task.stream("train", random.Random(1), s.letters)
            assert all(set(next(stream)[0][3:-1]) <= set(s.letters) for _ in range(200))
    assert len({known_letters(t) for t in HELD_IN}) == len(HELD_IN)
    mix = expert_mixture(get_task("rot13"))
    assert mix[0].task.name == "rot13" and len(mix[0].letters) == 26
    assert abs(sum(s.weight for s in mix) - 1.0) < 1e-9


def _family_mixtures():
    """Every training mixture of the scale family: pretraining, instruction tuning, each expert's and the
    multitask model's fine-tuning (on either base)."""
    from mergescale.zoo.family import POOL_LOG2
    from mergescale.zoo.tasks import family_expert_mixture, instruct_mixture, scale_base_mixture

    pool = 2 ** POOL_LOG2[1]
    out = {"pretraining": scale_base_mixture(), "instruct": instruct_mixture()}
    for replay in ("pretraining", "instruct"):
        for task in HELD_IN:
            out[f"expert {task.name} ({replay})"] = family_expert_mixture([task], out[replay], pool)
        out[f"multitask ({replay})"] = family_expert_mixture(list(HELD_IN), out[replay])
    return out


def test_scale_held_out_tasks_are_in_no_training_mixture_of_the_family():
    import random

    from mergescale.zoo.tasks import SCALE_HELD_OUT, known_letters

    held_out = {(t.style, t.tag): t for t in SCALE_HELD_OUT}
    assert [t.name for t in SCALE_HELD_OUT] == [f"{t.name}_post" for t in HELD_IN]
    tests = {t.name: {p for p, _ in t.examples("test", 200)} for t in SCALE_HELD_OUT}
    for name, mixture in _family_mixtures().items():
        if name != "pretraining":  # the others are fractions of a batch
            assert abs(sum(s.weight for s in mixture) - 1.0) < 1e-9, name
        for s in mixture:
            twin = held_out.get((s.task.style, s.task.tag))
            if twin is None:
                continue
            # the only sources with a held-out task's tag and format draw the base's known letters, and every
            # held-out example has a letter outside them: no held-out example is in any training stream
            known = known_letters(get_task(twin.name.removesuffix("_post")))
            assert s.pool is None and set(s.letters) == set(twin.novel) == set(known), (name, s.task.name)
        drawn = set()
        for s in mixture:  # and, by sampling the real streams: no prompt of a held-out test example
            stream = s.task.stream("train", random.Random(0), s.letters)
            drawn |= {next(stream)[0] for _ in range(50)}
        for task, prompts in tests.items():
            assert not drawn & prompts, (name, task)
    for t in SCALE_HELD_OUT:
        inputs = [p.split(":")[0] for p, _ in t.examples("test", 200)]
        assert all(not set(i) <= set(t.novel) for i in inputs), t.name
        assert t.examples("test", 5)[0][0].endswith(f":{t.tag}=")


def test_scale_family_experts_differ_in_steps_learning_rate_and_data():
    from mergescale.zoo.build import SIZES, preset_spec
    from mergescale.zoo.family import expert_recipe, parameters

    recipes = [expert_recipe(preset_spec("m"), t.name) for t in HELD_IN]
    for key in ("steps", "lr", "pool"):
        assert len({r[key] for r in recipes}) == len(HELD_IN), key
    assert all(60 <= r["steps"] <= 240 and 2**8 <= r["pool"] <= 2**12 for r in recipes)
    # the same steps and data for every size and seed; the learning rate follows the size rule
    other = [expert_recipe(preset_spec("xs", seed=3), t.name) for t in HELD_IN]
    assert [(r["steps"], r["pool"]) for r in other] == [(r["steps"], r["pool"]) for r in recipes]
    ratio = preset_spec("xs").expert_lr / preset_spec("m").expert_lr
    assert all(abs(o["lr"] / r["lr"] - ratio) < 1e-3 for r, o in zip(recipes, other, strict=True))
    sizes = [parameters(preset_spec(p)) for p in SIZES]
    assert sizes == sorted(sizes) and sizes[-1] / sizes[0] >= 16
    assert parameters(preset_spec("m")) == parameters(preset_spec("tiny"))  # m is the tiny architecture


def test_the_editing_zoos_upper_versions_share_the_maps_known_letters_and_v2_draws_them_anew():
    from mergescale.zoo import tasks as T

    for low, up in T.ANALOGY_PAIRS:
        assert (up.name, up.tag) == (f"u{low.name}", f"u{low.tag}")
        assert up.answer("abcxyz") == low.answer("abcxyz").upper()
    mixture = {(s.task.name, s.letters) for s in T.editing_base_mixture()}
    shifted = {(s.task.name, s.letters) for s in T.editing_base_mixture("v2")}
    for low, up in T.ANALOGY_PAIRS:
        known = T.known_letters(low)
        assert (low.name, known) in mixture and (up.name, known) in mixture  # both versions on the same letters
        assert T.known_letters(low, "v2") != known and (up.name, T.known_letters(low, "v2")) in shifted
    assert {t.name for t in T.UPPER_MIXTURE} <= {n for n, _ in mixture}
    assert len({T.fingerprint(), T.fingerprint("scale"), T.fingerprint("editing")}) == 3
    assert T.known_letters(T.get_task("rot13")) == T.known_letters(T.get_task("rot13"), "")  # the tiny zoo is unchanged
