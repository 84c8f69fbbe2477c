"""Reading documents: real dump sample, files split into read tasks, and every kind of bad input."""

import bz2
import gzip
import json
import os
import random
import re
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


def test_a_single_stream_dump_is_one_read_task_and_a_false_bz2_is_refused(tmp_path):
    # Before: the plain-bzip2 sample was cut into 26 ranges at 64 KiB, 25 of them empty; the
    # vocabulary sample could pick only empty ones ("no sentences to train the vocabulary on").
    with open(WIKI_SAMPLE, "rb") as f:
        assert len(wiki_dump.BZ2_STREAM_HEADER.findall(f.read())) == 1  # the sample is single-stream
    [task] = inputs.plan_read_tasks([WIKI_SAMPLE], 65536)
    assert (task.start, task.end) == (0, os.path.getsize(WIKI_SAMPLE))
    assert [p.title for p in pages(inputs.read_task(task, "text", 1 << 20))] == \
        [p.title for p in pages(read_all(WIKI_SAMPLE))]
    fake = tmp_path / "notbz.xml.bz2"  # uncompressed XML under a .bz2 name: before, read as nothing
    fake.write_bytes(bz2.decompress(open(WIKI_SAMPLE, "rb").read()))
    with pytest.raises(InputError, match=r"notbz\.xml\.bz2: not a bzip2 file \(no bzip2 stream header at byte 0\)"):
        inputs.plan_read_tasks([str(fake)], 65536)


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
    # Ids are byte offsets in the decompressed text: "Doc two" begins at byte 42.
    assert [d.doc_id for d in docs] == ["corpus.txt.gz@0", "corpus.txt.gz@42"]


def test_real_novels_read_as_paragraph_documents():
    docs = [i for i in read_all(AUSTEN) if isinstance(i, RawDocument)]
    assert len(docs) > 5000
    assert any(d.text.startswith("It is a truth universally acknowledged") for d in docs)


def test_the_default_corpus_is_the_novels_a_chapter_per_document_rebuilt_byte_for_byte(tmp_path):
    """The default run's text: derived from the paragraph file by the script its README names."""
    from preprocessing.options import DEFAULT_INPUTS
    from preprocessing.sample_data import derive_austen_chapters

    [chapters_file] = [path for path in DEFAULT_INPUTS if path.endswith(".txt.bz2")]
    derive_austen_chapters.main(["--out", str(tmp_path / "rebuilt.txt.bz2")])
    assert (tmp_path / "rebuilt.txt.bz2").read_bytes() == open(chapters_file, "rb").read()
    chapters = [d.text for d in read_all(chapters_file) if isinstance(d, RawDocument)]
    paragraphs = [d.text for d in read_all(AUSTEN) if isinstance(d, RawDocument)]
    assert len(chapters) == 269 and chapters[0].startswith("Emma Woodhouse, handsome, clever, and rich")
    # The same prose, headings and title pages aside: 0.1% of the words.
    words = sum(len(text.split()) for text in chapters)
    assert 0.998 < words / sum(len(text.split()) for text in paragraphs) < 1
    assert not any(text.startswith(("CHAPTER", "Chapter", "VOLUME")) for text in chapters)
    assert words / len(chapters) > 2000  # long enough for two segments, where a paragraph has ~70 words


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
    assert problem.reason == "oversized-lines" and f"{path}: line 3 (byte 20): line longer" in problem.message


def test_invalid_utf8_line_is_counted_with_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"Good line.\n\nBad \xc3\x28 line.\n")
    items = read_all(str(path))
    [problem] = problems(items)
    # Line 3 begins at byte 12; the bad byte is the 5th of the line.
    assert problem.reason == "invalid-utf8-lines"
    assert f"{path}: line 3 (byte 16): invalid UTF-8" in problem.message
    assert [d.text for d in items if isinstance(d, RawDocument)] == ["Good line.", "Bad \ufffd( line."]


def test_jsonl_rows_without_the_text_field_are_counted(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "One."}, {"body": "no text field"}, "not an object", {"text": 5}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n")
    items = read_all(str(path))
    assert [d.text for d in items if isinstance(d, RawDocument)] == ["One."]
    found = [(p.reason, re.search(r": line (\d+) \(byte \d+\): ", p.message).group(1))
             for p in problems(items)]
    assert found == [("jsonl-missing-text-field", "2"), ("jsonl-missing-text-field", "3"),
                     ("jsonl-missing-text-field", "4"), ("jsonl-parse-errors", "5")]
    assert problems(items)[0].message == (f"{path}: line 2 (byte 17): row has no 'text' field "
                                          "(see --text-field); skipped")
    assert ": row is a JSON str, not an object with a 'text' field" in problems(items)[1].message


def test_parquet_text_column_and_missing_column_error(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["Doc one.", None, "Doc three."]}), path)
    items = read_all(str(path), text_field="content")
    assert [(d.doc_id, d.text) for d in items if isinstance(d, RawDocument)] == [
        ("docs.parquet#0", "Doc one."), ("docs.parquet#2", "Doc three.")]
    assert [p.reason for p in problems(items)] == ["parquet-null-text"]
    tasks = inputs.plan_read_tasks([str(path)], 1 << 20)
    with pytest.raises(InputError, match=r"docs\.parquet: no column 'text' \(columns: 'content'\)"):
        inputs.check_inputs(tasks, "text")
    # pandas' read_csv of a csv with a byte-order mark, saved: before, "no column 'text' (columns: text)"
    pq.write_table(pa.table({"\ufefftext": ["Doc one."]}), path)
    with pytest.raises(InputError, match=r"no column 'text' \(columns: '\\ufefftext'\)"):
        inputs.check_inputs(tasks, "text")
    # A number column: every row was skipped as "has no text", the run then found none.
    pq.write_table(pa.table({"n": [1, 2, 3], "content": ["a", "b", "c"]}), path)
    with pytest.raises(InputError, match=r"docs\.parquet: column 'n' holds int64, not text \(text columns: content\)"):
        inputs.check_inputs(inputs.plan_read_tasks([str(path)], 1 << 20), "n")
    # Text stored dictionary-encoded (pandas' Categorical) is text.
    pq.write_table(pa.table({"content": pa.array(["Doc one.", "Doc two."]).dictionary_encode()}), path)
    inputs.check_inputs(inputs.plan_read_tasks([str(path)], 1 << 20), "content")
    assert [t for _, t in documents(read_all(str(path), text_field="content"))] == ["Doc one.", "Doc two."]


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


def _zstd_in_two_frames(data: bytes) -> bytes:
    """As ``zstd a; zstd b; cat a.zst b.zst`` makes, or a crawl that appends a frame a batch; each
    after a skippable frame, as pzstd writes (its first bytes are no zstd frame's)."""
    import struct

    import zstandard

    half = len(data) // 2
    skippable = b"\x50\x2a\x4d\x18" + struct.pack("<I", 4) + b"pzst"
    return b"".join(skippable + zstandard.ZstdCompressor().compress(part) for part in (data[:half], data[half:]))


def test_a_highly_compressed_zstd_jsonl_is_checked_and_read_in_bounded_time_and_memory(tmp_path):
    """Rows of one repeated letter (a ratio of thousands): the head check's readline read one byte at
    a time and copied the rest of the buffer each time (minutes); one read decompressed it all."""
    import tracemalloc

    import zstandard

    rows = [json.dumps({"text": "a" * 200_000 + f" row {i}."}) + "\n" for i in range(300)]
    path = tmp_path / "repetitive.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress("".join(rows).encode()))
    began = time.monotonic()
    inputs.check_inputs(inputs.plan_read_tasks([str(path)], 1 << 20), "text")
    tracemalloc.start()
    count = 0
    for item in inputs.read_task(inputs.plan_read_tasks([str(path)], 1 << 20)[0], "text", 1 << 20):
        count += isinstance(item, RawDocument)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 300 and peak < 16 << 20, peak  # the stream is 60 MB
    assert time.monotonic() - began < 60


@pytest.mark.parametrize("suffix", [".zst", ".xz"])
def test_zstd_and_xz_text_and_jsonl_read_as_their_bz2_originals(austen_txt, tmp_path, suffix):
    import lzma

    compress = {".zst": _zstd_in_two_frames, ".xz": lzma.compress}[suffix]
    text = open(austen_txt, "rb").read()
    path = tmp_path / f"austen-novels.txt{suffix}"
    path.write_bytes(compress(text))
    assert [(i.replace(suffix, ".bz2"), t) for i, t in documents(read_all(str(path)))] == documents(read_all(AUSTEN))
    rows = [{"text": f"Row {i} says something."} for i in range(3000)]
    path = tmp_path / f"rows.jsonl{suffix}"
    path.write_bytes(compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    inputs.check_inputs(inputs.plan_read_tasks([str(path)], 1 << 20), "text")
    assert [t for _, t in documents(read_all(str(path)))] == [r["text"] for r in rows]
    # truncated: what came before is kept, and the file is counted, named
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) * 3 // 4])  # inside the second zstd frame
    items = read_all(str(path))
    assert [p.reason for p in problems(items)] == ["truncated-files"] and str(path) in problems(items)[0].message
    assert 0 < sum(isinstance(i, RawDocument) for i in items) < 3000
    # a name that says so of a file that is not
    path.write_text('{"text": "plain"}\n')
    what = {".zst": "zstd", ".xz": "xz"}[suffix]
    with pytest.raises(InputError, match=f"not a {what} file \\(no {what} header at byte 0\\), though its name ends "
                                         f"in \\{suffix}"):
        inputs.check_inputs(inputs.plan_read_tasks([str(path)], 1 << 20), "text")


# ------------------------------------------------ files split into read tasks
# A task reads the documents that begin in its range, so the tasks of a file, read in
# order, give exactly what one reader of the whole file gives, whatever the cut points.

def read_tasks(tasks, text_field="text", max_line_bytes=1 << 20):
    """What each task reads, in task order."""
    return [list(inputs.read_task(task, text_field, max_line_bytes)) for task in tasks]


def documents(items):
    return [(d.doc_id, d.text) for d in items if isinstance(d, RawDocument)]


def problem_places(items):
    """(reason, byte offset) of each problem: the same whatever the split, unlike the
    line number, which only a task that starts at byte 0 knows."""
    return [(p.reason, int(re.search(r"\bbyte (\d+)\b", p.message).group(1))) for p in problems(items)]


def concatenated(per_task):
    return [item for items in per_task for item in items]


def whole_file_task(path, fmt):
    return inputs.ReadTask(str(path), fmt, None)


def cut_in_two(path, fmt, cut):
    size = os.path.getsize(path)
    return [inputs.ReadTask(str(path), fmt, None, 0, cut), inputs.ReadTask(str(path), fmt, None, cut, size)]


def assert_reads_like_the_whole_file(tasks, whole, max_line_bytes=1 << 20):
    got = concatenated(read_tasks(tasks, max_line_bytes=max_line_bytes))
    assert documents(got) == documents(whole)
    assert problem_places(got) == problem_places(whole)


@pytest.fixture(scope="module")
def austen_txt(tmp_path_factory):
    """The bundled novels, decompressed: 4 MB of real prose, paragraphs separated by
    runs of one to several blank lines."""
    path = tmp_path_factory.mktemp("text") / "austen-novels.txt"
    with bz2.open(AUSTEN, "rb") as f:
        path.write_bytes(f.read())
    return str(path)


@pytest.mark.parametrize("split_bytes", [65536, 100_003, 1 << 30])
def test_text_file_split_into_ranges_reads_each_document_once(austen_txt, split_bytes):
    whole = list(inputs.read_task(whole_file_task(austen_txt, "text"), "text", 1 << 20))
    assert len(documents(whole)) > 5000
    tasks = inputs.plan_read_tasks([austen_txt], split_bytes)
    size = os.path.getsize(austen_txt)
    assert [t.start for t in tasks[1:]] == [t.end for t in tasks[:-1]]
    assert tasks[0].start == 0 and tasks[-1].end == size
    assert all(t.stored_bytes == t.end - t.start <= split_bytes for t in tasks)
    if split_bytes < size:
        assert len(tasks) > 30
    assert_reads_like_the_whole_file(tasks, whole)


def test_text_ids_are_byte_offsets_the_same_compressed_or_not(austen_txt):
    plain = documents(read_all(austen_txt, split_bytes=65536))
    compressed = documents(read_all(AUSTEN))
    assert [(i.replace(".txt@", ".txt.bz2@"), text) for i, text in plain] == compressed
    text = open(austen_txt, "rb").read()
    for doc_id, doc_text in plain[::500]:
        offset = int(doc_id.rsplit("@", 1)[1])
        first_words = doc_text.split()[:5]
        assert text[offset:offset + 200].decode("utf-8", "ignore").split()[:len(first_words)] == first_words


@pytest.mark.parametrize("split_bytes", [65536, 100_003])
def test_crlf_text_split_reads_the_same_documents(austen_txt, tmp_path, split_bytes):
    path = tmp_path / "austen-crlf.txt"
    path.write_bytes(open(austen_txt, "rb").read().replace(b"\n", b"\r\n"))
    whole = list(inputs.read_task(whole_file_task(path, "text"), "text", 1 << 20))
    assert [t for _, t in documents(whole)] == [t for _, t in documents(read_all(austen_txt))]
    assert_reads_like_the_whole_file(inputs.plan_read_tasks([str(path)], split_bytes), whole)


# Every case a cut can fall in: inside a document, inside a run of blank lines (empty,
# whitespace-only, CRLF, a no-break space, which str.strip() counts as blank), at a
# boundary, inside oversized lines (max_line_bytes=40; one all spaces: oversized, so
# not blank) and a bad UTF-8 one.
TRICKY_TEXT = (b"First doc, line one.\nline two.\n\n\n\n  \t \n"
               b"Second doc.\r\n\r\n\xc2\xa0\n"
               b"Third \xff doc.\n" + b"x" * 50 + b"\n" + b" " * 50 + b"\nstill third.\n\n"
               b"Last doc, no final newline")
TRICKY_DOCS = [("tricky.txt@0", "First doc, line one. line two."),
               ("tricky.txt@39", "Second doc."),
               ("tricky.txt@57", "Third \ufffd doc. still third."),
               ("tricky.txt@186", "Last doc, no final newline")]


def test_tricky_text_reads_the_same_from_every_cut_point(tmp_path):
    path = tmp_path / "tricky.txt"
    path.write_bytes(TRICKY_TEXT)
    size = len(TRICKY_TEXT)
    whole = list(inputs.read_task(whole_file_task(path, "text"), "text", 40))
    assert documents(whole) == TRICKY_DOCS
    assert problem_places(whole) == [("invalid-utf8-lines", 63), ("oversized-lines", 70),
                                     ("oversized-lines", 121)]
    for cut in range(1, size):
        assert_reads_like_the_whole_file(cut_in_two(path, "text", cut), whole, max_line_bytes=40)
    for split_bytes in range(1, 40):  # many ranges, most of them owning no document
        assert_reads_like_the_whole_file(inputs.plan_read_tasks([str(path)], split_bytes), whole, 40)


def write_jsonl(path, rows):
    """Writes raw lines (bytes); returns the id each line that holds a document gets."""
    ids, offset = [], 0
    with open(path, "wb") as f:
        for line in rows:
            if line.startswith(b'{"text": "'):
                ids.append(f"{path.name}@{offset}")
            f.write(line + b"\n")
            offset += len(line) + 1
    return ids


def test_jsonl_split_into_ranges_reads_each_row_once_even_cut_inside_a_long_line(tmp_path):
    rng = random.Random(7)
    rows = [json.dumps({"text": f"Row {i}. " + "word " * rng.randrange(400)}).encode() for i in range(2000)]
    rows[300] = json.dumps({"text": "long " * 60_000}).encode()  # 300 kB: spans several ranges
    rows[500:500] = [b"", b"{broken", b'{"body": "no text"}', json.dumps({"text": "crlf"}).encode() + b"\r"]
    path = tmp_path / "rows.jsonl"
    ids = write_jsonl(path, rows)
    whole = list(inputs.read_task(whole_file_task(path, "jsonl"), "text", 1 << 20))
    assert [doc_id for doc_id, _ in documents(whole)] == ids
    assert [r for r, _ in problem_places(whole)] == ["jsonl-parse-errors", "jsonl-missing-text-field"]
    long_at = int(ids[300].rsplit("@", 1)[1])
    for split_bytes in (65536, 100_003, 1 << 30):
        tasks = inputs.plan_read_tasks([str(path)], split_bytes)
        if split_bytes < 1 << 20:
            assert any(long_at < t.start < long_at + len(rows[300]) for t in tasks)
        assert_reads_like_the_whole_file(tasks, whole)


def test_jsonl_reads_the_same_from_every_cut_point_and_reports_problems_once(tmp_path):
    path = tmp_path / "small.jsonl"
    rows = [b'{"text": "one"}', b"", b"{broken", b'{"text": "' + b"y" * 50 + b'"}',
            b'{"text": "bad \xff utf8"}', b"   ", b'{"other": 1}', b'{"text": "last"}\r']
    write_jsonl(path, rows)
    size = path.stat().st_size
    whole = list(inputs.read_task(whole_file_task(path, "jsonl"), "text", 40))
    assert [t for _, t in documents(whole)] == ["one", "bad \ufffd utf8", "last"]
    assert [r for r, _ in problem_places(whole)] == [
        "jsonl-parse-errors", "oversized-lines", "invalid-utf8-lines", "jsonl-missing-text-field"]
    for cut in range(1, size):
        assert_reads_like_the_whole_file(cut_in_two(path, "jsonl", cut), whole, max_line_bytes=40)
    for split_bytes in range(1, 40):
        assert_reads_like_the_whole_file(inputs.plan_read_tasks([str(path)], split_bytes), whole, 40)


def test_problem_in_a_range_starting_mid_file_is_placed_by_byte(tmp_path):
    path = tmp_path / "late.jsonl"
    path.write_bytes(b'{"text": "padding"}\n' * 10_000 + b"{broken\n")
    tasks = inputs.plan_read_tasks([str(path)], 65536)
    assert len(tasks) == 4
    [problem] = problems(concatenated(read_tasks(tasks)))
    assert problem.message.startswith(f"{path}: byte 200000: not valid JSON")


def test_parquet_row_groups_are_read_tasks_with_stable_row_ids(tmp_path):
    path = tmp_path / "rows.parquet"
    texts = [None if i % 97 == 5 else f"Row {i}. " + "word " * (i % 50) for i in range(1000)]
    pq.write_table(pa.table({"text": texts, "n": list(range(1000))}), path, row_group_size=128)
    assert pq.ParquetFile(path).metadata.num_row_groups == 8
    whole = read_all(str(path))
    assert documents(whole) == [(f"rows.parquet#{i}", t) for i, t in enumerate(texts) if t is not None]
    assert len(problems(whole)) == 11
    one_group = max(t.stored_bytes for t in inputs.plan_read_tasks([str(path)], 1))
    for split_bytes, expected_tasks in ((1, 8), (one_group, 8), (3 * one_group, 3), (1 << 30, 1)):
        tasks = inputs.plan_read_tasks([str(path)], split_bytes)
        assert len(tasks) == expected_tasks
        assert tasks[0].start == 0 and tasks[-1].end == 8
        assert [t.start for t in tasks[1:]] == [t.end for t in tasks[:-1]]
        got = concatenated(read_tasks(tasks))
        assert documents(got) == documents(whole)
        assert [p.message for p in problems(got)] == [p.message for p in problems(whole)]


def test_compressed_text_is_one_task_and_a_row_group_is_never_cut(austen_txt, tmp_path):
    [task] = inputs.plan_read_tasks([AUSTEN], 65536)
    assert (task.start, task.end, task.stored_bytes) == (0, -1, os.path.getsize(AUSTEN))
    ranges = inputs.plan_read_tasks([austen_txt], 65536)
    assert len(ranges) > 10 and all(t.stored_bytes <= 65536 for t in ranges)
    big_group = tmp_path / "one-group.parquet"
    pq.write_table(pa.table({"text": [f"Row {i} " * 20 for i in range(20_000)]}), big_group)
    parquet_tasks = inputs.plan_read_tasks([str(big_group)], 65536)
    assert len(parquet_tasks) == 1 and parquet_tasks[0].stored_bytes > 65536


def test_a_byte_order_mark_and_a_folder_without_its_slash(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "rows.jsonl").write_bytes(bom + b'{"text": "First row."}\n{"text": "Second row."}\n')
    (tmp_path / "doc.txt").write_bytes(bom + b"The first document.\n\nThe second one.\n")
    # before: the jsonl's first row was counted as a parse error, the text began with U+FEFF
    assert [text for _, text in documents(read_all(str(tmp_path / "rows.jsonl")))] == ["First row.", "Second row."]
    assert [text for _, text in documents(read_all(str(tmp_path / "doc.txt")))] == ["The first document.",
                                                                                  "The second one."]
    assert not problems(read_all(str(tmp_path / "rows.jsonl")))
    tasks = inputs.plan_read_tasks([str(tmp_path)], 1 << 20)  # before: "unknown input format"
    assert sorted(t.path for t in tasks) == [str(tmp_path / "doc.txt"), str(tmp_path / "rows.jsonl")]


def test_a_folder_input_skips_its_readme_with_a_warning_but_a_named_file_is_an_error(tmp_path, caplog):
    (tmp_path / "doc.txt").write_text("The first document.\n")
    (tmp_path / "README.md").write_text("# corpus\n")
    (tmp_path / "LICENSE").write_text("CC BY-SA\n")
    with caplog.at_level("WARNING", logger="preprocessing.inputs"):
        tasks = inputs.plan_read_tasks([str(tmp_path)], 1 << 20)  # before: "README.md: unknown input format"
    assert [t.path for t in tasks] == [str(tmp_path / "doc.txt")]
    assert "2 file(s) of no input format skipped: LICENSE, README.md" in caplog.text
    for named in ([str(tmp_path / "README.md")], [str(tmp_path / "*")]):
        with pytest.raises(InputError, match="(LICENSE|README.md): unknown input format"):
            inputs.plan_read_tasks(named, 1 << 20)
    (tmp_path / "doc.txt").unlink()
    with pytest.raises(InputError, match="no file of an input format in this folder"):
        inputs.plan_read_tasks([str(tmp_path)], 1 << 20)


def test_an_output_inside_the_input_folder_is_left_out_of_the_input(tmp_path, caplog):
    """The second run of --input corpus --output corpus/out read the first's shards as input and
    stopped on their columns (and would have taken tokenizer.json for a jsonl)."""
    (tmp_path / "doc.txt").write_text("The first document.\n")
    for name in ("out/shards/part-00000-of-00001.parquet", "out/tokenizer/tokenizer.json", "outer.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    with caplog.at_level("WARNING", logger="preprocessing.inputs"):
        tasks = inputs.plan_read_tasks([str(tmp_path)], 1 << 20, output=str(tmp_path / "out"))
    assert [t.name for t in tasks] == ["doc.txt", "outer.txt"]  # a name that only begins like it stays
    assert f"2 file(s) under --output {tmp_path / 'out'} left out of the input" in caplog.text
    with pytest.raises(InputError, match=r"every file matched is under --output"):
        inputs.plan_read_tasks([str(tmp_path / "out")], 1 << 20, output=str(tmp_path / "out"))
    # an object store's folder, listed recursively, as text
    assert inputs._is_under("gs://b/corpus/out/shards/part-0.parquet", "gs://b/corpus/out/")
    assert not inputs._is_under("gs://b/corpus/outer.txt", "gs://b/corpus/out")


def test_lines_of_chinese_and_japanese_are_joined_without_a_space(tmp_path):
    # before: "他说今天的天气非常 好。", a space inside a word, read by SentencePiece as a boundary
    (tmp_path / "zh.txt").write_text("他说今天的天气非常\n好。\nThe end\nof it.\n東京は\n大きい。\n\nnext\n")
    [(_, first), (_, second)] = documents(read_all(str(tmp_path / "zh.txt")))
    assert first == "他说今天的天气非常好。 The end of it. 東京は大きい。" and second == "next"


def test_a_folder_input_reads_its_subfolders_and_skips_empty_files_with_a_warning(tmp_path, caplog):
    """A corpus split into subfolders: their files were left out without a word, and
    one empty file (a failed download) among them stopped the whole run."""
    (tmp_path / "inner" / "deep").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "a.txt").write_text("Top level.\n")
    (tmp_path / "inner" / "b.jsonl").write_text('{"text": "One level down."}\n')
    (tmp_path / "inner" / "deep" / "c.txt").write_text("Two levels down.\n")
    (tmp_path / "inner" / "empty.txt").write_text("")
    (tmp_path / "inner" / "nothing.txt.gz").write_bytes(gzip.compress(b""))  # before: read as no documents, unsaid
    (tmp_path / ".git" / "HEAD.txt").write_text("ref: refs/heads/main\n")  # hidden folders are no corpus
    with caplog.at_level("WARNING", logger="preprocessing.inputs"):
        tasks = inputs.plan_read_tasks([str(tmp_path)], 1 << 20)
    assert [t.name for t in tasks] == ["a.txt", "inner/b.jsonl", "inner/deep/c.txt"]
    assert (f"2 empty input file(s) skipped: {tmp_path / 'inner' / 'empty.txt'}, "
            f"{tmp_path / 'inner' / 'nothing.txt.gz'}") in caplog.text
    texts = [text for task in tasks for _, text in documents(inputs.read_task(task, "text", 1 << 20))]
    assert texts == ["Top level.", "One level down.", "Two levels down."]
    with pytest.raises(InputError, match=r"empty\.txt: the file is empty$"):
        inputs.plan_read_tasks([str(tmp_path / "inner" / "empty.txt")], 1 << 20)


def test_a_glob_reads_the_folders_it_matches_with_their_subfolders(tmp_path):
    """Beam's listing of a glob holds files alone: "corpus/*" left corpus/news/ out, and Spark's
    part.parquet/ folders, unsaid."""
    (tmp_path / "news" / "2024").mkdir(parents=True)
    (tmp_path / "spark.parquet").mkdir()
    (tmp_path / "a.txt").write_text("The first document.\n")
    (tmp_path / "news" / "b.jsonl").write_text('{"text": "News."}\n')
    (tmp_path / "news" / "2024" / "c.txt").write_text("Later news.\n")
    pq.write_table(pa.table({"text": ["Spark row."]}), tmp_path / "spark.parquet" / "part-0.snappy.parquet")
    tasks = inputs.plan_read_tasks([str(tmp_path / "*")], 1 << 20)
    assert sorted(os.path.relpath(t.path, tmp_path) for t in tasks) == [
        "a.txt", "news/2024/c.txt", "news/b.jsonl", "spark.parquet/part-0.snappy.parquet"]
    # folders alone (before: "no file matches")
    assert len(inputs.plan_read_tasks([str(tmp_path / "n*")], 1 << 20)) == 2
    # a folder of no corpus, an empty one, and the run's own --output among them: skipped, not errors
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "p.png").write_bytes(b"\x89PNG")
    (tmp_path / "tmp").mkdir()
    (tmp_path / "out" / "shards").mkdir(parents=True)
    (tmp_path / "out" / "shards" / "part-00000-of-00001.parquet").write_bytes(b"PAR1")
    tasks = inputs.plan_read_tasks([str(tmp_path / "*")], 1 << 20, output=str(tmp_path / "out"))
    assert len(tasks) == 4
    with pytest.raises(InputError, match=r"--input '.*/\[it\]\*': no file of an input format matches \(only "
                                         r"folders without one\)"):
        inputs.plan_read_tasks([str(tmp_path / "[it]*")], 1 << 20)


def test_a_file_name_that_is_not_utf8_is_refused_by_name(tmp_path):
    folder = os.fsencode(tmp_path / "latin1")
    os.mkdir(folder)
    with open(os.path.join(folder, b"B\xfccher.txt"), "wb") as f:  # as an old zip unpacks "Bücher.txt"
        f.write(b"Ein Satz.\n")
    # before: UnicodeEncodeError from the document hash, inside the pipeline
    with pytest.raises(InputError, match=r"latin1/B\ufffdcher\.txt: the file name is not UTF-8"):
        inputs.plan_read_tasks([str(tmp_path / "latin1")], 1 << 20)
