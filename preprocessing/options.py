"""Command-line flags of ``run_beam.py``, parsed into one frozen config.

Our flags use dashes (``--vocab-size``); everything else goes to Beam's
PipelineOptions unchanged (``--runner``, ``--direct_num_workers``, Dataflow/Flink/Spark
options). A flag neither side knows is an error, not a silently dropped typo.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import sys
from collections.abc import Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from preprocessing import cli_parser, language, mlflow_experiment, parts, vocab as vocab_lib
from preprocessing.examples import MASKINGS, OBJECTIVES, ConfigError, ExampleConfig

SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data")
# The bundled real sample: a Wikipedia dump fragment and Jane Austen's novels, a chapter per
# document (sample_data/derive_austen_chapters.py: a paragraph per document is too short for
# next-sentence pairs).
DEFAULT_INPUTS = (
    os.path.join(SAMPLE_DIR, "enwiki-sample-pages-articles.xml.bz2"),
    os.path.join(SAMPLE_DIR, "austen-chapters.txt.bz2"),
)
# --dupe-factor's default by masking mode: static masks need several passes for mask variety;
# dynamic masking draws new masks every epoch.
DUPE_FACTORS = {"static": 5, "dynamic": 1}


def _locale_hint(value: str | None) -> str:
    """For a locale's name ($LANG's value), the language code in it, if it names one."""
    if not value or "." not in value:
        return ""
    code = value.split(".")[0].replace("_", "-")
    if code.upper() in ("C", "POSIX"):  # Docker's C.UTF-8: no language at all
        return "; a locale's name, which names no language: pass the corpus's language code"
    return f"; a locale's name: for its language, --language {code}"


def _is_language_code(value: str) -> bool:
    """What the sentence rules take (checked here: in the pipeline it failed on a worker, a Beam
    traceback; "de_DE.UTF-8", $LANG's value, is the likely one)."""
    from preprocessing.sentences import rules_for

    try:
        rules_for(value)
        return True
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    inputs: tuple[str, ...] = DEFAULT_INPUTS
    output: str = "output/data"
    vocab_size: int = 32000
    model_type: str = "unigram"
    tokenizer: str | None = None
    # SentencePiece's trainer needs about 20 bytes per character of its sample (measured:
    # 300,000 Wikipedia sentences, 38M characters, peak at 1.0 GB with the sample itself).
    vocab_sample_sentences: int = 300_000
    vocab_sample_bytes: int = 256 << 20
    # How each pass cuts and masks examples (--max-seq-length, --objective, --masking,
    # --masked-lm-prob, --max-predictions-per-seq, --short-seq-prob): defaults and checks
    # live there. Its whole_word_mask follows this config's whole_word_mask.
    examples: ExampleConfig = ExampleConfig()
    # None: DUPE_FACTORS[masking] (Google's for static masking; dynamic draws new masks each epoch).
    dupe_factor: int | None = None
    # none, pieces (the vocabulary's word starts), jieba (Chinese words), or auto: jieba for
    # Chinese, pieces otherwise; the driver resolves auto once the language is known.
    whole_word_mask: str = "none"
    # None: from the first MediaWiki dump's xml:lang, else "en" (resolved by the driver).
    language: str | None = None
    convert: str | None = None
    # SentencePiece keeps the characters that cover this share of the sample's text; the
    # rest become [UNK]. Not 1.0 by default, even for alphabetic languages: Wikipedia
    # quotes every script (the 6 MB English sample holds 866 distinct characters, of which
    # 125 cover 99.95%), and 1.0 would spend a small vocabulary on single rare characters.
    character_coverage: float = vocab_lib.CHARACTER_COVERAGE
    num_shards: int = 0
    rows_per_shard: int = 65536
    docs_per_bucket: int = 128
    seed: int = 12345
    text_field: str = "text"
    max_line_bytes: int = 1 << 20
    split_bytes: int = 64 << 20
    mlflow: bool = True
    experiment: str | None = None  # None: $MLFLOW_EXPERIMENT_NAME, else bert-pipeline (mlflow_experiment.py)
    run_name: str | None = None

    def __post_init__(self):
        whole_words = self.whole_word_mask != "none"  # auto resolves to pieces or jieba, never none
        if self.examples.whole_word_mask != whole_words:
            object.__setattr__(self, "examples", dataclasses.replace(self.examples, whole_word_mask=whole_words))
        if self.dupe_factor is None:
            object.__setattr__(self, "dupe_factor", DUPE_FACTORS[self.examples.masking])
        _check(self.vocab_size >= 100, f"--vocab-size must be at least 100, got {self.vocab_size}")
        _check(self.model_type in vocab_lib.MODEL_TYPES,
               f"--model-type must be {' or '.join(vocab_lib.MODEL_TYPES)}, got {self.model_type!r}")
        _check(self.vocab_sample_sentences >= 1000,
               f"--vocab-sample-sentences must be at least 1000, got {self.vocab_sample_sentences}")
        _check(self.vocab_sample_bytes >= 1, f"--vocab-sample-bytes must be at least 1, got {self.vocab_sample_bytes}")
        _check(self.dupe_factor >= 1, f"--dupe-factor must be at least 1, got {self.dupe_factor}")
        _check(0 <= self.seed < 1 << 63, f"--seed must be in [0, 2^63), got {self.seed}")
        _check(self.num_shards >= 0, f"--num-shards must be >= 0 (0 = automatic), got {self.num_shards}")
        _check(self.rows_per_shard >= 1, f"--rows-per-shard must be >= 1, got {self.rows_per_shard}")
        _check(self.docs_per_bucket >= 2, f"--docs-per-bucket must be at least 2, got {self.docs_per_bucket}")
        _check(self.max_line_bytes >= 1024, f"--max-line-bytes must be at least 1024, got {self.max_line_bytes}")
        _check(self.split_bytes >= 1 << 16, f"--split-bytes must be at least 65536, got {self.split_bytes}")
        _check(self.whole_word_mask in language.WHOLE_WORD_CHOICES,
               f"--whole-word-mask must be one of {', '.join(language.WHOLE_WORD_CHOICES)}, "
               f"got {self.whole_word_mask!r}")
        _check(self.convert is None or self.convert in language.CONVERSIONS,
               f"--convert must be one of {', '.join(language.CONVERSIONS)}, got {self.convert!r}")
        _check(0.98 <= self.character_coverage <= 1.0,
               f"--character-coverage must be in [0.98, 1], got {self.character_coverage}")
        _check(self.language is None or bool(self.language.strip()), "--language must not be empty")
        _check(self.language is None or _is_language_code(self.language),
               f"--language {self.language!r}: not a language code (e.g. de, zh-cn, en-GB)" + _locale_hint(self.language))
        # An empty --output is the working directory to Beam's join: a rerun's clean-up would delete
        # ./manifest.json, ./shards and ./tokenizer there.
        _check(bool(self.output.strip()), "--output must name a folder (it is empty)")
        # Beam's file systems read * ? [ as a pattern, and a rerun deletes the previous outputs by
        # pattern: "out[1]" would delete those of "out1".
        _check(not any(c in self.output for c in "*?["),
               f"--output {self.output}: a folder name with * ? or [, which Beam reads as a pattern")

    @property
    def word_segmenter(self) -> str:
        """What whole-word masking groups by: none, pieces or jieba (auto resolved by language)."""
        if self.whole_word_mask == "auto":
            return language.default_segmenter(self.language or "en")
        return self.whole_word_mask


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    d = PreprocessConfig()
    p = cli_parser.Parser(
        prog="python preprocessing/run_beam.py",
        description=(
            "Turn a corpus into sharded, masked BERT pretraining examples (MLM + NSP, "
            "Google's recipe, or MLM alone: --objective mlm) with a SentencePiece vocabulary trained on it. Writes "
            "OUTPUT/tokenizer/, OUTPUT/shards/*.parquet and, last, OUTPUT/manifest.json. "
            "Flags not listed here go to Apache Beam (e.g. --runner=DataflowRunner, "
            "--direct_num_workers=4 --direct_running_mode=multi_processing); the default "
            "runner is FnApiRunner, the DirectRunner's batch engine."),
        formatter_class=cli_parser.DefaultsFormatter,
    )
    io = p.add_argument_group("input and output")
    # extend: "--input a --input b" reads both (argparse's default kept only b, without a word)
    io.add_argument("--input", nargs="+", action="extend", metavar="PATH",
                    help="files, folders (a local one with its subfolders) or globs, local or any Beam "
                         "filesystem (gs://, s3://); a folder's files of no input format (README, LICENSE) "
                         "and empty files are skipped with a warning. Format by "
                         "extension: .xml/.xml.bz2 MediaWiki dumps (multistream files are split "
                         "across workers), .txt[.gz|.bz2|.zst|.xz] (documents separated by blank "
                         "lines), .jsonl/.json[.gz|.bz2|.zst|.xz] (JSON lines, see --text-field), "
                         ".parquet. Default: the bundled "
                         "Wikipedia sample and Jane Austen's novels (a chapter per document). Repeatable")
    io.add_argument("--output", default=d.output, metavar="DIR",
                    help="output directory (local or gs://...). A local data dir already there is "
                         "moved into DIR/.previous when the pipeline starts and deleted once this run's "
                         "manifest is written; a run that fails or is stopped puts it back. In gs:// or "
                         "s3:// it is deleted at the start (after the flags and inputs are checked), so a "
                         "failed run never looks complete. A local DIR is held by one run at a time "
                         "(DIR/.lock); a local folder of other files without a manifest is refused")
    io.add_argument("--language", metavar="CODE",
                    help="the corpus's language (ISO code: en, de, zh, zh-hans, ...): it selects the "
                         "sentence rules (CJK full stops, German abbreviations and ordinals), the "
                         "non-prose section titles of dumps, and what --whole-word-mask groups. Default: "
                         "the xml:lang of the first MediaWiki dump among the inputs, else en%(default).0s")
    io.add_argument("--convert", choices=language.CONVERSIONS, metavar="CONVERSION",
                    help="convert the script with OpenCC before tokenizing, e.g. t2s (Traditional to "
                         "Simplified Chinese); one of " + ", ".join(language.CONVERSIONS) + "%(default).0s")
    io.add_argument("--text-field", "--text-column", dest="text_field", default=d.text_field,
                    help="the text field of .jsonl rows / text column of .parquet files (--text-column: "
                         "fine-tuning's and embed.py's name for it)")
    io.add_argument("--max-line-bytes", type=int, default=d.max_line_bytes,
                    help="longer lines in text/jsonl files are skipped and counted")
    io.add_argument("--split-bytes", type=int, default=d.split_bytes,
                    help="inputs are read in units of about this many bytes (multistream bzip2 "
                         "dumps and uncompressed text/jsonl in byte ranges, Parquet in row groups), "
                         "each by one worker; a compressed text file or single-stream dump is one unit")
    vocab = p.add_argument_group("vocabulary")
    vocab.add_argument("--vocab-size", type=int, default=d.vocab_size,
                       help="SentencePiece vocabulary size, special tokens included, at least 100 (a "
                            "small corpus may give fewer pieces; the manifest has the real size)")
    vocab.add_argument("--model-type", choices=vocab_lib.MODEL_TYPES, default=d.model_type,
                       help="SentencePiece model type")
    vocab.add_argument("--tokenizer", metavar="PATH",
                       help="reuse a tokenizer instead of training one: a SentencePiece model (an "
                            "spm.model file, or a directory holding one, e.g. another run's "
                            "OUTPUT/tokenizer), or a published BERT's WordPiece tokenizer (its directory "
                            "with tokenizer.json or vocab.txt, e.g. a downloaded bert-base-chinese), to "
                            "continue pretraining that model with pipeline/pretrain.py --init-from")
    vocab.add_argument("--character-coverage", type=float, default=d.character_coverage,
                       help="SentencePiece keeps the characters covering this share of the sample's text "
                            "(the rest become [UNK]); 1.0 keeps every character, which suits a corpus "
                            "with a small alphabet and no foreign scripts")
    vocab.add_argument("--vocab-sample-sentences", type=int, default=d.vocab_sample_sentences,
                       help="train the vocabulary on this many sentences: those of smallest hash "
                            "among the read tasks --vocab-sample-bytes picks (memory and time of "
                            "vocabulary training are bounded by these two flags, not by the corpus)")
    vocab.add_argument("--vocab-sample-bytes", type=int, default=d.vocab_sample_bytes,
                       help="read tasks chosen by a hash of their file name and range, until they "
                            "cover this many bytes of input (as stored, compressed or not), supply "
                            "the vocabulary sample; a smaller corpus is sampled whole")
    ex = p.add_argument_group("examples (Google's create_pretraining_data recipe)")
    ex.add_argument("--max-seq-length", type=int, default=d.examples.max_seq_length,
                    help="tokens per example, [CLS] and both [SEP] included; at least 8")
    ex.add_argument("--objective", choices=OBJECTIVES, default=d.examples.objective,
                    help="mlm-nsp: Google's sentence pairs with the next-sentence label; mlm: RoBERTa's "
                         "FULL-SENTENCES rows, whole sentences packed across documents ([SEP] between "
                         "them) up to --max-seq-length, no NSP (the trainer then trains the MLM head only)")
    ex.add_argument("--masking", choices=MASKINGS, default=d.examples.masking,
                    help="static: masks drawn here, one set per --dupe-factor pass (Google); dynamic: "
                         "examples stored unmasked (a fifth of the rows, about a sixth of the bytes), and the "
                         "trainer draws new masks every epoch from its seed (RoBERTa)")
    ex.add_argument("--dupe-factor", type=int,
                    help="passes over the corpus, each with different segments (and, static, masks); "
                         f"default {DUPE_FACTORS['static']} with static masking, {DUPE_FACTORS['dynamic']} with "
                         "dynamic%(default).0s")
    ex.add_argument("--masked-lm-prob", type=float, default=d.examples.masked_lm_prob,
                    help="share of tokens to predict (BERT 0.15; MosaicBERT 0.3)")
    ex.add_argument("--max-predictions-per-seq", type=int,
                    help="cap on predicted tokens per example (default: ceil(max-seq-length x "
                         "masked-lm-prob), 20 at 128 and 0.15)%(default).0s")
    ex.add_argument("--short-seq-prob", type=float, default=d.examples.short_seq_prob,
                    help="share of documents per pass that get a random shorter target length")
    ex.add_argument("--whole-word-mask", nargs="?", const="auto", default=d.whole_word_mask,
                    choices=language.WHOLE_WORD_CHOICES,
                    help="mask all pieces of a word together. pieces: words as the vocabulary marks "
                         "them (a piece starting with ▁, or not starting with ##); jieba: Chinese words "
                         "from the jieba segmenter (BERT-wwm); auto (the flag alone): jieba for Chinese, "
                         "pieces otherwise")
    ex.add_argument("--docs-per-bucket", type=int, default=d.docs_per_bucket,
                    help="each read task makes its examples in buckets of this many consecutive "
                         "documents (the last one of a task up to twice as many); random next "
                         "segments come from the same bucket, so memory is bounded by a bucket")
    ex.add_argument("--seed", type=int, default=d.seed,
                    help="same input + seed = identical output, for any number of workers")
    out = p.add_argument_group("shards")
    out.add_argument("--num-shards", type=int, default=d.num_shards,
                     help="Parquet shards of equal size (±1 row), at most one per example; 0 = one per "
                          f"--rows-per-shard rows. A shard over {parts.SHUFFLE_IN_MEMORY_ROWS:,} rows is shuffled "
                          "through the worker's local disk (TMPDIR), not in memory")
    out.add_argument("--rows-per-shard", type=int, default=d.rows_per_shard,
                     help="target rows per shard when --num-shards is 0")
    track = p.add_argument_group("tracking (MLflow; MLFLOW_TRACKING_URI selects the server)")
    track.add_argument("--no-mlflow", dest="mlflow", action="store_false",
                       help="do not log an MLflow run%(default).0s")
    # Beam's own --experiment (an alias of --experiments) is shadowed by this one
    track.add_argument("--experiment", type=mlflow_experiment.experiment_flag, default=d.experiment,
                       help=mlflow_experiment.HELP + "; Beam's experiments go in --experiments, as Beam's "
                            "--experiment alias is this flag here")
    track.add_argument("--run-name", help="MLflow run name")
    return p


# Positions of the pretraining presets (pipeline/model.py), as of Google's BERT: longer rows need a
# config.json with more max_position_embeddings, which pretraining asks for only once the data is made.
PRESET_POSITIONS = 512

# The vocabulary group's flags that only a trained vocabulary uses.
VOCAB_TRAINING_FLAGS = ("--vocab-size", "--model-type", "--character-coverage", "--vocab-sample-sentences",
                        "--vocab-sample-bytes")


def parse_args(argv: Sequence[str] | None) -> tuple[PreprocessConfig, list[str]]:
    """Returns our config and the Beam pipeline args (runner made explicit)."""
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    _reject_unknown(parser, beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in beam_args):
        # The FnApiRunner is the engine the DirectRunner uses for batch pipelines,
        # named directly: since Beam 2.68 the DirectRunner first tries the Prism
        # runner, which downloads a binary at start and fails offline.
        beam_args = ["--runner=FnApiRunner", *beam_args]
    if args.tokenizer:
        given = sys.argv[1:] if argv is None else list(argv)
        unused = [flag for flag in VOCAB_TRAINING_FLAGS if any(a == flag or a.startswith(flag + "=") for a in given)]
        if unused:  # before: ignored in silence, and the manifest then showed another vocabulary size
            logging.getLogger(__name__).warning(
                "%s set the vocabulary's training, which --tokenizer %s replaces: %s ignored", ", ".join(unused),
                args.tokenizer, "it is" if len(unused) == 1 else "they are")
    if args.max_seq_length > PRESET_POSITIONS:
        logging.getLogger(__name__).warning(
            "--max-seq-length %d: the pretraining presets have %d positions; pretrain these rows with --model a "
            "config.json whose max_position_embeddings is at least %d", args.max_seq_length, PRESET_POSITIONS,
            args.max_seq_length)
    values = vars(args)
    values["inputs"] = tuple(values.pop("input") or PreprocessConfig.inputs)
    # The flags of ExampleConfig's fields, but --whole-word-mask: PreprocessConfig's own (a segmenter).
    example_flags = {f.name for f in dataclasses.fields(ExampleConfig)} - {"whole_word_mask"}
    try:
        values["examples"] = ExampleConfig(**{name: values.pop(name) for name in example_flags})
        return PreprocessConfig(**values), beam_args
    except ConfigError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def _reject_unknown(parser: argparse.ArgumentParser, beam_args: list[str]) -> None:
    beam_parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(beam_parser)  # how Beam itself collects its flags
    known, unknown = beam_parser.parse_known_args(beam_args)
    if getattr(known, "direct_running_mode", None) == "multi_threading":
        # Not a crash: elements silently missing from the output, which no check here would see.
        parser.error("--direct_running_mode=multi_threading lost elements in 3 of 6 trial runs on Beam 2.77 "
                     "(docs/PREPROCESSING.md); use --direct_running_mode=multi_processing")
    flags = [a.split("=", 1)[0] for a in unknown if a.startswith("-")]
    if flags:
        ours = [o for a in parser._actions for o in a.option_strings]
        hints = []
        for flag in flags:
            close = difflib.get_close_matches(flag.replace("_", "-"), ours, n=1)
            hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
        parser.error(f"unrecognized arguments: {', '.join(hints)}; neither this script nor "
                     "Apache Beam knows them")
