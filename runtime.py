"""The device in hand: which one to use, the precision and autocast it runs in, whether to
compile, the allocator setting for CPU training, and the matmul peak MFU is measured against."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Literal

import torch

from files import atomic_write
from utils import Config, UserError, host_memory_bytes, require, warn


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


def memory_per_process(device: torch.device) -> tuple[int, str]:
    """The bytes one training process may fill, and whose they are: a GPU's own memory, or
    this host's, shared by the processes torchrun started on it (MPS shares it too)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, "its GPU"
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return (host_memory_bytes() // processes,
            f"this host's memory ({processes} process(es) share it)")


def keep_freed_memory() -> None:
    """Keep freed blocks of up to 32 MiB in the process (glibc malloc): by default it returns
    them to the OS at once, so each CPU training step page-faults its activations back in,
    zero-filled by the kernel. Elsewhere a no-op."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform == "linux" else None
    if mallopt is not None:
        mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks this small come from the heap
        mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: free heap top kept up to this size


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def use_compile(setting: Literal["auto", True, False], device: torch.device) -> bool:
    """torch.compile by default on CUDA only: on a CPU its compile time eats a short run's gain."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISION_DTYPES[precision]
    return (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else
            contextlib.nullcontext())


def measure_peak_flops(device: torch.device, precision: str, seconds: float = 0.5,
                       windows: int = 5) -> float:
    """Matmul FLOP/s this device reaches, the denominator of MFU: the best of `windows` timings,
    since a neighbour's burst on a shared machine can lower a window but never raise one."""
    dtype = PRECISION_DTYPES[precision]
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


def read_later(value: torch.Tensor) -> Callable[[], float]:
    """A 0-d tensor's value for the host, without waiting for the device now: on CUDA a copy is
    queued behind the work that computes it, and calling the result waits for that copy alone
    (long done a step later); elsewhere the value is read at once."""
    if value.device.type != "cuda":
        now = value.item()
        return lambda: now
    host = torch.empty((), dtype=value.dtype, pin_memory=True)
    host.copy_(value, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait_and_read() -> float:
        copied.synchronize()
        return host.item()

    return wait_and_read


BF16_PEAK_GATE = 1.5    # bf16 matmul peak / fp32's below which a CPU's bf16 is not used
BF16_MIN_SPEEDUP = 1.3  # how much faster (median step) bf16 must train this model to be chosen
BUSY_SHARE = 0.1        # others' share of the CPUs during the timing above which it is not kept


def bf16_is_fast(device: torch.device, peak_flops: Callable[[str], float]) -> bool:
    """Whether bf16 matmuls pay here: on a GPU (tensor cores), and on a CPU whose measured bf16
    peak is at least BF16_PEAK_GATE x fp32's (AVX512-BF16 or AMX; AVX2 alone emulates bf16)."""
    return device.type != "cpu" or peak_flops("bf16") >= BF16_PEAK_GATE * peak_flops("fp32")


def decide_newton_schulz_dtype(device: torch.device, peak_flops: Callable[[str], float]) -> str:
    """Muon's orthogonalisation dtype: bf16 where bf16 matmuls are fast (bf16_is_fast), else
    fp32. On a CPU the peak measurement is decided once per CPU, thread count and torch
    (decided_once): a busy moment cannot give two runs on one machine different dtypes."""
    if device.type != "cpu":
        return "bf16"
    key = {"decision": "newton_schulz_dtype", **cpu_identity(), "rule": BF16_PEAK_GATE}
    return decided_once(key, lambda: ("bf16" if bf16_is_fast(device, peak_flops) else "fp32",
                                      "bf16 matmul peak against fp32's", True))[0]


def choose_cpu_precision(peak_flops: Callable[[str], float],
                         timed_steps: Callable[[], tuple[dict[str, list[float]], float]]
                         ) -> tuple[str, str, bool]:
    """`precision: auto` on a CPU, by measurement: fp32 unless bf16 passes the peak gate
    (bf16_is_fast) and the median of this model's training steps in bf16 is at least
    BF16_MIN_SPEEDUP x faster than in fp32. `timed_steps` -> (seconds of steps by precision,
    taken in turns so a neighbour's burst slows both alike; the share of the CPUs other
    processes took meanwhile). A timing taken while others held more than BUSY_SHARE of the
    CPUs is not trusted: fp32 for now. -> (precision, what was measured, whether to keep it)"""
    fp32_peak, bf16_peak = peak_flops("fp32"), peak_flops("bf16")
    peaks = f"matmul peak bf16 {bf16_peak / 1e9:,.0f} / fp32 {fp32_peak / 1e9:,.0f} GFLOP/s"
    if not bf16_is_fast(torch.device("cpu"), peak_flops):
        return "fp32", (f"{peaks} = {bf16_peak / fp32_peak:.2f}x, below {BF16_PEAK_GATE}x: "
                        "bf16 not timed"), True
    timings, others_share = timed_steps()
    if others_share > BUSY_SHARE:
        return "fp32", (f"other processes took {others_share:.0%} of the CPUs while fp32 and "
                        "bf16 were timed: fp32 until a quiet start times them"), False
    seconds = {name: statistics.median(times) for name, times in timings.items()}
    speedup = seconds["fp32"] / seconds["bf16"]
    choice = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    return choice, (f"this model's median training step: fp32 {1000 * seconds['fp32']:,.0f} ms, "
                    f"bf16 {1000 * seconds['bf16']:,.0f} ms = {speedup:.2f}x, bf16 needs "
                    f"{BF16_MIN_SPEEDUP}x; {peaks}"), True


def with_others_share(measure: Callable[[], dict]) -> tuple[dict, float]:
    """measure()'s result, and the share of this machine's CPUs that other processes (and, in
    a VM, the hypervisor's other guests) kept busy meanwhile; 0 where /proc/stat is missing."""
    def busy_and_own_seconds() -> tuple[float, float]:
        with open("/proc/stat", encoding="ascii") as stat:  # cpu user nice system idle ...
            user, nice, system, _, _, irq, softirq, steal = map(int, stat.readline().split()[1:9])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        return busy, sum(os.times()[:2])  # this process's user + system time, all threads

    if not os.path.exists("/proc/stat"):
        return measure(), 0.0
    (busy, own), start = busy_and_own_seconds(), time.perf_counter()
    result = measure()
    (busy_after, own_after), seconds = busy_and_own_seconds(), time.perf_counter() - start
    others = (busy_after - busy) - (own_after - own)
    return result, max(0.0, others) / (seconds * (os.cpu_count() or 1))


def decide_cpu_precision(config: Config, newton_schulz: str, peak_flops: Callable[[str], float],
                         step_seconds: Callable[[], dict[str, list[float]]]) -> tuple[str, str]:
    """`precision: auto` for a fresh CPU run: choose_cpu_precision's answer from the first time
    this CPU, thread count, torch, model, batch and optimizer met on this machine (decided_once),
    and the line that says so. -> (precision, line)"""
    key = {**cpu_identity(), "model": dataclasses.asdict(config.model),
           "batch_size": config.data.batch_size,
           "context_length": config.data.context_length, "optimizer": config.training.optimizer,
           "newton_schulz": newton_schulz, "rule": [BF16_PEAK_GATE, BF16_MIN_SPEEDUP]}
    t = config.training
    if t.lora_rank:  # a LoRA step costs another mix of work than a full one
        key["lora"] = [t.lora_rank, sorted(t.lora_targets)]
    choice, reason, kept = decided_once(key, lambda: choose_cpu_precision(
        peak_flops, lambda: with_others_share(step_seconds)))
    where = (f"decided once for this CPU, model and batch, kept in {decisions_path()}" if kept
             else "not kept")
    return choice, (f"precision auto: {choice} ({reason}); {where} — pin it with "
                    "training.precision=fp32 or bf16")


def cpu_identity() -> dict:
    """What a CPU measurement depends on: the CPU, the instructions torch and oneDNN may use
    (ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA can hold them back), threads and torch."""
    return {"cpu": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def decisions_path() -> str:
    """Where measured choices are kept for this user: the XDG cache directory, not the data's."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "slm", "decisions.json")


def decided_once(key: dict,
                 decide: Callable[[], tuple[str, str, bool]]) -> tuple[str, str, bool]:
    """decide()'s (choice, reason, trusted) the first time `key` is met on this machine, kept in
    decisions_path() when trusted and read from there ever after: a measurement near its
    threshold cannot flip between starts. Processes deciding at once wait for each other under
    a lock, so one measures and the rest read its answer. -> (choice, reason, kept)"""
    path, entry = decisions_path(), json.dumps(key, sort_keys=True)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock = open(path + ".lock", "a", encoding="utf-8")
    except OSError as err:
        warn(f"cannot keep measured choices in {path} ({err.strerror}); measuring at each start")
        choice, reason, _ = decide()
        return choice, reason, False
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        decisions = read_decisions(path)
        if entry in decisions:
            choice, reason = decisions[entry]
            return choice, reason, True
        choice, reason, trusted = decide()
        if trusted:
            decisions[entry] = [choice, reason]
            try:
                atomic_write(path, lambda f: f.write(json.dumps(decisions, indent=1).encode()))
            except UserError as err:
                warn(f"{err}; measuring again at the next start")
                trusted = False
    return choice, reason, trusted


def read_decisions(path: str) -> dict[str, list[str]]:
    """decisions_path()'s contents; a missing file is none, an unreadable one is warned of and
    measured anew."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            decisions = json.load(f)
        require(isinstance(decisions, dict), "not a JSON object")
        return decisions
    except (OSError, ValueError, UserError) as err:
        warn(f"ignoring {path} ({err}): its choices are measured again and it is rewritten")
        return {}
