"""Benchmarks of the memory-saving training modes, on the CPU or GPU the config picks:

    python bench_parallel.py checkpointing configs.yaml [section.key=value ...] [--steps 10]
    python bench_parallel.py sharding configs.yaml [section.key=value ...] [--steps 10]
    python bench_parallel.py lora configs.yaml [section.key=value ...] [--steps 5]

checkpointing counts the bytes a training forward keeps for backward, with and without
training.activation_checkpointing: every tensor autograd saves (saved-tensor hooks), plus the
block inputs checkpointing holds outside those hooks; and times a training step (forward,
backward) both ways, alternating, the median of --steps each, at the issue's shape: 6 blocks of
width 384 (6 heads, SwiGLU 1,024), context 256, batch 8.

sharding runs 2 ranks under torchrun (gloo on a CPU, NCCL on 2 GPUs) with DDP and with FSDP: the
median optimizer step at that shape under AdamW and under Muon (Newton-Schulz in fp32), and the
bytes of parameters, gradients and optimizer state each rank holds after a step (its local
shards' numel x element size) for a model of ~100M parameters (14 blocks of width 768) under
AdamW and under Muon, beside what train.py's memory check counts for it
(optim.training_bytes_per_rank); and for that model's FSDP snapshot under AdamW, the seconds of
DCP's save alone, of a save with its manifest (every rank reading back its files for their
CRC-32s), of the check before a resume, and of DCP's load. The files are fresh in the page
cache: from a cold disk the check also waits for the disk's read speed.

lora fine-tunes SmolLM2-135M's shape (random weights stand in for the base) at batch 2 x 256
tokens in fp32, one process each: in full with AdamW, in full with Muon, and as LoRA (rank 8 on
every target) with AdamW. Each prints the median optimizer step, the bytes of parameters,
gradients and optimizer state it holds, what train.py's memory check counts, and the peak
memory of one more step: of live tensors (a GPU's peak allocation; on a CPU, the peak of
torch.profiler's memory timeline), and on a CPU the peak RSS above the process's size before
the model was built, which also counts what the allocator keeps after tensors are freed.

Numbers are printed, not asserted: compare ratios taken in one run.
"""
from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from distributed import (broadcast_rank_0s, checkpoint_activations, gradient_sync,
                         shard_model_across_ranks, wrap_model)
from lora import attach
from model import Transformer, meta_model
from optim import (configure_optimizers, forward_backward, optimizer_step,
                   training_bytes_per_rank)
from runtime import (autocast_context, cpu_name, keep_freed_memory, pick_device, setup_precision,
                     sync)
from saves import find_snapshot_across_ranks
from snapshots import save_shards, sharded_state
from utils import ArgumentParser, Config, UserError, load_config, run_cli

ISSUE_SHAPE = ["model.num_layers=6", "model.embed_dim=384", "model.num_heads=6",
               "model.num_kv_heads=6", "model.ff_dim=1024", "model.max_seq_len=256",
               "data.context_length=256", "data.batch_size=8", "model.dropout=0.0"]
STATE_SHAPE = ["model.num_layers=14", "model.embed_dim=768", "model.num_heads=12",
               "model.num_kv_heads=12", "model.ff_dim=2048", "model.max_seq_len=64",
               "data.context_length=64", "data.batch_size=1", "model.dropout=0.0"]
FINE_TUNE_SHAPE = ["model.vocab_size=49152", "model.embed_dim=576", "model.num_heads=9",
                   "model.num_kv_heads=3", "model.ff_dim=1536", "model.num_layers=30",
                   "model.max_seq_len=256", "data.context_length=256", "data.batch_size=2",
                   "model.dropout=0.0", "training.precision=fp32"]  # SmolLM2-135M's
FINE_TUNES = {"full, adamw": ["training.optimizer=adamw"],
              "full, muon": ["training.optimizer=muon"],
              "LoRA r=8, adamw": ["training.optimizer=adamw", "training.lora_rank=8",
                                  "training.init_from=base"]}  # random weights as the base
RANKS = 2


def kept_for_backward(model: Transformer, x: torch.Tensor, y: torch.Tensor,
                      checkpointed: bool, precision: str) -> int:
    """Bytes one training forward keeps for its backward (then runs the backward)."""
    kept = []

    def count(tensor: torch.Tensor) -> None:
        kept.append(tensor.numel() * tensor.element_size())

    hooks = [block.register_forward_pre_hook(lambda _, inputs: count(inputs[0]))
             for block in model.layers] if checkpointed else []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: count(t) or t, lambda t: t):
        loss = training_loss(model, x, y, precision)
    for hook in hooks:
        hook.remove()
    loss.backward()
    return sum(kept)


def training_loss(model: Transformer, x: torch.Tensor, y: torch.Tensor,
                  precision: str) -> torch.Tensor:
    with autocast_context(x.device, precision):
        logits, _ = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.view(-1))


def step_seconds(model: Transformer, x: torch.Tensor, y: torch.Tensor, precision: str) -> float:
    sync(x.device)
    start = time.perf_counter()
    training_loss(model, x, y, precision).backward()
    sync(x.device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bench_checkpointing(config: Config, steps: int) -> None:
    device = pick_device(config.training.device)
    precision = setup_precision(config.training.precision, device)
    torch.manual_seed(0)
    plain = Transformer(config.model).to(device).train()
    checkpointed = copy.deepcopy(plain)
    checkpoint_activations(checkpointed)
    shape = (config.data.batch_size, config.data.context_length)
    x = torch.randint(0, config.model.vocab_size, shape, device=device)
    y = torch.randint(0, config.model.vocab_size, shape, device=device)
    kept = {name: kept_for_backward(model, x, y, name == "checkpointed", precision)
            for name, model in (("plain", plain), ("checkpointed", checkpointed))}
    seconds: dict[str, list[float]] = {"plain": [], "checkpointed": []}
    for _ in range(steps + 1):  # the first of each is a warm-up
        for name, model in (("plain", plain), ("checkpointed", checkpointed)):
            seconds[name].append(step_seconds(model, x, y, precision))
    median = {name: statistics.median(times[1:]) for name, times in seconds.items()}
    where = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    m = config.model
    print(f"{where}, {torch.get_num_threads()} threads, torch {torch.__version__}, {precision}; "
          f"{m.num_layers} x {m.embed_dim}, context {shape[1]}, batch {shape[0]}, "
          f"{plain.num_params():,} parameters")
    print(f"{'':<26}{'kept for backward':>18}{'step (fwd+bwd)':>16}")
    for name in ("plain", "checkpointed"):
        print(f"{name:<26}{kept[name] / 2**20:>14,.1f} MiB{median[name] * 1e3:>13,.0f} ms")
    print(f"{'checkpointed / plain':<26}{kept['checkpointed'] / kept['plain']:>18.2f}"
          f"{median['checkpointed'] / median['plain']:>16.2f}")


def local_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes this rank holds of `tensors`: a DTensor's local shard only."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def measure_on_rank(config: Config, steps: int, peak: bool = False) -> dict:
    """One rank's optimizer steps (seconds each, after a first that allocates the optimizer
    state) and, at the last one's backward, the bytes it holds of parameters, gradients and
    optimizer state; if `peak`, the peak memory of one more step (peak_memory)."""
    device = pick_device(config.training.device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    t, rank = config.training, dist.get_rank()
    precision = setup_precision(t.precision, device)
    torch.manual_seed(0)
    keep_freed_memory()  # as train.py does
    rss_before = resident_bytes()
    if t.parallelism == "fsdp":
        model = Transformer(config.model) if rank == 0 else meta_model(config.model)
        if t.lora_rank and rank == 0:
            attach(model, t)
        model = shard_model_across_ranks(model, device, precision, t)
    else:
        model = Transformer(config.model).to(device)
        if t.lora_rank:
            attach(model, t)
    optimizers = configure_optimizers(model, t, device, "fp32")
    # One process (the lora bench) runs as train.py does without torchrun: no DDP wrapper.
    if dist.get_world_size() == 1 and t.activation_checkpointing:
        checkpoint_activations(model)
    wrapped = wrap_model(model, t) if dist.get_world_size() > 1 else model
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    shape = (config.data.batch_size, config.data.context_length)
    generator = torch.Generator().manual_seed(rank)
    x, y = (torch.randint(config.model.vocab_size, shape, generator=generator) for _ in "xy")
    seconds, update_seconds, held = [], [], {}
    for _ in range(1 + steps):
        sync(device)
        start = time.perf_counter()
        with gradient_sync(wrapped, True):
            forward_backward(wrapped, x, y, device, precision, scaler, 1 / y.numel())
        params = list(model.parameters())
        held = {"parameters": local_bytes(params),
                "gradients": local_bytes([p.grad for p in params if p.grad is not None]),
                "optimizer state": local_bytes([value for optimizer in optimizers
                                                for state in optimizer.state.values()
                                                for value in state.values()
                                                if isinstance(value, torch.Tensor)])}
        sync(device)
        update_start = time.perf_counter()  # after the count, so the update is the step alone
        optimizer_step(optimizers, scaler, t.lr, t.grad_clip)
        sync(device)
        seconds.append(time.perf_counter() - start)
        update_seconds.append(time.perf_counter() - update_start)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    memory = peak_memory(lambda: (forward_backward(wrapped, x, y, device, precision, scaler,
                                                   1 / y.numel()),
                                  optimizer_step(optimizers, scaler, t.lr, t.grad_clip)),
                         device) if peak else 0
    snapshot = measure_snapshot(model, optimizers) if t.parallelism == "fsdp" else {}
    dist.destroy_process_group()
    return {"step_seconds": statistics.median(seconds[1:]),
            "update_seconds": statistics.median(update_seconds[1:]), "held": held,
            "peak_bytes": memory, "rss_peak_bytes": rss_peak, "snapshot": snapshot}


def resident_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(step: Callable[[], object], device: torch.device) -> int:
    """The most bytes live tensors take during `step`, parameters and optimizer state included:
    a GPU's peak allocation; on a CPU, the peak of torch.profiler's memory timeline (a CPU
    allocator keeps freed memory, so its peak RSS also counts memory no tensor holds)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True, record_shapes=True,
                                with_stack=True) as profiler:
        step()
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "timeline.json")
        profiler.export_memory_timeline(path, device="cpu")
        with open(path, encoding="utf-8") as f:
            _, sizes = json.load(f)  # [times, bytes by category at each time]
    return max(sum(categories) for categories in sizes)


def measure_snapshot(model: Transformer, optimizers: list[torch.optim.Optimizer]) -> dict:
    """Seconds of a sharded snapshot's save with DCP alone, its save with the manifest, the
    check before a resume and DCP's load; the save's bytes."""
    path = broadcast_rank_0s(tempfile.mkdtemp)

    def seconds_of(work: Callable[[], object]) -> float:
        dist.barrier()
        start = time.perf_counter()
        work()
        dist.barrier()
        return time.perf_counter() - start

    save = os.path.join(path, "step-00000001")
    try:
        measured = {
            "dcp_save": seconds_of(lambda: dcp.save(sharded_state(model, optimizers),
                                                    checkpoint_id=os.path.join(path, "plain"))),
            "save": seconds_of(lambda: save_shards(path, model, optimizers,
                                                   {"progress": {"step": 1}}, keep=1)),
            "check": seconds_of(lambda: find_snapshot_across_ranks(path)),
            "dcp_load": seconds_of(lambda: dcp.load(sharded_state(model, optimizers),
                                                    checkpoint_id=save)),
            "bytes": sum(os.path.getsize(os.path.join(save, name)) for name in os.listdir(save))}
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(path)
    return measured


def run_ranks(config_path: str, overrides: list[str], steps: int, ranks: int = RANKS,
              peak: bool = False) -> dict:
    """measure_on_rank on `ranks` processes under torchrun; rank 0's figures."""
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "rank_0.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={ranks}", os.path.abspath(__file__), "rank", config_path,
                   out, *overrides, "--steps", str(steps), *(["--peak"] if peak else [])]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            lines = result.stderr.strip().splitlines() or ["(no message)"]
            raise UserError("a rank failed: " + next(
                (line for line in lines if line.startswith("error:")), lines[-1]))
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def bench_sharding(config_path: str, overrides: list[str], steps: int) -> None:
    device = pick_device(load_config(config_path, overrides).training.device)
    where = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"{RANKS} ranks ({'gloo' if device.type == 'cpu' else 'NCCL'}) on {where}, "
          f"torch {torch.__version__}")
    for optimizer in ("adamw", "muon"):
        step = {kind: run_ranks(config_path, ISSUE_SHAPE + overrides + [
            f"training.parallelism={kind}", f"training.optimizer={optimizer}"], steps)
            for kind in ("ddp", "fsdp")}
        print(f"optimizer step ({optimizer}), 6 x 384, context 256, batch 8 per rank: " + ", ".join(
            f"{kind.upper()} {step[kind]['step_seconds'] * 1e3:,.0f} ms (update "
            f"{step[kind]['update_seconds'] * 1e3:,.0f})" for kind in step)
            + f"; FSDP / DDP {step['fsdp']['step_seconds'] / step['ddp']['step_seconds']:.2f}x",
            flush=True)
    print(f"{'held per rank, MiB':<28}{'parameters':>12}{'gradients':>11}{'optimizer':>11}"
          f"{'total':>9}{'/ DDP':>8}{'check':>8}")
    for optimizer in ("adamw", "muon"):
        settings = {kind: STATE_SHAPE + overrides + [f"training.parallelism={kind}",
                                                     f"training.optimizer={optimizer}"]
                    for kind in ("ddp", "fsdp")}
        runs = {kind: run_ranks(config_path, settings[kind], 1) for kind in settings}
        state = {kind: run["held"] for kind, run in runs.items()}
        for kind, held in state.items():
            total, ddp_total = sum(held.values()), sum(state["ddp"].values())
            check = training_bytes_per_rank(load_config(config_path, settings[kind]), RANKS)
            print(f"{kind.upper() + ', ' + optimizer:<28}"
                  + "".join(f"{held[part] / 2**20:>{width},.0f}" for part, width in
                            (("parameters", 12), ("gradients", 11), ("optimizer state", 11)))
                  + f"{total / 2**20:>9,.0f}{total / ddp_total:>8.2f}{check / 2**20:>8,.0f}")
        if optimizer == "adamw":
            snapshot = runs["fsdp"]["snapshot"]
    gib = snapshot["bytes"] / 2**30
    print(f"FSDP snapshot (adamw), {gib * 1024:,.0f} MiB on {RANKS} ranks: DCP save "
          f"{snapshot['dcp_save']:.2f} s, save with manifest {snapshot['save']:.2f} s; check "
          f"before resume {snapshot['check']:.2f} s ({gib / snapshot['check']:.2f} GiB/s), DCP "
          f"load {snapshot['dcp_load']:.2f} s")


def bench_lora(config_path: str, overrides: list[str], steps: int) -> None:
    device = pick_device(load_config(config_path, overrides).training.device)
    where = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"fine-tuning SmolLM2-135M's shape, batch 2 x 256 tokens, fp32, one process on "
          f"{where}, torch {torch.__version__}")
    print(f"{'MiB':<18}{'parameters':>12}{'gradients':>11}{'optimizer':>11}{'total':>9}"
          f"{'check':>8}{'peak':>8}{'RSS peak':>10}{'step s':>8}")
    runs = {}
    for name, settings in FINE_TUNES.items():
        overridden = FINE_TUNE_SHAPE + settings + overrides
        runs[name] = run = run_ranks(config_path, overridden, steps, ranks=1, peak=True)
        held = run["held"]
        check = training_bytes_per_rank(load_config(config_path, overridden), 1)
        print(f"{name:<18}" + "".join(f"{held[part] / 2**20:>{width},.0f}" for part, width in (
            ("parameters", 12), ("gradients", 11), ("optimizer state", 11)))
              + f"{sum(held.values()) / 2**20:>9,.0f}{check / 2**20:>8,.0f}"
              f"{run['peak_bytes'] / 2**20:>8,.0f}{run['rss_peak_bytes'] / 2**20:>10,.0f}"
              f"{run['step_seconds']:>8.2f}", flush=True)
    lora, full = runs["LoRA r=8, adamw"], runs["full, adamw"]
    print(f"LoRA / full (adamw): weights, gradients and optimizer state "
          f"{sum(lora['held'].values()) / sum(full['held'].values()):.2f}x, peak "
          f"{lora['peak_bytes'] / full['peak_bytes']:.2f}x (RSS "
          f"{lora['rss_peak_bytes'] / full['rss_peak_bytes']:.2f}x), step "
          f"{lora['step_seconds'] / full['step_seconds']:.2f}x")


def main() -> None:
    parser = ArgumentParser(description="Benchmarks of the memory-saving training modes.")
    commands = parser.add_subparsers(dest="command", required=True)
    checkpointing = commands.add_parser("checkpointing", help="activation checkpointing: "
                                        "bytes kept for backward and step time, with and without")
    checkpointing.add_argument("config", help="configs.yaml")
    checkpointing.add_argument("overrides", nargs="*", help="section.key=value (after the "
                               "issue's shape, so they win)")
    checkpointing.add_argument("--steps", type=int, default=10)
    sharding = commands.add_parser("sharding", help=f"DDP against FSDP on {RANKS} ranks: step "
                                   "time, and what each rank holds")
    sharding.add_argument("config", help="configs.yaml")
    sharding.add_argument("overrides", nargs="*", help="section.key=value")
    sharding.add_argument("--steps", type=int, default=10)
    lora = commands.add_parser("lora", help="a LoRA fine-tune against a full one: memory "
                               "and step time")
    lora.add_argument("config", help="configs.yaml")
    lora.add_argument("overrides", nargs="*", help="section.key=value")
    lora.add_argument("--steps", type=int, default=5)
    rank = commands.add_parser("rank")  # one of sharding's ranks, under torchrun
    rank.add_argument("config")
    rank.add_argument("out")
    rank.add_argument("overrides", nargs="*")
    rank.add_argument("--steps", type=int, default=10)
    rank.add_argument("--peak", action="store_true")
    args = parser.parse_args()
    if args.command == "checkpointing":
        bench_checkpointing(load_config(args.config, ISSUE_SHAPE + args.overrides), args.steps)
    elif args.command == "sharding":
        bench_sharding(args.config, args.overrides, args.steps)
    elif args.command == "lora":
        bench_lora(args.config, args.overrides, args.steps)
    else:
        measured = measure_on_rank(load_config(args.config, args.overrides), args.steps,
                                   args.peak)
        if os.environ.get("RANK") == "0":
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(measured, f)


if __name__ == "__main__":
    run_cli(main)
