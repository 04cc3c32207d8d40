"""The training loop, once, for one process or each of N torchrun processes (data_parallel_train.py
starts the group and calls `train`). DDP or FSDP shows where it acts: the wrapper (or the shards),
each rank's share of an epoch, gradient sync on the last micro-step, a few collectives named as
such, rank 0 writing.

    python train.py configs.yaml [section.key=value ...]
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import os
import signal
import sys
import time
from typing import Callable, Collection, Iterator

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries
from tqdm import tqdm

from bpe import BPETokenizer, token_byte_lengths
from checkpoints import (adopt_pretrained, check_outputs, check_tokenizer, load_checkpoint,
                         load_weights)
from data import IGNORE_INDEX, TokenWindows, epoch_loader, epoch_order
from distributed import (agree_across_ranks, all_reduce, all_reduce_on_host, broadcast_rank_0s,
                         gradient_sync, is_rank_0, prepare_data_once_per_node,
                         shard_model_across_ranks, wrap_model)
from evaluation import evaluate_and_keep_best_across_ranks, fixed_val_batches
from files import claimed
from hf import read_peft_weights
from lora import attach, count, fingerprint, store_frozen_in
from model import Transformer, meta_model
from optim import (check_training_fits, configure_optimizers, forward_backward, lr_at,
                   optimizer_step, skip_update, step_seconds)
from runtime import (PRECISION_DTYPES, decide_cpu_precision, decide_newton_schulz_dtype,
                     keep_freed_memory, measure_peak_flops, pick_device, read_later,
                     setup_precision, use_compile)
from saves import START_OVER
from snapshots import (RunState, batch_plan, find_resume_point, resume_or_start,
                       save_snapshot_across_ranks)
from tasks import load_tasks
from utils import (Config, TrainingConfig, UserError, config_to_dict, format_config,
                   parse_config_cli, require, run_cli)


def main() -> None:
    config, cli_keys = parse_config_cli("Train the SLM decoder on one device (CPU, CUDA GPU or "
                                        "Apple MPS).")
    train(config, pick_device(config.training.device), cli_keys)


def train(config: Config, device: torch.device, cli_keys: Collection[str] = ()) -> None:
    """Train as `config` says, resuming from its snapshot, else starting from its init_from
    if it has one; under torchrun, as one DDP rank. `cli_keys`: the keys (section.key) the
    command line set, which a pretrained model's must not contradict. What the run takes from
    the process, its outputs' locks and the stop signals' handlers, is given back when it
    returns or raises."""
    with contextlib.ExitStack() as held:
        train_holding(config, device, cli_keys, held)


def train_holding(config: Config, device: torch.device, cli_keys: Collection[str],
                  held: contextlib.ExitStack) -> None:
    """train()'s run: whatever it takes from the process goes into `held`, which train()
    closes."""
    distributed = dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    is_main, t = rank == 0, config.training
    require(distributed or t.parallelism == "ddp", "training.parallelism=fsdp shards the model "
            "over torchrun's processes — launch torchrun --standalone --nproc_per_node=1 "
            "data_parallel_train.py configs.yaml (or more processes), or set "
            "training.parallelism=ddp")
    broadcast_rank_0s(lambda: claim_outputs(t, held))  # before anything reads them
    config, source = adopt_pretrained(config, cli_keys, is_main)
    t = config.training  # init_adapter's rank, alpha and targets
    if is_main:
        print(format_config(config), flush=True)
    tasks = load_tasks(t.eval_tasks)
    save, stored_precision, run_id = find_resume_point(t)
    keep_freed_memory()
    broadcast_rank_0s(lambda: check_training_fits(config, device, world_size))
    tokenizer, train_set, val_set = prepare_data_once_per_node(config)
    model = build_model(config, device, rank)
    if source and (not save or t.lora_rank):  # a snapshot wins, but for a LoRA run's frozen base
        load_pretrained(config, model, tokenizer, source)
    base_fingerprint = attach_adapters(config, model, save) if t.lora_rank else ""
    peak_flops = functools.cache(functools.partial(measure_peak_flops, device))  # FLOP/s by dtype
    newton_schulz = choose_newton_schulz_dtype(t, device, peak_flops)
    precision = choose_precision(config, device, model, peak_flops, newton_schulz,
                                 stored_precision)
    require(t.parallelism == "ddp" or precision != "fp16", "training.parallelism=fsdp does not "
            "train in fp16: the GradScaler would look for inf in each rank's shard alone — use "
            "training.precision=bf16 or fp32")
    if t.parallelism == "fsdp":
        model = shard_model_across_ranks(model, device, precision, t)
    elif t.lora_rank and precision in ("bf16", "fp16"):
        store_frozen_in(model, PRECISION_DTYPES[precision])
    optimizers = configure_optimizers(model, t, device, newton_schulz)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    plan = batch_plan(config, train_set, world_size)
    state = resume_or_start(t, save, run_id, base_fingerprint, model, optimizers, scaler, device,
                            plan)
    wrapped = wrap_model(model, t)  # DDP, activation checkpointing
    train_model = torch.compile(wrapped) if use_compile(t.compile, device) else wrapped
    per_epoch, total_steps, length = run_length(config, len(train_set) // world_size)
    if run_is_over(state, t, total_steps):
        if is_main:
            print(f"{t.snapshot_path} is at the end of this run (step {state.step}): nothing to "
                  "train — raise training.max_steps/epochs/time_budget_s to go on, or "
                  f"{START_OVER}", flush=True)
        return
    context = config.data.context_length
    tokens_per_step = world_size * t.grad_accum_steps * config.data.batch_size * context
    peak = peak_flops(precision) * world_size  # assumes equal devices
    if is_main:
        muon = optimizers[-1].param_groups[0].get("newton_schulz_dtype")  # a resume's, if one
        print(f"{world_size} process(es) on {device.type} ({precision}"
              f"{f', Muon orthogonalising in {muon}' if muon else ''}), "
              f"{model.num_params():,} parameters, {len(train_set):,} train / {len(val_set):,} "
              f"val windows; per step {config.data.batch_size} windows x {t.grad_accum_steps} "
              f"accumulation x {world_size} process(es) = {tokens_per_step:,} tokens; {length} "
              f"({per_epoch} steps per epoch); measured peak {peak / 1e9:.0f} GFLOP/s", flush=True)

    val_batches = fixed_val_batches(val_set, config, rank, world_size)
    token_bytes = torch.from_numpy(token_byte_lengths(tokenizer.hf)).to(device)
    writer = open_writer(config, state.run_name) if is_main else None
    bar = tqdm(total=total_steps, initial=state.step, unit="step", dynamic_ncols=True,
               desc=f"rank {rank}" if distributed else "training", position=rank,
               disable=not is_main and not sys.stderr.isatty())

    def say(lines: str) -> None:  # once, from rank 0: tqdm's write ignores `disable`
        if is_main:
            bar.write(lines)

    stop = held.enter_context(stop_signals_caught())
    batches = training_batches(train_set, config, state, rank, world_size, per_epoch, device)
    step_loss, loss_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    targets_sum, last_nonfinite = 0.0, read_later(torch.zeros((), device=device))
    run_start, earlier_seconds = time.perf_counter(), state.train_seconds
    log_time, log_step, finished = run_start, state.step, False
    while not finished:
        step_batches = [next(batches) for _ in range(t.grad_accum_steps)]
        # Every rank's trained targets of this step, counted and summed on the hosts.
        (step_targets,) = all_reduce_on_host([sum(int((y != IGNORE_INDEX).sum())
                                                  for _, y in step_batches)])
        targets_sum += step_targets
        # DDP and FSDP average the ranks' gradients: world_size / step_targets makes it a sum.
        loss_scale = world_size / max(1.0, step_targets)
        for micro_step, (x, y) in enumerate(step_batches):
            # Gradients are reduced over the ranks once per optimizer step: on its last micro-step.
            with gradient_sync(wrapped, micro_step == t.grad_accum_steps - 1):
                step_loss += forward_backward(train_model, x, y, device, precision, scaler,
                                              loss_scale)
        lr = lr_at(state.step, schedule_progress(state, t, total_steps), t)
        if step_targets > 0:
            grad_norm = optimizer_step(optimizers, scaler, lr, t.grad_clip)
        else:  # momentum and weight decay would still move the weights on zero gradients
            grad_norm = skip_update(optimizers)
            say(f"step {state.step + 1}: no trained target in any rank's batches (a "
                "conversation run's windows without an assistant token): weights not updated, "
                "the step still counts")
        state.step += 1
        clock = earlier_seconds + time.perf_counter() - run_start
        # The device is not waited for: the nan/inf check reads the previous step's loss, done
        # by now, except before anything is written, where it reads this step's.
        nonfinite, signum, state.train_seconds = agree_across_ranks(last_nonfinite(),
                                                                    stop["signum"], clock)
        last_nonfinite = read_later((~torch.isfinite(step_loss)).float())
        check_finite(nonfinite, state.step - 1, lr, precision, bar)
        finished = run_is_over(state, t, total_steps)
        writes = state.step % t.eval_every == 0 or state.step % t.save_every == 0 or signum
        if writes or finished:
            check_finite(agree_across_ranks(last_nonfinite(), signum, clock)[0], state.step, lr,
                         precision, bar)
        loss_sum += step_loss
        step_loss.zero_()
        bar.update(1)
        if state.step % t.log_every == 0 or finished:
            now, steps = time.perf_counter(), state.step - log_step
            train_loss = all_reduce(loss_sum).item() / max(1.0, targets_sum)
            tokens_per_sec = steps * tokens_per_step / (now - log_time)  # training time only
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}",
                            tok_s=f"{tokens_per_sec:,.0f}")
            mfu = model.flops_per_token(context) * tokens_per_sec / peak
            log_scalars(writer, state.step, {
                "1_train/loss": train_loss, "1_train/lr": lr,
                "1_train/grad_norm": grad_norm.item(), "4_perf/tokens_per_sec": tokens_per_sec,
                "4_perf/mfu": mfu})
            loss_sum.zero_()
            targets_sum = 0.0
            log_time, log_step = now, state.step
        paused_at = time.perf_counter()  # evaluation and snapshots count in no logged rate
        if state.step % t.eval_every == 0 or finished:
            lines, scalars, text = evaluate_and_keep_best_across_ranks(
                model, tokenizer, val_batches, token_bytes, tasks, config, precision, state,
                train_set.mask is not None)
            say(lines)
            log_scalars(writer, state.step, {
                **scalars, "4_perf/eval_seconds": time.perf_counter() - paused_at})
            if writer and text is not None:
                writer.add_text("sample", text, state.step)
        if state.step % t.save_every == 0 or finished or signum:
            save_snapshot_across_ranks(t.snapshot_path, model, optimizers, scaler, config,
                                       tokenizer, precision, dataclasses.asdict(state), plan)
        log_time += time.perf_counter() - paused_at
        if signum:
            bar.close()
            if writer:
                writer.close()
                print(f"stopped by {signal.Signals(signum).name} after step {state.step}; "
                      f"snapshot saved to {t.snapshot_path} — run the same command to resume",
                      file=sys.stderr, flush=True)
            sys.exit(128 + signum)
    bar.close()
    if writer:
        log_hparams_and_close(writer, config, state)
        print(f"done: {state.step} steps in {state.train_seconds:.0f} s, best val loss "
              f"{state.best_val_loss:.4f} ({state.best_val_bpb:.4f} bits/byte) in "
              f"{t.checkpoint_path}; snapshot {t.snapshot_path}", flush=True)


def check_finite(nonfinite: bool, step: int, lr: float, precision: str, bar: tqdm) -> None:
    if nonfinite:
        bar.close()
        raise UserError(f"training loss became nan/inf at step {step} (lr {lr:.3g}, {precision});"
                        " nothing since the last snapshot was saved — lower training.lr or raise "
                        "warmup_steps, keep grad_clip on, prefer bf16/fp32 to fp16")


def build_model(config: Config, device: torch.device, rank: int) -> Transformer:
    """The model, the same initial weights on every rank; under FSDP rank 0's alone, on its
    host, and the others' on the meta device (shard_model_across_ranks fills their shards from
    rank 0's). Then the RNG is seeded per rank, so dropout masks differ between ranks."""
    torch.manual_seed(config.training.seed)
    if config.training.parallelism == "fsdp":
        model = Transformer(config.model) if rank == 0 else meta_model(config.model)
    else:
        model = Transformer(config.model).to(device)
    torch.manual_seed(config.training.seed + rank)
    return model


def attach_adapters(config: Config, model: Transformer, save: str | None) -> str:
    """A LoRA run's adapters beside its frozen base (training.init_adapter's weights in them,
    unless a snapshot will restore them); returns the base's fingerprint, rank 0's (under FSDP
    only rank 0 holds weights). Rank 0 says what trains."""
    t = config.training
    base = broadcast_rank_0s(lambda: fingerprint(model.state_dict(), config.model.tie_embeddings))
    attach(model, t)
    if t.init_adapter and not save and model.embed_tokens.weight.device.type != "meta":
        load_weights(model, {"model": read_peft_weights(t.init_adapter),
                             "config": config_to_dict(config)}, t.init_adapter)
    trained, frozen = count(model)
    if is_rank_0():
        print(f"LoRA: rank {t.lora_rank}, alpha {t.lora_alpha or 2 * t.lora_rank:g} on "
              f"{', '.join(t.lora_targets)}: {trained:,} trained parameters (AdamW), "
              f"{100 * trained / (trained + frozen):.2f}% of {trained + frozen:,}; the base "
              f"{t.init_from} (fingerprint {base}) frozen"
              + (f"; adapter from {t.init_adapter}" if t.init_adapter else ""), flush=True)
    return base


def choose_newton_schulz_dtype(t: TrainingConfig, device: torch.device,
                               peak_flops: Callable[[str], float]) -> str:
    """Muon's orthogonalisation dtype, rank 0's on every rank (runtime.decide_newton_schulz_dtype).
    A resume then takes its snapshot's."""
    if t.optimizer != "muon" or t.lora_rank:
        return "fp32"  # AdamW (a LoRA run's adapters' too) has no orthogonalisation
    return broadcast_rank_0s(lambda: decide_newton_schulz_dtype(device, peak_flops))


def choose_precision(config: Config, device: torch.device, model: Transformer,
                     peak_flops: Callable[[str], float], newton_schulz: str,
                     stored: str | None) -> str:
    """The run's precision, rank 0's on every rank. A resume keeps its snapshot's, `stored` (an
    explicit other one is refused: the run would not continue exactly). A fresh CPU run with
    `auto` takes runtime.decide_cpu_precision's. Otherwise runtime.setup_precision's rule."""
    t = config.training

    def decide() -> str:
        require(stored is None or t.precision in ("auto", stored), f"training.precision="
                f"{t.precision} but {t.snapshot_path} was trained in {stored} — set "
                f"training.precision={stored} (or auto) to resume exactly, or {START_OVER}")
        if stored or t.precision != "auto" or device.type != "cpu":
            return stored or t.precision
        choice, line = decide_cpu_precision(config, newton_schulz, peak_flops, lambda: step_seconds(
            model, config, device, newton_schulz))
        print(line, flush=True)
        return choice

    return setup_precision(broadcast_rank_0s(decide), device)


def load_pretrained(config: Config, model: Transformer, tokenizer: BPETokenizer,
                    source: dict) -> None:
    """init_from's weights into the fresh model (where it holds weights: not on the meta
    device)."""
    t = config.training
    check_tokenizer(source, tokenizer, t.init_from, "restore the tokenizer it was trained with")
    if model.embed_tokens.weight.device.type != "meta":
        load_weights(model, load_checkpoint(t.init_from), t.init_from)


def claim_outputs(t: TrainingConfig, held: contextlib.ExitStack) -> None:
    """The outputs can be written, and this run holds them (rank 0) until `held` closes: no
    other run may read or write them meanwhile."""
    check_outputs(t)
    held.enter_context(claimed(t.snapshot_path, "training.snapshot_path"))
    held.enter_context(claimed(t.checkpoint_path, "training.checkpoint_path"))


def run_length(config: Config, windows_per_rank: int) -> tuple[int, int | None, str]:
    """(optimizer steps per epoch, steps in the run, the run's length in words); a time budget
    leaves the steps None."""
    per_epoch, t = steps_per_epoch(windows_per_rank, config), config.training
    if t.time_budget_s > 0:
        return per_epoch, None, f"{t.time_budget_s:g} s budget"
    total_steps = min(per_epoch * t.epochs, t.max_steps or math.inf)
    return per_epoch, total_steps, f"{total_steps} steps"


def steps_per_epoch(windows_per_rank: int, config: Config) -> int:
    """Optimizer steps in one pass over the windows each rank sees."""
    micro_batches = max(1, windows_per_rank // config.data.batch_size)
    accumulation = config.training.grad_accum_steps
    require(micro_batches >= accumulation, f"one epoch has {micro_batches} batches, fewer than "
            f"training.grad_accum_steps={accumulation} — lower it or data.batch_size")
    return micro_batches // accumulation


def run_is_over(state: RunState, t: TrainingConfig, total_steps: int | None) -> bool:
    """All planned steps done, or less budget left than a mean step: it ends inside the budget."""
    if total_steps is None:
        return t.time_budget_s - state.train_seconds < state.train_seconds / max(1, state.step)
    return state.step >= total_steps


def schedule_progress(state: RunState, t: TrainingConfig, total_steps: int | None) -> float:
    """How far the cosine has come: the share of the time budget used, or of post-warmup steps."""
    if total_steps is None:
        return state.train_seconds / t.time_budget_s
    return (state.step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)


def training_batches(train_set: TokenWindows, config: Config, state: RunState, rank: int,
                     world_size: int, per_epoch: int,
                     device: torch.device) -> Iterator[list[torch.Tensor]]:
    """This rank's micro-batches from `state`'s position on, epoch after epoch; the state moves as
    they are taken, so a snapshot always says where to resume."""
    micro_batches = per_epoch * config.training.grad_accum_steps
    while True:
        order = epoch_order(len(train_set), config.training.seed, state.epoch, rank, world_size)
        loader = epoch_loader(train_set, config.data, order, state.batch_in_epoch,
                              pin_memory=device.type == "cuda")
        for batch in itertools.islice(loader, micro_batches - state.batch_in_epoch):
            state.batch_in_epoch += 1
            yield batch
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


@contextlib.contextmanager
def stop_signals_caught() -> Iterator[dict[str, int]]:
    """While inside, SIGINT/SIGTERM set the request's "signum": the loop finishes the step, saves
    a snapshot and exits 130/143. A repeat over 2 s later quits at once (the last snapshot stays
    intact); torchrun's near-double of a Ctrl-C is ignored. The handlers before are restored."""
    request = {"signum": 0, "at": 0.0}

    def handler(signum: int, frame: object) -> None:
        if request["signum"] and time.monotonic() - request["at"] > 2.0:
            sys.exit(128 + signum)
        if not request["signum"]:
            print(f"\n{signal.Signals(signum).name}: finishing this step and saving a snapshot "
                  "(repeat to quit without saving)", file=sys.stderr, flush=True)
            request.update(signum=signum, at=time.monotonic())

    previous = {signum: signal.signal(signum, handler)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for signum, restored in previous.items():  # None: set outside Python, unknown here
            signal.signal(signum, signal.SIG_DFL if restored is None else restored)


def open_writer(config: Config, run_name: str) -> SummaryWriter:
    writer = SummaryWriter(os.path.join(config.training.logdir, run_name))
    writer.add_text("config", "```\n" + format_config(config) + "\n```")
    return writer


def log_scalars(writer: SummaryWriter | None, step: int, values: dict[str, float]) -> None:
    """To TensorBoard, where this process writes it (rank 0). A tag's group is its first part,
    numbered because TensorBoard's Time Series page sorts groups by name and opens the first
    two: 1_train and 2_val open, then 3_eval and 4_perf."""
    for name, value in values.items() if writer else ():
        writer.add_scalar(name, value, step)


def log_hparams_and_close(writer: SummaryWriter, config: Config, state: RunState) -> None:
    """The config beside the run's best results (the last 2_val/best_* values), for
    TensorBoard's HPARAMS tab. Written by hand: add_hparams would also log the metrics as
    scalars, a group of one-point cards on the Time Series page."""
    hparams = {f"{section}.{key}": ",".join(value) if isinstance(value, list) else value
               for section, values in config_to_dict(config).items()
               for key, value in values.items()}
    for summary in hparams_summaries(hparams, dict.fromkeys(["2_val/best_loss",
                                                             "2_val/best_bpb"])):
        writer.file_writer.add_summary(summary)
    writer.close()


if __name__ == "__main__":
    run_cli(main)
