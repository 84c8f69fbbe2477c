"""Wikipedia dumps in other languages: the site info of a dump (wiki_site, read from
byte 0 by every read task), and cleaning German and Chinese wikitext with it.

The fixtures are hand-built in the format of the real dewiki and zhwiki dumps; see
tests/data/wiki/README.md for what they hold.
"""

import bz2
import dataclasses
import html
import os
import pickle
import random
import time

import pytest

from preprocessing import inputs, wiki_dump
from preprocessing.text_formats import InputError
from preprocessing.wiki_site import ENGLISH, WikiSite, parse_siteinfo, site_for
from preprocessing.wikitext import clean_wikitext

from .conftest import REPO, WIKI_SAMPLE, split_dump

DATA = os.path.join(REPO, "tests", "data", "wiki")
DEWIKI = os.path.join(DATA, "dewiki-sample-pages-articles.xml")
ZHWIKI = os.path.join(DATA, "zhwiki-sample-pages-articles.xml")
ZH = site_for("zh")


def read_pages(path, split_bytes=64 << 20):
    """Pages of every read task of ``path``, and the number of tasks; no problems allowed."""
    tasks = inputs.plan_read_tasks([path], split_bytes)
    items = [item for task in tasks for item in inputs.read_task(task, "text", 1 << 20)]
    assert all(isinstance(item, wiki_dump.Page) for item in items), items
    return items, tasks


def articles(path):
    """{title: (page, cleaned prose)} of the articles (namespace 0, not redirects)."""
    pages, _ = read_pages(path)
    return {p.title: (p, clean_wikitext(p.text, p.site)) for p in pages
            if p.namespace == 0 and not p.is_redirect}


def multistream_copy(path, tmp_path):
    """``path`` re-compressed as Wikipedia's *-multistream.xml.bz2: the head in its own
    stream, then one page per stream, then the closing tag."""
    with open(path, "rb") as f:
        header, pages, footer = split_dump(f.read())
    out = tmp_path / (os.path.basename(path) + ".multistream.xml.bz2")
    out.write_bytes(b"".join(bz2.compress(part) for part in [header, *pages, footer]))
    return str(out)


# ---------------------------------------------------------------------------- site info
@pytest.mark.parametrize("path, language, names, prefixes", [
    (DEWIKI, "de", {-2: "Medium", 6: "Datei", 10: "Vorlage", 14: "Kategorie", 828: "Modul"},
     {"datei", "kategorie", "medium", "bild", "file", "image", "category", "media"}),
    # zhwiki's dump lists the English names; the Chinese ones are aliases from the table.
    (ZHWIKI, "zh", {-2: "Media", 6: "File", 10: "Template", 14: "Category", 828: "Module"},
     {"file", "category", "media", "image", "文件", "檔案", "图像", "圖像", "分类", "分類"}),
])
def test_siteinfo_of_the_dump_head(path, language, names, prefixes):
    with open(path, "rb") as f:
        site = wiki_dump.read_site(f, path)
    assert site.language == language
    assert {key: site.namespaces[key] for key in names} == names
    assert len(site.namespaces) > 25  # the full real list, Diskussion/talk namespaces included
    assert prefixes <= site.link_prefixes
    assert "vorlage" not in site.link_prefixes and "template" not in site.link_prefixes
    assert "references" in site.non_prose_sections  # English titles always apply


def test_site_tables_and_defaults():
    de = site_for("de")
    assert {"einzelnachweise", "weblinks", "literatur", "siehe auch"} <= de.non_prose_sections
    assert {"参考文献", "外部链接", "参见", "注释"} <= ZH.non_prose_sections
    assert (ZH.variant, ZH.variants) == ("zh-cn", ("zh-cn", "zh-hans", "zh-sg", "zh-my", "zh"))
    assert dataclasses.replace(ZH, variant="zh-tw").variants == ("zh-tw", "zh-hant", "zh-hk", "zh-mo", "zh")
    from preprocessing.transforms import _site_for

    for code in ("zh-TW", "zh_TW", "zh-Hant-TW"):  # before: zh_TW and zh-Hant-TW kept zh-cn
        assert _site_for(ZH, code).variant == "zh-tw", code
    assert de.variant == "" and de.variants == () and not de.converts and ZH.converts
    # no xml:lang: English; no siteinfo: canonical names
    site = parse_siteinfo(b'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">\n  <page>')
    assert site.language == "en" and site.link_prefixes == ENGLISH.link_prefixes
    assert parse_siteinfo(b"").language == "en"


def test_site_of_the_real_english_sample_cleans_like_no_site(wiki_xml):
    pages, _ = read_pages(WIKI_SAMPLE)
    site = pages[0].site
    assert site.language == "en" and site.namespaces[14] == "Category"
    assert site.link_prefixes == ENGLISH.link_prefixes
    assert site.non_prose_sections == ENGLISH.non_prose_sections
    checked = 0
    for page in pages:
        if page.namespace == 0 and not page.is_redirect:
            expected = clean_wikitext(page.text)
            assert clean_wikitext(page.text, site) == expected, page.title
            assert clean_wikitext(page.text, ENGLISH) == expected, page.title
            checked += 1
    assert checked == 106


def test_english_site_is_no_site_on_random_markup():
    pieces = ["{{", "}}", "[[", "]]", "\n{|", "\n|}", "|", "<ref>", "</ref>", "'''", "\n== a ==\n",
              "\n== Notes and references ==\n", "\n", " ", "&amp;", "(", ")", ",", "[[File:", "[[Datei:",
              "[[a|", "-{", "}-", "zh-hans:", ";", "（", "）", "，", "。", "[]", "word", "词", "：", "\u3000"]
    rng = random.Random(99)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 200)))
        assert clean_wikitext(text, ENGLISH) == clean_wikitext(text)


def test_malformed_siteinfo_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "broken-pages-articles.xml"
    path.write_bytes(b'<mediawiki xml:lang="de">\n  <siteinfo><namespaces><namespace key="6">Datei'
                     b"</namespaces></siteinfo>\n  <page><title>A</title></page>\n</mediawiki>\n")
    with open(path, "rb") as f, pytest.raises(InputError, match="broken-pages-articles.xml"):
        wiki_dump.read_site(f, str(path))


def test_pages_carry_their_site_and_pickle():
    pages, _ = read_pages(DEWIKI)
    assert {p.site.language for p in pages} == {"de"}
    page = pickle.loads(pickle.dumps(pages[0]))
    assert page == pages[0] and page.site.namespaces[6] == "Datei"
    assert hash(page.site) == hash(pages[0].site)


# ---------------------------------------------------------------------------- reading
@pytest.mark.parametrize("path, titles", [
    (DEWIKI, [("Berlin", 0, False), ("Bundeshauptstadt Berlin", 0, True), ("Brandenburger Tor", 0, False),
              ("Berlin (Begriffsklärung)", 0, False), ("Kategorie:Berlin", 14, False),
              ("Vorlage:Infobox Gemeinde in Deutschland", 10, False)]),
    (ZHWIKI, [("长城", 0, False), ("萬里長城", 0, True), ("Great Wall", 0, True), ("计算机", 0, False),
              ("长城 (消歧义)", 0, False), ("Category:长城", 14, False), ("Template:NoteTA", 10, False)]),
])
def test_fixture_pages_namespaces_and_redirects(path, titles):
    pages, tasks = read_pages(path)
    assert len(tasks) == 1  # plain XML: one task
    assert [(p.title, p.namespace, p.is_redirect) for p in pages] == titles
    disambiguation = [p.title for p in pages if p.is_disambiguation]
    assert disambiguation == [t for t, _, _ in titles if "(Begriffsklärung)" in t or "(消歧义)" in t]


@pytest.mark.parametrize("path, language", [(DEWIKI, "de"), (ZHWIKI, "zh")])
def test_bz2_read_tasks_starting_mid_file_find_the_site_from_byte_0(path, language, tmp_path):
    whole, _ = read_pages(path)
    dump = multistream_copy(path, tmp_path)
    pages, tasks = read_pages(dump, split_bytes=1500)
    assert len(tasks) > 3 and tasks[-1].start > 0
    assert [p.title for p in pages] == [p.title for p in whole]
    assert all(p.site == whole[0].site and p.site.language == language for p in pages)
    # A task alone, far from the head, still gets it.
    last = list(inputs.read_task(tasks[-1], "text", 1 << 20))
    assert last and all(p.site.language == language for p in last)


def test_head_split_across_bz2_streams_is_found(tmp_path):
    """pbzip2-style output: streams cut at arbitrary bytes, the siteinfo spans several."""
    data = open(ZHWIKI, "rb").read()
    path = tmp_path / "zhwiki-parallel.xml.bz2"
    path.write_bytes(b"".join(bz2.compress(data[i:i + 700]) for i in range(0, len(data), 700)))
    with open(path, "rb") as f:
        site = wiki_dump.read_site(f, str(path))
    assert site.language == "zh" and site.namespaces[2600] == "Topic"
    pages, _ = read_pages(str(path), split_bytes=2000)
    assert {p.site.language for p in pages} == {"zh"} and len(pages) == 7


class CountingFile:
    """A file that counts the bytes read from it."""

    def __init__(self, f):
        self.f, self.read_bytes = f, 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.read_bytes += len(data)
        return data

    def seek(self, *args):
        return self.f.seek(*args)


def test_read_site_reads_only_the_head(tmp_path):
    big = tmp_path / "dewiki-big.xml"
    with open(DEWIKI, "rb") as f:
        header, pages, footer = split_dump(f.read())
    big.write_bytes(header + b"".join(pages) * 200 + footer)  # ~2 MB
    for path in (str(big), multistream_copy(str(big), tmp_path)):
        with open(path, "rb") as f:
            counting = CountingFile(f)
            assert wiki_dump.read_site(counting, path).language == "de"
        assert counting.read_bytes <= 70_000, path


def test_corrupt_head_stream_falls_back_to_english_and_keeps_the_pages(tmp_path, caplog):
    dump = multistream_copy(DEWIKI, tmp_path)
    data = bytearray(open(dump, "rb").read())
    data[200:210] = b"\x00" * 10  # inside the head's stream
    bad = tmp_path / "dewiki-corrupt-head.xml.bz2"
    bad.write_bytes(bytes(data))
    with open(bad, "rb") as f:
        site = wiki_dump.read_site(f, str(bad))
    assert site.language == "en"
    assert "dewiki-corrupt-head.xml.bz2" in caplog.text
    tasks = inputs.plan_read_tasks([str(bad)], 64 << 20)
    pages = [i for t in tasks for i in inputs.read_task(t, "text", 1 << 20) if isinstance(i, wiki_dump.Page)]
    assert len(pages) == 6


@pytest.mark.parametrize("text, redirect", [
    ("#WEITERLEITUNG [[Berlin]]", True), ("#weiterleitung[[Berlin]]", True), ("#重定向 [[长城]]", True),
    ("#REDIRECTION [[Paris]]", True), ("#REDIRECCIÓN [[Madrid]]", True), ("#RINVIA [[Roma]]", True),
    ("#REDIRECIONAMENTO [[Lisboa]]", True), ("#перенаправление [[Москва]]", True), ("#転送 [[東京]]", True),
    ("La redirection est cassée.", False),
    ("  #REDIRECT [[长城]]", True), ("Die Weiterleitung ist kaputt.", False), ("重定向是一个词。", False),
])
def test_localized_redirect_words(text, redirect):
    """Without the dump's <redirect/> element, the text alone tells."""
    raw = f"<page><title>T</title><ns>0</ns><id>1</id><revision><text>{text}</text></revision></page>"
    assert wiki_dump.parse_page(raw.encode()).is_redirect is redirect


# ---------------------------------------------------------------------------- German
def test_german_articles_keep_prose_and_lose_markup():
    got = articles(DEWIKI)
    berlin, tor = got["Berlin"][1], got["Brandenburger Tor"][1]
    assert berlin.startswith(
        "Berlin ist die Bundeshauptstadt der Bundesrepublik Deutschland und als Stadtstaat eines "
        "ihrer Länder. Mit rund 3,8 Millionen Einwohnern ist Berlin die bevölkerungsreichste")
    assert ("Die erste urkundliche Erwähnung der Doppelstadt Berlin-Cölln stammt aus dem "
            "13. Jahrhundert." in berlin)
    assert "Berlin liegt in der gemäßigten Klimazone;" in berlin
    assert tor.startswith("Das Brandenburger Tor in Berlin ist ein frühklassizistisches Triumphtor, "
                          "das an der Westseite des Pariser Platzes im Ortsteil Mitte steht.")
    assert tor.endswith("Heute gilt es als Symbol der Deutschen Einheit.")
    for prose in (berlin, tor):
        for gone in ("Kategorie", "Datei", "Bild:", "mini", "hochkant", "Am Abend", "Regierungsviertel",
                     "[]", "Einzelnachweise", "Weblinks", "Ribbe", "Hauptstadtportal", "Gedenkstätte",
                     "Demps", "Friedrichstraße", "Liste der Orte", "1.888.848", "{{", "[[", "<ref", "=="):
            assert gone not in prose, gone


def test_german_text_without_its_site_keeps_the_links_it_should_drop():
    page, _ = articles(DEWIKI)["Berlin"]
    assert "Kategorie:Hauptstadt in Europa" in clean_wikitext(page.text)
    assert "Einzelnachweise" not in clean_wikitext(page.text)  # the heading line goes anyway
    assert "Ribbe" in clean_wikitext(page.text)  # but not the section


# ---------------------------------------------------------------------------- Chinese
def test_chinese_articles_keep_prose_and_lose_markup():
    got = articles(ZHWIKI)
    wall, computer = got["长城"][1], got["计算机"][1]
    assert wall.startswith("长城，又称万里长城，是中国古代的军事防御工事，由一道道连续性的城墙及烽火台组成。"
                           "长城东起河北省山海关，西至甘肃省嘉峪关，全长约两万一千公里。")
    assert "形成了“万里长城”。今天所见的长城大多建于明朝。" in wall
    assert "1987年，长城被联合国教育、科学及文化组织列为世界遗产。由于风化和人为破坏，部分城墙已经坍塌。" in wall
    assert computer.startswith("电子计算机，简称计算机或电脑，是利用数字电子技术，")
    assert "第一台通用电子计算机ENIAC于1946年在美国建成。早期的软件多用汇编语言编写，" in computer
    assert "后来出现了C++等高级语言和UNIX等操作系统。" in computer
    assert "计算机的主要部件包括中央处理器、内存和输入输出设备，它们通过总线连接。" in computer
    assert "在台湾，计算机一词较少使用。" in computer
    for prose in (wall, computer):
        for gone in ("-{", "}-", "zh-", "長城", "兩萬", "記憶體", "軟體", "電腦", "計算機", "thumb", "慕田峪",
                     "八达岭", "真空管", "分类", "分類", "Category", "File", "长城列表", "联合国教科文组织：长城",
                     "Patterson", "也称外围设备", "（", "）", "，，", " 。", "。 ", "{{", "[[", "==", "<ref"):
            assert gone not in prose, gone


@pytest.mark.parametrize("wikitext, prose", [
    ("-{zh-hans:计算机; zh-hant:計算機;}-", "计算机"),
    ("-{zh-cn:电脑;zh-tw:電腦;zh-hk:電腦}-", "电脑"),
    ("-{zh-tw:電腦;zh-hans:电脑}-", "电脑"),  # zh-cn missing: zh-hans
    ("-{zh-tw:電腦;zh-hk:電腦}-", "電腦"),  # none of the chain: the first
    ("-{zh:計算機;zh-tw:電腦}-", "計算機"),
    ("-{UNIX}-与-{Windows: 微软}-", "UNIX与Windows: 微软"),  # no variant rule: the text
    ("前-{H|zh-cn:软件;zh-tw:軟體;}-后", "前后"),
    ("前-{-|zh-cn:软件;zh-tw:軟體;}-后", "前后"),
    ("前-{D|zh-cn:软件;zh-tw:軟體;}-后", "前后"),
    ("前-{T|zh-cn:标题;zh-tw:標題}-后", "前后"),
    ("-{A|zh-cn:内存;zh-tw:記憶體}-", "内存"),
    ("-{R|zh-cn:原样}-", "zh-cn:原样"),
    ("-{zh-hans;zh-hant|文字}-", "文字"),
    ("-{计算机=>zh-tw:電腦;}-", "计算机"),
    ("-{计算机=>zh-cn:电脑;}-", "电脑"),
    ("-{zh-hans:甲=>乙;zh-hant:丙}-", "甲=>乙"),  # "=>" after the first ":" is text
    ("-{a|文字}-", "文字"),  # unknown (lowercase) flags are ignored, as in MediaWiki
    ("-{zh-cn:A&amp;B;zh-tw:C}-", "A&B"),  # ";" of an entity splits nothing
    ("-{zh-hans:[[计算机]];zh-hant:[[計算機|電腦]]}-", "计算机"),
    ("a-{zh-hans:-{b}-;zh-hant:c}-d", "abd"),  # nested
    ("未闭合-{zh-hans:x", "未闭合zh-hans:x"),
])
def test_conversion_markup(wikitext, prose):
    assert clean_wikitext(wikitext, ZH) == prose


@pytest.mark.parametrize("variant, prose", [
    ("zh-cn", "计算机"), ("zh-hans", "计算机"), ("zh-tw", "電腦"), ("zh-hk", "計算機"), ("zh-sg", "计算机"),
])
def test_variant_choice(variant, prose):
    site = dataclasses.replace(ZH, variant=variant)
    assert clean_wikitext("-{zh-hans:计算机;zh-hant:計算機;zh-tw:電腦}-", site) == prose


@pytest.mark.parametrize("variant, prose", [
    # MediaWiki's fallbacks: a rule naming regions alone is shown in the nearest one of the same script
    ("zh-hk", "印表機"), ("zh-hant", "印表機"), ("zh-mo", "印表機"), ("zh-sg", "打印机"), ("zh-hans", "打印机"),
])
def test_a_variant_falls_back_to_a_region_of_its_own_script(variant, prose):
    site = dataclasses.replace(ZH, variant=variant)
    assert clean_wikitext("-{zh-cn:打印机; zh-tw:印表機}-", site) == prose


def test_conversion_markup_is_text_on_wikis_without_a_converter():
    assert clean_wikitext("Ein -{Test}- hier.", site_for("de")) == "Ein -{Test}- hier."


@pytest.mark.parametrize("wikitext, prose", [
    ("长城（{{lang-en|Great Wall}}）是", "长城是"),
    ("电子计算机（{{lang-en|Computer}}；{{lang|ja|コンピュータ}}）简称", "电子计算机简称"),
    ("北京（{{lang-en|Beijing}}，{{IPA|x}}，首都）", "北京（首都）"),
    ("中国，{{efn|x}}，首都", "中国，首都"),
    ("建成{{Citation needed}} 。 后来 ， 又", "建成。后来，又"),
    ("遗产，{{r|a}}。", "遗产。"),
    ("甲、 乙（ {{x}}，丙 ）", "甲、乙（丙）"),
])
def test_full_width_punctuation_left_by_templates(wikitext, prose):
    assert clean_wikitext(wikitext, ZH) == prose


@pytest.mark.parametrize("site, heading", [
    (site_for("de"), "Literatur und Weblinks"), (site_for("de"), "Quellen"), (site_for("de"), "Siehe auch:"),
    (ZH, "注释与参考文献"), (ZH, "外部連結"), (ZH, "参考资料"), (ZH, "参见："),
    (ZH, "-{zh-hans:参考文献;zh-hant:參考文獻}-"), (ZH, "References"),
    # The other tables: the headings their manuals of style prescribe, joined by their "and".
    (site_for("fr"), "Notes et références"), (site_for("fr"), "Liens externes"), (site_for("fr"), "Articles connexes"),
    (site_for("es"), "Referencias"), (site_for("es"), "Véase también"), (site_for("es"), "Notas y referencias"),
    (site_for("it"), "Note"), (site_for("it"), "Voci correlate"), (site_for("it"), "Collegamenti esterni"),
    (site_for("pt"), "Referências"), (site_for("pt"), "Ligações externas"), (site_for("pt"), "Ver também"),
    (site_for("ru"), "Примечания"), (site_for("ru"), "Литература и ссылки"), (site_for("ru"), "См. также"),
    (site_for("ja"), "脚注"), (site_for("ja"), "関連項目"), (site_for("ja"), "脚注・出典"),
])
def test_non_prose_sections_by_language(site, heading):
    wikitext = f"Prosa.\n== {heading} ==\n* Liste 列表\n=== Unter ===\nmehr\n== Nachher ==\nBleibt 保留."
    assert clean_wikitext(wikitext, site) == "Prosa.\nBleibt 保留."


@pytest.mark.parametrize("site, heading", [
    # Prose sections whose titles hold a joiner or a non-prose word: kept ("и" is a word, not a
    # letter inside one; "Note" is Italian for notes, not French).
    (site_for("ru"), "История и культура"), (site_for("ru"), "Биография"), (site_for("fr"), "Note biographique"),
    (site_for("es"), "Historia y sociedad"), (site_for("ja"), "歴史・文化"), (site_for("fr"), "Histoire"),
])
def test_prose_sections_stay_in_every_language(site, heading):
    wikitext = f"Prosa.\n== {heading} ==\nBleibt 保留."
    assert clean_wikitext(wikitext, site) == "Prosa.\nBleibt 保留."


@pytest.mark.parametrize("title, text", [
    ("Mercure", "'''Mercure''' peut désigner :\n* [[Mercure (planète)]]\n{{Homonymie}}"),
    ("Mercurio (desambiguación)", "'''Mercurio''' puede referirse a:\n* [[Mercurio (planeta)]]"),
    ("Mercurio", "'''Mercurio''' può riferirsi a:\n* [[Mercurio (astronomia)]]\n{{disambigua}}"),
    ("Mercúrio", "'''Mercúrio''' pode referir-se a:\n{{Desambiguação}}"),
    ("Меркурий", "'''Меркурий''' может означать:\n* [[Меркурий (планета)]]\n{{неоднозначность}}"),
    ("Меркурий (значения)", "'''Меркурий''' может означать:"),
    ("水星 (曖昧さ回避)", "'''水星'''"), ("水星", "'''水星'''\n{{Aimai}}"), ("マーキュリー", "{{人名の曖昧さ回避}}"),
    ("Mercure", "'''Mercure''' est une planète. {{Article détaillé|Mercure (planète)}}"),
])
def test_disambiguation_pages_of_the_other_tables(title, text):
    raw = (f"<page><title>{title}</title><ns>0</ns><id>1</id><revision><text>"
           f"{html.escape(text, quote=False)}</text></revision></page>")
    assert wiki_dump.parse_page(raw.encode()).is_disambiguation is ("Article détaillé" not in text)


# ---------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("unit", [
    "-{", "}-", "-{a", "-{zh-hans:", ";zh-hans:", "=>zh-cn-aa", "-{H|", "-{-{", "-{a}-", "|", "（", "，",
    " ，", "（，", "，）", "[", "== 参考文献 ==\n",
])
def test_pathological_input_is_linear_with_a_site(unit):
    """~200k characters each; also inside one conversion span (its rules are parsed)."""
    for text in (unit * (200_000 // len(unit)), "-{" + unit * (200_000 // len(unit)) + "}-"):
        start = time.perf_counter()
        clean_wikitext(text, ZH)
        clean_wikitext(text, site_for("de"))
        assert time.perf_counter() - start < 1.0, unit


def test_random_markup_never_raises_with_a_site():
    pieces = ["-{", "}-", "zh-hans:", "zh-tw:", ";", "|", "H|", "=>", "R|", "{{", "}}", "[[", "]]",
              "[[分类:", "[[Datei:", "（", "）", "，", "。", "、", " ", "\n", "\n== 参考文献 ==\n", "词", "[]"]
    rng = random.Random(4321)
    for site in (ZH, site_for("de")):
        for _ in range(300):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 300)))
            out = clean_wikitext(text, site)
            assert "\n\n" not in out and out == out.strip()


def test_a_site_is_a_plain_value():
    assert isinstance(ZH, WikiSite) and ZH == site_for("zh") and hash(ZH) == hash(site_for("zh"))
