"""The training loop, once, for one process or each of N torchrun processes (data_parallel_train.py
starts the group and calls `train`). DDP shows where it acts: the wrapper, each rank's share of an
epoch, gradient sync on the last micro-step, a few all-reduces, rank 0 writing.

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
from dataclasses import dataclass
from typing import Callable, Collection, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries
from tqdm import tqdm

from checkpoints import (adopt_pretrained, batch_plan, check_outputs, check_tokenizer,
                         load_checkpoint, load_snapshot, load_weights, model_record,
                         save_checkpoint, save_snapshot)
from chat import chat_format, encode, render
from data import (IGNORE_INDEX, TokenWindows, decode, epoch_loader, epoch_order,
                  token_byte_lengths)
from distributed import agree, all_reduce, is_rank_0, prepare_data_once_per_node, rank_0s
from files import claim
from generate import generate
from model import Transformer
from optim import (configure_optimizers, forward_backward, lr_at, optimizer_step, skip_update,
                   step_seconds)
from runtime import (autocast_context, decide_cpu_precision, decide_newton_schulz_dtype,
                     keep_freed_memory, measure_peak_flops, pick_device, setup_precision,
                     use_compile)
from scoring import Encoder, Task, score_task
from tasks import load_tasks
from utils import (Config, TrainingConfig, UserError, config_to_dict, format_config,
                   parse_config_cli, require, run_cli)


SAMPLE_TURN = "Hello! Who are you?"  # the user turn a conversation run's sample answers


@dataclass
class RunState:
    """Where a run stands: saved in every snapshot and restored from it as a whole."""
    run_name: str                    # TensorBoard sub-directory
    step: int = 0                    # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0          # micro-batches of this epoch each rank has consumed
    train_seconds: float = 0.0       # wall clock of the loop, over every process that resumed it
    best_val_loss: float = math.inf  # nats per token
    best_val_bpb: float = math.inf   # bits per UTF-8 byte


def main() -> None:
    config, cli_keys = parse_config_cli("Train the SLM decoder on one device (CPU, CUDA GPU or "
                                        "Apple MPS).")
    train(config, pick_device(config.training.device), cli_keys)


def train(config: Config, device: torch.device, cli_keys: Collection[str] = ()) -> None:
    """Train as `config` says, resuming from its snapshot, else starting from its init_from
    if it has one; under torchrun, as one DDP rank. `cli_keys`: the keys (section.key) the
    command line set, which a pretrained model's must not contradict."""
    distributed = dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    is_main = rank == 0
    config, source = adopt_pretrained(config, cli_keys, is_main)
    t = config.training
    if is_main:
        print(format_config(config), flush=True)
        check_outputs(t)
    tasks = load_tasks(t.eval_tasks)
    keep_freed_memory()
    tokenizer, train_set, val_set = prepare_data_once_per_node(config)
    model = build_model(config, device, rank)
    peak_flops = functools.cache(functools.partial(measure_peak_flops, device))  # FLOP/s by dtype
    newton_schulz = choose_newton_schulz_dtype(t, device, peak_flops)
    optimizers = configure_optimizers(model, t, device, newton_schulz)
    precision = choose_precision(config, device, model, peak_flops, newton_schulz)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    plan = batch_plan(config, train_set, world_size)
    state = start_or_resume(config, model, optimizers, scaler, device, plan, tokenizer, source)
    ddp_model = DistributedDataParallel(model) if distributed else model  # on this rank's device
    train_model = torch.compile(ddp_model) if use_compile(t.compile, device) else ddp_model
    per_epoch, total_steps, length = run_length(config, len(train_set) // world_size)
    if run_is_over(state, t, total_steps):
        if is_main:
            print(f"{t.snapshot_path} is at the end of this run (step {state.step}): nothing to "
                  "train — raise training.max_steps/epochs/time_budget_s to go on, or delete the "
                  "snapshot to start over", flush=True)
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

    val_batches = fixed_val_batches(val_set, config)[rank::world_size]  # each rank its share
    token_bytes = token_byte_lengths(tokenizer).to(device)
    writer = open_writer(config, state.run_name) if is_main else None
    bar = tqdm(total=total_steps, initial=state.step, unit="step", dynamic_ncols=True,
               desc=f"rank {rank}" if distributed else "training", position=rank,
               disable=not is_main and not sys.stderr.isatty())
    stop = catch_stop_signals()
    batches = training_batches(train_set, config, state, rank, world_size, per_epoch, device)
    step_loss, loss_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    targets_sum = torch.zeros((), device=device)
    run_start, earlier_seconds = time.perf_counter(), state.train_seconds
    log_time, log_step, finished = run_start, state.step, False
    while not finished:
        step_batches = [next(batches) for _ in range(t.grad_accum_steps)]
        # Every rank's trained targets of this step, counted on the host; torch.full fills the
        # device tensor by a kernel, where a copy from host memory would wait for the device.
        step_targets = all_reduce(torch.full((), float(sum(
            int((y != IGNORE_INDEX).sum()) for _, y in step_batches)), device=device))
        targets_sum += step_targets
        # A host read that waits on nothing but that all-reduce: agree() synced the last step.
        update_weights = step_targets.item() > 0
        # DDP averages the ranks' gradients: world_size / step_targets makes theirs a sum.
        loss_scale = world_size / step_targets.clamp(min=1)
        for micro_step, (x, y) in enumerate(step_batches):
            # DDP all-reduces gradients once per optimizer step: on its last micro-step.
            sync = micro_step == t.grad_accum_steps - 1 or not distributed
            with contextlib.nullcontext() if sync else ddp_model.no_sync():
                step_loss += forward_backward(train_model, x, y, device, precision, scaler,
                                              loss_scale)
        lr = lr_at(state.step, schedule_progress(state, t, total_steps), t)
        if update_weights:
            grad_norm = optimizer_step(optimizers, scaler, lr, t.grad_clip)
        else:  # momentum and weight decay would still move the weights on zero gradients
            grad_norm = skip_update(optimizers)
            bar.write(f"step {state.step + 1}: no trained target in any rank's batches (a "
                      "conversation run's windows without an assistant token): weights not "
                      "updated, the step still counts")
        state.step += 1
        clock = earlier_seconds + time.perf_counter() - run_start
        nonfinite, signum, state.train_seconds = agree(step_loss, stop["signum"], clock)
        if nonfinite:
            bar.close()
            raise UserError(f"training loss became nan/inf at step {state.step} (lr {lr:.3g}, "
                            f"{precision}); nothing from this step was saved — lower training.lr "
                            "or raise warmup_steps, keep grad_clip on, prefer bf16/fp32 to fp16")
        loss_sum += step_loss
        step_loss.zero_()
        finished = run_is_over(state, t, total_steps)
        bar.update(1)
        if state.step % t.log_every == 0 or finished:
            now, steps = time.perf_counter(), state.step - log_step
            train_loss = all_reduce(loss_sum).item() / max(1.0, targets_sum.item())
            tokens_per_sec = steps * tokens_per_step / (now - log_time)  # training time only
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}",
                            tok_s=f"{tokens_per_sec:,.0f}")
            mfu = model.flops_per_token(context) * tokens_per_sec / peak
            log_scalars(writer, state.step, {
                "1_train/loss": train_loss, "1_train/lr": lr,
                "1_train/grad_norm": grad_norm.item(), "4_perf/tokens_per_sec": tokens_per_sec,
                "4_perf/mfu": mfu})
            loss_sum.zero_()
            targets_sum.zero_()
            log_time, log_step = now, state.step
        paused_at = time.perf_counter()  # evaluation and snapshots count in no logged rate
        if state.step % t.eval_every == 0 or finished:
            bar.write(evaluate_and_keep_best(model, tokenizer, val_batches, token_bytes, tasks,
                                             config, precision, state, writer,
                                             train_set.mask is not None))
            log_scalars(writer, state.step, {"4_perf/eval_seconds":
                                             time.perf_counter() - paused_at})
        if state.step % t.save_every == 0 or finished or signum:
            save_snapshot(t.snapshot_path, model, optimizers, scaler, config, tokenizer,
                          precision, dataclasses.asdict(state), plan)
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


def build_model(config: Config, device: torch.device, rank: int) -> Transformer:
    """The model, the same initial weights on every rank; then the RNG is seeded per rank, so
    dropout masks differ between ranks."""
    torch.manual_seed(config.training.seed)
    model = Transformer(config.model).to(device)
    torch.manual_seed(config.training.seed + rank)
    return model


def choose_newton_schulz_dtype(t: TrainingConfig, device: torch.device,
                               peak_flops: Callable[[str], float]) -> str:
    """Muon's orthogonalisation dtype, rank 0's on every rank (runtime.decide_newton_schulz_dtype).
    A resume then takes its snapshot's."""
    if t.optimizer != "muon":
        return "fp32"  # AdamW has no orthogonalisation
    return rank_0s(decide_newton_schulz_dtype(device, peak_flops) if is_rank_0() else "")


def choose_precision(config: Config, device: torch.device, model: Transformer,
                     peak_flops: Callable[[str], float], newton_schulz: str) -> str:
    """The run's precision. A resume keeps its snapshot's (an explicit other one is refused:
    the run would not continue exactly). A fresh CPU run with `auto` takes rank 0's
    runtime.decide_cpu_precision on every rank. Otherwise runtime.setup_precision's rule."""
    t = config.training
    stored = (load_checkpoint(t.snapshot_path, weights=False).get("precision")
              if os.path.exists(t.snapshot_path) else None)
    require(stored is None or t.precision in ("auto", stored), f"training.precision="
            f"{t.precision} but {t.snapshot_path} was trained in {stored} — set "
            f"training.precision={stored} (or auto) to resume exactly, or point "
            "training.snapshot_path at a new path")
    if stored or t.precision != "auto" or device.type != "cpu":
        return setup_precision(stored or t.precision, device)
    choice = ""
    if is_rank_0():
        choice, line = decide_cpu_precision(config, newton_schulz, peak_flops, lambda: step_seconds(
            model, config, device, newton_schulz))
        print(line, flush=True)
    return rank_0s(choice)


def start_or_resume(config: Config, model: Transformer, optimizers: list[torch.optim.Optimizer],
                    scaler: torch.amp.GradScaler, device: torch.device, plan: dict,
                    tokenizer: Tokenizer, source: dict | None) -> RunState:
    """Resume from the snapshot if there is one (it wins over init_from, whose weights are then
    never read), else start from the pretrained `source` or the fresh weights. Then hold the
    run's two output files (rank 0): until this process ends, no other run may write them."""
    t, is_main = config.training, is_rank_0()
    state = RunState(run_name=t.run_name or time.strftime("%Y%m%d-%H%M%S"))
    if os.path.exists(t.snapshot_path):
        state = RunState(**load_snapshot(t.snapshot_path, model, optimizers, scaler, device,
                                         plan))
        if is_main:
            print(f"resuming from {t.snapshot_path}: step {state.step}, epoch {state.epoch}, "
                  f"batch {state.batch_in_epoch} of that epoch", flush=True)
    elif source:
        check_tokenizer(source, tokenizer, config.data.tokenizer_path, t.init_from,
                        "restore the tokenizer it was trained with")
        load_weights(model, load_checkpoint(t.init_from), t.init_from)
    if is_main:
        claim(t.snapshot_path, "training.snapshot_path")
        claim(t.checkpoint_path, "training.checkpoint_path")
    return state


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


def catch_stop_signals() -> dict[str, int]:
    """SIGINT/SIGTERM: finish the step, save a snapshot, exit 130/143. A repeat over 2 s later quits
    at once (the last snapshot stays intact); torchrun's near-double of a Ctrl-C is ignored."""
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


def fixed_val_batches(val_set: TokenWindows, config: Config) -> list[tuple[torch.Tensor, ...]]:
    """The same eval_batches batches at every eval, spread evenly over the validation split."""
    size = config.data.batch_size
    count = min(len(val_set), config.training.eval_batches * size)
    picks = torch.linspace(0, len(val_set) - 1, count).round().long().unique().tolist()
    windows = [val_set[i] for i in picks]
    return [tuple(torch.stack(column) for column in zip(*windows[i:i + size]))
            for i in range(0, len(windows), size)]


@torch.no_grad()
def evaluate(model: Transformer, batches: list[tuple[torch.Tensor, ...]],
             token_bytes: torch.Tensor, precision: str) -> tuple[float, float]:
    """(mean loss in nats/token, bits per UTF-8 byte) over every rank's batches' trained targets
    (a conversation's: the assistant's); special tokens (0 bytes) are left out of the
    bits-per-byte sum."""
    device = token_bytes.device
    sums = torch.zeros(4, device=device,  # MPS has no float64
                       dtype=torch.float32 if device.type == "mps" else torch.float64)
    model.eval()
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).view(-1)
        with autocast_context(device, precision):
            logits, _ = model(x)
        losses = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y, reduction="none",
                                 ignore_index=IGNORE_INDEX)  # 0 where not trained
        trained = y != IGNORE_INDEX
        target_bytes = token_bytes[y.clamp(min=0)] * trained
        sums += torch.stack((losses.sum(), (losses * (target_bytes > 0)).sum(),
                             target_bytes.sum(), trained.sum()))
    model.train()
    nats, nats_on_bytes, num_bytes, tokens = all_reduce(sums).tolist()
    return nats / max(1.0, tokens), nats_on_bytes / (math.log(2) * max(1.0, num_bytes))


def evaluate_and_keep_best(model: Transformer, tokenizer: Tokenizer, batches: list,
                           token_bytes: torch.Tensor, tasks: list[Task], config: Config,
                           precision: str, state: RunState, writer: SummaryWriter | None,
                           conversations: bool) -> str:
    """Val loss and bits/byte (of a conversation run: on the assistant's tokens); a new best
    goes into `state` and (rank 0) the best checkpoint. The eval tasks are scored (each rank its
    share of the examples). Rank 0 logs them and a sample. Returns the lines to print."""
    device, t = model.embed_tokens.weight.device, config.training
    val_loss, val_bpb = evaluate(model, batches, token_bytes, precision)
    encoder = Encoder(tokenizer, config.data.tokenizer_path)
    scores = {task.name: score_task(model, encoder, task, config.data.context_length, device,
                                    precision) for task in tasks}
    improved = val_loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_val_bpb = val_loss, val_bpb
    if writer and improved:
        save_checkpoint({**model_record(model, config, tokenizer), "step": state.step,
                         "val_loss": val_loss, "val_bpb": val_bpb}, t.checkpoint_path)
    if writer and t.sample_tokens:
        writer.add_text("sample", sample(model, tokenizer, config, precision, conversations),
                        state.step)
    log_scalars(writer, state.step, {
        "2_val/loss": val_loss, "2_val/bpb": val_bpb, "2_val/best_loss": state.best_val_loss,
        "2_val/best_bpb": state.best_val_bpb, **{
            f"3_eval/{name}/{metric}": result[metric] for name, result in scores.items()
            for metric in ("acc", "acc_norm")}})
    return (f"step {state.step}: val loss {val_loss:.4f}, {val_bpb:.4f} bits/byte"
            + (" (assistant tokens)" if conversations else "")
            + (f" -> saved {t.checkpoint_path}" if improved else "")
            + "".join(f"\n  {name}: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} "
                      f"({result['n']} examples)" for name, result in scores.items()))


def sample(model: Transformer, tokenizer: Tokenizer, config: Config, precision: str,
           conversations: bool) -> str:
    """TensorBoard's text sample, drawn with its own generator: text after the end-of-text
    token, or in a conversation run the reply to SAMPLE_TURN, up to its end of turn."""
    device, chat = model.embed_tokens.weight.device, chat_format(config.data.tokenizer_path)
    eot_id = tokenizer.token_to_id(chat.end_of_turn)
    prompt = (encode(tokenizer, render(chat, [{"role": "user", "content": SAMPLE_TURN}], True))
              if conversations else [eot_id])
    model.eval()
    with autocast_context(device, precision):
        ids = [int(token) for token in generate(
            model, torch.tensor([prompt], device=device), config.training.sample_tokens,
            config.data.context_length, temperature=0.8, top_k=50,
            eos_id=eot_id if conversations else None,
            generator=torch.Generator(device=device).manual_seed(0))]
    model.train()
    return decode(tokenizer, prompt + ids) if conversations else decode(tokenizer, ids)


if __name__ == "__main__":
    run_cli(main)
