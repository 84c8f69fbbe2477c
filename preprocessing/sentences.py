"""Sentence splitting for English, German and Chinese/Japanese: one compiled regex pass,
no model, no dependencies.

``split_sentences(text, language="en")`` takes prose whose "\\n" separates paragraphs and
returns its sentences, stripped, in order. ``language`` is any language code:
``rules_for(language)`` names the rules it gets, one of ``LANGUAGES``: "zh" for Chinese
and Japanese in any variant (zh, zh-cn, zh-tw, zh-hans, yue, lzh, ja, ...), "de" for
German (de, de-CH, ...), "en" for every other language (its rules split any language
written with spaces after its full stops).

English first. A sentence ends at ``.``, ``!``, ``?`` or ``…`` (or a run of them), then
optional closing quotes/brackets, then whitespace, when what follows can start a
sentence: an uppercase letter (any cased script), a digit, an opening quote/bracket, or a
letter of an uncased script (CJK, Arabic, Hebrew, ...). A "\\n" always ends a sentence.
The regex finds candidates; a single ``.`` is then checked in Python against the word
before it: abbreviations (Mr., Dr., St., Jan., e.g., U.S.), single-letter initials
(J. R. R. Tolkien), number prefixes followed by a digit (No. 5, pp. 12, Fig. 3).
Decimals (3.14) and ellipses before a lowercase word never split.

Beyond the plain rule, two things the bundled corpora need:

* Plain-text novels end sentences with a dash and no space ("consciousness.--Miss
  Taylor married."): ``--`` or an em dash after a terminator counts as the whitespace
  and starts the next sentence. ``_`` (plain-text italics, "_She_ would") may open a
  sentence or close one.
* Abbreviations that can also end a sentence (Inc., Ltd., Co., Corp., Jr., Sr., etc.,
  U.S., U.K., a.m., p.m.) split when the next word is one that starts sentences (The,
  He, It, ...): "He joined Apple Inc. The company grew." is two sentences, "Apple Inc.
  Reports" and "the U.S. Army" are not split. Titles (Mr., Dr., Gen., St.) never split.

Why this and not a library. Measured with ``python benchmarks/sentence_splitter.py``
on Jane Austen's six novels (4.00 MB, 10,293 paragraphs, one call per paragraph as the
pipeline's text reader makes them) on a 2-core x86 VM (Xeon), Python 3.11, one core:

================  =======  ================================================================
splitter          MB/s     why not
================  =======  ================================================================
this module       ~80      (~86 MB/s as one call on the whole text)
pysbd 0.3.4       0.31     pure-Python rule cascade, ~250x slower. Austen is 5.6 bytes a
                           word, so 100k tokens/s needs at most ~0.56 MB/s: pysbd alone
                           would take 1.8 cores; this module takes under 1% of one.
blingfire 0.1.8   19       a binary wheel with a compiled model: 4x slower here, a native
                           dependency per platform, and its rules cannot be changed.
NLTK punkt        --       needs ``nltk.download("punkt")`` at run time; workers may be
                           offline, so the pipeline cannot rely on it.
================  =======  ================================================================

Agreement with pysbd, as the fraction of pysbd's sentences that come out identical: 77.9%
of 20,344 over the whole corpus (blingfire: 73.2%), because pysbd never splits between
double quotes and so keeps each of Austen's speeches whole (this module finds 33,085
sentences, blingfire 32,483). On the 3,798 paragraphs without a double quote: 97.1% of
pysbd's 10,495 (blingfire: 91.9%). Of the 306 others, half are dash boundaries ("!--We",
".--Miss") that pysbd splits only sometimes; most of the rest are boundaries pysbd misses
or its splits after "--Mr." (benchmark ``--show-diffs N`` prints them).

German ("de") is the English machinery with German tables:

* abbreviations that never end a sentence (z. B., d. h., ca., vgl., Nr., Dr., Prof., Hr.,
  Fr., St., geb., gest., evtl., ggf., inkl., sog., bzw., month names: Jan., Febr., ...),
  also when written with a space: the short dotted tokens before a dot are joined, so
  "z. B." is looked up as "z.b"; any single letter with a dot is an initial or part of
  one ("J. S. Bach", the "z" of "z. B."). Number prefixes (Abs., Art., Bd., Kap.) only
  before a digit.
* ordinals: a dot after a number of 1-3 digits ("am 3. Oktober 1990", "im 19.
  Jahrhundert", "1. FC Köln", "der 100. Geburtstag") and regnal numbers ("Friedrich II.")
  end a sentence only before a German sentence opener (Der, Die, Das, Er, Sie, Es, Im,
  Am, Als, Nach, ...), as do the abbreviations that can end one (usw., etc., u. a.,
  u. a. m., o. Ä., Jh., Jhd., Mio., Mrd., v. Chr.): "im 19. Jh. Die Stadt" splits,
  "im 19. Jh. erstmals" and "u. a. Sitz" do not. "1990." is a year and ends a sentence.
* German quotes open and close sentences: „…“ ‚…‘ »…« «…» (and English-style “…”).

Chinese and Japanese ("zh") write no space after a sentence. A sentence ends at a run of
"。", "！", "？", "；", "…"/"……" (or "⋯⋯"), ASCII "!" and "?", with the closing
quotes/brackets after it (」』”’）】〕 ...), no whitespace needed. "；" counts as a sentence
end as in Chinese BERT preprocessing practice (a clause of its own, and it keeps long
enumerations from becoming one 500-character "sentence"). As in that practice (and as
the English rules do with 'He said "Stop. Go now."'), a stop inside a quotation ends a
sentence and the closer stays with it: "他说：“你好。”然后走了。" is "他说：“你好。”" and
"然后走了。". Not before "，", "、", ":" ("他喊“好！”，然后走了。" is one sentence), nor
before the Japanese quotative particle after a closer ("「本当？」と聞いた"), nor inside a
book title ("《你好！世界》"). ASCII "!"/"?" before a lowercase word are English inside a
sentence ("Yahoo! is"). An ASCII "." takes the English rule, whitespace then a sentence
start (a CJK character counts), with the English abbreviations for embedded English
("他在U.S. Army工作", "J. K. Rowling"): never in 3.14 or example.com; "..." right before a
CJK character is an ellipsis.

Speed, measured on the benchmark's VM in CPU time (the VM was shared; English on Austen
gave 47 MB/s then, against ~80 in the table below), one call per paragraph: German prose
dense with abbreviations and ordinals (``GERMAN`` in tests/test_sentences.py, 38 dots in
1.4 KB) ~9 MB/s, Chinese (``CHINESE`` repeated to 1 MB) ~18 MB/s: Python work per candidate,
not the regex scan, sets both, and both are far above what a tokenizer consumes.

Left out: with the English rules, CJK full stops with no space after them ("。"); with
the CJK rules, an ASCII "." with no space between two Chinese sentences ("走了.然后"),
full-width "．" (also a decimal point in "３．１４"); numbered-list items inside a
paragraph ("1. First"); spaced ellipses (". . . I" splits); in German, a sentence that
ends with an ordinal-like number before a word that is no opener ("Er wurde 3. Berlin
gewann." stays one); and lowercase letters beyond the Basic Multilingual Plane (treated
as capitals).
"""

from __future__ import annotations

import functools
import re
import sys

__all__ = ["LANGUAGES", "rules_for", "split_sentences"]

# The codes with rules of their own; ``rules_for`` maps any language code to one of them.
LANGUAGES = ("en", "de", "zh")

# Titles and other abbreviations that never end a sentence here (lowercased, no dot).
_ABBREVIATIONS = frozenset("""
    mr mrs ms messrs mme mlle dr prof rev hon gov sen rep gen brig col maj capt cmdr lt
    lieut sgt cpl pvt supt
    adm st mt ft vs cf viz al approx dept est ave blvd e.g i.e wm geo chas thos jas
    jan feb mar apr jun jul aug sep sept oct nov dec
""".split())
# Abbreviations that often end a sentence: split before a typical sentence opener.
_FINAL_ABBREVIATIONS = frozenset("inc ltd co corp jr sr esq bros etc".split())
# Number prefixes: only an abbreviation before a digit ("No. 5", but "I said no. Then").
_NUMBER_ABBREVIATIONS = frozenset("no nos vol vols pp p fig figs ch sec art op ca c".split())
# Words that start sentences and rarely follow "Inc." / "U.S." inside one.
_SENTENCE_OPENER = re.compile(r"(?:%s)\b" % "|".join("""
    The A An This That These Those There Then Thus It Its He His Him She Her They Their
    We Our I My You Your In On At As If When While After Before But And However
""".split()))

_CLOSERS = "\"'”’»)\\]_"
_OPENERS = "\"'“‘«„(\\[¿¡_"
_DASH = "--|—"


def _lowercase_class() -> str:
    """A regex class of every lowercase letter in the Basic Multilingual Plane (~6 ms
    to build; lowercase letters beyond it, e.g. Deseret, are treated as uppercase)."""
    lows = [c for c in range(0x10000) if chr(c).islower()]
    ranges, first, last = [], lows[0], lows[0]
    for c in lows[1:] + [-1]:
        if c == last + 1:
            last = c
            continue
        ranges.append(re.escape(chr(first)) + ("-" + re.escape(chr(last)) if last > first else ""))
        first = last = c
    return "[" + "".join(ranges) + "]"


# A plausible sentence start: a letter or digit that is not lowercase (so uppercase,
# digits, and uncased scripts), or an opening quote/bracket; after a dash only the former,
# as in Austen '?--"' closes a quotation.
_START_WORD = rf"(?!{_lowercase_class()})[^\W_]"


# Full stops and question marks of other scripts written with spaces between sentences: Arabic
# and Persian ؟, Urdu ۔, Devanagari । ॥, Armenian ։, Ethiopic ። ፧, Burmese ။ (Greek's question
# mark is ";", U+037E normalising to it). Without them a paragraph was one "sentence" there.
_OTHER_STOPS = "\u061f\u06d4\u0964\u0965\u0589\u1362\u1367\u104b"


def _boundary(closers: str, openers: str) -> re.Pattern:
    """The candidate boundaries of a language written with spaces between sentences."""
    start = rf"(?:[{re.escape(openers)}]|{_START_WORD})"
    # The first item is a plain character class on purpose: CPython's regex engine then
    # skips ahead with a C-level scan for [\n.!?…] (~220 MB/s on Austen), while a leading
    # alternation "\n|[.!?…]+" scans at ~60 MB/s.
    return re.compile(rf"""
        [\n.!?…{_OTHER_STOPS}] (?<![.!?…{_OTHER_STOPS}].)  # only from the start of a run: "!!!!a"
        (?:                                           # would otherwise take quadratic time
            (?<=\n)                                   # a paragraph break: always a boundary
          | (?P<stops>[.!?…{_OTHER_STOPS}]*)          # the rest of a run such as "?!" or "..."
            (?P<closers>[{re.escape(closers)}]*)      # ." ?' .) ]
            (?: [^\S\n]+ (?= (?:{_DASH})? {start} )   # whitespace
              | (?= (?:{_DASH}) {_START_WORD} ) )      # or Austen's ".--Miss"
        )""", re.X)


_BOUNDARY = _boundary(_CLOSERS, _OPENERS)

_DOTTED = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")  # U.S  e.g  a.m  H.M.S (before the last dot)
_WORD_WINDOW = 24  # characters looked back for the word before a dot; longer ones are no abbreviation
_DASHES = re.compile("[-—]")


def _word_continues(word: str, text: str, next_start: int) -> bool:
    """English: True when ``word`` followed by "." is an abbreviation or initial that
    does not end the sentence; ``next_start`` is where the next sentence would begin."""
    lower = word.lower()
    if lower in _ABBREVIATIONS or (lower in _NUMBER_ABBREVIATIONS and text[next_start].isdigit()):
        return True
    if len(word) == 1:
        # An initial ("J. R. R. Tolkien"), but "as well as I. We" ends a sentence:
        # "I" is an initial only before another initial ("I. M. Pei").
        return word.isupper() and (word != "I" or text.startswith(".", next_start + 1))
    if lower in _FINAL_ABBREVIATIONS or _DOTTED.fullmatch(word):
        return not _SENTENCE_OPENER.match(text, next_start)
    return False


def _dot_continues(text: str, dot: int, next_start: int) -> bool:
    """True when the "." at ``dot`` ends an abbreviation or initial, not a sentence;
    ``next_start`` is where the next sentence would begin."""
    if dot == 0 or text[dot - 1].isspace():
        return False
    word = text[max(0, dot - _WORD_WINDOW):dot].rsplit(None, 1)[-1]
    if "-" in word or "—" in word:  # "cheerful--Mr. Weston"
        word = _DASHES.split(word)[-1]
    return _word_continues(word.lstrip(_OPENERS), text, next_start)


def _split(text: str, boundary: re.Pattern, dot_continues) -> list[str]:
    sentences = []
    append = sentences.append
    start = 0
    for m in boundary.finditer(text):
        end = m.start()
        if text[end] == "\n":
            piece = text[start:end].strip()
            start = end + 1
        else:
            # A lone "." followed by no closing quote/bracket may be an abbreviation.
            if not m.group("stops") and text[end] == "." and not m.group("closers").strip("_") \
                    and dot_continues(text, end, m.end()):
                continue
            piece = text[start:m.end("closers")].strip()
            start = m.end()
        if piece:
            append(piece)
    piece = text[start:].strip()
    if piece:
        append(piece)
    return sentences


# ---------------------------------------------------------------------------- German
# German abbreviations, lowercased, inner spaces removed ("z. B." is "z.b"), no final dot.
# Never a sentence end: they stand before what they qualify.
_DE_ABBREVIATIONS = frozenset("""
    z.b d.h v.a z.t u.u i.d.r m.e o.g i.a i.v z.zt z.hd
    ca vgl nr dr prof hr hrn fr frl st geb gest evtl ggf inkl sog bzw bzgl bspw zzgl
    ehem eigtl einschl gegr insb insbes sen jun dt engl frz franz lat griech ital hl
    jan jän febr feb mrz apr jun jul aug sep sept okt nov dez mo di mi do sa co lt
""".split())
# Often at the end of a sentence: split before a German sentence opener ("im 19. Jh. Die
# Stadt wuchs", "Äpfel, Birnen usw. Er aß").
_DE_FINAL_ABBREVIATIONS = frozenset("""
    usw etc u.a u.a.m u.ä o.ä u.v.m s.o s.u v.chr n.chr jh jhd jhdt mio mrd tsd ebd
    hrsg aufl str ff
""".split())
# Only before a digit ("Abs. 2", "Art. 5", but "eine neue Art. Sie").
_DE_NUMBER_ABBREVIATIONS = frozenset("abs art bd bde kap abb tab anm ziff sp".split())
# Words that start German sentences, also after an opening quote ("usw. „Die Stadt ...").
_DE_SENTENCE_OPENER = re.compile(r"[„»«\"']?(?:%s)\b" % "|".join("""
    Der Die Das Dem Den Des Ein Eine Einen Einem Einer Er Sie Es Wir Ich Ihr Man Im In Am
    An Auf Aus Als Nach Vor Bei Mit Seit Von Zu Zum Zur Um Unter Über Während Bis Dies
    Diese Dieser Dieses Dort Da Dann Danach Damit Doch Aber Und Auch So Heute Hier Nun
    Jedoch Zudem Außerdem Später Seine Sein Seinen Seiner Ihre Wie Wenn Obwohl Nachdem
""".split()))
# German quotes: „…“ and ‚…‘, and »…« (or «…» in Switzerland); “ and ‘ also open
# English-style quotations, so the marks that can do both are in both sets.
_DE_CLOSERS = "\"'“”‘’»«)\\]_"
_DE_OPENERS = "\"'„‚“‘»«(\\[¿¡_"
_DE_BOUNDARY = _boundary(_DE_CLOSERS, _DE_OPENERS)
_ORDINAL = re.compile(r"\d{1,3}")  # "am 3. Oktober", "im 19. Jahrhundert", "1. FC Köln"
_ROMAN = re.compile(r"[IVX]+")     # "Friedrich II. von Preußen"
_SHORT_DOTTED = re.compile(r"[^\W\d_]{1,4}\.")  # "z." "u." "v." "Chr." of a spaced abbreviation


def _de_dot_continues(text: str, dot: int, next_start: int) -> bool:
    """``_dot_continues`` for German: its abbreviations, also those written with a space
    ("z. B.", "u. a. m."), and ordinals ("am 3. Oktober")."""
    if dot == 0 or text[dot - 1].isspace():
        return False
    tokens = text[max(0, dot - _WORD_WINDOW):dot].split()
    word = tokens[-1]
    if "-" in word or "—" in word:
        word = _DASHES.split(word)[-1]
    word = word.lstrip(_DE_OPENERS)
    # "z. B" / "u. a. m": join up to three short dotted tokens before the word, longest first.
    first = len(tokens) - 1
    while first > max(0, len(tokens) - 4) and _SHORT_DOTTED.fullmatch(tokens[first - 1]):
        first -= 1
    for i in range(first, len(tokens) - 1):
        key = "".join(tokens[i:-1]).lstrip(_DE_OPENERS).lower() + word.lower()
        if key in _DE_ABBREVIATIONS:
            return True
        if key in _DE_FINAL_ABBREVIATIONS:
            return not _DE_SENTENCE_OPENER.match(text, next_start)
    lower = word.lower()
    if lower in _DE_ABBREVIATIONS or (lower in _DE_NUMBER_ABBREVIATIONS and text[next_start].isdigit()):
        return True
    # Ordinals and regnal numbers end a sentence only before an opener ("Er wurde 3. Im
    # Finale ..."); "1990." is a year and ends it.
    if lower in _DE_FINAL_ABBREVIATIONS or _ORDINAL.fullmatch(word) or _ROMAN.fullmatch(word) \
            or _DOTTED.fullmatch(word):
        return not _DE_SENTENCE_OPENER.match(text, next_start)
    # An initial ("J. S. Bach"), or the first letter of "z. B.", "d. h.", "u. a.".
    return len(word) == 1 and word.isalpha()


# ---------------------------------------------------------------------------- CJK
# Chinese and Japanese put no space after a sentence: a run of "。", "！", "？", "；",
# "…" (or "⋯"), ASCII "!" and "?" ends one, with the closing quotes/brackets after it.
_CJK_STOPS = "。！？；｡…⋯"
_CJK_CLOSERS = "」』”’）】〕〗〙〛］｝﹂﹄〞〟｣\"')]"  # not 》〉: see _in_title
_CJK_OPENERS = "「『“‘（《【〔〈〖〘〚［｛﹁﹃〝｢" + _OPENERS
# Ideographs, kana, CJK punctuation and full-width forms: where a word of mixed text
# begins ("他去了Mr. Smith家" looks back only to "Mr").
_CJK_CHARS = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef" \
             "\U00020000-\U0003134f"
# A candidate is a "\n", or a whole run of stops (ASCII "." included) with the closers
# after it, taken atomically (the lookahead-and-backreference idiom; Python 3.10 has no
# possessive quantifiers): no backtracking into a run, and no second try from inside
# one, so a long run costs linear time. Python then decides what the run is.
_CJK_BOUNDARY = re.compile(rf"""
    [\n{_CJK_STOPS}!?.]
    (?: (?<=\n)
      | (?= (?P<run> [{_CJK_STOPS}!?.]* [{re.escape(_CJK_CLOSERS)}]* ) ) (?P=run) )
    """, re.X)
_CJK_STOP_SET = frozenset(_CJK_STOPS)
# After an ASCII "." (or "..."): the English rule, whitespace then a sentence start.
_CJK_AFTER_DOT = re.compile(rf"[^\S\n]+(?:{_DASH})?(?:[{re.escape(_CJK_OPENERS)}]|{_START_WORD})")
_CJK_START = re.compile(rf"[{_CJK_CHARS}]")
_CJK_WORD = re.compile(rf"[^\s{_CJK_CHARS}]*\Z")
_CONTINUES = frozenset("，、,：:")  # "“好！”，他说。" is one sentence
_SPACES = re.compile(r"[^\S\n]*")
_TITLE_WINDOW = 40  # characters; titles are short


def _in_title(text: str, run_start: int, end: int) -> bool:
    """Whether a stop is inside a book title, "《你好！世界》", "《谁？》": a "《" open before
    it and a "》" after it, both within ``_TITLE_WINDOW`` characters (so a stray "《" costs
    little). "》" is no closer for that reason: it ends a title, not a sentence."""
    opened = text.rfind("《", max(0, run_start - _TITLE_WINDOW), run_start)
    return opened >= 0 and text.find("》", opened, run_start) < 0 \
        and text.find("》", end, end + _TITLE_WINDOW) >= 0


def _cjk_boundary(text: str, m: re.Match) -> bool:
    """Whether the run of stops and closers that ``m`` matched ends a sentence."""
    run_start, end = m.start(), m.end()
    stops = text[run_start:end].rstrip(_CJK_CLOSERS)
    next_start = _SPACES.match(text, end).end()
    following = text[next_start] if next_start < len(text) else ""
    if not _CJK_STOP_SET.isdisjoint(stops):
        # 。！？；… end a sentence with no space after them; a quotation closed before
        # the Japanese quotative particle ("「本当？」と聞いた", "」って") goes on.
        quoted = len(stops) < end - run_start
        return following not in _CONTINUES and not (quoted and following and following in "とっ") \
            and not _in_title(text, run_start, end)
    if stops.strip("."):
        # ASCII "!" or "?": not before a lowercase word, English inside a sentence ("Yahoo! is").
        return following not in _CONTINUES and not following.islower() \
            and not _in_title(text, run_start, end)
    # ASCII dots: never in 3.14 or example.com; a sentence ends before whitespace and a
    # start (uppercase, digit, opener, CJK), or at "..." right before CJK.
    if not _CJK_AFTER_DOT.match(text, end):
        return len(stops) >= 3 and bool(_CJK_START.match(text, end))
    if len(stops) == 1 and end - run_start == 1 and run_start > 0 and not text[run_start - 1].isspace():
        # A lone "." may end an English abbreviation or initial in mixed text ("U.S. Army").
        word = _CJK_WORD.search(text, max(0, run_start - _WORD_WINDOW), run_start).group()
        if "-" in word or "—" in word:
            word = _DASHES.split(word)[-1]
        word = word.lstrip(_OPENERS)
        return not (word and _word_continues(word, text, next_start))
    return True


def _split_cjk(text: str) -> list[str]:
    sentences = []
    append = sentences.append
    start = 0
    for m in _CJK_BOUNDARY.finditer(text):
        if text[m.start()] == "\n" or _cjk_boundary(text, m):
            piece = text[start:m.end()].strip()
            start = m.end()
            if piece:
                append(piece)
    piece = text[start:].strip()
    if piece:
        append(piece)
    return sentences


# ---------------------------------------------------------------------------- languages
# Chinese in Han characters and Japanese, by ISO 639-1/-2/-3 code (Wikipedia's zh-yue,
# zh-classical, ... by their "zh" prefix); Korean writes spaces and ASCII stops, so the
# English rules serve it.
_CJK_CODES = frozenset("zh zho chi cmn yue wuu gan hsn lzh ja jpn".split())
_GERMAN_CODES = frozenset("de deu ger gsw bar".split())
# BCP 47 and Wikipedia's codes ("zh-classical", "roa-tara"), "_" or "-" between parts.
_LANGUAGE_CODE = re.compile(r"[A-Za-z]{1,12}(?:[-_][A-Za-z0-9]{1,12})*")


# ISO 639-1: the two-letter codes. A code that is neither one of them nor three letters (ISO
# 639-2/-3, which also covers Wikipedia's "als", "yue", ...) is likely a slip ("jp", "chinese"),
# which English rules would then split without a word.
_ISO_639_1 = frozenset("""
    aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy
    da de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu
    hy hz ia id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb
    lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr nv ny oc oj om
    or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss st su sv sw
    ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu
""".split())


def unknown_language_warning(language: str) -> str | None:
    """A warning when ``language``'s base is no ISO 639 code, naming the rules it gets."""
    base = language.strip().replace("_", "-").split("-", 1)[0].lower()
    if base in _ISO_639_1 or len(base) == 3 or base in ("simple",):  # Simple English Wikipedia
        return None
    names = {"en": "English", "de": "German", "zh": "Chinese"}
    return (f"--language {language!r}: {base!r} is no ISO 639 language code (e.g. zh, ja, de, fr); its "
            f"sentences are split by the {names[rules_for(language)]} rules")


@functools.lru_cache(maxsize=256)
def rules_for(language: str) -> str:
    """The code in ``LANGUAGES`` whose rules split ``language``: "zh" for Chinese and
    Japanese in any variant ("zh-cn", "zh_TW", "zh-hans", "yue", "ja"), "de" for German
    ("de-CH"), "en" for every other language (a BCP 47 / ISO 639 code; case and
    "_" or "-" do not matter). ValueError for what is no language code."""
    if not isinstance(language, str) or not _LANGUAGE_CODE.fullmatch(language.strip()):
        raise ValueError(f"not a language code: {language!r}")
    base = language.strip().replace("_", "-").split("-", 1)[0].lower()
    return "zh" if base in _CJK_CODES else "de" if base in _GERMAN_CODES else "en"


def split_sentences(text: str, language: str = "en") -> list[str]:
    """The sentences of ``text`` in order, each stripped, none empty; "\\n" separates
    paragraphs and always ends a sentence. Joining the result loses no non-space
    character. ``language``: any language code, see ``rules_for``."""
    if language != "en":
        rules = rules_for(language)
        if rules == "zh":
            return _split_cjk(text)
        if rules == "de":
            return _split(text, _DE_BOUNDARY, _de_dot_continues)
    return _split(text, _BOUNDARY, _dot_continues)


if __name__ == "__main__":  # python -m preprocessing.sentences [language] < file.txt
    for sentence in split_sentences(sys.stdin.read(), *sys.argv[1:2]):
        print(sentence)
