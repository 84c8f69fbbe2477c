"""What the cleaner needs to know about the wiki a dump comes from.

A MediaWiki dump begins with the wiki's description, before the first page::

    <mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" ... xml:lang="de">
      <siteinfo>
        <sitename>Wikipedia</sitename> <dbname>dewiki</dbname> ...
        <namespaces>
          <namespace key="6" case="first-letter">Datei</namespace>
          <namespace key="14" case="first-letter">Kategorie</namespace> ...

``parse_siteinfo`` turns that head into a ``WikiSite``: the language, the namespace
names by key, and what ``wikitext.clean_wikitext`` drops for that language.

Decisions:

* Link prefixes to drop (``[[Datei:x.jpg|mini|…]]``, ``[[Kategorie:Foo]]``) are the
  dump's own names of namespaces 6 (File), 14 (Category) and -2 (Media), plus the
  canonical English names, which every wiki accepts, plus a small per-language table of
  aliases. The table is needed because dumps list one name per namespace only: dewiki's
  old ``Bild:`` and zhwiki's ``文件:``/``分类:`` are aliases that no dump lists (zhwiki's
  dump even lists the English names, and its editors write the Chinese ones).
* Non-prose section titles ("Einzelnachweise", "参考文献") come from a small table per
  language (de, zh, fr, es, it, pt, ru, ja: the headings their manuals of style prescribe); the English table is always included, as English headings are common on
  other wikis (copied articles, bilingual editors). A language not in the tables gets
  the English behaviour, which is what it got before this module existed.
* ``variant`` is the script kept from LanguageConverter markup (``-{zh-hans:…;
  zh-hant:…}-``). zh defaults to zh-cn (simplified, mainland usage), then zh-hans, zh;
  a rule set with none of them shows its first text (see ``variants``).
* A missing ``xml:lang`` means English: it is what dumps without it (very old exports,
  hand-made files) hold in practice, and it keeps the cleaner's historical behaviour.

A ``WikiSite`` is small, immutable and picklable: it travels with each page through
the pipeline (``Page.site``, ``RawDocument.site``).
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping

__all__ = ["WikiSite", "parse_siteinfo", "site_for", "ENGLISH", "SiteInfoError"]

# Namespace keys whose links are not prose: File, Category, Media.
FILE, CATEGORY, MEDIA = 6, 14, -2
_DROPPED_KEYS = (FILE, CATEGORY, MEDIA)
# Canonical names, valid on every wiki whatever its language ("Image" is File's old name).
_CANONICAL_PREFIXES = frozenset({"file", "image", "category", "media"})
_CANONICAL_NAMES = {MEDIA: "Media", FILE: "File", CATEGORY: "Category"}

# Aliases that dumps do not list (MediaWiki's Messages*.php namespace aliases and the
# wikis' $wgNamespaceAliases), lowercased.
_PREFIX_ALIASES: dict[str, frozenset[str]] = {
    "de": frozenset({"bild", "image", "datei", "kategorie", "medium"}),
    "zh": frozenset({"图像", "圖像", "文件", "檔案", "档案", "分類", "分类", "媒体", "媒體",
                     "媒体文件", "image", "file", "category", "media"}),
    "fr": frozenset({"image", "fichier", "catégorie", "média"}),
    "es": frozenset({"imagen", "archivo", "categoría", "medio"}),
    "it": frozenset({"immagine", "file", "categoria"}),
    "pt": frozenset({"imagem", "ficheiro", "arquivo", "categoria", "multimédia"}),
    "ru": frozenset({"изображение", "файл", "категория", "медиа"}),
    "ja": frozenset({"画像", "ファイル", "カテゴリ", "メディア"}),
}

# Sections that are lists of sources or links, not prose (lowercased titles).
_NON_PROSE_SECTIONS: dict[str, frozenset[str]] = {
    "en": frozenset({
        "references", "external links", "see also", "further reading", "notes", "bibliography",
        "sources", "citations", "footnotes",
    }),
    "de": frozenset({
        "einzelnachweise", "weblinks", "literatur", "siehe auch", "anmerkungen", "quellen",
        "belege", "fußnoten", "referenzen", "weiterführende literatur", "quellenangaben",
    }),
    "zh": frozenset({
        "参考文献", "參考文獻", "参考资料", "參考資料", "参考来源", "參考來源", "来源", "來源",
        "资料来源", "資料來源", "外部链接", "外部連結", "外部鏈接", "外部連接", "参见", "參見",
        "参看", "參看", "相关条目", "相關條目", "注释", "註釋", "注解", "註解", "脚注", "腳註",
        "延伸阅读", "延伸閱讀", "扩展阅读", "擴展閱讀", "参考书目", "參考書目",
    }),
    "fr": frozenset({
        "notes et références", "références", "notes", "liens externes", "lien externe", "voir aussi",
        "bibliographie", "articles connexes", "sources", "annexes",
    }),
    "es": frozenset({
        "referencias", "notas", "enlaces externos", "véase también", "bibliografía", "fuentes",
        "bibliografía adicional",
    }),
    "it": frozenset({
        "note", "bibliografia", "voci correlate", "collegamenti esterni", "altri progetti", "fonti",
        "riferimenti",
    }),
    "pt": frozenset({
        "referências", "notas", "ligações externas", "links externos", "ver também", "bibliografia",
        "leitura adicional", "fontes",
    }),
    "ru": frozenset({
        "примечания", "ссылки", "литература", "см. также", "источники", "комментарии", "сноски",
    }),
    "ja": frozenset({
        "脚注", "注釈", "出典", "参考文献", "外部リンク", "関連項目", "参考資料", "関連文献",
    }),
}
# Words and marks joining section names ("Notes and references", "Literatur und
# Weblinks", "注释与参考文献"); the English ones always apply.
_SECTION_JOINERS: dict[str, frozenset[str]] = {
    "en": frozenset({",", "&", "and"}),
    "de": frozenset({"und"}),
    "zh": frozenset({"与", "與", "及", "和", "、", "，"}),
    "fr": frozenset({"et"}),
    "es": frozenset({"y"}),
    "it": frozenset({"e"}),
    "pt": frozenset({"e"}),
    "ru": frozenset({"и"}),
    "ja": frozenset({"・", "、"}),
}

# Default conversion variant, and each variant's fallbacks, as MediaWiki's zh converter
# orders them (ZhConverter::getFallbacks): a Hong Kong reader of a rule that names only zh-cn
# and zh-tw sees the zh-tw text, not the mainland one.
_DEFAULT_VARIANT = {"zh": "zh-cn"}
_VARIANT_FALLBACKS: dict[str, tuple[str, ...]] = {
    "zh-hans": ("zh-cn", "zh-sg", "zh-my"), "zh-hant": ("zh-tw", "zh-hk", "zh-mo"),
    "zh-cn": ("zh-hans", "zh-sg", "zh-my"), "zh-sg": ("zh-hans", "zh-cn", "zh-my"),
    "zh-my": ("zh-hans", "zh-sg", "zh-cn"), "zh-tw": ("zh-hant", "zh-hk", "zh-mo"),
    "zh-hk": ("zh-hant", "zh-mo", "zh-tw"), "zh-mo": ("zh-hant", "zh-hk", "zh-tw"),
}


class SiteInfoError(ValueError):
    """A dump head whose ``<siteinfo>`` is not well-formed XML."""


@dataclasses.dataclass(frozen=True)
class WikiSite:
    """One wiki's language and the names the cleaner drops; see the module docstring.

    ``namespaces`` maps namespace keys to the dump's names (``{6: "Datei", …}``);
    it is left out of the hash (a dict is not hashable) but not out of equality.
    """

    language: str = "en"
    namespaces: Mapping[int, str] = dataclasses.field(default_factory=dict, hash=False)
    link_prefixes: frozenset[str] = _CANONICAL_PREFIXES
    non_prose_sections: frozenset[str] = _NON_PROSE_SECTIONS["en"]
    section_joiners: frozenset[str] = _SECTION_JOINERS["en"]
    variant: str = ""

    @property
    def variants(self) -> tuple[str, ...]:
        """The conversion variants to show, best first: ``variant``, its script
        (zh-hans/zh-hant), the bare language. Empty: show a rule set's first text."""
        if not self.variant:
            return ()
        chain = (self.variant, *_VARIANT_FALLBACKS.get(self.variant, ()), self.language)
        return tuple(dict.fromkeys(chain))

    @property
    def converts(self) -> bool:
        """Whether ``-{…}-`` is LanguageConverter markup here. Only on wikis with a
        converter; elsewhere MediaWiki shows it as text, and so do we."""
        return self.language in _CONVERTER_LANGUAGES

    @property
    def full_width_punctuation(self) -> bool:
        """Whether prose uses full-width punctuation (，。（）), to be tidied like ASCII."""
        return self.language in _FULL_WIDTH_LANGUAGES


# Wikis whose content language has a LanguageConverter (MediaWiki's languages/ dir).
_CONVERTER_LANGUAGES = frozenset({
    "zh", "gan", "wuu", "sr", "sh", "kk", "ku", "tg", "uz", "shi", "crh", "iu", "ban", "tly",
})
_FULL_WIDTH_LANGUAGES = frozenset({"zh", "ja", "gan", "wuu", "yue", "zh-yue", "lzh", "zh-classical"})


def site_for(language: str, namespaces: Mapping[int, str] | None = None,
             variant: str | None = None) -> WikiSite:
    """The site of a wiki in ``language`` with these namespace names; the language's
    tables (aliases, sections, joiners, default variant) filled in."""
    language = language.strip().lower() or "en"
    namespaces = dict(namespaces or {})
    base = language.split("-")[0]  # "zh-classical" uses zh's tables where it has none
    prefixes = {namespaces[k].lower() for k in _DROPPED_KEYS if namespaces.get(k)}
    prefixes |= _CANONICAL_PREFIXES | _PREFIX_ALIASES.get(language, _PREFIX_ALIASES.get(base, frozenset()))
    sections = _NON_PROSE_SECTIONS["en"] | _NON_PROSE_SECTIONS.get(
        language, _NON_PROSE_SECTIONS.get(base, frozenset()))
    joiners = _SECTION_JOINERS["en"] | _SECTION_JOINERS.get(
        language, _SECTION_JOINERS.get(base, frozenset()))
    if variant is None:
        variant = _DEFAULT_VARIANT.get(language, "")
    return WikiSite(language=language, namespaces=namespaces, link_prefixes=frozenset(prefixes),
                    non_prose_sections=sections, section_joiners=joiners, variant=variant)


# The site of text with no dump header: English, canonical names only. Cleaning with it
# gives exactly what ``clean_wikitext(text)`` gives.
ENGLISH = site_for("en", _CANONICAL_NAMES)

_ROOT_TAG = re.compile(rb"<mediawiki\b[^>]*>")
_XML_LANG = re.compile(rb"""\sxml:lang\s*=\s*["']([^"']*)["']""")
_SITEINFO = re.compile(rb"<siteinfo\b.*?</siteinfo\s*>", re.S)


def declared_language(header: bytes) -> str | None:
    """The ``xml:lang`` of a dump head's ``<mediawiki …>`` tag; None when it has none."""
    root = _ROOT_TAG.search(header)
    lang = _XML_LANG.search(root[0]) if root else None
    return lang[1].decode("utf-8", "replace") if lang else None


def parse_siteinfo(header: bytes) -> WikiSite:
    """The site described by a dump's head: the ``<mediawiki …>`` start tag and the
    ``<siteinfo>`` block (UTF-8 bytes; what follows them is ignored). A head without a
    siteinfo gives the language's tables with canonical names; no ``xml:lang``, English.
    Raises ``SiteInfoError`` when the siteinfo block is not well-formed XML."""
    language = declared_language(header) or "en"
    block = _SITEINFO.search(header)
    if not block:
        return site_for(language, _CANONICAL_NAMES)
    try:
        siteinfo = ET.fromstring(block[0])
    except ET.ParseError as err:
        raise SiteInfoError(f"<siteinfo> is not well-formed XML ({err})") from err
    return site_for(language, _namespace_names(siteinfo))


def _namespace_names(siteinfo: ET.Element) -> dict[int, str]:
    names = {}
    for element in siteinfo.iter():
        if element.tag.rsplit("}", 1)[-1] != "namespace":
            continue
        try:
            key = int(element.get("key", ""))
        except ValueError:
            continue  # a key that is no number names nothing a page can be in
        names[key] = (element.text or "").strip()
    return names
