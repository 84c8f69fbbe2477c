"""Streaming reader for MediaWiki XML dumps (``pages-articles.xml[.bz2]``).

A dump is never held in memory: bytes are decompressed in 1 MiB chunks and each
``<page>…</page>`` is parsed on its own with ElementTree as soon as it is complete.

Splitting one big file across workers: a bzip2 file is a sequence of independent
streams, each starting with the byte-aligned header ``BZh[1-9]`` + the block magic
``0x314159265359``. Multistream dumps (``*-multistream.xml.bz2``) hold 100 pages per
stream, and files made by parallel compressors (pbzip2, lbzip2) hold one stream per
~900 kB block, so a file can be cut into byte ranges and each range read alone. The
owner of a page is the range in which the stream holding the page's ``<page>`` tag
starts; an owner reads past its range end to finish a page in progress, and the next
range skips the text before its first ``<page>``. A single-stream file (plain
``bzip2``) has one stream, so one range reads and processes it all: recompress such a
file with a parallel compressor (or use the multistream dump) to spread it across workers.
A corrupt stream loses its own pages only: reading goes on at the next stream header.

The wiki's language and namespace names (``<siteinfo>``, see ``wiki_site``) are at the
very start of a dump, in no range's pages: ``read_site`` reads them from byte 0 for
every read task, decompressing only the first stream(s) up to ``</siteinfo>`` (a
multistream dump's first stream holds the head alone, a few kB). Each ``Page`` carries
its dump's site, so that the cleaner knows ``[[Datei:…]]`` is a file link.
"""

from __future__ import annotations

import bz2
import dataclasses
import logging
import math
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import BinaryIO

from preprocessing.documents import Problem
from preprocessing.text_formats import InputError
from preprocessing.wiki_site import SiteInfoError, WikiSite, parse_siteinfo

log = logging.getLogger(__name__)

# Stream header: "BZh", block size digit, then the 48-bit block magic (pi in BCD).
BZ2_STREAM_HEADER = re.compile(rb"BZh[1-9]\x31\x41\x59\x26\x53\x59")
_READ_CHUNK = 1 << 20
# Compressed bytes given to the decompressor at a time (see _aligned_read).
_FEED_BYTES = 1 << 16
_PAGE_OPEN = b"<page>"
_PAGE_CLOSE = b"</page>"
# Redirect magic words: English (valid everywhere) and the localized ones of the wikis with
# tables here. Dumps mark redirects with <redirect title=…/> too; the text is the fallback
# for other exports.
_REDIRECT_TEXT = re.compile(r"\s*#(?:redirect|weiterleitung|重定向|redirection|redirección|redireccion|rinvia|"
                            r"redirecionamento|перенаправление|転送|リダイレクト)", re.IGNORECASE)
# The disambiguation template family ({{disambiguation}}, {{dab}}, {{hndis}}, {{geodis}},
# {{Airport disambiguation}}, …); set-index articles are prose and are kept.
_DISAMBIGUATION = re.compile(
    r"\{\{\s*(?:[^{}|]*disambig[^{}|]*|dab|disamb|hndis|geodis|numberdis|mathdab|"
    r"letter-numbercombdisambig|begriffsklärung|消歧义|消歧義|homonymie|desambiguación|desambiguacion|"
    r"disambigua|desambiguação|неоднозначность|многозначность|aimai|[^{}|]*曖昧さ回避)\s*(?:\||\}\})",
    re.IGNORECASE,
)
# Title suffixes of disambiguation pages: en, de, zh, fr, es, it, pt, ru, ja.
_DISAMBIGUATION_TITLES = ("(disambiguation)", "(Begriffsklärung)", "(消歧义)", "(消歧義)", "(homonymie)",
                          "(desambiguación)", "(disambigua)", "(desambiguação)", "(значения)",
                          "(曖昧さ回避)")
# How much of a dump's head read_site decompresses at most looking for </siteinfo>
# (real heads are 2-10 kB; one pbzip2 block is ~900 kB).
_MAX_HEAD_BYTES = 4 << 20
_SITEINFO_CLOSE = b"</siteinfo>"
_TITLE_IN_RAW = re.compile(rb"<title>([^<]{0,300})</title>")


@dataclasses.dataclass(frozen=True)
class Page:
    page_id: str
    title: str
    namespace: int
    text: str
    is_redirect: bool
    # True when invalid UTF-8 bytes were replaced with U+FFFD to keep the page.
    repaired: bool = False
    # The dump's language and namespace names (set by the readers; None: unknown).
    site: WikiSite | None = None

    @property
    def is_disambiguation(self) -> bool:
        return self.title.endswith(_DISAMBIGUATION_TITLES) or bool(_DISAMBIGUATION.search(self.text))


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_page(raw: bytes, site: WikiSite | None = None) -> Page:
    """Parses one ``<page>…</page>`` element (bytes, UTF-8) of the dump of ``site``.
    Raises ET.ParseError."""
    element = ET.fromstring(raw)
    fields: dict[str, str] = {}
    is_redirect = False
    text = ""
    for child in element.iter():
        name = _local(child.tag)
        if name in ("title", "ns") or (name == "id" and "id" not in fields):
            fields[name] = child.text or ""
        elif name == "redirect":
            is_redirect = True
        elif name == "text":
            text = child.text or ""
    is_redirect = is_redirect or bool(_REDIRECT_TEXT.match(text))
    try:
        namespace = int(fields.get("ns", "0"))
    except ValueError:
        namespace = -1
    return Page(
        page_id=fields.get("id", ""),
        title=fields.get("title", ""),
        namespace=namespace,
        text=text,
        is_redirect=is_redirect,
        site=site,
    )


def _decode_page(raw: bytes) -> tuple[bytes, bool]:
    """Returns UTF-8 bytes safe to parse, and whether invalid bytes were replaced."""
    try:
        raw.decode("utf-8")
        return raw, False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace").encode("utf-8"), True


def find_first_stream(f: BinaryIO, start: int, end: int) -> int | None:
    """Offset of the first bzip2 stream header that begins in [start, end), or None."""
    keep = len(b"BZh9") + 6 - 1  # a header straddling two reads is found next time
    f.seek(start)
    base, data = start, b""
    while base + len(data) < end + keep:
        chunk = f.read(_READ_CHUNK * 8)
        if not chunk:
            break
        tail = data[-keep:]
        base += len(data) - len(tail)
        data = tail + chunk
        match = BZ2_STREAM_HEADER.search(data)
        if match:
            offset = base + match.start()
            return offset if offset < end else None
    return None


class _Progress:
    """Logs reading progress at most every ``every`` seconds."""

    def __init__(self, label: str, every: float = 15.0):
        self.label, self.every = label, every
        self.started = self.last = time.monotonic()
        self.pages = 0
        self.bytes = 0

    def update(self, pages: int, nbytes: int) -> None:
        self.pages += pages
        self.bytes += nbytes
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            mb = self.bytes / 1e6
            log.info("%s: %d pages, %.0f MB of XML, %.1f MB/s", self.label, self.pages, mb,
                     mb / max(now - self.started, 1e-9))


def _pages_from_xml_chunks(chunks: Iterator[tuple[bool, bytes]], path: str,
                           site: WikiSite | None = None) -> Iterator[Page | Problem]:
    """Cuts decompressed XML into pages and parses each.

    ``chunks`` yields ``(foreign, data)``: ``foreign`` marks data from a stream that
    another range owns. A page whose ``<page>`` tag starts in foreign data is left to
    that range; a page begun in our data is finished with foreign data.
    """
    buffer = b""
    foreign_from = None  # buffer position where foreign data begins
    for foreign, chunk in chunks:
        if foreign and foreign_from is None:
            foreign_from = len(buffer)
        buffer += chunk
        while True:
            open_at = buffer.find(_PAGE_OPEN)
            if open_at < 0:
                # Keep a possible partial "<page>" tag at the tail; drop the rest.
                keep = len(_PAGE_OPEN) - 1
                if foreign_from is not None:
                    if foreign_from <= len(buffer) - keep:
                        return
                    foreign_from -= len(buffer) - keep
                buffer = buffer[-keep:]
                break
            if foreign_from is not None and open_at >= foreign_from:
                return
            close_at = buffer.find(_PAGE_CLOSE, open_at)
            next_open = buffer.find(_PAGE_OPEN, open_at + 1)
            if 0 <= next_open < (close_at if close_at >= 0 else len(buffer)):
                yield _problem_for(buffer[open_at:next_open], path, "malformed-pages",
                                   "has no </page> before the next <page>")
                cut = next_open
            elif close_at < 0:
                cut = open_at
                buffer, foreign_from = _cut(buffer, foreign_from, cut)
                break
            else:
                cut = close_at + len(_PAGE_CLOSE)
                yield _parse_or_problem(buffer[open_at:cut], path, site)
            buffer, foreign_from = _cut(buffer, foreign_from, cut)
    if _PAGE_OPEN in buffer and (foreign_from is None or buffer.find(_PAGE_OPEN) < foreign_from):
        yield _problem_for(buffer[buffer.find(_PAGE_OPEN):], path, "truncated-pages",
                           "ends before its </page> (truncated file?)")


def _cut(buffer: bytes, foreign_from: int | None, cut: int) -> tuple[bytes, int | None]:
    if foreign_from is not None:
        foreign_from = max(0, foreign_from - cut)
    return buffer[cut:], foreign_from


def _parse_or_problem(raw: bytes, path: str, site: WikiSite | None) -> Page | Problem:
    clean, repaired = _decode_page(raw)
    try:
        page = parse_page(clean, site)
    except ET.ParseError as err:
        return _problem_for(raw, path, "malformed-pages", f"is not well-formed XML ({err})")
    if repaired:
        log.warning("%s: page %r had invalid UTF-8; bad bytes replaced with U+FFFD", path, page.title)
        return dataclasses.replace(page, repaired=True)
    return page


def _problem_for(raw: bytes, path: str, reason: str, what: str) -> Problem:
    title = _TITLE_IN_RAW.search(raw[:4096])
    name = repr(title.group(1).decode("utf-8", "replace")) if title else "(no title)"
    return Problem(reason, f"{path}: page {name} {what}; skipped")


def read_bz2_range(f: BinaryIO, path: str, start: int, end: int, site: WikiSite | None = None
                   ) -> Iterator[Page | Problem]:
    """Pages owned by the byte range [start, end) of a bzip2 (multi)stream file, each
    with ``site`` (from ``read_site``).

    A corrupt stream loses only its own pages: reading resumes at the next stream
    header, exactly as a range starting there would (text before its first ``<page>``
    skipped), and the loss is counted under ``corrupt-bz2-streams`` with the file and
    byte offsets. Only the range that owns the corrupt stream counts it; a range that
    was reading into it to finish a page counts that page as truncated.
    """
    progress = _Progress(f"{path} [{start:,}-{end:,})")
    at = find_first_stream(f, start, end)
    while at is not None:
        damage: dict = {}  # why _bz2_chunks stopped early, and the stream at fault
        for item in _pages_from_xml_chunks(_bz2_chunks(f, path, at, end, progress, damage), path, site):
            progress.update(1, 0)
            yield item
        if damage.get("stream_at", end) >= end:
            return  # the file's end, or damage in a stream another range owns and counts
        if "truncated" in damage:
            yield Problem("truncated-streams",
                          f"{path}: {damage['truncated']}; the pages before it were kept")
            return
        stream_at = int(damage["stream_at"])
        at = find_first_stream(f, stream_at + 1, math.inf)
        lost_to = f"byte {at:,}" if at is not None else "the end of the file"
        yield Problem("corrupt-bz2-streams",
                      f"{path}: byte {stream_at:,}: corrupt bzip2 stream ({damage['corrupt']}); its pages "
                      f"were lost, from byte {stream_at:,} to {lost_to}; the pages before it were kept")
        at = at if at is not None and at < end else None


def _aligned_read(f: BinaryIO, position: int) -> bytes:
    """Reads up to the next multiple of ``_FEED_BYTES``, so that every stream is fed to
    its decompressor in the same pieces whichever range reads it: what a corrupt stream
    gives before its error is detected (a failing call gives nothing) is then the same
    for any --split-bytes, and small pieces keep most of what precedes the damage."""
    return f.read(_FEED_BYTES - position % _FEED_BYTES)


def _bz2_chunks(f: BinaryIO, path: str, first: int, end: int, progress: _Progress,
                damage: dict) -> Iterator[tuple[bool, bytes]]:
    """Decompressed ``(foreign, data)`` from the stream at ``first`` on, stream after
    stream, until the file ends or a stream is corrupt or truncated; records in
    ``damage`` why it stopped early and the offset of the stream at fault."""
    f.seek(first)
    decompressor = bz2.BZ2Decompressor()
    stream_at = consumed = first  # the stream being decompressed; file offset past the bytes fed
    data = _aligned_read(f, consumed)
    while data:
        try:
            out = decompressor.decompress(data)
        except OSError as err:
            damage.update(corrupt=f"{err}, detected by byte {consumed + len(data):,}", stream_at=stream_at)
            return
        consumed += len(data)
        if out:
            progress.update(0, len(out))
            yield stream_at >= end, out
        if decompressor.eof:
            data = decompressor.unused_data
            stream_at = consumed - len(data)
            if len(data) < 4:
                data += _aligned_read(f, consumed)
            if not data:
                return
            if not data.startswith(b"BZh"):
                log.warning("%s: %d bytes after the last bzip2 stream are not bzip2; ignored",
                            path, len(data))
                return
            consumed = stream_at
            decompressor = bz2.BZ2Decompressor()
        else:
            data = _aligned_read(f, consumed)
    if not decompressor.eof:
        damage.update(truncated=f"the bzip2 stream at byte {stream_at:,} ends early (truncated file?)",
                      stream_at=stream_at)


def read_xml(f: BinaryIO, path: str, site: WikiSite | None = None) -> Iterator[Page | Problem]:
    """Pages of an uncompressed XML dump, streamed from where ``f`` is, each with ``site``."""
    progress = _Progress(path)

    def chunks() -> Iterator[bytes]:
        while data := f.read(_READ_CHUNK):
            progress.update(0, len(data))
            yield False, data

    yield from _pages_from_xml_chunks(chunks(), path, site)


# ---------------------------------------------------------------------------- site info
def read_site(f: BinaryIO, path: str) -> WikiSite:
    """The site (language, namespace names) of the dump ``f``, from its head.

    Always reads from byte 0, whatever range the caller reads next (it must seek),
    and at most ``_MAX_HEAD_BYTES`` of XML. A bzip2 file (told by its magic, not its
    name) is decompressed stream after stream until ``</siteinfo>``; what cannot be
    decompressed ends the head there. A head without a siteinfo (hand-made files,
    exports of single pages) gives English canonical names, the language from
    ``xml:lang`` if there is one. Raises InputError, naming the file, when the
    siteinfo is there but is not well-formed XML.
    """
    head = dump_head(f, path)
    try:
        return parse_siteinfo(head)
    except SiteInfoError as err:
        raise InputError(f"{path}: {err}") from err


def dump_head(f: BinaryIO, path: str) -> bytes:
    """The XML at the start of ``f`` (bzip2 or not, told by its magic), up to ``</siteinfo>``
    or the first ``<page>``; from byte 0, whatever the caller reads next."""
    f.seek(0)
    first = f.read(3)
    f.seek(0)
    return _bz2_head(f, path) if first == b"BZh" else _xml_head(f)


def is_dump_head(head: bytes) -> bool:
    """Whether a head (``dump_head``) is a MediaWiki export's."""
    return b"<mediawiki" in head or _PAGE_OPEN in head


def _xml_head(f: BinaryIO) -> bytes:
    head = b""
    while len(head) < _MAX_HEAD_BYTES and _SITEINFO_CLOSE not in head and _PAGE_OPEN not in head:
        chunk = f.read(_FEED_BYTES)
        if not chunk:
            break
        head += chunk
    return head


def _bz2_head(f: BinaryIO, path: str) -> bytes:
    """Decompressed bytes from the file's start until ``</siteinfo>`` (or the first
    ``<page>``: no siteinfo), the size limit, the file's end or bad data."""
    decompressor = bz2.BZ2Decompressor()
    head, data = b"", b""
    while len(head) < _MAX_HEAD_BYTES and _SITEINFO_CLOSE not in head and _PAGE_OPEN not in head:
        if decompressor.eof:  # next stream (a multistream head may span a few)
            data = decompressor.unused_data
            if data and not data.startswith(b"BZh"[:len(data)]):
                break
            decompressor = bz2.BZ2Decompressor()
        if not data:
            data = f.read(_FEED_BYTES)
            if not data:
                break
        try:
            head += decompressor.decompress(data, _MAX_HEAD_BYTES)
        except OSError as err:
            log.warning("%s: the dump's head does not decompress (%s); reading its site info "
                        "from the %d bytes before", path, err, len(head))
            break
        data = b""
        if not decompressor.needs_input and not decompressor.eof:
            break  # over the limit: _MAX_HEAD_BYTES came out of this one feed
    return head
