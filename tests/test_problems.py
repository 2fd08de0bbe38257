"""The synthetic word-problem generator and the shipped data files."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.evals import problems
from eplb.evals.prompt import build_prompt, extract_answer, reference_answer
from eplb.resources import data_dir

DATA = data_dir()
_EQ = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def _check(problem: dict) -> None:
    """Every equation of the worked answer is right, in range, and the last one is the answer."""
    assert set(problem) == {"question", "answer"}
    answer = problem["answer"]
    lines = answer.split("\n")
    assert lines[-1].startswith("#### ") and "\n\n" not in answer
    equations = _EQ.findall(answer)
    assert 1 <= len(equations) <= 2, answer
    for a, op, b, c in equations:
        a, b, c = int(a), int(b), int(c)
        assert c == {"+": a + b, "-": a - b, "*": a * b}[op], answer
        assert c >= 0
        if op == "*":
            assert 2 <= a <= 9 and 10 <= b <= 99, answer  # 1-digit x 2-digit
        else:
            assert max(a, b, c) <= problems.MAX_SUM, answer
    first_a, _, first_b, _ = equations[0]
    assert first_a in problem["question"] and first_b in problem["question"]
    assert reference_answer(answer) == int(equations[-1][3])
    assert extract_answer(answer) == int(equations[-1][3])


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_any_seed_gives_a_correct_problem(seed: int) -> None:
    _check(problems.make_problem(random.Random(seed)))


def test_generate_is_deterministic_by_seed_and_split() -> None:
    a = problems.generate("train", 200, seed=3)
    assert a == problems.generate("train", 200, seed=3)
    assert a != problems.generate("train", 200, seed=4)
    assert len({p["question"] for p in a}) == 200  # distinct


def test_splits_are_disjoint() -> None:
    train = problems.generate("train", 3000, seed=1)
    test = problems.generate("test", 1000, seed=1)  # same seed: the hash split still separates
    assert all(problems.split_of(p["question"]) == "train" for p in train)
    assert all(problems.split_of(p["question"]) == "test" for p in test)
    assert not {p["question"] for p in train} & {p["question"] for p in test}


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ValueError, match="split"):
        problems.generate("dev", 1, seed=0)
    with pytest.raises(ValueError, match="n must be"):
        problems.generate("train", -1, seed=0)


@pytest.mark.parametrize("name", sorted(problems.TEMPLATES))
def test_every_template_gives_correct_problems(name: str) -> None:
    rng = random.Random(name)
    questions = set()
    for _ in range(200):
        question, solution, result = problems.TEMPLATES[name](rng)
        _check({"question": question, "answer": f"{solution}\n#### {result}"})
        questions.add(question)
    assert len(questions) > 190  # names, items and numbers vary


def test_shipped_files_match_the_generator() -> None:
    test = problems.read_jsonl(DATA / problems.TEST_FILE)
    train = problems.read_jsonl(DATA / problems.TRAIN_FILE)
    assert len(test) == problems.NUM_TEST == 1319
    assert len(train) == problems.NUM_TRAIN_FILE
    regenerated = problems.shipped_files()
    assert regenerated[problems.TEST_FILE] == test
    assert regenerated[problems.TRAIN_FILE] == train
    for p in test + train:
        _check(p)
    assert not {p["question"] for p in test} & {p["question"] for p in train}
    # one- and two-step problems, with several operations, in the test file
    steps = [len(_EQ.findall(p["answer"])) for p in test]
    assert steps.count(1) > 100 and steps.count(2) > 100
    ops = {op for p in test for _, op, _, _ in _EQ.findall(p["answer"])}
    assert ops == {"+", "-", "*"}


def test_prompt_of_shipped_shots_is_well_formed() -> None:
    shots = problems.read_jsonl(DATA / problems.TRAIN_FILE)[:5]
    q = problems.read_jsonl(DATA / problems.TEST_FILE)[0]["question"]
    prompt = build_prompt(shots, q)
    assert prompt.count("Question:") == 6 and prompt.endswith(f"Question: {q}\nAnswer:")
    assert prompt.count("####") == 5
