"""Runs the preprocessing pipeline end to end and writes the manifest last."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

import pyarrow.parquet as pq

from preprocessing import (inputs, language, local_runner, manifest, parts, sentences, subwords, tracking,
                           transforms, vocab, worker_package, write_failure)
from pipeline import run_lock  # stdlib only; the launcher runs from a checkout, workers never import this
from preprocessing.documents import RawDocument
from preprocessing.footers import read_footers
from preprocessing.mlflow_experiment import browse_hint
from preprocessing.options import PreprocessConfig

log = logging.getLogger(__name__)

# Free space under which --output is refused at the start: not even a 32k vocabulary's tokenizer
# files (about 3 MiB) would fit.
FULL_BYTES = 4 << 20
NEARLY_FULL_BYTES = 64 << 20  # under which a start is warned of


@dataclasses.dataclass(frozen=True)
class Summary:
    output: str
    manifest_path: str
    manifest: dict
    counters: dict[str, int]
    wall_seconds: float
    run_id: str | None
    vocab_size_asked: int | None = None  # --vocab-size of a trained vocabulary; None with --tokenizer
    num_shards_asked: int = 0  # --num-shards (0: by --rows-per-shard)


DUMP_LANGUAGES_READ = 8  # dumps whose xml:lang is compared with the run's language (a request each, if remote)


def resolve_language(config: PreprocessConfig, tasks: list[inputs.ReadTask]) -> PreprocessConfig:
    """``--language`` (else the first MediaWiki dump's ``xml:lang``, else en) and what
    ``--whole-word-mask auto`` means for it, fixed before the pipeline starts."""
    code = config.language
    dumps = list(dict.fromkeys(t.path for t in tasks if t.format == "wiki"))[:DUMP_LANGUAGES_READ]
    languages = {path: inputs.dump_language(path) for path in dumps}
    if code is None:
        dump = next((t for t in tasks if t.format == "wiki"), None)
        code = (languages[dump.path] if dump else None) or "en"
        log.info("language: %s (%s; --language sets another)", code,
                 f"the xml:lang of {dump.path}" if dump else "the default")
    else:
        dump = None
    # A variant of the dump's language (zh-tw of a zh dump, de-CH of a de one) is no other language.
    others = [f"{path} ({lang})" for path, lang in languages.items()
              if lang and language.base_language(lang) != language.base_language(code)]
    if others:  # one language's sentence rules, dump tables and vocabulary settings for all
        log.warning("the language is %s (%s), but the xml:lang of %s: %s's sentence rules and dump tables read "
                    "them; preprocess each language apart, or pass the --language they share", code,
                    "--language" if config.language else "the first dump's", ", ".join(others[:5]), code)
    warning = sentences.unknown_language_warning(code)
    if warning:
        log.warning("%s", warning)
    # Also a --language given: "ch" (Chamorro) or "en" for Chinese, an easy slip, gave English rules
    # (a document a sentence, no word boundary) with no word of why.
    if dump is None and not language.written_without_spaces(code):
        unspaced = unspaced_share(tasks, config.text_field)
        if unspaced > UNSPACED_TEXT:
            log.warning("%.0f%% of the first input's characters are of a script written without spaces (Chinese, "
                        "Japanese, Thai, …), yet the language is %s (%s): its sentence ends (。！？) and words are "
                        "not found by %s's rules; pass --language (zh, ja, th, …), and --whole-word-mask for "
                        "Chinese", 100 * unspaced, code, "--language" if config.language else "the default",
                        code)
    wwm = config.whole_word_mask
    if wwm == "auto":
        wwm = language.default_segmenter(code)
    return dataclasses.replace(config, language=language.canonical_code(code), whole_word_mask=wwm)


# Above this share of unspaced-script characters (language.UNSPACED_SCRIPT), a text without
# --language is not English: the Chinese sample's share is 0.997, the English samples' 0.
UNSPACED_TEXT = 0.3
_HEAD_CHARACTERS = 1 << 16


def unspaced_share(tasks: list[inputs.ReadTask], text_field: str) -> float:
    """The share of the first input's first 64K non-space characters that are of a script written
    without spaces; 0 for a MediaWiki dump (its xml:lang says) or an input that cannot be read
    (the pipeline says why)."""
    first = next((t for t in tasks if t.format != "wiki"), None)
    if first is None:
        return 0.0
    text, length = [], 0
    try:
        for item in inputs.read_task(first, text_field, 1 << 20):
            if isinstance(item, RawDocument):
                text.append(item.text[:_HEAD_CHARACTERS])
                length += len(text[-1])
                if length >= _HEAD_CHARACTERS:
                    break
    except Exception:  # noqa: BLE001 - a hint only: reading errors are the pipeline's to report
        return 0.0
    head = "".join("".join(text).split())[:_HEAD_CHARACTERS]
    return len(language.UNSPACED_SCRIPT.findall(head)) / max(len(head), 1)


def _trained_tokenizer(output: str) -> subwords.TokenizerModel:
    with FileSystems.open(FileSystems.join(output, "tokenizer", vocab.SPM_MODEL_FILE),
                          compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return subwords.TokenizerModel(subwords.SENTENCEPIECE, f.read())


def read_counters(output: str) -> dict[str, int]:
    """The pipeline's summed count records (see transforms.py: counts travel in the data)."""
    path = FileSystems.join(output, parts.PARTS_DIR, parts.COUNTERS_FILE)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return json.load(f)


def check_writable(output: str) -> None:
    """A local --output this user cannot write in (its nearest existing folder) is refused before the
    input is read and the vocabulary trained, not after (a worker's PermissionError, 150 lines)."""
    if "://" in output:
        return
    existing = os.path.abspath(output)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        raise inputs.InputError(f"--output {output}: cannot write in {existing} "
                                f"({'a read-only file system' if read_only else 'permission denied'})")
    # A disk that is full from the start would fail the first write only after the input was read
    # and the vocabulary trained (minutes to hours on a real corpus). How much a run writes is not
    # known before it runs: a disk with no room even for a tokenizer is refused, a nearly full one
    # is warned about.
    usage = write_failure.disk_usage(existing)
    if usage is None or usage.total == 0:  # a file system that does not say (some FUSE mounts)
        return
    # A previous data dir is kept until this run's manifest is written; an unfinished run's files
    # are deleted first (a disk that filled up under it, say): theirs is free.
    previous = _previous_outputs_bytes(output)
    kept = previous if manifest.holds_data_dir(output) else 0
    free = usage.free + previous - kept
    if free < FULL_BYTES:
        hint = (f"; the data dir already there ({kept / 2**20:.0f} MiB) is kept until this run succeeds: delete "
                "it first to give this run its room" if kept else "")
        raise inputs.InputError(f"--output {output}: the file system of {existing} is full ({free / 2**20:.1f} "
                                f"MiB free): free space there, or name an --output on another disk{hint}")
    if free < NEARLY_FULL_BYTES:
        log.warning("--output %s: the file system of %s has %.0f MiB free; a data dir of a real corpus takes far "
                    "more (shards of dupe-factor copies of its text), and a full disk ends the run only when "
                    "it writes", output, existing, free / 2**20)


def _previous_outputs_bytes(output: str) -> int:
    """What ``manifest.remove_stale_outputs`` will delete under a local ``output``, in bytes."""
    def size(path: str) -> int:
        try:
            return 0 if os.path.islink(path) else os.path.getsize(path)
        except OSError:  # gone meanwhile
            return 0

    total = 0
    for name in manifest.DATA_DIR_ENTRIES:
        path = os.path.join(output, name)
        total += size(path) if os.path.isfile(path) else 0
        for root, _, files in os.walk(path):
            total += sum(size(os.path.join(root, f)) for f in files)
    return total


@contextlib.contextmanager
def _holding(output: str) -> Iterator[None]:
    """Holds a local OUTPUT for this run (OUTPUT/.lock, as a pretraining run dir's): a second run
    into it deleted the first's parts and shards, and the first then wrote its manifest, with its
    own settings, over the second's shards. An object store has no locks: nothing is held."""
    if "://" in output:
        yield
        return
    try:
        lock = run_lock.acquire(output, "--output")
    except run_lock.RunDirError as err:
        raise inputs.InputError(str(err)) from None
    try:
        yield
    except BaseException:
        lock.abandon()  # an --output this run made, holding nothing else, is removed
        raise
    lock.release()


def run(config: PreprocessConfig, beam_args: list[str]) -> Summary:
    check_reachable_by_workers(config, beam_args)
    beam_args = worker_package.with_setup_file(beam_args)  # remote workers: preprocessing only
    # The inputs are listed and the output checked here, before the pipeline exists: a file system's
    # options (--s3_endpoint_url of a MinIO or Ceph store, --s3_access_key_id, …) must apply to
    # that too. Beam itself sets them only when the Pipeline is built.
    FileSystems.set_options(PipelineOptions(beam_args))
    if "://" not in config.output and os.path.exists(config.output) and not os.path.isdir(config.output):
        raise inputs.InputError(f"--output {config.output}: a file, not a folder; the data dir is written there")
    check_writable(config.output)
    skipped: dict[str, list[str]] = {}
    tasks = inputs.plan_read_tasks(config.inputs, config.split_bytes, output=config.output, skipped=skipped)
    inputs.check_inputs(tasks, config.text_field)
    config = resolve_language(config, tasks)
    given = subwords.load_given(config.tokenizer) if config.tokenizer else None
    input_paths = sorted({t.path for t in tasks})
    log.info("%d input file(s), %d read task(s) → %s", len(input_paths), len(tasks), config.output)
    foreign = manifest.foreign_entries(config.output)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise inputs.InputError(f"--output {config.output}: a folder of other files ({shown}) and no data dir "
                                "(no manifest.json); a run would delete its tokenizer/ and parts/ if it has "
                                "them: name a new or empty folder")
    # Beam checks the options when the Pipeline is made (Dataflow's --region, --temp_location):
    # before the previous data dir is deleted, which a run refused for a missing option took along.
    options = PipelineOptions(beam_args)
    pipeline = beam.Pipeline(runner=local_runner.runner_for(options), options=options)
    with _holding(config.output), manifest.replacing(config.output) as replacement:
        with tracking.preprocess_run(config, beam_args) as run:
            started = time.monotonic()
            transforms.build_pipeline(pipeline, tasks, config, given)
            result = pipeline.run()
            wait_or_cancel(result, beam_args)
            wall = time.monotonic() - started
            counters = read_counters(config.output)
            manifest.delete_dir(config.output, parts.PARTS_DIR)  # the shards are written
            manifest.delete_leftover_temporaries(config.output)

            shards = read_shard_counts(config.output)
            data = manifest.build_manifest(config, input_paths, given or _trained_tokenizer(config.output),
                                           shards, counters, run.run_id, skipped)
            _check_complete(data, counters, len(tasks))
            path = manifest.write_manifest(config.output, data)
            replacement.written()
            run.log_results(counters, wall, config.output)
    return Summary(config.output, path, data, counters, wall, run.run_id,
                   None if config.tokenizer else config.vocab_size, config.num_shards)


def wait_or_cancel(result, beam_args: list[str]) -> None:
    """Waits for the job; stopped meanwhile (Ctrl-C, SIGTERM), cancels a job that runs elsewhere.
    The manifest is written here once the job ends, so a job left running without this process
    would write shards nobody can use, and into the --output a rerun deletes first (a local
    runner's workers end with this process)."""
    try:
        result.wait_until_finish()
    except KeyboardInterrupt:  # run_beam.py raises it for SIGTERM too; a failed job has ended already
        if worker_package.job_runs_elsewhere(beam_args):
            runner = worker_package.flag_value(beam_args, "--runner")
            job = getattr(result, "job_id", lambda: None)()
            try:
                result.cancel()
                log.warning("cancelled the %s job%s: this process writes the manifest once the job ends", runner,
                            f" {job}" if job else "")
            except Exception as err:  # noqa: BLE001 - the stop goes on; the job must be cancelled by hand
                log.warning("could not cancel the %s job%s (%s): cancel it by hand before rerunning", runner,
                            f" {job}" if job else "", err)
        raise


def check_reachable_by_workers(config: PreprocessConfig, beam_args: list[str]) -> None:
    """Dataflow's workers are other machines: a path on this one (the default sample, a relative
    --output) failed on every worker after the job's retries, or, for the output, the job
    succeeded into the workers' own disks and this machine then found nothing. (Flink and Spark
    clusters may share a file system, so their paths are left to the user.)"""
    if "dataflow" not in worker_package.flag_value(beam_args, "--runner").lower():
        return
    local = [("--input", p) for p in config.inputs if "://" not in p]
    if "://" not in config.output:
        local.append(("--output", config.output))
    if local:
        flag, path = local[0]
        raise inputs.InputError(f"{flag} {path}: a path on this machine, which Dataflow's workers cannot see; "
                                "use gs:// paths (gsutil cp or gcloud storage cp the corpus to a bucket)"
                                + (f" ({len(local) - 1} more)" if len(local) > 1 else ""))


def _check_complete(data: dict, counters: dict[str, int], tasks: int) -> None:
    """Every read task must have reported, and the shards on disk must hold exactly the examples
    the pipeline made. A task a runner lost takes its part file and its counts with it, so the
    rows and the counters would still agree."""
    if counters.get("read-tasks", 0) != tasks:
        raise RuntimeError(f"{counters.get('read-tasks', 0)} of the {tasks} read tasks reported; not writing a "
                           "manifest for output that may lack part of the input")
    made = counters.get("instances", 0)
    if data["num_examples"] != made:
        raise RuntimeError(f"the shards hold {data['num_examples']} examples but the pipeline made "
                           f"{made}; not writing a manifest for incomplete output")
    if made == 0:
        raise inputs.InputError("no examples were made: the input has no usable text "
                                f"(counters: {counters})")


def read_shard_counts(output: str) -> list[tuple[str, int]]:
    """(relative path, rows) of every written shard, read from the Parquet footers."""
    pattern = FileSystems.join(output, "shards", "part-*.parquet")
    paths = sorted(meta.path for meta in FileSystems.match([pattern])[0].metadata_list)

    def rows(path: str) -> tuple[str, int]:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return f"shards/{os.path.basename(path)}", pq.ParquetFile(f).metadata.num_rows

    return read_footers(rows, paths)


# Google's recipe makes B a random span ~50% of the time, and always when a chunk holds a
# single sentence (no A/B split point): far above half means most sentences fill the target
# length alone, and NSP degenerates into "is there a second sentence at all".
LOPSIDED_RANDOM_NEXT = 0.6
# Far below half: random B segments come from other documents of a bucket, and there are few.
SCARCE_RANDOM_NEXT = 0.3


# Buckets of documents never span read tasks: files of one document each leave no other to pair with.
JOIN_FILES = ("join small files into one, a blank line between documents (awk 'FNR==1 && NR>1 {print \"\"} 1' "
              "DIR/*.txt > corpus.txt)")
# Chunks skipped for want of another document in their bucket, as a share of the chunks made or
# skipped, above which it is said even where the random-next share is fine (a few such files
# among many documents).
SINGLE_DOCUMENT_SKIPS = 0.05


def single_document_warning(counters: dict[str, int]) -> str | None:
    skipped = counters.get("skipped-instances-single-document-bucket", 0)
    if skipped <= SINGLE_DOCUMENT_SKIPS * (skipped + counters.get("instances", 0)):
        return None
    return (f"warning: {skipped:,} chunks were skipped, as their bucket held one document and so no other to draw "
            "a random next segment from: read tasks (a file each, or a --split-bytes range) of a single document; "
            f"{JOIN_FILES}")


def random_next_warning(counters: dict[str, int], max_seq_length: int, objective: str = "mlm-nsp",
                        vocab_size: int | None = None) -> str | None:
    """A hint when the NSP labels are lopsided, naming the flag that fixes it."""
    share = counters.get("random-next", 0) / max(counters.get("instances", 0), 1)
    if objective == "mlm-nsp" and counters.get("instances") and share < SCARCE_RANDOM_NEXT:
        documents, tasks = counters.get("documents-read", 0), counters.get("read-tasks", 0)
        if tasks > 1 and documents < 2 * tasks:
            return (f"warning: {share:.0%} of examples have a random next segment (the recipe aims at 50%): it is "
                    f"drawn from another document of the same read task, and the {tasks:,} read tasks (a file "
                    f"each, or a --split-bytes range) hold {documents:,} documents, about one each; "
                    f"{JOIN_FILES}, or use --objective mlm, which needs no pairs")
        return (f"warning: {share:.0%} of examples have a random next segment (the recipe aims at 50%): it is "
                f"drawn from another document, and the input has {documents:,} document{'s' * (documents != 1)} "
                "(in .txt, only a blank line ends one); separate its documents (a blank line between them in a .txt), "
                "or use --objective mlm, which needs no pairs")
    if share <= LOPSIDED_RANDOM_NEXT:
        return None
    head = (f"warning: {share:.0%} of examples have a random next segment (the recipe aims at 50%): a chunk "
            "of one sentence has no true continuation to pair it with")
    sentences = max(counters.get("sentences", 0), 1)
    per_sentence = counters.get("tokens", 0) / sentences
    if per_sentence > max_seq_length / 2:  # long sentences: each fills a chunk alone
        return (f"{head}; sentences average {per_sentence:.0f} tokens{_fine_pieces(vocab_size)}, so most fill "
                f"--max-seq-length {max_seq_length} on their own: a larger --max-seq-length gives NSP balanced "
                "labels")
    per_document = sentences / max(counters.get("documents-read", 0), 1)
    if per_document * per_sentence >= 2 * max_seq_length:  # documents of many chunks: the chunks are short
        return (f"{head}; sentences average {per_sentence:.0f} tokens{_fine_pieces(vocab_size)}, so at "
                f"--max-seq-length {max_seq_length} "
                "a chunk often holds one sentence, which cannot be split into two segments: a larger "
                "--max-seq-length gives NSP balanced labels, or use --objective mlm, which needs no pairs")
    return (f"{head}; documents average {per_document:.1f} sentences (of {per_sentence:.0f} tokens), too few "
            "to split into two segments: give longer documents (in .txt, only a blank line ends one; a "
            "paragraph per document is too short for NSP), or use --objective mlm, which needs no pairs")


# The counters that are totals or statistics; every other one counts input skipped or changed.
TOTALS = frozenset({"documents-read", "pages-read", "read-tasks", "sentences", "characters", "tokens", "instances",
                    "instance-tokens", "masked-tokens", "random-next", "short-target-document-passes",
                    "truncated-tokens", "unk-tokens"})


# Google's chunks overshoot their target by part of a sentence, so truncate_seq_pair cuts 9-15%
# of the segments' tokens (the enwiki and Austen samples at 128); far more means sentences
# longer than the target, which lose all they hold beyond it.
HEAVY_TRUNCATION = 0.3


def truncation_warning(counters: dict[str, int], max_seq_length: int, vocab_size: int | None = None) -> str | None:
    """A hint when truncation cuts far more than the recipe does, with the likely cause."""
    cut = counters.get("truncated-tokens", 0)
    kept = counters.get("instance-tokens", 0) - 3 * counters.get("instances", 0)  # [CLS] and two [SEP]s
    share = cut / max(kept + cut, 1)
    if share <= HEAVY_TRUNCATION:
        return None
    sentences = max(counters.get("sentences", 0), 1)
    per_sentence = counters.get("tokens", 0) / sentences
    head = (f"warning: {share:.0%} of the segments' tokens were cut to fit --max-seq-length {max_seq_length} "
            f"(the recipe cuts 9-15%); sentences average {per_sentence:.0f} tokens{_fine_pieces(vocab_size)}")
    if counters.get("characters", 0) / sentences <= PROSE_SENTENCE_CHARACTERS:  # sentences as prose has them
        return f"{head}, more than such a row holds: use a larger --max-seq-length (BERT's are 128 and 512)"
    return (f"{head}: text without end punctuation (. ! ? 。) reads as one long sentence per document, or "
            "text in a language whose sentence ends the rules do not know (--language); punctuate it, set "
            "--language, or use a larger --max-seq-length")


# Below this many pieces a vocabulary splits words into noticeably more tokens (Austen's sentences:
# 33 tokens at 1,712 pieces, 63 at 200), which a warning about sentence length should say.
SMALL_VOCABULARY = 8000


def _fine_pieces(vocab_size: int | None) -> str:
    """What a small vocabulary adds to a sentence's length in tokens, said where that length is."""
    if vocab_size is None or vocab_size >= SMALL_VOCABULARY:
        return ""
    return f" (a vocabulary of {vocab_size:,} pieces splits words finely; BERT's has 30,522)"


# Sentences of prose are shorter than this, in characters, which no vocabulary changes (in tokens,
# Austen's average 33 with a 1,712-piece vocabulary and 63 with a 200-piece one): the Wikipedia
# sample's average 128, Austen's 124. Far longer ones are paragraphs or documents the sentence
# rules could not split, and a heavy cut is theirs; shorter ones are cut by a short row.
PROSE_SENTENCE_CHARACTERS = 300


def vocabulary_warning(summary: Summary) -> str | None:
    """A hint when the trained vocabulary is far smaller than --vocab-size asked: SentencePiece
    stops where the corpus has no more pieces to give, and the summary's size alone went unseen."""
    got = summary.manifest["tokenizer"]["vocab_size"]
    if summary.vocab_size_asked is None or got * 2 > summary.vocab_size_asked:
        return None
    return (f"warning: the vocabulary has {got:,} pieces of the {summary.vocab_size_asked:,} --vocab-size asked "
            "for: the corpus is too small for more (its size is an upper bound); a larger corpus, or a "
            "smaller --vocab-size to match")


def shards_warning(summary: Summary) -> str | None:
    """--num-shards above the examples made gives a shard per example (parts.ShardLayout), not
    empty shards: said, since the manifest then lists fewer shards than asked."""
    made = len(summary.manifest.get("shards", ()))
    if not summary.num_shards_asked or made >= summary.num_shards_asked:
        return None
    return (f"warning: --num-shards {summary.num_shards_asked} is more than the {made:,} examples made: "
            f"{made:,} shards of one example each")


# A vocabulary trained on the corpus leaves out the rarest characters, 1 - --character-coverage
# of them (0.05% at the default); far more [UNK] means a vocabulary made for other text.
MANY_UNKNOWN = 0.01


def unknown_tokens_warning(counters: dict[str, int], tokenizer_given: bool) -> str | None:
    """A hint when the vocabulary does not cover the text: an English vocabulary given to Chinese
    text made a third of the tokens [UNK], and the run said nothing."""
    unknown, tokens = counters.get("unk-tokens", 0), counters.get("tokens", 0)
    if unknown <= MANY_UNKNOWN * tokens:
        return None
    head = f"warning: {unknown / tokens:.1%} of the input tokens are [UNK] ({unknown:,} of {tokens:,})"
    if tokenizer_given:
        return (f"{head}: the --tokenizer vocabulary lacks many of this text's characters (made for another "
                "language or script?); leave --tokenizer out to train one on this corpus")
    return (f"{head}: the vocabulary leaves out characters rarer than --character-coverage keeps; raise it "
            "(at most 1.0), or check --language and the input's encoding")


# A UTF-8 corpus has few invalid lines (none in the bundled samples); many mean another encoding.
MANY_INVALID_UTF8 = 0.05


def encoding_warning(counters: dict[str, int]) -> str | None:
    """A hint when many lines were not UTF-8: a whole corpus in Latin-1 ran with every accented
    letter turned into U+FFFD and said nothing beyond the count."""
    bad = counters.get("invalid-utf8-lines", 0)
    # Against sentences (no line count is kept; a line holds one or more), or documents if more.
    if bad < 10 or bad <= MANY_INVALID_UTF8 * max(counters.get("sentences", 0), counters.get("documents-read", 0)):
        return None
    return (f"warning: {bad:,} lines were not UTF-8 (their bad bytes became U+FFFD) in "
            f"{counters.get('documents-read', 0):,} documents: is the input in another encoding (Latin-1, "
            "Windows-1252, GB18030)? Convert it first, e.g. iconv -f latin1 -t utf-8 IN > OUT")


def format_summary(summary: Summary) -> str:
    c = summary.counters
    m = summary.manifest
    tokens = c.get("tokens", 0)
    rows = [
        ("documents read", c.get("documents-read", 0)),
        # every count of skipped, split or damaged input, whatever its name: all but the totals
        *[(k.replace("-", " "), v) for k, v in sorted(c.items()) if k not in TOTALS],
        ("sentences", c.get("sentences", 0)),
        ("input tokens", tokens),
        ("examples", c.get("instances", 0)),
        ("masked tokens", c.get("masked-tokens", 0)),
        *([("tokens cut to fit", c["truncated-tokens"])] if "truncated-tokens" in c else []),
        ("[UNK] tokens", c.get("unk-tokens", 0)),
        ("random-next share", f"{c.get('random-next', 0) / max(c.get('instances', 1), 1):.3f}"),
        ("vocabulary size", m["tokenizer"]["vocab_size"]),
        ("shards", len(m["shards"])),
        ("wall time", f"{summary.wall_seconds:.1f} s"),
        ("throughput", f"{tokens / max(summary.wall_seconds, 1e-9):,.0f} input tokens/s"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v:>,}" if isinstance(v, int) else f"  {k:<{width}}  {v:>}" for k, v in rows]
    vocab = m["tokenizer"]["vocab_size"]
    for warning in (encoding_warning(c), random_next_warning(c, m["max_seq_length"], m.get("objective", "mlm-nsp"),
                                                             vocab),
                    single_document_warning(c),
                    truncation_warning(c, m["max_seq_length"], vocab), vocabulary_warning(summary),
                    unknown_tokens_warning(c, tokenizer_given=summary.vocab_size_asked is None),
                    shards_warning(summary)):
        if warning:
            lines.append(warning)
    lines.append(f"\nWrote {m['num_examples']:,} examples to {summary.output}")
    lines.append(f"  manifest:  {summary.manifest_path}")
    lines.append(f"  tokenizer: {FileSystems.join(summary.output, 'tokenizer')}")
    if summary.run_id:
        lines.append(f"  MLflow run {summary.run_id} (stage=preprocess); browse with: {browse_hint()}")
    return "\n".join(lines)
