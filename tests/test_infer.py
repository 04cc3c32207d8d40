import io
import json
import re
import shutil

import pytest

import infer
from chat import render
from conftest import assert_one_error_line, run_main, run_script


def test_infer_streams_samples_from_a_trained_checkpoint(trained_run):
    result = run_script(
        "infer.py",
        "--ckpt_path",
        "ckpt/best.pth",
        "--prompt",
        "ROMEO:",
        "--max-length",
        "20",
        "--seed",
        "1",
        "--num-samples",
        "2",
        "--top-k",
        "50",
        "--top-p",
        "0.95",
        cwd=trained_run,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    samples = result.stdout.split("\n" + "-" * 40 + "\n")
    assert len(samples) == 2
    assert all(
        sample.startswith("ROMEO:") and len(sample) > len("ROMEO:") + 10 for sample in samples
    )


def test_infer_greedy_is_the_same_with_and_without_cache_and_compiled(trained_run):
    args = [
        "--ckpt_path",
        "ckpt/best.pth",
        "--config",
        "tiny.yaml",
        "--prompt",
        "JULIET:\nO Romeo",
        "--max-length",
        "15",
        "--temperature",
        "0",
    ]
    cached = run_script("infer.py", *args, cwd=trained_run)
    uncached = run_script("infer.py", *args, "--no-cache", cwd=trained_run)
    compiled = run_script("infer.py", *args, "--compile", cwd=trained_run)
    for result in (cached, uncached, compiled):
        assert result.returncode == 0, result.stderr[-2000:]
    assert cached.stdout == uncached.stdout == compiled.stdout
    assert (
        cached.stdout.startswith("JULIET:\nO Romeo")
        and len(cached.stdout) >= len("JULIET:\nO Romeo") + 10
    )


def test_infer_starts_from_endoftext_on_empty_prompt(trained_run):
    result = run_script(
        "infer.py",
        "--ckpt_path",
        "ckpt/best.pth",
        "--max-length",
        "10",
        "--seed",
        "0",
        cwd=trained_run,
    )
    assert result.returncode == 0 and len(result.stdout) > 1, result.stderr[-2000:]


def test_infer_keeps_the_end_of_a_prompt_longer_than_the_context(trained_run, monkeypatch, capsys):
    prompt = "O Romeo, Romeo, wherefore art thou Romeo? " * 20  # far more than the 32 trained on
    code, stdout, stderr = run_main(
        infer.main,
        ["--ckpt_path", "ckpt/best.pth", "--prompt", prompt, "--max-length", "5", "--seed", "0",
         "--dtype", "fp32"],
        trained_run,
        monkeypatch,
        capsys,
    )
    assert code == 0, stderr
    assert re.fullmatch(
        r"warning: prompt has \d+ tokens, more than the 32 the model was trained on; "
        r"it sees the last 32\n",
        stderr,
    )
    assert stdout.startswith(prompt) and len(stdout) > len(prompt)


def damaged_copy(trained_run, workdir):
    (workdir / "bad.pth").write_bytes((trained_run / "ckpt" / "best.pth").read_bytes()[:3000])


@pytest.mark.parametrize(
    "args, setup, message",
    [
        (["--max-length", "0"], None, r"--max-length must be in \[1, 1048576\], got 0"),
        (["--max-length", "-5"], None, r"--max-length must be in \[1, 1048576\], got -5"),
        (["--top-k", "-1"], None, r"--top-k must be an integer in \[0, 16777216\], got -1"),
        (["--top-p", "0"], None, r"--top-p must be in \(0, 1\], got 0.0 — 1 is off; for the "
         "likeliest token every time, set temperature to 0"),
        (["--top-p", "1.5"], None, r"--top-p must be in \(0, 1\], got 1.5"),
        (["--temperature", "-0.1"], None, r"--temperature must be a number in \[0, 2\], got "
         "-0.1"),
        (["--temperature", "nan"], None, r"--temperature must be a number in \[0, 2\]"),
        (["--num-samples", "0"], None, r"--num-samples must be in \[1, 65536\]"),
        (["--ckpt_path", "nope.pth"], None, "checkpoint 'nope.pth' not found"),
        (
            ["--ckpt_path", "bad.pth"],
            damaged_copy,
            "cannot load checkpoint 'bad.pth'.* corrupt, truncated",
        ),
        (["--prompts", "nope.txt"], None, "--prompts nope.txt not found"),
        (["--prompts", "p.jsonl"], lambda run, workdir: (workdir / "p.jsonl").write_text(
            '{"prompt": "a"}\nnot json\n'), "line 2 of p.jsonl is not JSON"),
        (["--prompts", "p.jsonl"], lambda run, workdir: (workdir / "p.jsonl").write_text(
            '{"messages": [{"role": "robot", "content": "hi"}]}\n'),
         'line 1 of p.jsonl has neither "prompt"'),
        (["--prompts", "p.txt", "--chat", "--no-cache"], None,
         "--prompts generates every prompt of its file, with neither --chat, --no-cache"),
        (["--out", "o.jsonl"], None, "--out is where --prompts writes"),
        (
            ["--ckpt_path", "ckpt/best.pth", "--config", "other.yaml"],
            lambda run, workdir: (workdir / "other.yaml").write_text(
                "data:\n  tokenizer_path: nope.json\n"
            ),
            "tokenizer 'nope.json' not found",
        ),
    ],
)
def test_infer_bad_input_is_one_line_exit_2(
    trained_run, tmp_path, monkeypatch, capsys, args, setup, message
):
    shutil.copytree(trained_run / "ckpt", tmp_path / "ckpt")
    if setup:
        setup(trained_run, tmp_path)
    code, stdout, stderr = run_main(infer.main, args, tmp_path, monkeypatch, capsys)
    assert_one_error_line(code, stderr, "^error: " + message)
    assert stdout == ""


def test_infer_entry_point_error_has_no_traceback(trained_run):
    result = run_script("infer.py", "--top-k", "-1", cwd=trained_run)
    assert_one_error_line(result.returncode, result.stderr, "^error: --top-k must be an integer")


def test_infer_compile_without_a_cxx_compiler_is_one_line_exit_2(trained_run, tmp_path):
    result = run_script(
        "infer.py",
        "--ckpt_path",
        "ckpt/best.pth",
        "--max-length",
        "3",
        "--compile",
        cwd=trained_run,
        env={
            "CXX": str(tmp_path / "no-such-g++"),
            "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        },
    )
    assert_one_error_line(
        result.returncode, result.stderr, "^error: torch.compile needs a working C\\+\\+ compiler"
    )


def test_chat_on_an_slm_checkpoint_keeps_the_system_turn_and_ends_replies_at_the_window(
    trained_run, monkeypatch, capsys
):
    """A 32-token window: each reply gets the rest of it and is cut there with a warning; the
    second turn's prompt drops the first pair but keeps the system turn."""
    monkeypatch.setattr("sys.stdin", io.StringIO("What news?\n\nWho is there?\n"))
    rendered = []
    original = infer.chat_prompt

    def spy(chat, encode, system, history, window):
        ids, dropped = original(chat, encode, system, history, window)
        rendered.append(render(chat, [{"role": "system", "content": system},
                                      *history[2 * dropped:]], True))
        return ids, dropped

    monkeypatch.setattr(infer, "chat_prompt", spy)
    argv = ["--ckpt_path", "ckpt/best.pth", "--chat", "--system", "Be kind.",
            "--temperature", "0", "--max-length", "100"]
    code, stdout, stderr = run_main(infer.main, argv, trained_run, monkeypatch, capsys)
    assert code == 0, stderr
    assert len(rendered) == 2, "the empty line is no turn"
    assert rendered[1].startswith("SYSTEM:\nBe kind.") and "What news?" not in rendered[1]
    assert stderr.count("warning: the reply filled the 32-token window and ends here") == 2


def test_infer_prompts_generates_a_file_of_prompts_together_in_their_order(trained_run, tmp_path):
    (tmp_path / "prompts.txt").write_text("ROMEO:\nJULIET:\n\nMACBETH:\n", encoding="utf-8")
    (tmp_path / "prompts.jsonl").write_text(
        '{"prompt": "ROMEO:"}\n{"messages": [{"role": "user", "content": "Who is there?"}]}\n',
        encoding="utf-8")
    common = ["--ckpt_path", str(trained_run / "ckpt" / "best.pth"), "--max-length", "12",
              "--seed", "3", "--max-batch", "2"]
    result = run_script("infer.py", *common, "--prompts", str(tmp_path / "prompts.txt"),
                        "--out", str(tmp_path / "out.jsonl"), cwd=trained_run)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == ["ROMEO:", "JULIET:", "", "MACBETH:"]
    assert all(line["finish_reason"] in ("stop", "length") and 0 < line["completion_tokens"]
               <= 12 and isinstance(line["text"], str) for line in lines)
    again = run_script("infer.py", *common, "--prompts", str(tmp_path / "prompts.txt"),
                       "--max-batch", "4", cwd=trained_run)  # to stdout, another batch
    assert [json.loads(line) for line in again.stdout.splitlines()] == lines
    chat = run_script("infer.py", *common, "--prompts", str(tmp_path / "prompts.jsonl"),
                      "--temperature", "0", cwd=trained_run)
    records = [json.loads(line) for line in chat.stdout.splitlines()]
    assert records[0]["prompt"] == "ROMEO:" and records[1]["messages"][0]["role"] == "user"
    compiled = run_script("infer.py", *common, "--prompts", str(tmp_path / "prompts.jsonl"),
                          "--temperature", "0", "--compile", cwd=trained_run)
    assert [json.loads(line) for line in compiled.stdout.splitlines()] == records
    greedy = run_script("infer.py", *common, "--prompt", "ROMEO:", "--temperature", "0",
                        cwd=trained_run)
    assert greedy.stdout == "ROMEO:" + records[0]["text"] + "\n"  # as --prompt streams it


@pytest.mark.parametrize("flags, compiled", [
    ([], False), (["--max-length", "4096"], False), (["--max-length", "8192"], True),
    (["--max-length", "2048", "--num-samples", "4"], True),
    (["--max-length", "16384", "--no-compile"], False), (["--compile"], True)])
def test_the_decode_step_compiles_when_the_work_is_long_enough(monkeypatch, flags, compiled):
    monkeypatch.setattr("sys.argv", ["infer.py", *flags])
    assert infer.parse_args().compile is compiled
