"""Configuration (dataclasses <- YAML + dotted overrides), the command-line helpers and the error
runner. Every user mistake is a `UserError`: one line `error: <what> — <how to fix>`, exit code
2, no traceback."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import yaml
from tqdm import tqdm


class UserError(Exception):
    """A problem the user can fix; the message reads `<what> — <how to fix>`."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def host_memory_bytes() -> int:
    """This machine's physical memory, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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
        for bar in list(getattr(tqdm, "_instances", ())):  # the error goes on a line of its own
            bar.close()
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
            with contextlib.suppress(ValueError, OverflowError):
                return float(value)
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    description = _describe(kind).replace("NoneType", "null")
    if kind is str and isinstance(value, (int, float, bool)):  # YAML read 2024 as a number
        raise UserError(f"{name} must be a string, got {value!r} — quote it: '{value}'")
    raise UserError(f"{name} must be {description}, got {value!r} — write {description} there")


def require_within(name: str, value: float, low: float, high: float, open_low: bool = False,
                   open_high: bool = False) -> None:
    """`value` lies in [low, high] (an open end excludes it); nan and inf never do."""
    ok = ((isinstance(value, int) or math.isfinite(value))
          and (low < value if open_low else low <= value)
          and (value < high if open_high else value <= high))
    low_text, high_text = (f"{end:g}" if isinstance(end, float) else str(end)
                           for end in (low, high))
    interval = f"{'(' if open_low else '['}{low_text}, {high_text}{')' if open_high else ']'}"
    require(ok, f"{name} must be in {interval}, got {value!r} — pick a value in that range")


def within(default: float, low: float, high: float, open_low: bool = False,
           open_high: bool = False) -> Any:
    """A numeric config field and the range its value must lie in, checked on construction."""
    return field(default=default, metadata={"range": (low, high, open_low, open_high)})


MAX_COUNT = 2**31 - 1  # counts, steps and sizes stay int32: every tensor index and op takes them
MAX_SEED = 2**63 - 1   # torch seeds are 64-bit; seed + epoch and seed + rank must still fit
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Section:
    """A config section: once built, its fields are coerced to their declared types, numbers
    lie in their declared ranges and it checks its own rules (`validate`), so no invalid
    section exists, from YAML, overrides, checkpoints or code."""
    section: ClassVar[str]

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            name = f"{self.section}.{f.name}"
            value = _coerce(name, getattr(self, f.name), hints[f.name])
            if "range" in f.metadata and value is not None:
                require_within(name, value, *f.metadata["range"])
            setattr(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """The rules beyond field types, stated by each section beside its fields."""


@dataclass
class ModelConfig(Section):
    section: ClassVar[str] = "model"
    vocab_size: int = within(4096, 2, 1 << 24)
    embed_dim: int = within(128, 2, 1 << 16)
    num_heads: int = within(4, 1, 1 << 12)
    num_kv_heads: int = within(4, 1, 1 << 12)  # < num_heads turns on grouped-query attention
    ff_dim: int = within(352, 1, 1 << 18)  # SwiGLU width; ~8/3 * embed_dim costs a 4x GELU MLP
    num_layers: int = within(4, 1, 1 << 12)
    max_seq_len: int = within(256, 1, 1 << 20)  # longest sequence the RoPE tables cover
    rope_theta: float = within(10000.0, 0, 1e12, open_low=True)
    norm_eps: float = within(1e-5, 0, 1, open_low=True)
    dropout: float = within(0.0, 0, 1, open_high=True)
    tie_embeddings: bool = True  # the output head reuses the token embedding matrix

    def validate(self) -> None:
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
    raw_text_path: str = "data/shakespeare.txt"  # a file, a directory of corpus files, a glob
    text_field: str = "text"   # the JSONL field / parquet column that holds each document
    cache_dir: str = ""        # where the token cache goes; "" = beside the text
    context_length: int = within(128, 1, 1 << 20)  # tokens trained on; all generation sees
    batch_size: int = within(16, 1, 1 << 16)
    val_split: float = within(0.05, 0, 1, open_low=True, open_high=True)  # the stream's tail
    num_workers: int = within(0, 0, 256)


@dataclass
class TrainingConfig(Section):
    section: ClassVar[str] = "training"
    epochs: int = within(2, 1, MAX_COUNT)
    max_steps: int = within(1350, 0, MAX_COUNT)  # optimizer steps; 0 = no cap (run all epochs)
    time_budget_s: float = within(0.0, 0, 1e8)   # > 0: train this long instead of max_steps
    warmup_steps: int = within(30, 0, MAX_COUNT)
    lr: float = within(1e-2, 0, 1000, open_low=True)  # tuned for Muon; AdamW's was 3e-3
    min_lr_ratio: float = within(0.03, 0, 1)  # the schedule's floor, as a share of lr
    min_lr: float | None = within(None, 0, 1000)  # an absolute floor instead; null = the ratio
    warmdown_frac: float = within(0.0, 0, 1)  # last share of the decay: linear to min_lr; 0 = off
    weight_decay: float = within(0.1, 0, 100)
    optimizer: Literal["adamw", "muon"] = "muon"  # Muon on the blocks' matrices, AdamW elsewhere
    grad_clip: float = within(1.0, 0, 1e9)       # max global grad norm; 0 = off
    grad_accum_steps: int = within(1, 1, 1 << 16)
    log_every: int = within(10, 1, MAX_COUNT)
    eval_every: int = within(100, 1, MAX_COUNT)
    eval_batches: int = within(20, 1, 1 << 20)
    eval_tasks: list[str] = field(default_factory=list)  # scored at each eval: names or JSONL
    save_every: int = within(100, 1, MAX_COUNT)
    keep_snapshots: int = within(2, 1, 1000)  # complete saves kept: a damaged newest falls back
    checkpoint_path: str = "checkpoints/best_model.pth"
    snapshot_path: str = "checkpoints/snapshot.pth"
    logdir: str = "runs"
    init_from: str = ""          # a Hugging Face Llama directory or SLM checkpoint to fine-tune
    lora_rank: int = within(0, 0, 1 << 16)  # > 0: train rank-r adapters (lora.py), base frozen
    lora_alpha: float | None = within(None, 0, 1e6, open_low=True)  # scale alpha/r; null = 2 x r
    lora_dropout: float = within(0.0, 0, 1, open_high=True)  # on the adapters' inputs
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    init_adapter: str = ""       # a PEFT adapter directory over init_from to train on from
    run_name: str = ""           # TensorBoard sub-directory; "" = a timestamp
    sample_tokens: int = within(64, 0, 1 << 20)  # sample logged at each eval; 0 = none
    seed: int = within(1337, 0, MAX_SEED)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: Literal["auto", True, False] = "auto"  # auto = on CUDA only
    parallelism: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate, or shard (FSDP2)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    dist_timeout_s: float = within(1800.0, 1, 1e7)  # torchrun: how long a collective may wait

    @property
    def floor_lr(self) -> float:
        """Where the schedule ends: min_lr if set, else min_lr_ratio x lr."""
        return self.lr * self.min_lr_ratio if self.min_lr is None else self.min_lr

    @property
    def lora_scale(self) -> float:
        """What the adapters' product is multiplied by: lora_alpha / lora_rank."""
        return (self.lora_alpha or 2.0 * self.lora_rank) / max(1, self.lora_rank)

    def validate(self) -> None:
        require(self.floor_lr <= self.lr, f"training.min_lr ({self.min_lr}) > training.lr "
                f"({self.lr}) — the schedule decays from lr down to min_lr; lower min_lr, or "
                "set it to null to use training.min_lr_ratio")
        require(os.path.abspath(self.checkpoint_path) != os.path.abspath(self.snapshot_path),
                f"training.checkpoint_path and training.snapshot_path are both "
                f"{self.snapshot_path}: each save would overwrite the other — give them "
                "different paths")
        require(not self.init_from or os.path.abspath(self.init_from)
                != os.path.abspath(self.checkpoint_path), f"training.init_from and "
                f"training.checkpoint_path are both {self.init_from}: the run would overwrite "
                "its own source — give training.checkpoint_path (and snapshot_path) new paths")
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        require(bool(self.lora_targets) and not unknown, f"training.lora_targets names "
                f"{unknown or 'no'} linears SLM's LoRA adapts — name one or more of "
                f"{', '.join(LORA_TARGETS)}")
        require(not (self.lora_rank or self.init_adapter) or bool(self.init_from),
                "LoRA trains adapters beside a trained model's frozen weights — set "
                "training.init_from to that model (an SLM checkpoint or Hugging Face directory)")


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
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        text_field = typing.get_type_hints(SECTIONS[name]).get(key) is str
        values[name][key] = text if text_field and not isinstance(value, str) else value
    for name, kind in SECTIONS.items():
        _refuse_unknown(values[name], [f.name for f in dataclasses.fields(kind)], "key", f"{name}.")
    return Config(**{name: kind(**values[name]) for name, kind in SECTIONS.items()})


def stored_config(raw: Any, path: str) -> Config:
    """The config a checkpoint or export holds, validated as a YAML one is."""
    try:
        return config_from_dict(raw, path)
    except UserError as err:
        raise UserError(f"{path} holds an invalid config ({str(err).split(' — ')[0]}) — it is "
                        "damaged or was not written by SLM; use another checkpoint") from None


def config_to_dict(config: Config) -> dict:
    """Plain dict of primitives: what checkpoints store, so they load with weights_only=True."""
    return dataclasses.asdict(config)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently,
    so a second `model:` block would replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key '{key}' (keep one)", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str, overrides: list[str] | None = None) -> Config:
    require(os.path.isfile(path), f"config file '{path}' not found — pass a YAML config such as "
            "configs.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise UserError(f"malformed YAML in {path}{where}: {problem} — fix it there") from None
    except UnicodeDecodeError:
        raise UserError(f"config file '{path}' is not UTF-8 — save it as UTF-8") from None
    require(raw is not None, f"config file '{path}' is empty — write the model, data and "
            "training sections (copy configs.yaml), or pass configs.yaml itself")
    return config_from_dict(raw, path, overrides or [])


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes end as every other does: one `error:` line, exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} — see {self.prog} --help")


def parse_config_cli(description: str) -> tuple[Config, set[str]]:
    """The command line of the training scripts: a YAML path, then section.key=value overrides.
    -> the config, and the keys the command line set (section.key)."""
    parser = ArgumentParser(description=description, epilog="Overrides are typed like "
                                     "YAML, e.g. training.max_steps=30 data.raw_text_path=my.txt")
    parser.add_argument("config", help="YAML config, e.g. configs.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override one config value")
    args = parser.parse_args()
    return load_config(args.config, args.overrides), {item.partition("=")[0]
                                                      for item in args.overrides}


def format_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip()
