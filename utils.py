"""Configuration (dataclasses <- YAML + dotted overrides) and the runtime helpers both trainers share.

Every user mistake surfaces as a `UserError`, which `run_cli` prints as one line
`error: <what> — <how to fix>` and turns into exit code 2 — never a traceback.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import glob
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable

import torch
import yaml


class UserError(Exception):
    """A problem the user can fix; the message reads `<what> — <how to fix>`."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def run_cli(main: Callable[[], None], report: bool = True) -> None:
    """Run a script's main(): user errors become one stderr line (unless `report` is off) and exit code 2."""
    try:
        main()
    except UserError as err:
        if report:
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before training started: nothing to save
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as err:  # Inductor raises this at the first compiled call; any other error is a bug to show
        if "InvalidCxxCompiler" not in str(err):
            raise
        if report:
            print("error: torch.compile needs a working C++ compiler on a CPU and found none — install one "
                  "(e.g. apt install g++, or set CXX) or run without compiling (training.compile=false, no "
                  "--compile)", file=sys.stderr, flush=True)
        sys.exit(2)


# ----------------------------------------------------------------------------- configs

@dataclass
class ModelConfig:
    vocab_size: int = 4096
    embed_dim: int = 128
    num_heads: int = 4
    num_kv_heads: int = 4        # < num_heads turns on grouped-query attention
    ff_dim: int = 352            # SwiGLU hidden width; ~8/3 * embed_dim costs what a 4x GELU MLP does
    num_layers: int = 4
    max_seq_len: int = 256       # longest sequence RoPE and the KV cache are sized for
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0


@dataclass
class DataConfig:
    tokenizer_path: str = "tokenizer/bpe_4096.json"
    raw_text_path: str = "data/shakespeare.txt"   # a file, a directory of .txt files, or a glob
    context_length: int = 128
    batch_size: int = 16
    val_split: float = 0.05      # the last 5 % of the token stream is validation
    num_workers: int = 0


@dataclass
class TrainingConfig:
    epochs: int = 2
    max_steps: int = 1350        # optimizer steps; 0 = no cap (run all epochs)
    time_budget_s: float = 0.0   # > 0: train for this many wall-clock seconds instead of max_steps/epochs
    warmup_steps: int = 30
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    grad_clip: float = 1.0       # max global grad norm; 0 = off
    grad_accum_steps: int = 1
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 100
    checkpoint_path: str = "checkpoints/best_model.pth"
    snapshot_path: str = "checkpoints/snapshot.pth"
    logdir: str = "runs"
    run_name: str = ""           # TensorBoard sub-directory; "" = a timestamp
    sample_tokens: int = 64      # length of the text sample logged at each eval; 0 = none
    seed: int = 1337
    device: str = "auto"         # auto | cpu | cuda | mps
    precision: str = "auto"      # auto | fp32 | bf16 | fp16
    compile: str = "auto"        # auto (= on CUDA only) | true | false


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)


CHOICES = {"device": ("auto", "cpu", "cuda", "mps"), "precision": ("auto", "fp32", "bf16", "fp16"),
           "compile": ("auto", "true", "false")}


def _coerce(name: str, value: Any, expected: type) -> Any:
    """Check one value against its field type; YAML reads `3e-4` as a string, so floats accept numeric strings."""
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
    raise UserError(f"{name} must be {expected.__name__}, got {value!r} ({type(value).__name__}) — "
                    f"write a {expected.__name__} value for {name}")


def _set_field(section_obj: Any, section: str, key: str, value: Any) -> None:
    names = {f.name: f for f in dataclasses.fields(section_obj)}
    if key not in names:
        guess = difflib.get_close_matches(key, names, n=1)
        hint = f"did you mean '{section}.{guess[0]}'?" if guess else f"valid keys: {', '.join(names)}"
        raise UserError(f"unknown config key '{section}.{key}' — {hint}")
    expected = {"int": int, "float": float, "str": str, "bool": bool}[str(names[key].type)]
    if key in CHOICES and isinstance(value, bool):  # YAML reads `compile: true` as a bool
        value = str(value).lower()
    setattr(section_obj, key, _coerce(f"{section}.{key}", value, expected))


def config_from_dict(raw: Any, source: str = "config") -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source} must be a mapping of sections (model, data, training) — see configs.yaml")
    config = Config()
    sections = {f.name for f in dataclasses.fields(config)}
    for section, values in raw.items():
        if section not in sections:
            guess = difflib.get_close_matches(str(section), sections, n=1)
            hint = f"did you mean '{guess[0]}'?" if guess else "sections are model, data, training"
            raise UserError(f"unknown config section '{section}' in {source} — {hint}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UserError(f"section '{section}' in {source} must be a mapping of keys — indent its keys under it")
        for key, value in values.items():
            _set_field(getattr(config, section), section, str(key), value)
    return config


def config_to_dict(config: Config) -> dict:
    """Plain dict of primitives: what checkpoints store, so they load with weights_only=True."""
    return dataclasses.asdict(config)


def apply_overrides(config: Config, overrides: list[str]) -> None:
    """Apply `section.key=value` overrides; the value is parsed as YAML (`2`, `3.0e-4`, `true`, `my.txt`)."""
    for item in overrides:
        target, sep, text = item.partition("=")
        section, dot, key = target.partition(".")
        if not sep or not dot or not section or not key or "." in key:
            raise UserError(f"bad override '{item}' — write section.key=value, e.g. training.max_steps=30")
        if not hasattr(config, section) or section not in {f.name for f in dataclasses.fields(config)}:
            raise UserError(f"bad override '{item}': no section '{section}' — sections are model, data, training")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set_field(getattr(config, section), section, key, value)


def validate(config: Config) -> None:
    m, d, t = config.model, config.data, config.training
    positive = {"model.vocab_size": m.vocab_size, "model.embed_dim": m.embed_dim, "model.num_heads": m.num_heads,
                "model.num_kv_heads": m.num_kv_heads, "model.ff_dim": m.ff_dim, "model.num_layers": m.num_layers,
                "model.max_seq_len": m.max_seq_len, "model.rope_theta": m.rope_theta, "model.norm_eps": m.norm_eps,
                "data.context_length": d.context_length, "data.batch_size": d.batch_size, "training.lr": t.lr,
                "training.epochs": t.epochs, "training.grad_accum_steps": t.grad_accum_steps,
                "training.log_every": t.log_every, "training.eval_every": t.eval_every,
                "training.eval_batches": t.eval_batches, "training.save_every": t.save_every}
    for name, value in positive.items():
        if value <= 0:
            raise UserError(f"{name} must be > 0, got {value} — set a positive value")
    non_negative = {"training.max_steps": t.max_steps, "training.time_budget_s": t.time_budget_s,
                    "training.warmup_steps": t.warmup_steps,
                    "training.min_lr": t.min_lr, "training.weight_decay": t.weight_decay,
                    "training.grad_clip": t.grad_clip, "training.sample_tokens": t.sample_tokens,
                    "data.num_workers": d.num_workers}
    for name, value in non_negative.items():
        if value < 0:
            raise UserError(f"{name} must be >= 0, got {value} — set 0 or a positive value")
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"model.dropout must be in [0, 1), got {m.dropout} — use e.g. 0.0 or 0.1")
    if not 0.0 < d.val_split < 1.0:
        raise UserError(f"data.val_split must be in (0, 1), got {d.val_split} — use e.g. 0.05")
    if m.embed_dim % m.num_heads:
        raise UserError(f"model.embed_dim ({m.embed_dim}) is not divisible by model.num_heads ({m.num_heads}) — "
                        "pick a head count that divides the width")
    if (m.embed_dim // m.num_heads) % 2:
        raise UserError(f"head size embed_dim/num_heads = {m.embed_dim // m.num_heads} is odd — "
                        "RoPE rotates pairs of channels, so make it even")
    if m.num_heads % m.num_kv_heads:
        raise UserError(f"model.num_heads ({m.num_heads}) is not divisible by model.num_kv_heads "
                        f"({m.num_kv_heads}) — use a num_kv_heads that divides num_heads")
    if d.context_length > m.max_seq_len:
        raise UserError(f"data.context_length ({d.context_length}) > model.max_seq_len ({m.max_seq_len}) — "
                        "shorten the context or raise max_seq_len")
    if t.min_lr > t.lr:
        raise UserError(f"training.min_lr ({t.min_lr}) > training.lr ({t.lr}) — the cosine decays from lr down to "
                        "min_lr")
    for name, value in (("device", t.device), ("precision", t.precision), ("compile", t.compile)):
        if value not in CHOICES[name]:
            raise UserError(f"training.{name} is '{value}' — choose one of {', '.join(CHOICES[name])}")


def load_config(path: str, overrides: list[str] | None = None) -> Config:
    if not os.path.isfile(path):
        raise UserError(f"config file '{path}' not found — pass the path of a YAML config such as configs.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise UserError(f"malformed YAML in {path}{where}: {problem} — fix the syntax there") from None
    except UnicodeDecodeError:
        raise UserError(f"config file '{path}' is not UTF-8 text — save it as UTF-8 YAML") from None
    config = config_from_dict(raw, path)
    apply_overrides(config, overrides or [])
    validate(config)
    return config


def format_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip()


# ----------------------------------------------------------------------------- runtime

def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("training.device is 'cuda' but no CUDA GPU is visible — use device=auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("training.device is 'mps' but MPS is not available — use device=auto or cpu")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    """fp32 on CPU/MPS by default: CPUs without AVX512-BF16/AMX run bf16 matmuls many times slower, and with
    AVX512-BF16 bf16 autocast measured only ~15 % faster end to end (bench.py), not worth the rounding."""
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise UserError("training.precision=fp16 is not supported on CPU — use fp32 (or bf16 on a CPU with AMX)")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def enable_tf32(device: torch.device) -> None:
    """TF32 tensor-core matmuls for fp32 work on CUDA (ignored elsewhere): ~8x the fp32 rate for 10-bit mantissas."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def use_compile(setting: str, device: torch.device) -> bool:
    """torch.compile by default on CUDA only: on a CPU its minute of compiling eats a short run's gain."""
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_at(step: int, config: TrainingConfig, total_steps: int) -> float:
    """Linear warmup over warmup_steps, then cosine decay from lr to min_lr at total_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def measure_peak_flops(device: torch.device, precision: str, seconds: float = 0.5, windows: int = 5) -> float:
    """Matmul FLOP/s this device actually reaches — the denominator of MFU, never a datasheet constant.

    The best of `windows` timing windows: a neighbour's burst on a shared machine lowers some windows,
    never raises one, so the maximum is the stable estimate of what the hardware can do.
    """
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n = 8192 if device.type == "cuda" else 1024  # big enough that a GPU's launch overhead is noise
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the training RNG stream alone
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    a @ b
    sync(device)
    best = 0.0
    for _ in range(windows):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            a @ b
            calls += 1
            if device.type != "cpu":
                sync(device)
        best = max(best, 2 * n ** 3 * calls / (time.perf_counter() - start))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


# ----------------------------------------------------------------------------- checkpoint I/O

def check_writable(directory: str) -> None:
    """Fail before training, not an hour later, when outputs cannot be written under `directory`.

    Probes the nearest existing ancestor with a temp file that is removed at once: nothing is left behind.
    """
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"cannot create {directory}: {existing} is a file — choose another output path")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to {existing} ({err.strerror}) — choose a writable output path "
                        "or free some space") from None


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temp file beside `path`, fsync, then rename: a crash mid-write keeps the previous file.

    A temp file left by a killed writer (`.<name>.tmp-*`) is removed by the next write of the same path.
    """
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.tmp-*")):
        with contextlib.suppress(OSError):
            os.unlink(stale)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; outputs should read like any other file
        os.replace(tmp_path, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        if isinstance(err, OSError):  # disk full, quota, permissions changed mid-run
            raise UserError(f"could not write {path} ({err.strerror or err}); the previous version is intact — "
                            "free disk space or fix the permissions, then run the same command to resume") from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself survive a power cut (POSIX only)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_save(obj: dict, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """weights_only=True: a checkpoint may hold tensors and plain containers, never code to run."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' not found — train first (python train.py configs.yaml) or fix the path")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load checkpoint '{path}': {first_line[:160]} — the file is corrupt, truncated "
                        "or not an SLM checkpoint; use another checkpoint") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise UserError(f"'{path}' is not an SLM checkpoint (no model weights and config) — "
                        "pass a file written by train.py")
    return checkpoint
