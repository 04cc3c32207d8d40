"""Snapshots that lose nothing: every save checked before it is loaded (a file's zip CRC-32s, a
sharded save's manifest), the last training.keep_snapshots saves kept, a resume from the newest
save that passes, and a refusal, never a restart from step 0, where none does."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import train
from checkpoints import load_checkpoint
from conftest import (
    file_tree,
    run_script,
    sharded_weights,
    tiny_config,
    torchrun_command,
    write_config,
)
from saves import MANIFEST, find_snapshot_across_ranks, remove_old_saves
from utils import UserError, config_from_dict

STEPS = {"max_steps": 20, "eval_every": 10, "save_every": 10}
FSDP = {"parallelism": "fsdp"}


def run_config(workdir: Path, corpus: Path, sharded: bool = False, **training) -> Path:
    snapshot = workdir / "ckpt" / ("snapshot" if sharded else "snapshot.pth")
    return write_config(workdir / "tiny.yaml", tiny_config(workdir, corpus, training={
        **STEPS, **(FSDP if sharded else {}), "snapshot_path": str(snapshot), **training}))


@pytest.fixture(scope="module")
def file_run(tmp_path_factory, corpus) -> Path:
    """One process, 20 steps, saves at 10 and 20: snapshot.pth and snapshot.step-00000010.pth."""
    workdir = tmp_path_factory.mktemp("file")
    result = run_script("train.py", str(run_config(workdir, corpus)), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, corpus) -> Path:
    """Two FSDP ranks, 20 steps, saves at 10 and 20: snapshot/step-00000010 and step-00000020."""
    workdir = tmp_path_factory.mktemp("sharded")
    result = subprocess.run(torchrun_command(run_config(workdir, corpus, sharded=True)),
                            cwd=workdir, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def copy_run(run: Path, workdir: Path) -> Path:
    shutil.copytree(run / "ckpt", workdir / "ckpt")
    return workdir / "ckpt"


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def largest_tensor_offset(snapshot: Path) -> int:
    """A byte in the middle of the largest tensor's data inside a torch.save zip."""
    with zipfile.ZipFile(snapshot) as archive:
        entry = max((info for info in archive.infolist() if "/data/" in info.filename),
                    key=lambda info: info.file_size)
    with open(snapshot, "rb") as f:
        f.seek(entry.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
    return entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2


DAMAGE = {
    "deleted": lambda path: path.unlink(),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:path.stat().st_size // 2]),
}


# One file: snapshot.pth and the save before it -------------------------------------------


@pytest.mark.parametrize("damage", ["flipped tensor byte", "truncated", "deleted"])
def test_a_damaged_file_snapshot_resumes_from_the_save_before_it_exactly(
        file_run, tmp_path, corpus, damage):
    ckpt = copy_run(file_run, tmp_path)
    newest = ckpt / "snapshot.pth"
    if damage == "flipped tensor byte":  # torch.load alone would read it without a word
        flip_byte(newest, largest_tensor_offset(newest))
    else:
        DAMAGE[damage](newest)
    result = run_script("train.py", str(run_config(tmp_path, corpus)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    problem = {"flipped tensor byte": "fails its check (archive/data/", "truncated": "cannot be "
               "read", "deleted": "is missing"}[damage]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and problem in warnings[0], result.stderr[-2000:]
    assert warnings[0].endswith(f"resuming from {ckpt / 'snapshot.step-00000010.pth'}, step 10")
    assert f"resuming from {newest}: step 10," in result.stdout
    resumed, reference = (load_checkpoint(str(run / "ckpt" / "snapshot.pth"))["model"]
                          for run in (tmp_path, file_run))
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)
    # both saves are whole again, and the older one still loads
    assert sorted(path.name for path in ckpt.glob("snapshot*")) == [
        "snapshot.pth", "snapshot.step-00000010.pth"]
    assert find_snapshot_across_ranks(str(newest)) == str(newest)
    assert load_checkpoint(str(ckpt / "snapshot.step-00000010.pth"))["progress"]["step"] == 10


@pytest.mark.parametrize("keep, kept", [
    (1, ["snapshot.pth"]),
    (3, ["snapshot.pth", "snapshot.step-00000010.pth", "snapshot.step-00000015.pth"]),
])
def test_keep_snapshots_keeps_that_many_saves(tmp_path, corpus, keep, kept):
    config = tiny_config(tmp_path, corpus, training={
        **STEPS, "save_every": 5, "keep_snapshots": keep})
    train.train(config_from_dict(config), torch.device("cpu"))
    assert sorted(path.name for path in (tmp_path / "ckpt").glob("snapshot*")) == kept


def test_when_no_save_passes_its_check_the_run_is_refused_and_nothing_is_touched(
        file_run, tmp_path, corpus):
    ckpt = copy_run(file_run, tmp_path)
    for snapshot in ckpt.glob("snapshot*"):
        flip_byte(snapshot, largest_tensor_offset(snapshot))
    config = run_config(tmp_path, corpus)
    before = file_tree(tmp_path)
    result = run_script("train.py", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: no save at {ckpt / 'snapshot.pth'} "
                                                     "can be resumed (")
    assert "snapshot.step-00000010.pth fails its check" in errors[0]
    assert errors[0].endswith("— point training.snapshot_path and training.checkpoint_path at "
                              "new paths to start over")
    assert file_tree(tmp_path) == before


# Sharded (FSDP): a directory per save, with its manifest ----------------------------------


@pytest.mark.parametrize("latest, problem", [
    (None, "latest is missing"),
    ("", "latest is empty"),
    ("step-00000090", "latest names step-00000090, which is missing"),
])
def test_a_lost_latest_resumes_the_newest_save_that_passes(sharded_run, tmp_path, capsys,
                                                           latest, problem):
    snapshot = copy_run(sharded_run, tmp_path) / "snapshot"
    (snapshot / "latest").unlink()
    if latest is not None:
        (snapshot / "latest").write_text(latest)
    assert find_snapshot_across_ranks(str(snapshot)) == str(snapshot / "step-00000020")
    assert capsys.readouterr().err == (f"warning: {snapshot}: {problem} — resuming from "
                                       f"{snapshot / 'step-00000020'}, step 20\n")


@pytest.mark.parametrize("damage, problem", [
    ("deleted", "has no readable __1_0.distcp (No such file or directory)"),
    ("truncated", "has __1_0.distcp of "),
    ("flipped byte", "fails its check (__1_0.distcp is not the data that was saved)"),
])
def test_a_damaged_shard_makes_its_save_unusable(sharded_run, tmp_path, capsys, damage,
                                                 problem):
    snapshot = copy_run(sharded_run, tmp_path) / "snapshot"
    shard = snapshot / "step-00000020" / "__1_0.distcp"  # rank 1's tensors, not DCP's .metadata
    if damage == "flipped byte":
        flip_byte(shard, shard.stat().st_size // 2)
    else:
        DAMAGE[damage](shard)
    assert find_snapshot_across_ranks(str(snapshot)) == str(snapshot / "step-00000010")
    warning = capsys.readouterr().err
    assert warning.startswith(f"warning: {snapshot}: step-00000020 {problem}")
    assert warning.endswith(f" — resuming from {snapshot / 'step-00000010'}, step 10\n")


def test_a_save_cut_short_is_never_loaded(sharded_run, tmp_path, capsys):
    """A kill during save 30: its directory has no manifest, and latest still names 20."""
    snapshot = copy_run(sharded_run, tmp_path) / "snapshot"
    shutil.copytree(snapshot / "step-00000020", snapshot / "step-00000030")
    (snapshot / "step-00000030" / MANIFEST).unlink()
    assert find_snapshot_across_ranks(str(snapshot)) == str(snapshot / "step-00000020")
    assert capsys.readouterr().err == ""


def test_an_older_slms_save_without_a_manifest_still_resumes(sharded_run, tmp_path):
    """Before manifests, latest was written last all the same: the save it names is whole."""
    snapshot = copy_run(sharded_run, tmp_path) / "snapshot"
    for save in ("step-00000010", "step-00000020"):
        (snapshot / save / MANIFEST).unlink()
    assert find_snapshot_across_ranks(str(snapshot)) == str(snapshot / "step-00000020")
    (snapshot / "latest").unlink()
    with pytest.raises(UserError, match=r"no save in .* can be resumed \(latest is missing; "
                       r"step-00000020 was cut short \(it has no manifest\); step-00000010"):
        find_snapshot_across_ranks(str(snapshot))


def test_a_new_save_removes_saves_cut_short_and_complete_ones_beyond_keep(tmp_path):
    for step, complete in ((10, True), (20, True), (25, True), (30, False), (40, True)):
        save = tmp_path / f"step-{step:08d}"
        save.mkdir()
        if complete:
            (save / MANIFEST).write_text("{}")
    remove_old_saves(str(tmp_path), 25, 2, "step-00000020")  # resumed from 20 as 40 failed
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "step-00000020", "step-00000025", "step-00000040"]


def test_the_first_new_save_keeps_an_older_slms_save_it_resumed_from(tmp_path):
    for step in (60, 70):
        (tmp_path / f"step-{step:08d}").mkdir()
        (tmp_path / f"step-{step:08d}" / "run.pth").write_bytes(b"")  # no manifest: before them
    (tmp_path / "step-00000080").mkdir()
    (tmp_path / "step-00000080" / MANIFEST).write_text("{}")
    remove_old_saves(str(tmp_path), 80, 2, "step-00000070")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-00000070", "step-00000080"]


def test_a_sharded_run_keeps_its_last_two_saves(sharded_run):
    assert sorted(path.name for path in (sharded_run / "ckpt" / "snapshot").iterdir()) == [
        "latest", "step-00000010", "step-00000020"]


def test_a_complete_save_newer_than_latest_is_resumed(sharded_run, tmp_path, capsys):
    """A kill between a save's manifest and latest: that save is whole."""
    snapshot = copy_run(sharded_run, tmp_path) / "snapshot"
    (snapshot / "latest").write_text("step-00000010")
    assert find_snapshot_across_ranks(str(snapshot)) == str(snapshot / "step-00000020")
    assert capsys.readouterr().err == (
        f"warning: {snapshot}: latest names step-00000010, an older save — resuming from "
        f"{snapshot / 'step-00000020'}, step 20\n")


def test_a_damaged_manifest_makes_its_save_unusable(sharded_run, tmp_path, capsys):
    snapshot = copy_run(sharded_run, tmp_path) / "snapshot"
    (snapshot / "step-00000020" / MANIFEST).write_text('{"files": {"run.pth": {"bytes": 2}}}')
    assert find_snapshot_across_ranks(str(snapshot)) == str(snapshot / "step-00000010")
    assert "step-00000020 has a damaged manifest.json" in capsys.readouterr().err


def test_two_ranks_resume_a_damaged_sharded_snapshot_from_the_save_before_exactly(
        sharded_run, tmp_path, corpus):
    snapshot = copy_run(sharded_run, tmp_path) / "snapshot"
    shard = snapshot / "step-00000020" / "__0_0.distcp"
    flip_byte(shard, shard.stat().st_size // 2)
    (snapshot / "latest").unlink()
    result = subprocess.run(torchrun_command(run_config(tmp_path, corpus, sharded=True)),
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {snapshot}: latest is missing; step-00000020 fails its check "
                        "(__0_0.distcp is not the data that was saved) — resuming from "
                        f"{snapshot / 'step-00000010'}, step 10"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    resumed, reference = (sharded_weights(run / "ckpt" / "snapshot")
                          for run in (tmp_path, sharded_run))
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)
    assert find_snapshot_across_ranks(str(snapshot)) == str(snapshot / "step-00000020")
    shutil.rmtree(snapshot / "step-00000020")  # the older save is still whole
    assert find_snapshot_across_ranks(str(snapshot)) == str(snapshot / "step-00000010")


HOLD_LOCK = """
import fcntl, sys, time
lock = open(sys.argv[1], "a+")
fcntl.flock(lock, fcntl.LOCK_EX)
lock.truncate(0); lock.write("4242"); lock.flush()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_run_is_refused_before_it_reads_a_snapshot_being_loaded(
        sharded_run, tmp_path, corpus):
    """The first run holds the paths while it loads; the second (2 ranks) reads nothing."""
    ckpt = copy_run(sharded_run, tmp_path)
    for shard in (ckpt / "snapshot").glob("step-*/__1_0.distcp"):  # any read would say so
        shard.unlink()
    first = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(ckpt / ".snapshot.lock")],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "held\n"
        config = run_config(tmp_path, corpus, sharded=True)
        before = file_tree(tmp_path)
        result = subprocess.run(torchrun_command(config),
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        first.kill()
        first.wait()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: another run (pid 4242) is writing {ckpt / 'snapshot'} — wait for "
                      "it to end, or give this run another training.snapshot_path"], \
        result.stderr[-3000:]
    assert 'data_parallel_train.py", line' not in result.stderr
    assert file_tree(tmp_path) == before
