"""Synthetic grade-school word problems in the GSM8K format.

Each record is ``{"question": str, "answer": str}``; the answer is a worked solution whose last
line is ``#### N`` (as in GSM8K). Problems take one or two steps of addition, subtraction or
multiplication, kept learnable for a tiny model: a product is a 1-digit number times a 2-digit
number, sums and differences stay within 3 digits, and no result is negative.

The train/test split is a property of the question text (a stable hash), so the two splits are
disjoint by construction whatever seeds and counts are used to draw them.

Regenerate the shipped files (from the repo root) with ``python -m eplb.evals.problems``; they
live in ``src/eplb/assets/data/`` (``eplb.resources.data_dir()``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

SPLITS = ("train", "test")
TEST_SEED = 20261124
TRAIN_FILE_SEED = 7
NUM_TEST = 1319  # the size of the GSM8K test set
NUM_TRAIN_FILE = 500
TEST_FILE = "synthetic_gsm8k_test.jsonl"
TRAIN_FILE = "synthetic_gsm8k_train.jsonl"
_TEST_BUCKETS = 8  # one question in 8 belongs to the test split

NAMES = [
    ("Tom", "He"), ("Anna", "She"), ("Ben", "He"), ("Lucy", "She"), ("Sam", "He"),
    ("Mia", "She"), ("Jack", "He"), ("Emma", "She"), ("Leo", "He"), ("Sara", "She"),
    ("Omar", "He"), ("Nina", "She"), ("Paul", "He"), ("Zoe", "She"), ("Max", "He"),
    ("Lily", "She"), ("Ryan", "He"), ("Grace", "She"), ("Ivan", "He"), ("Rosa", "She"),
]
ITEMS = [
    "apples", "marbles", "stickers", "pencils", "cookies", "books", "cards", "shells",
    "stamps", "balloons", "eggs", "oranges", "toys", "coins", "flowers", "candies",
    "beads", "rocks", "cupcakes", "buttons",
]
CONTAINERS = ["boxes", "bags", "packs", "baskets", "jars", "crates"]
PLACES = ["store", "bakery", "farm", "school", "library", "market"]

MAX_SUM = 999  # every sum and every starting amount fits in 3 digits


def _mul(rng: random.Random) -> tuple[int, int, int]:
    """A 1-digit count times a 2-digit size: (m, n, m*n)."""
    m = rng.randint(2, 9)
    n = rng.randint(10, 99)
    return m, n, m * n


def _amount(rng: random.Random, lo: int, hi: int) -> int:
    """A starting amount in [lo, hi], two or three digits, biased towards three digits."""
    return rng.randint(max(lo, 10), max(hi, 10))


def _t_add(rng: random.Random) -> tuple[str, str, int]:
    (name, he), items = rng.choice(NAMES), rng.choice(ITEMS)
    a = _amount(rng, 10, MAX_SUM - 10)
    b = rng.randint(10, MAX_SUM - a) if a <= MAX_SUM - 10 else 10
    r = a + b
    q = f"{name} has {a} {items}. {he} buys {b} more {items}. How many {items} does {name} have now?"
    s = f"{name} has {a} + {b} = {r} {items} now."
    return q, s, r


def _t_sub(rng: random.Random) -> tuple[str, str, int]:
    (name, he), (friend, _), items = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
    if friend == name:
        friend = "a friend"
    a = _amount(rng, 20, MAX_SUM)
    b = rng.randint(1, a)
    r = a - b
    q = f"{name} had {a} {items}. {he} gave {b} {items} to {friend}. How many {items} does {name} have left?"
    s = f"{name} has {a} - {b} = {r} {items} left."
    return q, s, r


def _t_mul(rng: random.Random) -> tuple[str, str, int]:
    (name, _), items, box = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CONTAINERS)
    m, n, p = _mul(rng)
    q = f"{name} buys {m} {box} of {items}. Each of the {box} has {n} {items}. How many {items} does {name} buy?"
    s = f"{name} buys {m} * {n} = {p} {items}."
    return q, s, p


def _t_add_mul(rng: random.Random) -> tuple[str, str, int]:
    (name, he), items, box = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CONTAINERS)
    m, n, p = _mul(rng)
    a = _amount(rng, 10, MAX_SUM - p)
    r = a + p
    q = (f"{name} has {a} {items}. {he} buys {m} {box} with {n} {items} in each. "
         f"How many {items} does {name} have now?")
    s = f"{name} buys {m} * {n} = {p} {items}.\n{name} has {a} + {p} = {r} {items} now."
    return q, s, r


def _t_sub_mul(rng: random.Random) -> tuple[str, str, int]:
    (name, he), items, box = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CONTAINERS)
    m, n, p = _mul(rng)
    a = _amount(rng, p, MAX_SUM)
    r = a - p
    q = (f"{name} had {a} {items}. {he} sold {m} {box} with {n} {items} in each. "
         f"How many {items} does {name} have left?")
    s = f"{name} sold {m} * {n} = {p} {items}.\n{name} has {a} - {p} = {r} {items} left."
    return q, s, r


def _t_add_sub(rng: random.Random) -> tuple[str, str, int]:
    (name, he), items = rng.choice(NAMES), rng.choice(ITEMS)
    a = _amount(rng, 10, MAX_SUM - 10)
    b = rng.randint(10, MAX_SUM - a) if a <= MAX_SUM - 10 else 10
    t = a + b
    c = rng.randint(1, t)
    r = t - c
    q = (f"{name} picked {a} {items} on Monday and {b} {items} on Tuesday. {he} used {c} of them. "
         f"How many {items} are left?")
    s = f"{name} picked {a} + {b} = {t} {items}.\n{name} has {t} - {c} = {r} {items} left."
    return q, s, r


def _t_sub_sub(rng: random.Random) -> tuple[str, str, int]:
    place, items = rng.choice(PLACES), rng.choice(ITEMS)
    a = _amount(rng, 20, MAX_SUM)
    b = rng.randint(1, a)
    t = a - b
    c = rng.randint(0, t)
    r = t - c
    q = (f"A {place} had {a} {items}. It sold {b} {items} in the morning and {c} {items} in the "
         f"afternoon. How many {items} does the {place} have left?")
    s = f"After the morning the {place} has {a} - {b} = {t} {items}.\nIt has {t} - {c} = {r} {items} left."
    return q, s, r


def _t_earn_spend(rng: random.Random) -> tuple[str, str, int]:
    name, he = rng.choice(NAMES)
    m, n, p = _mul(rng)
    c = rng.randint(1, p)
    r = p - c
    q = (f"{name} earns {n} dollars each day for {m} days. {he} spends {c} dollars. "
         f"How many dollars does {name} have left?")
    s = f"{name} earns {m} * {n} = {p} dollars.\n{name} has {p} - {c} = {r} dollars left."
    return q, s, r


def _t_together(rng: random.Random) -> tuple[str, str, int]:
    (name, _), (friend, _), items = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
    if friend == name:
        friend = "a friend"
    m, n, p = _mul(rng)
    r = p + n
    q = (f"{friend} has {n} {items}. {name} has {m} times as many {items} as {friend}. "
         f"How many {items} do they have together?")
    s = f"{name} has {m} * {n} = {p} {items}.\nTogether they have {p} + {n} = {r} {items}."
    return q, s, r


TEMPLATES: dict[str, Callable[[random.Random], tuple[str, str, int]]] = {
    "add": _t_add,
    "sub": _t_sub,
    "mul": _t_mul,
    "add_mul": _t_add_mul,
    "sub_mul": _t_sub_mul,
    "add_sub": _t_add_sub,
    "sub_sub": _t_sub_sub,
    "earn_spend": _t_earn_spend,
    "together": _t_together,
}
_TEMPLATE_LIST = list(TEMPLATES.values())


def make_problem(rng: random.Random) -> dict:
    """One problem drawn with ``rng``: ``{"question", "answer"}`` (answer ends in ``#### N``)."""
    question, solution, result = rng.choice(_TEMPLATE_LIST)(rng)
    if result < 0:  # the templates never do this; a bug here would poison the data silently
        raise AssertionError(f"negative result {result} for {question!r}")
    return {"question": question, "answer": f"{solution}\n#### {result}"}


def split_of(question: str) -> str:
    """'test' or 'train': a stable hash of the question text decides."""
    digest = hashlib.blake2b(question.encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "little") % _TEST_BUCKETS == 0 else "train"


def iter_problems(split: str, seed: int) -> Iterator[dict]:
    """Endless stream of distinct problems of ``split``, deterministic by ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(seed)
    seen: set[str] = set()
    while True:
        problem = make_problem(rng)
        q = problem["question"]
        if q in seen or split_of(q) != split:
            continue
        seen.add(q)
        yield problem


def generate(split: str, n: int, seed: int) -> list[dict]:
    """``n`` distinct problems of ``split``, deterministic by ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    stream = iter_problems(split, seed)
    return [next(stream) for _ in range(n)]


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def shipped_files() -> dict[str, list[dict]]:
    """The contents of the two shipped files, regenerated from their seeds."""
    return {
        TEST_FILE: generate("test", NUM_TEST, TEST_SEED),
        TRAIN_FILE: generate("train", NUM_TRAIN_FILE, TRAIN_FILE_SEED),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the shipped synthetic GSM8K files.")
    parser.add_argument("--out", default="src/eplb/assets/data",
                        help="output folder (default: %(default)s, the shipped files, from the repo root)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in shipped_files().items():
        write_jsonl(out / name, records)
        print(f"wrote {len(records)} problems to {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
