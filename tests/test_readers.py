"""Reading documents: real dump sample, split multistream files, and every kind of bad input."""

import bz2
import gzip
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preprocessing import inputs, wiki_dump
from preprocessing.documents import Problem, RawDocument
from preprocessing.text_formats import InputError

from .conftest import AUSTEN, WIKI_SAMPLE, split_dump


def read_all(path, split_bytes=64 << 20, text_field="text", max_line_bytes=1 << 20):
    items = []
    for task in inputs.plan_read_tasks([path], split_bytes):
        items.extend(inputs.read_task(task, text_field, max_line_bytes))
    return items


def pages(items):
    return [i for i in items if isinstance(i, wiki_dump.Page)]


def problems(items):
    return [i for i in items if isinstance(i, Problem)]


def test_real_dump_sample_pages_and_redirects():
    items = read_all(WIKI_SAMPLE)
    assert not problems(items)
    got = pages(items)
    assert len(got) == 206
    assert sum(p.is_redirect for p in got) == 100
    articles = [p for p in got if not p.is_redirect]
    assert len(articles) == 106
    anarchism = next(p for p in articles if p.title == "Anarchism")
    assert anarchism.page_id == "12" and anarchism.namespace == 0
    assert "'''Anarchism''' is a" in anarchism.text  # raw wikitext, XML entities decoded


@pytest.mark.parametrize("split_bytes", [65536, 100_003, 1 << 30])
def test_multistream_dump_split_across_ranges_reads_each_page_once(multistream_dump, split_bytes):
    whole = [p.title for p in pages(read_all(WIKI_SAMPLE))]
    tasks = inputs.plan_read_tasks([multistream_dump], split_bytes)
    got = []
    for task in tasks:
        got.extend(p.title for p in pages(inputs.read_task(task, "text", 1 << 20)))
    assert got == whole
    if split_bytes < 1 << 20:
        assert len(tasks) > 10  # the file really was shared by many ranges


def test_stream_boundaries_inside_pages(wiki_xml, tmp_path):
    """pbzip2/lbzip2 output: streams cut at arbitrary bytes, pages span streams."""
    path = tmp_path / "parallel-compressed.xml.bz2"
    path.write_bytes(b"".join(bz2.compress(wiki_xml[i:i + 30001]) for i in range(0, len(wiki_xml), 30001)))
    whole = [p.title for p in pages(read_all(WIKI_SAMPLE))]
    for split in (4099, 65536):
        items = read_all(str(path), split_bytes=split)
        assert not problems(items)
        assert [p.title for p in pages(items)] == whole


def test_truncated_bz2_keeps_earlier_pages_and_names_the_file(tmp_path):
    data = open(WIKI_SAMPLE, "rb").read()
    path = tmp_path / "truncated.xml.bz2"
    path.write_bytes(data[: len(data) // 2])
    items = read_all(str(path))
    got = pages(items)
    assert 20 < len(got) < 206
    reasons = {p.reason for p in problems(items)}
    assert "truncated-streams" in reasons
    assert all(str(path) in p.message for p in problems(items))


def test_malformed_page_is_skipped_and_the_rest_kept(wiki_xml, tmp_path):
    header, page_list, footer = split_dump(wiki_xml)
    broken = page_list[5].replace(b"</title>", b"</titel>", 1)
    page_list = page_list[:5] + [broken] + page_list[6:]
    path = tmp_path / "malformed.xml.bz2"
    path.write_bytes(bz2.compress(header + b"".join(page_list) + footer))
    items = read_all(str(path))
    assert len(pages(items)) == 205
    [problem] = problems(items)
    assert problem.reason == "malformed-pages"
    assert str(path) in problem.message and "not well-formed" in problem.message


def test_invalid_utf8_in_a_page_is_repaired_and_flagged(wiki_xml, tmp_path):
    header, page_list, footer = split_dump(wiki_xml)
    page_list[1] = page_list[1].replace(b"Anarchism is", b"Anarchism \xff\xfe is", 1)
    path = tmp_path / "badutf8.xml"
    path.write_bytes(header + b"".join(page_list) + footer)
    got = pages(read_all(str(path)))
    assert len(got) == 206
    repaired = [p for p in got if p.repaired]
    assert [p.title for p in repaired] == ["Anarchism"]
    assert "\ufffd" in repaired[0].text


def test_plain_text_documents_are_blank_line_separated(tmp_path):
    path = tmp_path / "corpus.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write("First sentence.\nSecond line of doc one.\n\n\nDoc two, only line.\n")
    docs = [i for i in read_all(str(path)) if isinstance(i, RawDocument)]
    assert [d.text for d in docs] == ["First sentence. Second line of doc one.", "Doc two, only line."]
    assert [d.doc_id for d in docs] == ["corpus.txt.gz:1", "corpus.txt.gz:5"]


def test_real_novels_read_as_paragraph_documents():
    docs = [i for i in read_all(AUSTEN) if isinstance(i, RawDocument)]
    assert len(docs) > 5000
    assert any(d.text.startswith("It is a truth universally acknowledged") for d in docs)


def test_a_50_megabyte_line_is_skipped_without_holding_it(tmp_path):
    path = tmp_path / "huge-line.txt"
    with open(path, "wb") as f:
        f.write(b"A normal document.\n\n")
        f.write(b"x" * (50 << 20) + b"\n\n")
        f.write(b"Another normal document.\n")
    started = time.monotonic()
    items = read_all(str(path))
    assert time.monotonic() - started < 10
    assert [d.text for d in items if isinstance(d, RawDocument)] == [
        "A normal document.", "Another normal document."]
    [problem] = problems(items)
    assert problem.reason == "oversized-lines" and f"{path}:3" in problem.message


def test_invalid_utf8_line_is_counted_with_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"Good line.\n\nBad \xc3\x28 line.\n")
    items = read_all(str(path))
    [problem] = problems(items)
    assert problem.reason == "invalid-utf8-lines" and f"{path}:3" in problem.message
    assert [d.text for d in items if isinstance(d, RawDocument)] == ["Good line.", "Bad \ufffd( line."]


def test_jsonl_rows_without_the_text_field_are_counted(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "One."}, {"body": "no text field"}, "not an object", {"text": 5}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n")
    items = read_all(str(path))
    assert [d.text for d in items if isinstance(d, RawDocument)] == ["One."]
    found = [(p.reason, p.message.split(":")[1]) for p in problems(items)]
    assert found == [("jsonl-missing-text-field", "2"), ("jsonl-missing-text-field", "3"),
                     ("jsonl-missing-text-field", "4"), ("jsonl-parse-errors", "5")]
    assert "--text-field" in problems(items)[0].message


def test_parquet_text_column_and_missing_column_error(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["Doc one.", None, "Doc three."]}), path)
    items = read_all(str(path), text_field="content")
    assert [d.text for d in items if isinstance(d, RawDocument)] == ["Doc one.", "Doc three."]
    assert [p.reason for p in problems(items)] == ["parquet-null-text"]
    tasks = inputs.plan_read_tasks([str(path)], 1 << 20)
    with pytest.raises(InputError, match=r"docs\.parquet: no column 'text' \(columns: content\)"):
        inputs.check_inputs(tasks, "text")


def test_unknown_extension_and_unmatched_glob_are_clear_errors(tmp_path):
    (tmp_path / "notes.docx").write_bytes(b"x")
    with pytest.raises(InputError, match=r"notes\.docx: unknown input format; supported"):
        inputs.plan_read_tasks([str(tmp_path / "notes.docx")], 1 << 20)
    with pytest.raises(InputError, match=r"--input .*nothing-\*\.txt.*: no file matches"):
        inputs.plan_read_tasks([str(tmp_path / "nothing-*.txt")], 1 << 20)


def test_truncated_gzip_text_keeps_earlier_documents(tmp_path):
    path = tmp_path / "cut.txt.gz"
    blob = gzip.compress(("\n\n".join(f"Document number {i}." for i in range(20000))).encode())
    path.write_bytes(blob[: len(blob) // 2])
    items = read_all(str(path))
    assert [p.reason for p in problems(items)] == ["truncated-files"]
    assert 100 < sum(isinstance(i, RawDocument) for i in items) < 20000
