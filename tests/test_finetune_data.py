"""Fine-tuning data: every format reads the same rows; bad data fails naming file and line;
the seeded stratified split keeps class shares and is reproducible."""

import bz2
import collections
import csv
import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.finetuning.data import (FinetuneDataError, _label_key, infer_task, load_task_data, read_table,
                                      stratified_split)

from .conftest import REPO

ROTTEN_TOMATOES = os.path.join(REPO, "pipeline", "sample_data", "rotten_tomatoes.csv.bz2")

ROWS = [{"text": f"sentence number {i}", "other": f"pair {i}", "label": ["pos", "neg", "neutral"][i % 3],
         "score": round(i * 0.37 % 5, 2)} for i in range(60)]


def write(path, rows=ROWS, fmt=None):
    fmt = fmt or path.suffix.lstrip(".")
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t")
            w.writeheader()
            w.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_every_format_gives_the_same_splits(tmp_path, fmt):
    data = load_task_data(data=write(tmp_path / f"d.{fmt}"), text_pair_column="other", seed=3)
    reference = load_task_data(data=write(tmp_path / "ref.csv"), text_pair_column="other", seed=3)
    assert data.task == "classification" and data.labels == ["neg", "neutral", "pos"]
    for name in ("train", "validation", "test"):
        assert data.splits[name].texts == reference.splits[name].texts
        assert data.splits[name].pairs == [t.replace("sentence number", "pair") for t in data.splits[name].texts]
        assert (data.splits[name].labels == reference.splits[name].labels).all()
        # Each text keeps its own row's label (not only the same labels in the same order).
        truth = [data.labels.index(ROWS[int(text.split()[-1])]["label"]) for text in data.splits[name].texts]
        assert list(data.splits[name].labels) == truth
    assert sum(len(data.splits[n].texts) for n in ("train", "validation", "test")) == len(ROWS)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "saved"])
def test_records_streamed_a_row_at_a_time_are_the_tables_rows(tmp_path, fmt):
    """iter_records (embed.py's streamed input) reads what read_table reads, row by row, in batches."""
    from pipeline.finetuning.data import iter_records

    if fmt == "saved":  # its label a ClassLabel: its names, as read_table gives them
        import datasets

        path = str(tmp_path / "saved")
        features = datasets.Features({"text": datasets.Value("string"), "other": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=["pos", "neg", "neutral"]),
                                      "score": datasets.Value("float64")})
        datasets.Dataset.from_list(ROWS, features=features).save_to_disk(path)
    else:
        path = write(tmp_path / f"d.{fmt}")
    table = read_table(path)
    records = list(iter_records(path, batch_rows=7))
    assert [where for _, where in records] == table.where
    for name, column in table.columns.items():
        assert [record[name] for record, _ in records] == column
def test_a_dev_file_without_a_test_file_says_that_train_rows_are_held_out(tmp_path, caplog):
    """--train with --validation (GLUE's dev) and no --test quietly tested on a slice of train."""
    train, dev = write(tmp_path / "train.csv"), write(tmp_path / "dev.csv", ROWS[:12])
    with caplog.at_level("WARNING", logger="pipeline.finetuning.data"):
        data = load_task_data(train=train, validation=dev, seed=3)
    assert len(data.splits["train"]) + len(data.splits["test"]) == len(ROWS) and len(data.splits["validation"]) == 12
    assert f"no --test file: {len(data.splits['test'])} of the 60 --train rows are held out" in caplog.text
    caplog.clear()
    load_task_data(train=train, validation=dev, test=dev, seed=3)
    assert "held out" not in caplog.text


def test_the_split_seed_is_its_own_flag():
    from pipeline.finetuning.config import parse_args

    assert parse_args(["--model", "m", "--data", "d.csv", "--seed", "5"]).split_seed is None  # --seed's
    assert parse_args(["--model", "m", "--data", "d.csv", "--seed", "5", "--split-seed", "42"]).split_seed == 42


def test_saved_datasets_dict_and_dataset(tmp_path):
    import datasets

    rows = {k: [r[k] for r in ROWS] for k in ROWS[0]}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({k: v[:40] for k, v in rows.items()}),
                               "dev": datasets.Dataset.from_dict({k: v[40:50] for k, v in rows.items()}),
                               "test": datasets.Dataset.from_dict({k: v[50:] for k, v in rows.items()})})
    dd.save_to_disk(str(tmp_path / "dd"))
    data = load_task_data(data=str(tmp_path / "dd"))
    assert [len(data.splits[s]) for s in ("train", "validation", "test")] == [40, 10, 10]
    assert data.splits["validation"].texts == rows["text"][40:50]
    assert data.splits["test"].where[0].endswith("[test]: row 1")
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"))
    data = load_task_data(data=str(tmp_path / "one"))  # no splits: split off train
    assert sum(len(s) for s in data.splits.values()) == 60 and "seeded split" in data.split_from["test"]


def save_mnli_shaped(path, rows=ROWS):
    """GLUE MNLI's five splits; its two test splits unlabelled (-1), as the datasets library has them."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "other": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["pos", "neg", "neutral"])})
    ids = {"pos": 0, "neg": 1, "neutral": 2}

    def part(chunk, unlabelled=False):
        return datasets.Dataset.from_dict({"text": [r["text"] for r in chunk], "other": [r["other"] for r in chunk],
                                           "label": [-1 if unlabelled else ids[r["label"]] for r in chunk]},
                                          features=features)

    datasets.DatasetDict({"train": part(rows[:36]), "validation_matched": part(rows[36:42]),
                          "validation_mismatched": part(rows[42:48]), "test_matched": part(rows[48:54], True),
                          "test_mismatched": part(rows[54:], True)}).save_to_disk(str(path))
    return str(path)


def test_splits_of_a_saved_dataset_dict_are_named_by_flag(tmp_path, caplog):
    caplog.set_level("INFO")
    mnli = save_mnli_shaped(tmp_path / "mnli")
    # Without the flags, five splits of which three play no role are refused (one could be the test set).
    with pytest.raises(FinetuneDataError, match=r"split 'validation_matched' is not one of train, validation, test "
                                                r"\(or dev, valid, val\): name the splits to validate and test on with "
                                                r"--validation-split / --test-split"):
        load_task_data(data=mnli)
    data = load_task_data(data=mnli, validation_split="validation_matched", test_split="validation_mismatched")
    assert [len(data.splits[s]) for s in ("train", "validation", "test")] == [36, 6, 6]
    assert data.splits["validation"].texts == [r["text"] for r in ROWS[36:42]]
    assert data.splits["test"].where[0] == f"{mnli}[validation_mismatched]: row 1"
    assert data.labels == ["pos", "neg", "neutral"]  # the ClassLabel's order
    assert "test_matched, test_mismatched not used for training or scoring" in caplog.text
    # Naming only one: the test split is then cut from train, as for a dict without one.
    data = load_task_data(data=mnli, validation_split="validation_matched", seed=1)
    assert "seeded split" in data.split_from["test"] and len(data.splits["validation"]) == 6
    cases = [
        (dict(validation_split="dev"), rf"--validation-split dev: {mnli} has no such split \(splits: train, "
                                       r"validation_matched, validation_mismatched, test_matched, test_mismatched\)"),
        (dict(test_split="test_matched"), r"--test-split test_matched: the split has no labels \(column 'label' is "
                                          r"blank or -1 in all 6 rows\); name a labelled split, and write predictions "
                                          r"for this one with --predict test_matched"),
    ]
    for flags, message in cases:
        with pytest.raises(FinetuneDataError, match=message):
            load_task_data(data=mnli, **flags)
    with pytest.raises(FinetuneDataError, match="--data .*d.csv is a file, not a saved DatasetDict"):
        load_task_data(data=write(tmp_path / "d.csv"), test_split="test")
    # Two splits that would both be the validation split, and a flag that settles it.
    import datasets

    one = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(20)], "label": ["x", "y"] * 10})
    datasets.DatasetDict({"train": one, "dev": one, "validation": one}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(FinetuneDataError, match="splits 'dev' and 'validation' would both be the validation split; "
                                                "name the one to use with --validation-split"):
        load_task_data(data=str(tmp_path / "two"))
    assert load_task_data(data=str(tmp_path / "two"), validation_split="dev", seed=1).split_from["test"].endswith(
        "(seeded split)")
    # A flag that moves a split out of the role its name gave it, or leaves it unused, is warned of:
    # the test split is then cut from train, which trains on fewer rows.
    datasets.DatasetDict({"train": one, "validation": one, "test": one}).save_to_disk(str(tmp_path / "three"))
    caplog.clear()
    data = load_task_data(data=str(tmp_path / "three"), validation_split="test", seed=1)
    assert data.split_from["test"].endswith("(seeded split)") and data.split_from["validation"] == str(tmp_path / "three")
    assert "split 'validation' is not used: --validation-split named 'test' as the validation split" in caplog.text
    assert "split 'test' is the validation split (--validation-split): the test split is cut from train" in caplog.text


def test_prediction_inputs_are_files_or_splits_and_need_no_labels(tmp_path, monkeypatch):
    from pipeline.finetuning.config import FinetuneConfig, FinetuneConfigError, prediction_name
    from pipeline.finetuning.data import load_prediction_inputs

    mnli = save_mnli_shaped(tmp_path / "mnli")
    unlabelled = write(tmp_path / "unlabelled.tsv", [{"text": r["text"], "other": r["other"]} for r in ROWS[:5]],
                       fmt="tsv")
    inputs = load_prediction_inputs(["test_matched", unlabelled], data=mnli, task="classification",
                                    text_column="text", text_pair_column="other")
    assert list(inputs) == ["test_matched", "unlabelled"]  # the output names: predictions/NAME.tsv
    assert inputs["test_matched"].texts == [r["text"] for r in ROWS[48:54]]
    assert inputs["unlabelled"].pairs == [r["other"] for r in ROWS[:5]] and len(inputs["unlabelled"].labels) == 5
    assert prediction_name("glue/MNLI/test_matched.tsv") == "test_matched" and prediction_name("dev.jsonl.bz2") == "dev"
    with pytest.raises(FinetuneDataError, match=r"--predict test: no such file, nor a split of --data .*mnli \(splits: "
                                                r"train, validation_matched"):
        load_prediction_inputs(["test"], data=mnli, task="classification", text_column="text", text_pair_column=None)
    with pytest.raises(FinetuneDataError, match="--predict nope.tsv: no such file"):
        load_prediction_inputs(["nope.tsv"], data=None, task="regression", text_column="text", text_pair_column=None)
    with pytest.raises(FinetuneDataError, match=r"unlabelled.tsv: no column 'sentence'"):
        load_prediction_inputs([unlabelled], data=None, task="classification", text_column="sentence",
                               text_pair_column=None)
    with pytest.raises(FinetuneConfigError, match="--predict: two inputs would both write predictions/test.tsv"):
        FinetuneConfig(model="m", data="d", predict=["a/test.tsv", "b/test.jsonl"])
    with pytest.raises(FinetuneConfigError, match="--validation-split/--test-split name splits of a saved DatasetDict"):
        FinetuneConfig(model="m", train="t.csv", test_split="test")
    with pytest.raises(FinetuneConfigError, match="--validation-split and --test-split both name 'dev': the test "
                                                  "metrics would measure the split that picked the best epoch"):
        FinetuneConfig(model="m", data="d", validation_split="dev", test_split="dev")
    with pytest.raises(FinetuneConfigError, match="--validation-split/--test-split train: the train split trains"):
        FinetuneConfig(model="m", data="d", test_split="train")
    with pytest.raises(FinetuneConfigError, match="--predict: the same input given twice"):
        FinetuneConfig(model="m", data="d", predict=["a.tsv", "a.tsv"])
    # A name that is a split of --data and a path here: ambiguous; a path's own error says --predict
    os.makedirs(tmp_path / "cwd" / "test_matched")
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(FinetuneDataError, match=r"--predict test_matched: both a split of --data .*mnli and a path "
                                                r"here; pass the path as ./test_matched"):
        load_prediction_inputs(["test_matched"], data=mnli, task="classification", text_column="text",
                               text_pair_column=None)
    with pytest.raises(FinetuneDataError, match=r"--predict \./test_matched: \./test_matched: not a "
                                                "datasets.save_to_disk dir"):
        load_prediction_inputs(["./test_matched"], data=mnli, task="classification", text_column="text",
                               text_pair_column=None)


def test_stratified_split_keeps_class_shares_and_is_seeded():
    keys = ["a"] * 700 + ["b"] * 250 + ["c"] * 50
    val, test, train = stratified_split(keys, [0.1, 0.2], seed=1)
    assert sorted(np.concatenate([val, test, train]).tolist()) == list(range(1000))  # a partition
    for part, fraction in ((val, 0.1), (test, 0.2)):
        counts = collections.Counter(keys[i] for i in part)
        assert counts == {"a": round(700 * fraction), "b": round(250 * fraction), "c": round(50 * fraction)}
    again = stratified_split(keys, [0.1, 0.2], seed=1)
    assert all((x == y).all() for x, y in zip(again, (val, test, train)))
    other = stratified_split(keys, [0.1, 0.2], seed=2)
    assert not (other[0] == val).all()


def test_a_seeded_split_keeps_every_class_in_train_and_names_those_it_cannot_score(tmp_path, caplog):
    """Two classes of 90 rows and 20 of one row (a long tail of intents): the largest remainders
    were the one-row classes', whose only row went to validation or test, a class train lacked
    and that every prediction scored as an error."""
    rows = [{"text": f"text {i}", "label": "big1" if i < 90 else "big2" if i < 180 else f"r{i - 180:02d}"}
            for i in range(200)]
    keys = [r["label"] for r in rows]
    for seed in range(5):
        val, test, train = stratified_split(keys, [0.1, 0.1], seed=seed)
        assert {keys[i] for i in train} == set(keys)
        assert [collections.Counter(keys[i] for i in part) for part in (val, test)] == [{"big1": 10, "big2": 10}] * 2
    # Regression's strata (target deciles) keep no row back: 10 rows still split 1/1/8.
    assert [len(part) for part in stratified_split(list(range(10)), [0.1, 0.1], seed=0, keep_one=False)] == [1, 1, 8]
    scores = load_task_data(data=write(tmp_path / "scores.csv", [{"text": f"t{i}", "label": i + 0.5} for i in range(10)]))
    assert scores.task == "regression" and [len(scores.splits[s]) for s in ("train", "validation", "test")] == [8, 1, 1]
    with caplog.at_level("WARNING"):
        data = load_task_data(data=write(tmp_path / "tail.csv", rows))
    assert len(data.labels) == 22 and set(data.splits["train"].labels.tolist()) == set(range(22))
    warned = [r.getMessage() for r in caplog.records if "too few rows" in r.getMessage()]
    assert len(warned) == 2 and warned[0].startswith("20 of the 22 classes have too few rows for the seeded "
                                                     "validation split to hold one ('r00', 'r01',")


def test_regression_is_inferred_and_split_by_target_quantiles(tmp_path):
    data = load_task_data(data=write(tmp_path / "d.csv"), label_column="score", seed=0)
    assert data.task == "regression" and data.labels == []
    assert data.splits["train"].labels.dtype == np.float32
    # 6 test rows from 6 different deciles of the target (quantile strata, not luck)
    test = data.splits["test"].labels
    deciles = np.quantile([r["score"] for r in ROWS], np.linspace(0.1, 0.9, 9))
    assert len(test) == 6 and len(set(np.searchsorted(deciles, test, side="right"))) == 6
    assert infer_task(["1", "0", "1"]) == "classification"  # whole numbers: class ids
    assert infer_task(["0.5", "3", "4.2"]) == "regression"
    assert infer_task(["pos", "3.5"]) == "classification"


def test_labels_of_any_type_map_to_one_id(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(20)))
    validation = write(tmp_path / "validation.csv", [{"text": "x", "label": "1"}, {"text": "y", "label": "0"}])
    test = tmp_path / "test.parquet"
    pq.write_table(pa.table({"text": ["z", "w"], "label": [1.0, 0.0]}), test)
    data = load_task_data(train=str(train), validation=validation, test=str(test))
    assert data.labels == ["0", "1"] and data.label2id == {"0": 0, "1": 1}
    assert data.splits["validation"].labels.tolist() == [1, 0] == data.splits["test"].labels.tolist()
    assert data.split_from == {"train": str(train), "validation": validation, "test": str(test)}


def test_booleans_are_one_class_whether_json_parquet_or_pandas_csv_text(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 3 == 0}) + "\n" for i in range(30)))
    validation = write(tmp_path / "validation.csv", [{"text": "x", "label": "True"}, {"text": "y", "label": "False"}])
    test = tmp_path / "test.parquet"
    pq.write_table(pa.table({"text": ["z", "w"], "label": [False, True]}), test)
    data = load_task_data(train=str(train), validation=validation, test=str(test))
    assert data.labels == ["false", "true"]  # the names a prediction is written as, not 0 and 1
    assert data.splits["validation"].labels.tolist() == [1, 0] and data.splits["test"].labels.tolist() == [0, 1]


def test_an_int_label_column_of_minus_ones_is_a_labelled_split(tmp_path):
    import datasets

    train = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(40)], "label": [-1, 1] * 20})
    test = datasets.Dataset.from_dict({"text": ["u", "v", "w"], "label": [-1, -1, -1]})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    data = load_task_data(data=str(tmp_path / "dd"), seed=1)
    assert data.labels == ["-1", "1"] and data.splits["test"].labels.tolist() == [0, 0, 0]
    assert data.split_from["test"] == f"{tmp_path}/dd"  # the saved split, not a seeded cut of train


def test_dropped_labels_are_counted_on_the_real_reviews():
    data = load_task_data(data=ROTTEN_TOMATOES, label_column="category", drop_labels=["plot"], seed=42)
    assert data.labels == ["fresh", "rotten"]
    assert data.dropped["train"] == 1097  # every plot summary, counted
    sizes = {name: len(split) for name, split in data.splits.items()}
    assert sum(sizes.values()) == 7403 + 5405 and sizes["test"] == sizes["validation"] == 1281
    for split in data.splits.values():  # fresh share 57.8% in every split
        assert np.mean(split.labels == 0) == pytest.approx(7403 / 12808, abs=0.002)


# ------------------------------------------------------------------ bad data: file and line named
def test_missing_column_names_the_file_and_the_columns(tmp_path):
    path = write(tmp_path / "d.csv")
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("review, sentiment\ngood film,1\nbad film,0\n")
    with pytest.raises(FinetuneDataError, match=r"spaced\.csv: no column 'sentiment' \(columns: review,  sentiment\); "
                                                 r"column ' sentiment' has spaces around its name: remove them"):
        load_task_data(data=str(spaced), text_column="review", label_column="sentiment")
    with pytest.raises(FinetuneDataError, match=r"d\.csv: no column 'sentence' \(columns: text, other, label, score\)"):
        load_task_data(data=path, text_column="sentence")
    with pytest.raises(FinetuneDataError, match="no column 'pair2'"):
        load_task_data(data=path, text_pair_column="pair2")


def test_empty_files(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(FinetuneDataError, match=r"empty\.csv: the file is empty"):
        load_task_data(data=str(tmp_path / "empty.csv"))
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(FinetuneDataError, match=r"header\.csv: the file has no rows"):
        load_task_data(data=str(tmp_path / "header.csv"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(FinetuneDataError, match=r"empty\.jsonl: the file has no rows"):
        load_task_data(train=write(tmp_path / "t.csv"), test=str(tmp_path / "empty.jsonl"))


def test_unknown_label_in_test_names_file_and_line(tmp_path):
    test = tmp_path / "test.csv"
    test.write_text('text,label\n"a line\nthat spans two",pos\nsomething,surprised\n')
    with pytest.raises(FinetuneDataError) as err:
        load_task_data(train=write(tmp_path / "train.csv"), test=str(test))
    # the bad row starts on line 4 (the quoted cell of the row before spans lines 2-3)
    assert f"{test}:4: label 'surprised' in column 'label' does not occur in the train split" in str(err.value)
    assert "(labels: neg, neutral, pos)" in str(err.value)


def test_non_numeric_regression_target_names_file_and_line(tmp_path):
    rows = [{"text": f"t{i}", "label": f"{i * 0.5}"} for i in range(10)]
    rows[6]["label"] = "n/a"
    path = write(tmp_path / "scores.tsv", rows)
    with pytest.raises(FinetuneDataError, match=rf"{tmp_path}/scores\.tsv:8: regression target 'n/a'.*not a finite number"):
        load_task_data(data=path, task="regression")
    jsonl = tmp_path / "scores.jsonl"
    jsonl.write_text('{"text": "a", "label": 1.5}\n{"text": "b", "label": null}\n')
    with pytest.raises(FinetuneDataError, match=r"scores\.jsonl:2: column 'label' is blank"):
        load_task_data(data=str(jsonl), task="regression")


def test_malformed_rows_and_formats(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,pos\ntoo,many,fields\n")
    with pytest.raises(FinetuneDataError, match=r"bad\.csv:3: 3 fields, but the header has 2"):
        read_table(str(bad))
    jsonl = tmp_path / "bad.jsonl.bz2"
    jsonl.write_bytes(bz2.compress(b'{"text": "a", "label": "x"}\n{"text": oops}\n'))
    with pytest.raises(FinetuneDataError, match=r"bad\.jsonl\.bz2:2: not valid JSON"):
        read_table(str(jsonl))
    with pytest.raises(FinetuneDataError, match=r"data\.xlsx: unknown format '\.xlsx'"):
        read_table(str(tmp_path / "data.xlsx") if (tmp_path / "data.xlsx").write_text("x") else "")
    with pytest.raises(FinetuneDataError, match="no such file"):
        read_table(str(tmp_path / "missing.csv"))
    empty_text = write(tmp_path / "e.jsonl", [{"text": "a", "label": "x"}, {"text": None, "label": "y"}] * 5)
    with pytest.raises(FinetuneDataError, match=r"e\.jsonl:\d+: column 'text' is empty"):
        load_task_data(data=empty_text)


# ------------------------------------------------------------------ bad bytes, BOMs, blank labels
def _spanning_csv(bad_line: int) -> bytes:
    """A header and 300 rows whose quoted text spans two lines (601 physical lines, ~12 KB, so
    the bad byte lies past the first 8 KiB read), with a 0xff byte on physical line ``bad_line``."""
    lines = [b"text,label"]
    for i in range(300):
        lines += [b'"row %d first half' % i, b'second half",%s' % [b"pos", b"neg"][i % 2]]
    lines[bad_line - 1] = lines[bad_line - 1].replace(b"half", b"h\xffalf")
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("name", ["d.csv", "d.csv.gz"])
def test_invalid_utf8_in_csv_names_the_physical_line(tmp_path, name):
    content = _spanning_csv(bad_line=403)
    path = tmp_path / name
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    # line 403 is the second half of record 201 (lines 402-403): counting records says 201 or 202
    with pytest.raises(FinetuneDataError, match=rf"{name}:403: not valid UTF-8 \(byte 0xff at column 9\)"):
        read_table(str(path))
    header = tmp_path / "header.csv"
    header.write_bytes(b"te\xe9xt,label\nfine,pos\n")  # latin-1 é in the header
    with pytest.raises(FinetuneDataError, match=r"header\.csv:1: not valid UTF-8 \(byte 0xe9 at column 3\)"):
        read_table(str(header))


def test_invalid_utf8_in_jsonl_names_the_line(tmp_path):
    lines = [json.dumps({"text": f"sentence {i} " + "x" * 40, "label": "ab"[i % 2]}).encode() for i in range(300)]
    lines[249] = lines[249].replace(b"sentence", b"sent\xc3\x28nce")  # a broken two-byte sequence
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(FinetuneDataError, match=r"d\.jsonl:250: not valid UTF-8 \(byte 0xc3 at column 15\)"):
        read_table(str(path))
    truncated = tmp_path / "t.jsonl"  # a multi-byte character cut off at the end of the file
    truncated.write_bytes(b'{"text": "a", "label": "x"}\n{"text": "\xe2\x82')
    with pytest.raises(FinetuneDataError, match=r"t\.jsonl:2: not valid UTF-8 \(byte 0xe2 at column 11\)"):
        read_table(str(truncated))


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "d.csv").write_bytes(bom + "text,label\nünïcode,pos\nplain,neg\n".encode())
    (tmp_path / "d.tsv.gz").write_bytes(gzip.compress(bom + b"text\tlabel\nfirst\tpos\nsecond\tneg\n"))
    (tmp_path / "d.jsonl").write_bytes(bom + b'{"text": "first", "label": "pos"}\n{"text": "2nd", "label": "neg"}\n')
    for name, first_line in (("d.csv", 2), ("d.tsv.gz", 2), ("d.jsonl", 1)):
        table = read_table(str(tmp_path / name))
        assert list(table.columns) == ["text", "label"], name
        assert table.columns["label"] == ["pos", "neg"] and table.where[0] == f"{tmp_path / name}:{first_line}"
    assert read_table(str(tmp_path / "d.csv")).columns["text"][0] == "ünïcode"


def test_a_blank_label_is_an_error_or_a_counted_drop(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[10]["label"] = ""
    rows[20]["label"] = "  "
    path = write(tmp_path / "d.csv", rows)
    with pytest.raises(FinetuneDataError, match=r"d\.csv:12: column 'label' is blank \(2 rows in .*d\.csv\).*"
                                                r"--drop-label ''"):
        load_task_data(data=path)
    data = load_task_data(data=path, drop_labels=[""])
    assert data.labels == ["neg", "neutral", "pos"] and data.dropped["train"] == 2
    assert sum(len(s) for s in data.splits.values()) == 58
    jsonl = tmp_path / "d.jsonl"  # null is blank too
    jsonl.write_text("".join(json.dumps({"text": f"t{i}", "label": None if i == 4 else "ab"[i % 2]}) + "\n"
                             for i in range(20)))
    with pytest.raises(FinetuneDataError, match=r"d\.jsonl:5: column 'label' is blank \(1 row in"):
        load_task_data(data=str(jsonl))
    assert load_task_data(data=str(jsonl), drop_labels=[""]).dropped["train"] == 1


def test_a_blank_regression_target_does_not_make_a_classification_task(tmp_path):
    rows = [{"text": r["text"], "score": r["score"]} for r in ROWS]
    rows[33]["score"] = ""
    path = write(tmp_path / "scores.csv", rows)
    # before: "" is no number, so the 59 distinct scores and "" became 60 classes
    with pytest.raises(FinetuneDataError, match=r"scores\.csv:35: column 'score' is blank"):
        load_task_data(data=path, label_column="score")
    data = load_task_data(data=path, label_column="score", drop_labels=[""])
    assert data.task == "regression" and data.dropped["train"] == 1
    (tmp_path / "test.csv").write_text("text,score\na,0.5\nb,\n")
    with pytest.raises(FinetuneDataError, match=r"test\.csv:3: column 'score' is blank"):
        load_task_data(train=write(tmp_path / "train.csv", rows[:33] + rows[34:]), test=str(tmp_path / "test.csv"),
                       label_column="score")


def test_a_jsonl_row_without_the_label_key_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(20)]
    del rows[6]["label"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FinetuneDataError, match=r"d\.jsonl:7: no key 'label' in this row \(other rows have it\)"):
        load_task_data(data=str(path), drop_labels=[""])  # a missing key is not a blank label
    del rows[3]["text"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FinetuneDataError, match=r"d\.jsonl:4: no key 'text' in this row"):
        load_task_data(data=str(path))


# ------------------------------------------------------------------ headers, quoting, archives, label spellings
def test_a_column_named_twice_is_refused_not_interleaved(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label,text\nfirst a,pos,first b\nsecond a,neg,second b\n")
    # before: "text" got both cells of every row, and the texts shifted against their labels
    with pytest.raises(FinetuneDataError, match=r"d\.csv:1: the header names column 'text' more than once"):
        read_table(str(path))
    path.write_text("text,label,,\nfirst,pos,,\nsecond,neg,,\n")  # a spreadsheet's unnamed trailing columns
    assert read_table(str(path)).columns["label"] == ["pos", "neg"]


def test_tsv_cells_keep_their_quotes_as_glue_files_need(tmp_path):
    # GLUE's sentences may start with a quote and hold unpaired ones; csv's quoting rules would
    # drop the first pair and let the unpaired one swallow the lines after it.
    path = tmp_path / "d.tsv"
    path.write_text('sentence\tlabel\n"Great" movie, truly\t1\n"unclosed quote here\t0\nplain\t1\n')
    table = read_table(str(path))
    assert table.columns["sentence"] == ['"Great" movie, truly', '"unclosed quote here', "plain"]
    assert table.columns["label"] == ["1", "0", "1"] and table.where[2] == f"{path}:4"
    pandas = tmp_path / "p.tsv"  # what pandas' to_csv(sep="\t") writes for a cell holding a quote
    pandas.write_text('sentence\tlabel\nplain\t1\n"He said ""hi"" today"\t0\n')
    with pytest.raises(FinetuneDataError, match=r"p\.tsv:3: the cell '\"He said .* looks csv-quoted.*save .* as \.csv"):
        read_table(str(pandas))
    pandas.write_text('sentence\tlabel\n"a\tb"\t1\n')  # a quoted tab: the field count says it
    with pytest.raises(FinetuneDataError, match=r"p\.tsv:2: 3 fields, but the header has 2 .*needs csv quoting"):
        read_table(str(pandas))
    csv_path = tmp_path / "d.csv"  # a csv keeps csv's quoting: a quoted cell may hold the delimiter
    csv_path.write_text('sentence,label\n"a, b",1\n')
    assert read_table(str(csv_path)).columns["sentence"] == ["a, b"]


@pytest.mark.parametrize("name", ["d.csv.gz", "d.jsonl.bz2", "d.tsv.xz", "d.jsonl.zst"])
def test_a_truncated_or_corrupt_archive_names_the_file(tmp_path, name):
    import lzma

    import zstandard

    rows = "".join(json.dumps({"text": f"row {i} " * 20, "label": "ab"[i % 2]}) + "\n" for i in range(200)).encode()
    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
                ".zst": zstandard.ZstdCompressor().compress}[os.path.splitext(name)[1]]
    whole = compress(rows)
    path = tmp_path / name
    if name.startswith("d.jsonl"):  # whole, it reads as the same rows
        path.write_bytes(whole)
        assert len(read_table(str(path)).columns["text"]) == 200
    path.write_bytes(whole[:len(whole) // 2])  # a copy cut short
    with pytest.raises(FinetuneDataError, match=rf"{name}: not a readable \.\w+ file \("):
        read_table(str(path))
    path.write_bytes(rows)  # not compressed at all, whatever the name says
    with pytest.raises(FinetuneDataError, match=rf"{name}: not a readable \.\w+ file \("):
        read_table(str(path))


def test_a_json_array_file_is_told_to_be_json_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"text": "a", "label": "x"}\n]\n')
    with pytest.raises(FinetuneDataError, match=r"d\.json:1: not valid JSON .*a JSON array is not read"):
        read_table(str(path))


def test_whole_decimal_labels_from_a_csv_are_the_numeric_labels_of_a_jsonl(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"t{i}", "label": float(i % 3)}) + "\n" for i in range(20)))
    test = tmp_path / "test.csv"
    test.write_text("text,label\nx,1.0\ny,0.00\nz,2\nw,1\n")
    data = load_task_data(train=str(train), test=str(test))
    assert data.labels == ["0", "1", "2"] and data.splits["test"].labels.tolist() == [1, 0, 2, 1]
    assert [_label_key(v) for v in ("1.0", "-0.0", "3.", "01.0", "01", "+1.0", "1.5")] == \
        ["1", "0", "3", "01.0", "01", "+1.0", "1.5"]  # only what a float prints is respelled
    data = load_task_data(train=str(train), test=str(test), drop_labels=["2.0"])  # 2.0 is the 2 of both
    assert data.dropped == {"train": 6, "test": 1, "validation": 0} and data.labels == ["0", "1"]


def test_class_label_names_are_the_labels_and_an_unlabelled_test_split_is_made_from_train(tmp_path, caplog):
    import datasets

    # MRPC's names, not in alphabetical order: id 1 (f1_binary's positive class) must stay "equivalent"
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["not_equivalent", "equivalent"])})
    train = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(40)], "label": [i % 2 for i in range(40)]},
                                       features=features)
    test = datasets.Dataset.from_dict({"text": ["u", "v"], "label": [-1, -1]}, features=features)  # as GLUE's
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    data = load_task_data(data=str(tmp_path / "dd"), seed=1)
    assert data.labels == ["not_equivalent", "equivalent"]
    whole = np.concatenate([data.splits[s].labels for s in ("train", "validation", "test")])
    texts = sum((data.splits[s].texts for s in ("train", "validation", "test")), [])
    assert all(label == int(text[1:]) % 2 for label, text in zip(whole, texts))  # the dataset's own ids
    assert "seeded split" in data.split_from["test"] and len(data.splits["test"]) == 4
    assert "the test split has no labels" in caplog.text
    # STS-B's unlabelled test split holds -1.0 scores
    scores = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(40)], "label": [i / 8 for i in range(40)]})
    unscored = datasets.Dataset.from_dict({"text": ["u", "v"], "label": [-1.0, -1.0]})
    datasets.DatasetDict({"train": scores, "test": unscored}).save_to_disk(str(tmp_path / "stsb"))
    data = load_task_data(data=str(tmp_path / "stsb"), seed=1)
    assert data.task == "regression" and "seeded split" in data.split_from["test"] and len(data.splits["test"]) == 4


@pytest.mark.parametrize("text, message", [
    ("", r"c\.csv:4: column 'text' is empty \(2 rows in .*c\.csv\); every row needs a text"),
    ("   ", r"c\.csv:4: column 'text' is empty \(2 rows in"),
])
def test_a_blank_text_is_refused_naming_the_row(tmp_path, text, message):
    """An empty cell trained as "[CLS] [SEP]" with its row's label (a null in jsonl was refused)."""
    rows = [{"text": f"review {i}", "label": "pos" if i % 2 else "neg"} for i in range(20)]
    rows[2]["text"] = rows[7]["text"] = text
    with pytest.raises(FinetuneDataError, match=message):
        load_task_data(data=write(tmp_path / "c.csv", rows))
    rows[2]["text"] = rows[7]["text"] = "fine"
    pair = [{**r, "other": "" if i == 5 else "b"} for i, r in enumerate(rows)]
    with pytest.raises(FinetuneDataError, match=r"p\.csv:7: column 'other' is empty \(1 row in"):
        load_task_data(data=write(tmp_path / "p.csv", pair), text_pair_column="other")


def test_a_lone_surrogate_escape_is_refused_by_fine_tuning_and_embedding(tmp_path):
    """json.loads accepts "\\ud800" alone; the tokenizer then failed with a TypeError traceback."""
    from pipeline.embed_inputs import scan_inputs

    lines = [json.dumps({"text": f"review {i}", "label": "pos" if i % 2 else "neg"}) for i in range(20)]
    lines[3] = '{"text": "bad \\ud800 text", "label": "pos"}'
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    message = r"s\.jsonl:4: column 'text' holds an unpaired surrogate escape \(\\ud800\), which is not text"
    with pytest.raises(FinetuneDataError, match=message):
        load_task_data(data=str(path))
    with pytest.raises(FinetuneDataError, match=message):
        scan_inputs(str(path), "text")


def test_a_nan_in_a_column_of_numbers_and_an_absent_drop_label_are_refused(tmp_path):
    """A "nan" score made the column 8 classes, one of them "nan", without a word; a --drop-label typo
    ("Neutral" for "neutral") dropped nothing and said nothing."""
    rows = [{"text": f"review {i}", "score": str(i % 7 * 0.5)} for i in range(30)]
    rows[4]["score"] = "nan"
    path = write(tmp_path / "s.csv", rows)
    with pytest.raises(FinetuneDataError, match=r"s\.csv:6: label 'nan' in column 'score', a column of numbers "
                                                r"\(1 such row\): fix or drop those rows, or pass --task classification"):
        load_task_data(data=path, label_column="score")
    assert "nan" in load_task_data(data=path, label_column="score", task="classification").labels
    assert load_task_data(data=path, label_column="score", drop_labels=["nan"]).task == "regression"
    labelled = write(tmp_path / "l.csv", [{"text": f"t {i}", "label": ("neutral", "pos", "neg")[i % 3]}
                                          for i in range(30)])
    with pytest.raises(FinetuneDataError, match=r"--drop-label 'Neutral': no row has that label in column 'label' "
                                                r"\(labels: 'neg', 'neutral', 'pos'\)"):
        load_task_data(data=labelled, drop_labels=["Neutral"])
    assert load_task_data(data=labelled, drop_labels=["neutral"]).labels == ["neg", "pos"]
    assert load_task_data(data=labelled, drop_labels=[""]).labels == ["neg", "neutral", "pos"]  # a safeguard


# ------------------------------------------------------------------ files a user's editor or export got wrong
def test_an_unclosed_quote_names_its_row_instead_of_swallowing_the_rest(tmp_path):
    path = tmp_path / "d.csv"
    lines = [f"review {i},{'ab'[i % 2]}" for i in range(40)]
    lines[20] = '"a review that opens a quote and never closes it,a'
    path.write_text("text,label\n" + "\n".join(lines) + "\n")
    # before: one cell held lines 22-41, and 19 rows were gone with exit code 0
    with pytest.raises(FinetuneDataError, match=r"d\.csv:22: a quote opened in this row is never closed"):
        read_table(str(path))
    lines[20] = '"a quote closed "too early",a'
    path.write_text("text,label\n" + "\n".join(lines) + "\n")
    with pytest.raises(FinetuneDataError, match=r'd\.csv:22: a quoted cell has more after its closing quote .*\(""\)'):
        read_table(str(path))
    lines[20] = '"a quote ""inside"", written twice",a'
    path.write_text("text,label\n" + "\n".join(lines) + "\n")
    assert read_table(str(path)).columns["text"][20] == 'a quote "inside", written twice'


@pytest.mark.parametrize("separator, fix", [("\t", "name the file .tsv"),
                                            (";", "save it with commas as the separator")])
def test_a_csv_separated_by_something_else_is_named_as_such(tmp_path, separator, fix):
    path = tmp_path / "d.csv"
    path.write_text(f"text{separator}label\nfine{separator}a\n")
    # before: "no column 'text' (columns: text;label)", which seems to list it
    with pytest.raises(FinetuneDataError, match=rf"d\.csv:1: the header is one column, .*: the file looks separated "
                                                rf"by \w+, not commas; {fix}"):
        load_task_data(data=str(path))


def test_a_blank_first_line_is_named_not_read_as_an_empty_header(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("\ntext,label\nfine,a\n")
    with pytest.raises(FinetuneDataError, match=r"d\.csv:1: the first line is blank; the header"):
        read_table(str(path))


def test_a_word_among_fractional_scores_is_refused_not_made_a_class(tmp_path):
    rows = [{"text": r["text"], "score": r["score"]} for r in ROWS]
    rows[9]["score"] = "n/a"
    path = write(tmp_path / "scores.csv", rows)
    # before: 59 scores and "n/a" became 60 classes of a classification task, exit code 0
    with pytest.raises(FinetuneDataError, match=r"scores\.csv:11: label 'n/a' in column 'score', a column of numbers"):
        load_task_data(data=path, label_column="score")
    # Told, the scores are classes; each of one row cannot give a row to a split cut from train.
    with pytest.raises(FinetuneDataError, match=r"scores\.csv: no class has a row to spare for the validation split "
                                                r"\(60 classes in 60 rows"):
        load_task_data(data=path, label_column="score", task="classification")
    twice = write(tmp_path / "twice.csv", rows * 2)
    assert load_task_data(data=twice, label_column="score", task="classification").task == "classification"
    # Whole numbers with a word are classes as they were (a rating scale with "unsure", say).
    rows = [{"text": f"t{i}", "label": str(i % 3)} for i in range(30)] + [{"text": "t", "label": "unsure"}]
    assert load_task_data(data=write(tmp_path / "classes.csv", rows)).task == "classification"


def test_a_jsonl_text_that_is_a_list_is_refused_not_trained_on_as_its_repr(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(20)]
    rows[4]["text"] = ["a", "list"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FinetuneDataError, match=r"d\.jsonl:5: column 'text' holds a list, not text"):
        load_task_data(data=str(path))
    rows[4]["text"], rows[7]["label"] = "t4", {"a": 1}  # multi-label data: one class per spelling, before
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FinetuneDataError, match=r"d\.jsonl:8: column 'label' holds a dict, not a label"):
        load_task_data(data=str(path))
    table = pa.table({"text": [f"t{i}" for i in range(20)], "label": [["a", "b"] if i == 2 else ["a"] for i in range(20)]})
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(FinetuneDataError, match=r"d\.parquet.* column 'label' holds a list, not a label"):
        load_task_data(data=str(tmp_path / "d.parquet"))


def test_a_class_label_class_without_train_rows_is_no_class_of_the_model(tmp_path, caplog):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "neutral", "pos"])})

    def split(labels):
        return datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(len(labels))], "label": labels},
                                          features=features)

    datasets.DatasetDict({"train": split([0, 1, 2] * 20), "test": split([0, 2] * 5)}).save_to_disk(str(tmp_path / "a"))
    data = load_task_data(data=str(tmp_path / "a"), drop_labels=["neutral"], seed=1)
    # the ClassLabel's order, less the dropped class: no "neutral" output to predict or score
    assert data.labels == ["neg", "pos"] and data.classes_left_out == ["neutral"]
    assert data.splits["test"].labels.tolist() == [0, 1] * 5
    assert "1 of the ClassLabel's 3 classes have no train row ('neutral')" in caplog.text
    # a class that only the test split has is never trained: refused as for a csv
    datasets.DatasetDict({"train": split([0, 2] * 20), "test": split([0, 1, 2] * 3)}).save_to_disk(str(tmp_path / "b"))
    with pytest.raises(FinetuneDataError, match=r"b\[test\]: row 2: label 'neutral' in column 'label' does not occur "
                                                r"in the train split \(labels: neg, pos\)"):
        load_task_data(data=str(tmp_path / "b"))


def test_class_label_names_that_are_booleans_or_numbers_keep_their_classes(tmp_path):
    import datasets

    # SuperGLUE BoolQ's label: ClassLabel(names=["False", "True"])
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["False", "True"])})
    datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(30)], "label": [i % 2 for i in range(30)]},
                               features=features).save_to_disk(str(tmp_path / "boolq"))
    data = load_task_data(data=str(tmp_path / "boolq"), seed=1)
    assert data.labels == ["False", "True"] and data.classes_left_out == []
    whole = np.concatenate([data.splits[s].labels for s in ("train", "validation", "test")])
    texts = sum((data.splits[s].texts for s in ("train", "validation", "test")), [])
    assert all(label == int(text[1:]) % 2 for label, text in zip(whole, texts))  # the dataset's own ids


@pytest.mark.parametrize("flag", ["validation", "test"])
def test_a_held_out_file_that_is_the_train_file_is_refused(tmp_path, flag):
    train = write(tmp_path / "train.csv")
    os.symlink(train, tmp_path / "same.csv")
    with pytest.raises(FinetuneDataError, match=rf"--{flag} .*same\.csv is the --train file: its rows would be "
                                                "trained on"):
        load_task_data(train=train, **{flag: str(tmp_path / "same.csv")})


def test_binary_parquet_columns_are_read_as_utf8_text(tmp_path):
    from pipeline.finetuning.data import iter_records

    # a binary column the task does not read (a digest) may hold any bytes
    rows = [{"text": f"wörd {i}".encode(), "label": [b"neg", b"pos"][i % 2], "digest": bytes([255, i])}
            for i in range(20)]
    table = pa.Table.from_pylist(rows, schema=pa.schema([("text", pa.binary()), ("label", pa.binary()),
                                                         ("digest", pa.binary())]))
    pq.write_table(table, tmp_path / "spark.parquet")
    data = load_task_data(data=str(tmp_path / "spark.parquet"), seed=1)
    assert data.labels == ["neg", "pos"]
    assert sorted(sum((data.splits[s].texts for s in data.splits), [])) == sorted(f"wörd {i}" for i in range(20))
    assert [r["text"] for r, _ in iter_records(str(tmp_path / "spark.parquet"))][:2] == ["wörd 0", "wörd 1"]
    rows[3]["text"] = b"caf\xe9"  # Latin-1
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "latin1.parquet")
    with pytest.raises(FinetuneDataError, match=r"latin1\.parquet: row 4: column 'text' is binary and not UTF-8 text "
                                                r"\(byte 3: "):
        load_task_data(data=str(tmp_path / "latin1.parquet"))


def test_json_that_is_not_json_lines_is_told_so(tmp_path):
    (tmp_path / "records.json").write_text(json.dumps(ROWS[:5]))  # pandas' orient="records", one line
    with pytest.raises(FinetuneDataError, match=r"records\.json:1: a JSON object per line is expected, got list; "
                                                "a JSON array is not read"):
        read_table(str(tmp_path / "records.json"))
    columns = {k: {str(i): r[k] for i, r in enumerate(ROWS[:5])} for k in ROWS[0]}  # pandas' to_json default
    (tmp_path / "columns.json").write_text(json.dumps(columns))
    with pytest.raises(FinetuneDataError, match=r"columns\.json: one JSON object of columns \(pandas' to_json "
                                                r"default\), not one object a row: write JSON Lines"):
        read_table(str(tmp_path / "columns.json"))


def test_a_fractional_score_where_train_had_whole_ones_suggests_regression(tmp_path):
    train = write(tmp_path / "train.csv", [{"text": f"t{i}", "score": i % 6} for i in range(30)])
    dev = write(tmp_path / "dev.csv", [{"text": "a", "score": 2.5}])
    with pytest.raises(FinetuneDataError, match=r"label '2\.5' .* \(labels: 0, 1, 2, 3, 4, 5\); if the column is a "
                                                "score, pass --task regression"):
        load_task_data(train=train, validation=dev, label_column="score")
    assert load_task_data(train=train, validation=dev, label_column="score", task="regression").task == "regression"


def test_labels_that_are_something_else_are_refused_or_warned_of(tmp_path, caplog):
    reviews = [{"text": f"review {i}", "label": ("positive", "negative")[i % 2]} for i in range(40)]
    # files joined with cat: before, the second header became a row of class "label"
    joined = tmp_path / "joined.csv"
    joined.write_text(open(write(tmp_path / "a.csv", reviews)).read() * 2)
    with pytest.raises(FinetuneDataError, match=r"joined\.csv:42: the header line again, inside the data"):
        load_task_data(data=str(joined))
    # no header: before, the hint led to --label-column positive, which lost the first row unsaid
    headless = tmp_path / "headless.csv"
    headless.write_text("".join(f"{r['text']},{r['label']}\n" for r in reviews))
    with pytest.raises(FinetuneDataError, match=r"no column 'text' \(columns: review 0, positive\); the first line "
                                                r"looks like a row \('positive' is also a value below it\)"):
        load_task_data(data=str(headless))
    # codes, a third of them not numbers (ICD-9's V and E codes): classes, as before
    codes = [{"text": f"t{i}", "code": ("250.01", "401.9", "V58.67")[i % 3]} for i in range(60)]
    assert load_task_data(data=write(tmp_path / "codes.csv", codes), label_column="code").labels == [
        "250.01", "401.9", "V58.67"]
    # a headerless file whose first row recurs: the missing header is named, not a joined file
    repeated = tmp_path / "repeated.csv"
    repeated.write_text("".join(f"{r['text']},{r['label']}\n" for r in reviews[:2] * 3))
    with pytest.raises(FinetuneDataError, match=r"no column 'text' .*the first line looks like a row"):
        load_task_data(data=str(repeated))
    # a score column with "N/A" in every sixth row: before, a class per score and exit 0
    scores = [{"text": f"t{i}", "score": "N/A" if i % 6 == 0 else f"{i / 7:.2f}"} for i in range(120)]
    with pytest.raises(FinetuneDataError, match=r"reg\.csv:2: label 'N/A' in column 'score', a column of numbers "
                                                r"\(20 such rows\)"):
        load_task_data(data=write(tmp_path / "reg.csv", scores), label_column="score")
    with caplog.at_level("WARNING", logger="pipeline.finetuning.data"):
        commas = [{"text": f"t{i}", "score": f"{i % 30 // 3},{i % 3}5"} for i in range(90)]
        read = load_task_data(data=write(tmp_path / "commas.csv", commas), label_column="score")
        assert read.task == "classification" and len(read.labels) == 30
        typo = reviews + [{"text": "one more", "label": "postive"}]
        assert load_task_data(train=write(tmp_path / "typo.csv", typo), test=write(tmp_path / "t.csv", reviews)
                              ).labels == ["negative", "positive", "postive"]
    assert [m for m in caplog.messages if "split to hold one" not in m] == [
        f"{tmp_path}/commas.csv: 30 classes in 90 train rows of column 'score', 3.0 rows a class: the labels are "
        "numbers written with commas (decimal commas, e.g. '0,5', or thousands separators), read as words: write "
        "them as plain numbers with decimal points for --task regression",
        f"{tmp_path}/typo.csv: 1 of the 3 classes in column 'label' have at most 2 train rows, beside 20 of the "
        "largest: 'postive' (1 row); a typo or a stray value is a class of its own: fix those rows, or leave them "
        "out with --drop-label"]


def test_numeric_labels_spelled_two_ways_have_one_order_in_every_process():
    from pipeline.finetuning.data import _sort_labels

    # before: sorted by value alone, "0i" and "i" came in their set's order, which the hash seed
    # sets per process, so two ranks could give one row two ids
    keys = [spelling for i in range(1, 10) for spelling in (f"0{i}", str(i))]
    assert _sort_labels(reversed(keys)) == _sort_labels(keys) == keys
