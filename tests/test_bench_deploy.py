"""bench_deploy.py is smoke-tested here: it runs and reports sane numbers, not targets."""

import re

import pytest

from conftest import run_script


def test_bench_gguf_compares_each_dtype_with_f32_in_llama_cpp_and_slm(trained_run):
    pytest.importorskip("llama_cpp")
    result = run_script("bench_deploy.py", "gguf", str(trained_run / "ckpt" / "best.pth"),
                        "--config", str(trained_run / "tiny.yaml"), cwd=trained_run)
    assert result.returncode == 0, result.stderr[-3000:]
    number = r"([\d.,e+-]+)"
    rows = {name: values for name, *values in re.findall(
        rf"^(llama.cpp \w+|SLM generate.*\)) +(?:{number} +)?{number}% +{number} +{number}$",
        result.stdout, re.MULTILINE)}
    assert list(rows) == ["llama.cpp f32", "llama.cpp f16", "llama.cpp bf16", "llama.cpp q8_0",
                          "SLM generate (fp32)", "SLM generate, compiled (fp32)"]
    size_mb = {name: float(values[0]) for name, values in rows.items() if values[0]}
    assert size_mb["llama.cpp f32"] > size_mb["llama.cpp f16"] > size_mb["llama.cpp q8_0"]
    top1 = {name: float(values[1]) for name, values in rows.items()}
    delta = {name: float(values[2]) for name, values in rows.items()}
    assert top1["SLM generate (fp32)"] >= 99 and delta["SLM generate (fp32)"] < 1e-3  # = f32
    assert top1["llama.cpp q8_0"] >= 90
    assert 0 < delta["llama.cpp f16"] < delta["llama.cpp q8_0"] < 0.5
    assert all(float(values[3].replace(",", "")) > 0 for values in rows.values())


def test_bench_serve_times_generate_one_streamed_client_and_several(tmp_path):
    result = run_script("bench_deploy.py", "serve", "--prompt-tokens", "16", "--new-tokens",
                        "24", "--clients", "3,8", "--no-compile", cwd=tmp_path)  # the table
    assert result.returncode == 0, result.stderr[-3000:]
    rows = dict(re.findall(r"^(generate .*path\)|serve.py, 1 streamed client) +([\d.]+) +"
                           r"[\d,.]+$", result.stdout, re.MULTILINE))
    assert set(rows) == {"generate (infer.py's path)", "serve.py, 1 streamed client"}
    assert all(float(first_token_ms) > 0 for first_token_ms in rows.values())
    rates = dict(re.findall(r"^(1 client, 8 requests in turn|3 at once|8 at once) +(?:[\d.]+ +)?"
                            r"([\d,.]+)$", result.stdout, re.MULTILINE))
    assert set(rates) == {"1 client, 8 requests in turn", "3 at once", "8 at once"}
    assert all(float(rate.replace(",", "")) > 0 for rate in rates.values())
    assert re.search(r"8 at once / 8 in turn: [\d.]+x", result.stdout)
