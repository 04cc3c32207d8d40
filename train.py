"""Single-device training (CPU, one CUDA GPU, or Apple MPS).

    python train.py configs.yaml [section.key=value ...]

The helpers above `main` (setup, optimizer, evaluation, snapshots, logging) are shared with
data_parallel_train.py, which imports them rather than keeping a copy.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from data import (EOT, TokenWindows, decode, epoch_loader, epoch_order, load_tokenizer, prepare_tokens, split_tokens,
                  token_byte_lengths)
from model import Transformer, load_weights
from utils import (Config, TrainingConfig, UserError, atomic_save, autocast_context, check_writable, config_to_dict,
                   enable_tf32, format_config, load_checkpoint, load_config, lr_at, measure_peak_flops, pick_device,
                   pick_precision, run_cli, use_compile)


def parse_cli(description: str) -> Config:
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Overrides are typed like YAML, e.g. training.max_steps=30 model.num_layers=2 data.raw_text_path=my.txt")
    parser.add_argument("config", help="YAML config, e.g. configs.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override one config value")
    args = parser.parse_args()
    return load_config(args.config, args.overrides)


def prepare_data(config: Config) -> tuple[Tokenizer, TokenWindows, TokenWindows]:
    tokenizer = load_tokenizer(config.data.tokenizer_path, config.model.vocab_size,
                               "set model.vocab_size to the tokenizer's size or use the matching tokenizer")
    train_set, val_set = split_tokens(prepare_tokens(config.data, tokenizer), config.data)
    return tokenizer, train_set, val_set


def steps_per_epoch(num_windows: int, config: Config) -> int:
    """Optimizer steps in one pass over `num_windows` windows (the ones this process sees)."""
    micro_batches = max(1, num_windows // config.data.batch_size)
    if micro_batches < config.training.grad_accum_steps:
        raise UserError(f"one epoch has {micro_batches} batches, fewer than training.grad_accum_steps="
                        f"{config.training.grad_accum_steps} — lower grad_accum_steps or data.batch_size")
    return micro_batches // config.training.grad_accum_steps


BUDGET_PROBE_STEPS = 10  # steps timed before time_budget_s fixes the schedule's length
UNPLANNED = 10 ** 9      # the step count while a time budget is still being measured


def cap_steps(per_epoch: int, t: TrainingConfig) -> int:
    """The configured length of the run in optimizer steps; a time budget replaces max_steps and epochs."""
    if t.time_budget_s > 0:
        return UNPLANNED
    return per_epoch * t.epochs if t.max_steps == 0 else min(per_epoch * t.epochs, t.max_steps)


def planned_total_steps(t: TrainingConfig, cap: int, step: int, run_steps: int, run_seconds: float,
                        train_seconds: float) -> int:
    """Total steps of the run. With time_budget_s: what fits in the budget at the step rate this process has
    measured (evals and saves included), re-planned every step so the cosine ends where the budget does.
    A resumed run plans from the earlier processes' rate until it has timed its own steps."""
    if t.time_budget_s <= 0:
        return cap
    if train_seconds >= t.time_budget_s:
        return step
    if run_steps >= BUDGET_PROBE_STEPS:
        steps_per_second = run_steps / run_seconds
    elif step > run_steps:
        steps_per_second = step / train_seconds
    else:
        return cap
    return step + int((t.time_budget_s - train_seconds) * steps_per_second)


def catch_stop_signals() -> dict[str, int]:
    """SIGINT/SIGTERM ask the loop to finish its step, save a snapshot and exit (130/143).

    A repeat of the signal more than 2 s later quits at once: atomic saves keep the previous snapshot intact.
    (torchrun forwards Ctrl-C to workers that already got it from the terminal: that near-double is ignored.)
    """
    request = {"signum": 0, "at": 0.0}

    def handler(signum: int, frame: object) -> None:
        if request["signum"] and time.monotonic() - request["at"] > 2.0:
            sys.exit(128 + signum)
        if not request["signum"]:
            print(f"\n{signal.Signals(signum).name}: finishing this step and saving a snapshot "
                  "(repeat to quit without saving)", file=sys.stderr, flush=True)
            request.update(signum=signum, at=time.monotonic())

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
    return request


def nonfinite_loss_error(step: int, lr: float, precision: str, config: Config) -> UserError:
    t = config.training
    return UserError(f"training loss became nan/inf at step {step} (lr {lr:.3g}, {precision}); nothing from this "
                     f"step was saved, {t.checkpoint_path} and {t.snapshot_path} are as they were — lower "
                     "training.lr or raise warmup_steps, keep grad_clip on, and prefer precision=bf16/fp32 over fp16")


def run_length(t: TrainingConfig, total_steps: int) -> str:
    return f"{t.time_budget_s:g} s budget" if t.time_budget_s > 0 else f"{total_steps} steps"


def nothing_to_train(snapshot_path: str, step: int) -> str:
    return (f"{snapshot_path} is already at step {step}, the end of this run: nothing to train — raise "
            "training.max_steps/epochs/time_budget_s to continue, or delete the snapshot to start over")


def stop_on_signal(signum: int, step: int, snapshot_path: str, bar: tqdm, writer: SummaryWriter | None,
                   report: bool = True) -> None:
    bar.close()
    if writer is not None:
        writer.close()
    if report:
        print(f"stopped by {signal.Signals(signum).name} after step {step}; snapshot saved to {snapshot_path} — "
              "run the same command to resume", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def build_optimizer(model: torch.nn.Module, config: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay only on 2-D weight matrices (not norms), fused kernels on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.training.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.training.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def fixed_val_batches(val_set: TokenWindows, config: Config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same eval_batches batches at every eval, spread evenly over the validation split."""
    count = min(len(val_set), config.training.eval_batches * config.data.batch_size)
    picks = torch.linspace(0, len(val_set) - 1, count).round().long().unique().tolist()
    windows = [val_set[i] for i in picks]
    return [(torch.stack([x for x, _ in windows[i:i + config.data.batch_size]]),
             torch.stack([y for _, y in windows[i:i + config.data.batch_size]]))
            for i in range(0, len(windows), config.data.batch_size)]


@torch.no_grad()
def evaluation_sums(model: torch.nn.Module, batches: list, token_bytes: torch.Tensor, device: torch.device,
                    precision: str) -> torch.Tensor:
    """[nats, nats on byte-carrying tokens, bytes, tokens] summed over `batches` (sums add up across ranks)."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)
    token_bytes = token_bytes.to(device)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_context(device, precision):
            logits, _ = model(x)
        losses = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="none")
        target_bytes = token_bytes[y.view(-1)]
        sums += torch.stack((losses.sum(), (losses * (target_bytes > 0)).sum(), target_bytes.sum(),
                             torch.tensor(y.numel(), device=device))).double()
    model.train()
    return sums


def evaluation_metrics(sums: torch.Tensor) -> tuple[float, float]:
    """(mean loss in nats/token, bits per UTF-8 byte); special tokens (0 bytes) are left out of the bpb sum."""
    nats, nats_on_bytes, num_bytes, tokens = sums.tolist()
    return nats / tokens, nats_on_bytes / (math.log(2) * max(1.0, num_bytes))


def forward_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                     precision: str, scaler: torch.amp.GradScaler, grad_accum_steps: int) -> torch.Tensor:
    """One micro-batch: the loss of the mean is accumulated, so gradients sum to the step's mean gradient."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    with autocast_context(device, precision):
        _, loss = model(x, y)
    scaler.scale(loss / grad_accum_steps).backward()
    return loss.detach()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, lr: float,
                   grad_clip: float) -> torch.Tensor:
    """Set lr, unscale, clip (0 = off), step, clear grads; returns the pre-clip global grad norm."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def sample_text(model: Transformer, tokenizer: Tokenizer, num_tokens: int, device: torch.device) -> str:
    """A short sample from <|endoftext|> with its own generator, so the training RNG stream is untouched."""
    generator = torch.Generator(device=device).manual_seed(0)
    prompt = torch.tensor([[tokenizer.token_to_id(EOT)]], device=device)
    was_training = model.training
    model.eval()
    ids = [int(t) for t in model.generate(prompt, num_tokens, temperature=0.8, top_k=50, generator=generator)]
    model.train(was_training)
    return decode(tokenizer, ids)


def open_writer(config: Config, run_name: str) -> SummaryWriter:
    writer = SummaryWriter(os.path.join(config.training.logdir, run_name))
    writer.add_text("config", "```\n" + format_config(config) + "\n```")
    return writer


def log_hparams(writer: SummaryWriter, config: Config, best_val_loss: float, best_val_bpb: float) -> None:
    hparams = {f"{section}.{key}": value for section, values in config_to_dict(config).items()
               for key, value in values.items()}
    writer.add_hparams(hparams, {"hparam/best_val_loss": best_val_loss, "hparam/best_val_bpb": best_val_bpb},
                       run_name=".")


def check_outputs_writable(config: Config) -> None:
    t = config.training
    for directory in (os.path.dirname(os.path.abspath(t.checkpoint_path)),
                      os.path.dirname(os.path.abspath(t.snapshot_path)), t.logdir):
        check_writable(directory)


PROGRESS_KEYS = ("step", "epoch", "batch_in_epoch", "train_seconds", "best_val_loss", "best_val_bpb", "run_name",
                 "world_size")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu(), torch.cuda.current_device())


def save_snapshot(path: str, model: Transformer, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  config: Config, progress: dict, rng: dict | list[dict]) -> None:
    """Everything needed to continue exactly: weights, optimizer, scaler, position in the data, RNG state(s)."""
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "config": config_to_dict(config), "rng": rng, **progress}, path)


def load_snapshot(path: str, model: Transformer, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  device: torch.device) -> tuple[dict, dict | list[dict]]:
    """Restore weights, optimizer and scaler; returns (progress fields, stored RNG state(s)) for the caller."""
    snapshot = load_checkpoint(path, map_location=device)
    load_weights(model, snapshot, path)
    optimizer.load_state_dict(snapshot["optimizer"])
    scaler.load_state_dict(snapshot["scaler"])
    return {key: snapshot[key] for key in PROGRESS_KEYS if key in snapshot}, snapshot["rng"]


def log_scalars(writer: SummaryWriter, step: int, values: dict[str, float]) -> None:
    for name, value in values.items():
        writer.add_scalar(name, value, step)


def log_training(writer: SummaryWriter | None, bar: tqdm, step: int, train_loss: float, lr: float,
                 grad_norm: torch.Tensor, tokens_per_sec: float, mfu: float) -> None:
    """The per-log-interval scalars (to TensorBoard where this process writes it) and the progress bar."""
    if writer is not None:
        log_scalars(writer, step, {"train/loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                                   "tokens_per_sec": tokens_per_sec, "mfu": mfu})
    bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}")


def main() -> None:
    config = parse_cli("Train the SLM decoder on one device (CPU, CUDA GPU or Apple MPS).")
    t = config.training
    print(format_config(config), flush=True)
    check_outputs_writable(config)
    device = pick_device(t.device)
    precision = pick_precision(t.precision, device)
    torch.manual_seed(t.seed)
    enable_tf32(device)

    tokenizer, train_set, val_set = prepare_data(config)
    model = Transformer(config.model).to(device)
    optimizer = build_optimizer(model, config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "train_seconds": 0.0, "best_val_loss": math.inf,
                "best_val_bpb": math.inf, "run_name": t.run_name or time.strftime("%Y%m%d-%H%M%S")}
    if os.path.exists(t.snapshot_path):
        progress, rng = load_snapshot(t.snapshot_path, model, optimizer, scaler, device)
        restore_rng_state(rng)
        print(f"resuming from {t.snapshot_path}: step {progress['step']}, epoch {progress['epoch']}, "
              f"batch {progress['batch_in_epoch']} of that epoch", flush=True)
    train_model = torch.compile(model) if use_compile(t.compile, device) else model

    per_epoch = steps_per_epoch(len(train_set), config)
    cap = cap_steps(per_epoch, t)
    step, epoch, batch_in_epoch = progress["step"], progress["epoch"], progress["batch_in_epoch"]
    earlier_seconds = progress.get("train_seconds", 0.0)  # training time of the processes before this one
    total_steps = planned_total_steps(t, cap, step, 0, 0.0, earlier_seconds)
    tokens_per_step = config.data.batch_size * config.data.context_length * t.grad_accum_steps
    flops_per_token = model.flops_per_token(config.data.context_length)
    peak_flops = measure_peak_flops(device, precision)
    print(f"device {device} ({precision}), {model.num_params():,} parameters, {len(train_set):,} train / "
          f"{len(val_set):,} val windows, {tokens_per_step:,} tokens per step, {run_length(t, total_steps)} "
          f"({per_epoch} steps per epoch), measured peak {peak_flops / 1e9:.0f} GFLOP/s", flush=True)
    if step >= total_steps:
        print(nothing_to_train(t.snapshot_path, step), flush=True)
        return

    val_batches = fixed_val_batches(val_set, config)
    token_bytes = token_byte_lengths(tokenizer)
    writer = open_writer(config, progress["run_name"])
    bar = tqdm(total=total_steps if total_steps < UNPLANNED else None, initial=step, desc="training", unit="step",
               dynamic_ncols=True)
    stop = catch_stop_signals()
    step_loss, loss_sum, loss_count = torch.zeros((), device=device), torch.zeros((), device=device), 0
    run_start, run_first_step = time.perf_counter(), step
    last_log_time, last_log_step, train_seconds = run_start, step, earlier_seconds

    def run_eval() -> None:
        val_loss, val_bpb = evaluation_metrics(evaluation_sums(train_model, val_batches, token_bytes, device,
                                                               precision))
        log_scalars(writer, step, {"val/loss": val_loss, "val/bpb": val_bpb})
        if t.sample_tokens:
            writer.add_text("sample", sample_text(model, tokenizer, t.sample_tokens, device), step)
        improved = val_loss < progress["best_val_loss"]
        if improved:
            progress.update(best_val_loss=val_loss, best_val_bpb=val_bpb)
            atomic_save({"model": model.state_dict(), "config": config_to_dict(config), "step": step,
                         "val_loss": val_loss, "val_bpb": val_bpb}, t.checkpoint_path)
        bar.write(f"step {step}: val loss {val_loss:.4f}, {val_bpb:.4f} bits/byte"
                  + (f" -> saved {t.checkpoint_path}" if improved else ""))

    while step < total_steps:
        micro_batches = per_epoch * t.grad_accum_steps - batch_in_epoch
        order = epoch_order(len(train_set), t.seed, epoch)
        loader = epoch_loader(train_set, config.data, order, batch_in_epoch, device.type == "cuda")
        for micro_step, (x, y) in enumerate(itertools.islice(loader, micro_batches), start=1):
            step_loss += forward_backward(train_model, x, y, device, precision, scaler, t.grad_accum_steps)
            batch_in_epoch += 1
            if micro_step % t.grad_accum_steps:
                continue
            lr = lr_at(step, t, total_steps)
            grad_norm = optimizer_step(optimizer, scaler, lr, t.grad_clip)
            if not torch.isfinite(step_loss):  # the one host sync per step; nothing has been saved from it
                bar.close()
                raise nonfinite_loss_error(step + 1, lr, precision, config)
            loss_sum += step_loss
            loss_count += t.grad_accum_steps
            step_loss.zero_()
            step += 1
            now = time.perf_counter()
            train_seconds = earlier_seconds + now - run_start
            total_steps = planned_total_steps(t, cap, step, step - run_first_step, now - run_start, train_seconds)
            if total_steps < UNPLANNED and bar.total != total_steps:
                bar.total = total_steps
            bar.update(1)
            if step % t.log_every == 0 or step == total_steps:
                train_loss = loss_sum.item() / loss_count
                tokens_per_sec = (step - last_log_step) * tokens_per_step / (now - last_log_time)
                log_training(writer, bar, step, train_loss, lr, grad_norm, tokens_per_sec,
                             flops_per_token * tokens_per_sec / peak_flops)
                loss_sum.zero_()
                loss_count, last_log_time, last_log_step = 0, now, step
            if step % t.eval_every == 0 or step == total_steps:
                run_eval()
            if step % t.save_every == 0 or step == total_steps or stop["signum"]:
                progress.update(step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, train_seconds=train_seconds)
                save_snapshot(t.snapshot_path, model, optimizer, scaler, config, progress, rng_state())
            if stop["signum"]:
                stop_on_signal(stop["signum"], step, t.snapshot_path, bar, writer)
            if step >= total_steps:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    log_hparams(writer, config, progress["best_val_loss"], progress["best_val_bpb"])
    writer.close()
    print(f"done: {step} steps in {train_seconds:.0f} s, best val loss {progress['best_val_loss']:.4f} "
          f"({progress['best_val_bpb']:.4f} bits/byte) in {t.checkpoint_path}; snapshot {t.snapshot_path}", flush=True)


if __name__ == "__main__":
    run_cli(main)
