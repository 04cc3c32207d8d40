"""The error contract under hostile conditions, one section per class of failure: a real full
disk, numbers that are not numbers, resuming from something that does not fit, damaged side
files, a prompt that is not UTF-8, two runs at once, malformed formats. Each mistake ends in one
`error:` line with exit code 2 and no traceback; what was saved before stays byte-identical."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import export
import infer
import optim
import train
from conftest import (
    REPO,
    TOKENIZER,
    assert_one_error_line,
    run_main,
    run_script,
    tiny_config,
    write_config,
)
from bpe import load_tokenizer
from data import prepare_tokens
from generate import sample_next, sample_rows
from model import Transformer
from checkpoints import save_checkpoint
import files
from files import atomic_write
from utils import DataConfig, UserError, config_from_dict, load_config


@contextlib.contextmanager
def tmpfs(path: Path, size_kb: int):
    """A real file system of size_kb at path, unmounted afterwards; skipped where mounting is
    not permitted (it needs root, as CI has on these machines)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def fill(directory: Path, leave_bytes: int) -> Path:
    """Fill the file system of `directory` until only about leave_bytes are free."""
    stat = os.statvfs(directory)
    filler = directory / "filler"
    filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave_bytes))
    return filler


def snapshot_bytes(*paths: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in paths}


def copy_run(trained_run: Path, workdir: Path, corpus: Path, **sections) -> Path:
    """The trained run's checkpoints in workdir, and a config pointing at them."""
    shutil.copytree(trained_run / "ckpt", workdir / "ckpt")
    return write_config(workdir / "tiny.yaml", tiny_config(workdir, corpus, **sections))


# 1. A real full disk ------------------------------------------------------------------------


def test_a_full_disk_inside_torch_save_is_one_error_and_keeps_the_old_file(tmp_path):
    with tmpfs(tmp_path / "disk", 512) as disk:
        save_checkpoint({"weights": torch.zeros(10)}, str(disk / "snapshot.pth"))
        before = snapshot_bytes(disk / "snapshot.pth")
        with pytest.raises(UserError, match="No space left on device.*previous version is intact"):
            save_checkpoint({"weights": torch.zeros(1_000_000)}, str(disk / "snapshot.pth"))
        assert snapshot_bytes(disk / "snapshot.pth") == before
        assert sorted(p.name for p in disk.iterdir()) == ["snapshot.pth"]  # no temp file left


def test_a_full_disk_during_training_keeps_checkpoint_and_snapshot(trained_run, tmp_path, corpus):
    with tmpfs(tmp_path / "disk", 8192) as disk:
        (disk / "ckpt").mkdir()
        for name in ("best.pth", "snapshot.pth"):  # not the save before: it would not fit
            shutil.copy(trained_run / "ckpt" / name, disk / "ckpt")
        saved = snapshot_bytes(disk / "ckpt" / "best.pth", disk / "ckpt" / "snapshot.pth")
        fill(disk, 200_000)  # less than one more snapshot needs
        config = tiny_config(disk, corpus, training={"max_steps": 60, "logdir": str(tmp_path)})
        result = run_script(
            "train.py", str(write_config(tmp_path / "t.yaml", config)), cwd=tmp_path
        )
        assert_one_error_line(result.returncode, result.stderr, "No space left on device")
        assert "resuming from" in result.stdout
        assert snapshot_bytes(*saved) == saved


def test_a_full_disk_while_caching_tokens_leaves_no_partial_cache(tmp_path, corpus):
    tokenizer = load_tokenizer(TOKENIZER)
    with tmpfs(tmp_path / "cache", 64) as cache:
        data = DataConfig(raw_text_path=str(corpus), cache_dir=str(cache), context_length=32)
        with pytest.raises(UserError, match="No space left on device"):
            prepare_tokens(data, tokenizer)
        assert list(cache.iterdir()) == []


def test_an_export_that_fills_the_disk_can_simply_be_run_again(trained_run, tmp_path):
    with tmpfs(tmp_path / "disk", 4096) as disk:
        filler = fill(disk, 1_000_000)  # room for the JSON files, not for the weights
        out = disk / "exported"
        args = ["--ckpt_path", str(trained_run / "ckpt" / "best.pth"), "--out", str(out)]
        result = run_script("export.py", *args, cwd=tmp_path)
        assert_one_error_line(result.returncode, result.stderr, "No space left on device")
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no half export
        filler.unlink()
        result = run_script("export.py", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        assert (out / "model.safetensors").is_file()


# 2. Numbers that are not numbers -------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.lr=.nan", r"training.lr must be in \(0, 1000\], got nan"),
        ("training.lr=.inf", r"training.lr must be in \(0, 1000\], got inf"),
        ("training.min_lr=-.inf", r"training.min_lr must be in \[0, 1000\]"),
        ("training.warmdown_frac=1.5", r"training.warmdown_frac must be in \[0, 1\], got 1.5"),
        ("training.time_budget_s=.inf", r"training.time_budget_s must be in \[0, 1e\+08\]"),
        ("training.grad_clip=.nan", r"training.grad_clip must be in"),
        ("training.seed=18446744073709551616", "training.seed must be in"),
        ("training.seed=-1", r"training.seed must be in \[0, 9223372036854775807\]"),
        ("training.warmup_steps=1e20", "training.warmup_steps must be int"),
        ("training.eval_batches=-1", r"training.eval_batches must be in \[1, "),
        ("model.max_seq_len=1000000000000", r"model.max_seq_len must be in \[1, 1048576\]"),
        ("model.norm_eps=0", r"model.norm_eps must be in \(0, 1\]"),
        ("model.rope_theta=-1", r"model.rope_theta must be in \(0, "),
        ("model.dropout=1.0", r"model.dropout must be in \[0, 1\)"),
        ("data.val_split=.nan", r"data.val_split must be in \(0, 1\)"),
        ("data.batch_size=1000000", r"data.batch_size must be in \[1, 65536\]"),
        ("data.num_workers=100000", r"data.num_workers must be in \[0, 256\]"),
    ],
)
def test_every_config_number_is_finite_and_in_its_range(override, message):
    with pytest.raises(UserError, match=message):
        config_from_dict({}, overrides=[override])


def test_a_model_too_big_for_this_machines_memory_is_refused_before_allocating():
    sizes = ["model.vocab_size=16000000", "model.embed_dim=65536", "model.num_heads=64"]
    with pytest.raises(UserError, match="fp32 weights alone take .* GiB, more than this machine"):
        Transformer(config_from_dict({}, overrides=sizes).model)


def test_training_state_too_big_for_each_process_is_refused_before_any_training(
    tmp_path, corpus, monkeypatch, capsys
):
    """The check counts what one process will hold (weights, gradients, optimizer state),
    against the memory each has, and names sharding as the way out."""
    monkeypatch.setattr(optim, "memory_per_process", lambda device: (2**20, "a small machine"))
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, corpus))
    args = [str(config), "training.optimizer=adamw"]
    code, stdout, stderr = run_main(train.main, args, tmp_path, monkeypatch, capsys)
    assert_one_error_line(code, stderr, r"training this model takes .* GiB per process \(fp32 "
                          r"weights, gradients and adamw state.*more than the 0.0 GiB each "
                          r"process has of a small machine — set training.parallelism=fsdp.*"
                          "training.optimizer=muon")
    assert "parameters" not in stdout
    assert all(path.name.endswith(".lock") for path in (tmp_path / "ckpt").iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "nan"], r"--temperature must be a number in \[0, 2\], got nan"),
        (["--temperature", "inf"], r"--temperature must be a number in \[0, 2\], got inf"),
        (["--top-p", "nan"], r"--top-p must be in \(0, 1\], got nan"),
        (["--seed", str(2**70)], r"--seed must be in \[0, 9223372036854775807\]"),
        (["--seed", "-3"], r"--seed must be in \[0, "),
        (["--max-length", "1e12"], "argument --max-length: invalid int value: '1e12'"),
        (["--num-samples", "1000000000"], r"--num-samples must be in \[1, 65536\]"),
    ],
)
def test_infer_flags_are_finite_and_in_range(trained_run, monkeypatch, capsys, args, message):
    code, stdout, stderr = run_main(infer.main, args, trained_run, monkeypatch, capsys)
    assert_one_error_line(code, stderr, message)
    assert stdout == ""


@pytest.mark.parametrize("temperature", [1e-40, 1e-46, 0.0009])
def test_a_tiny_temperature_samples_the_most_likely_token_instead_of_nan(temperature):
    logits = torch.tensor([[1.0, 3.0, 2.0], [-5.0, -6.0, 40.0]])
    chosen = sample_next(logits, temperature, top_k=0, top_p=1.0,
                         uniform=torch.tensor([0.999, 0.999], dtype=torch.float64))
    assert chosen.tolist() == [1, 2]
    rows = sample_rows(logits, torch.tensor([temperature] * 2), torch.zeros(2, dtype=torch.long),
                       torch.ones(2), torch.tensor([0.999, 0.999], dtype=torch.float64))
    assert rows.tolist() == [1, 2]


@pytest.mark.parametrize(
    "steps, message",
    [("0", r"--steps must be in \[1, "), ("-2", r"--steps must be in \[1, "), ("x", "invalid int")],
)
def test_bench_refuses_step_counts_it_cannot_time(tmp_path, monkeypatch, capsys, steps, message):
    code, stdout, stderr = run_main(
        bench.main, ["configs.yaml", "--steps", steps], REPO, monkeypatch, capsys
    )
    assert_one_error_line(code, stderr, message)
    assert stdout == ""


# 3. Resuming from something that does not fit ------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=16", r"trained on 8 windows per step \(8 x 1 x 1 process\(es\)\) and "
         "this run takes 16"),
        ("data.context_length=16", "was saved with data.context_length=32 and this run has 16"),
        ("data.val_split=0.2", "was saved with data.val_split=0.1 and this run has 0.2"),
        ("training.seed=8", "was saved with training.seed=7 and this run has 8"),
        ("training.grad_accum_steps=2", r"trained on 8 windows per step \(8 x 1 x 1 "
         r"process\(es\)\) and this run takes 16"),
    ],
)
def test_a_resume_that_cannot_replay_the_same_batches_is_refused(
    trained_run, tmp_path, corpus, monkeypatch, capsys, override, message
):
    config = copy_run(trained_run, tmp_path, corpus, training={"max_steps": 80})
    saved = snapshot_bytes(tmp_path / "ckpt" / "snapshot.pth", tmp_path / "ckpt" / "best.pth")
    code, _, stderr = run_main(train.main, [str(config), override], tmp_path, monkeypatch, capsys)
    assert_one_error_line(code, stderr, message + ", so its batches cannot be replayed")
    assert snapshot_bytes(*saved) == saved


def test_a_resume_on_changed_text_is_refused(trained_run, tmp_path, corpus, monkeypatch, capsys):
    edited = tmp_path / "edited.txt"
    edited.write_text("A new first line.\n" + corpus.read_text(encoding="utf-8"), encoding="utf-8")
    config = copy_run(trained_run, tmp_path, edited, training={"max_steps": 80})
    code, _, stderr = run_main(train.main, [str(config)], tmp_path, monkeypatch, capsys)
    assert_one_error_line(code, stderr, "saved while training on other text or with another token")


def test_a_best_checkpoint_as_snapshot_path_is_refused(
    trained_run, tmp_path, corpus, monkeypatch, capsys
):
    config = copy_run(trained_run, tmp_path, corpus)
    best = str(tmp_path / "ckpt" / "best.pth")
    args = [str(config), f"training.snapshot_path={best}", "training.checkpoint_path=other.pth"]
    code, _, stderr = run_main(train.main, args, tmp_path, monkeypatch, capsys)
    assert_one_error_line(code, stderr, "is not a training snapshot")


def test_one_path_for_checkpoint_and_snapshot_is_refused():
    with pytest.raises(UserError, match="checkpoint_path and training.snapshot_path are both"):
        config_from_dict({}, overrides=["training.checkpoint_path=checkpoints/snapshot.pth"])


# 4. Damaged side files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],
        lambda text: "[1, 2, 3]",
        lambda text: json.dumps({**json.loads(text), "num_tokens": "many"}),
        lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "dtype"}),
        lambda text: json.dumps({**json.loads(text), "num_tokens": 0}),
        lambda text: "\udcff",
    ],
    ids=["truncated", "a list", "a string count", "no dtype", "zero tokens", "not UTF-8"],
)
def test_a_damaged_cache_metadata_file_means_rebuild(tmp_path, corpus, damage):
    tokenizer = load_tokenizer(TOKENIZER)
    data = DataConfig(raw_text_path=str(corpus), cache_dir=str(tmp_path), context_length=32)
    first = np.array(prepare_tokens(data, tokenizer)[0])
    (meta,) = tmp_path.glob("*.shards/*/*.json")
    meta.write_bytes(damage(meta.read_text()).encode("utf-8", "surrogateescape"))
    assert np.array_equal(prepare_tokens(data, tokenizer)[0], first)
    assert json.loads(meta.read_text())["num_tokens"] == len(first)


def test_broken_symlinks_and_non_files_in_a_corpus_directory_are_skipped(tmp_path, corpus, capsys):
    corpus_dir = tmp_path / "texts"
    corpus_dir.mkdir()
    shutil.copy(corpus, corpus_dir / "plays.txt")
    (corpus_dir / "gone.txt").symlink_to(tmp_path / "deleted.txt")
    (corpus_dir / "folder.txt").mkdir()
    os.mkfifo(corpus_dir / "pipe.txt")  # reading it would block forever
    data = DataConfig(raw_text_path=str(corpus_dir), context_length=32)
    tokens, _ = prepare_tokens(data, load_tokenizer(TOKENIZER))
    single, _ = prepare_tokens(
        DataConfig(raw_text_path=str(corpus), context_length=32), load_tokenizer(TOKENIZER)
    )
    assert np.array_equal(tokens, single)
    assert "skipping 1 broken symlink(s) in the corpus" in capsys.readouterr().err


@pytest.fixture
def exported(trained_run, tmp_path) -> Path:
    out = tmp_path / "exported"
    export.export(str(trained_run / "ckpt" / "best.pth"), str(out))
    return out


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"slm_config": {"model": ', r"config.json is damaged"),
        (b"\xff\xfe{}", r"config.json is damaged"),
        (b"[1, 2]", "config.json has no slm_config"),
        (b'{"slm_config": {"model": {"num_heads": 0}}}', r"holds an invalid config \(model.num_"),
    ],
)
def test_a_damaged_export_config_is_one_error_line(
    exported, tmp_path, monkeypatch, capsys, content, message
):
    (exported / "config.json").write_bytes(content)
    args = ["--ckpt_path", str(exported), "--max-length", "4"]
    code, _, stderr = run_main(infer.main, args, tmp_path, monkeypatch, capsys)
    assert_one_error_line(code, stderr, message)


@pytest.mark.parametrize("main", [infer.main, export.main], ids=["infer", "export"])
def test_a_checkpoint_with_an_invalid_stored_config_is_validated_on_load(
    trained_run, tmp_path, monkeypatch, capsys, main
):
    checkpoint = torch.load(trained_run / "ckpt" / "best.pth", weights_only=True)
    checkpoint["config"]["model"]["num_heads"] = 0
    torch.save(checkpoint, tmp_path / "bad.pth")
    args = ["--ckpt_path", "bad.pth"] + (["--out", "out"] if main is export.main else [])
    code, _, stderr = run_main(main, args, tmp_path, monkeypatch, capsys)
    assert_one_error_line(
        code, stderr, r"bad.pth holds an invalid config \(model.num_heads must be in \[1, 4096\]"
    )
    assert not (tmp_path / "out").exists()


# 5. A prompt that is not UTF-8 ---------------------------------------------------------------


def test_a_prompt_that_is_not_utf8_is_one_error_line(trained_run):
    result = subprocess.run(
        [sys.executable, str(REPO / "infer.py"), "--ckpt_path", "ckpt/best.pth", "--prompt"]
        + [b"ROMEO \xff\xfe"],
        cwd=trained_run,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_error_line(
        result.returncode, result.stderr, r"--prompt is not UTF-8 text \(byte 0xff"
    )


def test_a_chat_turn_on_stdin_that_is_not_utf8_is_one_error_line(
    trained_run, monkeypatch, capsys
):
    stdin = io.TextIOWrapper(io.BytesIO(b"fine\nROMEO \xff\xfe\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    argv = ["--ckpt_path", "ckpt/best.pth", "--chat", "--max-length", "2"]
    code, _, stderr = run_main(infer.main, argv, trained_run, monkeypatch, capsys)
    assert_one_error_line(code, stderr, r"line 2 of stdin is not UTF-8 text \(byte 0xff")


# 6. Two runs at once -------------------------------------------------------------------------


def test_a_live_writers_temp_file_is_left_alone_and_a_dead_ones_removed(tmp_path):
    alive = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    live_temp = tmp_path / f".out.bin.tmp-{alive.pid}-abc"
    dead_temp = tmp_path / f".out.bin.tmp-{dead.pid}-def"
    try:
        for temp in (live_temp, dead_temp):
            temp.write_bytes(b"half written")
        atomic_write(str(tmp_path / "out.bin"), lambda f: f.write(b"done"))
        assert live_temp.exists() and not dead_temp.exists()
        assert (tmp_path / "out.bin").read_bytes() == b"done"
    finally:
        alive.kill()


def test_another_hosts_temp_file_is_removed_only_once_it_is_old(tmp_path):
    """Nodes on shared storage: another host's pids cannot be checked from here, so its temp
    file goes only after OTHER_HOST_STALE_SECONDS without a write."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is nobody's here, as another host's pids are
    fresh = tmp_path / f".out.bin.tmp-nodeB-{dead.pid}-abc"
    stale = tmp_path / f".out.bin.tmp-nodeC-{dead.pid}-def"
    for temp in (fresh, stale):
        temp.write_bytes(b"half written")
    long_ago = time.time() - files.OTHER_HOST_STALE_SECONDS - 60
    os.utime(stale, (long_ago, long_ago))
    atomic_write(str(tmp_path / "out.bin"), lambda f: f.write(b"done"))
    assert fresh.exists() and not stale.exists()
    assert (tmp_path / "out.bin").read_bytes() == b"done"


WRITER_ON_ANOTHER_HOST = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import files
files.HOST = sys.argv[3]
own_kill = os.kill

def kill(pid, signum):  # the other host's processes cannot be seen from this one
    if pid != os.getpid():
        raise ProcessLookupError(pid)
    own_kill(pid, signum)

os.kill = kill
for _ in range(40):
    files.atomic_write(sys.argv[2], lambda f: (f.write(sys.argv[3].encode() * 50_000),
                                               time.sleep(0.01)))
"""


def test_two_hosts_writing_one_shared_file_never_lose_a_write(tmp_path):
    """Two writers that cannot see each other's pids (as on two nodes): neither removes the
    other's temp file, so every rename succeeds and the file is always one whole write."""
    target = tmp_path / "shared.bin"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER_ON_ANOTHER_HOST, str(REPO),
                                 str(target), host], stderr=subprocess.PIPE, text=True)
               for host in ("nodeA", "nodeB")]
    errors = [writer.communicate(timeout=240)[1] for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], [e[-2000:] for e in errors]
    assert target.read_bytes() in (b"nodeA" * 50_000, b"nodeB" * 50_000)
    assert not list(tmp_path.glob(".*tmp-*"))


def test_two_runs_preparing_one_new_corpus_both_succeed(tmp_path, corpus):
    big = tmp_path / "big.txt"
    big.write_text(corpus.read_text(encoding="utf-8") * 8, encoding="utf-8")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from bpe import *; from data import *; "
        "from utils import *; "
        "print(len(prepare_tokens(DataConfig(raw_text_path=sys.argv[2]), "
        "load_tokenizer(sys.argv[3]))[0]))"
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(REPO), str(big), TOKENIZER],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=240) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert outputs[0][0].split()[-1] == outputs[1][0].split()[-1]
    assert not list(tmp_path.glob(".*tmp-*"))


def test_a_second_run_on_a_live_runs_snapshot_path_is_refused_until_it_dies(tmp_path, corpus):
    config = write_config(
        tmp_path / "tiny.yaml", tiny_config(tmp_path, corpus, training={"max_steps": 100000})
    )
    first = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), str(config)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (tmp_path / "ckpt" / "snapshot.pth").exists() and time.time() < deadline:
            time.sleep(0.2)
        second = run_script("train.py", str(config), cwd=tmp_path)
        assert_one_error_line(
            second.returncode,
            second.stderr,
            f"another run \\(pid {first.pid}\\) is writing .*snapshot.pth — wait for it",
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    after_kill = run_script("train.py", str(config), "training.max_steps=30", cwd=tmp_path)
    assert after_kill.returncode == 0, after_kill.stderr[-2000:]
    assert "resuming from" in after_kill.stdout


# 7. Formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("model:\n  embed_dim: 64\nmodel:\n  num_layers: 2\n", "line 3.*duplicate key 'model'"),
        ("training:\n  lr: 0.1\n  lr: 0.2\n", "line 3.*duplicate key 'lr'"),
    ],
)
def test_a_yaml_key_given_twice_is_refused(tmp_path, text, message):
    (tmp_path / "dup.yaml").write_text(text)
    with pytest.raises(UserError, match=message):
        load_config(str(tmp_path / "dup.yaml"))


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("train.py", [], "the following arguments are required: config, section.key=value — see"),
        ("infer.py", ["--bogus"], "unrecognized arguments: --bogus"),
        ("infer.py", ["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        ("export.py", [], "the following arguments are required: --out"),
        ("bench.py", ["configs.yaml", "--steps"], "argument --steps: expected one argument"),
        ("data_parallel_train.py", [], "the following .* — see data_parallel_train.py --help"),
        ("bench_data.py", ["configs.yaml", "1", "--formats", "csv"],
         "--formats csv names a format this benchmark does not write — choose among txt,"),
        ("bench_data.py", ["configs.yaml", "0"], r"MB must be in \[1, 1e\+06\], got 0"),
    ],
)
def test_a_command_line_mistake_is_the_same_one_error_line(
    monkeypatch, capsys, script, args, message
):
    main = {
        "train.py": train.main,
        "infer.py": infer.main,
        "export.py": export.main,
        "bench.py": bench.main,
    }.get(script)
    if main is None:
        result = run_script(script, *args, cwd=REPO)
        code, stderr = result.returncode, result.stderr
    else:
        code, _, stderr = run_main(main, args, REPO, monkeypatch, capsys)
    assert_one_error_line(code, stderr, "^error: " + message)
    assert "usage:" not in stderr


@pytest.mark.parametrize(
    "setting", ["training.checkpoint_path", "training.snapshot_path", "training.logdir"]
)
def test_an_output_under_a_file_is_refused_before_any_training(
    tmp_path, corpus, monkeypatch, capsys, setting
):
    (tmp_path / "a_file").write_text("not a directory")
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, corpus))
    args = [str(config), f"{setting}={tmp_path / 'a_file' / 'out'}"]
    code, stdout, stderr = run_main(train.main, args, tmp_path, monkeypatch, capsys)
    assert_one_error_line(code, stderr, "a_file is a file — choose a writable output path")
    assert "parameters" not in stdout and not (tmp_path / "ckpt").exists()


def test_an_output_on_a_read_only_file_system_is_refused_before_any_training(
    tmp_path, corpus, monkeypatch, capsys
):
    with tmpfs(tmp_path / "ro", 64) as read_only:
        remount_read_only(read_only)
        config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, corpus))
        args = [str(config), f"training.snapshot_path={read_only / 'snapshot.pth'}"]
        code, stdout, stderr = run_main(train.main, args, tmp_path, monkeypatch, capsys)
        assert_one_error_line(code, stderr, "Read-only file system")
        assert "parameters" not in stdout


def test_a_corpus_on_a_read_only_mount_needs_and_takes_a_cache_dir(tmp_path, corpus):
    tokenizer = load_tokenizer(TOKENIZER)
    with tmpfs(tmp_path / "ro", 1024) as read_only:
        shutil.copy(corpus, read_only / "plays.txt")
        remount_read_only(read_only)
        data = DataConfig(raw_text_path=str(read_only / "plays.txt"), context_length=32)
        with pytest.raises(UserError, match="Read-only file system.* set data.cache_dir"):
            prepare_tokens(data, tokenizer)
        data.cache_dir = str(tmp_path / "cache")
        assert len(prepare_tokens(data, tokenizer)[0]) > 1000
        assert list((tmp_path / "cache").glob("plays.txt-*.shards/*/*.tokens.bin"))
