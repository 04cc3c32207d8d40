"""The ranks under torchrun as train.py's loop meets them: the collectives it calls by name,
and the wait for each node's token cache. In one process each is the plain call or a no-op.
(data_parallel_train.py brings the process group up.)"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from data import TokenWindows, prepare_data
from utils import Config, UserError


def is_rank_0() -> bool:
    """Whether this process speaks for the run: rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def rank_0s(value: str) -> str:
    """Rank 0's `value` on every rank (one process: `value`)."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def prepare_data_once_per_node(config: Config) -> tuple[Tokenizer, TokenWindows, TokenWindows]:
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


def agree(step_loss: torch.Tensor, signum: int, clock: float) -> tuple[bool, int, float]:
    """The step's one host sync and all-reduce: any rank's nan/inf loss or stop signal stops all,
    and all take the latest clock (one schedule, one last step). -> (nonfinite, signal, clock)"""
    flags = torch.tensor([0.0, signum, clock], device=step_loss.device)
    flags[0] = (~torch.isfinite(step_loss)).float()
    nonfinite, signum, clock = all_reduce(flags, dist.ReduceOp.MAX).tolist()
    return bool(nonfinite), int(signum), clock
