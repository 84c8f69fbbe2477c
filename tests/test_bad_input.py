"""Damaged and awkward input: corrupt bzip2 streams, damaged Parquet, text without
blank lines, and inputs of the same name in different folders."""

import bz2
import gzip
import hashlib
import json
import logging
import os
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preprocessing import inputs, run_beam, text_formats, wiki_dump
from preprocessing.text_formats import InputError

from .conftest import AUSTEN, WIKI_SAMPLE, split_dump
from .test_readers import documents, problem_places, problems, read_all


def titles(items):
    return [i.title for i in items if isinstance(i, wiki_dump.Page)]


def corrupt(data: bytes, at: int, length: int = 200) -> bytes:
    """``data`` with ``length`` bytes from ``at`` replaced by garbage."""
    return data[:at] + bytes((i * 37 + 11) % 256 for i in range(length)) + data[at + length:]


# ------------------------------------------------ corrupt bzip2 streams
def test_corrupt_stream_of_a_multistream_dump_loses_only_its_pages(multistream_dump, wiki_xml, tmp_path):
    data = open(multistream_dump, "rb").read()
    streams = [m.start() for m in wiki_dump.BZ2_STREAM_HEADER.finditer(data)]
    bad = len(streams) // 2  # stream 0 is the header; stream i holds pages 7(i-1) .. 7i-1
    path = tmp_path / "enwiki-multistream.xml.bz2"
    path.write_bytes(corrupt(data, streams[bad] + 500))
    _, page_list, _ = split_dump(wiki_xml)
    lost = {re.search(rb"<title>(.*?)</title>", p).group(1).decode()
            for p in page_list[7 * (bad - 1):7 * bad]}
    expected = [t for t in titles(read_all(WIKI_SAMPLE)) if t not in lost]
    for split_bytes in (65536, 100_003, 1 << 30):
        items = read_all(str(path), split_bytes=split_bytes)
        assert titles(items) == expected
        [problem] = problems(items)
        assert problem.reason == "corrupt-bz2-streams"
        assert problem.message.startswith(f"{path}: byte {streams[bad]:,}: corrupt bzip2 stream")
        assert f"from byte {streams[bad]:,} to byte {streams[bad + 1]:,}" in problem.message


@pytest.mark.parametrize("damage, reason", [("corrupt", "corrupt-bz2-streams"),
                                           ("truncated", "truncated-streams")])
def test_damaged_stream_with_pages_spanning_streams_reads_the_same_for_any_split(damage, reason, wiki_xml,
                                                                               tmp_path):
    """pbzip2-like file: the page cut by the bad stream, and the stream, are counted
    once, whatever the ranges (a range reading into a stream to finish a page does not
    count the stream's damage: its owner does)."""
    streams = [bz2.compress(wiki_xml[i:i + 300_001]) for i in range(0, len(wiki_xml), 300_001)]
    bad_at = sum(map(len, streams[:8]))
    path = tmp_path / "parallel.xml.bz2"
    data = b"".join(streams)
    path.write_bytes(corrupt(data, bad_at + 300) if damage == "corrupt" else data[:bad_at + 300])
    whole = read_all(str(path), split_bytes=1 << 30)
    assert 100 < len(titles(whole)) < 206
    assert [p.reason for p in problems(whole)] == ["truncated-pages", reason]
    for split_bytes in (65536, 100_003, 4099):
        items = read_all(str(path), split_bytes=split_bytes)
        assert titles(items) == titles(whole)
        assert [p.message for p in problems(items)] == [p.message for p in problems(whole)]


def test_single_stream_file_corrupted_midway_keeps_what_precedes_the_damage(tmp_path):
    data = open(WIKI_SAMPLE, "rb").read()
    path = tmp_path / "single.xml.bz2"
    path.write_bytes(corrupt(data, len(data) * 2 // 3))
    items = read_all(str(path))
    got, whole = titles(items), titles(read_all(WIKI_SAMPLE))
    assert 50 < len(got) < len(whole) and got == whole[:len(got)]
    reasons = [p.reason for p in problems(items)]
    assert reasons[-1] == "corrupt-bz2-streams" and set(reasons) <= {"truncated-pages", "corrupt-bz2-streams"}
    assert problems(items)[-1].message.startswith(f"{path}: byte 0: corrupt bzip2 stream")
    assert "to the end of the file" in problems(items)[-1].message


# ------------------------------------------------ damaged Parquet
@pytest.mark.parametrize("damage", ["not parquet", "truncated footer"])
def test_unreadable_parquet_is_one_line_naming_the_file(damage, tmp_path, capsys):
    path = tmp_path / "docs.parquet"
    if damage == "not parquet":
        path.write_text("title,text\nOne,A csv file named .parquet\n")
    else:
        pq.write_table(pa.table({"text": [f"Row {i}." for i in range(1000)]}), path)
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: not a readable Parquet file \("):
        inputs.plan_read_tasks([str(path)], 1 << 20)
    assert run_beam.main(["--input", str(path), "--output", str(tmp_path / "out"), "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {path}: not a readable Parquet file")
    assert "Traceback" not in "".join(err)


def test_unreadable_parquet_row_group_is_an_error_naming_file_and_group(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": [f"Row {i}. " + "word " * (i % 50) for i in range(1000)]}), path,
                   row_group_size=128)
    column = pq.ParquetFile(path).metadata.row_group(2).column(0)
    first_page = column.dictionary_page_offset or column.data_page_offset
    path.write_bytes(corrupt(path.read_bytes(), first_page, 64))
    tasks = inputs.plan_read_tasks([str(path)], 1)  # the footer is intact: planning works
    assert len(tasks) == 8
    assert len(documents(inputs.read_task(tasks[1], "text", 1 << 20))) == 128
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: row group 2 of 8 cannot be read \("):
        list(inputs.read_task(tasks[2], "text", 1 << 20))


# ------------------------------------------------ text without blank lines
def read_text_range(path, start, end, max_line_bytes, max_document_bytes):
    with open(path, "rb") as f:
        return list(text_formats.read_text(f, str(path), max_line_bytes, start, end, max_document_bytes))


def test_text_without_blank_lines_is_cut_the_same_from_every_cut_point(tmp_path):
    """Windows of 64 bytes: runs without blank lines are cut, short documents never,
    and every split into two ranges reads exactly what one reader does."""
    lines = [f"Sentence number {i} of the long run." for i in range(40)]
    text = ("\n".join(lines[:20]) + "\n\nShort doc.\n\n" + "\n".join(lines[20:]) + "\n" + "z" * 50
            + "\n" + "\n".join(lines[:8]) + "\n\n\nTail doc.\n").encode()
    path = tmp_path / "runs.txt"
    path.write_bytes(text)
    whole = read_text_range(path, 0, None, 40, 64)
    pieces = [t for _, t in documents(whole)]
    assert "Short doc." in pieces and "Tail doc." in pieces
    assert all(len(p) < 2 * 64 + 40 for p in pieces)
    cuts = [o for r, o in problem_places(whole) if r == "split-long-documents"]
    assert len(cuts) == len(pieces) - 4  # four pieces end at a blank line or the file end
    assert all(text[o - 1:o] == b"\n" for o in cuts)
    for cut in range(1, len(text)):
        got = read_text_range(path, 0, cut, 40, 64) + read_text_range(path, cut, None, 40, 64)
        assert documents(got) == documents(whole)
        assert problem_places(got) == problem_places(whole)


def test_a_cut_inside_an_oversized_line_that_begins_a_document_reads_it_once(tmp_path):
    """A range starting inside a line longer than --max-line-bytes cannot search back to
    that line's start within max_line_bytes. It began a document in the window before a
    multiple of the document limit, so one reader did not cut after it; the range's
    reader, blind to that start, cut there and read the document's rest a second time."""
    text = b"w17 w17 w17 w17 w17\n\n" + b"L" * 122 + b"\nw79 w79\nw43 w43\nw62\n\nw42 w42\n"
    path = tmp_path / "oversized.txt"
    path.write_bytes(text)
    whole = read_text_range(path, 0, None, 40, 100)
    assert [t for _, t in documents(whole)] == ["w17 w17 w17 w17 w17", "w79 w79 w43 w43 w62", "w42 w42"]
    for cut in range(1, len(text)):
        got = read_text_range(path, 0, cut, 40, 100) + read_text_range(path, cut, None, 40, 100)
        assert documents(got) == documents(whole), cut
        assert problem_places(got) == problem_places(whole), cut


def test_random_texts_with_oversized_lines_read_the_same_from_every_cut_point(tmp_path):
    """Blank, whitespace-only, CR, oversized and prose lines in random order, with document
    limits below, near and far above the line limit: every split into two ranges reads
    what one reader does (12 of these 300 files read a document twice or placed a problem twice before)."""
    rng = random.Random(11)
    path = tmp_path / "random.txt"
    for _ in range(300):
        lines = [rng.choice([b"", b"  ", b"\r", b"L" * rng.randrange(30, 300),
                             b"w%d " % rng.randrange(100) * rng.randrange(1, 12)])
                 for _ in range(rng.randrange(2, 20))]
        text = b"\n".join(lines) + rng.choice([b"", b"\n"])
        path.write_bytes(text)
        max_line, limit = rng.choice([40, 64]), rng.choice([30, 64, 100, 150, 10**9])
        whole = read_text_range(path, 0, None, max_line, limit)
        for cut in range(1, len(text)):
            got = read_text_range(path, 0, cut, max_line, limit) + read_text_range(path, cut, None, max_line, limit)
            assert documents(got) == documents(whole), (text, cut)
            assert problem_places(got) == problem_places(whole), (text, cut)

def test_real_prose_without_blank_lines_is_cut_into_bounded_counted_documents(tmp_path):
    with bz2.open(AUSTEN, "rb") as f:
        prose = re.sub(rb"\n\s*\n", b"\n", f.read())  # 4 MB, not one blank line
    path = tmp_path / "no-blank-lines.txt"
    path.write_bytes(prose)
    whole = read_all(str(path), split_bytes=1 << 30)
    docs = documents(whole)
    limit = text_formats.MAX_DOCUMENT_BYTES
    assert len(docs) == -(-len(prose) // limit)  # cut at every MiB multiple
    assert all(len(t.encode()) < 2 * limit for _, t in docs)
    assert [p.reason for p in problems(whole)] == ["split-long-documents"] * (len(docs) - 1)
    assert str(path) in problems(whole)[0].message
    for split_bytes in (65536, 1_000_003):
        items = read_all(str(path), split_bytes=split_bytes)
        assert documents(items) == docs
        assert problem_places(items) == problem_places(whole)


# ------------------------------------------------ inputs of the same name
def test_document_names_are_relative_to_the_inputs_common_folder(tmp_path):
    names = inputs.document_names(["/data/corpus/a/part-0.txt", "/data/corpus/b/part-0.txt",
                                   "/data/corpus/b/c/part-1.txt"])
    assert list(names.values()) == ["a/part-0.txt", "b/part-0.txt", "b/c/part-1.txt"]
    moved = inputs.document_names(["gs://bucket/x/a/part-0.txt", "gs://bucket/x/b/part-0.txt"])
    assert list(moved.values()) == ["a/part-0.txt", "b/part-0.txt"]
    assert inputs.document_names(["/data/a/part-0.txt"]) == {"/data/a/part-0.txt": "part-0.txt"}
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "corpus.txt").write_text(f"Text of folder {folder}.\n")
    items = read_all(str(tmp_path / "*" / "corpus.txt"))
    assert documents(items) == [("a/corpus.txt@0", "Text of folder a."), ("b/corpus.txt@0", "Text of folder b.")]


@pytest.mark.e2e
def test_same_named_inputs_in_two_folders_get_their_own_examples(tmp_path):
    """b/corpus.txt is a/corpus.txt plus one more document: with ids from the base name
    alone, the shared documents got the same random choices, hence duplicate examples."""
    with bz2.open(AUSTEN, "rb") as f:
        prose = f.read()[:150_000]
    for folder, text in (("a", prose), ("b", prose + b"\n\nOne more document, only in b.\n")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "corpus.txt").write_bytes(text)
    args = ["--input", str(tmp_path / "*" / "corpus.txt"), "--vocab-size", "1000", "--dupe-factor", "1",
            "--no-mlflow"]
    digests = []
    for workers, output in ((["--direct_num_workers=1"], "one"),
                            (["--direct_num_workers=2", "--direct_running_mode=multi_processing"], "two")):
        proc = run_beam_subprocess([*args, "--output", str(tmp_path / output), *workers])
        assert proc.returncode == 0, proc.stderr[-3000:]
        shards = sorted((tmp_path / output / "shards").iterdir())
        digests.append([hashlib.sha256(s.read_bytes()).hexdigest() for s in shards])
    assert digests[0] == digests[1]
    rows = pa.concat_tables([pq.read_table(s) for s in sorted((tmp_path / "one" / "shards").iterdir())])
    examples = [(tuple(i), tuple(m)) for i, m in zip(rows.column("input_ids").to_pylist(),
                                                      rows.column("masked_lm_positions").to_pylist())]
    counters = json.load(open(tmp_path / "one" / "manifest.json"))["counters"]
    assert counters["documents-read"] == 2 * len(documents(read_all(str(tmp_path / "a" / "corpus.txt")))) + 1
    assert len(set(examples)) > 0.95 * len(examples)  # not two copies of a's examples


def run_beam_subprocess(args):
    import subprocess
    import sys

    from .conftest import REPO

    return subprocess.run([sys.executable, os.path.join(REPO, "preprocessing", "run_beam.py"), *args],
                          capture_output=True, text=True, timeout=600)


def test_glob_characters_in_a_name_every_skip_in_the_summary_and_a_bad_seed(tmp_path, capsys, monkeypatch):
    with bz2.open(AUSTEN, "rb") as f:
        (tmp_path / "novel[1].txt").write_bytes(f.read()[:150_000])
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"content": f"row {i}."}) + "\n" for i in range(7))
                                         + json.dumps({"text": "The one row with text."}) + "\n")
    out = tmp_path / "out"
    # Before: the manifest step matched "novel[1].txt" as a glob, found nothing and failed with an
    # IndexError after every shard was written; and the 7 skipped rows were missing from the summary.
    monkeypatch.chdir(tmp_path)  # a bare glob (Beam listed nothing for one), recorded absolute in the manifest
    assert run_beam.main(["--input", "*", "--output", "out", "--vocab-size", "1000",
                          "--dupe-factor", "1", "--no-mlflow"]) == 0
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["input"]["paths"] == sorted([str(tmp_path / "novel[1].txt"), str(tmp_path / "rows.jsonl")])
    summary = capsys.readouterr().out
    assert re.search(r"jsonl missing text field\s+7\n", summary)
    assert re.search(r"tokens cut to fit\s+[\d,]+\n", summary) and "tokens were cut" not in summary
    with pytest.raises(SystemExit):
        run_beam.main(["--input", str(tmp_path / "rows.jsonl"), "--output", str(out), "--seed", "-1"])
    assert "--seed must be in [0, 2^63), got -1" in capsys.readouterr().err
    # before: a NotADirectoryError traceback from the vocabulary step
    assert run_beam.main(["--input", str(tmp_path / "rows.jsonl"), "--output", str(tmp_path / "rows.jsonl"),
                          "--no-mlflow"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--output {tmp_path / 'rows.jsonl'}: a file, not a folder; "
                                                    "the data dir is written there")


def test_text_without_end_punctuation_is_said_to_lose_most_of_its_tokens(tmp_path, capsys):
    # Each paragraph then reads as one sentence of ~94 tokens; a 128-token pair holds two such
    # halves at most, and truncation cuts 43% of the tokens (the recipe: 9-15%). Before: silent.
    with bz2.open(AUSTEN, "rb") as f:
        prose = f.read()[:150_000]
    (tmp_path / "plain.txt").write_bytes(re.sub(rb"[.!?;:]", b"", prose))
    assert run_beam.main(["--input", str(tmp_path / "plain.txt"), "--output", str(tmp_path / "out"),
                          "--vocab-size", "1000", "--dupe-factor", "1", "--no-mlflow"]) == 0
    summary = capsys.readouterr().out
    share = int(re.search(r"warning: (\d+)% of the segments' tokens were cut to fit --max-seq-length 128", summary)[1])
    assert 30 < share < 60 and "punctuate it" in summary


def test_a_worker_side_user_error_a_runner_typo_and_a_lossy_mode_are_one_line_each(tmp_path):
    """As a user runs it (a process of its own, Beam's logging as configured there): a jsonl
    whose texts are all blank fails in the vocabulary step inside Beam, which logged the error's
    traceback before the driver's one line."""
    import subprocess
    import sys

    from .conftest import REPO

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": " " if i % 2 else "", "body": f"Sentence {i} is here."}) + "\n"
                            for i in range(50)))
    script = os.path.join(REPO, "preprocessing", "run_beam.py")
    cases = [([], "no sentences to train the vocabulary on: the input has no text (empty or blank files?"),
             (["--runner=DirectRuner"], "--runner: Unexpected pipeline runner: DirectRuner. Valid values are"),
             (["--direct_num_workers=2", "--direct_running_mode=multi_threading"],
              "--direct_running_mode=multi_threading lost elements")]
    for extra, message in cases:
        proc = subprocess.run([sys.executable, script, "--input", str(rows), "--output", str(tmp_path / "out"),
                               "--vocab-size", "200", "--no-mlflow", *extra], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if "error: " in line]
        assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and " ERROR " not in proc.stderr, proc.stderr[-3000:]
        assert not os.path.exists(tmp_path / "out" / "manifest.json")


@pytest.mark.parametrize("rows, message", [
    ([{"body": "A row.", "id": 1}] * 3 + [{"body": "Another row.", "lang": "en"}],
     "none of its first 4 rows has a 'text' field (their fields: 'body', 'id', 'lang'); name the text's "
     "field with --text-field"),
    (["not json", "[1, 2] no", "42"], "none of its first 3 lines is a JSON object; a .jsonl file holds one object per line"),
    ([[{"text": "An array."}]], "a JSON array, not JSON lines")])
def test_a_jsonl_file_no_row_of_which_has_the_text_field_is_refused_before_the_old_output_goes(tmp_path, capsys, rows,
                                                                                              message):
    """Before: a wrong --text-field left the whole file out, each row a counted skip, and the run
    (with another input) ended as a success; a JSON array was refused only once the previous
    data dir had been deleted."""
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(gzip.compress("\n\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()))
    with bz2.open(AUSTEN, "rb") as f:
        (tmp_path / "novel.txt").write_bytes(f.read()[:20_000])
    previous = tmp_path / "out"
    (previous / "shards").mkdir(parents=True)
    (previous / "manifest.json").write_text("{}")
    assert run_beam.main(["--input", str(path), str(tmp_path / "novel.txt"), "--output", str(previous),
                          "--no-mlflow"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {path}: {message}")
    assert sorted(os.listdir(previous)) == ["manifest.json", "shards"]  # the previous data dir is whole


@pytest.mark.parametrize("name, text, command", [
    ("rows.json", '[\n  {"text": "First row."},\n  {"text": "Second row."}\n]\n', "jq -c '.[]' rows.json > rows.jsonl"),
    ("rows.jsonl", '\ufeff[{"text": "One line, one array."}]\n', "jq -c '.[]' rows.jsonl > rows.lines.jsonl"),
    ("rows.json.gz", '[{"text": "Compressed."}]', "zcat rows.json.gz | jq -c '.[]' > rows.jsonl"),
])
def test_a_json_array_is_refused_with_the_command_that_converts_it(tmp_path, name, text, command):
    """Read as JSON lines, every line of a pretty-printed array was a counted parse error and the
    run found no text."""
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: a JSON array, not JSON lines \(one object "
                                         rf"per line\); convert it, e.g. {re.escape(command)}$"):
        read_all(str(path))
    if name.endswith(".gz"):
        return
    path.write_text('{"text": "[Bracketed] first row."}\n[1, 2]\n', encoding="utf-8")  # an array row later: skipped
    items = read_all(str(path))
    assert [t for _, t in documents(items)] == ["[Bracketed] first row."]
    assert [p.reason for p in problems(items)] == ["jsonl-missing-text-field"]


def test_a_lone_surrogate_escape_in_jsonl_is_replaced_and_counted(tmp_path):
    """json.loads accepts "\\ud800" alone; such a string cannot be written as UTF-8, and the run
    ended in a Beam traceback (UnicodeEncodeError) at the first step that encoded it."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "Lone \\ud800 high."}\n{"text": "Paired \\ud83d\\ude00 emoji."}\n'
                    '{"text": "Lone \\uDC00 low."}\n', encoding="ascii")
    items = read_all(str(path))
    assert [t for _, t in documents(items)] == ["Lone \ufffd high.", "Paired \U0001F600 emoji.", "Lone \ufffd low."]
    assert problem_places(items) == [("invalid-unicode-escapes", 0), ("invalid-unicode-escapes", 69)]
    for _, text in documents(items):
        text.encode("utf-8")


def test_a_corpus_in_another_encoding_gets_a_warning_naming_the_fix(tmp_path):
    """Latin-1 German: every line with an umlaut had its letters turned into U+FFFD, and the run said
    nothing beyond a count in the summary's table."""
    import collections

    from preprocessing.driver import encoding_warning

    german = "\n\n".join(f"Die Größe des {i}. Gebäudes überraschte die Bürger von Köln." for i in range(40))
    path = tmp_path / "de.txt"
    path.write_bytes(german.encode("latin-1"))
    items = read_all(str(path))
    counters = collections.Counter(p.reason for p in problems(items))
    counters["documents-read"] = len(documents(items))
    assert counters["invalid-utf8-lines"] == 40
    assert "40 lines were not UTF-8" in encoding_warning(counters) and "iconv -f latin1" in encoding_warning(counters)
    path.write_text(german, encoding="utf-8")
    items = read_all(str(path))
    assert not problems(items) and encoding_warning({"documents-read": len(documents(items))}) is None
    assert encoding_warning({"invalid-utf8-lines": 12, "documents-read": 5000}) is None  # a few stray bytes
    assert encoding_warning({"invalid-utf8-lines": 60, "documents-read": 1000, "sentences": 50_000}) is None


def test_an_output_folder_of_other_files_is_refused_before_anything_is_deleted(tmp_path, capsys):
    corpus = tmp_path / "rows.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Sentence {i} of a row. And its second one."}) + "\n"
                              for i in range(40)))
    project = tmp_path / "project"
    (project / "tokenizer").mkdir(parents=True)
    (project / "tokenizer" / "my_vocab.txt").write_text("a user's own file")
    (project / "train.py").write_text("")
    # before: tokenizer/my_vocab.txt was deleted without a word, and the run went on
    assert run_beam.main(["--input", str(corpus), "--output", str(project), "--no-mlflow"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"--output {project}: a folder of other files (train.py) and no data dir (no manifest.json); a run "
        "would delete its tokenizer/ and parts/ if it has them: name a new or empty folder")
    assert (project / "tokenizer" / "my_vocab.txt").exists()
    # A data dir's own folders (a run killed before its manifest) and hidden temporaries are no refusal.
    (project / "train.py").unlink()
    (project / ".manifest.json.inprogress").write_text("")
    assert foreign_entries_of(project) == []


def foreign_entries_of(folder):
    from preprocessing import manifest

    return manifest.foreign_entries(str(folder))


def test_a_vocabulary_sample_of_sentences_too_long_to_train_on_says_so(caplog):
    from preprocessing import vocab

    line = "word " * 20000  # 100 KB, no sentence punctuation: one sentence
    # before: "SentencePiece could not train the vocabulary (--vocab-size 200): " and nothing after it
    with pytest.raises(vocab.VocabError, match=r"all 3 are longer than 64 KiB \(text without sentence punctuation"):
        vocab.train_sentencepiece([line] * 3, 200, "unigram")
    # Among trainable sentences they are left out, and counted (before: SentencePiece's own log only).
    sentences = [f"Sentence number {i} has some words in it." for i in range(300)] + [line, line]
    vocab.train_sentencepiece(sentences, 100, "unigram")
    assert "2 sentence(s) of the vocabulary sample are longer than 64 KiB" in caplog.text


def test_heavy_truncation_of_ordinary_sentences_names_the_length_not_the_punctuation():
    from preprocessing.driver import truncation_warning

    # 96% cut from sentences of 27 tokens: --max-seq-length 8 (before: blamed missing end punctuation)
    counters = {"truncated-tokens": 9600, "instance-tokens": 400 + 3 * 100, "instances": 100,
                "tokens": 27_000, "sentences": 1000, "characters": 124_000}  # Austen's 124 characters a sentence
    warning = truncation_warning(counters, 8)
    assert warning.startswith("warning: 96% of the segments' tokens were cut to fit --max-seq-length 8 ")
    assert "sentences average 27 tokens, more than such a row holds: use a larger --max-seq-length" in warning
    counters["tokens"] = 63_000  # Austen's sentences with a 200-piece vocabulary: still the length's doing
    assert "use a larger --max-seq-length (BERT's" in truncation_warning(counters, 8)
    # and the vocabulary's, which the line names where it is small
    assert ("sentences average 63 tokens (a vocabulary of 200 pieces splits words finely; BERT's has 30,522), more "
            "than such a row holds") in truncation_warning(counters, 8, vocab_size=200)
    assert "pieces" not in truncation_warning(counters, 8, vocab_size=32_000)
    # at 64, punctuated prose too (before: told to punctuate it, as from 64 on whatever the text)
    assert "use a larger --max-seq-length (BERT's" in truncation_warning(counters, 64)
    counters["characters"] = 700_000  # paragraphs the rules could not split: 700 characters a "sentence"
    assert "punctuate it, set --language" in truncation_warning(counters, 128)


def test_a_vocabulary_far_below_the_size_asked_is_said():
    from preprocessing.driver import Summary, vocabulary_warning

    def summary(got, asked):
        return Summary("out", "out/manifest.json", {"tokenizer": {"vocab_size": got}}, {}, 1.0, None, asked)

    assert vocabulary_warning(summary(1712, 100_000)) == (
        "warning: the vocabulary has 1,712 pieces of the 100,000 --vocab-size asked for: the corpus is too small "
        "for more (its size is an upper bound); a larger corpus, or a smaller --vocab-size to match")
    assert vocabulary_warning(summary(31_000, 32_000)) is None
    assert vocabulary_warning(summary(1712, None)) is None  # a given --tokenizer: nothing was asked


def test_a_pipe_given_as_input_is_refused_not_waited_on(tmp_path):
    """A FIFO is read while still written, or never: fine-tuning and embedding blocked in open() for
    ever (SIGTERM could not stop them there), and preprocessing called it empty."""
    from pipeline import embed_inputs
    from pipeline.finetuning.data import FinetuneDataError, read_table

    fifo = tmp_path / "rows.txt"
    os.mkfifo(fifo)
    refusal = f"{fifo}: not a regular file (a pipe, socket or device)"
    with pytest.raises(InputError, match=re.escape(refusal)):
        inputs.plan_read_tasks([str(fifo)], 1 << 20)
    csv_fifo = tmp_path / "rows.csv"
    os.mkfifo(csv_fifo)
    refusal = f"{csv_fifo}: not a regular file (a pipe, socket or device)"
    with pytest.raises(FinetuneDataError, match=re.escape(refusal)):
        read_table(str(csv_fifo))
    with pytest.raises(FinetuneDataError, match=re.escape(refusal)):
        embed_inputs.check_first_row(str(csv_fifo), "text")


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_work(tmp_path):
    """Found at the start, not at the end of the work: preprocessing read the corpus and trained
    the vocabulary before a worker's PermissionError (150 lines); pretraining trained up to its
    first save, then DeepSpeed's "Parent directory … does not exist". Run without root's right to
    write anywhere (setpriv drops it), as a user's job would."""
    import shutil
    import subprocess
    import sys

    from .conftest import REPO

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to drop root's override of file permissions")
    read_only = tmp_path / "ro"
    (read_only / "checkpoints").mkdir(parents=True)
    read_only.chmod(0o555)
    (read_only / "checkpoints").chmod(0o555)
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "from pipeline.checkpoint import check_writable\nfrom preprocessing.driver import check_writable as out\n"
            "for check, path in ((out, sys.argv[2] + '/data'), (check_writable, sys.argv[2] + '/checkpoints')):\n"
            "    try:\n        check(path)\n    except Exception as err:\n        print(err)\n")
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    proc = subprocess.run([*drop, sys.executable, "-c", code, REPO, str(read_only)], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.splitlines() == [
        f"--output {read_only}/data: cannot write in {read_only} (permission denied)",
        f"{read_only}/checkpoints: cannot write there (permission denied), so no checkpoint could be saved: fix its "
        "permissions, or train into another --run-dir"], proc.stdout + proc.stderr


def test_vocabulary_training_flags_beside_a_given_tokenizer_are_said_to_be_ignored(caplog):
    from preprocessing.options import parse_args

    with caplog.at_level(logging.WARNING, logger="preprocessing.options"):
        parse_args(["--tokenizer", "data/tokenizer", "--vocab-size=8000", "--model-type", "bpe", "--seed", "3"])
        assert caplog.messages == ["--vocab-size, --model-type set the vocabulary's training, which --tokenizer "
                                   "data/tokenizer replaces: they are ignored"]
        caplog.clear()
        parse_args(["--tokenizer", "data/tokenizer", "--max-seq-length", "64"])
        parse_args(["--vocab-size", "8000"])
        assert caplog.messages == []


def test_rows_longer_than_the_presets_positions_are_said_to_need_a_config(caplog):
    from preprocessing.options import parse_args

    with caplog.at_level(logging.WARNING, logger="preprocessing.options"):
        parse_args(["--max-seq-length", "512"])
        assert caplog.messages == []
        parse_args(["--max-seq-length", "1024"])
        assert caplog.messages == ["--max-seq-length 1024: the pretraining presets have 512 positions; pretrain these "
                                   "rows with --model a config.json whose max_position_embeddings is at least 1024"]


def test_chinese_text_without_a_language_is_said_to_need_one(caplog):
    """Before: split by English rules, one "sentence" per document, 58% of its tokens cut, 100%
    random next segments, and advice to punctuate a text full of 。"""
    from preprocessing import driver, inputs
    from preprocessing.options import parse_args

    from .conftest import SAMPLE_DIR

    poems = os.path.join(SAMPLE_DIR, "chinese-poetry.txt.bz2")
    for args, said in ((["--input", poems], True), (["--input", poems, "--language", "zh"], False),
                       (["--input", AUSTEN], False), (["--input", poems, "--language", "ch"], True),
                       (["--input", poems, "--language", "zh_TW"], False), (["--input", AUSTEN, "--language", "de"],
                                                                            False)):
        config, _ = parse_args(args)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="preprocessing.driver"):
            driver.resolve_language(config, inputs.plan_read_tasks(config.inputs, config.split_bytes))
        warnings = [m for m in caplog.messages if "written without spaces" in m]
        assert bool(warnings) == said, (args, caplog.messages)
    share = driver.unspaced_share(inputs.plan_read_tasks([poems], 1 << 26), "text")
    assert share > 0.9 and driver.unspaced_share(inputs.plan_read_tasks([AUSTEN], 1 << 26), "text") == 0


def _utf16(path):
    path.write_bytes("A first sentence here. A second one.\n\nAnother document.\n".encode("utf-16"))


def _nul_bytes(path):
    path.write_bytes("Without a byte-order mark.\n".encode("utf-16-le"))


def _not_gzip(path):
    path.write_text("Plain text, though the name says gzip.\n")


def _not_a_dump(path):
    path.write_text("<TEI><text><p>A scholarly edition, not a wiki.</p></text></TEI>\n")


def _list_field(path):
    path.write_text("".join(json.dumps({"content": [f"Row {i}.", "More."]}) + "\n" for i in range(3)))


def _gzip_named_txt(path):
    path.write_bytes(gzip.compress(b"Ein Satz. Noch ein Satz.\n\nEin zweites Dokument.\n"))


def _cr_lines(path):
    path.write_bytes(b"Erster Satz hier. Zweiter Satz.\rDritter Satz.\r\rNeues Dokument hier.\r")


def _utf32(path):
    path.write_bytes("A line of text.\n".encode("utf-32"))


def _utf16_gzip(path):
    path.write_bytes(gzip.compress("A line of text.\n".encode("utf-16")))


def _nested_field(path):
    path.write_text("".join(json.dumps({"content": {"text": f"Row {i}."}}) + "\n" for i in range(3)))


@pytest.mark.parametrize("name, make, message", [
    # before: read as ASCII with a NUL between the letters, trained on as garbage, the warnings
    # blaming punctuation and --character-coverage
    ("notepad.txt", _utf16, "UTF-16 text (it begins with a UTF-16 byte-order mark), not UTF-8: convert it to UTF-8 "
                            "first (iconv -f UTF-16 -t UTF-8"),
    ("powershell.jsonl", _nul_bytes, "NUL bytes in its first 54 bytes (27 of them): UTF-16 or UTF-32 text without a "
                                     "byte-order mark, or not text at all"),
    # before: one "truncated-files" count and exit 0, the file's documents all lost
    ("plain.txt.gz", _not_gzip, "not a gzip file (no gzip header at byte 0), though its name ends in .gz"),
    # before: read as a dump, no page, no count, exit 0
    ("edition.xml", _not_a_dump, "not a MediaWiki XML dump (no <mediawiki> or <page> element at its start)"),
    # before: accepted by the head check, then "no sentences to train" after the old output was deleted
    ("nested.jsonl", _nested_field, "field 'content' holds an object or a list, not text, in its first 3 rows"),
    ("paragraphs.jsonl", _list_field, "field 'content' holds an object or a list, not text, in its first 3 rows (a "
                                      "nested field is not read): name a top-level text field with --text-field, or "
                                      "flatten it first, e.g. jq -c '{text: (.\"content\" | map(tostring) | "
                                      "join(\"\\n\"))}' paragraphs.jsonl > paragraphs.lines.jsonl"),
    # before: a download saved as .txt was read as its compressed bytes, a vocabulary of junk pieces
    ("download.txt", _gzip_named_txt, "gzip data, though its name does not end in .gz: add the suffix "
                                      "(download.txt.gz)"),
    # before: called UTF-16, and the command given left a NUL between the letters
    ("utf32.txt", _utf32, "UTF-32 text (it begins with a UTF-32 byte-order mark), not UTF-8: convert it to UTF-8 "
                          "first (iconv -f UTF-32 -t UTF-8"),
    # before: one line, its paragraphs and documents merged
    ("mac.txt", _cr_lines, "its lines end in CR alone (classic Mac OS), not LF or CRLF: convert them first, e.g. "
                           "tr '\\r' '\\n' < "),
    # before: iconv on the compressed bytes, into a name no input format has
    ("notepad.txt.gz", _utf16_gzip, "UTF-16 text (it begins with a UTF-16 byte-order mark), not UTF-8: convert it to "
                                    "UTF-8 first (zcat "),
])
def test_input_no_reader_can_read_as_text_is_refused_before_the_old_output_goes(tmp_path, capsys, name, make,
                                                                               message):
    make(tmp_path / name)
    previous = tmp_path / "out"
    (previous / "shards").mkdir(parents=True)
    (previous / "manifest.json").write_text("{}")
    flags = ["--text-field", "content"] if name in ("nested.jsonl", "paragraphs.jsonl") else []
    assert run_beam.main(["--input", str(tmp_path / name), AUSTEN, "--output", str(previous), "--no-mlflow",
                          *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {tmp_path / name}: {message}")
    assert sorted(os.listdir(previous)) == ["manifest.json", "shards"]  # the previous data dir is whole


def test_a_stray_nul_in_utf8_text_is_read_not_refused(tmp_path):
    """A NUL or two in UTF-8 text (a bad export) was taken for UTF-16 and stopped the run."""
    from preprocessing import inputs, text_formats

    path = tmp_path / "export.txt"
    path.write_bytes(b"A first document.\x00 It has a stray NUL.\n\nA second one, clean.\n")
    tasks = inputs.plan_read_tasks([str(path)], 1 << 20)
    inputs.check_inputs(tasks, "text")
    docs = [d.text for d in inputs.read_task(tasks[0], "text", 1 << 20) if isinstance(d, text_formats.RawDocument)]
    assert len(docs) == 2 and docs[1] == "A second one, clean."


def test_inputs_are_listed_once_whole_and_by_their_own_names(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.txt"):
        (corpus / name).write_text(f"The text of {name}.\n")
    os.symlink(corpus, tmp_path / "link")
    # a file named twice (the folder, a file in it, a link to the folder) is read once
    skipped = {}
    with caplog.at_level(logging.WARNING, logger="preprocessing.inputs"):
        tasks = inputs.plan_read_tasks([str(corpus), str(corpus / "./a.txt"), str(tmp_path / "link")], 1 << 26,
                                       skipped=skipped)
    assert sorted(t.path for t in tasks) == [str(corpus / "a.txt"), str(corpus / "b.txt")]
    assert skipped == {"second-name": [str(tmp_path / "link" / "a.txt"), str(tmp_path / "link" / "b.txt")]}
    assert "2 input file(s) listed under a second name, read once" in caplog.text  # the link's two
    # "link/.." is where the link leads, then up: not the link's own folder (os.path.abspath's reading)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "x.txt").write_text("The file beside the link's target.\n")
    (corpus / "x.txt").write_text("The file beside the link.\n")
    os.symlink(tmp_path / "d" / "sub", corpus / "linkdir")
    both = inputs.plan_read_tasks([str(corpus / "x.txt"), str(corpus / "linkdir" / ".." / "x.txt")], 1 << 26)
    assert len(both) == 2
    os.remove(corpus / "x.txt")
    os.remove(corpus / "linkdir")
    # a file whose name holds glob characters, named as it is
    (tmp_path / "book [1813].txt").write_text("It is a truth universally acknowledged.\n")
    assert [t.path for t in inputs.plan_read_tasks([str(tmp_path / "book [1813].txt")], 1 << 26)] == [
        str(tmp_path / "book [1813].txt")]
    # a link whose content was never fetched (git-annex, DVC): refused, not left out unsaid; one of
    # no input format would be skipped anyway
    os.symlink(tmp_path / "annex" / "figure", corpus / "figure.png")
    assert len(inputs.plan_read_tasks([str(corpus)], 1 << 26)) == 2
    os.symlink(tmp_path / "annex" / "missing", corpus / "c.txt")
    for given in (str(corpus), str(corpus / "*.txt")):
        with pytest.raises(InputError, match=rf"{re.escape(str(corpus / 'c.txt'))} is a link to .*annex/missing, "
                                             "which does not exist"):
            inputs.plan_read_tasks([given], 1 << 26)
    # a scheme Beam has no file system for: one line, not a traceback
    with pytest.raises(InputError, match=r"--input file:///tmp/x\.txt: cannot list it \("):
        inputs.plan_read_tasks(["file:///tmp/x.txt"], 1 << 26)


def test_a_binary_parquet_text_column_is_read_as_utf8_and_a_row_that_is_not_is_counted(tmp_path):
    texts = ["Première phrase. Deuxième phrase.".encode(), b"caf\xe9 latin-1", None]
    pq.write_table(pa.table({"text": pa.array(texts, pa.binary())}), tmp_path / "spark.parquet")
    with open(tmp_path / "spark.parquet", "rb") as f:
        items = list(text_formats.read_parquet(f, str(tmp_path / "spark.parquet"), "text"))
    assert [text for _, text in documents(items)] == ["Première phrase. Deuxième phrase."]
    assert [p.reason for p in problems(items)] == ["invalid-utf8-rows", "parquet-null-text"]


def test_a_language_other_than_the_dumps_is_said(caplog, tmp_path):
    from preprocessing.driver import resolve_language
    from preprocessing.options import PreprocessConfig

    tasks = inputs.plan_read_tasks([WIKI_SAMPLE], 1 << 26)
    with caplog.at_level(logging.WARNING, logger="preprocessing.driver"):
        assert resolve_language(PreprocessConfig(language="de"), tasks).language == "de"
    assert f"the language is de (--language), but the xml:lang of {WIKI_SAMPLE} (en)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="preprocessing.driver"):
        assert resolve_language(PreprocessConfig(), tasks).language == "en"
    assert "xml:lang of" not in caplog.text
    # a variant of the dump's language (the docs' zh-tw for a zhwiki dump) is not another one
    for variant, recorded in (("en-GB", "en-GB"), ("en_us", "en-US")):  # as BCP 47 spells it
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="preprocessing.driver"):
            assert resolve_language(PreprocessConfig(language=variant), tasks).language == recorded
        assert "xml:lang of" not in caplog.text, variant
    # a dump that declares no language is read as English, but names none to differ from
    with bz2.open(WIKI_SAMPLE, "rb") as f:
        head = f.read()
    undeclared = re.sub(rb'\sxml:lang="[^"]*"', b"", head, count=1)
    assert undeclared != head
    (tmp_path / "old.xml").write_bytes(undeclared)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="preprocessing.driver"):
        resolve_language(PreprocessConfig(language="de"), inputs.plan_read_tasks([str(tmp_path / "old.xml")], 1 << 26))
    assert "xml:lang of" not in caplog.text


def test_long_lines_with_stray_crs_are_not_taken_for_classic_mac_text(tmp_path):
    from preprocessing.text_formats import check_encoding_head

    path = tmp_path / "flat.txt"  # CRLF text flattened with tr '\n' ' ': 6 KB lines of stray CRs
    path.write_bytes((b"A sentence.\r" * 500 + b"\n") * 3)
    with open(path, "rb") as f:
        check_encoding_head(f, str(path))
