import math
import os
import pickle
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest
import torch

from conftest import REPO
from utils import (
    Config,
    DataConfig,
    ModelConfig,
    Section,
    TrainingConfig,
    UserError,
    atomic_save,
    atomic_write,
    check_writable,
    config_from_dict,
    config_to_dict,
    load_checkpoint,
    load_config,
    lr_at,
)


def test_shipped_config_loads_and_validates():
    config = load_config(str(REPO / "configs.yaml"))
    assert config.model.vocab_size == 4096
    assert config.data.raw_text_path == "data/shakespeare.txt"
    assert config.training.max_steps > 0


def test_overrides_are_typed_like_yaml():
    config = config_from_dict(
        {},
        overrides=[
            "training.max_steps=30",
            "training.lr=1e-3",
            "training.compile=true",
            "data.raw_text_path=my.txt",
            "model.rope_theta=500000",
        ],
    )
    assert config.training.max_steps == 30 and isinstance(config.training.max_steps, int)
    assert config.training.lr == 1e-3  # YAML reads 1e-3 as a string; float fields accept it
    assert config.training.compile is True  # compile is a plain auto | true | false
    assert config.data.raw_text_path == "my.txt"
    assert config.model.rope_theta == 500000.0 and isinstance(config.model.rope_theta, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.max_step=3", "did you mean 'training.max_steps'"),
        ("model.num_layers=two", "model.num_layers must be int"),
        ("model.num_layers=2.5", "model.num_layers must be int"),
        ("training.compile=1", "training.compile must be one of auto, true, false, got 1"),
        ("training.compile=yes please", "training.compile must be one of auto, true, false"),
        ("max_steps=3", "bad override"),
        ("training.max_steps", "bad override"),
        ("trainng.max_steps=3", "no section 'trainng'"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(UserError, match=message):
        config_from_dict({}, overrides=[override])


def test_compile_stored_as_a_string_by_older_checkpoints_still_loads():
    assert config_from_dict({"training": {"compile": "true"}}).training.compile is True
    assert config_from_dict({"training": {"compile": "false"}}).training.compile is False


def test_later_overrides_are_checked_together_not_one_by_one():
    config = config_from_dict({}, overrides=["training.min_lr=1e-2", "training.lr=1e-1"])
    assert (config.training.min_lr, config.training.lr) == (1e-2, 1e-1)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("training", "lr", 0.0, "training.lr must be > 0"),
        ("data", "val_split", 1.0, r"val_split must be in \(0, 1\)"),
        ("data", "val_split", 0.0, r"val_split must be in \(0, 1\)"),
        ("model", "embed_dim", 250, "not divisible by model.num_heads"),
        ("model", "num_kv_heads", 3, "not divisible by model.num_kv_heads"),
        ("data", "context_length", 512, "context_length .* > model.max_seq_len"),
        ("data", "batch_size", 0, "data.batch_size must be > 0"),
        (
            "training",
            "device",
            "tpu",
            "training.device must be one of auto, cpu, cuda, mps, got 'tpu'",
        ),
        ("training", "min_lr", 1.0, "min_lr .* > training.lr"),
    ],
)
def test_validation_rejects_out_of_range_values(section, key, value, message):
    with pytest.raises(UserError, match=message):
        config_from_dict({section: {key: value}})
    with pytest.raises(UserError, match=message):  # built in code, a section checks itself too
        sections = {"model": ModelConfig, "data": DataConfig, "training": TrainingConfig}
        Config(**{section: sections[section](**{key: value})})


def test_a_new_field_of_any_declared_type_loads_without_touching_the_loader():
    @dataclass
    class Extra(Section):
        section: ClassVar[str] = "extra"
        widths: list[int] = field(default_factory=lambda: [64])
        limit: int | None = None
        mode: Literal["fast", "slow"] = "fast"

    assert Extra(widths=[1, 2], limit=None, mode="slow") == Extra([1, 2], None, "slow")
    assert Extra(limit=3).limit == 3 and Extra().widths == [64]
    for kwargs, message in (
        ({"widths": [1, "x"]}, r"extra.widths\[1\] must be int, got 'x'"),
        ({"widths": 5}, "extra.widths must be a list of int"),
        ({"limit": 2.5}, "extra.limit must be int or null, got 2.5"),
        ({"mode": "medium"}, "extra.mode must be one of fast, slow"),
    ):
        with pytest.raises(UserError, match=message):
            Extra(**kwargs)


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  embed_dim: 64\n  num_heads: [4\n")
    with pytest.raises(UserError, match="malformed YAML .* line 4"):
        load_config(str(broken))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("modle:\n  embed_dim: 64\n")
    with pytest.raises(UserError, match="did you mean 'model'"):
        load_config(str(unknown))


def test_config_dict_round_trip():
    config = Config()
    config.model.num_layers = 3
    assert config_from_dict(config_to_dict(config)) == config


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    t = TrainingConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, 0.0, t) == pytest.approx(0.1)
    assert lr_at(9, 0.0, t) == pytest.approx(1.0)
    assert lr_at(10, 0.0, t) == pytest.approx(1.0)
    assert lr_at(60, 0.5, t) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, 1.0, t) == pytest.approx(0.1)
    assert lr_at(120, 1.3, t) == pytest.approx(0.1)  # past the end it stays at min_lr
    decay = [lr_at(10 + i, i / 100, t) for i in range(101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_atomic_save_keeps_previous_file_when_a_save_fails(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_save({"model": {"w": torch.ones(3)}, "config": {}}, str(path))
    with pytest.raises(Exception):
        atomic_save({"model": {"w": torch.zeros(3)}, "config": {}, "bad": lambda: 0}, str(path))
    assert torch.equal(load_checkpoint(str(path))["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temp file left behind


KILLED_MID_SAVE = """
import sys, time, torch
sys.path.insert(0, {repo!r})
from utils import atomic_write
def write_half_then_hang(f):
    torch.save({{"model": {{"w": torch.zeros(100_000)}}, "config": {{}}}}, f)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
atomic_write({path!r}, write_half_then_hang)
"""


def test_a_kill_inside_a_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "snapshot.pth"
    atomic_save({"model": {"w": torch.ones(3)}, "config": {}}, str(path))
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
    atomic_save({"model": {"w": torch.full((3,), 2.0)}, "config": {}}, str(path))
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
    atomic_save({"model": {"w": torch.ones(3)}, "config": {}}, str(path))

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
    atomic_save({"model": {"w": torch.randn(1000)}, "config": {}}, str(good))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1500])
    with pytest.raises(UserError, match="corrupt, truncated"):
        load_checkpoint(str(truncated))
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(str(tmp_path / "nope.pth"))
    assert math.isfinite(load_checkpoint(str(good))["model"]["w"].sum().item())
