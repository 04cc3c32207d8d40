"""Distributed data-parallel training under torchrun: one process per device, NCCL on GPUs, gloo on CPU.

    torchrun --standalone --nproc_per_node=N data_parallel_train.py configs.yaml [section.key=value ...]

Each optimizer step sees batch_size x grad_accum_steps x world_size windows; DDP averages the
gradients. The schedule, AMP, clipping, evaluation and snapshot code are train.py's, imported.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from data import epoch_loader, token_byte_lengths
from model import Transformer
from train import (UNPLANNED, build_optimizer, cap_steps, catch_stop_signals, check_outputs_writable,
                   evaluation_metrics, evaluation_sums, fixed_val_batches, forward_backward, load_snapshot, log_hparams,
                   log_scalars, log_training, nonfinite_loss_error, nothing_to_train, open_writer, optimizer_step,
                   parse_cli, planned_total_steps, prepare_data, restore_rng_state, rng_state, run_length, sample_text,
                   save_snapshot, steps_per_epoch, stop_on_signal)
from utils import (Config, UserError, atomic_save, config_to_dict, enable_tf32, format_config, lr_at,
                   measure_peak_flops, pick_precision, run_cli, use_compile)


def init_distributed(config: Config) -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device) from torchrun's environment, with the process group up."""
    if not all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        raise UserError("data_parallel_train.py must be launched by torchrun — run torchrun --standalone "
                        "--nproc_per_node=N data_parallel_train.py configs.yaml (or python train.py on one device)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    wanted = config.training.device
    if wanted == "mps":
        raise UserError("DDP does not run on MPS — use training.device=cpu, or python train.py on the Mac's GPU")
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("training.device is 'cuda' but no CUDA GPU is visible — use device=auto or cpu")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()} — "
                            f"launch at most --nproc_per_node={torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        init_process_group("nccl", rank, world_size)
    else:
        device = torch.device("cpu")
        init_process_group("gloo", rank, world_size)
    return rank, local_rank, world_size, device


def init_process_group(backend: str, rank: int, world_size: int) -> None:
    """env:// init, except that a single-node torchrun restart gets its own namespace in the agent's store.

    torchrun keeps one TCPStore across restarts and the workers publish their addresses in it without
    a per-attempt prefix, so a restarted rank can read a dead rank's address and fail or hang. On one
    node TORCHELASTIC_RESTART_COUNT is the same for every worker and names the attempt; across nodes
    it counts per agent (pytorch#108158), so there torch's default is kept.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and os.environ.get("GROUP_WORLD_SIZE") == "1":
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=False)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"slm/attempt_{attempt}", store), rank=rank,
                                world_size=world_size)
    else:
        dist.init_process_group(backend)


def train(config: Config, rank: int, local_rank: int, world_size: int, device: torch.device) -> None:
    t, is_main = config.training, rank == 0
    if is_main:
        print(format_config(config), flush=True)
        check_outputs_writable(config)
    precision = pick_precision(t.precision, device)
    torch.manual_seed(t.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    enable_tf32(device)

    # One process per node builds the corpus and token cache; the others wait, then read the cache.
    if local_rank == 0:
        tokenizer, train_set, val_set = prepare_data(config)
    dist.barrier()
    if local_rank != 0:
        tokenizer, train_set, val_set = prepare_data(config)

    model = Transformer(config.model).to(device)
    optimizer = build_optimizer(model, config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "train_seconds": 0.0, "best_val_loss": math.inf,
                "best_val_bpb": math.inf, "run_name": t.run_name or time.strftime("%Y%m%d-%H%M%S"),
                "world_size": world_size}
    if os.path.exists(t.snapshot_path):
        progress, rng_states = load_snapshot(t.snapshot_path, model, optimizer, scaler, device)
        if progress.get("world_size") != world_size:
            raise UserError(f"{t.snapshot_path} was written by {progress.get('world_size') or 'a single-device'} "
                            f"run, this one has {world_size} processes — relaunch with the same total number "
                            "of processes, or use another training.snapshot_path to start over")
        restore_rng_state(rng_states[rank])
        if is_main:
            print(f"resuming from {t.snapshot_path}: step {progress['step']}, epoch {progress['epoch']}, "
                  f"batch {progress['batch_in_epoch']} of that epoch on each of {world_size} ranks", flush=True)
    else:
        torch.manual_seed(t.seed + rank)  # dropout masks differ between ranks
    ddp_model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    train_model = torch.compile(ddp_model) if use_compile(t.compile, device) else ddp_model

    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=t.seed,
                                 drop_last=True)
    per_epoch = steps_per_epoch(len(sampler), config)
    cap = cap_steps(per_epoch, t)
    step, epoch, batch_in_epoch = progress["step"], progress["epoch"], progress["batch_in_epoch"]
    earlier_seconds = progress.get("train_seconds", 0.0)  # training time of the processes before this one
    total_steps = planned_total_steps(t, cap, step, 0, 0.0, earlier_seconds)
    tokens_per_step = config.data.batch_size * config.data.context_length * t.grad_accum_steps * world_size
    flops_per_token = model.flops_per_token(config.data.context_length)
    peak_flops = measure_peak_flops(device, precision) * world_size  # assumes identical devices
    if is_main:
        print(f"{world_size} processes on {device.type} ({precision}), {model.num_params():,} parameters; global "
              f"batch = {config.data.batch_size} x {t.grad_accum_steps} accumulation x {world_size} ranks = "
              f"{config.data.batch_size * t.grad_accum_steps * world_size} windows ({tokens_per_step:,} tokens) "
              f"per step; {run_length(t, total_steps)} ({per_epoch} steps per epoch)", flush=True)
    if step >= total_steps:
        if is_main:
            print(nothing_to_train(t.snapshot_path, step), flush=True)
        return

    val_batches = fixed_val_batches(val_set, config)[rank::world_size]  # each rank evaluates its share
    token_bytes = token_byte_lengths(tokenizer)
    writer = open_writer(config, progress["run_name"]) if is_main else None
    bar = tqdm(total=total_steps if total_steps < UNPLANNED else None, initial=step, desc=f"rank {rank}",
               position=rank, unit="step", disable=not sys.stderr.isatty(), dynamic_ncols=True)
    stop = catch_stop_signals()
    step_loss, loss_sum, loss_count = torch.zeros((), device=device), torch.zeros((), device=device), 0
    run_start, run_first_step = time.perf_counter(), step
    last_log_time, last_log_step, train_seconds = run_start, step, earlier_seconds

    def run_eval() -> None:
        sums = evaluation_sums(model, val_batches, token_bytes, device, precision)
        dist.all_reduce(sums)
        val_loss, val_bpb = evaluation_metrics(sums)
        improved = val_loss < progress["best_val_loss"]
        if improved:
            progress.update(best_val_loss=val_loss, best_val_bpb=val_bpb)
        if is_main:
            log_scalars(writer, step, {"val/loss": val_loss, "val/bpb": val_bpb})
            if t.sample_tokens:
                writer.add_text("sample", sample_text(model, tokenizer, t.sample_tokens, device), step)
            if improved:
                atomic_save({"model": model.state_dict(), "config": config_to_dict(config), "step": step,
                             "val_loss": val_loss, "val_bpb": val_bpb}, t.checkpoint_path)
            tqdm.write(f"step {step}: val loss {val_loss:.4f}, {val_bpb:.4f} bits/byte"
                       + (f" -> saved {t.checkpoint_path}" if improved else ""))

    while step < total_steps:
        sampler.set_epoch(epoch)
        micro_batches = per_epoch * t.grad_accum_steps - batch_in_epoch
        loader = epoch_loader(train_set, config.data, list(sampler), batch_in_epoch, device.type == "cuda")
        for micro_step, (x, y) in enumerate(itertools.islice(loader, micro_batches), start=1):
            last_micro_step = micro_step % t.grad_accum_steps == 0
            with contextlib.nullcontext() if last_micro_step else ddp_model.no_sync():  # all-reduce once per step
                step_loss += forward_backward(train_model, x, y, device, precision, scaler, t.grad_accum_steps)
            batch_in_epoch += 1
            if not last_micro_step:
                continue
            lr = lr_at(step, t, total_steps)
            grad_norm = optimizer_step(optimizer, scaler, lr, t.grad_clip)
            step += 1
            now = time.perf_counter()
            train_seconds = earlier_seconds + now - run_start
            # One small all-reduce per step keeps the ranks in agreement: any rank's nan/inf loss or stop
            # signal stops all of them, and rank 0's clock alone plans a time-budgeted run.
            planned = planned_total_steps(t, cap, step, step - run_first_step, now - run_start, train_seconds)
            flags = torch.tensor([0, stop["signum"], planned if is_main else 0], device=device)
            flags[0] = (~torch.isfinite(step_loss)).long()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            nonfinite, signum, total_steps = flags.tolist()
            if nonfinite:
                bar.close()
                raise nonfinite_loss_error(step, lr, precision, config)
            loss_sum += step_loss
            loss_count += t.grad_accum_steps
            step_loss.zero_()
            if total_steps < UNPLANNED and bar.total != total_steps:
                bar.total = total_steps
            bar.update(1)
            if step % t.log_every == 0 or step == total_steps:
                dist.all_reduce(loss_sum)
                train_loss = loss_sum.item() / (loss_count * world_size)
                tokens_per_sec = (step - last_log_step) * tokens_per_step / (now - last_log_time)
                log_training(writer, bar, step, train_loss, lr, grad_norm, tokens_per_sec,
                             flops_per_token * tokens_per_sec / peak_flops)  # writer is None off rank 0
                loss_sum.zero_()
                loss_count, last_log_time, last_log_step = 0, now, step
            if step % t.eval_every == 0 or step == total_steps:
                run_eval()
            if step % t.save_every == 0 or step == total_steps or signum:
                progress.update(step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, train_seconds=train_seconds)
                rng_states = [None] * world_size
                dist.all_gather_object(rng_states, rng_state())
                if is_main:
                    save_snapshot(t.snapshot_path, model, optimizer, scaler, config, progress, rng_states)
            if signum:
                dist.barrier()  # the snapshot is on disk before any rank exits
                stop_on_signal(signum, step, t.snapshot_path, bar, writer, report=is_main)
            if step >= total_steps:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    if is_main:
        log_hparams(writer, config, progress["best_val_loss"], progress["best_val_bpb"])
        writer.close()
        print(f"done: {step} steps in {train_seconds:.0f} s on {world_size} ranks, best val loss "
              f"{progress['best_val_loss']:.4f} ({progress['best_val_bpb']:.4f} bits/byte) in {t.checkpoint_path}; "
              f"snapshot {t.snapshot_path}", flush=True)


def main() -> None:
    # torchrun stops the group with SIGTERM: exit through `finally` so the process group is torn down.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    config = parse_cli("Distributed data-parallel SLM training; launch with torchrun.")
    rank, local_rank, world_size, device = init_distributed(config)
    try:
        train(config, rank, local_rank, world_size, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main, report=os.environ.get("RANK", "0") == "0")  # one error line from rank 0, not one per rank
