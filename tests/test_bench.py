"""bench.py is smoke-tested here: it runs and reports sane numbers; its figures are not targets."""

import json

import torch

import bench
from conftest import run_script, tiny_config, write_config


def test_bench_reports_every_section(tmp_path, corpus):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, corpus))
    result = run_script(
        "bench.py",
        str(config),
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--reference",
        "--json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "KV cache speed-up at batch 1:" in result.stdout and "MFU" in result.stdout
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["device"] == "cpu" and report["precision"] == "fp32"
    assert report["peak_flops"]["fp32"] > 1e9
    training = report["training"]["fp32"]
    assert (
        training["tokens_per_sec"] > 0
        and 0 < training["mfu"] < 1.5
        and 0 <= training["data_wait_share"] < 1
    )
    assert training["params"] > 0 and training["peak_memory_mb"] > 0
    reference = report["training"]["reference GPT-2, fp32"]
    ratio = training["tokens_per_sec"] / reference["tokens_per_sec"]
    assert f"SLM / reference GPT-2 tokens/s, fp32: {ratio:.2f}x" in result.stdout
    assert abs(reference["params"] - training["params"]) < 0.1 * training["params"]  # equal work
    assert set(report["optimizer_step_ms"]) == {"foreach", "fused", "muon bf16", "muon fp32"}
    assert "Muon on the blocks + AdamW, orthogonalising in bf16 " in result.stdout
    assert f"training uses {report['newton_schulz_dtype']} here" in result.stdout
    assert all(ms > 0 for ms in report["optimizer_step_ms"].values())
    assert set(report["generation"]) == {
        f"batch {b}, {kind}" for b in (1, 8) for kind in ("KV cache", "no cache")
    }
    assert all(
        row["prefill_ms"] > 0 and row["decode_tokens_per_sec"] > 0
        for row in report["generation"].values()
    )
    assert not list(tmp_path.glob("ckpt/*")), "a benchmark writes no checkpoints"


def test_a_bf16_training_row_joins_fp32_on_a_cpu_only_where_the_peak_gate_passes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bench.training_precisions(cpu, "fp32", {"fp32": 1e11, "bf16": 4e11}) == ["fp32", "bf16"]
    assert bench.training_precisions(cpu, "fp32", {"fp32": 1e11, "bf16": 1e9}) == ["fp32"]
    assert bench.training_precisions(cuda, "bf16", {"fp32": 1e11, "bf16": 4e11}) == ["bf16"]
