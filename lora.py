"""LoRA: low-rank adapters beside a model's frozen linear layers. Attach, merge, count, and
the fingerprint that ties an adapter to its base; the forward stays model.py's.

A target linear y = W x, W (out, in), gains lora_A (rank, in) and lora_B (out, rank), so that
y = W x + (alpha / rank) B A dropout(x). A forward hook adds the second term to the linear's
output: no weight-sized product is formed, W needs no gradient, and model.py is untouched. A
starts small and random and B at zero, so a fresh adapter changes nothing. The parameter names
(`layers.0.self_attn.q_proj.lora_A.weight`) are PEFT's with its `base_model.model.` prefix off.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf import HEAD
from model import Transformer
from utils import TrainingConfig, require

ADAPTER_PARTS = (".lora_A.", ".lora_B.")


def target_linears(model: Transformer, targets: list[str]) -> dict[str, nn.Linear]:
    """The blocks' linears named in `targets` (LORA_TARGETS' names), by their module path."""
    return {name: module for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear)}


def add_low_rank_update(linear: nn.Linear, inputs: tuple[torch.Tensor, ...],
                        output: torch.Tensor) -> torch.Tensor:
    """The forward hook: the linear's output plus its adapter's scaled low-rank product."""
    x = F.dropout(inputs[0], linear.lora_dropout, linear.training)
    return output + linear.lora_B(linear.lora_A(x)) * linear.lora_scale


def attach(model: Transformer, t: TrainingConfig) -> None:
    """Give each target linear an adapter of rank t.lora_rank and freeze every other parameter.
    A is drawn as PEFT draws it (Kaiming-uniform) from a generator seeded by training.seed, so
    attaching draws nothing from the global RNG; B is zero. On the meta device only shapes."""
    generator = torch.Generator().manual_seed(t.seed)
    for param in model.parameters():
        param.requires_grad_(False)
    for linear in target_linears(model, t.lora_targets).values():
        device = linear.weight.device
        linear.lora_A = nn.Linear(linear.in_features, t.lora_rank, bias=False, device=device)
        linear.lora_B = nn.Linear(t.lora_rank, linear.out_features, bias=False, device=device)
        if device.type != "meta":
            bound = 1 / math.sqrt(linear.in_features)  # kaiming_uniform_(a=sqrt(5))'s bound
            with torch.no_grad():
                linear.lora_A.weight.copy_(torch.empty(linear.lora_A.weight.shape).uniform_(
                    -bound, bound, generator=generator))
                linear.lora_B.weight.zero_()
        linear.lora_scale, linear.lora_dropout = t.lora_scale, t.lora_dropout
        linear.register_forward_hook(add_low_rank_update)


def store_frozen_in(model: Transformer, dtype: torch.dtype) -> None:
    """The frozen block linears' weights kept in `dtype` (the run's autocast dtype), half the
    memory of fp32; autocast computes in it anyway. The embedding, tied to the head, and the
    norms stay fp32: they set the fp32 residual stream."""
    for layer in model.layers:
        for module in layer.modules():
            if isinstance(module, nn.Linear) and not module.weight.requires_grad:
                module.weight.data = module.weight.data.to(dtype)


def is_adapter(name: str) -> bool:
    return any(part in name for part in ADAPTER_PARTS)


def adapter_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors of a state dict."""
    return {name: tensor for name, tensor in state.items() if is_adapter(name)}


def merged(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
           scale: float) -> dict[str, torch.Tensor]:
    """The base state dict with each adapted weight W replaced by W + scale B A, in fp32."""
    state = dict(base)
    for name, a in adapter.items():
        if ".lora_A." in name:
            linear = name.split(".lora_A.")[0]
            b, weight = adapter.get(f"{linear}.lora_B.weight"), state.get(f"{linear}.weight")
            require(b is not None and weight is not None, f"the adapter's {name} has no lora_B "
                    "or no base weight to merge into — the checkpoint is damaged or of another "
                    "base; use another one")
            state[f"{linear}.weight"] = (weight.float() + scale * (b.float() @ a.float())
                                         ).to(weight.dtype)
    return state


def count(model: Transformer) -> tuple[int, int]:
    """(trained parameters, frozen parameters), the tied embedding/head counted once."""
    params = list(model.parameters())
    trained = sum(p.numel() for p in params if p.requires_grad)
    return trained, sum(p.numel() for p in params) - trained


def fingerprint(state: dict[str, torch.Tensor], tied: bool) -> str:
    """SHA-256 of a base model's weights (names, shapes, fp32 values; a tied head once): what a
    LoRA checkpoint records of its base, so a changed base is noticed before it is used."""
    digest = hashlib.sha256()
    for name in sorted(state):
        if name == HEAD and tied or is_adapter(name):
            continue
        tensor = state[name].detach().float().contiguous().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()[:16]
