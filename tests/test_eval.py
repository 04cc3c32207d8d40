"""eval.py end to end: the table, --json, --limit, --fewshot, and one-line errors."""

import json

import pytest

import eval as eval_script
from conftest import assert_one_error_line, run_main, run_script, write_task


def test_eval_prints_a_table_for_a_checkpoint_and_a_builtin_task(trained_run):
    task = write_task(trained_run / "romeo.jsonl", 12)
    result = run_script("eval.py", "--ckpt_path", "ckpt/best.pth", "--tasks", str(task),
                        "shakespeare-line", "--limit", "40", cwd=trained_run)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:]}
    assert rows["romeo"][1] == "12" and rows["shakespeare-line"][1] == "40"
    assert "±" in rows["romeo"] and "acc_norm" in result.stdout


def test_json_prints_one_line_of_results_and_limit_and_fewshot_apply(
        trained_run, monkeypatch, capsys):
    task = write_task(trained_run / "romeo.jsonl", 12)
    code, out, err = run_main(eval_script.main, [
        "--ckpt_path", "ckpt/best.pth", "--tasks", str(task), "--json", "--limit", "5",
        "--fewshot", "2"], trained_run, monkeypatch, capsys)
    assert code == 0, err
    results = json.loads(out)
    assert list(results) == ["romeo"] and results["romeo"]["n"] == 5
    assert set(results["romeo"]) == {"acc", "acc_norm", "n"}
    assert "2-shot" in err and "romeo" in err


@pytest.mark.parametrize("args, message", [
    (["--tasks", "bad.jsonl"], r"bad.jsonl, line 1: not JSON"),
    (["--tasks", "hellaswag"], r"unknown task 'hellaswag'"),
    (["--tasks", "romeo.jsonl", "--fewshot", "12"], r"--fewshot 12 needs more than 12"),
    (["--tasks", "romeo.jsonl", "--limit", "0"], r"--limit must be in \[1"),
    (["--tasks", "romeo.jsonl", "--ckpt_path", "nope.pth"], r"checkpoint 'nope.pth' not found"),
])
def test_bad_input_is_one_line_exit_2(trained_run, tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    write_task(tmp_path / "romeo.jsonl", 12)
    (tmp_path / "ckpt").symlink_to(trained_run / "ckpt")
    code, _, err = run_main(eval_script.main, ["--ckpt_path", "ckpt/best.pth", *args], tmp_path,
                            monkeypatch, capsys)
    assert_one_error_line(code, err, message)
