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

Task definitions do not depend on the zoo seed: the seed controls initialisation and
data order only.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Iterator
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
    """A character-map task: ``answer[i] = table[input[i]]``."""

    name: str
    tag: str
    table: str  # 26 output characters, one per input letter a..z
    description: str

    def __post_init__(self) -> None:
        if len(self.table) != 26 or any(c not in ALPHABET for c in self.table):
            raise ValueError(f"task {self.name}: table must be 26 characters of the alphabet")
        if any(c not in LOWER + DIGITS for c in self.tag):
            raise ValueError(f"task {self.name}: tag must be lowercase letters/digits")

    def prompt(self, text: str) -> str:
        return f"{self.tag}:{text}="

    def answer(self, text: str) -> str:
        return "".join(self.table[ord(c) - 97] for c in text)

    def examples(self, split: Split, n: int, seed: int = 0) -> list[tuple[str, str]]:
        """``n`` distinct (prompt, answer) pairs of ``split``; deterministic in (task, split, seed)."""
        return [(self.prompt(t), self.answer(t)) for t in _inputs(self.name, split, n, seed)]

    def stream(self, split: Split, rng: random.Random, letters: str = LOWER) -> Iterator[tuple[str, str]]:
        """An endless stream of (prompt, answer) pairs of ``split`` over ``letters``, drawn with ``rng``."""
        while True:
            t = _random_input(rng, letters)
            if split_of(t) == split:
                yield self.prompt(t), self.answer(t)


def _random_input(rng: random.Random, letters: str = LOWER) -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def _inputs(name: str, split: Split, n: int, seed: int) -> list[str]:
    key = int.from_bytes(hashlib.blake2b(f"{name}/{split}/{seed}".encode(), digest_size=8).digest(), "big")
    rng = random.Random(key)
    seen: dict[str, None] = {}
    while len(seen) < n:
        t = _random_input(rng)
        if split_of(t) == split:
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


def _mixture() -> tuple[Task, ...]:
    rng = random.Random(MIXTURE_SEED)
    tasks = [Task("copy", "cp", LOWER, "repeat the input")]
    for i in range(N_MIXTURE_MAPS):
        out = rng.choice((LOWER, UPPER, LOWER + UPPER + DIGITS))
        table = "".join(rng.choice(out) for _ in range(26))
        tasks.append(Task(f"m{i:02d}", f"m{i:02d}", table, "random character map (base pretraining)"))
    return tuple(tasks)


MIXTURE: tuple[Task, ...] = _mixture()
HELD_OUT: tuple[Task, ...] = tuple(t for t in MIXTURE if t.name in ("copy", "m00", "m01", "m02"))
TASKS: dict[str, Task] = {t.name: t for t in HELD_IN + MIXTURE}


@dataclass(frozen=True)
class Source:
    """One component of a training mixture: a task, the input letters it draws from, its weight."""

    task: Task
    letters: str = LOWER
    weight: float = 1.0


def known_letters(task: Task) -> str:
    """The fixed subset of letters on which the base sees a held-in task."""
    rng = random.Random(f"known-letters/{task.name}")
    return "".join(sorted(rng.sample(LOWER, KNOWN_LETTERS)))


def base_mixture() -> list[Source]:
    return [Source(t) for t in MIXTURE] + [Source(t, known_letters(t)) for t in HELD_IN]


def expert_mixture(task: Task) -> list[Source]:
    replay = base_mixture()
    return [Source(task, weight=1.0 - REPLAY)] + [Source(s.task, s.letters, REPLAY / len(replay)) for s in replay]


def fingerprint() -> str:
    """A hash of every task definition and mixture constant: part of a zoo's cache key."""
    parts = [f"{MIN_LEN},{MAX_LEN},{KNOWN_LETTERS},{REPLAY}"]
    parts += [f"{t.name}/{t.tag}/{t.table}" for t in HELD_IN + MIXTURE + HELD_OUT]
    parts += [known_letters(t) for t in HELD_IN]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def get_task(name: str) -> Task:
    from mergescale.errors import MergescaleError

    try:
        return TASKS[name]
    except KeyError:
        raise MergescaleError(
            f"unknown zoo task {name!r}; known: {', '.join(t.name for t in HELD_IN + HELD_OUT)} (and m00..m31)"
        ) from None
