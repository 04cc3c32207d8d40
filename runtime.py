"""The device in hand: which one to use, the precision and autocast it runs in, whether to
compile, the allocator setting for CPU training, and the matmul peak MFU is measured against."""
from __future__ import annotations

import contextlib
import ctypes
import sys
import time
from typing import Literal

import torch

from utils import require, warn


def pick_device(name: str) -> torch.device:
    """`name`, or for auto the first of CUDA, MPS and CPU that this machine has."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "cpu": True}
    if name == "auto":
        return torch.device(next(kind for kind, ok in available.items() if ok))
    require(available[name], f"training.device is '{name}' but none is visible — use auto or cpu")
    return torch.device(name)


def setup_precision(name: str, device: torch.device) -> str:
    """The autocast precision `name` means on `device`, plus TF32 for fp32 matmuls on CUDA. fp32
    on CPU/MPS: bf16 is far slower without AVX512-BF16/AMX, and gains little with it (bench.py)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if name == "fp16" and device.type == "cpu":  # asked for explicitly: CI runs GradScaler this way
        warn("training.precision=fp16 on a CPU is slow and meant for testing the fp16 path "
             "(autocast + GradScaler); train with fp32 (or bf16 on a CPU with AMX)")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def keep_freed_memory() -> None:
    """Keep freed blocks of up to 32 MiB in the process (glibc malloc): by default it returns
    them to the OS at once, so each CPU training step page-faults its activations back in,
    zero-filled by the kernel. Elsewhere a no-op."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform == "linux" else None
    if mallopt is not None:
        mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks this small come from the heap
        mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: free heap top kept up to this size


def use_compile(setting: Literal["auto", True, False], device: torch.device) -> bool:
    """torch.compile by default on CUDA only: on a CPU its compile time eats a short run's gain."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def measure_peak_flops(device: torch.device, precision: str, seconds: float = 0.5,
                       windows: int = 5) -> float:
    """Matmul FLOP/s this device reaches, the denominator of MFU: the best of `windows` timings,
    since a neighbour's burst on a shared machine can lower a window but never raise one."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n = 8192 if device.type == "cuda" else 1024  # big enough that a GPU's launch overhead is noise
    generator = torch.Generator(device=device).manual_seed(0)  # the training RNG stream stays
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))
    rates = []
    for _ in range(windows + 1):  # the first window warms up
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            a @ b
            calls += 1
            sync(device)
        rates.append(2 * n ** 3 * calls / (time.perf_counter() - start))
    return max(rates[1:])


def sync(device: torch.device) -> None:
    if device.type in ("cuda", "mps"):
        getattr(torch, device.type).synchronize()
