"""The device in hand: which one to use, the precision and autocast it runs in, whether to
compile, the allocator setting for CPU training, and the matmul peak MFU is measured against."""
from __future__ import annotations

import contextlib
import ctypes
import sys
import time
from typing import Callable, Literal

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
    """The autocast precision `name` means on `device`, plus TF32 for fp32 matmuls on CUDA. Auto
    is fp32 on CPU/MPS here: inference and benchmarks keep it, while a CPU training run measures
    (choose_cpu_precision)."""
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
        if calls == 1 and time.perf_counter() - start > seconds:  # one call outlasts the budget:
            return rates[-1]  # so slow that warm-up and launch costs are noise (bf16 on AVX2)
    return max(rates[1:])


def sync(device: torch.device) -> None:
    if device.type in ("cuda", "mps"):
        getattr(torch, device.type).synchronize()


BF16_PEAK_GATE = 1.5    # bf16 matmul peak / fp32's below which bf16 is never tried on a CPU
BF16_MIN_SPEEDUP = 1.15  # how much faster bf16 must train this model to be chosen


def choose_cpu_precision(peak_flops: dict[str, float],
                         step_seconds: Callable[[str], float]) -> tuple[str, str]:
    """`precision: auto` on a CPU, by measurement: fp32 unless bf16's matmul peak is at least
    BF16_PEAK_GATE x fp32's and a training step of this model, timed in each precision by
    `step_seconds`, runs at least BF16_MIN_SPEEDUP x faster in bf16. -> (precision, the line
    that says what was measured)."""
    fp32_peak, bf16_peak = peak_flops["fp32"], peak_flops["bf16"]
    peaks = f"matmul peak bf16 {bf16_peak / 1e9:,.0f} / fp32 {fp32_peak / 1e9:,.0f} GFLOP/s"
    if bf16_peak < BF16_PEAK_GATE * fp32_peak:
        return "fp32", (f"precision auto: fp32 ({peaks} = {bf16_peak / fp32_peak:.2f}x, below "
                        f"{BF16_PEAK_GATE}x: bf16 not timed)")
    fp32_seconds, bf16_seconds = step_seconds("fp32"), step_seconds("bf16")
    speedup = fp32_seconds / bf16_seconds
    choice = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    return choice, (f"precision auto: {choice} (this model's training step: fp32 "
                    f"{1000 * fp32_seconds:,.0f} ms, bf16 {1000 * bf16_seconds:,.0f} ms = "
                    f"{speedup:.2f}x, bf16 needs {BF16_MIN_SPEEDUP}x; {peaks})")
