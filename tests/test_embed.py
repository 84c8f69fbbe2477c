"""Sentence embeddings (pipeline/embed.py): pooling that ignores padding, unit norms, rows in input
order with or without an id column, bad input refused by file and line; a model fine-tuned here on
real reviews puts reviews of one label closer together than chance does; 2 processes under
torchrun write the same Parquet as 1, and rank 0 alone logs the MLflow run with its lineage."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import embedding
from pipeline.engine import free_port
from pipeline.finetuning.data import read_table, stratified_split
from pipeline.finetuning.model import model_lineage

from .conftest import REPO, set_one_process_world

BUNDLE = os.path.join(REPO, "tests", "data", "pretrained_reviews")  # a pretraining export (make_bundle.py)
ROTTEN_TOMATOES = os.path.join(REPO, "pipeline", "sample_data", "rotten_tomatoes.csv.bz2")
SCRIPT = os.path.join(REPO, "pipeline", "embed.py")
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")



def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    set_one_process_world(monkeypatch)  # what main() sets in this process is put back after each test


@pytest.fixture(scope="module")
def encoder():
    return embedding.load_model(BUNDLE)


@pytest.fixture(scope="module")
def reviews():
    """Real reviews (no plot summaries): (texts, labels)."""
    table = read_table(ROTTEN_TOMATOES)
    keep = [i for i, c in enumerate(table.columns["category"]) if c != "plot"]
    return [table.columns["text"][i] for i in keep], [table.columns["category"][i] for i in keep]


def embed(encoder, texts, **kwargs):
    model, tokenizer = encoder
    return embedding.embed_texts(model, tokenizer, texts, max_length=64, **kwargs)[0]


def read_out(path):
    table = pq.read_table(path)
    return table, np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


# ---------------------------------------------------------------------------- unit
def test_mean_pooling_ignores_padding(encoder, reviews):
    short = "A triumph."
    long = max(reviews[0][:200], key=len)
    for pooling in ("mean", "cls"):
        alone = embed(encoder, [short], pooling=pooling)
        batched = embed(encoder, [long, short, long], pooling=pooling, batch_size=8)  # short padded to long's width
        np.testing.assert_allclose(batched[1], alone[0], atol=1e-5)
        assert not np.allclose(batched[0], alone[0], atol=1e-2)  # and the texts do differ
    # the mean is over the real tokens: padding positions added to the mask would move it
    import torch

    model, tokenizer = encoder
    ids = torch.tensor([tokenizer(short)["input_ids"] + [tokenizer.pad_token_id] * 5])
    mask = (ids != tokenizer.pad_token_id).long()
    with torch.inference_mode():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    mean_alone = embed(encoder, [short], pooling="mean")[0]
    np.testing.assert_allclose(embedding.pool(hidden, mask, "mean")[0].numpy(), mean_alone, atol=1e-5)
    assert not np.allclose(hidden[0].mean(0).numpy(), mean_alone, atol=1e-3)


def test_normalize_gives_unit_norm_and_order_is_kept(encoder, reviews):
    texts = reviews[0][:37]
    raw = embed(encoder, texts, pooling="mean", batch_size=5)
    unit = embed(encoder, texts, pooling="mean", batch_size=5, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-2)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    # batched by length, put back in input order: each row is what the text gives alone
    for i in (0, 13, 36):
        np.testing.assert_allclose(raw[i], embed(encoder, [texts[i]], pooling="mean")[0], atol=1e-5)


def test_output_rows_match_input_rows_with_and_without_id_column(tmp_path, reviews):
    from pipeline.embed import main

    texts = reviews[0][:25]
    with_ids = tmp_path / "with_ids.jsonl"
    with open(with_ids, "w") as f:
        for k, text in enumerate(texts):
            f.write(json.dumps({"doc": f"d{100 - k}", "body": text}) + "\n")
    without = tmp_path / "plain.csv"
    with open(without, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([t] for t in texts)
    out1, out2 = tmp_path / "a.parquet", tmp_path / "sub" / "b.parquet"
    assert main(["--model", BUNDLE, "--input", str(with_ids), "--out", str(out1), "--text-column", "body",
                 "--id-column", "doc", "--batch-size", "4", "--no-mlflow"]) == 0
    assert main(["--model", BUNDLE, "--input", str(without), "--out", str(out2), "--pooling", "mean",
                 "--normalize", "--no-mlflow"]) == 0
    a, a_vectors = read_out(out1)
    b, b_vectors = read_out(out2)
    assert a.column_names == ["doc", "embedding"] and a.column("doc").to_pylist() == [f"d{100 - k}" for k in range(25)]
    assert b.column_names == ["row", "embedding"] and b.column("row").to_pylist() == list(range(25))
    assert a_vectors.shape == b_vectors.shape == (25, 128) and a_vectors.dtype == np.float32
    assert str(a.schema.field("embedding").type) == "list<element: float>"
    assert embedding.read_metadata(str(out1))["pooling"] == "cls"
    meta = embedding.read_metadata(str(out2))
    assert meta["pooling"] == "mean" and meta["normalize"] == "true" and meta["model_kind"] == "pretrained"
    assert meta["embedding_dim"] == "128" and meta["max_length"] == "64"
    assert meta["precision"] == "fp32" and meta["convert"] == "none"  # how the vectors were made
    assert sorted(os.listdir(tmp_path / "sub")) == ["b.parquet"]  # no temporary file left behind


def test_streamed_chunks_give_one_output_whatever_their_size(tmp_path, reviews, caplog):
    """The input goes through in chunks of --chunk-rows: any size gives the same file, and ids keep one
    type across chunks (ints then text: all text, as a whole-table read made them)."""
    from pipeline.embed import main
    from pipeline.embed_inputs import input_chunks, scan_inputs

    texts = reviews[0][:30]
    path = tmp_path / "mixed.jsonl"
    with open(path, "w") as f:
        for k, text in enumerate(texts):
            f.write(json.dumps({"id": k if k < 20 else f"a{k}", "text": text}) + "\n")
    outs = {}
    for size in ("7", "1", "16384"):
        outs[size] = tmp_path / f"c{size}.parquet"
        with caplog.at_level("WARNING"):
            assert main(["--model", BUNDLE, "--input", str(path), "--out", str(outs[size]), "--chunk-rows", size,
                         "--batch-size", "4", "--no-mlflow"]) == 0
        assert "the ids mix types" in caplog.text
        caplog.clear()
    (a, a_vectors), (b, b_vectors), (c, c_vectors) = (read_out(outs[size]) for size in ("7", "1", "16384"))
    assert a.column("id").to_pylist() == c.column("id").to_pylist() == [str(k) for k in range(20)] + [
        f"a{k}" for k in range(20, 30)]
    np.testing.assert_allclose(a_vectors, c_vectors, atol=1e-5)
    np.testing.assert_allclose(b_vectors, c_vectors, atol=1e-5)
    # ints and floats: doubles; the chunks a process takes, in order, each at most chunk_rows long
    with open(path, "w") as f:
        for k, text in enumerate(texts):
            f.write(json.dumps({"id": k + (0.5 if k >= 20 else 0), "text": text}) + "\n")
    import pyarrow as pa

    scan = scan_inputs(str(path), "text", None, chunk_rows=7)
    assert (scan.rows, scan.id_column, scan.id_type, scan.chunks(7)) == (30, "id", pa.float64(), [7, 7, 7, 7, 2])
    taken = list(input_chunks(scan, 7, take=lambda k: k % 2 == 1))
    assert [k for k, _, _ in taken] == [1, 3] and [len(t) for _, _, t in taken] == [7, 7]
    assert taken[1][1] == [k + 0.5 for k in range(21, 28)] and taken[1][2] == texts[21:28]
    assert [len(t) for _, _, t in input_chunks(scan, 7)] == [7, 7, 7, 7, 2]
    # Every process gets a chunk of a small input (before: 16,384-row chunks left rank 1..7 idle)
    assert scan.chunk_size(16384, 8) == 4 and scan.chunk_size(16384, 1) == 30 and scan.chunk_size(7, 2) == 7
    # An int too big for a double beside a float: text, whatever the chunk size (before: a double
    # type for some chunk sizes, and a crash writing the first chunk); ints past int64: uint64
    for ids, expected in (([2 ** 53 + 1, 1.5], pa.string()), ([2 ** 64 - 1, 5], pa.uint64())):
        with open(path, "w") as f:
            f.writelines(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts))
        for chunk_rows in (1, 2):
            assert scan_inputs(str(path), "text", None, chunk_rows=chunk_rows).id_type == expected
        out = tmp_path / "big.parquet"
        assert main(["--model", BUNDLE, "--input", str(path), "--out", str(out), "--chunk-rows", "1",
                     "--no-mlflow"]) == 0
        assert read_out(out)[0].column("id").to_pylist() == ([str(i) for i in ids] if expected == pa.string()
                                                              else ids)


def test_ids_keep_the_inputs_own_type(tmp_path):
    """Parquet ids are written as the file declares them (a type guessed per chunk from Python
    values varied with --chunk-rows, and nanosecond timestamps lost their nanoseconds); jsonl
    objects as JSON text; a compressed Parquet file is refused by name."""
    import decimal

    import pyarrow as pa

    from pipeline.embed import main
    from pipeline.embed_inputs import scan_inputs

    stamps = pa.array([1, 2, 3], type=pa.timestamp("ns", tz="Europe/Paris"))
    prices = pa.array([decimal.Decimal("1.50"), decimal.Decimal("2.00"), decimal.Decimal("100.25")],
                      type=pa.decimal128(10, 2))
    for name, ids in (("stamps", stamps), ("prices", prices)):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"id": ids, "text": ["a film", "a book", "a play"]}), path)
        for chunk_rows in (1, 2, 3):
            assert scan_inputs(str(path), "text", None, chunk_rows).id_type == ids.type
        out = tmp_path / f"{name}.out.parquet"
        assert main(["--model", BUNDLE, "--input", str(path), "--out", str(out), "--chunk-rows", "1",
                     "--no-mlflow"]) == 0
        assert read_out(out)[0].column("id").equals(pa.chunked_array([ids]))  # 1, 2, 3 ns apart: not all 0
    path = tmp_path / "objects.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": "a film"}) + "\n" for i in ({"a": 1}, [2, 3], 4)))
    for chunk_rows in (1, 2):
        assert scan_inputs(str(path), "text", None, chunk_rows).id_type == pa.string()
    out = tmp_path / "objects.parquet"
    assert main(["--model", BUNDLE, "--input", str(path), "--out", str(out), "--no-mlflow"]) == 0
    assert read_out(out)[0].column("id").to_pylist() == ['{"a": 1}', "[2, 3]", "4"]
    (tmp_path / "x.parquet.gz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"x\.parquet\.gz: a compressed \.parquet file is not read"):
        scan_inputs(str(tmp_path / "x.parquet.gz"), "text")


def test_a_blank_text_in_the_last_row_stops_the_run_before_any_output(tmp_path, capsys):
    """The whole input is checked before the first chunk is embedded: a bad last row costs no hours."""
    from pipeline.embed import main

    path = tmp_path / "late.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([f"review number {i}"] for i in range(50))
        w.writerow([" "])
    out = tmp_path / "o.parquet"
    assert main(["--model", BUNDLE, "--input", str(path), "--out", str(out), "--chunk-rows", "8", "--no-mlflow"]) == 2
    assert f"{path}:52: column 'text' is blank (1 row in {path})" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["late.csv"]


def test_only_texts_that_lost_tokens_are_counted_as_cut(encoder):
    """A text of exactly --max-length tokens was counted as cut: the count is a data-quality figure."""
    model, tokenizer = encoder
    exact = next(" ".join(["good"] * n) for n in range(40, 80)
                 if len(tokenizer(" ".join(["good"] * n))["input_ids"]) == 64)
    assert embedding.embed_texts(model, tokenizer, [exact, "fine"], max_length=64)[1] == 0
    assert embedding.embed_texts(model, tokenizer, [exact + " good", "fine"], max_length=64)[1] == 1


def test_a_batch_log_gets_a_progress_line_a_minute(caplog, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(embedding.time, "monotonic", lambda: now[0])
    progress = embedding.LogProgress(1000)
    with caplog.at_level("INFO", logger="pipeline.embedding"):
        progress.update(100)  # within the minute: nothing
        now[0] = 61.0
        progress.update(100)
    assert [r.getMessage() for r in caplog.records] == ["embedded 200 of 1000 texts (3 a second, 244 s left)"]


def test_bad_input_fails_with_one_line_naming_file_and_line(tmp_path, capsys):
    from pipeline.embed import build_parser, main

    blank = tmp_path / "blank.csv"
    blank.write_text("id,text\n1,fine\n2,\n3,  \n")
    no_id = tmp_path / "no_id.csv"
    no_id.write_text("id,text\n1,fine\n,also fine\n")
    out, ok = str(tmp_path / "o.parquet"), tmp_path / "ok.csv"
    cases = [
        (["--input", str(blank)], f"{blank}:3: column 'text' is blank (2 rows in {blank})"),
        (["--input", str(blank), "--text-column", "body"], f"{blank}: no column 'body' (columns: id, text)"),
        (["--input", str(blank), "--id-column", "key"], f"{blank}: no column 'key'"),
        (["--input", str(no_id)], f"{no_id}:3: column 'id' (the id) is blank; fill it in, or pass --id-column row "
                                  "to number the rows instead"),
        (["--input", str(tmp_path / "missing.csv")], "missing.csv: no such file or directory"),
        (["--input", str(tmp_path / "in.txt")], "in.txt: unknown format '.txt'"),
        (["--model", str(tmp_path), "--input", str(ok)], "not a Hugging Face model dir (no config.json)"),
    ]
    (tmp_path / "in.txt").write_text("x")
    ok.write_text("text\nfine\n")
    for args, message in cases:
        assert main(["--model", BUNDLE, *args, "--out", out, "--no-mlflow"]) == 2
        assert message in capsys.readouterr().err
    # the way out the line names (before: none but editing the file)
    numbered = str(tmp_path / "numbered.parquet")
    assert main(["--model", BUNDLE, "--input", str(no_id), "--id-column", "row", "--out", numbered,
                 "--no-mlflow"]) == 0
    assert pq.read_table(numbered).column("row").to_pylist() == [0, 1]
    assert main(["--model", BUNDLE, "--input", str(ok), "--max-length", "4096", "--out", out, "--no-mlflow"]) == 2
    assert "--max-length 4096: must be in 3..64" in capsys.readouterr().err
    assert main(["--model", BUNDLE, "--input", str(ok), "--out", str(tmp_path), "--no-mlflow"]) == 2
    assert f"--out {tmp_path}: a folder; --out names the file to write" in capsys.readouterr().err
    # found before the model loads and the input is read; before: after all the embedding, or never
    # (an --out naming the input replaced the texts with their embeddings)
    # (a name not ending in .parquet: before, labels.csv was replaced by Parquet bytes)
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["fine"]}), tmp_path / "ok.parquet")
    for given, out_arg, message in (
            (ok, "", "--out '': empty; --out names the file to write"),
            (ok, str(ok), f"--out {ok}: name a .parquet file"),
            (tmp_path / "ok.parquet", str(tmp_path / "ok.parquet"),
             f"--out {tmp_path / 'ok.parquet'} is --input: writing the embeddings would replace the texts"),
            (ok, str(ok / "o.parquet"), f"--out {ok / 'o.parquet'}: {ok} is a file, not a folder")):
        assert main(["--model", BUNDLE, "--input", str(given), "--out", out_arg, "--no-mlflow"]) == 2
        assert message in capsys.readouterr().err
    assert ok.read_text() == "text\nfine\n"
    # A model dir without its weights (a copy cut short): one line, not the library's OSError traceback.
    broken = tmp_path / "broken"
    shutil.copytree(BUNDLE, broken, ignore=shutil.ignore_patterns("model.safetensors"))
    assert main(["--model", str(broken), "--input", str(ok), "--out", out, "--no-mlflow"]) == 2
    assert f"--model {broken}: the weights do not load" in capsys.readouterr().err
    weights = open(os.path.join(BUNDLE, "model.safetensors"), "rb").read()
    (broken / "model.safetensors").write_bytes(weights[:len(weights) // 2])  # a copy cut short
    assert main(["--model", str(broken), "--input", str(ok), "--out", out, "--no-mlflow"]) == 2
    assert f"--model {broken}: the weights do not load" in capsys.readouterr().err
    # The vector column's name: the ids vanished from the output.
    with pytest.raises(SystemExit):
        main(["--model", BUNDLE, "--input", str(ok), "--out", out, "--id-column", "embedding"])
    assert "--id-column embedding: the output's vector column has that name" in capsys.readouterr().err
    assert not os.path.exists(out)
    # as a script: the one line, no traceback
    proc = subprocess.run([sys.executable, SCRIPT, "--model", BUNDLE, "--input", str(blank), "--out", out,
                           "--no-mlflow"], capture_output=True, text=True, env=_clean_env())
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {blank}:3:") and "Traceback" not in proc.stderr
    help_text = build_parser().format_help()
    for flag in ("--model", "--input", "--out", "--text-column", "--id-column", "--pooling", "--normalize",
                 "--batch-size", "--max-length", "--bf16", "--no-mlflow", "--experiment", "--run-name"):
        assert flag in help_text


def test_an_mpi_launch_without_world_size_is_refused_before_any_output(tmp_path):
    # mpirun starts N copies; without WORLD_SIZE each would embed the whole input into one --out.
    texts = tmp_path / "texts.csv"
    texts.write_text("text\nfine\n")
    out = tmp_path / "emb.parquet"
    proc = subprocess.run([sys.executable, SCRIPT, "--model", BUNDLE, "--input", str(texts), "--out", str(out),
                           "--no-mlflow"], capture_output=True, text=True,
                          env=_clean_env(OMPI_COMM_WORLD_SIZE="2"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: one of 2 processes (OMPI_COMM_WORLD_SIZE=2) without WORLD_SIZE: "
                                  "each would run alone as rank 0 of 1, into the same output; launch with "
                                  "torchrun, the deepspeed launcher's default mode, which"), proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_a_damaged_training_info_is_named(tmp_path, capsys):
    from pipeline.embed import main

    model = tmp_path / "hf"
    shutil.copytree(BUNDLE, model)
    (model / "training_info.json").write_text('{"pretrain_run_id": "p1", "conv')  # a copy cut short
    texts = tmp_path / "texts.csv"
    texts.write_text("text\nfine\n")
    args = ["--model", str(model), "--input", str(texts), "--out", str(tmp_path / "emb.parquet"), "--no-mlflow"]
    assert main(args) == 2
    assert capsys.readouterr().err.startswith(f"error: {model / 'training_info.json'}: unreadable (")
    (model / "training_info.json").write_text("[]")
    assert main(args) == 2
    assert "training_info.json: a JSON list, not the object pipeline/export.py writes" in capsys.readouterr().err


def test_lineage_from_an_export_and_from_a_fine_tuned_model(tmp_path):
    export = tmp_path / "hf"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "training_info.json").write_text(json.dumps({"pretrain_run_id": "p1", "data_run_id": None}))
    assert model_lineage(str(export)) == {"model_kind": "pretrained", "pretrain_run_id": "p1"}
    model = tmp_path / "ft" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (tmp_path / "ft" / "report.json").write_text(json.dumps(
        {"task": "classification", "finetune_run_id": "f1", "pretrain_run_id": "p1", "data_run_id": "d1"}))
    assert model_lineage(str(model)) == {"model_kind": "finetuned", "finetune_run_id": "f1",
                                                   "pretrain_run_id": "p1", "data_run_id": "d1"}


def test_texts_are_converted_as_the_models_pretraining_text_was(tmp_path):
    # an export of a --convert t2s data dir: its vocabulary holds Simplified characters only
    (tmp_path / "training_info.json").write_text(json.dumps({"convert": "t2s"}))
    convert, converter = embedding.script_converter(str(tmp_path))
    assert convert == "t2s" and [converter(t) for t in ["我們說話。", "plain text"]] == ["我们说话。", "plain text"]
    (tmp_path / "training_info.json").write_text(json.dumps({"convert": None}))
    assert embedding.script_converter(str(tmp_path)) == (None, None)


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def finetuned(reviews, tmp_path_factory):
    """The bundle fine-tuned by finetune.py on 480 reviews (2 epochs, 60 steps), and 300 other reviews held out."""
    texts, labels = reviews
    train, validation, test, held_out = stratified_split(labels, [480 / len(labels), 100 / len(labels),
                                                                  100 / len(labels), 300 / len(labels)], seed=7)[:4]
    root = tmp_path_factory.mktemp("embed_finetune")

    def write(name, rows):
        with open(root / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "text", "label"])
            w.writerows((f"r{i}", texts[i], labels[i]) for i in rows)
        return str(root / name)

    files = {name: write(f"{name}.csv", rows) for name, rows in
             (("train", train), ("validation", validation), ("test", test), ("held_out", held_out))}
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "pipeline", "finetune.py"), "--model", BUNDLE, "--train", files["train"],
         "--validation", files["validation"], "--test", files["test"], "--epochs", "2", "--learning-rate", "1e-3",
         "--global-batch-size", "16", "--micro-batch-size", "16", "--patience", "0", "--output-dir", str(root / "out"),
         "--no-mlflow"], capture_output=True, text=True, env=_clean_env(MASTER_PORT=str(free_port())), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return str(root / "out" / "model"), files["held_out"], [labels[i] for i in held_out]


def label_gap(vectors: np.ndarray, labels: np.ndarray) -> float:
    """Mean cosine similarity within a label minus between labels (pairs of distinct rows)."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    return sims[same & off_diagonal].mean() - sims[~same].mean()


@pytest.mark.e2e
def test_fine_tuned_embeddings_put_a_labels_reviews_closer(finetuned, encoder, tmp_path):
    from pipeline.embed import main

    model_dir, held_out, labels = finetuned
    out = tmp_path / "held_out.parquet"
    assert main(["--model", model_dir, "--input", held_out, "--out", str(out), "--no-mlflow"]) == 0
    table, vectors = read_out(out)
    rows = list(csv.DictReader(open(held_out)))
    assert table.column("id").to_pylist() == [row["id"] for row in rows] and len(rows) == 300
    assert embedding.read_metadata(str(out))["model_kind"] == "finetuned"
    labels = np.asarray(labels)
    gap = label_gap(vectors, labels)
    # the same statistic with the labels shuffled: what it is with no label structure at all
    rng = np.random.default_rng(0)
    null = np.array([label_gap(vectors, rng.permutation(labels)) for _ in range(200)])
    pretrained = label_gap(embed(encoder, [row["text"] for row in rows]), labels)  # before fine-tuning
    print(f"\nwithin - between label cosine on 300 held-out reviews: fine-tuned {gap:.4f}, pretrained only "
          f"{pretrained:.4f}, shuffled labels {null.mean():.4f} +- {null.std():.4f} (max {null.max():.4f})")
    assert gap > 0 and gap > null.max() and gap > null.mean() + 5 * null.std()
    assert gap > pretrained  # the label structure comes from fine-tuning


@pytest.mark.e2e
def test_two_processes_write_the_same_parquet_and_rank0_logs_the_run(reviews, tmp_path, mlflow_server):
    import mlflow

    from pipeline.embed import main

    model = tmp_path / "export"  # the bundle, with lineage recorded as pretrain.py's export records it
    shutil.copytree(BUNDLE, model)
    info = json.load(open(model / "training_info.json"))
    json.dump({**info, "pretrain_run_id": "pretrain-run-e", "data_run_id": "data-run-e"},
              open(model / "training_info.json", "w"))
    source = tmp_path / "texts.parquet"
    import pyarrow as pa

    texts = reviews[0][:61]  # chunks of 8: rank 0 gets 4 of them (32 rows), rank 1 the other 4 (29 rows)
    pq.write_table(pa.table({"id": list(range(1000, 1061)), "text": texts}), source)
    one = tmp_path / "one.parquet"
    assert main(["--model", str(model), "--input", str(source), "--out", str(one), "--pooling", "mean",
                 "--batch-size", "8", "--no-mlflow"]) == 0  # one chunk
    two = tmp_path / "two.parquet"
    # A killed run's parts, which must not pass for this run's
    os.makedirs(embedding.parts_dir(str(two)))
    shutil.copy(one, embedding.part_path(str(two), 0))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", SCRIPT,
         "--model", str(model), "--input", str(source), "--out", str(two), "--pooling", "mean", "--batch-size", "8",
         "--chunk-rows", "8", "--run-name", "embed-e2e"], capture_output=True, text=True, timeout=300,
        env=_clean_env(MLFLOW_TRACKING_URI=mlflow_server, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    (a, a_vectors), (b, b_vectors) = read_out(one), read_out(two)
    assert b.column("id").to_pylist() == a.column("id").to_pylist() == list(range(1000, 1061))
    np.testing.assert_allclose(b_vectors, a_vectors, atol=1e-5)
    assert embedding.read_metadata(str(two)) == embedding.read_metadata(str(one))
    assert sorted(os.listdir(tmp_path)) == sorted(["export", "texts.parquet", "one.parquet", "two.parquet"])

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("bert-pipeline").experiment_id],
                              filter_string="tags.stage = 'embed' and attributes.run_name = 'embed-e2e'")
    assert len(runs) == 1  # rank 0 alone
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["pretrain_run_id"] == "pretrain-run-e" and run.data.tags["data_run_id"] == "data-run-e"
    assert run.data.params["world_size"] == "2" and run.data.params["pooling"] == "mean"
    assert run.data.params["rows"] == "61" and run.data.metrics["rows"] == 61
    assert run.data.metrics["rows_per_second"] > 0


@pytest.mark.parametrize("first", [True, False])
def test_a_jsonl_row_without_the_text_key_is_named_as_such_wherever_it_is(tmp_path, first):
    from pipeline.embed_inputs import scan_inputs
    from pipeline.finetuning.data import FinetuneDataError

    rows = [{"id": i, "text": f"t{i}"} for i in range(5)]
    del rows[0 if first else 3]["text"]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # before: "column 'text' is blank" (and which, by the row order)
    with pytest.raises(FinetuneDataError, match=rf"in\.jsonl:{1 if first else 4}: no key 'text' in this row"):
        scan_inputs(str(path), "text")
    rows[0 if first else 3]["text"] = ["a", "list"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FinetuneDataError, match=rf"in\.jsonl:{1 if first else 4}: column 'text' holds a list, not text"):
        scan_inputs(str(path), "text")


def test_a_pretraining_run_dir_embeds_with_its_newest_export(data_dir, tmp_path, capsys, monkeypatch):
    """Fine-tuning takes a pretraining run dir as --model; embed.py refused one, though the run had
    written the export of its newest checkpoint."""
    from pipeline import pretrain
    from pipeline.embed import main

    from .conftest import set_one_process_world

    # Set through monkeypatch, so undone after: pretrain.main would otherwise set RANK, WORLD_SIZE and
    # MASTER_PORT in this process for good, and every later job (sbatch passes the environment on)
    # would inherit them.
    set_one_process_world(monkeypatch)
    run = tmp_path / "run"
    assert pretrain.main(["--data", data_dir, "--run-dir", str(run), "--steps", "2", "--global-batch-size", "8",
                          "--micro-batch-size", "8", "--no-mlflow"]) == 0
    texts = tmp_path / "texts.csv"
    texts.write_text("text\nThe film is a delight.\nA dull and overlong mess.\n")
    out = tmp_path / "emb.parquet"
    assert main(["--model", str(run), "--input", str(texts), "--out", str(out), "--no-mlflow"]) == 0
    table = pq.read_table(out)
    assert table.num_rows == 2
    assert table.schema.metadata[b"model"].decode() == str(run / "hf" / "step00000002")
    shutil.rmtree(run / "hf")
    capsys.readouterr()
    assert main(["--model", str(run), "--input", str(texts), "--out", str(out), "--no-mlflow"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --model {run}: a pretraining run whose newest checkpoint, step00000002, has no export: python "
        f"pipeline/export.py {run}, then pass the folder it writes")
    tag = run / "checkpoints" / "step00000002"  # a tag dir is that checkpoint, newest or not
    assert main(["--model", str(tag), "--input", str(texts), "--out", str(out), "--no-mlflow"]) == 2
    assert f"--model {tag}: a pretraining checkpoint, step00000002, without an export" in capsys.readouterr().err
