import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, run_script, tiny_config, write_config
from data import load_tokenizer, token_byte_lengths
from model import Transformer
from train import evaluation_metrics, evaluation_sums
from utils import ModelConfig, TrainingConfig, load_checkpoint, lr_at


def test_tiny_run_learns_and_logs_everything(trained_run):
    events = EventAccumulator(str(trained_run / "runs" / "test"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/bpb", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= scalars
    assert {"config", "sample"} <= {tag.split("/")[0] for tag in events.Tags()["tensors"]}
    train_loss = [e.value for e in events.Scalars("train/loss")]
    assert len(train_loss) == 10 and train_loss[-1] < train_loss[0] - 1.5, train_loss  # from ~8.3 nats
    lrs = [e.value for e in events.Scalars("lr")]
    schedule = TrainingConfig(warmup_steps=5, lr=3e-3, min_lr=3e-4)
    assert lrs == pytest.approx([lr_at(step - 1, schedule, 50) for step in range(5, 51, 5)], rel=1e-6)
    assert lrs[0] == pytest.approx(3e-3) and lrs[-1] < 3.1e-4  # warmup done at step 5, decayed to ~min_lr

    val_loss = {e.step: e.value for e in events.Scalars("val/loss")}
    assert sorted(val_loss) == [25, 50]
    best = load_checkpoint(str(trained_run / "ckpt" / "best.pth"))
    assert best["val_loss"] == pytest.approx(min(val_loss.values()))
    assert best["step"] == min(val_loss, key=val_loss.get)
    assert set(best) == {"model", "config", "step", "val_loss", "val_bpb"}  # weights only, no optimizer
    snapshot = load_checkpoint(str(trained_run / "ckpt" / "snapshot.pth"))
    assert snapshot["step"] == 50 and {"optimizer", "rng", "epoch", "batch_in_epoch"} <= set(snapshot)


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, corpus, trained_run):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, corpus, training={"save_every": 5}))
    snapshot_path = tmp_path / "ckpt" / "snapshot.pth"
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), str(config)], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not snapshot_path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)  # the hard way: no handler runs
    process.wait()
    killed_at = load_checkpoint(str(snapshot_path))["step"]
    assert 5 <= killed_at < 50, "the run must be killed after its first snapshot and before the end"

    resumed = run_script("train.py", str(config), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {snapshot_path}: step {killed_at}" in resumed.stdout
    final = load_checkpoint(str(snapshot_path))["model"]
    reference = load_checkpoint(str(trained_run / "ckpt" / "snapshot.pth"))["model"]
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[name], reference[name]) for name in final), "resume diverged from the uninterrupted run"


def test_finished_run_is_not_trained_again(trained_run):
    result = run_script("train.py", str(trained_run / "tiny.yaml"), cwd=trained_run)
    assert result.returncode == 0 and "nothing to train" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["tiny.yaml", "training.lr=-1"], "error: training.lr must be > 0"),
    (["tiny.yaml", "model.vocab_size=100"], "error: tokenizer .* has 4096 tokens but model.vocab_size is 100"),
    (["missing.yaml"], "error: config file 'missing.yaml' not found"),
])
def test_train_cli_errors_are_one_line(trained_run, args, message):
    before = (trained_run / "ckpt" / "best.pth").stat().st_mtime_ns
    result = run_script("train.py", *args, cwd=trained_run)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and re.search(message, error_lines[0]), result.stderr
    assert (trained_run / "ckpt" / "best.pth").stat().st_mtime_ns == before


def test_evaluate_reports_bits_per_byte_consistent_with_loss():
    tokenizer = load_tokenizer(str(REPO / "tokenizer" / "bpe_4096.json"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(embed_dim=32, num_heads=2, num_kv_heads=2, ff_dim=64, num_layers=1,
                                    max_seq_len=32))
    ids = torch.tensor(tokenizer.encode("But, soft! what light through yonder window breaks? " * 3).ids[:33])
    batches = [(ids[None, :-1], ids[None, 1:])]
    loss, bpb = evaluation_metrics(evaluation_sums(model, batches, token_byte_lengths(tokenizer),
                                                   torch.device("cpu"), "fp32"))
    num_bytes = token_byte_lengths(tokenizer)[ids[1:]].sum().item()
    assert bpb == pytest.approx(loss * 32 / (num_bytes * 0.6931471805599453), rel=1e-6)
