"""Optimization, in one place for train.py and bench.py: the optimizers (AdamW, or Muon on the
blocks' matrices beside AdamW), one micro-step's forward and backward, the optimizer step, and
the learning-rate schedule. The file to edit to try an optimizer or a schedule."""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from data import IGNORE_INDEX
from model import Transformer
from runtime import autocast_context, sync
from utils import Config, TrainingConfig

FUSED_ADAMW = ("cuda", "cpu")  # device types where fused AdamW beats foreach, as bench.py measures


def configure_optimizers(model: Transformer, t: TrainingConfig,
                         device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW on every parameter; or, with training.optimizer=muon, Muon on the blocks' weight
    matrices (q/k/v/o, gate/up/down) and AdamW on the rest (embedding, head, norms). Weight
    decay applies to matrices only. Muon's update is scaled to AdamW's RMS (match_rms_adamw),
    so one learning rate and one schedule serve both."""
    muon = ([p for layer in model.layers for p in layer.parameters() if p.dim() == 2]
            if t.optimizer == "muon" else [])
    muon_ids = {id(p) for p in muon}
    rest = [p for p in model.parameters() if id(p) not in muon_ids]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    optimizers = [torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95),
                                    fused=device.type in FUSED_ADAMW)]
    if muon:
        optimizers.append(torch.optim.Muon(muon, lr=t.lr, weight_decay=t.weight_decay,
                                           adjust_lr_fn="match_rms_adamw"))
    return optimizers


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
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return grad_norm


def seconds_per_step(model: Transformer, config: Config, device: torch.device,
                     precision: str, steps: int = 2) -> float:
    """Seconds per optimizer step of a copy of `model` in `precision`, eager, on random tokens of
    the run's micro-batch shape: the model, the data order and the RNG streams stay untouched,
    so a run trains exactly as it would without the measurement."""
    trial = copy.deepcopy(model)
    optimizers = configure_optimizers(trial, config.training, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    generator = torch.Generator().manual_seed(0)
    shape = (config.data.batch_size, config.data.context_length)
    x, y = (torch.randint(model.config.vocab_size, shape, generator=generator) for _ in "xy")
    seconds = []
    with torch.random.fork_rng(devices=[]):  # dropout draws from the global stream
        for _ in range(1 + steps):  # the first step allocates the optimizer state
            start = time.perf_counter()
            forward_backward(trial, x, y, device, precision, scaler, 1 / y.numel())
            optimizer_step(optimizers, scaler, config.training.lr, config.training.grad_clip)
            sync(device)
            seconds.append(time.perf_counter() - start)
    return min(seconds[1:])


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
