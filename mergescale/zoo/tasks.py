"""The zoo's tasks: deterministic generators of prompt/answer pairs.

Every task maps a lowercase input string to an answer, one character at a time
(a *character map*).  Per-character maps are learnable by a 1 M-parameter model in a
few hundred steps, and merging experts trained on different maps is where model
merging is interesting (see ``shared/ZOO_NOTES.md``).

A prompt is ``"{tag}:{input}="``; the model must generate ``answer`` followed by the
end-of-sequence token.  The split of an example is a function of its *input string
only* (a stable hash), so the train / validation / test splits are disjoint across
every task and every seed.

Three families:

* ``HELD_IN`` — eight named maps, one expert each.
* ``MIXTURE`` — ``copy`` plus 32 random maps (fixed once and for all by
  ``MIXTURE_SEED``).

The base is pretrained on ``base_mixture()``: the mixture, plus every held-in task on a
fixed subset of ``KNOWN_LETTERS`` letters only.  It thus owns the "read a tag, apply a
character map" machinery and part of every held-in map, yet solves almost no held-in
test example (a test input almost always contains a letter it never saw under that
tag) — the regime of a pretrained model that experts refine, where merging is
meaningful (``shared/ZOO_NOTES.md``).  An expert is fine-tuned on ``expert_mixture()``:
its task on the whole alphabet, half of each batch replaying the base's mixture.
* ``HELD_OUT`` — ``copy`` and three mixture maps.  No expert was trained on them;
  they measure how much of the base's ability a merge keeps (normalized against the
  base's own score).

The *scale family* (``FAMILY_TASKS = "scale"``: presets xs, s, m, l) adds a second prompt
format, the tag after the input (``"{input}:{tag}="``, ``style="post"``), and uses it for
held-out tasks with headroom (``SCALE_HELD_OUT``, docs/ALGORITHMS.md#zoo-families):

* its base is pretrained on ``scale_base_mixture()``: the mixture in both formats, the held-in
  maps in the usual format on their known letters (as above) and in the post format on the
  same known letters;
* the held-out task ``<map>_post`` is a held-in map in the post format; its examples are only
  inputs that contain a letter outside the map's known letters, so no example of it is in any
  training stream of the family (every stream of that tag and format draws known letters
  only).  The base solves few of them (it knows 17 of 26 letters of the map); an expert of the
  map learned the other letters in the usual format only, so a model scores above the base
  exactly insofar as a skill learned in one format transfers, zero-shot, to another;
* an *instruct* base is the pretrained base trained further on ``instruct_mixture()``: 32 new
  maps (``INSTRUCT``, tags i00..i31) in both formats, half of each batch replaying the base's
  mixture — a broad mixture of instruction-like maps that never contains a held-in map beyond
  the base's known letters.

Task definitions do not depend on the zoo seed: the seed controls initialisation and
data order only.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")

LOWER = string.ascii_lowercase
UPPER = string.ascii_uppercase
DIGITS = string.digits
#: every character a prompt or answer may contain (the tokenizer's alphabet).
ALPHABET = LOWER + UPPER + DIGITS + ":="

MIN_LEN, MAX_LEN = 6, 6
MIXTURE_SEED = 20261101
N_MIXTURE_MAPS = 32
KNOWN_LETTERS = 17  # letters of each held-in map the base is pretrained on
REPLAY = 0.5  # fraction of an expert's fine-tuning examples drawn from the base's mixture


def split_of(text: str) -> Split:
    """The split an input string belongs to: 10 % test, 10 % validation, 80 % train."""
    bucket = hashlib.blake2b(text.encode(), digest_size=8).digest()[0] % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


@dataclass(frozen=True)
class Task:
    """A character-map task: ``answer[i] = table[input[i]]``.

    ``style``: the prompt format, ``"pre"`` (``tag:input=``) or ``"post"`` (``input:tag=``).
    ``novel``: if set, every example's input (:meth:`examples`) contains at least one letter
    outside these letters — the held-out tasks of the scale family, whose training streams draw
    only these letters."""

    name: str
    tag: str
    table: str  # 26 output characters, one per input letter a..z
    description: str
    style: Literal["pre", "post"] = "pre"
    novel: str = ""

    def __post_init__(self) -> None:
        if len(self.table) != 26 or any(c not in ALPHABET for c in self.table):
            raise ValueError(f"task {self.name}: table must be 26 characters of the alphabet")
        if any(c not in LOWER + DIGITS for c in self.tag):
            raise ValueError(f"task {self.name}: tag must be lowercase letters/digits")

    def prompt(self, text: str) -> str:
        return f"{self.tag}:{text}=" if self.style == "pre" else f"{text}:{self.tag}="

    def answer(self, text: str) -> str:
        return "".join(self.table[ord(c) - 97] for c in text)

    def examples(self, split: Split, n: int, seed: int = 0) -> list[tuple[str, str]]:
        """``n`` distinct (prompt, answer) pairs of ``split``; deterministic in (task, split, seed)."""
        return [(self.prompt(t), self.answer(t)) for t in _inputs(self.name, split, n, seed, self.novel)]

    def stream(self, split: Split, rng: random.Random, letters: str = LOWER) -> Iterator[tuple[str, str]]:
        """An endless stream of (prompt, answer) pairs of ``split`` over ``letters``, drawn with ``rng``."""
        while True:
            t = _random_input(rng, letters)
            if split_of(t) == split:
                yield self.prompt(t), self.answer(t)


def _random_input(rng: random.Random, letters: str = LOWER) -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def _inputs(name: str, split: Split, n: int, seed: int, novel: str = "") -> list[str]:
    key = int.from_bytes(hashlib.blake2b(f"{name}/{split}/{seed}".encode(), digest_size=8).digest(), "big")
    rng = random.Random(key)
    seen: dict[str, None] = {}
    while len(seen) < n:
        t = _random_input(rng)
        if split_of(t) == split and not (novel and set(t) <= set(novel)):
            seen.setdefault(t)
    return list(seen)


def _shift(k: int, out: str = LOWER) -> str:
    return "".join(out[(i + k) % 26] for i in range(26))


HELD_IN: tuple[Task, ...] = (
    Task("upper", "up", UPPER, "uppercase each letter"),
    Task("shift1", "sa", _shift(1), "caesar shift by 1 (a->b)"),
    Task("shift3", "sc", _shift(3), "caesar shift by 3 (a->d)"),
    Task("atbash", "ab", LOWER[::-1], "mirror the alphabet (a->z)"),
    Task("rot13", "rt", _shift(13), "caesar shift by 13"),
    Task("digit", "dg", "".join(DIGITS[i % 10] for i in range(26)), "letter index mod 10 (a->0, k->0)"),
    Task("upshift", "us", _shift(1, UPPER), "shift by 1 and uppercase (a->B)"),
    Task("pairswap", "ps", "".join(LOWER[i ^ 1] for i in range(26)), "swap letter pairs (a<->b, c<->d)"),
)


def _random_maps(seed: int, prefix: str, n: int, description: str) -> tuple[Task, ...]:
    """``n`` random character maps (tags ``{prefix}00``...), each onto lowercase, uppercase or any character."""
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        out = rng.choice((LOWER, UPPER, LOWER + UPPER + DIGITS))
        table = "".join(rng.choice(out) for _ in range(26))
        tasks.append(Task(f"{prefix}{i:02d}", f"{prefix}{i:02d}", table, description))
    return tuple(tasks)


def _mixture() -> tuple[Task, ...]:
    copy = Task("copy", "cp", LOWER, "repeat the input")
    return (copy, *_random_maps(MIXTURE_SEED, "m", N_MIXTURE_MAPS, "random character map (base pretraining)"))


MIXTURE: tuple[Task, ...] = _mixture()
HELD_OUT: tuple[Task, ...] = tuple(t for t in MIXTURE if t.name in ("copy", "m00", "m01", "m02"))
TASKS: dict[str, Task] = {t.name: t for t in HELD_IN + MIXTURE}


@dataclass(frozen=True)
class Source:
    """One component of a training mixture: a task, the input letters it draws from, its weight, and
    optionally ``pool``: the number of distinct training inputs it cycles through (its data size)."""

    task: Task
    letters: str = LOWER
    weight: float = 1.0
    pool: int | None = None


def known_letters(task: Task, version: str = "") -> str:
    """The fixed subset of letters on which the base sees a held-in task (``version``: another draw, the
    editing zoo's next-version base)."""
    rng = random.Random(f"known-letters{version}/{task.name}")
    return "".join(sorted(rng.sample(LOWER, KNOWN_LETTERS)))


def base_mixture() -> list[Source]:
    return [Source(t) for t in MIXTURE] + [Source(t, known_letters(t)) for t in HELD_IN]


def expert_mixture(task: Task) -> list[Source]:
    replay = base_mixture()
    return [Source(task, weight=1.0 - REPLAY)] + [Source(s.task, s.letters, REPLAY / len(replay)) for s in replay]


# ---------------------------------------------------------------- the scale family's tasks
#: the task set of a zoo: "" = the original zoo (tiny, small), "scale" = the scale family
FAMILY_TASKS = "scale"
INSTRUCT_SEED = 20261203
N_INSTRUCT_MAPS = 32


def post(task: Task, novel: str = "") -> Task:
    """``task`` in the post format (the tag after the input)."""
    return Task(f"{task.name}_post", task.tag, task.table, f"{task.description}, tag after the input", "post", novel)


INSTRUCT = _random_maps(INSTRUCT_SEED, "i", N_INSTRUCT_MAPS, "random character map (instruction tuning)")
SCALE_HELD_OUT: tuple[Task, ...] = tuple(post(t, known_letters(t)) for t in HELD_IN)
TASKS.update({t.name: t for t in SCALE_HELD_OUT + INSTRUCT})


def scale_base_mixture() -> list[Source]:
    """The scale family's pretraining mixture: ``base_mixture()`` plus the mixture in the post format and
    every held-in map in the post format on its known letters."""
    return base_mixture() + [Source(post(t)) for t in MIXTURE] + [Source(post(t), known_letters(t)) for t in HELD_IN]


def instruct_mixture() -> list[Source]:
    """The instruction stage: the INSTRUCT maps in both formats (half of each batch), the base's mixture (half)."""
    new = [Source(t) for t in INSTRUCT] + [Source(post(t)) for t in INSTRUCT]
    return _weighted(new, 0.5) + _weighted(scale_base_mixture(), 0.5)


def family_expert_mixture(tasks: Sequence[Task], replay: Sequence[Source], pool: int | None = None) -> list[Source]:
    """Fine-tuning mixture of a scale-family expert (one task) or multitask model (all held-in tasks): the
    tasks on the whole alphabet, equally, in 1 - REPLAY of each batch (each from ``pool`` distinct training
    inputs when given), and ``replay`` — the mixture its base was last trained on — in REPLAY."""
    return _weighted([Source(t, pool=pool) for t in tasks], 1.0 - REPLAY) + _weighted(replay, REPLAY)


def _weighted(sources: Sequence[Source], total: float) -> list[Source]:
    norm = sum(s.weight for s in sources)
    return [Source(s.task, s.letters, total * s.weight / norm, s.pool) for s in sources]


# ---------------------------------------------------------------- the editing zoo's tasks
#: the task set of the editing zoo (preset ``edit``): analogies and fine-tuning transfer across versions
EDITING_TASKS = "editing"


def upper_version(task: Task) -> Task:
    """``task`` with its output uppercased, under the tag ``u<tag>``: the editing zoo's analogy structure
    (A = a map, B = its upper version, C = another map, D = C's upper version)."""
    return Task(f"u{task.name}", f"u{task.tag}", task.table.upper(), f"{task.description}, then uppercase")


#: (map, its upper version) for three held-in maps: each has an expert in the editing zoo
ANALOGY_PAIRS: tuple[tuple[Task, Task], ...] = tuple(
    (t, upper_version(t)) for t in HELD_IN if t.name in ("shift1", "rot13", "atbash")
)
EDITING_HELD_IN: tuple[Task, ...] = tuple(t for pair in ANALOGY_PAIRS for t in pair)
#: the mixture's maps in their upper versions: the base sees "u<tag> = the map, uppercased" 33 times over
UPPER_MIXTURE: tuple[Task, ...] = tuple(upper_version(t) for t in MIXTURE)
#: the task fine-tuned from every pretraining checkpoint (fine-tuning transfer)
TRANSFER_TASK = "rot13"
TASKS.update({t.name: t for t in EDITING_HELD_IN + UPPER_MIXTURE})


def editing_base_mixture(version: str = "") -> list[Source]:
    """The editing zoo's pretraining mixture: the mixture and its upper versions on every letter, and each
    analogy pair (both versions) on the lowercase map's known letters — drawn anew for ``version`` "v2", the
    next-version base's shifted data."""
    out = [Source(t) for t in MIXTURE + UPPER_MIXTURE]
    for low, up in ANALOGY_PAIRS:
        letters = known_letters(low, version)
        out += [Source(low, letters), Source(up, letters)]
    return out


def fingerprint(family: str = "") -> str:
    """A hash of every task definition and mixture constant: part of a zoo's cache key."""
    parts = [f"{MIN_LEN},{MAX_LEN},{KNOWN_LETTERS},{REPLAY}"]
    parts += [f"{t.name}/{t.tag}/{t.table}" for t in HELD_IN + MIXTURE + HELD_OUT]
    parts += [known_letters(t) for t in HELD_IN]
    if family == FAMILY_TASKS:
        parts += [f"{t.name}/{t.tag}/{t.table}/{t.style}/{t.novel}" for t in INSTRUCT + SCALE_HELD_OUT]
        parts += [f"{s.task.name}/{s.task.style}/{s.letters}/{s.weight!r}" for s in instruct_mixture()]
    elif family == EDITING_TASKS:
        parts += [f"{t.name}/{t.tag}/{t.table}" for t in EDITING_HELD_IN + UPPER_MIXTURE]
        parts += [f"{s.task.name}/{s.letters}/{s.weight!r}" for v in ("", "v2") for s in editing_base_mixture(v)]
    elif family:
        raise ValueError(f"unknown zoo task set {family!r}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def get_task(name: str) -> Task:
    from mergescale.errors import MergescaleError

    try:
        return TASKS[name]
    except KeyError:
        raise MergescaleError(
            f"unknown zoo task {name!r}; known: {', '.join(t.name for t in HELD_IN + HELD_OUT)} (and m00..m31)"
        ) from None
