"""Markup cleaning: each construct on a small snippet, malformed input, and the real samples."""

import bz2
import random
import re
import time
import xml.etree.ElementTree as ET

import pytest

from preprocessing.wikitext import clean_wikitext

from .conftest import TABLE_SAMPLE, WIKI_SAMPLE

NS = "{http://www.mediawiki.org/xml/export-0.10/}"


# ---------------------------------------------------------------------------- constructs
@pytest.mark.parametrize("wikitext, prose", [
    # templates, nested, multi-line, parser functions
    ("A {{a|{{b|{{c}}}}|d}} B.", "A B."),
    ("{{Infobox person\n| name = X\n| born = {{birth date|1900|1|1}}\n}}\n'''X''' was a man.",
     "X was a man."),
    ("{{#if: x | y | z }}Parser function.", "Parser function."),
    # internal links, link trail, pipe trick, leading colon
    ("The [[cat]]s sat on [[mat|the mat]].", "The cats sat on the mat."),
    ("[[Foo (bar)|]], [[Paris, Texas|]] and [[Help:Contents|]].", "Foo, Paris and Contents."),
    ("[[:Category:Foo|the category]] and [[wikt:foo|foo]].", "the category and foo."),
    # files and images, with links nested in the caption; categories; interlanguage
    ("[[File:A.jpg|thumb|200px|A caption with [[nested|links]] and [[more]].]]Text after.",
     "Text after."),
    ("[[Image:B.png|left|[[File:c.png]] cap]] Prose.", "Prose."),
    ("Prose.\n[[Category:Foo]]\n[[category : Bar| ]]\n[[de:Anarchismus]]", "Prose."),
    # references, both forms
    ('Fact.<ref>Cite {{cite web|url=x}}</ref> More<ref name="a"/> text<ref name=b />.',
     "Fact. More text."),
    ('A<ref group="n" name="x">multi\nline [[ref]]</ref> b.', "A b."),
    # tables, nested, indented
    ("Before.\n{| class=wikitable\n|-\n| a || b\n|-\n|\n{|\n| inner\n|}\n|}\nAfter.",
     "Before.\nAfter."),
    (":{| \n| indented table\n|}\nAfter.", "After."),
    # comments
    ("Hi <!-- hidden [[x]] {{y}} --> there.", "Hi there."),
    # headings are dropped, their sections' prose kept
    ("== History ==\nProse one.\n=== Sub ===\nProse two.", "Prose one.\nProse two."),
    # entities
    ("5&nbsp;km &ndash; A &amp; B &lt;x&gt; &#233;", "5 km – A & B <x> é"),
    # external links
    ("See [http://x.org the site], [https://y.org/a?b=c] and [//z.org z].", "See the site, and z."),
    # bold and italic
    ("'''Bold''' and ''italic'' and '''''both'''''.", "Bold and italic and both."),
    # magic words, list and indent markers, horizontal rules
    ("__TOC__\nText.__NOTOC__", "Text."),
    ("__KEIN_INHALTSVERZEICHNIS__Text. __无目录__ __БЕЗ_ОГЛАВЛЕНИЯ__Call __init__.", "Text. Call __init__."),
    ("* item one\n# item two\n:: indented\n----\nEnd.", "item one\nitem two\nindented\nEnd."),
    # HTML: formatting tags keep their text, some elements go whole, nowiki is text
    ("A <b>bold</b> H<sub>2</sub>O <span style='x'>span</span> end.", "A bold H2O span end."),
    ("x <math>a^{b}}}</math> y <gallery>\nFile:a.jpg|cap\n</gallery> z", "x y z"),
    ("<pre>{{x}}</pre>a <syntaxhighlight lang=py>x=1</syntaxhighlight>b <score>c</score>"
     "<timeline>t</timeline><source>s</source><imagemap>i</imagemap>.", "a b."),
    ("<nowiki>{{not a template}} [[x]]</nowiki> and [[a]]<nowiki/>s", "{{not a template}} [[x]] and as"),
    ("Line<br>break<br />here.", "Line break here."),
    # spacing left by removals
    ("Word ( ) word () word ({{IPA|x}}; {{lang|y}}) word {{x}}, done {{y}}.",
     "Word word word word, done."),
    ("(born 1950{{x}}, ) and ({{y}}, aged 3)", "(born 1950) and (aged 3)"),
    ("Uses .NET {{x}}.", "Uses .NET."),
    ("  Spaced\t\tout  \n\n\n  text  ", "Spaced out\ntext"),
    # lines with no letters or digits are dropped
    ("Prose.\n* {{flag}}\n: —\nMore.", "Prose.\nMore."),
])
def test_construct(wikitext, prose):
    assert clean_wikitext(wikitext) == prose


def test_non_prose_sections_are_dropped_up_to_the_next_heading_of_their_level():
    wikitext = (
        "Intro.\n== See also ==\n* [[Foo]]\n=== Sub ===\n* bar\n"
        "== Later ==\nKept prose.\n"
        "=== Notes ===\nnote\n=== Kept sub ===\nAlso kept.\n"
        "== Notes and references ==\n{{reflist}}\n"
        "== External links ==\n* [http://x.org Site]\n"
        "== Further reading ==\n* A book\n"
    )
    assert clean_wikitext(wikitext) == "Intro.\nKept prose.\nAlso kept."


def test_heading_with_markup_is_recognised():
    assert clean_wikitext("Body.\n== {{anchor|r}}[[References]] ==\n* cite\n") == "Body."


# ---------------------------------------------------------------------------- malformed input
@pytest.mark.parametrize("wikitext, prose", [
    ("Unclosed {{template on this line\nNext line prose.", "Unclosed\nNext line prose."),
    ("{{Infobox\n| name = X\n| a = {{b}}\nX is a thing.", "X is a thing."),
    ("Unclosed [[link text\nNext.", "Unclosed link text\nNext."),
    ("Stray }} and ]] here.", "Stray and here."),
    ("{|\n| cell {{unclosed\n|}\nAfter table.", "After table."),
    ("{{a|\n{|\n| x\n}}\nAfter.", "After."),
    ("Text <!-- never closed\nhidden", "Text"),
    ("A <ref>never closed. B.", "A never closed. B."),
    ("=== not closed\n=\nText.", "Text."),
])
def test_malformed_input_recovers(wikitext, prose):
    assert clean_wikitext(wikitext) == prose


@pytest.mark.parametrize("unit", [
    "{{", "[[", "}}", "]]", "{{\n", "[[x\n", "\n{|", "<ref>", "<!--", "<nowiki>", "[http://",
    "[[a|", "=\n", "=", "<", "(", "'", "&", "[[File:",
])
def test_pathological_input_is_linear(unit):
    """Each is ~200k characters; the cleaner runs ~1 µs/char at worst on such input."""
    text = unit * (200_000 // len(unit))
    start = time.perf_counter()
    clean_wikitext(text)
    assert time.perf_counter() - start < 1.0


def test_random_markup_never_raises():
    pieces = ["{{", "}}", "[[", "]]", "\n{|", "\n|}", "|", "<ref>", "</ref>", "<ref name=a/>",
              "<!--", "-->", "<nowiki>", "</nowiki>", "'''", "''", "\n== a ==\n", "\n", " ",
              "&amp;", "(", ")", ",", "[http://x ", "]", "[[File:", "[[a|", "__TOC__", "\n*",
              "word", "é", "\xa0", "<b>", "<math>", "</math>", "{{#if:", "=", "[[:", "|]]"]
    rng = random.Random(1234)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 300)))
        out = clean_wikitext(text)
        assert "\n\n" not in out and out == out.strip()
        assert all(line == line.strip() and line for line in out.split("\n") if out)


# ---------------------------------------------------------------------------- real samples
def load_articles(path):
    """(title, wikitext) of the articles (namespace 0, not redirects) of a dump file."""
    articles = []
    with bz2.open(path, "rb") as f:
        for _, element in ET.iterparse(f):
            if element.tag != NS + "page":
                continue
            if element.findtext(NS + "ns") == "0" and element.find(NS + "redirect") is None:
                articles.append((element.findtext(NS + "title"),
                                 element.findtext(f"{NS}revision/{NS}text") or ""))
            element.clear()
    return articles


@pytest.fixture(scope="module")
def cleaned():
    """{sample path: {title: cleaned prose}} for both bundled samples."""
    return {path: {title: clean_wikitext(text) for title, text in load_articles(path)}
            for path in (WIKI_SAMPLE, TABLE_SAMPLE)}


LEFTOVER_MARKUP = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{\||<ref|'''|^=|^\|", re.M | re.I)


def test_real_articles_have_no_markup_left(cleaned):
    assert [len(articles) for articles in cleaned.values()] == [106, 5]
    for articles in cleaned.values():
        for title, prose in articles.items():
            leftover = LEFTOVER_MARKUP.search(prose)
            assert not leftover, (title, prose[max(0, leftover.start() - 80):leftover.end() + 80])
            assert prose, title


def test_real_articles_keep_their_prose(cleaned):
    big, tables = cleaned[WIKI_SAMPLE], cleaned[TABLE_SAMPLE]
    anarchism = big["Anarchism"]
    assert anarchism.startswith(  # hatnote templates before the lead are gone
        "Anarchism is a political philosophy that advocates self-governed societies based on "
        "voluntary institutions. These are often described as stateless societies, although "
        "several authors have defined them more specifically as institutions based on "
        "non-hierarchical free associations. Anarchism considers the state to be undesirable, "
        "unnecessary, and harmful.")
    assert ("The first political philosopher to call himself an anarchist was Pierre-Joseph "
            "Proudhon, marking the formal birth of anarchism in the mid-nineteenth century."
            in anarchism)
    assert ("The Port of Mobile, Alabama's only saltwater port, is a large seaport on the Gulf of "
            "Mexico with inland waterway access to the Midwest by way of the "
            "Tennessee-Tombigbee Waterway." in big["Alabama"])
    assert ("Estonian economy is an advanced economy and a member of the European Union and of "
            "the eurozone." in tables["Economy of Estonia"])
    # reference text, Further reading and External links items, table cells: all gone
    assert "Encyclopedia of Philosophy" not in anarchism
    assert "Bastards of Utopia" not in anarchism
    assert "Daily Bleed" not in anarchism
    assert "Tallink Grupp" not in tables["Economy of Estonia"]
    assert "Most Awards" not in tables["Academy Award for Best Production Design"]


def test_real_sample_cleaned_size(cleaned):
    """5.73 MB of wikitext in the big sample clean to 2.77 MB of prose (UTF-8)."""
    size = sum(len(prose.encode("utf-8")) for prose in cleaned[WIKI_SAMPLE].values())
    assert 2.5e6 < size < 3.1e6
