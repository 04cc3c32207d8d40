"""DDP training entry point: one process per device under torchrun, then train.py's loop.

    torchrun --standalone --nproc_per_node=N data_parallel_train.py configs.yaml [key=value ...]

NCCL on GPUs (each process takes the GPU of its LOCAL_RANK), gloo on CPU. Each optimizer step
sees batch_size x grad_accum_steps x world_size windows; DDP averages the gradients.
"""
from __future__ import annotations

import datetime
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from train import train
from utils import Config, UserError, parse_config_cli, require, run_cli

REPORT_GRACE_S = 5.0  # how long a failing rank > 0 waits for rank 0 to print the error line


def init_distributed(config: Config) -> torch.device:
    """Bring up the process group torchrun describes; returns this process's device."""
    require("LOCAL_RANK" in os.environ, "data_parallel_train.py must be launched by torchrun — "
            "torchrun --standalone --nproc_per_node=N data_parallel_train.py configs.yaml")
    local_rank, wanted = int(os.environ["LOCAL_RANK"]), config.training.device
    require(wanted != "mps", "DDP does not run on MPS — use training.device=cpu, or python "
            "train.py on the Mac's GPU")
    timeout = datetime.timedelta(seconds=config.training.dist_timeout_s)
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        init_process_group("gloo", timeout)
        return torch.device("cpu")
    gpus = torch.cuda.device_count()
    require(local_rank < gpus, f"local rank {local_rank} has no GPU: this node has {gpus} — "
            f"launch at most --nproc_per_node={gpus}, or use training.device=cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    init_process_group("nccl", timeout)
    return device


def init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    """env:// init, except that a single-node torchrun restart gets its own namespace in the
    agent's store. torchrun keeps one TCPStore across restarts and workers publish their
    addresses in it without a per-attempt prefix, so a restarted rank can read a dead rank's
    address and fail or hang. On one node TORCHELASTIC_RESTART_COUNT is the same for every
    worker and names the attempt; across nodes it counts per agent (pytorch#108158), so there
    torch's default is kept."""
    if (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
            or os.environ.get("GROUP_WORLD_SIZE") != "1"):
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"slm/attempt_{attempt}", store),
                            rank=rank, world_size=world_size, timeout=timeout)


def main() -> None:
    # torchrun stops the group with SIGTERM: exit through `finally` to tear the group down.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    config, cli_keys = parse_config_cli("Distributed data-parallel SLM training; launch with "
                                        "torchrun.")
    device = init_distributed(config)
    try:
        train(config, device, cli_keys)
    except UserError:
        if dist.get_rank() != 0:  # rank 0 reports a mistake; torchrun would stop it on our exit
            time.sleep(REPORT_GRACE_S)
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main, report=os.environ.get("RANK", "0") == "0")  # one error line, from rank 0
