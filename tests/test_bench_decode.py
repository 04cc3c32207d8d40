"""bench_decode.py: the matrix-vector paths' GB/s and decode tokens/s by dtype beside
llama.cpp, printed (never asserted)."""
import re

import pytest

from conftest import run_script


def test_bench_decode_prints_each_path_and_dtype_beside_llama_cpp(trained_run):
    pytest.importorskip("llama_cpp")
    checkpoint = str(trained_run / "ckpt" / "best.pth")
    result = run_script("bench_decode.py", checkpoint, "--agreement", checkpoint,
                        "--config", str(trained_run / "tiny.yaml"), cwd=trained_run)
    assert result.returncode == 0, result.stderr[-3000:]
    paths = dict(re.findall(r"^((?:fp32|bf16|int8) .+?) +([\d.]+)$", result.stdout, re.M))
    assert {"fp32 F.linear (BLAS)", "fp32 compiled step (reductions)",
            "int8 _weight_int8pack_mm, bf16 rows"} <= set(paths)
    speeds = dict(re.findall(r"^((?:SLM|llama.cpp) [\w ,.]+?) +([\d.]+) +[\d.]+ +[\d.]+x$",
                             result.stdout, re.M))
    assert set(speeds) >= {"SLM fp32", "SLM fp32, compiled", "SLM int8", "SLM int8, compiled",
                           "llama.cpp f32", "llama.cpp q8_0"}
    assert all(float(speed) > 0 for speed in speeds.values())
    agreement = re.search(r"top-1 agreement with fp32 .*: int8 ([\d.]+)%, bf16 ([\d.]+)%",
                          result.stdout)
    assert agreement and all(float(share) >= 90 for share in agreement.groups())
