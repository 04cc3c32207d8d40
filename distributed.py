"""The ranks under torchrun as train.py's loop meets them: the collectives it calls by name,
and the wait for each node's token cache. In one process each is the plain call or a no-op.
(data_parallel_train.py brings the process group up.)

A collective is met by every rank or the run hangs: each one here says so in its name
(broadcast, all_reduce, all ranks, across ranks), as do the functions elsewhere that call one.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
import types
from typing import Callable, ContextManager, TypeVar

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from bpe import BPETokenizer
from data import TokenWindows, prepare_data
from lora import attach
from model import Block, Transformer, meta_model
from utils import Config, TrainingConfig, UserError

T = TypeVar("T")


def is_rank_0() -> bool:
    """Whether this process speaks for the run: rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_rank_0s(decide: Callable[[], T]) -> T:
    """What `decide()` returns on rank 0, on every rank; the other ranks do not call it. A
    UserError it raises is raised on every rank (one process: `decide()`)."""
    if not dist.is_initialized():
        return decide()
    holder: list = [None]
    if dist.get_rank() == 0:
        try:
            holder[0] = (decide(), None)
        except UserError as err:
            holder[0] = (None, str(err))
    dist.broadcast_object_list(holder, src=0)
    value, error = holder[0]
    if error is not None:
        raise UserError(error)
    return value


def all_gather_objects(value: T) -> list[T]:
    """Every rank's `value` (picklable), in rank order, on every rank (one process: [value])."""
    if not dist.is_initialized():
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def require_same_on_all_ranks(value: object, what: str, fix: str) -> None:
    """Stop every rank with one line, naming the ranks that differ, unless `value` (`what`
    each rank holds) is the same on all (one process: nothing to compare)."""
    values = all_gather_objects(value)
    differing = [rank for rank, other in enumerate(values) if other != values[0]]
    if differing:
        shown = "; ".join(f"rank {rank}: {values[rank]}" for rank in [0, *differing])
        raise UserError(f"ranks disagree on {what} ({shown}) — {fix}")


def prepare_data_once_per_node(
        config: Config) -> tuple[BPETokenizer, TokenWindows, TokenWindows]:
    """Local rank 0 builds the corpus and token cache; the node's other ranks then read them.
    Under torchrun the ranks wait for each other by polling the process group's store, not in a
    collective, which would fail after training.dist_timeout_s however long tokenizing takes."""
    if not dist.is_initialized():
        return prepare_data(config)
    store, rank = dist.distributed_c10d._get_default_store(), dist.get_rank()
    attempt = f"data/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # fresh keys per restart
    node_first = rank - int(os.environ.get("LOCAL_RANK", "0"))  # torchrun numbers a node's
    if rank != node_first:                                       # ranks contiguously
        wait_in_store(store, [f"{attempt}/{node_first}"], f"{attempt}/failed")
    try:
        prepared = prepare_data(config)
    except BaseException as err:  # the others stop waiting, and rank 0 reports this one line
        store.set(f"{attempt}/failed", str(err) if isinstance(err, UserError)
                  else f"rank {rank} failed preparing the data ({type(err).__name__}: {err})")
        raise
    store.set(f"{attempt}/{rank}", "ready")
    wait_in_store(store, [f"{attempt}/{other}" for other in range(dist.get_world_size())],
                  f"{attempt}/failed")
    return prepared


def wait_in_store(store: dist.Store, keys: list[str], failed_key: str) -> None:
    """Until every key is set, with no deadline; a rank that failed preparing its data ends the
    wait with its error, set under failed_key."""
    while not store.check(keys):
        if store.check([failed_key]):
            raise UserError(store.get(failed_key).decode())
        time.sleep(0.5)


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """Combine `tensor` over the ranks in place (one process: as it is) and return it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


@functools.cache
def host_group() -> dist.ProcessGroup | None:
    """The group for the loop's small agreements between hosts (counts, flags, clocks): gloo,
    so they never wait for a GPU; the default group (None) where that is gloo already."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def all_reduce_on_host(values: list[float],
                       op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
    """Combine host `values` over the ranks (one process: as they are), device untouched."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=op, group=host_group())
    return tensor.tolist()


def agree_across_ranks(nonfinite: float, signum: int, clock: float) -> tuple[bool, int, float]:
    """Any rank's nan/inf loss or stop signal stops all, and all take the latest clock (one
    schedule, one last step), agreed on the hosts. -> (nonfinite, signal, clock)"""
    nonfinite, signum, clock = all_reduce_on_host([nonfinite, signum, clock], dist.ReduceOp.MAX)
    return bool(nonfinite), int(signum), clock


def wrap_model(model: Transformer, t: TrainingConfig) -> Transformer | DistributedDataParallel:
    """The model as the loop trains it: activation checkpointing if asked; under torchrun,
    DDP around it (FSDP shards in place: shard_model_across_ranks)."""
    if t.activation_checkpointing:
        checkpoint_activations(model)
    if not dist.is_initialized() or isinstance(model, FSDPModule):
        return model
    # The RoPE tables are buffers every rank computes alike: no broadcast after each sync.
    return DistributedDataParallel(model, broadcast_buffers=False)


def shard_model_across_ranks(model: Transformer, device: torch.device, precision: str,
                             t: TrainingConfig) -> Transformer:
    """FSDP2: a model whose every block is one unit and the rest (the embedding, tied to the
    head, and the final norm) one more, each rank holding a 1/N shard of each parameter, filled
    with rank 0's `model` (the other ranks' may be on the meta device). It is built on the meta
    device, so no rank allocates a whole copy. With bf16 on CUDA the units compute in bf16 and
    reduce gradients in fp32; their outputs (the residual stream) stay fp32. A LoRA run's
    adapters are sharded with their blocks, beside the frozen base's shards."""
    sharded = meta_model(model.config)
    if t.lora_rank:
        attach(sharded, t)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                 output_dtype=torch.float32) if (
        device.type == "cuda" and precision == "bf16") else MixedPrecisionPolicy()
    for unit in [*sharded.layers, sharded]:
        fully_shard(unit, mesh=mesh, mp_policy=mixed)
        # gloo may sum where asked to average (pytorch#162338): reduce by sums, then divide.
        unit.set_force_sum_reduction_for_comms(device.type == "cpu")
    sharded.to_empty(device=device)
    sharded.init_rope_tables()
    set_model_state_dict(sharded, model.state_dict() if dist.get_rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True,
                                                  broadcast_from_rank0=True))
    return sharded


def trained_names(model: Transformer) -> set[str]:
    """The state dict's names of trained parameters: all of a full run's, a LoRA run's adapters
    (a tied head is frozen with its embedding)."""
    return {name for name, param in model.named_parameters(remove_duplicate=False)
            if param.requires_grad}


def trained_weights(model: Transformer) -> dict[str, torch.Tensor]:
    """The state dict's trained tensors (trained_names); under FSDP this rank's shards."""
    return only_trained(model, model.state_dict())


def only_trained(model: Transformer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = trained_names(model)
    return {name: tensor for name, tensor in state.items() if name in names}


def full_weights_across_ranks(model: Transformer) -> dict[str, torch.Tensor]:
    """The trained weights whole (trained_weights), on rank 0's host; gathered from the shards
    under FSDP (the other ranks get an empty dict)."""
    if not isinstance(model, FSDPModule):
        return trained_weights(model)
    return only_trained(model, get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)))


def gradient_sync(model: torch.nn.Module, sync: bool) -> ContextManager:
    """A micro-step whose backward reduces the gradients over the ranks only if `sync` (the
    last of an optimizer step); the others accumulate locally."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def checkpoint_activations(model: Transformer) -> None:
    """Activation checkpointing, per block: while gradients are on, a block keeps only its
    input, and backward runs its forward again, with the RNG state replayed (the same dropout
    masks). Each block's forward is replaced in place, so parameter names stay as they are."""
    for block in model.layers:
        block.forward = types.MethodType(checkpointed_forward, block)


def checkpointed_forward(block: Block, *inputs: object) -> torch.Tensor:
    forward = type(block).forward  # the class's: FSDP gives a block a subclass, same forward
    if not torch.is_grad_enabled():  # evaluation and generation keep nothing for backward
        return forward(block, *inputs)
    return torch.utils.checkpoint.checkpoint(forward, block, *inputs, use_reentrant=False)
