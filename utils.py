"""Configuration (dataclasses <- YAML + dotted overrides) and small runtime helpers. Every user
mistake is a `UserError`: one line `error: <what> — <how to fix>`, exit code 2, no traceback."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import glob
import math
import os
import sys
import tempfile
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, ClassVar, Literal

import torch
import yaml


class UserError(Exception):
    """A problem the user can fix; the message reads `<what> — <how to fix>`."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def require(ok: bool, message: str) -> None:
    """Raise UserError(message) unless `ok`: the one-line form of every input check."""
    if not ok:
        raise UserError(message)


def run_cli(main: Callable[[], None], report: bool = True) -> None:
    """Run main(): a UserError becomes one stderr line (if `report`) and exit code 2."""
    try:
        main()
    except KeyboardInterrupt:  # before training started: nothing to save
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as err:  # Inductor raises InvalidCxxCompiler at the first compiled call
        if not isinstance(err, UserError) and "InvalidCxxCompiler" not in str(err):
            raise  # a bug: show it
        if report:
            print(f"error: {err}" if isinstance(err, UserError) else "error: torch.compile needs "
                  "a working C++ compiler on a CPU and found none — install one (apt install "
                  "g++, or set CXX) or do not compile (training.compile=false, no --compile)",
                  file=sys.stderr, flush=True)
        sys.exit(2)


def _describe(kind: Any) -> str:
    """A field type in the words of an error message."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return "one of " + ", ".join(yaml.safe_dump(choice).split("\n")[0] for choice in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    return " or ".join(_describe(option) for option in args) if args else kind.__name__


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """`value` as the field type `kind`; floats take numeric strings (YAML reads 3e-4 as one)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            with contextlib.suppress(UserError):
                return _coerce(name, value, option)
    elif origin is Literal:  # a true/false choice also takes the string older checkpoints hold
        for choice in args:
            if (type(value) is type(choice) and value == choice
                    or isinstance(choice, bool) and value == str(choice).lower()):
                return choice
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(f"{name}[{i}]", item, args[0]) for i, item in enumerate(value)]
    elif kind is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            with contextlib.suppress(ValueError):
                return float(value)
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    description = _describe(kind).replace("NoneType", "null")
    raise UserError(f"{name} must be {description}, got {value!r} — write {description} there")


def require_positive(section: Section, *names: str, zero_ok: bool = False) -> None:
    for name in names:
        value = getattr(section, name)
        require(value >= 0 if zero_ok else value > 0,
                f"{section.section}.{name} must be {'>=' if zero_ok else '>'} 0, got {value} — "
                f"set {'0 or ' if zero_ok else ''}a positive value")


class Section:
    """A config section: once built, its fields are coerced to their declared types and it
    checks its own rules (`validate`), so no invalid section exists, from YAML or from code."""
    section: ClassVar[str]

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(f"{self.section}.{f.name}", getattr(self, f.name), hints[f.name])
            setattr(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """The rules beyond field types, stated by each section beside its fields."""


@dataclass
class ModelConfig(Section):
    section: ClassVar[str] = "model"
    vocab_size: int = 4096
    embed_dim: int = 128
    num_heads: int = 4
    num_kv_heads: int = 4      # < num_heads turns on grouped-query attention
    ff_dim: int = 352          # SwiGLU hidden width; ~8/3 * embed_dim costs what a 4x GELU MLP does
    num_layers: int = 4
    max_seq_len: int = 256     # longest sequence the RoPE tables cover
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0

    def validate(self) -> None:
        require_positive(self, "vocab_size", "embed_dim", "num_heads", "num_kv_heads", "ff_dim",
                         "num_layers", "max_seq_len", "rope_theta", "norm_eps")
        require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout} "
                "— use e.g. 0.0 or 0.1")
        require(self.embed_dim % self.num_heads == 0, f"model.embed_dim ({self.embed_dim}) is not "
                f"divisible by model.num_heads ({self.num_heads}) — pick a head count that does")
        require((self.embed_dim // self.num_heads) % 2 == 0, "head size embed_dim/num_heads = "
                f"{self.embed_dim // self.num_heads} is odd — RoPE rotates channel pairs")
        require(self.num_heads % self.num_kv_heads == 0, f"model.num_heads ({self.num_heads}) is "
                f"not divisible by model.num_kv_heads ({self.num_kv_heads}) — use one that is")


@dataclass
class DataConfig(Section):
    section: ClassVar[str] = "data"
    tokenizer_path: str = "tokenizer/bpe_4096.json"
    raw_text_path: str = "data/shakespeare.txt"  # a file, a directory of .txt files, or a glob
    context_length: int = 128  # tokens a model trains on, and all it sees when generating
    batch_size: int = 16
    val_split: float = 0.05    # the last 5 % of the token stream is validation
    num_workers: int = 0

    def validate(self) -> None:
        require_positive(self, "context_length", "batch_size")
        require_positive(self, "num_workers", zero_ok=True)
        require(0 < self.val_split < 1,
                f"data.val_split must be in (0, 1), got {self.val_split} — use e.g. 0.05")


@dataclass
class TrainingConfig(Section):
    section: ClassVar[str] = "training"
    epochs: int = 2
    max_steps: int = 1350        # optimizer steps; 0 = no cap (run all epochs)
    time_budget_s: float = 0.0   # > 0: train this many wall-clock seconds instead of max_steps
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
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: Literal["auto", True, False] = "auto"  # auto = on CUDA only

    def validate(self) -> None:
        require_positive(self, "lr", "epochs", "grad_accum_steps", "log_every", "eval_every",
                         "eval_batches", "save_every")
        require_positive(self, "max_steps", "time_budget_s", "warmup_steps", "min_lr",
                         "weight_decay", "grad_clip", "sample_tokens", zero_ok=True)
        require(self.min_lr <= self.lr, f"training.min_lr ({self.min_lr}) > training.lr "
                f"({self.lr}) — the cosine decays from lr down to min_lr")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        require(self.data.context_length <= self.model.max_seq_len,
                f"data.context_length ({self.data.context_length}) > model.max_seq_len "
                f"({self.model.max_seq_len}) — shorten the context or raise max_seq_len")


SECTIONS: dict[str, type[Section]] = typing.get_type_hints(Config)


def _refuse_unknown(names: Any, known: list[str], what: str, prefix: str = "") -> None:
    for name in names:
        if name not in known:
            guess = difflib.get_close_matches(str(name), known, n=1)
            hint = f"did you mean '{prefix}{guess[0]}'?" if guess else f"valid: {', '.join(known)}"
            raise UserError(f"unknown config {what} '{prefix}{name}' — {hint}")


def config_from_dict(raw: Any, source: str = "config", overrides: list[str] = ()) -> Config:
    """A Config from parsed YAML (or a checkpoint's dict) and section.key=YAML-value overrides."""
    require(raw is None or isinstance(raw, dict),
            f"{source} must be a mapping of sections (model, data, training) — see configs.yaml")
    values: dict[str, dict] = {name: {} for name in SECTIONS}
    _refuse_unknown(raw or {}, list(SECTIONS), "section")
    for name, section in (raw or {}).items():
        require(section is None or isinstance(section, dict), f"section '{name}' in {source} "
                "must be a mapping of keys — indent its keys under it")
        values[name].update(section or {})
    for item in overrides:
        target, sep, text = item.partition("=")
        name, dot, key = target.partition(".")
        require(bool(sep and dot and name and key) and "." not in key,
                f"bad override '{item}' — write section.key=value, e.g. training.max_steps=30")
        require(name in SECTIONS, f"bad override '{item}': no section '{name}' — "
                "sections are model, data, training")
        try:
            values[name][key] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            values[name][key] = text
    for name, kind in SECTIONS.items():
        _refuse_unknown(values[name], [f.name for f in dataclasses.fields(kind)], "key", f"{name}.")
    return Config(**{name: kind(**values[name]) for name, kind in SECTIONS.items()})


def config_to_dict(config: Config) -> dict:
    """Plain dict of primitives: what checkpoints store, so they load with weights_only=True."""
    return dataclasses.asdict(config)


def load_config(path: str, overrides: list[str] | None = None) -> Config:
    require(os.path.isfile(path), f"config file '{path}' not found — pass a YAML config such as "
            "configs.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise UserError(f"malformed YAML in {path}{where}: {problem} — fix it there") from None
    except UnicodeDecodeError:
        raise UserError(f"config file '{path}' is not UTF-8 — save it as UTF-8") from None
    return config_from_dict(raw, path, overrides or [])


def parse_config_cli(description: str) -> Config:
    """The command line of the training scripts: a YAML path, then section.key=value overrides."""
    parser = argparse.ArgumentParser(description=description, epilog="Overrides are typed like "
                                     "YAML, e.g. training.max_steps=30 data.raw_text_path=my.txt")
    parser.add_argument("config", help="YAML config, e.g. configs.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override one config value")
    args = parser.parse_args()
    return load_config(args.config, args.overrides)


def format_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip()


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
    if name != "auto":
        require(name != "fp16" or device.type != "cpu", "training.precision=fp16 is not "
                "supported on CPU — use fp32 (or bf16 on a CPU with AMX)")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def use_compile(setting: Literal["auto", True, False], device: torch.device) -> bool:
    """torch.compile by default on CUDA only: on a CPU its compile time eats a short run's gain."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def lr_at(step: int, progress: float, t: TrainingConfig) -> float:
    """Linear warmup for warmup_steps, then a cosine from lr to min_lr as `progress` goes 0 -> 1."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (t.lr - t.min_lr)


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


def check_writable(*directories: str) -> None:
    """Fail now, not an hour into training, if a directory cannot be written; leaves nothing."""
    for directory in directories:
        existing = os.path.abspath(directory)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        require(os.path.isdir(existing),
                f"cannot create {directory}: {existing} is a file — choose another output path")
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
                pass
        except OSError as err:
            raise UserError(f"cannot write to {existing} ({err.strerror}) — choose a writable "
                            "output path or free some space") from None


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write a temp file beside `path`, fsync, rename: a crash mid-write keeps the previous file.
    A temp file a killed writer left (`.<name>.tmp-*`) goes at the next write of the path."""
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
            raise UserError(f"could not write {path} ({err.strerror or err}); the previous "
                            "version is intact — free disk space or fix the permissions, then "
                            "run the same command to resume") from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself survive a power cut (POSIX)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_save(obj: dict, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """weights_only=True: a checkpoint may hold tensors and plain containers, never code."""
    require(os.path.isfile(path), f"checkpoint '{path}' not found — train first "
            "(python train.py configs.yaml) or fix the path")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError or EOFError, by the kind of damage
        first_line = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise UserError(f"cannot load checkpoint '{path}': {first_line[:160]} — the file is "
                        "corrupt, truncated or not an SLM checkpoint; use another one") from None
    require(isinstance(checkpoint, dict) and "model" in checkpoint and "config" in checkpoint,
            f"'{path}' is not an SLM checkpoint (no weights and config) — pass one from train.py")
    return checkpoint
