"""Every stage's command line: a usage error is one line naming the flag (argparse printed its
20-30 line usage block first), and --help shows a default only where it says something."""

import re

import pytest

from pipeline import embed, train_config
from pipeline.finetuning import config as finetune_config
from preprocessing import options

PARSERS = {"run_beam": options.build_parser, "pretrain": train_config.build_parser,
           "finetune": finetune_config.build_parser, "embed": embed.build_parser}
PARSE = {"run_beam": options.parse_args, "pretrain": train_config.parse_args,
         "finetune": finetune_config.parse_args, "embed": embed.parse_args}


@pytest.mark.parametrize("stage, argv, message", [
    ("run_beam", ["--vocab-size", "many"], "argument --vocab-size: invalid int value: 'many'"),
    ("pretrain", ["--steps", "2"], "the following arguments are required: --data"),
    ("finetune", ["--model", "m", "--data", "d.csv", "--metric", "foo"], "--metric must be one of accuracy,"),
    ("pretrain", ["--data", "d", "--steps", "0"], "--steps must be"),
    # inf passed "> 0": every weight became inf in the first update, and the run exported them
    ("pretrain", ["--data", "d", "--learning-rate", "inf"], "--learning-rate must be a finite number > 0, got inf"),
    ("finetune", ["--model", "m", "--data", "d.csv", "--weight-decay", "-1"],
     "--weight-decay must be a finite number >= 0, got -1.0"),
    ("pretrain", ["--data", "d", "--seed", "-1"], "--seed must be in [0, 2**32), got -1"),  # was a sampler traceback
    ("embed", ["--model", "m", "--input", "x.csv"], "the following arguments are required: --out"),
    # A rerun deletes the previous outputs by pattern: "run[1]" deleted those of "run1".
    ("run_beam", ["--output", "data/run[1]"], "--output data/run[1]: a folder name with * ? or ["),
    # Beam joins "" to the working directory, whose manifest.json and shards/ a rerun would delete
    ("run_beam", ["--output", ""], "--output must name a folder (it is empty)"),
    # $LANG's value: before, a Beam traceback from a worker
    ("run_beam", ["--language", "de_DE.UTF-8"], "--language 'de_DE.UTF-8': not a language code (e.g. de, zh-cn, "
                                                "en-GB); a locale's name: for its language, --language de-DE"),
    ("run_beam", ["--language", "C.UTF-8"], "--language 'C.UTF-8': not a language code (e.g. de, zh-cn, en-GB); a "
                                            "locale's name, which names no language: pass the corpus's language code"),
    ("finetune", ["--model", "m", "--data", "d", "--validation-split", ""], "--validation-split/--test-split: empty"),
    ("finetune", ["--model", "m", "--data", "d", "--predict", "a.csv", "--predict", "./a.csv"],
     "--predict: the same input given twice"),
    # --experiment "$EXP" with EXP unset: the runs would land in the default experiment unnoticed
    *[(stage, [*required, "--experiment", " "], "argument --experiment: an empty name: name the experiment")
      for stage, required in [("run_beam", []), ("pretrain", ["--data", "d"]),
                              ("finetune", ["--model", "m", "--data", "d"]),
                              ("embed", ["--model", "m", "--input", "x.csv", "--out", "o"])]],
])
def test_a_usage_error_is_one_line_naming_the_flag(stage, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        PARSE[stage](argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err
    assert re.fullmatch(rf"python \S+: error: {re.escape(message)}.* \(--help lists the flags\)\n", err), err


@pytest.mark.parametrize("stage", PARSERS)
def test_help_shows_no_empty_or_switch_defaults(stage):
    parser = PARSERS[stage]()
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: True)" not in text
    assert text.count("(default:") >= 5  # the defaults that say something are still shown
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help:
            assert formatter._expand_help(action).lower().count("(default") <= 1, action.option_strings


def test_an_installed_console_script_names_itself(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/venv/bin/bert-pretrain", "--steps", "2"])
    assert PARSERS["pretrain"]().prog == "bert-pretrain"
    monkeypatch.setattr("sys.argv", ["pipeline/pretrain.py"])
    assert PARSERS["pretrain"]().prog == "python pipeline/pretrain.py"


def test_every_input_of_a_repeated_input_flag_is_read():
    """argparse's default action kept the last --input alone: the files of the first were dropped
    without a word (one input file read, exit 0)."""
    config, _ = options.parse_args(["--input", "a.txt", "b.txt", "--input", "c.parquet", "--text-field", "body"])
    assert config.inputs == ("a.txt", "b.txt", "c.parquet")
    assert options.parse_args([])[0].inputs == options.PreprocessConfig.inputs  # the bundled samples
