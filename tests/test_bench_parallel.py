"""bench_parallel.py: the LoRA benchmark runs end to end at a tiny shape and prints what it
measured beside what train.py's memory check counts."""

from __future__ import annotations

import re

from conftest import REPO, run_script

TINY = ["model.vocab_size=4096", "model.embed_dim=64", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ff_dim=128", "model.num_layers=2", "model.max_seq_len=64",
        "data.context_length=32", "training.device=cpu"]


def test_lora_bench_prints_each_fine_tune_with_the_memory_check_and_the_ratios(tmp_path):
    result = run_script("bench_parallel.py", "lora", str(REPO / "configs.yaml"), *TINY,
                        "--steps", "1", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for line in result.stdout.splitlines():
        match = re.match(r"(full, adamw|full, muon|LoRA r=8, adamw)\s+(.*)", line)
        if match:
            rows[match.group(1)] = [float(value.replace(",", ""))
                                    for value in match.group(2).split()]
    assert rows.keys() == {"full, adamw", "full, muon", "LoRA r=8, adamw"}
    for name, (params, grads, optimizer, total, check, peak, rss, step) in rows.items():
        assert total == check, f"{name}: the memory check counts what the run holds"
        assert peak >= total > 0 and step > 0
    lora, full = rows["LoRA r=8, adamw"], rows["full, adamw"]
    assert lora[1] < full[1] / 10 and lora[2] < full[2] / 10  # adapters' gradients and moments
    assert re.search(r"LoRA / full \(adamw\): weights, gradients and optimizer state 0\.\d\dx, "
                     r"peak \d\.\d\dx \(RSS \d\.\d\dx\), step \d\.\d\dx", result.stdout)
