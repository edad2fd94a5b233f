"""Scoring generations the way LLM-Adapters' commonsense evaluation does.

The model generates from the prompt (greedy by default; LLM-Adapters used 4 beams and 32 new tokens, which
``--num-beams 4 --max-new-tokens 32`` reproduce); the answer is the FIRST match, anywhere in the generated text,
of the answer pattern of the task's format (its commonsense_evaluate.py ``extract_answer``: ``re.findall``
with an alternation, no word boundaries, case kept), and it is correct when it equals the record's
``answer``. A task whose answers are of none of the eight benchmark forms (e.g. topic names) is scored the
same way over the closed set of answers that task's records use, as whole words.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Answer forms of the commonsense suite and the alternation LLM-Adapters searches for each.
ANSWER_FORMATS: dict[str, tuple[str, ...]] = {
    "true_false": ("true", "false"),
    "solution": ("solution1", "solution2"),
    "answer": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ending": ("ending1", "ending2", "ending3", "ending4"),
    "option": ("option1", "option2"),
}
#: The eight tasks by their LLM-Adapters dataset names (SIQA shares ARC's and OBQA's answer1..answer5 pattern).
TASK_FORMATS: dict[str, str] = {
    "boolq": "true_false",
    "piqa": "solution",
    "social_i_qa": "answer",
    "hellaswag": "ending",
    "winogrande": "option",
    "ARC-Easy": "answer",
    "ARC-Challenge": "answer",
    "openbookqa": "answer",
}


def answer_pattern(choices: Sequence[str], whole_words: bool = False) -> re.Pattern[str]:
    """An alternation over ``choices``; longer choices first so that one choice's prefix never wins."""
    ordered = sorted(set(choices), key=lambda c: (-len(c), c))
    body = "|".join(re.escape(c) for c in ordered)
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)" if whole_words else body)


def choices_for(task: str | None, answers: Iterable[str]) -> tuple[list[str], bool]:
    """A task's closed set of answers, and whether they are free words (matched as whole words): the format's
    choices by the task's name if it is one of the eight, else by the form of its answers, else the answers
    its records use."""
    if task in TASK_FORMATS:
        return list(ANSWER_FORMATS[TASK_FORMATS[task]]), False
    answers = set(answers)
    for choices in ANSWER_FORMATS.values():
        if answers <= set(choices):
            return list(choices), False
    return sorted(answers), True


def pattern_for(task: str | None, answers: Iterable[str]) -> re.Pattern[str]:
    """The pattern that finds a task's answer in generated text."""
    choices, whole_words = choices_for(task, answers)
    return answer_pattern(choices, whole_words=whole_words)


def extract_answer(text: str, pattern: re.Pattern[str]) -> str:
    """The first match of ``pattern`` in ``text``, or "" when there is none (scored as wrong)."""
    match = pattern.search(text.strip())
    return match.group(0) if match else ""


@dataclass
class Scores:
    """Accuracy per task, their mean (the paper's "avg") and the accuracy over all examples."""

    per_task: dict[str, float]
    counts: dict[str, int]
    average: float
    overall: float


def score(tasks: Sequence[str], correct: Sequence[bool]) -> Scores:
    """Per-task and averaged accuracy of examples labelled by task."""
    per_task: dict[str, list[int]] = {}
    for task, ok in zip(tasks, correct, strict=True):
        hits = per_task.setdefault(task, [0, 0])
        hits[0] += int(ok)
        hits[1] += 1
    accuracy = {task: hit / seen for task, (hit, seen) in sorted(per_task.items())}
    average = sum(accuracy.values()) / len(accuracy) if accuracy else math.nan
    overall = sum(int(ok) for ok in correct) / len(correct) if correct else math.nan
    return Scores(accuracy, {t: n for t, (_, n) in sorted(per_task.items())}, average, overall)
