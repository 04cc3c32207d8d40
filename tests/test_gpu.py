"""The CUDA paths, to run first on any new GPU machine: python -m pytest -q -rs tests -m gpu

Where there is no CUDA device each test is reported as skipped with the reason "no CUDA device",
never as passed. README (Multi-GPU and the GPU check) says what each one should show."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from conftest import REPO, tiny_config, write_config
from data import TokenWindows, epoch_loader
from model import Transformer
from utils import DataConfig, ModelConfig, config_from_dict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
CUDA = torch.device("cuda")


def train_losses(workdir: Path, corpus: Path, **training) -> list[float]:
    """The logged training losses of a short in-process run on the GPU."""
    settings = {"max_steps": 30, "log_every": 5, "device": "cuda", **training}
    train.train(config_from_dict(tiny_config(workdir, corpus, training=settings)), CUDA)
    events = EventAccumulator(str(workdir / "runs" / "test"))
    events.Reload()
    return [event.value for event in events.Scalars("1_train/loss")]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("compile_model", [False, True], ids=["eager", "compiled"])
def test_training_on_cuda_learns_in_each_precision(tmp_path, corpus, precision, compile_model):
    losses = train_losses(tmp_path, corpus, precision=precision, compile=compile_model)
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0] - 1.0, losses


def test_steps_that_neither_log_evaluate_nor_save_never_wait_for_the_gpu(tmp_path, corpus,
                                                                          monkeypatch):
    """From the third step to the last (which ends the run, so it evaluates and saves), CUDA's
    sync debug mode turns any wait of the host for the device into an error: a stream or device
    synchronize, or a blocking copy such as .item(). Waiting on an event is not one of them
    (c10's CUDAEvent::synchronize reports nothing), which is what runtime.read_later does for
    the previous step's nan/inf flag, with this step already queued behind it."""
    batches_of = train.training_batches

    def watched(*args, **kwargs):
        for index, batch in enumerate(batches_of(*args, **kwargs)):
            torch.cuda.set_sync_debug_mode("error" if 2 <= index < 11 else "default")
            yield batch

    monkeypatch.setattr(train, "training_batches", watched)
    try:
        train_losses(tmp_path, corpus, max_steps=12, log_every=1000, eval_every=1000,
                     save_every=1000, precision="bf16")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_flash_attention_serves_the_training_step():
    config = ModelConfig(
        vocab_size=4096,
        embed_dim=256,
        num_heads=4,
        num_kv_heads=2,
        ff_dim=704,
        num_layers=2,
        max_seq_len=512,
    )
    model = Transformer(config).to(CUDA)
    idx = torch.randint(0, 4096, (4, 512), device=CUDA)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(idx, idx)  # raises if the flash kernel cannot take these inputs
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_pinned_non_blocking_copies_arrive_intact():
    tokens = torch.arange(10_000, dtype=torch.int32).numpy().astype("uint16")
    data = DataConfig(context_length=32, batch_size=8)
    windows = TokenWindows(tokens, data.context_length)
    x, y = next(iter(epoch_loader(windows, data, list(range(len(windows))), 0, pin_memory=True)))
    assert x.is_pinned() and y.is_pinned()
    on_gpu = x.to(CUDA, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), x)


@pytest.mark.parametrize("settings", [
    {},
    {"parallelism": "fsdp", "precision": "bf16", "activation_checkpointing": True,
     "compile": True, "optimizer": "muon", "snapshot_dir": "snapshot"},
], ids=["ddp", "fsdp-bf16-checkpointed-compiled-muon"])
def test_torchrun_one_process_with_nccl(tmp_path, corpus, settings):
    """Prints the run's last tokens/s and MFU (TensorBoard's 4_perf) for the GPU check's notes."""
    training = {"max_steps": 40, "log_every": 10, "device": "cuda", **settings}
    if "snapshot_dir" in training:  # FSDP snapshots are directories of shards
        training["snapshot_path"] = str(tmp_path / "ckpt" / training.pop("snapshot_dir"))
    config = tiny_config(tmp_path, corpus, training=training)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        str(REPO / "data_parallel_train.py"),
        str(write_config(tmp_path / "tiny.yaml", config)),
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 process(es) on cuda" in result.stdout and "done: 40 steps" in result.stdout
    events = EventAccumulator(str(tmp_path / "runs" / "test"))
    events.Reload()
    tokens_per_sec, mfu = (events.Scalars(f"4_perf/{name}")[-1].value
                           for name in ("tokens_per_sec", "mfu"))
    print(f"\n{settings or 'ddp'}: {tokens_per_sec:,.0f} tokens/s, MFU {mfu:.4f}")
    assert tokens_per_sec > 0 and 0 < mfu < 1


def test_bench_gpu_table_reports_mfu_against_the_measured_bf16_peak():
    gpt2_small = [
        "model.embed_dim=768",
        "model.num_heads=12",
        "model.num_kv_heads=12",
        "model.ff_dim=2048",
        "model.num_layers=12",
        "model.max_seq_len=1024",
        "data.context_length=1024",
        "data.batch_size=16",
    ]
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench.py"),
            "configs.yaml",
            *gpt2_small,
            "--compile",
            "--steps",
            "10",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)  # the table, for README: pytest -s shows it
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert results["peak_flops"]["bf16"] > results["peak_flops"]["fp32"] > 0
    for row in results["training"].values():
        assert 0 < row["mfu"] < 1, row


@pytest.mark.parametrize("compile_model", [False, True], ids=["eager", "compiled"])
def test_a_bf16_lora_run_on_cuda_learns_and_saves_its_adapters(trained_run, tmp_path, corpus,
                                                                 compile_model):
    """LoRA on the GPU: the frozen block weights stored in bf16, the adapters trained through
    autocast and (compiled) through torch.compile with their forward hooks."""
    losses = train_losses(tmp_path, corpus, precision="bf16", compile=compile_model,
                          init_from=str(trained_run / "ckpt" / "best.pth"), lora_rank=8,
                          lr=1e-2)
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0], losses
    best = torch.load(tmp_path / "ckpt" / "best.pth", weights_only=True)
    assert best["model"] and all(".lora_" in name for name in best["model"])
