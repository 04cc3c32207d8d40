"""Optimization, in one place for train.py and bench.py: the optimizers (AdamW, or Muon on the
blocks' matrices beside AdamW), one micro-step's forward and backward, the optimizer step, and
the learning-rate schedule. The file to edit to try an optimizer or a schedule."""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor

from data import IGNORE_INDEX
from lora import attach, count
from model import Transformer, meta_model
from runtime import autocast_context, memory_per_process, sync
from utils import Config, TrainingConfig, require

FUSED_ADAMW = ("cuda", "cpu")  # device types where fused AdamW beats foreach, as bench.py measures


def configure_optimizers(model: Transformer, t: TrainingConfig, device: torch.device,
                         newton_schulz_dtype: str) -> list[torch.optim.Optimizer]:
    """AdamW on every trained parameter (a LoRA run's: its adapters); or, with
    training.optimizer=muon, Muon on the blocks' weight matrices (q/k/v/o, gate/up/down),
    orthogonalising in `newton_schulz_dtype`, and AdamW on the rest (embedding, head, norms).
    Weight decay applies to matrices only. Muon's update is scaled to AdamW's RMS, so one
    learning rate and one schedule serve both."""
    muon = muon_matrices(model, t)
    muon_ids = {id(p) for p in muon}
    rest = [p for p in model.parameters() if id(p) not in muon_ids and p.requires_grad]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    optimizers = [torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95),
                                    fused=device.type in FUSED_ADAMW)]
    if muon:
        optimizers.append(Muon(muon, lr=t.lr, weight_decay=t.weight_decay,
                               newton_schulz_dtype=newton_schulz_dtype))
    return optimizers


def muon_matrices(model: Transformer, t: TrainingConfig) -> list[torch.nn.Parameter]:
    """The parameters Muon updates: the blocks' weight matrices (none under AdamW). A LoRA
    run's adapters take AdamW: it reached the lower validation loss (docs/training.md#lora)."""
    return ([p for layer in model.layers for p in layer.parameters() if p.dim() == 2]
            if t.optimizer == "muon" and not t.lora_rank else [])


def training_model(config: Config) -> Transformer:
    """The model a run trains, on the meta device: with its adapters under LoRA."""
    model = meta_model(config.model)
    if config.training.lora_rank:
        attach(model, config.training)
    return model


def training_bytes_per_rank(config: Config, world_size: int) -> int:
    """Bytes one rank holds of fp32 weights, the trained ones' gradients and the optimizer state
    (AdamW's two moments, Muon's one momentum), counted on the meta device: all of it under DDP,
    a 1/world_size shard of each under FSDP. A LoRA run trains its adapters only; its frozen
    base is counted in fp32 (in a bf16 run it is kept in bf16, half of that). Activations are
    not counted: they scale with the batch, and activation checkpointing cuts them."""
    model = training_model(config)
    trained, frozen = count(model)
    muon = sum(p.numel() for p in muon_matrices(model, config.training))
    floats_per_model = frozen + 2 * trained + 2 * (trained - muon) + muon
    shards = world_size if config.training.parallelism == "fsdp" else 1
    return 4 * math.ceil(floats_per_model / shards)


def check_training_fits(config: Config, device: torch.device, world_size: int) -> None:
    """Refuse, before anything is built, a run whose training state per rank
    (training_bytes_per_rank) exceeds the memory each process has: its GPU's, or on a CPU this
    host's shared by the processes torchrun started on it."""
    t, need = config.training, training_bytes_per_rank(config, world_size)
    have, where = memory_per_process(device)
    more_ranks = ("launch more processes" if t.parallelism == "fsdp" else
                  "set training.parallelism=fsdp to shard it over the processes")
    optimizer = "adamw" if t.lora_rank else t.optimizer  # a LoRA run's adapters take AdamW
    cheaper = ", set training.optimizer=muon (one moment per matrix)" * (
        t.optimizer == "adamw" and not t.lora_rank)
    lora = ", train LoRA adapters (training.lora_rank=8)" * bool(t.init_from and not t.lora_rank)
    state = "frozen base, adapters' gradients" if t.lora_rank else "fp32 weights, gradients"
    require(need <= have, f"training this model takes {need / 2**30:,.1f} GiB per process "
            f"({state} and {optimizer} state, before activations), more than "
            f"the {have / 2**30:,.1f} GiB each process has of {where} — {more_ranks}{cheaper}"
            f"{lora}, or lower embed_dim, ff_dim, num_layers or vocab_size")


NEWTON_SCHULZ_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update with adjust_lr_fn="match_rms_adamw" (Nesterov momentum,
    Newton-Schulz orthogonalisation, decoupled weight decay, the update scaled to AdamW's RMS),
    bitwise equal to it in bf16, with the orthogonalisation's dtype a setting: torch's is always
    bf16, which a CPU without bf16 matmul units runs far slower than fp32. The dtype is in the
    param group, so a snapshot carries it and a resume orthogonalises as the run did."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, weight_decay: float,
                 newton_schulz_dtype: str, momentum: float = 0.95, ns_steps: int = 5,
                 ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
                 eps: float = 1e-7):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "nesterov": True, "ns_coefficients": ns_coefficients,
                                  "eps": eps, "ns_steps": ns_steps,
                                  "newton_schulz_dtype": newton_schulz_dtype})

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a snapshot of torch.optim.Muon's: it ran bf16
            group.setdefault("newton_schulz_dtype", "bf16")

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # closure: Optimizer.step's signature; unused
        """Under FSDP a collective: the matrices go in rounds of one per rank, each
        orthogonalised by its own rank (orthogonalize_across_ranks), largest first, so the
        matrices of a round are alike in size and no rank waits long for another."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            sharded = bool(params) and isinstance(params[0], DTensor)
            per_round = dist.get_world_size() if sharded else 1
            if sharded:
                params.sort(key=lambda param: param.numel(), reverse=True)  # stable: ranks agree
            for first in range(0, len(params), per_round):
                chunk = params[first:first + per_round]
                updates = [self.momentum_update(param, group) for param in chunk]
                updates = (orthogonalize_across_ranks(updates, group) if sharded else
                           [orthogonalize_as(group, updates[0])])
                for param, update in zip(chunk, updates):
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                    rms_match = 0.2 * math.sqrt(max(param.shape[:2]))  # AdamW's update RMS
                    param.add_(update, alpha=-group["lr"] * rms_match)

    def momentum_update(self, param: torch.nn.Parameter, group: dict) -> torch.Tensor:
        """The momentum buffer moved toward this gradient, and the (Nesterov) update from it."""
        grad, state, momentum = param.grad, self.state[param], group["momentum"]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buffer = state["momentum_buffer"]
        buffer.lerp_(grad, 1 - momentum)
        return grad.lerp(buffer, momentum) if group["nesterov"] else buffer


def orthogonalize_as(group: dict, matrix: torch.Tensor) -> torch.Tensor:
    """`matrix` orthogonalised with `group`'s coefficients, steps, eps and dtype."""
    return orthogonalize(matrix, group["ns_coefficients"], group["ns_steps"], group["eps"],
                         NEWTON_SCHULZ_DTYPES[group["newton_schulz_dtype"]])


def orthogonalize_across_ranks(updates: list[DTensor], group: dict) -> list[DTensor]:
    """FSDP's shards of up to one update per rank, each orthogonalised as one whole matrix by
    the rank of its position: every update is gathered whole (one at a time; a rank that does
    not own it drops it at once), its owner orthogonalises it, and each rank receives its rows
    of every result from the owner. So the results are one process's, the Newton-Schulz work
    per rank is 1/N of the matrices, and the extra memory is about one whole matrix."""
    rank, owned = dist.get_rank(), None
    for owner, update in enumerate(updates):  # every gather before any compute: no rank waits
        whole = update.full_tensor()
        if owner == rank:
            owned = whole
    if owned is not None:
        owned = orthogonalize_as(group, owned)
    dtype = NEWTON_SCHULZ_DTYPES[group["newton_schulz_dtype"]]
    return [distribute_tensor(owned if owner == rank else torch.empty(
        update.shape, dtype=dtype, device=update.to_local().device), update.device_mesh,
        update.placements, src_data_rank=owner) for owner, update in enumerate(updates)]


def orthogonalize(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float, dtype: torch.dtype) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of Muon, in `dtype`: maps `matrix` to roughly U V^T
    of its SVD U S V^T (singular values pushed into ~[0.5, 1.5], which trains as well)."""
    a, b, c = coefficients
    wide = matrix.to(dtype)
    if matrix.size(0) > matrix.size(1):  # iterate on the wide orientation: the smaller Gram
        wide = wide.T
    wide = wide / wide.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = wide @ wide.T
        wide = torch.addmm(wide, torch.addmm(gram, gram, gram, beta=b, alpha=c), wide, beta=a)
    return wide.T if matrix.size(0) > matrix.size(1) else wide


def forward_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     device: torch.device, precision: str, scaler: torch.amp.GradScaler,
                     loss_scale: float | torch.Tensor) -> torch.Tensor:
    """One micro-step on `device`: the summed loss (nats) of batch (x, y) over its trained
    targets (IGNORE_INDEX ones count nothing) under autocast, and the backward of that sum times
    `loss_scale` (scaled again for fp16). With loss_scale = 1 / the trained targets of the whole
    optimizer step, the accumulated gradients are the step's mean gradient, however the targets
    fall between micro-steps; a batch with none adds zero. Returns the sum, detached."""
    with autocast_context(device, precision):
        logits, _ = model(x.to(device, non_blocking=True))
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device, non_blocking=True).view(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    scaler.scale(loss * loss_scale).backward()
    return loss.detach()


def optimizer_step(optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler,
                   lr: float, grad_clip: float) -> torch.Tensor:
    """Set lr, unscale, clip (0 = off), step, clear grads; returns the pre-clip grad norm."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.unscale_(optimizer)
    params = [p for optimizer in optimizers for group in optimizer.param_groups
              for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    if isinstance(grad_norm, DTensor):  # FSDP: the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return grad_norm


def skip_update(optimizers: list[torch.optim.Optimizer]) -> torch.Tensor:
    """Clear the grads without a step (no momentum, no weight decay, no GradScaler update), for
    an optimizer step whose batches hold no trained target; returns its grad norm, zero."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return torch.zeros(())


def step_seconds(model: Transformer, config: Config, device: torch.device,
                 newton_schulz_dtype: str, precisions: tuple[str, ...] = ("fp32", "bf16"),
                 rounds: int = 7) -> dict[str, list[float]]:
    """Seconds of `rounds` optimizer steps in each of `precisions`, eager, each precision on its
    own copy of `model` and on random tokens of the run's micro-batch shape, taken in turns so
    that a burst of a neighbour's load slows them alike. The model, the data order and the RNG
    streams stay untouched: a run trains exactly as it would without the measurement."""
    generator = torch.Generator().manual_seed(0)
    shape = (config.data.batch_size, config.data.context_length)
    x, y = (torch.randint(model.config.vocab_size, shape, generator=generator) for _ in "xy")
    trials = {}
    for precision in precisions:
        trial = copy.deepcopy(model)
        trials[precision] = (trial, configure_optimizers(trial, config.training, device,
                                                         newton_schulz_dtype),
                             torch.amp.GradScaler(device.type, enabled=precision == "fp16"))
    seconds: dict[str, list[float]] = {precision: [] for precision in precisions}
    with torch.random.fork_rng(devices=[]):  # dropout draws from the global stream
        for round_index in range(1 + rounds):  # the first round allocates optimizer state
            for precision, (trial, optimizers, scaler) in trials.items():
                start = time.perf_counter()
                forward_backward(trial, x, y, device, precision, scaler, 1 / y.numel())
                optimizer_step(optimizers, scaler, config.training.lr, config.training.grad_clip)
                sync(device)
                if round_index:
                    seconds[precision].append(time.perf_counter() - start)
    return seconds


def lr_at(step: int, progress: float, t: TrainingConfig) -> float:
    """Linear warmup for warmup_steps, then a cosine from lr to its floor (t.floor_lr) as
    `progress` goes 0 -> 1; over the last warmdown_frac of it, a straight line from where the
    cosine is to the floor."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    floor = t.floor_lr

    def cosine(p: float) -> float:
        return floor + 0.5 * (1.0 + math.cos(math.pi * p)) * (t.lr - floor)

    progress, warmdown_start = min(1.0, progress), 1.0 - t.warmdown_frac
    if progress <= warmdown_start:
        return cosine(progress)
    share_done = (progress - warmdown_start) / t.warmdown_frac
    return cosine(warmdown_start) + share_done * (floor - cosine(warmdown_start))
