"""files.py: crash-safe writes, start-up output checks and safe checkpoint loading (the hostile
cases, real full disks and racing runs, are in test_reliability.py)."""

import fcntl
import math
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from checkpoints import load_checkpoint, save_checkpoint
from files import atomic_write, check_writable, claimed
from utils import UserError


def test_atomic_save_keeps_previous_file_when_a_save_fails(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, str(path))
    with pytest.raises(Exception):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}, "bad": lambda: 0}, str(path))
    assert torch.equal(load_checkpoint(str(path))["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temp file left behind


KILLED_MID_SAVE = """
import sys, time, torch
sys.path.insert(0, {repo!r})
from files import atomic_write
def write_half_then_hang(f):
    torch.save({{"model": {{"w": torch.zeros(100_000)}}, "config": {{}}}}, f)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
atomic_write({path!r}, write_half_then_hang)
"""


def test_a_kill_inside_a_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "snapshot.pth"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, str(path))
    saver = subprocess.Popen(
        [sys.executable, "-c", KILLED_MID_SAVE.format(repo=str(REPO), path=str(path))],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert (
        saver.stdout.readline().strip() == "writing"
    )  # the new bytes are on disk, in the temp file
    os.kill(saver.pid, signal.SIGKILL)
    saver.wait()
    assert torch.equal(load_checkpoint(str(path))["model"]["w"], torch.ones(3))
    leftovers = [p for p in tmp_path.iterdir() if p.name != "snapshot.pth"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".snapshot.pth.tmp-")
    save_checkpoint({"model": {"w": torch.full((3,), 2.0)}, "config": {}}, str(path))
    assert [p.name for p in tmp_path.iterdir()] == [
        "snapshot.pth"
    ]  # the next save clears the dead temp file
    assert torch.equal(load_checkpoint(str(path))["model"]["w"], torch.full((3,), 2.0))


def test_output_check_refuses_unwritable_places_and_leaves_nothing_behind(tmp_path):
    check_writable(str(tmp_path / "not" / "yet" / "there"))
    assert list(tmp_path.iterdir()) == []  # probed, not created
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_writable(str(tmp_path / "file" / "ckpt"))
    with pytest.raises(UserError, match="cannot write to /proc/self"):  # unwritable even for root
        check_writable("/proc/self/checkpoints")


def test_a_full_disk_during_a_save_is_a_clear_error_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "best.pth"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, str(path))

    def disk_full(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(
        UserError, match=r"could not write .*best.pth \(No space left on device\); the previous"
    ):
        atomic_write(str(path), disk_full)
    assert torch.equal(load_checkpoint(str(path))["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pth"]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_loading_refuses_code_and_damage(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"model": _RunsCode(str(marker)), "config": {}}, f, protocol=2)
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_checkpoint(str(evil))
    assert not marker.exists()

    good = tmp_path / "good.pth"
    save_checkpoint({"model": {"w": torch.randn(1000)}, "config": {}}, str(good))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1500])
    with pytest.raises(UserError, match="corrupt, truncated"):
        load_checkpoint(str(truncated))
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(str(tmp_path / "nope.pth"))
    assert math.isfinite(load_checkpoint(str(good))["model"]["w"].sum().item())


def test_a_claim_refuses_a_second_holder_and_is_released_when_its_holder_leaves(tmp_path):
    path = str(tmp_path / "out" / "snapshot.pth")
    with claimed(path, "training.snapshot_path"):
        with pytest.raises(UserError, match=r"another run \(pid \d+\) is writing .*snapshot.pth "
                           "— wait for it to end, or give this run another "
                           "training.snapshot_path"):
            with claimed(path, "training.snapshot_path"):
                pass
    with open(tmp_path / "out" / ".snapshot.pth.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again: this raises if it is not
