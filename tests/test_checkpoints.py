"""checkpoints.py: what a path holds, and snapshots of older formats that must still resume."""
import shutil
from pathlib import Path

import pytest
import torch

import train
from checkpoints import load_checkpoint, save_checkpoint
from conftest import tiny_config
from export import export
from utils import UserError, config_from_dict


@pytest.fixture(scope="module")
def small_corpus(corpus, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "small.txt"
    path.write_text(corpus.read_text(encoding="utf-8")[:19000], encoding="utf-8")
    return path


def test_one_function_says_what_a_path_holds(trained_run, tmp_path):
    ckpt = str(trained_run / "ckpt" / "best.pth")
    export(ckpt, str(tmp_path / "exported"))
    from_file, from_directory = load_checkpoint(ckpt), load_checkpoint(str(tmp_path / "exported"))
    assert "directory" not in from_file
    assert from_directory["directory"] == str(tmp_path / "exported")
    assert from_file["tokenizer"] == from_directory["tokenizer"]  # the same tokenizer, both ways
    assert all(
        torch.equal(from_file["model"][name], tensor)
        for name, tensor in from_directory["model"].items()
    )
    assert "model" not in load_checkpoint(str(tmp_path / "exported"), weights=False)
    snapshot = load_checkpoint(str(trained_run / "ckpt" / "snapshot.pth"), weights=False)
    assert {"progress", "batch_plan", "config"} <= set(snapshot)
    with pytest.raises(UserError, match="checkpoint 'nope.pth' not found"):
        load_checkpoint("nope.pth")


def test_a_snapshot_from_before_fingerprints_and_floor_ratios_resumes_exactly(
    tmp_path, small_corpus, monkeypatch
):
    """Older snapshots hold no tokenizer fingerprint and an absolute training.min_lr, no
    min_lr_ratio: they load, and the run ends with the same weights as an unbroken one."""
    settings = {"max_steps": 12, "save_every": 6, "eval_every": 6, "log_every": 2}
    save_snapshot, halfway = train.save_snapshot_across_ranks, tmp_path / "halfway.pth"

    def save_and_keep_step_6(path, *args):
        save_snapshot(path, *args)
        if args[-2]["step"] == 6:
            shutil.copy(path, halfway)

    monkeypatch.setattr(train, "save_snapshot_across_ranks", save_and_keep_step_6)
    straight = tiny_config(tmp_path / "straight", small_corpus, training=settings)
    train.train(config_from_dict(straight), torch.device("cpu"))
    old = load_checkpoint(str(halfway))
    del old["tokenizer"], old["config"]["training"]["min_lr_ratio"]
    resumed = tiny_config(tmp_path / "resumed", small_corpus, training=settings)
    (tmp_path / "resumed" / "ckpt").mkdir(parents=True)
    save_checkpoint(old, resumed["training"]["snapshot_path"])
    train.train(config_from_dict(resumed), torch.device("cpu"))
    ends = [load_checkpoint(config["training"]["snapshot_path"]) for config in (straight, resumed)]
    assert ends[1]["progress"]["step"] == 12
    weights = [end["model"] for end in ends]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
