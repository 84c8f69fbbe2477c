"""Derive the bundled Chinese sample data from the MIT-licensed npm package chinese-poetry 2.0.1.

    npm pack chinese-poetry@2.0.1 && tar xzf chinese-poetry-2.0.1.tgz
    python preprocessing/sample_data/derive_chinese_poetry.py --package package --out preprocessing/sample_data

Writes, deterministically (the same package and seed give byte-identical files):

chinese-poetry.txt.bz2
    A pretraining corpus in preprocessing/run_beam.py's plain-text format: documents separated
    by a blank line, one paragraph per line. A document is one poem, ci or chapter; its first
    line is its title (a Tang poem's title, a ci's tune name, an Analects chapter name, a Shijing
    poem's title), then one line per source paragraph. Mixes sampled 全唐诗 Tang shi (Traditional
    characters, as in the source), sampled 宋词 Song ci, all 20 chapters of 论语 the Analects and
    all 305 poems of 诗经 the Shijing (the last three in Simplified characters, as in the source).
    Scripts are kept as in the source; the pipeline's ``--convert t2s`` normalizes them.

chinese-poetry-tang-song.csv.bz2
    A labelled classification set in pipeline/finetune.py's layout (like
    pipeline/sample_data/rotten_tomatoes.csv.bz2: one csv, no split column; finetune.py makes a
    seeded stratified validation/test split): columns ``text,label,source``; ``label`` is
    ``tang`` (a 全唐诗 poem) or ``song`` (a 宋词 ci), balanced; ``text`` is the poem's paragraphs
    joined, converted to Simplified characters with OpenCC ``t2s`` and then ``VARIANTS`` (both
    classes, so that the script gives nothing away), 20 to 128 characters, Chinese characters plus ，and 。 only (the
    source punctuates ci with ，。 alone, Tang shi also with ？！：；, and ci use 、 where Tang
    shi rarely do: texts with other marks are left out so punctuation does not give the label
    away). ``source`` is ``dir/file.json#index`` in the package. Deduplicated on ``text``; no
    poem of this set (compared after t2s) is in the pretraining corpus.

``--baseline`` also prints the majority-class rate and two baselines on the test split that
``python pipeline/finetune.py --data chinese-poetry-tang-song.csv.bz2`` uses (needs sklearn).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import io
import json
import os
import random
import re
import sys

TANG_DOCS = 6000  # Tang shi in the pretraining corpus
SONG_DOCS = 3000  # Song ci in the pretraining corpus
CLASS_ROWS = 2500  # classification rows per label
CLASS_MIN_CHARS, CLASS_MAX_CHARS = 20, 128
BZ2_LEVEL = 9

CORPUS_FILE = "chinese-poetry.txt.bz2"
CLASS_FILE = "chinese-poetry-tang-song.csv.bz2"

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
# corpus: Chinese characters and ordinary punctuation; no □ (a lost character), no （ [ { 〖 (editors'
# notes and variant readings), no digits, Latin, kana or replacement characters
_CORPUS_OK = re.compile(f"^[{_HAN}，。？！；：、《》「」『』“”‘’·…]+$")
_CLASS_OK = re.compile(f"^[{_HAN}，。]+$")
# Variant characters (异体字) that OpenCC t2s leaves alone, mapped to the usual Simplified form.
# The 全唐诗 files keep the old editions' variants (疎 劒 慙 鴈 …), the 宋词 files their own
# (馀 锺 敧 …): left as they are, one such character would give the label away. These are the
# frequent ones (each seen 15+ times in one source and almost never in the other).
VARIANTS = str.maketrans(dict(zip(
    "疎劒慙鴈猨鬬簷媿嬾徧斾堦褭蘂飜桮櫂煖廻臯皐暎顇顦埽燄覩羇荅竝鵶緜歛檝棃呌醆妬髣髴逈巵壻秪秖牋邨帬罇鼇"
    "藂趂栢缾隄彊麤僊隣鏁輭椀盌牓峩欵汚穉鸎胷筯懃輙鼈徴効諠俛姪悮怳搆粧蕚嗁賸犂虵懽廐碁怱迺牕攲敧蔕馀锺飚悤忩髪",
    "疏剑惭雁猿斗檐愧懒遍旆阶袅蕊翻杯棹暖回皋皋映悴憔扫焰睹羁答并鸦绵敛楫梨叫盏妒仿佛迥卮婿只只笺村裙樽鳌"
    "丛趁柏瓶堤强粗仙邻锁软碗碗榜峨款污稚莺胸箸勤辄鳖征效喧俯侄误恍构妆萼啼剩犁蛇欢厩棋匆乃窗欹欹蒂余钟飙匆匆发")))


def _numbered(directory: str, pattern: str) -> list[str]:
    """Files of ``directory`` matching ``pattern`` (one group: a number), sorted by that number."""
    rx = re.compile(pattern)
    names = [n for n in os.listdir(directory) if rx.fullmatch(n)]
    if not names:
        raise SystemExit(f"{directory}: no file matches {pattern}; is --package the unpacked npm package?")
    return sorted(names, key=lambda n: (int(rx.fullmatch(n).group(1)), n))


def _load(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


_ASCII_PUNCT = str.maketrans({",": "，", ":": "：", "?": "？", "!": "！", ";": "；"})


def _paragraphs(lines) -> list[str]:
    """Stripped, non-empty paragraphs; ASCII , : ? ! ; (a few in the Analects) made full-width."""
    return [p.strip().translate(_ASCII_PUNCT) for p in lines if isinstance(p, str) and p.strip()]


def read_package(package: str) -> dict[str, list[dict]]:
    """{source: [{"title", "paragraphs", "source"}]} in file and index order."""
    dist = os.path.join(package, "dist")
    out: dict[str, list[dict]] = {"tang": [], "song": [], "lunyu": [], "shijing": []}
    for kind, sub, pattern, title_key in (("tang", "quantangshi", r"poet\.tang\.(\d+)\.json", "title"),
                                          ("song", "songci", r"ci\.song\.(\d+)\.json", "rhythmic")):
        directory = os.path.join(dist, sub)
        for name in _numbered(directory, pattern):
            for i, poem in enumerate(_load(os.path.join(directory, name))):
                out[kind].append({"title": (poem.get(title_key) or "").strip(),
                                  "paragraphs": _paragraphs(poem.get("paragraphs") or []),
                                  "source": f"{sub}/{name}#{i}"})
    for i, chapter in enumerate(_load(os.path.join(dist, "lunyu", "lunyu.json"))):
        out["lunyu"].append({"title": chapter["chapter"].strip(), "paragraphs": _paragraphs(chapter["paragraphs"]),
                             "source": f"lunyu/lunyu.json#{i}"})
    for i, poem in enumerate(_load(os.path.join(dist, "shijing", "shijing.json"))):
        out["shijing"].append({"title": poem["title"].strip(), "paragraphs": _paragraphs(poem["content"]),
                               "source": f"shijing/shijing.json#{i}"})
    return out


def _corpus_ok(doc: dict) -> bool:
    return bool(doc["paragraphs"]) and all(_CORPUS_OK.match(p) for p in doc["paragraphs"]) \
        and (not doc["title"] or not any(c in doc["title"] for c in "\n\r"))


def derive(package: str, seed: int):
    import opencc

    t2s = opencc.OpenCC("t2s").convert
    docs = read_package(package)
    rng = random.Random(seed)

    # ---- classification set, drawn first so that the corpus can leave it out
    pools: dict[str, list[tuple[str, str]]] = {}
    seen_in: dict[str, set[str]] = {}
    for label in ("tang", "song"):
        pool, seen = [], set()
        for doc in docs[label]:
            text = t2s("".join(doc["paragraphs"])).translate(VARIANTS)
            if not (CLASS_MIN_CHARS <= len(text) <= CLASS_MAX_CHARS and _CLASS_OK.match(text)) or text in seen:
                continue
            seen.add(text)
            pool.append((text, doc["source"]))
        pools[label], seen_in[label] = pool, seen
    both = seen_in["tang"] & seen_in["song"]  # the same text under both labels: no right answer
    rows = []
    for label in ("tang", "song"):
        pool = [item for item in pools[label] if item[0] not in both]
        rng.shuffle(pool)
        if len(pool) < CLASS_ROWS:
            raise SystemExit(f"only {len(pool)} {label} texts qualify for the classification set")
        rows += [(text, label, source) for text, source in pool[:CLASS_ROWS]]
    rng.shuffle(rows)
    held_out = {text for text, _, _ in rows}

    # ---- pretraining corpus
    chosen = []
    counts = {}
    for kind, wanted in (("tang", TANG_DOCS), ("song", SONG_DOCS), ("lunyu", None), ("shijing", None)):
        pool, seen = [], set()
        for doc in docs[kind]:
            key = t2s("".join(doc["paragraphs"])).translate(VARIANTS)
            if not _corpus_ok(doc) or key in held_out or key in seen:
                continue
            seen.add(key)
            pool.append(doc)
        if wanted is not None:
            rng.shuffle(pool)
            pool = pool[:wanted]
        counts[kind] = len(pool)
        chosen += pool
    rng.shuffle(chosen)
    corpus = "\n".join("\n".join(([d["title"]] if d["title"] else []) + d["paragraphs"]) + "\n" for d in chosen)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["text", "label", "source"])
    writer.writerows(rows)
    return corpus, buf.getvalue(), counts, rows


def baseline(csv_path: str) -> None:
    """Majority rate and two baselines on the test split finetune.py makes with its defaults."""
    from pipeline.finetuning.data import load_task_data
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    data = load_task_data(data=csv_path)  # finetune.py's defaults: columns, split fractions, seed
    train, test = data.splits["train"], data.splits["test"]
    print("rows:", {k: len(v) for k, v in data.splits.items()}, "labels:", data.labels)
    majority = max((test.labels == i).mean() for i in range(len(data.labels)))
    print(f"majority-class rate (test): {majority:.4f}")
    tang = data.labels.index("tang")

    def regular(text: str) -> bool:  # Tang shi: every line 5 or every line 7 characters
        lines = [s for s in re.split("[，。]", text) if s]
        return len({len(s) for s in lines}) == 1 and len(lines[0]) in (5, 7) and len(lines) % 2 == 0
    pred = [tang if regular(t) else 1 - tang for t in test.texts]
    print(f"heuristic (all lines 5 or all 7 chars, even count → tang): {(pred == test.labels).mean():.4f}")
    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(vec.fit_transform(train.texts), train.labels)
    acc = (clf.predict(vec.transform(test.texts)) == test.labels).mean()
    print(f"logistic regression, tf-idf char 1-2-grams: {acc:.4f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", required=True, help="the unpacked npm package chinese-poetry 2.0.1 (has dist/)")
    p.add_argument("--out", required=True, help="folder to write the two .bz2 files to")
    p.add_argument("--seed", type=int, default=42, help="seed of every random draw (default: %(default)s)")
    p.add_argument("--baseline", action="store_true", help="also print baselines for the csv (needs sklearn)")
    args = p.parse_args(argv)
    corpus, table, counts, rows = derive(args.package, args.seed)
    os.makedirs(args.out, exist_ok=True)
    for name, text in ((CORPUS_FILE, corpus), (CLASS_FILE, table)):
        raw = text.encode("utf-8")
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(bz2.compress(raw, BZ2_LEVEL))
        print(f"{name}: {len(raw):,} bytes uncompressed")
    print("corpus documents:", counts, "total", sum(counts.values()))
    print("classification rows:", {label: sum(r[1] == label for r in rows) for label in ("tang", "song")})
    if args.baseline:
        baseline(os.path.join(args.out, CLASS_FILE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
