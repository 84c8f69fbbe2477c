"""The DeepSpeed trainer on real shards: it learns, and a stopped run resumes exactly."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import checkpoint
from pipeline.engine import free_port, linear_warmup_decay
from pipeline.train_config import TrainConfig
from pipeline.trainer import EXIT_STOPPED, Trainer, pretraining_losses

from . import faults
from .conftest import REPO, set_one_process_world


@pytest.fixture(autouse=True)
def one_process_world(monkeypatch):
    set_one_process_world(monkeypatch)


def config(data_dir, run_dir, **overrides):
    values = dict(data=data_dir, run_dir=str(run_dir), steps=8, global_batch_size=16, micro_batch_size=8,
                  learning_rate=2e-3, warmup_steps=2, log_every=100, mlflow=False)
    return TrainConfig.from_flat(**{**values, **overrides})


def losses_of(trainer, stop_at=None):
    losses = []

    def record(t, metrics):
        losses.append(metrics.loss)
        if stop_at is not None and t.step == stop_at:
            t.stop.requested = True  # what SIGTERM/SIGUSR1 set

    return losses, trainer.train(on_step=record)


def test_tiny_bert_learns_on_real_shards(data_dir, tmp_path):
    trainer = Trainer(config(data_dir, tmp_path, steps=40, warmup_steps=4))
    first, last = [], []

    def record(t, metrics):
        (first if t.step <= 5 else last if t.step > 35 else []).append(metrics)

    assert trainer.train(on_step=record) == 0
    assert sum(m.mlm_loss for m in last) / len(last) < sum(m.mlm_loss for m in first) / len(first) - 0.5
    # 40 steps learn the targets' frequencies: from 0 at the start (ln 4000 = 8.3 nats) to about the
    # share of the most frequent target (4.6% here), below which no use of context is shown. That a
    # longer run uses context is tested against that floor in tests/test_finetune_pretraining_helps.py.
    targets = np.concatenate(pq.read_table(os.path.join(data_dir, "shards"), columns=["masked_lm_ids"])
                             .column("masked_lm_ids").to_numpy(zero_copy_only=False))
    floor = np.bincount(targets).max() / len(targets)
    assert sum(m.mlm_accuracy for m in first) / len(first) < floor / 4
    assert sum(m.mlm_accuracy for m in last) / len(last) > floor / 2
    assert checkpoint.find_latest(os.path.join(tmp_path, "checkpoints")) == "step00000040"


def test_stopped_run_resumes_to_the_same_losses(data_dir, tmp_path):
    whole, code = losses_of(Trainer(config(data_dir, tmp_path / "whole")))
    assert code == 0 and len(whole) == 8

    first, code = losses_of(Trainer(config(data_dir, tmp_path / "split", log_every=2)), stop_at=3)
    assert code == EXIT_STOPPED and len(first) == 3
    # step 3, after the last log line at step 2, is logged at the stop (before: a gap in the history)
    assert [json.loads(line)["step"] for line in open(tmp_path / "split" / "metrics.jsonl")] == [2, 3]
    rest, code = losses_of(Trainer(config(data_dir, tmp_path / "split")))
    assert code == 0
    assert first + rest == whole  # exactly: same samples, same masks, same RNG, same optimizer state


def signal_during_save(trainer, at_step):
    """The steps ``trainer`` saves at, with a stop signal arriving inside its save at ``at_step``."""
    saved, save = [], trainer.save

    def save_and_signal():
        saved.append(trainer.step)
        if trainer.step == at_step:
            trainer.stop.requested = True  # the handler runs while the checkpoint is written
        return save()

    trainer.save = save_and_signal
    return saved


def test_a_stop_signal_during_a_periodic_save_stops_after_it_not_after_another_step(data_dir, tmp_path):
    trainer = Trainer(config(data_dir, tmp_path, checkpoint_every=2))
    saved = signal_during_save(trainer, 4)
    assert trainer.train() == EXIT_STOPPED
    # before: step 5 and a second save, past what SLURM's warning before its kill is sized for
    assert trainer.step == 4 and saved == [2, 4]
    assert checkpoint.find_latest(str(tmp_path / "checkpoints")) == checkpoint.tag_for(4)
    # the steps since the last log line are logged at the stop, as at any stop
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [4]


def test_a_stop_signal_after_the_last_step_requeues_before_the_final_evaluation(data_dir, tmp_path, caplog):
    trainer = Trainer(config(data_dir, tmp_path, steps=4, eval_shards=1))
    signal_during_save(trainer, 4)  # the final save, the last step's
    assert trainer.train() == EXIT_STOPPED and not trainer.final_eval
    # the requeued job resumes at the last step: it evaluates, trains nothing more, and says so plainly
    again = Trainer(config(data_dir, tmp_path, steps=4, eval_shards=1))
    with caplog.at_level(logging.INFO, logger="pipeline.trainer"):
        assert again.train() == 0 and again.step == 4 and again.final_eval["step"] == 4
    assert "resumed at step 4, the last (--steps 4): the checkpoint is evaluated and exported" in caplog.text
    assert "nothing to train" not in caplog.text


def test_a_signal_during_the_final_evaluation_is_said_as_what_it_leads_to(data_dir, tmp_path, monkeypatch, caplog):
    # before: "checkpointing at the end of this step", with no step left; the run then finished, exit 0
    import signal

    trainer = Trainer(config(data_dir, tmp_path, steps=2, eval_shards=1, eval_batches=1))
    evaluate = trainer.evaluate

    def signalled_first():
        os.kill(os.getpid(), signal.SIGUSR1)  # a time limit's warning, as SLURM sends it
        return evaluate()

    monkeypatch.setattr(trainer, "evaluate", signalled_first)
    with caplog.at_level(logging.WARNING, logger="pipeline.engine"):
        assert trainer.train() == 0
    assert (f"received signal {int(signal.SIGUSR1)}: the last step is saved (step00000002); the final evaluation "
            "and export finish, then the run ends") in caplog.text, caplog.text
    assert trainer.final_eval["step"] == 2


def test_a_resume_takes_this_runs_learning_rate_and_weight_decay(data_dir, tmp_path):
    assert Trainer(config(data_dir, tmp_path, steps=4, learning_rate=1e-3, weight_decay=0.01)).train() == 0
    # before: DeepSpeed restored the saved peak rate, so this run kept training at 1e-3
    trainer = Trainer(config(data_dir, tmp_path, steps=8, learning_rate=4e-4, weight_decay=0.05, log_every=1))
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.05, 0.0]
    assert trainer.train() == 0
    logged = {m["step"]: m["learning_rate"] for m in map(json.loads, open(tmp_path / "metrics.jsonl"))}
    schedule = linear_warmup_decay(8, 2)  # this run's --steps and --warmup-steps at the saved step
    for step in (5, 8):  # the rate step N's update used: the schedule at N - 1 updates done
        assert logged[step] == pytest.approx(4e-4 * schedule(step - 1), rel=1e-6)


def test_a_branch_from_an_earlier_tag_sets_the_later_ones_aside(data_dir, tmp_path):
    directory = str(tmp_path / "checkpoints")
    assert Trainer(config(data_dir, tmp_path, steps=6, checkpoint_every=2, keep_checkpoints=5)).train() == 0
    assert checkpoint.complete_tags(directory) == ["step00000002", "step00000004", "step00000006"]
    os.makedirs(os.path.join(directory, "step00000004" + checkpoint.UNIVERSAL))  # as a resume elsewhere made
    os.makedirs(tmp_path / "hf" / "step00000006")  # the first run's export, as pretrain.py writes it
    # Back to step 2 (a loss spike after it, say), on to step 3. Before: the save of step 3 was pruned
    # at once as older than step 6, and latest's fallback, --resume auto and the export took step 6.
    branch = Trainer(config(data_dir, tmp_path, steps=3, resume="2", keep_checkpoints=5))  # the step, or its tag
    assert branch.resume_tag == "step00000002" and branch.step == 2
    assert branch.train() == 0
    assert checkpoint.complete_tags(directory) == ["step00000002", "step00000003"]
    assert checkpoint.find_latest(directory) == "step00000003"
    assert sorted(n for n in os.listdir(directory) if n.startswith(checkpoint.ABANDONED)) == [
        "abandoned-step00000004", "abandoned-step00000004.universal", "abandoned-step00000006"]
    assert os.listdir(tmp_path / "hf") == ["abandoned-step00000006"]  # not the newest-looking export
    with pytest.raises(checkpoint.CheckpointError, match=r"--resume none: .* holds checkpoints of an earlier run "
                                                         r"\(step00000002 … step00000003\)"):
        Trainer(config(data_dir, tmp_path, steps=3, resume="none"))


def test_only_the_export_of_this_very_save_makes_a_rerun_a_finished_one(data_dir, tmp_path):
    """pretrain.py ends a rerun at once when the newest checkpoint passed --steps and hf/<tag> is
    the export of that very save (Trainer.finished_export); otherwise the run evaluates and exports."""
    from pipeline.export import export_checkpoint

    def finished(**overrides):
        trainer = Trainer(config(data_dir, tmp_path, **{"steps": 4, **overrides}))
        done = trainer.finished_export()
        if done is None:
            trainer.loader.close()
        return done

    assert Trainer(config(data_dir, tmp_path, steps=4, checkpoint_every=2, keep_checkpoints=5)).train() == 0
    assert finished() is None  # not exported yet (an export cut short leaves no training_info.json either)
    export_checkpoint(str(tmp_path), data_dir=data_dir)
    assert finished() == os.path.join(str(tmp_path), "hf", "step00000004")
    assert finished(steps=2, resume="2") is None  # an older tag than the newest, whose export this is not
    # Another branch's save of step 4 (from step 2 on): the export left from the first one is not its export.
    assert Trainer(config(data_dir, tmp_path, steps=4, resume="2", keep_checkpoints=5)).train() == 0
    assert checkpoint.find_latest(str(tmp_path / "checkpoints")) == "step00000004"
    assert finished() is None


def test_a_resume_that_changes_what_it_must_keep_stops_with_one_line(data_dir, tmp_path, capsys):
    from pipeline.pretrain import main as pretrain

    assert Trainer(config(data_dir, tmp_path, steps=2)).train() == 0
    tag = os.path.join(tmp_path, "checkpoints", "step00000002")
    # before: tracebacks, the micro-batch's only after the engine had loaded the checkpoint
    for flags, message in (
            (["--micro-batch-size", "4"], "was saved with --micro-batch-size giving 8, this run has 4"),
            (["--model", "mini"], "was saved with --model giving {'hidden_size': 64, 'intermediate_size': 256, "
                                  "'num_attention_heads': 2, 'num_hidden_layers': 2}, this run has {'hidden_size': 256"),
            (["--ds-config", os.path.join(REPO, "ds_configs", "cpu_fp32_zero0_torch-adamw.json")],
             "was saved with --ds-config's zero_optimization.stage giving 1 or 2, this run has 0"),
            # before: FileNotFoundError for bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt, a traceback
            (["--ds-config", os.path.join(REPO, "ds_configs", "cpu_bf16_zero2_torch-adamw.json")],
             "was saved with --ds-config's bf16/fp16 giving fp32, this run has bf16: a resume keeps it"),
            # another data dir, or the held-out shards given back to training (before: "--eval-shards" alone)
            (["--eval-shards", "0"], "was saved with --data and --eval-shards giving ")):
        code = pretrain(["--data", data_dir, "--run-dir", str(tmp_path), "--steps", "4", "--global-batch-size", "16",
                         "--micro-batch-size", "8", "--no-mlflow", *flags])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: {tag} {message}") and "Traceback" not in err, err[-2000:]


def test_a_resume_on_a_rebuilt_data_dir_says_so_and_on_a_moved_one_does_not(data_dir, tmp_path, caplog):
    def resumed_warnings(data):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.trainer"):
            trainer = Trainer(config(str(data), tmp_path / "run", steps=4))  # the check precedes any training
        trainer.loader.close()
        return caplog.messages

    assert Trainer(config(data_dir, tmp_path / "run", steps=2)).train() == 0
    moved = tmp_path / "moved"  # the same data dir elsewhere (a copy to node-local disk, say)
    shutil.copytree(data_dir, moved, ignore=shutil.ignore_patterns(".lock"))
    assert resumed_warnings(moved) == []
    # Preprocessing rerun into the same --output with the same tokenizer and rows, but other masks:
    # before, the requeued job went on on the new examples without a word.
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["masking"]["masked_lm_prob"] = 0.2
    manifest["seed"] = 7
    (moved / "manifest.json").write_text(json.dumps(manifest))
    assert resumed_warnings(moved) == [
        f"--data {moved} was rebuilt since checkpoint step00000002 was saved (manifest.json differs in masking, "
        "seed): training goes on from step 2 on the new examples, not the ones this run began with. For those, "
        "rerun preprocessing as it was into another --output and resume with that as --data"]


def test_the_logged_rates_count_training_time_and_the_rate_each_update_used(data_dir, tmp_path, monkeypatch):
    import time

    def slowed(method):
        def slow(self, *args, **kwargs):
            time.sleep(1.0)
            return method(self, *args, **kwargs)
        return slow

    # an evaluation and a save inside each window of 4 steps, a second each (before: counted in)
    monkeypatch.setattr(Trainer, "evaluate", slowed(Trainer.evaluate))
    monkeypatch.setattr(Trainer, "save", slowed(Trainer.save))
    stepping = []  # each optimizer step's own time: what a busy machine makes of the training itself
    train_step = Trainer.train_step

    def timed(self):
        began = time.monotonic()
        try:
            return train_step(self)
        finally:
            stepping.append(time.monotonic() - began)

    monkeypatch.setattr(Trainer, "train_step", timed)
    trainer = Trainer(config(data_dir, tmp_path, steps=8, warmup_steps=0, log_every=4, eval_every=2,
                             checkpoint_every=3))
    steps = []
    assert trainer.train(on_step=lambda t, metrics: steps.append(metrics)) == 0
    for m in steps:  # what mfu_executed and real_token_share are made of, as the loader counted them
        assert m.squared_tokens >= m.real_tokens ** 2 / m.sequences > 0
        assert m.squared_tokens <= m.sequences * 128 ** 2 and m.real_tokens <= m.padded_tokens <= m.sequences * 128
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    for i, line in enumerate(lines):  # 4 steps of 16 sequences: their own time, not the 2 s of sleeps
        assert 64 / line["sequences_per_second"] < sum(stepping[4 * i:4 * i + 4]) + 1.0, (line, stepping)
        assert 0.9 < line["real_token_share"] <= 1.0
    # the rate of the window's last update, not the next one's: linear decay from 2e-3 over 8 steps
    assert [line["learning_rate"] for line in lines] == pytest.approx([2e-3 * 5 / 8, 2e-3 * 1 / 8])


def test_an_eval_cadence_without_held_out_rows_is_warned_of(data_dir, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="pipeline.trainer"):
        trainer = Trainer(config(data_dir, tmp_path, steps=2, eval_shards=0, eval_every=1))
        assert trainer.train() == 0
    assert caplog.messages == ["--eval-every 1: nothing is held out (--eval-shards 0), so no evaluation runs; hold "
                               "out a shard with --eval-shards 1 (a small corpus: preprocess with --num-shards 2 or "
                               "more)"]
    assert not (tmp_path / "eval.jsonl").exists()


def test_time_based_checkpoints(data_dir, tmp_path):
    trainer = Trainer(config(data_dir, tmp_path, steps=3, checkpoint_minutes=1e-6, keep_checkpoints=5))
    assert trainer.train() == 0
    # due after every step; the end of the run does not save step 3 twice
    assert checkpoint.complete_tags(str(tmp_path / "checkpoints")) == ["step00000001", "step00000002",
                                                                        "step00000003"]
    first = (tmp_path / "eval.jsonl").read_text()
    assert Trainer(config(data_dir, tmp_path, steps=3)).train() == 0  # resumed at the end: nothing to do
    # its final evaluation again, the same figures, once in the file (before: a second step-3 line)
    assert (tmp_path / "eval.jsonl").read_text() == first and len(first.splitlines()) == 1


def test_a_partial_save_is_never_resumed_from(data_dir, tmp_path):
    losses_of(Trainer(config(data_dir, tmp_path, steps=2)))
    directory = os.path.join(tmp_path, "checkpoints")
    # A save killed midway: DeepSpeed's files began, no COMPLETE marker, latest not moved.
    os.makedirs(os.path.join(directory, "step00000003"))
    open(os.path.join(directory, "step00000003", "mp_rank_00_model_states.pt"), "wb").write(b"\0" * 10)
    assert checkpoint.find_latest(directory) == "step00000002"
    with open(os.path.join(directory, "latest"), "w") as f:
        f.write("step00000003")  # even a pointer at it is not trusted
    assert checkpoint.find_latest(directory) == "step00000002"


def test_held_out_shard_is_evaluated_and_never_trained_on(data_dir, tmp_path):
    import json

    trainer = Trainer(config(data_dir, tmp_path, steps=6, eval_every=3, eval_batches=4))
    manifest = trainer.manifest
    assert trainer.eval_shards == 1  # the default with 2 shards
    assert trainer.train_rows == manifest["shards"][0]["rows"]
    trained = trainer.sampler.epoch_batches(0)
    evaluated = np.concatenate(trainer.eval_rows)
    assert trained.max() < trainer.train_rows <= evaluated.min()
    # 4 global batches' worth of rows (64), in micro-batches of at most 8
    assert len(evaluated) == len(set(evaluated)) == 64 and [len(b) for b in trainer.eval_rows] == [8] * 8
    assert trainer.train() == 0
    evals = [json.loads(line) for line in open(tmp_path / "eval.jsonl")]
    assert [e["step"] for e in evals] == [3, 6]
    assert evals[-1]["eval_sequences"] == 64 and 0 < evals[-1]["eval_mlm_accuracy"] < 1
    nsp_hits = evals[-1]["eval_nsp_accuracy"] * 64  # a count of the 64 held-out pairs
    assert 0 < nsp_hits < 64 and nsp_hits == pytest.approx(round(nsp_hits))
    assert evals[-1]["eval_loss"] == pytest.approx(evals[-1]["eval_mlm_loss"] + evals[-1]["eval_nsp_loss"])
    assert trainer.final_eval["step"] == 6 and trainer.final_eval["eval_loss"] == evals[-1]["eval_loss"]
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in metrics)

    with pytest.raises(ValueError, match="--eval-shards 2: the data dir has 2 shard"):
        Trainer(config(data_dir, tmp_path / "all", eval_shards=2))


@pytest.fixture(scope="module")
def data_512(data_dir, preprocessed_sample):
    """The phase-2 corpus: the same text at 512 tokens, with phase 1's tokenizer."""
    return preprocessed_sample("--tokenizer", os.path.join(data_dir, "tokenizer", "spm.model"),
                               "--max-seq-length", "512", "--max-predictions-per-seq", "76", "--dupe-factor", "1",
                               "--num-shards", "2")


@pytest.fixture(scope="module")
def other_tokenizer_data(data_dir, tmp_path_factory):
    """data_dir under another tokenizer's fingerprint, as the corpus preprocessed again would have."""
    other = tmp_path_factory.mktemp("other-tokenizer") / "data"
    shutil.copytree(data_dir, other, ignore=shutil.ignore_patterns("flat"))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    return str(other)


def test_phase_two_starts_from_phase_one_weights_with_a_fresh_optimizer(data_dir, data_512, tmp_path):
    phase1 = Trainer(config(data_dir, tmp_path / "phase1", steps=30, warmup_steps=3))
    assert phase1.train() == 0
    weights = {k: v.clone() for k, v in phase1.engine.module.state_dict().items()}

    phase2 = Trainer(config(data_512, tmp_path / "phase2", steps=4, micro_batch_size=4, global_batch_size=8,
                            warmup_steps=2, init_from=str(tmp_path / "phase1")))
    assert phase2.init_info["init_from"].endswith("step00000030") and phase2.step == 0
    for name, value in phase2.engine.module.state_dict().items():
        assert torch.equal(value, weights[name]), name
    fresh = Trainer(config(data_512, tmp_path / "fresh", steps=4, micro_batch_size=4, global_batch_size=8,
                           warmup_steps=2))
    (continued, _), (scratch, _) = losses_of(phase2), losses_of(fresh)
    assert continued[0] < scratch[0] - 1.0  # it knows the language already
    assert phase2.scheduler.get_last_lr()[0] == pytest.approx(0)  # its own schedule ran to its end
    assert checkpoint.find_latest(str(tmp_path / "phase2" / "checkpoints")) == "step00000004"

    # A requeued phase-2 job resumes its own checkpoint, not phase 1's weights.
    again = Trainer(config(data_512, tmp_path / "phase2", steps=6, micro_batch_size=4, global_batch_size=8,
                           warmup_steps=2, init_from=str(tmp_path / "phase1")))
    assert again.step == 4  # its own checkpoint; the lineage its checkpoint recorded stays, for the run's tags
    assert again.init_info == {"init_from": phase2.init_info["init_from"]}  # (no MLflow run id: not tracked)


def test_phase_two_refuses_another_tokenizer(data_dir, other_tokenizer_data, tmp_path):
    losses_of(Trainer(config(data_dir, tmp_path / "phase1", steps=2)))
    with pytest.raises(ValueError, match="--init-from .* preprocess the phase-2 corpus with --tokenizer"):
        Trainer(config(other_tokenizer_data, tmp_path / "phase2", init_from=str(tmp_path / "phase1")))


def test_a_nan_loss_with_an_applied_update_stops_before_any_checkpoint_holds_it(data_dir, tmp_path,
                                                                                  monkeypatch):
    import json

    # ZeRO 0 in fp32 applies whatever the gradients are: the weights are poisoned at once.
    ds_config = tmp_path / "zero0.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 0},
                                     "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    faults.inject(monkeypatch, "nan-loss:5")
    trainer = Trainer(config(data_dir, tmp_path, steps=8, checkpoint_every=2, ds_config=str(ds_config)))
    with pytest.raises(FloatingPointError, match="loss is nan at step 5 and the update was applied"):
        trainer.train()
    assert checkpoint.complete_tags(str(tmp_path / "checkpoints")) == ["step00000002", "step00000004"]


@pytest.mark.parametrize("engine", [
    # The GPU bf16 configs turn DeepSpeed's per-tensor overflow check off (its small ops per tensor
    # were a large share of a step's host time); ZeRO then applies NaN gradients, and the trainer
    # must notice them from the gradient norm although the loss is finite.
    {"bf16": {"enabled": True, "check_grad_overflow": False}, "zero_optimization": {"stage": 1}},
    # ZeRO-0 in fp32 steps the plain optimizer, which reports no norm: the trainer computes it.
    {"zero_optimization": {"stage": 0}}], ids=["bf16-zero1-unchecked", "fp32-zero0"])
def test_nan_gradients_under_a_finite_loss_stop_a_run_whose_engine_applies_them(data_dir, tmp_path, monkeypatch,
                                                                                engine):
    import json

    ds_config = tmp_path / "engine.json"
    ds_config.write_text(json.dumps({**engine, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    faults.inject(monkeypatch, "nan-grad:5")
    # a checkpoint every step: step 5's would hold the NaN weights
    trainer = Trainer(config(data_dir, tmp_path, steps=8, checkpoint_every=1, keep_checkpoints=10,
                             ds_config=str(ds_config)))
    losses, applied = [], []
    with pytest.raises(FloatingPointError, match=r"the gradient norm is (nan|inf) \(loss [0-9.]+\) at step 5 and the "
                                                 "update was applied"):
        trainer.train(on_step=lambda t, m: (losses.append(m.loss), applied.append(m.applied)))
    assert np.isfinite(losses).all() and all(applied) and len(losses) == 5
    assert checkpoint.complete_tags(str(tmp_path / "checkpoints")) == [f"step0000000{s}" for s in range(1, 5)]


def test_zero0_logs_the_gradient_norm_and_metrics_are_strict_json(data_dir, tmp_path):
    """ZeRO-0's plain optimizer keeps no norm (it was NaN on every line, and metrics.jsonl held a bare
    NaN, which is not JSON): the trainer's own is the norm of the gradients DeepSpeed applied."""
    import json

    trainer = Trainer(config(data_dir, tmp_path, steps=3, log_every=1,
                             ds_config=os.path.join(REPO, "ds_configs", "cpu_fp32_zero0_torch-adamw.json")))
    norms = []

    def record(t, metrics):
        norms.append(metrics.grad_norm)

    original = trainer.engine.step

    def step_checking_the_norm():  # at the boundary, before the step zeroes the gradients
        if trainer.engine.is_gradient_accumulation_boundary():
            grads = [p.grad for p in trainer.engine.module.parameters() if p.grad is not None]
            expected.append(torch.nn.utils.get_total_norm(grads).item())
        original()

    expected = []
    trainer.engine.step = step_checking_the_norm
    assert trainer.train(on_step=record) == 0
    assert len(norms) == 3 and np.allclose(norms, expected, rtol=1e-5) and all(n > 0 for n in norms)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl")) for line in lines]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["grad_norm"] > 0 for r in rows)


def test_a_skipped_nan_step_is_survived_but_a_lasting_one_stops_the_run(data_dir, tmp_path, monkeypatch):
    # ZeRO 2 skips an update whose gradients are not finite, as the fp16 loss scaler does.
    faults.inject(monkeypatch, "nan-loss:3")
    trainer = Trainer(config(data_dir, tmp_path / "once", steps=5))
    losses, code = losses_of(trainer)
    assert code == 0 and np.isnan(losses[2]) and np.isfinite(losses[3:]).all()
    assert all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())

    monkeypatch.setenv("BERT_PIPELINE_FAULT", "nan-loss-from:3")
    trainer = Trainer(config(data_dir, tmp_path / "lasting", steps=20))
    with pytest.raises(FloatingPointError, match="non-finite for 10 steps in a row up to step 12"):
        trainer.train()


def test_updates_skipped_for_ever_under_a_finite_loss_stop_the_run(data_dir, tmp_path, monkeypatch):
    """An fp16 optimizer overflowing at its minimum loss scale skips every update while the loss
    stays finite; so does ZeRO's overflow check (the CPU config) on NaN gradients, here."""
    from pipeline import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "MAX_SKIPPED_UPDATES", 5)
    faults.inject(monkeypatch, "nan-grad-from:3")
    trainer = Trainer(config(data_dir, tmp_path, steps=20, log_every=4))
    seen = []
    with pytest.raises(FloatingPointError, match="5 updates in a row skipped up to step 7"):
        trainer.train(on_step=lambda t, m: seen.append((m.loss, m.applied, m.grad_norm)))
    assert [applied for _, applied, _ in seen] == [True, True] + [False] * 5
    assert np.isfinite([loss for loss, _, _ in seen]).all()
    # The first log window (2 applied updates, 2 skipped) reports the applied ones' mean norm.
    logged = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert logged["step"] == 4 and logged["grad_norm"] == pytest.approx(np.mean([n for *_, n in seen[:2]]))
    assert not np.isfinite(seen[2][2])



def _run_pretrain(args, nproc, tmp_path, launcher="torchrun", script=os.path.join(REPO, "pipeline", "pretrain.py")):
    """``script`` (pipeline/pretrain.py, or tests/pretrain_with_faults.py) on ``nproc`` processes:
    its metrics.jsonl."""
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    if launcher == "torchrun":
        start = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    else:  # DeepSpeed's launcher appends --local_rank=N to the script's arguments
        start = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}"]
    cmd = [*start, f"--master_port={free_port()}", script, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = args[args.index("--run-dir") + 1]
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.mark.e2e
@pytest.mark.parametrize("nproc", [1, 2])
def test_pretraining_on_the_cpu_needs_no_cpp_compiler(data_dir, tmp_path, nproc):
    """DeepSpeed compiled its shared-memory all-reduce at the first start on the CPU: a traceback
    without a compiler (a slim image), 30-100 s with one. One process builds nothing; several
    without a compiler all-reduce through gloo, said once."""
    ext = tmp_path / "torch_extensions"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env.update(CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(ext))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           os.path.join(REPO, "pipeline", "pretrain.py"), "--data", data_dir, "--run-dir", str(run_dir), "--steps", "2",
           "--global-batch-size", "8", "--micro-batch-size", str(8 // nproc), "--no-mlflow"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not ext.exists() and "built successfully" not in proc.stdout + proc.stderr  # nothing compiled
    assert (proc.stderr.count("no C++ compiler") == 1) == (nproc == 2), proc.stderr[-3000:]
    assert checkpoint.find_latest(str(run_dir / "checkpoints")) == checkpoint.tag_for(2)


@pytest.mark.e2e
def test_two_ranks_under_the_deepspeed_launcher_give_one_ranks_losses(data_dir, tmp_path):
    """gloo, ZeRO-2, the same global batch of 16: 1 rank x 2 micro-batches vs 2 ranks x 1 under
    the deepspeed launcher (which adds --local_rank=N; 2 ranks under torchrun are compared with 1
    in tests/test_resume_world_size.py)."""
    import json

    from pipeline.model import PRESETS

    model = tmp_path / "no-dropout.json"  # dropout draws differ per rank; the maths must not
    model.write_text(json.dumps({**PRESETS["tiny"], "hidden_dropout_prob": 0.0,
                                 "attention_probs_dropout_prob": 0.0}))
    common = ["--data", data_dir, "--model", str(model), "--steps", "6", "--global-batch-size", "16",
              "--micro-batch-size", "8", "--log-every", "1", "--no-mlflow", "--learning-rate", "2e-3",
              "--peak-tflops", "1"]
    one = _run_pretrain([*common, "--run-dir", str(tmp_path / "one")], 1, tmp_path)
    launched = _run_pretrain([*common, "--run-dir", str(tmp_path / "ds")], 2, tmp_path, launcher="deepspeed")
    assert [m["step"] for m in one] == [m["step"] for m in launched] == list(range(1, 7))
    for a, c in zip(one, launched):
        assert c["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
        # The rates count every rank's rows, the same rows as one rank's (rank 0's counts times 2
        # would give rank 0's mean length): real tokens per sequence and the FLOPs per sequence
        # behind both MFUs (over 2 GPUs' peak) are one rank's.
        assert c["real_tokens_per_second"] / c["sequences_per_second"] == pytest.approx(
            a["real_tokens_per_second"] / a["sequences_per_second"], rel=1e-9)
        for mfu in ("mfu_model", "mfu_executed"):
            assert 2 * c[mfu] / c["sequences_per_second"] == pytest.approx(a[mfu] / a["sequences_per_second"],
                                                                           rel=1e-9)
    assert one[-1]["loss"] < one[0]["loss"]


@pytest.mark.e2e
def test_sigterm_checkpoints_and_resume_finishes_the_same_run(data_dir, tmp_path, mlflow_server):
    """A real SIGTERM mid-run: exit code 3 after a checkpoint; rerunning finishes the steps
    with the losses of an uninterrupted run; MLflow records both runs against a real server."""
    import json
    import signal
    import time

    import mlflow

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env.update(MLFLOW_TRACKING_URI=mlflow_server, MASTER_PORT=str(free_port()))
    script = os.path.join(REPO, "pipeline", "pretrain.py")
    common = ["--data", data_dir, "--steps", "60", "--global-batch-size", "8", "--micro-batch-size", "8",
              "--log-every", "1", "--run-name", "sigterm"]
    whole_dir, split_dir = tmp_path / "whole", tmp_path / "split"
    proc = subprocess.Popen([sys.executable, script, *common, "--run-dir", str(split_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = split_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, out[-3000:]
    stopped_at = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 5 <= stopped_at < 60
    assert checkpoint.find_latest(str(split_dir / "checkpoints")) == checkpoint.tag_for(stopped_at)

    # Finish it with the same command (--resume auto), and run the same job uninterrupted.
    subprocess.run([sys.executable, script, *common, "--run-dir", str(split_dir)], env=env, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, script, *common, "--run-dir", str(whole_dir)], env=env, check=True,
                   capture_output=True)
    split = [json.loads(line) for line in metrics.read_text().splitlines()]
    whole = [json.loads(line) for line in (whole_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in split] == list(range(1, 61))
    assert [m["loss"] for m in split] == [m["loss"] for m in whole]
    # The same command once more: the finished run has nothing to do, and logs no MLflow run of eval
    # metrics alone (the statuses below stay three).
    evals = (split_dir / "eval.jsonl").read_text()
    again = subprocess.run([sys.executable, script, *common, "--run-dir", str(split_dir)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"{split_dir} already finished: its checkpoint step00000060 is at step 60 " \
        "(--steps 60) and exported to" in again.stderr, again.stderr[-3000:]
    assert (split_dir / "eval.jsonl").read_text() == evals and len(metrics.read_text().splitlines()) == 60

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("bert-pipeline").experiment_id],
                              filter_string="tags.stage = 'pretrain' and attributes.run_name = 'sigterm'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED", "KILLED"]
    done = next(r for r in runs if r.info.status == "FINISHED")
    assert done.data.params["world_size"] == "1" and done.data.params["global_batch_size"] == "8"
    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
    # an unknown id (the test data is preprocessed without MLflow) is left out, not written as "None"
    assert done.data.tags.get("data_run_id") == (str(manifest["data_run_id"]) if manifest["data_run_id"] else None)
    history = client.get_metric_history(done.info.run_id, "mlm_loss")
    assert len(history) >= 60 - stopped_at and {"sequences_per_second", "learning_rate", "mlm_accuracy"} <= set(done.data.metrics)
    assert {"ds_config.json", "final_eval.json", "model_config.json"} <= {a.path for a in
                                                                          client.list_artifacts(done.info.run_id)}
    # the architecture itself, not only the preset's name (tiny: 64 wide, 2 layers)
    from pipeline.model import build_model, model_config

    parameters = sum(p.numel() for p in build_model(model_config("tiny", manifest), sparse_mlm=True).parameters())
    assert {k: done.data.params[k] for k in ("model_hidden_size", "model_num_hidden_layers", "model_vocab_size",
                                             "model_parameters")} == {
        "model_hidden_size": "64", "model_num_hidden_layers": "2",
        "model_vocab_size": str(manifest["tokenizer"]["vocab_size"]), "model_parameters": str(parameters)}
    assert parameters > 64 * manifest["tokenizer"]["vocab_size"]  # the embeddings at least
    assert 0 < done.data.metrics["eval_mlm_accuracy"] < 1 and done.data.metrics["grad_norm"] > 0


@pytest.mark.e2e
def test_ctrl_c_checkpoints_at_the_end_of_the_step(data_dir, tmp_path):
    """Ctrl-C stops as SIGTERM does: the step ends, a checkpoint is written, exit 3, no traceback
    (before: a KeyboardInterrupt wherever the process was, and the steps since the last checkpoint
    lost)."""
    import json
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["MASTER_PORT"] = str(free_port())
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "pipeline", "pretrain.py"), "--data", data_dir,
                             "--steps", "60", "--global-batch-size", "8", "--micro-batch-size", "8", "--log-every", "1",
                             "--run-dir", str(tmp_path), "--no-mlflow"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as on a terminal
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED and "Traceback" not in out, out[-3000:]
    assert "Ctrl-C: checkpointing at the end of this step (Ctrl-C again stops at once, without it)" in out
    stopped_at = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert checkpoint.find_latest(str(tmp_path / "checkpoints")) == checkpoint.tag_for(stopped_at)
    saved = tmp_path / "checkpoints" / checkpoint.tag_for(stopped_at)
    assert f"stopped at step {stopped_at} with checkpoint {saved} saved; the same command resumes from it" in out


def test_kill_9_during_a_save_resumes_from_the_previous_checkpoint(data_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    env.update(MASTER_PORT=str(free_port()), BERT_PIPELINE_FAULT="kill-during-save:4")
    script = os.path.join(REPO, "pipeline", "pretrain.py")
    args = ["--data", data_dir, "--run-dir", str(tmp_path), "--steps", "6", "--global-batch-size", "8",
            "--micro-batch-size", "8", "--checkpoint-every", "2", "--no-mlflow"]
    faulty = os.path.join(REPO, "tests", "pretrain_with_faults.py")
    proc = subprocess.run([sys.executable, faulty, *args], env=env, capture_output=True, text=True)
    assert proc.returncode == -9
    directory = str(tmp_path / "checkpoints")
    assert os.path.isdir(os.path.join(directory, "step00000004"))  # written, never completed
    assert checkpoint.find_latest(directory) == "step00000002"
    env.pop("BERT_PIPELINE_FAULT")
    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step00000002 at step 2" in proc.stderr
    assert checkpoint.find_latest(directory) == "step00000006"
    assert not os.path.exists(os.path.join(directory, "step00000002"))  # pruned: keep 2 (4 and 6)


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/data"], "error: data dir /nonexistent/data does not exist"),
    (["--ds-config", "ds_configs/missing.json"], "error: --ds-config ds_configs/missing.json: no such file"),
    (["--global-batch-size", "12"], "error: --global-batch-size 12 is not divisible by --micro-batch-size 8"),
    (["--model", "huge"], "error: --model 'huge': not a preset"),
])
def test_bad_settings_fail_with_one_line(data_dir, tmp_path, args, message):
    base = {"--data": data_dir, "--run-dir": str(tmp_path / "run"), "--no-mlflow": None}
    argv = [a for k, v in base.items() if k not in args for a in ([k] if v is None else [k, v])] + args
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pipeline", "pretrain.py"), *argv], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_an_mpi_launch_without_world_size_is_refused_before_anything_starts(data_dir, tmp_path):
    # mpirun starts N copies; without WORLD_SIZE each would train alone as rank 0 into the same run dir.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pipeline", "pretrain.py"), "--data", data_dir,
                           "--run-dir", str(tmp_path / "run"), "--no-mlflow"], cwd=REPO, capture_output=True,
                          text=True, env={**env, "OMPI_COMM_WORLD_SIZE": "2"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: one of 2 processes (OMPI_COMM_WORLD_SIZE=2) without WORLD_SIZE" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "run")


def test_a_rank_without_a_gpu_of_its_local_rank_is_refused(monkeypatch):
    """A scheduler that gives each task its own GPU shows it as GPU 0 to every rank of a node. No GPU
    here: CUDA's answers are those of a process that sees one GPU."""
    from pipeline.engine import LaunchError, check_gpu_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    check_gpu_for(0)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    check_gpu_for(3)  # ranks on the CPU beside a GPU
    monkeypatch.delenv("DS_ACCELERATOR")
    with pytest.raises(LaunchError, match=r"LOCAL_RANK=3 but this process sees 1 GPU\(s\) \(CUDA_VISIBLE_DEVICES=5\)"):
        check_gpu_for(3)


def test_resuming_with_another_tokenizer_is_refused(data_dir, other_tokenizer_data, tmp_path):
    losses_of(Trainer(config(data_dir, tmp_path, steps=2)))
    with pytest.raises(ValueError, match="manifest field tokenizer.fingerprint"):
        Trainer(config(other_tokenizer_data, tmp_path, steps=4))


def test_rng_state_restores_every_generator_draw_for_draw():
    """What an exact resume rests on. The CUDA generator is saved only where CUDA runs
    (checked on a GPU machine, not here)."""
    import random

    import numpy as np
    import torch

    from pipeline import checkpoint

    state = checkpoint.rng_state()
    assert ("cuda" in state) == (torch.cuda.is_available() and torch.cuda.is_initialized())
    first = (random.random(), np.random.rand(), torch.rand(3).tolist())
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(3).tolist()) == first


def test_a_micro_batch_reads_no_tensor_on_the_host_in_this_project_or_transformers(data_dir, tmp_path, capsys):
    """On a GPU each such read is a wait for the device (tests/test_gpu.py checks the same with
    CUDA's sync debug mode); DeepSpeed's own are printed, not failed."""
    from .host_reads import HostReads

    trainer = Trainer(config(data_dir, tmp_path))
    trainer.train_step()
    batch = next(trainer.loader)
    assert not batch["attention_mask"].all()  # a padded batch: the mask is passed, not dropped
    with HostReads(REPO) as reads:
        mlm, nsp, counts = pretraining_losses(trainer.engine, batch)
        trainer.backward(mlm + nsp)
    with capsys.disabled():
        print("host reads in a micro-batch:", reads.sites or "none")
    assert not [s for s in reads.sites if s.startswith(("pipeline", "transformers"))], reads.sites
    trainer.loader.close()


def test_ctrl_c_before_the_ranks_meet_ends_the_run_with_nothing_saved_and_ctrl_c_is_python_s_again_after():
    """A Ctrl-C during start-up (a flag to fix, say) ends the run at the rendezvous: training a first
    step would have saved a checkpoint whose flags a rerun could no longer change. Once the steps
    are over (the export), Ctrl-C is a KeyboardInterrupt again, not a stop no step would see."""
    import signal

    code = ("import os, signal, sys; sys.path.insert(0, sys.argv[1])\n"
            "from pipeline.engine import StopFlag\n"
            "done = StopFlag('x'); done.install(); done.uninstall_interrupt()\n"
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
            "stop = StopFlag('checkpointing at the end of this step'); stop.install()\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "with stop.killable():\n    print('met')\n")
    proc = subprocess.run([sys.executable, "-c", code, REPO], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130 and "met" not in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: stopped by Ctrl-C before the ranks met: nothing to checkpoint"
