"""data_parallel_train.py under real torchrun with 2 CPU processes (gloo)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import (
    REPO,
    assert_one_error_line,
    parent_pid,
    pause_at_snapshot,
    run_main,
    run_script,
    sharded_weights,
    signal_tree,
    tiny_config,
    torchrun_command,
    write_config,
    write_conversations,
    write_task,
)
from checkpoints import load_checkpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from bpe import load_tokenizer
from data import IGNORE_INDEX, epoch_order, prepare_tokens, split_tokens
from model import Transformer
from utils import ModelConfig, config_from_dict

DDP_STEPS = {"max_steps": 20, "eval_every": 10, "save_every": 10}


def torchrun(config: Path, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_command(config, nproc),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert path.exists(), "no snapshot was written"


def final_weights(workdir: Path) -> dict:
    """The weights of the run's snapshot, a file or (FSDP) a directory of shards."""
    if (workdir / "ckpt" / "snapshot").is_dir():
        return sharded_weights(workdir / "ckpt" / "snapshot")
    return load_checkpoint(str(workdir / "ckpt" / "snapshot.pth"))["model"]


def assert_resumed_exactly(
    resumed: subprocess.CompletedProcess, workdir: Path, stopped_at: int, reference: Path
) -> None:
    """The run resumed from its snapshot at `stopped_at` and ended with `reference`'s weights."""
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    snapshot = next(path for path in (workdir / "ckpt").iterdir() if path.stem == "snapshot")
    assert f"resuming from {snapshot}: step {stopped_at}," in resumed.stdout
    expected = final_weights(reference)
    assert all(
        torch.equal(tensor, expected[name]) for name, tensor in final_weights(workdir).items()
    )


def stop_after_a_snapshot(command: list[str], workdir: Path, name: str = "snapshot.pth") -> int:
    """Run `command` until a snapshot at step >= 4 is on disk, then kill -9 it and its children
    (torchrun's workers too); returns the snapshot's step."""
    process = subprocess.Popen(
        command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    progress = pause_at_snapshot(process, workdir / "ckpt" / name, 4)
    signal_tree(process.pid, signal.SIGKILL)
    process.wait()
    return progress["step"]


def with_eval_task(workdir: Path) -> dict:
    """DDP_STEPS plus an eval task of 9 examples (2 ranks score 5 and 4 of them) and 3
    validation batches (2 and 1): under FSDP, where each forward meets the other ranks, their
    unequal shares must not hang."""
    task = write_task(workdir / "romeo.jsonl", 9)
    return {**DDP_STEPS, "eval_tasks": [str(task)], "eval_batches": 3}


def logged_losses(workdir: Path) -> list[float]:
    events = EventAccumulator(str(workdir / "runs" / "test"))
    events.Reload()
    return [event.value for event in events.Scalars("1_train/loss")]


def task_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("  romeo: acc")]


def parallel_run(workdir: Path, corpus: Path, **training) -> Path:
    """A 2-rank torchrun run of DDP_STEPS with an eval task, its output kept in output.txt."""
    config = write_config(workdir / "tiny.yaml", tiny_config(
        workdir, corpus, training={**with_eval_task(workdir), **training}))
    result = torchrun(config, workdir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (workdir / "output.txt").write_text(result.stdout + result.stderr)
    return workdir


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, corpus) -> Path:
    return parallel_run(tmp_path_factory.mktemp("ddp"), corpus)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, corpus) -> Path:
    workdir = tmp_path_factory.mktemp("fsdp")
    return parallel_run(workdir, corpus, parallelism="fsdp",
                        snapshot_path=str(workdir / "ckpt" / "snapshot"))


@pytest.fixture(scope="module")
def accumulation_run(tmp_path_factory, corpus) -> Path:
    """One process taking the 2-rank runs' global batch as 2 micro-steps."""
    workdir = tmp_path_factory.mktemp("accumulation")
    config = write_config(workdir / "tiny.yaml", tiny_config(
        workdir, corpus, training={**with_eval_task(workdir), "grad_accum_steps": 2}))
    result = run_script("train.py", str(config), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (workdir / "output.txt").write_text(result.stdout + result.stderr)
    return workdir


def test_two_process_run_writes_checkpoint_snapshot_and_logs(ddp_run):
    best = load_checkpoint(str(ddp_run / "ckpt" / "best.pth"))
    assert not any(name.startswith("module.") for name in best["model"])  # unwrapped weights
    snapshot = load_checkpoint(str(ddp_run / "ckpt" / "snapshot.pth"))
    assert (
        snapshot["progress"]["step"] == 20
        and snapshot["batch_plan"]["processes"] == 2
        and len(snapshot["rng"]) == 2
    )
    assert len(list((ddp_run / "runs" / "test").iterdir())) >= 1  # rank 0 wrote TensorBoard


def test_infer_loads_the_ddp_checkpoint(ddp_run):
    result = run_script(
        "infer.py",
        "--ckpt_path",
        "ckpt/best.pth",
        "--prompt",
        "MACBETH:",
        "--max-length",
        "10",
        "--seed",
        "0",
        cwd=ddp_run,
    )
    assert result.returncode == 0 and result.stdout.startswith("MACBETH:"), result.stderr[-2000:]


def test_the_fsdp_best_checkpoint_is_one_file_that_exports_with_logit_parity(fsdp_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    best = fsdp_run / "ckpt" / "best.pth"
    exported = run_script("export.py", "--ckpt_path", str(best), "--out", str(tmp_path / "hf"),
                          cwd=fsdp_run)
    assert exported.returncode == 0, exported.stderr[-2000:]
    checkpoint = load_checkpoint(str(best))
    ours = Transformer(ModelConfig(**checkpoint["config"]["model"]))
    ours.load_state_dict(checkpoint["model"])
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (theirs(tokens).logits - ours.eval()(tokens)[0]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_with_twice_the_accumulation(ddp_run, fsdp_run,
                                                                 accumulation_run, parallelism):
    """Same global batches: 2 ranks x accum 1 vs train.py with accum 2 -> the same logged
    losses, weights and eval task scores (the ranks split the examples and the validation
    batches, 2 and 1), printed once by rank 0."""
    run = {"ddp": ddp_run, "fsdp": fsdp_run}[parallelism]
    single_lines = task_lines((accumulation_run / "output.txt").read_text())
    assert len(single_lines) == 2 and "(9 examples)" in single_lines[0]
    output = (run / "output.txt").read_text()
    assert task_lines(output) == single_lines
    assert [int(step) for step in re.findall(r"^step (\d+): val loss", output, re.MULTILINE)
            ] == [10, 20]
    assert logged_losses(run) == pytest.approx(logged_losses(accumulation_run), rel=1e-5)
    single = load_checkpoint(str(accumulation_run / "ckpt" / "best.pth"))["model"]
    best = load_checkpoint(str(run / "ckpt" / "best.pth"))["model"]
    for name in single:
        assert torch.allclose(single[name], best[name], atol=1e-5, rtol=0), name
    assert not torch.equal(
        single["norm.weight"], torch.ones_like(single["norm.weight"])
    )  # it did train


def test_a_conversation_run_on_two_ranks_equals_one_process_with_twice_the_accumulation(
    tmp_path, monkeypatch, capsys
):
    """The loss is the mean over the assistant tokens of the whole step: ranks with unequal
    numbers of them take the same step as one process accumulating both batches."""
    conversations = write_conversations(tmp_path / "chat.jsonl", 300)
    runs = {}
    for name, settings in (("ddp", {}), ("single", {"grad_accum_steps": 2})):
        workdir = tmp_path / name
        workdir.mkdir()
        config = tiny_config(workdir, conversations, training={**DDP_STEPS, **settings})
        path = write_config(workdir / "tiny.yaml", config)
        if name == "ddp":
            result = torchrun(path, workdir)
            assert result.returncode == 0, result.stderr[-3000:]
        else:
            code, _, stderr = run_main(train.main, [str(path)], workdir, monkeypatch, capsys)
            assert code == 0, stderr[-3000:]
        runs[name] = final_weights(workdir)
    data = config_from_dict(config).data
    tokens, mask = prepare_tokens(data, load_tokenizer(data.tokenizer_path))
    train_set, _ = split_tokens(tokens, data, mask)
    first_batches = [epoch_order(len(train_set), 7, 0, rank, 2)[: data.batch_size]
                     for rank in (0, 1)]
    trained = [sum(int((train_set[i][1] != IGNORE_INDEX).sum()) for i in batch)
               for batch in first_batches]
    assert trained[0] != trained[1], "the ranks' first batches should differ in assistant tokens"
    for name, weights in runs["single"].items():
        assert torch.allclose(weights, runs["ddp"][name], atol=1e-5, rtol=0), name


def test_muon_and_activation_checkpointing_under_ddp_and_fsdp_equal_one_process(tmp_path,
                                                                                corpus):
    """Muon's update on FSDP's shards (each matrix gathered whole, orthogonalised, cut again)
    equals the unsharded one, and activation checkpointing changes no number."""
    runs, muon = {}, {**DDP_STEPS, "optimizer": "muon"}
    for name, settings in (("ddp", {"activation_checkpointing": True}),
                           ("fsdp", {"activation_checkpointing": True, "parallelism": "fsdp",
                                     "snapshot_path": str(tmp_path / "fsdp" / "snapshot")}),
                           ("single", {"grad_accum_steps": 2})):
        workdir = tmp_path / name
        workdir.mkdir()
        config = write_config(
            workdir / "tiny.yaml", tiny_config(workdir, corpus, training={**muon, **settings})
        )
        result = (
            run_script("train.py", str(config), cwd=workdir)
            if name == "single"
            else torchrun(config, workdir)
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = load_checkpoint(str(workdir / "ckpt" / "best.pth"))["model"]
    # Muon orthogonalises in bf16 where this CPU multiplies bf16 fast, which turns the rounding
    # of two gradient summation orders into ~1e-5 of the logged losses and ~1e-3 of the weights
    # after 20 steps (AdamW's agree to 1e-5 in both: the test above).
    for parallelism in ("ddp", "fsdp"):
        assert logged_losses(tmp_path / parallelism) == pytest.approx(
            logged_losses(tmp_path / "single"), rel=3e-5)
        for name, weights in runs["single"].items():
            assert torch.allclose(weights, runs[parallelism][name], atol=3e-3, rtol=0), name


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_resume_after_kill_9_matches_uninterrupted_run(ddp_run, fsdp_run, tmp_path, corpus,
                                                       parallelism):
    name = {"ddp": "snapshot.pth", "fsdp": "snapshot"}[parallelism]
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, corpus, training={
        **DDP_STEPS, "save_every": 2, "parallelism": parallelism,
        "snapshot_path": str(tmp_path / "ckpt" / name)}))
    stopped_at = stop_after_a_snapshot(
        torchrun_command(config), tmp_path, name
    )  # torchrun and both workers
    assert 4 <= stopped_at < 20
    reference = {"ddp": ddp_run, "fsdp": fsdp_run}[parallelism]
    assert_resumed_exactly(torchrun(config, tmp_path), tmp_path, stopped_at, reference)


def test_sigterm_to_torchrun_saves_a_snapshot_that_resumes_exactly(ddp_run, tmp_path, corpus):
    """What a cluster scheduler does at the end of a job: SIGTERM to the launcher, passed on."""
    config = write_config(
        tmp_path / "tiny.yaml",
        tiny_config(tmp_path, corpus, training={**DDP_STEPS, "save_every": 1000}),
    )
    launcher = subprocess.Popen(
        torchrun_command(config),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(tmp_path / "ckpt" / "best.pth", launcher)  # the first eval, at step 10
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
    stopped_at = load_checkpoint(str(tmp_path / "ckpt" / "snapshot.pth"))["progress"]["step"]
    assert 10 <= stopped_at < 20
    assert (
        stderr.count(f"stopped by SIGTERM after step {stopped_at}; snapshot saved to") == 1
    ), stderr[-3000:]
    assert_resumed_exactly(torchrun(config, tmp_path), tmp_path, stopped_at, ddp_run)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["training.lr=-1"],
            "error: training.lr must be in (0, 1000], got -1.0 — pick a value in that range",
        ),
        (
            ["training.lr=1000", "training.min_lr=0", "training.grad_clip=0"],
            "error: training loss became nan/inf at step ",
        ),
        (  # found by rank 0 while rank 1 waits for its data in the store
            ["data.raw_text_path=missing.txt"],
            "error: no text found at data.raw_text_path='missing.txt'",
        ),
        (
            ["training.parallelism=fsdp", "training.precision=fp16"],
            "error: training.parallelism=fsdp does not train in fp16: the GradScaler would look "
            "for inf in each rank's shard alone — use training.precision=bf16 or fp32",
        ),
    ],
)
def test_errors_under_torchrun_are_one_line_from_rank_0(tmp_path, corpus, overrides, message):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, corpus, training=DDP_STEPS))
    result = subprocess.run(
        torchrun_command(config) + overrides,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and ours[0].startswith(message), result.stderr[-3000:]
    assert (
        'data_parallel_train.py", line' not in result.stderr
    )  # torchrun's own report follows, ours is one line
    assert not (tmp_path / "ckpt" / "snapshot.pth").exists()


RANK_1_ELSEWHERE = """
import os, runpy, sys
if os.environ["RANK"] == "1":  # a node that sees other storage at the snapshot's path
    sys.argv.append("training.snapshot_path=elsewhere/snapshot.pth")
sys.path.insert(0, sys.argv.pop(1))
runpy.run_path(os.path.join(sys.path[0], "data_parallel_train.py"), run_name="__main__")
"""


def test_ranks_that_see_different_snapshots_stop_with_one_line(ddp_run, tmp_path, corpus):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(
        tmp_path, corpus, training={**DDP_STEPS, "max_steps": 30}))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "snapshot.pth").write_bytes((ddp_run / "ckpt" / "snapshot.pth")
                                                    .read_bytes())
    launcher = tmp_path / "rank_1_elsewhere.py"
    launcher.write_text(RANK_1_ELSEWHERE)
    command = torchrun_command(config)
    command[-2:] = [str(launcher), str(REPO), str(config)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    size = (tmp_path / "ckpt" / "snapshot.pth").stat().st_size
    assert ours == [f"error: ranks disagree on the snapshot to resume (rank 0: snapshot.pth "
                    f"({size:,} bytes); rank 1: no snapshot at elsewhere/snapshot.pth) — put "
                    "training.snapshot_path on storage every rank can see, at the same path"], \
        result.stderr[-3000:]


def test_a_time_budget_ends_every_rank_on_the_same_step_inside_the_budget(tmp_path, corpus):
    config = write_config(
        tmp_path / "tiny.yaml",
        tiny_config(
            tmp_path, corpus, training={**DDP_STEPS, "time_budget_s": 3.0, "eval_every": 100000,
                                        "save_every": 100000}
        ),
    )
    # No save before the end: a save's fsync, slow while the disk flushes other tests' files,
    # would count in the step after it, past the mean step the budget rule leaves.
    result = torchrun(config, tmp_path)  # a rank stopping a step early would hang the other
    assert result.returncode == 0, result.stderr[-3000:]
    progress = load_checkpoint(str(tmp_path / "ckpt" / "snapshot.pth"))["progress"]
    mean_step = progress["train_seconds"] / progress["step"]
    # a step early: the budget rule; up to two late: the last step's noise, and gloo's waits
    assert progress["step"] > 20
    assert 3.0 - mean_step <= progress["train_seconds"] < 3.0 + 2 * mean_step


def test_elastic_restart_after_rank_0_is_killed(tmp_path, corpus):
    """Rank 0 is the hard case: its replacement must not read the dead group's addresses."""
    config = write_config(
        tmp_path / "tiny.yaml",
        tiny_config(tmp_path, corpus, training={**DDP_STEPS, "max_steps": 40, "save_every": 2}),
    )
    launcher = subprocess.Popen(
        torchrun_command(config, 2, "--max-restarts=1"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(tmp_path / "ckpt" / "snapshot.pth", launcher)
    workers = {
        _rank(int(pid)): int(pid)
        for pid in os.listdir("/proc")
        if pid.isdigit() and parent_pid(int(pid)) == launcher.pid
    }
    assert sorted(workers) == ["0", "1"]
    os.kill(workers["0"], signal.SIGKILL)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output[-3000:]
    assert "resuming from" in output
    assert load_checkpoint(str(tmp_path / "ckpt" / "snapshot.pth"))["progress"]["step"] == 40


def _rank(pid: int) -> str:
    with open(f"/proc/{pid}/environ", "rb") as f:
        variables = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return variables.get(b"RANK", b"?").decode()


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, corpus) -> Path:
    workdir = tmp_path_factory.mktemp("one")
    config = write_config(
        workdir / "tiny.yaml", tiny_config(workdir, corpus, training={**DDP_STEPS, "save_every": 2})
    )
    result = run_script("train.py", str(config), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.parametrize("first, then", [("train.py", "torchrun"), ("torchrun", "train.py")])
def test_one_snapshot_format_resumes_under_either_entry_point(
    one_process_run, tmp_path, corpus, first, then
):
    config = write_config(
        tmp_path / "tiny.yaml",
        tiny_config(tmp_path, corpus, training={**DDP_STEPS, "save_every": 2}),
    )
    commands = {
        "train.py": [sys.executable, str(REPO / "train.py"), str(config)],
        "torchrun": torchrun_command(config, 1),
    }
    stopped_at = stop_after_a_snapshot(commands[first], tmp_path)
    assert 4 <= stopped_at < 20
    resumed = subprocess.run(
        commands[then], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert_resumed_exactly(resumed, tmp_path, stopped_at, one_process_run)


def test_a_changed_global_batch_is_one_error_line(ddp_run):
    plain = run_script("train.py", "tiny.yaml", cwd=ddp_run)  # a 2-rank snapshot, one process
    assert_one_error_line(
        plain.returncode,
        plain.stderr,
        r"snapshot.pth trained on 16 windows per step \(8 x 1 x 2 process\(es\)\) and this run "
        r"takes 8, so its batches cannot be replayed — keep data.batch_size x "
        r"training.grad_accum_steps x processes = 16, e.g. training.grad_accum_steps=2, or point",
    )


def resume_elsewhere(run: Path, workdir: Path, corpus: Path, nproc: int, max_steps: int,
                     **training) -> Path:
    """Continue `run`'s snapshot in `workdir` on `nproc` processes to `max_steps`, at a
    constant learning rate (a cosine's would depend on max_steps)."""
    snapshot = "snapshot" if (run / "ckpt" / "snapshot").is_dir() else "snapshot.pth"
    copy = shutil.copytree if snapshot == "snapshot" else shutil.copy
    (workdir / "ckpt").mkdir(parents=True)
    copy(run / "ckpt" / snapshot, workdir / "ckpt" / snapshot)
    settings = {**DDP_STEPS, "max_steps": max_steps, "eval_every": 5, "log_every": 5,
                "lr": 3e-4, "min_lr": 3e-4,
                "snapshot_path": str(workdir / "ckpt" / snapshot), **training}
    config = write_config(workdir / "tiny.yaml", tiny_config(workdir, corpus, training=settings))
    result = torchrun(config, workdir, nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_a_snapshot_resumes_on_another_number_of_ranks_when_the_global_batch_is_kept(
        ddp_run, fsdp_run, tmp_path, corpus, parallelism):
    """2 ranks -> 1 rank with 2x accumulation -> 2 ranks again goes where 2 ranks go straight
    (dropout 0: only the summation order differs)."""
    run = {"ddp": ddp_run, "fsdp": fsdp_run}[parallelism]
    kind = {"parallelism": parallelism}
    straight = resume_elsewhere(run, tmp_path / "straight", corpus, 2, 30, **kind)
    one = resume_elsewhere(run, tmp_path / "one", corpus, 1, 25, grad_accum_steps=2, **kind)
    back = resume_elsewhere(one, tmp_path / "back", corpus, 2, 30, **kind)
    losses = logged_losses(straight)
    assert logged_losses(one) + logged_losses(back) == pytest.approx(losses, rel=1e-5)
    assert len(losses) == 2  # steps 25 and 30
    final = {name: sharded_weights(path / "ckpt" / "snapshot") if parallelism == "fsdp"
             else load_checkpoint(str(path / "ckpt" / "snapshot.pth"))["model"]
             for name, path in (("straight", straight), ("back", back))}
    for name, weights in final["straight"].items():
        assert torch.allclose(weights, final["back"][name], atol=1e-5, rtol=0), name


def test_plain_python_is_refused(ddp_run):
    plain = run_script("data_parallel_train.py", "tiny.yaml", cwd=ddp_run)
    assert_one_error_line(
        plain.returncode,
        plain.stderr,
        "^error: data_parallel_train.py must be launched by torchrun",
    )
    sharded = run_script("train.py", "tiny.yaml", "training.parallelism=fsdp", cwd=ddp_run)
    assert_one_error_line(
        sharded.returncode,
        sharded.stderr,
        r"^error: training.parallelism=fsdp shards the model over torchrun's processes — launch "
        r"torchrun --standalone --nproc_per_node=1 data_parallel_train.py configs.yaml",
    )


PATCHED_PREPARE = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import data_parallel_train, distributed
from utils import UserError, run_cli
prepare_data, mode = distributed.prepare_data, sys.argv[2]

def patched(config):
    if mode == "slow" and os.environ["LOCAL_RANK"] == "0":  # tokenizing outlasts the timeout
        time.sleep(14)
    if mode == "fail" and os.environ["LOCAL_RANK"] == "1":  # a problem only rank 1 finds
        raise UserError("rank 1 cannot read its corpus — fix it")
    return prepare_data(config)

distributed.prepare_data = patched
sys.argv = sys.argv[:1] + sys.argv[3:]
run_cli(data_parallel_train.main, report=os.environ["RANK"] == "0")
"""


def torchrun_patched_prepare(tmp_path: Path, corpus: Path, mode: str,
                             training: dict) -> subprocess.CompletedProcess:
    script = tmp_path / "patched_prepare.py"
    script.write_text(PATCHED_PREPARE)
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, corpus,
                                                              training=training))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(script), str(REPO), mode, str(config)]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_ranks_wait_out_a_cache_build_longer_than_the_process_group_timeout(tmp_path, corpus):
    """Rank 1 waits 14 s for rank 0's data under training.dist_timeout_s=6: it polls the store
    instead of sitting in a collective, so the run trains and ends."""
    result = torchrun_patched_prepare(tmp_path, corpus, "slow", {
        "max_steps": 4, "eval_every": 4, "save_every": 4, "dist_timeout_s": 6})
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(str(tmp_path / "ckpt" / "snapshot.pth"))["progress"]["step"] == 4


def test_a_data_error_only_rank_1_finds_is_rank_0s_one_error_line(tmp_path, corpus):
    result = torchrun_patched_prepare(tmp_path, corpus, "fail", DDP_STEPS)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert ours == ["error: rank 1 cannot read its corpus — fix it"], result.stderr[-3000:]
