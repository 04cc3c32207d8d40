import fcntl
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import evaluation
import runtime
import train
from conftest import (
    REPO,
    assert_one_error_line,
    file_tree,
    pause_at_snapshot,
    run_main,
    run_script,
    tiny_config,
    write_config,
    write_conversations,
    write_task,
)
from chat import chat_format, render
from bpe import load_tokenizer
from data import IGNORE_INDEX, epoch_order, prepare_tokens, split_tokens
from model import Transformer
from checkpoints import load_checkpoint
from optim import lr_at
from utils import TrainingConfig, UserError, config_from_dict


def test_tiny_run_learns_and_logs_everything(trained_run):
    events = EventAccumulator(str(trained_run / "runs" / "test"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {
        "1_train/loss",
        "2_val/loss",
        "2_val/bpb",
        "1_train/lr",
        "1_train/grad_norm",
        "4_perf/tokens_per_sec",
        "4_perf/mfu",
    } <= scalars
    assert {"config", "sample"} <= {tag.split("/")[0] for tag in events.Tags()["tensors"]}
    # TensorBoard's Time Series page sorts the groups by name and opens the first two; the
    # hyperparameters are in the HPARAMS tab only, not a group of one-point cards.
    assert sorted({tag.split("/")[0] for tag in scalars}) == ["1_train", "2_val", "4_perf"]
    assert set(events.PluginTagToContent("hparams")) == {
        "_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    train_loss = [e.value for e in events.Scalars("1_train/loss")]
    assert (
        len(train_loss) == 10 and train_loss[-1] < train_loss[0] - 1.5
    ), train_loss  # from ~8.3 nats
    lrs = [e.value for e in events.Scalars("1_train/lr")]
    schedule = TrainingConfig(warmup_steps=5, lr=3e-3, min_lr=3e-4)
    assert lrs == pytest.approx(
        [lr_at(step - 1, (step - 6) / 45, schedule) for step in range(5, 51, 5)], rel=1e-6
    )
    assert (
        lrs[0] == pytest.approx(3e-3) and lrs[-1] < 3.1e-4
    )  # warmup done at step 5, decayed to ~min_lr

    val_loss = {e.step: e.value for e in events.Scalars("2_val/loss")}
    assert sorted(val_loss) == [25, 50]
    best = load_checkpoint(str(trained_run / "ckpt" / "best.pth"))
    assert best["val_loss"] == pytest.approx(min(val_loss.values()))
    assert events.Scalars("2_val/best_loss")[-1].value == pytest.approx(best["val_loss"])
    assert [e.step for e in events.Scalars("4_perf/eval_seconds")] == [25, 50]
    assert best["step"] == min(val_loss, key=val_loss.get)
    assert set(best) == {
        "model",
        "config",
        "tokenizer",
        "chat",
        "step",
        "run_id",
        "val_loss",
        "val_bpb",
    }  # weights only, no optimizer
    snapshot = load_checkpoint(str(trained_run / "ckpt" / "snapshot.pth"))
    assert set(snapshot) == {
        *("model", "optimizer", "scaler", "config", "tokenizer", "chat", "precision"),
        "progress",
        *("batch_plan", "rng"),
    }
    assert snapshot["precision"] == "fp32"
    assert snapshot["progress"]["step"] == 50 and snapshot["progress"]["run_name"] == "test"
    assert snapshot["progress"]["run_id"] == best["run_id"] and len(best["run_id"]) == 32
    assert (
        snapshot["batch_plan"]["processes"] == 1 and len(snapshot["rng"]) == 1
    )  # the format torchrun writes too


# Exact resume is checked on a short corpus (22 steps per epoch, 3 epochs), with dropout and
# accumulation on, so data order, RNG, optimizer and schedule all have to be restored.
RESUME_SETTINGS = {
    "model": {"dropout": 0.1},
    "data": {"batch_size": 4},
    "training": {
        "epochs": 3,
        "max_steps": 0,
        "grad_accum_steps": 2,
        "eval_every": 22,
        "save_every": 5,
    },
}


@pytest.fixture(scope="module")
def short_corpus(corpus, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("short") / "short.txt"
    path.write_text(corpus.read_text(encoding="utf-8")[:19000], encoding="utf-8")
    return path


def resume_config(workdir: Path, short_corpus: Path, **training) -> Path:
    settings = {section: dict(values) for section, values in RESUME_SETTINGS.items()}
    settings["training"].update(training)
    return write_config(workdir / "tiny.yaml", tiny_config(workdir, short_corpus, **settings))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, short_corpus) -> tuple[dict, int]:
    """(final weights, steps per epoch) of the run the interrupted ones must reproduce exactly."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = run_script("train.py", str(resume_config(workdir, short_corpus)), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    per_epoch = int(re.search(r"\((\d+) steps per epoch\)", result.stdout).group(1))
    assert per_epoch == 22, "the short corpus should give 22 steps per epoch"
    return load_checkpoint(str(workdir / "ckpt" / "snapshot.pth"))["model"], per_epoch


def start_training(config: Path, workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), str(config)],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_resumes_exactly(config: Path, workdir: Path, stopped_at: int, reference: dict) -> None:
    resumed = run_script("train.py", str(config), cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"resuming from {workdir / 'ckpt' / 'snapshot.pth'}: step {stopped_at}," in resumed.stdout
    )
    final = load_checkpoint(str(workdir / "ckpt" / "snapshot.pth"))["model"]
    assert final.keys() == reference.keys()
    assert all(
        torch.equal(final[name], reference[name]) for name in final
    ), "resume diverged from the reference"


@pytest.mark.parametrize("kill_point", ["early", "mid-epoch", "epoch boundary"])
def test_sigkill_at_any_point_then_resume_is_bitwise_exact(
    tmp_path, short_corpus, uninterrupted, kill_point
):
    reference, per_epoch = uninterrupted
    save_every, min_step = {
        "early": (5, 5),
        "mid-epoch": (5, per_epoch + 6),
        "epoch boundary": (per_epoch, per_epoch),
    }[kill_point]
    config = resume_config(tmp_path, short_corpus, save_every=save_every)
    process = start_training(config, tmp_path)
    snapshot = pause_at_snapshot(process, tmp_path / "ckpt" / "snapshot.pth", min_step)
    os.kill(
        process.pid, signal.SIGKILL
    )  # the hard way: no handler runs, whatever it was doing is lost
    process.wait()
    micro_batches_per_epoch = 2 * per_epoch
    if kill_point == "early":
        assert snapshot["epoch"] == 0 and snapshot["step"] < per_epoch
    elif kill_point == "mid-epoch":
        assert snapshot["epoch"] == 1 and 0 < snapshot["batch_in_epoch"] < micro_batches_per_epoch
    else:  # the resumed run has to roll over into the next epoch first
        assert snapshot["epoch"] == 0 and snapshot["batch_in_epoch"] == micro_batches_per_epoch
    assert_resumes_exactly(config, tmp_path, snapshot["step"], reference)


def test_sigkill_mid_epoch_then_resume_with_muon_is_bitwise_exact(tmp_path, short_corpus):
    """Both optimizers' state (AdamW's moments, Muon's momentum) is in the snapshot."""
    reference_dir = tmp_path / "uninterrupted"
    reference_dir.mkdir()
    reference_config = resume_config(reference_dir, short_corpus, optimizer="muon")
    result = run_script("train.py", str(reference_config), cwd=reference_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = load_checkpoint(str(reference_dir / "ckpt" / "snapshot.pth"))["model"]
    config = resume_config(tmp_path, short_corpus, save_every=5, optimizer="muon")
    process = start_training(config, tmp_path)
    snapshot = pause_at_snapshot(process, tmp_path / "ckpt" / "snapshot.pth", 28)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert snapshot["epoch"] == 1 and snapshot["batch_in_epoch"] > 0
    assert_resumes_exactly(config, tmp_path, snapshot["step"], reference)


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_finish_the_step_save_and_exit(
    tmp_path, short_corpus, uninterrupted, signum, exit_code
):
    reference, per_epoch = uninterrupted
    config = resume_config(
        tmp_path, short_corpus, save_every=1000
    )  # only the stop itself writes a snapshot
    process = start_training(config, tmp_path)
    pause_at_snapshot(process, tmp_path / "ckpt" / "best.pth", per_epoch)  # first eval: mid-run
    os.kill(process.pid, signum)
    os.kill(process.pid, signal.SIGCONT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == exit_code, stderr[-2000:]
    stopped_at = load_checkpoint(str(tmp_path / "ckpt" / "snapshot.pth"))["progress"]["step"]
    assert per_epoch <= stopped_at < 3 * per_epoch
    name = signal.Signals(signum).name
    assert (
        f"stopped by {name} after step {stopped_at}; snapshot saved to" in stderr
        and "Traceback" not in stderr
    )
    events = EventAccumulator(str(tmp_path / "runs" / "test"))
    events.Reload()
    assert events.Scalars("1_train/loss"), "TensorBoard events were not flushed on the way out"
    assert_resumes_exactly(config, tmp_path, stopped_at, reference)


def test_nan_loss_stops_at_its_step_and_keeps_the_saved_files(tmp_path, trained_run):
    shutil.copytree(trained_run / "ckpt", tmp_path / "ckpt")
    saved = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").glob("*.pth")}
    config = tiny_config(tmp_path, trained_run / "missing.txt")
    config["data"]["raw_text_path"] = load_checkpoint(str(tmp_path / "ckpt" / "best.pth"))[
        "config"
    ]["data"]["raw_text_path"]
    config["training"].update(max_steps=100, lr=1000.0, min_lr=0.0, grad_clip=0.0)
    result = run_script("train.py", str(write_config(tmp_path / "tiny.yaml", config)), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and re.match(
        r"error: training loss became nan/inf at step (\d+) \(lr .*, fp32\)", error[0]
    )
    assert (
        int(re.search(r"at step (\d+)", error[0]).group(1)) > 50
    )  # the run resumed at 50, then blew up
    assert "lower training.lr" in error[0] and "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == saved | {
        p.name: p.read_bytes() for p in (tmp_path / "ckpt").glob(".*.lock")
    }  # only the run's lock files (holding its pid) were rewritten


def test_finished_run_is_not_trained_again(trained_run):
    result = run_script("train.py", str(trained_run / "tiny.yaml"), cwd=trained_run)
    assert result.returncode == 0 and "nothing to train" in result.stdout
    assert ("point training.snapshot_path and training.checkpoint_path at new paths to start "
            "over") in result.stdout  # a new snapshot path alone meets another run's best model


def test_a_fresh_run_never_replaces_another_runs_best_model(trained_run, tmp_path, corpus):
    (tmp_path / "ckpt").mkdir()
    shutil.copy(trained_run / "ckpt" / "best.pth", tmp_path / "ckpt")  # its snapshot is gone
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, corpus))
    before = file_tree(tmp_path)
    result = run_script("train.py", str(config), cwd=tmp_path)
    assert_one_error_line(
        result.returncode, result.stderr,
        r"training.checkpoint_path '.*best.pth' holds another run's best model \(its step \d+\), "
        "which this run, starting from step 0, would replace — move the file away, or set "
        "another training.checkpoint_path")
    assert file_tree(tmp_path) == before
    elsewhere = run_script("train.py", str(config), "training.max_steps=5",
                           f"training.checkpoint_path={tmp_path / 'new' / 'best.pth'}",
                           cwd=tmp_path)
    assert elsewhere.returncode == 0, elsewhere.stderr[-2000:]


def test_train_gives_back_the_signal_handlers_and_output_locks_it_took(tmp_path, short_corpus):
    """As a notebook, a sweep script or pytest calls it: Ctrl-C and SIGTERM work afterwards,
    whether train() returned or raised."""

    def callers_handler(signum: int, frame: object) -> None:
        pass

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, callers_handler) for signum in signals}
    try:
        config = tiny_config(tmp_path, short_corpus, training={
            "max_steps": 4, "eval_every": 4, "save_every": 4})
        train.train(config_from_dict(config), torch.device("cpu"))
        assert [signal.getsignal(signum) for signum in signals] == [callers_handler] * 2
        config["training"].update(max_steps=100, lr=1000.0, min_lr=0.0, grad_clip=0.0)
        with pytest.raises(UserError, match="training loss became nan/inf"):
            train.train(config_from_dict(config), torch.device("cpu"))
        assert [signal.getsignal(signum) for signum in signals] == [callers_handler] * 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for lock in (tmp_path / "ckpt").glob(".*.lock"):
        with open(lock, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a lock is still held


def write_text(name: str, content: bytes) -> Callable[[Path, Path], None]:
    def setup(workdir: Path, trained_run: Path) -> None:
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_bytes(content)

    return setup


def make_directory(name: str) -> Callable[[Path, Path], None]:
    return lambda workdir, trained_run: (workdir / name).mkdir(parents=True)


def resumable(damage: bool = False) -> Callable[[Path, Path], None]:
    """Put trained_run's checkpoints in place (optionally with every kept save cut short)."""

    def setup(workdir: Path, trained_run: Path) -> None:
        shutil.copytree(trained_run / "ckpt", workdir / "ckpt")
        for snapshot in (workdir / "ckpt").glob("snapshot*.pth") if damage else ():
            snapshot.write_bytes(snapshot.read_bytes()[:4000])

    return setup


@pytest.mark.parametrize(
    "argv, setup, message",
    [
        (
            ["broken.yaml"],
            write_text("broken.yaml", b"model:\n  embed_dim: 64\n  num_heads: [4\n"),
            r"malformed YAML in broken.yaml at line 4",
        ),
        (
            ["modle.yaml"],
            write_text("modle.yaml", b"modle:\n  embed_dim: 64\n"),
            "did you mean 'model'",
        ),
        (
            ["empty.yaml"],
            write_text("empty.yaml", b"# nothing but a comment\n"),
            "config file 'empty.yaml' is empty",
        ),
        (
            ["tiny.yaml"],
            write_text("ckpt/best.pth", b"my notes, not a checkpoint\n"),
            "training.checkpoint_path .*best.pth' exists and is not an SLM checkpoint",
        ),
        (
            ["tiny.yaml"],
            make_directory("ckpt/snapshot.pth"),
            r"training.snapshot_path .*snapshot.pth' is a directory — give a file path",
        ),
        (
            ["tiny.yaml", "training.init_from=ckpt/best.pth",
             "training.checkpoint_path=ckpt/best.pth"],
            resumable(),
            "training.init_from and training.checkpoint_path are both",
        ),
        (
            ["tiny.yaml", "training.max_step=30"],
            None,
            "unknown config key 'training.max_step' — did you mean 'training.max_steps'",
        ),
        (["tiny.yaml", "model.num_layers=two"], None, "model.num_layers must be int, got 'two'"),
        (["tiny.yaml", "training.lr=0"], None, r"training.lr must be in \(0, 1000\]"),
        (["tiny.yaml", "training.lr=-3e-4"], None, r"training.lr must be in \(0, 1000\]"),
        (["tiny.yaml", "data.val_split=1.5"], None, r"data.val_split must be in \(0, 1\)"),
        (
            ["tiny.yaml", "model.embed_dim=66"],
            None,
            r"embed_dim \(66\) is not divisible by model.num_heads \(4\)",
        ),
        (
            ["tiny.yaml", "model.num_kv_heads=3"],
            None,
            r"num_heads \(4\) is not divisible by model.num_kv_heads \(3\)",
        ),
        (
            ["tiny.yaml", "data.context_length=128"],
            None,
            r"context_length \(128\) > model.max_seq_len \(64\)",
        ),
        (["tiny.yaml", "data.batch_size=0"], None, r"data.batch_size must be in \[1, 65536\]"),
        (
            ["tiny.yaml", "max_steps=30"],
            None,
            "bad override 'max_steps=30' — write section.key=value",
        ),
        (["tiny.yaml", "training.max_steps"], None, "bad override 'training.max_steps'"),
        (["missing.yaml"], None, "config file 'missing.yaml' not found"),
        (
            ["tiny.yaml", "data.raw_text_path=nope.txt"],
            None,
            "no text found at data.raw_text_path='nope.txt'",
        ),
        (["tiny.yaml", "data.tokenizer_path=nope.json"], None, "tokenizer 'nope.json' not found"),
        (
            ["tiny.yaml", "data.raw_text_path=empty.txt"],
            write_text("empty.txt", b""),
            "the corpus at 'empty.txt' is empty",
        ),
        (
            ["tiny.yaml", "data.raw_text_path=short.txt"],
            write_text("short.txt", "To be.".encode()),
            "too short for one train and one val window",
        ),
        (
            ["tiny.yaml", "data.raw_text_path=latin1.txt"],
            write_text("latin1.txt", "O Romeo, café".encode("latin-1")),
            r"latin1.txt is not valid UTF-8 \(byte offset 12\)",
        ),
        (
            ["tiny.yaml", "model.vocab_size=100"],
            None,
            "tokenizer .* has 4096 tokens but model.vocab_size is 100",
        ),
        (
            ["tiny.yaml", "model.num_layers=3"],
            resumable(),
            r"was trained with a different model \(num_layers=2 vs 3",
        ),
        (
            ["tiny.yaml", "training.max_steps=80"],
            resumable(damage=True),
            r"no save at .*snapshot.pth can be resumed \(.*snapshot.pth cannot be read \(File is "
            r"not a zip file\)",
        ),
        (
            ["tiny.yaml", "training.checkpoint_path=/proc/self/ckpt/best.pth"],
            None,
            "cannot write to /proc/self",
        ),
        (["tiny.yaml", "training.eval_tasks=[hellaswag]"], None, "unknown task 'hellaswag'"),
        (
            ["tiny.yaml", "training.eval_tasks=[missing.jsonl]"],
            None,
            "task file 'missing.jsonl' not found",
        ),
    ],
)
def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path, corpus, trained_run, monkeypatch, capsys, argv, setup, message
):
    write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, corpus))
    if setup:
        setup(tmp_path, trained_run)
    before = file_tree(tmp_path)
    code, _, stderr = run_main(train.main, argv, tmp_path, monkeypatch, capsys)
    assert_one_error_line(code, stderr, message)
    assert file_tree(tmp_path) == before


def test_the_real_entry_point_prints_one_line_without_traceback(trained_run):
    result = run_script("train.py", "tiny.yaml", "model.num_heads=5", cwd=trained_run)
    assert_one_error_line(
        result.returncode, result.stderr, r"embed_dim \(64\) is not divisible by model.num_heads"
    )


def test_time_budget_run_ends_at_the_budget_with_eval_checkpoint_and_snapshot(tmp_path, corpus):
    config = write_config(
        tmp_path / "tiny.yaml",
        tiny_config(
            tmp_path,
            corpus,
            training={
                "time_budget_s": 4.0,
                "max_steps": 20,
                "eval_every": 100000,
                "save_every": 100000,
            },
        ),
    )
    result = run_script("train.py", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 s budget" in result.stdout
    snapshot = load_checkpoint(str(tmp_path / "ckpt" / "snapshot.pth"))["progress"]
    best = load_checkpoint(str(tmp_path / "ckpt" / "best.pth"))
    assert snapshot["step"] > 20, "the budget replaces max_steps"
    assert best["step"] == snapshot["step"], "the final eval runs at the last step"
    mean_step = snapshot["train_seconds"] / snapshot["step"]
    # It ends less than a mean step short of the budget, and past it by no more than a slow last
    # step (twice the mean) on a busy machine.
    assert 4.0 - mean_step <= snapshot["train_seconds"] < 4.0 + 2 * mean_step
    events = EventAccumulator(str(tmp_path / "runs" / "test"))
    events.Reload()
    lrs = [e.value for e in events.Scalars("1_train/lr")]
    assert lrs[-1] < 0.5 * max(
        lrs
    ), "the cosine is laid out over the budget, so it has decayed by the end"
    assert lrs[-1] < lrs[-2] < lrs[-3], "and it decays all the way to the end"
    again = run_script("train.py", str(config), cwd=tmp_path)
    assert again.returncode == 0 and "nothing to train" in again.stdout

    longer = run_script("train.py", str(config), "training.time_budget_s=7", cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert (
        f"resuming from {tmp_path / 'ckpt' / 'snapshot.pth'}: step {snapshot['step']},"
        in longer.stdout
    )
    resumed = load_checkpoint(str(tmp_path / "ckpt" / "snapshot.pth"))["progress"]
    assert resumed["step"] > snapshot["step"]
    assert 7.0 - 2 * mean_step <= resumed["train_seconds"] < 7.0 + 2 * mean_step
    events.Reload()
    lrs_after = [e.value for e in events.Scalars("1_train/lr")][len(lrs) :]
    assert lrs_after[0] > lrs[-1], "a larger budget puts the resumed run back earlier on its cosine"
    assert lrs_after[-1] < 0.5 * max(lrs), "and the cosine ends at the new budget"


def test_a_step_without_a_trained_target_moves_no_weight_but_counts(tmp_path, monkeypatch,
                                                                     capsys):
    """Conversations whose one-word replies leave most 16-token windows without an assistant
    token: such a step counts (the schedule and the data move on) but moves no weight, where
    Muon's and AdamW's momentum and weight decay would."""
    turn = " ".join(["Wherefore art thou, and whither goest thou now?"] * 6)
    corpus = tmp_path / "chat.jsonl"
    corpus.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"{turn} {i}"}, {"role": "assistant", "content": "Aye."}]})
        + "\n" for i in range(80)))
    config = tiny_config(tmp_path, corpus, data={"batch_size": 1, "context_length": 16},
                         training={"max_steps": 16, "optimizer": "muon", "eval_every": 16,
                                   "save_every": 16})
    steps, forward_backward = [], train.forward_backward

    def record_targets_and_weights(model, x, y, *args):
        weights = [param.detach().clone() for param in model.parameters()]
        steps.append((int((y != IGNORE_INDEX).sum()), weights))
        return forward_backward(model, x, y, *args)

    monkeypatch.setattr(train, "forward_backward", record_targets_and_weights)
    train.train(config_from_dict(config), torch.device("cpu"))
    skipped = [targets == 0 for targets, _ in steps]
    assert len(steps) == 16 and 0 < sum(skipped[:-1]) < 15, skipped
    for (targets, before), (_, after) in zip(steps, steps[1:]):
        unchanged = all(torch.equal(old, new) for old, new in zip(before, after))
        assert unchanged == (targets == 0)
    printed = re.findall(r"step (\d+): no trained target in any rank's batches",
                         capsys.readouterr().out)
    assert [int(step) for step in printed] == [i + 1 for i, skip in enumerate(skipped) if skip]
    assert load_checkpoint(config["training"]["snapshot_path"])["progress"]["step"] == 16


def keep_snapshot_of_step(monkeypatch, step: int, copy_path: Path) -> Path:
    """Make train.py's snapshots also leave a copy of the one written at `step` in copy_path."""
    save_snapshot = train.save_snapshot_across_ranks

    def save_and_keep(path, model, *args):
        save_snapshot(path, model, *args)
        if args[-2]["step"] == step:  # the run state
            shutil.copy(path, copy_path)

    monkeypatch.setattr(train, "save_snapshot_across_ranks", save_and_keep)
    return copy_path


@pytest.mark.parametrize(
    "precision, compile_model, optimizer",
    [
        ("fp32", False, "adamw"),
        ("bf16", False, "adamw"),
        ("fp16", False, "adamw"),
        ("fp32", True, "adamw"),
        ("fp32", False, "muon"),
    ],
    ids=["fp32", "bf16", "fp16 with GradScaler", "fp32 compiled", "fp32 Muon"],
)
def test_each_precision_and_compile_learns_and_resumes_bitwise(
    tmp_path, short_corpus, monkeypatch, precision, compile_model, optimizer
):
    """Every training path the CPU can run: autocast in the step, eval and TensorBoard sample,
    the GradScaler's state in the snapshot, the compiled step."""
    settings = {"max_steps": 12, "save_every": 6, "eval_every": 6, "log_every": 2}
    settings.update(precision=precision, compile=compile_model, optimizer=optimizer)

    def run_config(workdir: Path):
        return config_from_dict(tiny_config(workdir, short_corpus, training=settings))

    halfway = keep_snapshot_of_step(monkeypatch, 6, tmp_path / "halfway.pth")
    train.train(run_config(tmp_path / "straight"), torch.device("cpu"))
    events = EventAccumulator(str(tmp_path / "straight" / "runs" / "test"))
    events.Reload()
    losses = [e.value for e in events.Scalars("1_train/loss")]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0] - 0.3, losses
    assert [e.step for e in events.Scalars("2_val/loss")] == [6, 12]
    assert len(events.Tensors("sample/text_summary")) == 2

    (tmp_path / "resumed" / "ckpt").mkdir(parents=True)
    shutil.copy(halfway, tmp_path / "resumed" / "ckpt" / "snapshot.pth")
    train.train(run_config(tmp_path / "resumed"), torch.device("cpu"))
    final, reference = (
        load_checkpoint(str(tmp_path / run / "ckpt" / "snapshot.pth"))
        for run in ("resumed", "straight")
    )
    assert final["progress"]["step"] == 12 and final["scaler"] == reference["scaler"]
    for name, weights in final["model"].items():
        if compile_model:  # Inductor's CPU kernels are not bitwise reproducible run to run
            assert torch.allclose(weights, reference["model"][name], rtol=0, atol=1e-5), name
        else:
            assert torch.equal(weights, reference["model"][name]), name


def test_logged_rates_count_training_time_only(tmp_path, short_corpus, monkeypatch):
    """An evaluation made to take a second is logged as 4_perf/eval_seconds and counts in no
    tokens/s (nor MFU, its multiple): every log interval's training time stays under it."""
    settings = {"max_steps": 6, "log_every": 2, "eval_every": 2, "save_every": 2}
    config = tiny_config(tmp_path, short_corpus, training=settings)
    evaluate_and_keep_best = train.evaluate_and_keep_best_across_ranks

    def slow_evaluation(*args):
        time.sleep(1.0)
        return evaluate_and_keep_best(*args)

    monkeypatch.setattr(train, "evaluate_and_keep_best_across_ranks", slow_evaluation)
    train.train(config_from_dict(config), torch.device("cpu"))
    events = EventAccumulator(str(tmp_path / "runs" / "test"))
    events.Reload()
    rates = events.Scalars("4_perf/tokens_per_sec")
    tokens_per_interval = 2 * config["data"]["batch_size"] * config["data"]["context_length"]
    assert [e.step for e in rates] == [2, 4, 6]
    assert all(tokens_per_interval / e.value < 1.0 for e in rates), [e.value for e in rates]
    assert [e.step for e in events.Scalars("4_perf/eval_seconds")] == [2, 4, 6]
    assert all(e.value >= 1.0 for e in events.Scalars("4_perf/eval_seconds"))


def measured(monkeypatch, bf16_seconds: float, measure: bool = False,
             bf16_peak: float = 4e11) -> list[str]:
    """Inject what `precision: auto` and Muon's dtype measure on a CPU: matmul peaks (fp32
    1e11), bf16 steps at `bf16_seconds` per fp32 second on a quiet machine; with `measure`,
    the real step timing runs too. Returns the precisions timed."""
    timed, real_step_seconds = [], train.step_seconds

    def step_seconds(model, config, device, newton_schulz):
        timed.extend(["fp32", "bf16"])
        if measure:
            real_step_seconds(model, config, device, newton_schulz, rounds=1)
        return {"fp32": [1.0], "bf16": [bf16_seconds]}

    peaks = {"fp32": 1e11, "bf16": bf16_peak}
    monkeypatch.setattr(train, "measure_peak_flops", lambda device, name: peaks[name])
    monkeypatch.setattr(train, "step_seconds", step_seconds)
    monkeypatch.setattr(runtime, "with_others_share", lambda measure: (measure(), 0.0))
    return timed


@pytest.mark.parametrize("bf16_seconds, choice", [(0.5, "bf16"), (0.95, "fp32")])
def test_auto_precision_on_a_cpu_is_measured_once_stored_and_kept_on_resume(
    tmp_path, short_corpus, monkeypatch, capsys, bf16_seconds, choice
):
    settings = {"max_steps": 6, "save_every": 6, "eval_every": 6, "precision": "auto"}
    config = tiny_config(tmp_path, short_corpus, training=settings)
    timed = measured(monkeypatch, bf16_seconds)
    train.train(config_from_dict(config), torch.device("cpu"))
    assert timed == ["fp32", "bf16"]
    assert f"precision auto: {choice} (this model's median training step: fp32 1,000 ms" in (
        capsys.readouterr().out
    )
    snapshot = load_checkpoint(config["training"]["snapshot_path"])
    assert snapshot["precision"] == choice
    config["training"]["max_steps"] = 8  # the resume: no new measurement, the stored choice
    train.train(config_from_dict(config), torch.device("cpu"))
    assert timed == ["fp32", "bf16"] and "precision auto" not in capsys.readouterr().out
    assert load_checkpoint(config["training"]["snapshot_path"])["precision"] == choice
    other = "fp32" if choice == "bf16" else "bf16"
    config["training"].update(precision=other, max_steps=10)
    with pytest.raises(UserError, match=f"training.precision={other} but .* was trained in "
                       f"{choice} — set training.precision={choice} \\(or auto\\)"):
        train.train(config_from_dict(config), torch.device("cpu"))


def test_a_fresh_run_of_the_same_config_takes_the_first_runs_choice_without_timing(
    tmp_path, short_corpus, monkeypatch, capsys
):
    settings = {"max_steps": 2, "save_every": 2, "eval_every": 2, "precision": "auto"}
    timed, lines = measured(monkeypatch, 0.5), []
    for run in ("first", "second"):
        config = tiny_config(tmp_path / run, short_corpus, training=settings)
        train.train(config_from_dict(config), torch.device("cpu"))
        lines += [line for line in capsys.readouterr().out.splitlines()
                  if line.startswith("precision auto:")]
        assert load_checkpoint(config["training"]["snapshot_path"])["precision"] == "bf16"
    assert timed == ["fp32", "bf16"] and len(lines) == 2 and lines[0] == lines[1]


def test_an_auto_run_that_measures_fp32_trains_bitwise_as_an_fp32_run(
    tmp_path, short_corpus, monkeypatch
):
    """The measurement works on copies and draws no random number: the run is untouched."""
    ends = []
    for precision in ("auto", "fp32"):
        settings = {"max_steps": 6, "save_every": 6, "eval_every": 6, "precision": precision}
        settings["optimizer"] = "muon"
        config = tiny_config(tmp_path / precision, short_corpus, training=settings)
        config["model"]["dropout"] = 0.1  # dropout would show any draw from the RNG
        measured(monkeypatch, 0.95, measure=True)
        train.train(config_from_dict(config), torch.device("cpu"))
        ends.append(load_checkpoint(config["training"]["snapshot_path"])["model"])
    assert all(torch.equal(ends[0][name], ends[1][name]) for name in ends[0])


def test_muon_orthogonalises_in_fp32_where_bf16_matmuls_are_slow_and_resumes_in_its_dtype(
    tmp_path, short_corpus, monkeypatch, capsys
):
    """The bf16 peak forced low: Muon's Newton-Schulz runs in fp32, the snapshot says so, and
    a resume keeps fp32 though the gate now passes, finishing bitwise as the straight run."""
    settings = {"max_steps": 8, "save_every": 4, "eval_every": 4, "optimizer": "muon"}
    straight = tiny_config(tmp_path / "straight", short_corpus, training=settings)
    halfway = keep_snapshot_of_step(monkeypatch, 4, tmp_path / "halfway.pth")
    measured(monkeypatch, 1.0, bf16_peak=1e9)
    train.train(config_from_dict(straight), torch.device("cpu"))
    assert "(fp32, Muon orthogonalising in fp32)" in capsys.readouterr().out
    reference = load_checkpoint(straight["training"]["snapshot_path"])
    assert reference["optimizer"][1]["param_groups"][0]["newton_schulz_dtype"] == "fp32"

    resumed = tiny_config(tmp_path / "resumed", short_corpus, training=settings)
    os.makedirs(os.path.dirname(resumed["training"]["snapshot_path"]))
    shutil.copy(halfway, resumed["training"]["snapshot_path"])
    measured(monkeypatch, 1.0, bf16_peak=4e11)  # this start's gate would choose bf16
    train.train(config_from_dict(resumed), torch.device("cpu"))
    assert "Muon orthogonalising in fp32" in capsys.readouterr().out
    final = load_checkpoint(resumed["training"]["snapshot_path"])
    assert final["progress"]["step"] == 8
    assert all(torch.equal(final["model"][name], weights)
               for name, weights in reference["model"].items())


def test_eval_tasks_are_scored_printed_and_logged_at_each_eval(tmp_path, corpus):
    """training.eval_tasks: each eval prints and logs acc and acc_norm per task; the best
    checkpoint is still the one with the lowest validation loss."""
    task = write_task(tmp_path / "lines.jsonl", 6)
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, corpus, training={
        "max_steps": 10, "eval_every": 5, "eval_tasks": [str(task)]}))
    result = run_script("train.py", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = re.findall(r"  lines: acc ([\d.]+), acc_norm ([\d.]+) \(6 examples\)",
                         result.stdout + result.stderr)
    assert len(printed) == 2
    events = EventAccumulator(str(tmp_path / "runs" / "test"))
    events.Reload()
    for metric, column in (("acc", 0), ("acc_norm", 1)):
        values = events.Scalars(f"3_eval/lines/{metric}")
        assert [e.step for e in values] == [5, 10]
        assert [f"{e.value:.4f}" for e in values] == [line[column] for line in printed]
    val_loss = {e.step: e.value for e in events.Scalars("2_val/loss")}
    best = load_checkpoint(str(tmp_path / "ckpt" / "best.pth"))
    assert best["step"] == min(val_loss, key=val_loss.get)


CONVERSATION_SETTINGS = {  # accumulation over micro-batches with unequal assistant counts
    "data": {"batch_size": 4},
    "training": {"max_steps": 24, "grad_accum_steps": 2, "log_every": 1, "eval_every": 12,
                 "save_every": 4, "sample_tokens": 6},
}


def conversation_config(workdir: Path, corpus: Path) -> Path:
    return write_config(workdir / "chat.yaml",
                        tiny_config(workdir, corpus, **CONVERSATION_SETTINGS))


@pytest.fixture(scope="module")
def conversation_run(tmp_path_factory) -> tuple[Path, Path]:
    """(workdir, corpus) of a finished 24-step run on conversations."""
    workdir = tmp_path_factory.mktemp("chat")
    corpus = write_conversations(workdir / "chat.jsonl", 300)
    result = run_script("train.py", str(conversation_config(workdir, corpus)), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (workdir / "stdout.txt").write_text(result.stdout)
    return workdir, corpus


def test_a_conversation_run_trains_and_evaluates_on_the_assistant_tokens_only(conversation_run):
    """The first step's logged loss is the mean cross-entropy over the assistant's targets of
    both its micro-batches, computed here by hand from the cached mask; the val line says what
    it counts, and TensorBoard's sample is the reply to a fixed user turn."""
    workdir, corpus = conversation_run
    assert "bits/byte (assistant tokens)" in (workdir / "stdout.txt").read_text()
    events = EventAccumulator(str(workdir / "runs" / "test"))
    events.Reload()
    logged = events.Scalars("1_train/loss")[0].value

    config = config_from_dict(tiny_config(workdir, corpus, **CONVERSATION_SETTINGS))
    data = config.data
    tokens, mask = prepare_tokens(data, load_tokenizer(data.tokenizer_path))
    train_set, _ = split_tokens(tokens, data, mask)
    torch.manual_seed(config.training.seed)
    model = Transformer(config.model)
    T = data.context_length
    starts = [i * T for i in epoch_order(len(train_set), 7, 0)[: 2 * data.batch_size]]
    x = torch.tensor(np.stack([tokens[s : s + T] for s in starts]).astype(np.int64))
    y = torch.tensor(np.stack([tokens[s + 1 : s + T + 1] for s in starts]).astype(np.int64))
    trained = torch.tensor(np.stack([mask[s + 1 : s + T + 1] for s in starts]) > 0)
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(
            model(x)[0].flatten(0, 1), y.flatten(), reduction="none"
        ).view_as(trained)
    counts = trained[: data.batch_size].sum(), trained[data.batch_size :].sum()
    assert 0 < counts[0] != counts[1] > 0 and trained.sum() < trained.numel()
    assert logged == pytest.approx(losses[trained].mean().item(), rel=1e-6)
    # At initialisation every loss is near ln(vocab): the other rules differ only slightly.
    assert logged != pytest.approx(losses.mean().item(), rel=1e-5)
    micro_means = [losses[:4][trained[:4]].mean(), losses[4:][trained[4:]].mean()]
    assert logged != pytest.approx(sum(micro_means).item() / 2, rel=1e-5)

    sample = events.Tensors("sample/text_summary")[0].tensor_proto.string_val[0].decode()
    chat = chat_format(data.tokenizer_path)
    asked = render(chat, [{"role": "user", "content": evaluation.SAMPLE_TURN}], True)
    assert sample.startswith(asked) and len(sample) > len(asked)
    assert load_checkpoint(str(workdir / "ckpt" / "best.pth"))["chat"]["template"] == (
        chat.template
    )


def test_sigkill_then_resume_of_a_conversation_run_is_bitwise_exact(tmp_path, conversation_run):
    reference_dir, corpus = conversation_run
    reference = load_checkpoint(str(reference_dir / "ckpt" / "snapshot.pth"))["model"]
    config = conversation_config(tmp_path, corpus)
    process = start_training(config, tmp_path)
    snapshot = pause_at_snapshot(process, tmp_path / "ckpt" / "snapshot.pth", 8)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert_resumes_exactly(config, tmp_path, snapshot["step"], reference)
