import re

import pytest

from conftest import run_script


def test_infer_streams_samples_from_a_trained_checkpoint(trained_run):
    result = run_script("infer.py", "--ckpt_path", "ckpt/best.pth", "--prompt", "ROMEO:", "--max-length", "20",
                        "--seed", "1", "--num-samples", "2", "--top-k", "50", "--top-p", "0.95", cwd=trained_run)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = result.stdout.split("\n" + "-" * 40 + "\n")
    assert len(samples) == 2
    assert all(sample.startswith("ROMEO:") and len(sample) > len("ROMEO:") + 10 for sample in samples)


def test_infer_greedy_is_deterministic_with_and_without_cache(trained_run):
    args = ["--ckpt_path", "ckpt/best.pth", "--config", "tiny.yaml", "--prompt", "JULIET:\nO Romeo",
            "--max-length", "15", "--temperature", "0"]
    cached = run_script("infer.py", *args, cwd=trained_run)
    uncached = run_script("infer.py", *args, "--no-cache", cwd=trained_run)
    assert cached.returncode == 0 and uncached.returncode == 0, cached.stderr[-2000:] + uncached.stderr[-2000:]
    assert cached.stdout == uncached.stdout
    assert cached.stdout.startswith("JULIET:\nO Romeo") and len(cached.stdout) >= len("JULIET:\nO Romeo") + 10


def test_infer_starts_from_endoftext_on_empty_prompt(trained_run):
    result = run_script("infer.py", "--ckpt_path", "ckpt/best.pth", "--max-length", "10", "--seed", "0",
                        cwd=trained_run)
    assert result.returncode == 0 and len(result.stdout) > 1, result.stderr[-2000:]


@pytest.mark.parametrize("args, message", [
    (["--max-length", "0"], "error: --max-length must be > 0"),
    (["--top-p", "1.5"], r"error: --top-p must be in \(0, 1\]"),
    (["--ckpt_path", "nope.pth"], "error: checkpoint 'nope.pth' not found"),
])
def test_infer_errors_are_one_line(trained_run, args, message):
    result = run_script("infer.py", *args, cwd=trained_run)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.match(message, result.stderr.strip()), result.stderr
