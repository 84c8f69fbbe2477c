"""The CPU benchmarks' shared timing (benchmarks/side_by_side.py): the run order of the rounds,
the median round, and a step's figures from its stamps."""

import pytest

from benchmarks.side_by_side import (Stamp, add_timing_arguments, alternating_rounds, check_timing_arguments,
                                     median_round, ratio_line, summarize)
from preprocessing import cli_parser


def test_the_side_that_runs_first_alternates_by_round():
    launched = []

    def launch(side):
        launched.append(side)
        return {"side": side, "n": len(launched)}

    rounds = alternating_rounds(launch, 3)
    assert launched == ["ours", "hf", "hf", "ours", "ours", "hf"]
    # each round holds both sides, whichever ran first
    assert [(r["ours"]["n"], r["hf"]["n"]) for r in rounds] == [(1, 2), (4, 3), (5, 6)]


def rounds_of(ratios):
    return [{"ours": {"x": q}, "hf": {"x": 1.0}} for q in ratios]


@pytest.mark.parametrize("ratios, middle", [([1.5, 2.26, 1.77], 2), ([0.9], 0),
                                            ([1.0, 3.0, 2.0, 4.0], 2)])  # even: the lower middle one
def test_the_median_round_is_the_middle_ratio_and_every_ratio_is_kept_in_run_order(ratios, middle):
    rounds = rounds_of(ratios)
    chosen, seen = median_round(rounds, "x")
    assert chosen is rounds[middle] and seen == ratios
    line = ratio_line(chosen, seen, "x", "tokens/s")
    assert line.startswith(f"ratio ours/hf (tokens/s), the median round's: {ratios[middle]:.3f} ")
    assert line.endswith(", ".join(f"{q:.3f}" for q in ratios) + ")")


def test_a_summary_leaves_the_warmup_steps_out():
    # step k ends at wall 10 + k^2: steps 2, 3, 4 (the timed ones) take 3, 5 and 7 s, 2 CPU-s and 100 faults each
    stamps = [Stamp(10.0 + k * k, 2.0 * k, 100 * k) for k in range(1, 5)]
    summary = summarize(stamps, tokens=[999, 10, 20, 30], warmup=1, batch=4)
    assert summary["timed_steps"] == 3 and summary["seconds"] == 15.0
    assert summary["real_tokens"] == 60 and summary["tokens_per_s"] == 4.0
    assert summary["sequences_per_s"] == pytest.approx(12 / 15)
    assert summary["median_step_s"] == 5.0
    assert summary["cpu_s_per_step"] == 2.0 and summary["minor_faults_per_step"] == 100.0


@pytest.mark.parametrize("argv, message", [(["--warmup", "0"], "--warmup must be in [1, --steps)"),
                                           (["--warmup", "30"], "--warmup must be in [1, --steps)"),
                                           (["--repeats", "0"], "--repeats must be at least 1")])
def test_the_timing_flags_refuse_a_run_that_would_time_nothing(argv, message, capsys):
    parser = cli_parser.Parser(prog="bench")
    add_timing_arguments(parser, steps=30)
    assert vars(parser.parse_args([])) == {"steps": 30, "warmup": 5, "repeats": 3}
    with pytest.raises(SystemExit) as exit_info:
        check_timing_arguments(parser, parser.parse_args(argv))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
