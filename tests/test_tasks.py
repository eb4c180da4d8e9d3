import pytest

from mergescale.errors import MergescaleError
from mergescale.zoo.tasks import HELD_IN, HELD_OUT, MIXTURE, SPLITS, TASKS, get_task, split_of


def test_enough_tasks_and_held_out_is_not_held_in():
    assert len(HELD_IN) >= 8 and len(HELD_OUT) >= 3
    assert not {t.name for t in HELD_IN} & {t.name for t in HELD_OUT}
    assert not {t.tag for t in HELD_IN} & {t.tag for t in MIXTURE}, "the base must never see a held-in tag"
    assert len({t.tag for t in TASKS.values()}) == len(TASKS)


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
