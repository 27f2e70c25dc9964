"""The tasks the experiments train and test on, and how to load them from the cache.

Every task is a `datasets.DatasetDict` with the splits "train", "dev" and "test" and an `id` column
naming each example's source row. Columns by kind:

- classification: `text` (or `text_a` and `text_b` for sentence pairs) and `label`, a `ClassLabel`;
- multiple choice: `query` (the prompt), `choices` (list of answers) and `label` (index of the right
  answer). A causal LM scores choice i by the summed log-likelihood of the tokens of " " + choices[i]
  after `query`; the highest sum is its prediction.

`gfa assets install` builds the named tasks (see `task_sources`); `load_user_task` reads a user's
CSV/JSONL files with the same columns. A **mixture**, named by its multiple-choice tasks joined with "+"
("arc_easy+boolq+piqa"), is their union, split by split, with a `task` column naming each example's task: one
language model trains on all of them and is scored on each (the setup of the commonsense benchmarks).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, concatenate_datasets, load_from_disk

from gfa_peft.data.cache import MissingAssetError, asset_folder, read_record
from gfa_peft.data.splits import carve
from gfa_peft.data.task_registry import CHOICE_COLUMNS, MIXTURE_JOIN, TASKS, Task, check_task_name

SPLITS = ("train", "dev", "test")


class LeakageError(ValueError):
    """A model would be tested on data that overlaps the data it was trained on."""


class UserTaskError(ValueError):
    """A user's task file that cannot be used: missing columns, empty values, unseen labels."""


def load_task(name: str, cache: Path | None = None) -> tuple[Task, DatasetDict]:
    """A named task and its train/dev/test splits, as converted by `gfa assets install`; a name joining
    several multiple-choice tasks with "+" is their mixture (`load_mixture`)."""
    if MIXTURE_JOIN in name:
        return load_mixture(name.split(MIXTURE_JOIN), cache)
    check_task_name(name)
    folder = asset_folder("task", name, cache)
    if read_record(folder) is None:
        raise MissingAssetError(f"task {name!r} is not installed in {folder}: run `gfa assets install`")
    saved = load_from_disk(str(folder))
    features = next(iter(saved.values())).features
    # An empty split is not saved (datasets cannot reload one): the test-only tasks have no train/dev.
    return TASKS[name], DatasetDict({split: saved[split] if split in saved else dataset_from_rows([], features)
                                     for split in SPLITS})


def load_mixture(names: Sequence[str], cache: Path | None = None) -> tuple[Task, DatasetDict]:
    """The union of several multiple-choice tasks, split by split, with a `task` column naming each example's
    task. Raises ValueError for fewer than two tasks, a repeated or unknown one, or one that is not multiple
    choice (a classifier's head has one task's labels)."""
    if len(names) < 2 or not all(names):
        raise ValueError(f"a mixture joins two or more task names with {MIXTURE_JOIN!r}, e.g. arc_easy+boolq; "
                         f"got {MIXTURE_JOIN.join(names)!r}")
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    if repeated:
        raise ValueError(f"mixture {MIXTURE_JOIN.join(names)!r} names {', '.join(repeated)} more than once")
    members = [load_task(name, cache) for name in names]
    classification = [task.name for task, _ in members if task.kind != "multiple_choice"]
    if classification:
        raise ValueError(f"a mixture trains one language model on multiple-choice tasks; {', '.join(classification)} "
                         f"{'is a classification task' if len(classification) == 1 else 'are classification tasks'}")
    name = MIXTURE_JOIN.join(names)
    task = Task(name, "multiple_choice", CHOICE_COLUMNS, members=tuple(names),
                title="mixture of " + ", ".join(TASKS[member].title for member in names),
                source="the union of " + ", ".join(names))
    data = DatasetDict({split: concatenate_datasets([
        member_data[split].add_column("task", [member.name] * member_data[split].num_rows)
        for member, member_data in members]) for split in SPLITS})
    return task, data


def member_rows(task: Task, split: Dataset) -> dict[str, list[int]]:
    """The rows of `split` that belong to each of the task's members, in order; {task name: all rows} for a
    single task."""
    if not task.members:
        return {task.name: list(range(split.num_rows))}
    rows: dict[str, list[int]] = {member: [] for member in task.members}
    for index, member in enumerate(split["task"]):
        rows[member].append(index)
    return rows


def check_no_leakage(trained_on: str, test_task: Task) -> None:
    """Raise LeakageError if a model trained on task `trained_on` must not be tested on `test_task`."""
    if trained_on in test_task.forbidden_after:
        raise LeakageError(
            f"a model trained on {trained_on!r} must not be tested on {test_task.name!r}: their sentences overlap"
        )


def classification_dataset(rows: Sequence[dict[str, Any]], text_columns: Sequence[str],
                           label_names: Sequence[str]) -> Dataset:
    """Rows with `id`, the text columns and an integer `label` as a typed Dataset."""
    features = Features(
        {"id": Value("string"), **{column: Value("string") for column in text_columns},
         "label": ClassLabel(names=list(label_names))}
    )
    return dataset_from_rows(rows, features)


def dataset_from_rows(rows: Sequence[dict[str, Any]], features: Features) -> Dataset:
    """A typed Dataset with these features from a list of row dicts (an empty list too)."""
    return Dataset.from_dict({column: [row[column] for row in rows] for column in features}, features=features)


# ---------------------------------------------------------------- user tasks

def load_user_task(train_file: str | Path, eval_file: str | Path | None = None) -> tuple[Task, DatasetDict]:
    """A classification task from the user's CSV or JSONL files.

    Each file has a `label` column (strings or integers) and either a `text` column or the pair
    `text_a` and `text_b`. Label ids follow the sorted labels of the training file (numerically
    when all labels are integers). Without `eval_file` the training file is carved 80/10/10 into
    train/dev/test; with it, the training file is carved 90/10 into train/dev and `eval_file` is
    the test split. Raises UserTaskError, before anything is trained, on missing columns, empty
    values, or evaluation labels that the training file never uses.
    """
    train_file = Path(train_file)
    train_rows = _read_rows(train_file)
    text_columns = _text_columns(train_file, train_rows)
    label_names = _sorted_labels(row["label"] for row in train_rows)
    label_ids = {name: index for index, name in enumerate(label_names)}
    examples = _examples(train_file, train_rows, text_columns, label_ids)
    if eval_file is None:
        splits = carve(examples, {"train": 0.8, "dev": 0.1, "test": 0.1})
    else:
        eval_file = Path(eval_file)
        eval_rows = _read_rows(eval_file)
        if _text_columns(eval_file, eval_rows) != text_columns:
            raise UserTaskError(
                f"{eval_file} must have the same text columns as {train_file}: {', '.join(text_columns)}"
            )
        unseen = sorted(set(_sorted_labels(row["label"] for row in eval_rows)) - set(label_names))
        if unseen:
            raise UserTaskError(f"{eval_file} has labels that {train_file} never uses: {', '.join(unseen)}")
        splits = {**carve(examples, {"train": 0.9, "dev": 0.1}),
                  "test": _examples(eval_file, eval_rows, text_columns, label_ids)}
    task = Task(user_task_name(train_file), "classification", text_columns, tuple(label_names),
                source=f"user files {train_file}" + (f" and {eval_file}" if eval_file else ""),
                title=str(train_file))
    data = DatasetDict({split: classification_dataset(splits[split], text_columns, label_names) for split in SPLITS})
    return task, data


def user_task_name(train_file: Path) -> str:
    """The task name a run on the user's file is recorded (and filed) under: the file's format, its folder and
    its stem, e.g. "csv:reviews-train" for reviews/train.csv, so that it is never taken for a bundled task."""
    folder = train_file.resolve().parent.name
    return f"{train_file.suffix.lower().lstrip('.')}:{folder}-{train_file.stem}"


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserTaskError(f"{path} does not exist")
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as file:
        if suffix == ".csv":
            rows = list(csv.DictReader(file))
        elif suffix in (".jsonl", ".json"):
            rows = [_json_line(path, number, line) for number, line in enumerate(file, 1) if line.strip()]
        else:
            raise UserTaskError(f"{path}: expected a .csv or .jsonl file")
    if not rows:
        raise UserTaskError(f"{path} has no examples")
    return rows


def _json_line(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserTaskError(f"{path} line {number} is not JSON: {error.msg}") from None
    if not isinstance(row, dict):
        raise UserTaskError(f"{path} line {number} is not a JSON object")
    return row


def _text_columns(path: Path, rows: list[dict[str, Any]]) -> tuple[str, ...]:
    columns = set().union(*(row.keys() for row in rows))
    # A file with either half of a pair is a pair task missing the other half; one with neither lacks `text`.
    text_columns = ("text_a", "text_b") if "text" not in columns and columns & {"text_a", "text_b"} else ("text",)
    missing = [column for column in (*text_columns, "label") if column not in columns]
    if missing:
        raise UserTaskError(
            f"{path} lacks column(s) {', '.join(missing)}: expected 'text' (or 'text_a' and 'text_b') and 'label'"
        )
    return text_columns


def _label_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value).strip()


def _sorted_labels(values: Any) -> list[str]:
    labels = {_label_text(value) for value in values} - {""}
    numeric = all(label.lstrip("-").isdigit() for label in labels)
    return sorted(labels, key=int if numeric else str)


def _examples(path: Path, rows: list[dict[str, Any]], text_columns: tuple[str, ...],
              label_ids: dict[str, int]) -> list[dict[str, Any]]:
    examples = []
    for number, row in enumerate(rows, 1):
        values = {column: row.get(column) for column in text_columns}
        label = _label_text(row.get("label"))
        empty = [column for column, value in values.items() if not isinstance(value, str) or not value.strip()]
        if empty or not label:
            raise UserTaskError(f"{path} example {number}: empty {', '.join(empty or ['label'])}")
        examples.append({"id": f"{path.name}:{number}", **values, "label": label_ids[label]})
    return examples
