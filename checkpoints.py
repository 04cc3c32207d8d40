"""Checkpoints: what a path holds (an SLM checkpoint or file snapshot, or a Hugging Face Llama
directory), weights loaded into the model, a trained model loaded for use (infer.py, eval.py),
the best checkpoint, and a fine-tuning run's adoption of its pretrained source. Files are
written crash-safely by files.py; snapshots.py writes and resumes snapshots.

A best checkpoint is {"model", "config", "tokenizer", "chat", "step", "run_id", "val_loss",
"val_bpb"}. "tokenizer" is the fingerprint of the tokenizer the weights were trained with,
"chat" the chat template and special tokens (chat.ChatFormat), "run_id" the run that wrote it.
A LoRA run's "model" holds its adapters only, and "base" {"path", "absolute", "fingerprint"}
names the frozen base they apply to: loading one merges them into a copy of the base.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import sys
from dataclasses import dataclass
from typing import Collection

import torch

from bpe import BPETokenizer, load_tokenizer
from chat import stored_chat_format
from files import atomic_write, check_writable
from hf import load_hf_directory, read_peft_settings
from lora import adapter_weights, fingerprint, is_adapter, merged
from model import Transformer
from runtime import pick_device, setup_precision
from utils import (Config, ModelConfig, TrainingConfig, UserError, config_to_dict, load_config,
                   require, stored_config)

SHARDED_LATEST = "latest"  # in a sharded snapshot's directory: its newest complete save


def is_sharded_snapshot(path: str) -> bool:
    """A directory of an FSDP run's saves: LATEST, or a save directory (step-*) in it."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, SHARDED_LATEST)) or bool(
        glob.glob(os.path.join(glob.escape(path), "step-*", ""))))


def load_checkpoint(path: str, map_location: str | torch.device = "cpu",
                    weights: bool = True, merge_adapter: bool = True) -> dict:
    """What `path` holds, as a checkpoint dict with "config" and, if `weights`, "model": a
    Hugging Face Llama directory (read by hf.py, in fp32), else an SLM checkpoint or snapshot
    file, read with weights_only=True (tensors and plain containers, never code). Without
    `weights`, no weight is read into memory. A LoRA checkpoint's "model" is its adapter merged
    into its base, unless not `merge_adapter`."""
    require(not is_sharded_snapshot(path), f"{path} is a sharded "
            "training snapshot (an FSDP run's) — use the run's best checkpoint "
            "(training.checkpoint_path), one file, or resume training from the snapshot")
    if os.path.isdir(path):
        return load_hf_directory(path, weights)
    require(os.path.isfile(path), f"checkpoint '{path}' not found — train first "
            "(python train.py configs.yaml) or fix the path")
    try:  # mmap leaves the tensors on disk until they are used
        checkpoint = torch.load(path, map_location=map_location, weights_only=True,
                                mmap=not weights)
    except Exception as err:  # UnpicklingError, RuntimeError or EOFError, by the kind of damage
        first_line = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise UserError(f"cannot load checkpoint '{path}': {first_line[:160]} — the file is "
                        "corrupt, truncated or not an SLM checkpoint; use another one") from None
    require(isinstance(checkpoint, dict) and "model" in checkpoint and "config" in checkpoint,
            f"'{path}' is not an SLM checkpoint (no weights and config) — pass one from train.py")
    if weights and merge_adapter and "base" in checkpoint:
        return {**checkpoint, "model": merged_into_base(checkpoint, path)}
    return checkpoint


def base_reference(path: str, base_fingerprint: str) -> dict:
    """What a LoRA checkpoint records of its base: where it is, and its weights' fingerprint."""
    return {"path": path, "absolute": os.path.abspath(path), "fingerprint": base_fingerprint}


def load_base(checkpoint: dict, source: str) -> dict:
    """The base of LoRA checkpoint `source`, as a checkpoint dict whose weights are checked
    against the fingerprint `source` recorded. Its path is tried as written, then absolute."""
    base = checkpoint["base"]
    found = list(dict.fromkeys(path for path in (base["path"], base["absolute"])
                               if os.path.exists(path)))
    require(bool(found), f"{source} is a LoRA adapter over {base['path']}, which is missing — "
            "put that base model back (the adapter holds only the change to it)")
    tied = stored_config(checkpoint["config"], source).model.tie_embeddings
    for path in found:  # run from elsewhere, the relative path may name another file
        loaded = load_checkpoint(path)
        if fingerprint(loaded["model"], tied) == base["fingerprint"]:
            return loaded
    raise UserError(f"{found[0]} has changed since the LoRA adapter {source} was trained over "
                    "it (its weights differ) — restore the base it was trained on")


def merged_into_base(checkpoint: dict, source: str) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint's weights: its adapter merged into its (checked) base's."""
    scale = stored_config(checkpoint["config"], source).training.lora_scale
    return merged(load_base(checkpoint, source)["model"], adapter_weights(checkpoint["model"]),
                  scale)


def model_record(weights: dict[str, torch.Tensor], config: Config, tokenizer: BPETokenizer,
                 base_fingerprint: str = "") -> dict:
    """What every checkpoint holds: the weights (a LoRA run's: its adapters), the config, the
    tokenizer's fingerprint and the chat format (template and special tokens) conversations
    are rendered with; a LoRA run's also its base (base_reference)."""
    t = config.training
    base = {"base": base_reference(t.init_from, base_fingerprint)} if t.lora_rank else {}
    return {"model": weights, "config": config_to_dict(config),
            "tokenizer": tokenizer.fingerprint, "chat": dataclasses.asdict(tokenizer.chat),
            **base}


def save_checkpoint(contents: dict, path: str) -> None:
    atomic_write(path, lambda f: torch.save(contents, f))


def check_outputs(t: TrainingConfig) -> None:
    """Before any work, reading nothing: the output directories can be written, and the best
    checkpoint and snapshot paths name files (an FSDP snapshot: a directory)."""
    check_writable(os.path.dirname(os.path.abspath(t.checkpoint_path)),
                   os.path.dirname(os.path.abspath(t.snapshot_path)), t.logdir)
    example = os.path.join(t.checkpoint_path, os.path.basename(TrainingConfig.checkpoint_path))
    require(not os.path.isdir(t.checkpoint_path), f"training.checkpoint_path "
            f"'{t.checkpoint_path}' is a directory — give a file path, e.g. {example}")
    if t.parallelism == "fsdp":  # a directory of shards
        require(not os.path.isfile(t.snapshot_path), f"training.snapshot_path "
                f"'{t.snapshot_path}' is a file, where an FSDP run keeps a directory of shards — "
                "resume a single-file snapshot with training.parallelism=ddp, or give a new path")
    else:
        require(not os.path.isdir(t.snapshot_path) or is_sharded_snapshot(t.snapshot_path),
                f"training.snapshot_path '{t.snapshot_path}' is a directory — give a file path, "
                "e.g. "
                f"{os.path.join(t.snapshot_path, os.path.basename(TrainingConfig.snapshot_path))}")


def check_best_checkpoint(path: str, run_id: str, resumed: bool) -> None:
    """training.checkpoint_path holds nothing yet, or this run's own best model: training
    replaces it, and a run that lost its history (a fresh start) must not replace another
    run's. `run_id`: this run's, kept in its snapshot and its best checkpoint."""
    if not os.path.isfile(path):
        return
    try:
        best = load_checkpoint(path, weights=False)
    except UserError:
        raise UserError(f"training.checkpoint_path '{path}' exists and is not an SLM checkpoint "
                        "(or is damaged) — move it away or choose another path; training would "
                        "overwrite it") from None
    how = "resuming its snapshot" if resumed else "starting from step 0"
    require(best.get("run_id", "") == run_id, f"training.checkpoint_path '{path}' holds "
            f"another run's best model (its step {best.get('step')}), which this run, {how}, "
            "would replace — move the file away, or set another training.checkpoint_path")


def load_weights(model: Transformer, checkpoint: dict, source: str) -> None:
    """Load checkpoint["model"], refusing another architecture with the differences named."""
    stored = checkpoint["config"] if isinstance(checkpoint.get("config"), dict) else {}
    saved = stored.get("model", {}) if isinstance(stored.get("model"), dict) else {}
    defaults = dataclasses.asdict(ModelConfig())  # what a key older checkpoints lack meant
    differences = [f"{key}={saved.get(key, defaults[key])!r} vs {value!r}"
                   for key, value in dataclasses.asdict(model.config).items()
                   if key != "dropout" and saved.get(key, defaults[key]) != value]
    if differences:
        raise UserError(f"{source} was trained with a different model ({', '.join(differences)},"
                        " checkpoint vs config) — use the config it was trained with or start a "
                        "new run elsewhere")
    state = checkpoint["model"]
    adapter_only = bool(state) and all(is_adapter(name) for name in state)
    try:  # a LoRA run's own save, or a PEFT adapter: its adapters only, each fitting exactly
        loaded = model.load_state_dict(state, strict=not adapter_only)
    except (RuntimeError, KeyError, TypeError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s)") else lines[0]
        raise UserError(f"{source} does not fit the model ({detail[:160]}) — it is damaged, "
                        "from another program, or an adapter of another base") from None
    misfits = [*loaded.unexpected_keys,
               *(name for name in loaded.missing_keys if is_adapter(name))]
    if misfits:
        raise UserError(f"{source} does not fit the model's adapters ({misfits[0]} is "
                        f"{'not one of them' if loaded.unexpected_keys else 'missing'}) — it was "
                        "trained with other LoRA settings or over another base")


def check_tokenizer(checkpoint: dict, tokenizer: BPETokenizer, source: str, fix: str) -> None:
    """`tokenizer` is the one `source`'s weights were trained with: its fingerprint matches, or,
    for a checkpoint that records none, its vocabulary is the model's size."""
    vocab_size = checkpoint["config"]["model"]["vocab_size"]
    saved = checkpoint.get("tokenizer")
    same = (saved == tokenizer.fingerprint if saved is not None
            else tokenizer.vocab_size == vocab_size)
    require(same, f"{tokenizer.path} is not the tokenizer {source} was trained with (its ids "
            f"would decode to other text) — {fix}")


@dataclass
class TrainedModel:
    """A model ready to use (eval mode, on its device) with what reading it takes."""
    model: Transformer
    tokenizer: BPETokenizer  # its chat format: the one the checkpoint records
    context_length: int  # the window it was trained on: the most it ever sees
    device: torch.device
    precision: str


def load_trained(path: str, config_path: str | None = None,
                 device_name: str | None = None) -> TrainedModel:
    """The model at `path` (an SLM checkpoint or a Hugging Face Llama directory) for infer.py
    and eval.py. `config_path` replaces the stored config's tokenizer, device and precision
    (the weights decide the model's shape); `device_name` overrides the device."""
    checkpoint = load_checkpoint(path)
    if "base" in checkpoint:  # merged: decoding then costs what the base costs
        print(f"{path}: LoRA adapter merged into its base {checkpoint['base']['path']}",
              file=sys.stderr, flush=True)
    stored = stored_config(checkpoint["config"], path)
    config = load_config(config_path) if config_path else stored
    if "directory" in checkpoint:  # a Hugging Face directory carries its own tokenizer
        config.data.tokenizer_path = stored.data.tokenizer_path
    device = pick_device(device_name or config.training.device)
    precision = setup_precision(config.training.precision, device)
    fix = "pass --config with the tokenizer the checkpoint was trained on"
    tokenizer = load_tokenizer(config.data.tokenizer_path, stored.model.vocab_size, fix)
    check_tokenizer(checkpoint, tokenizer, path, fix)
    model = Transformer(stored.model)
    load_weights(model, checkpoint, path)
    tokenizer = dataclasses.replace(
        tokenizer, chat=stored_chat_format(checkpoint.get("chat"), tokenizer.chat))
    return TrainedModel(model.to(device).eval(), tokenizer, stored.data.context_length, device,
                        precision)


def adopt_pretrained(config: Config, cli_keys: Collection[str],
                     is_main: bool) -> tuple[Config, dict | None]:
    """The config of a run from training.init_from, and that source's checkpoint without its
    weights (None without init_from): the source's model section and tokenizer replace the
    config file's (dropout stays a training choice); a command-line setting that contradicts
    them is refused."""
    path = config.training.init_from
    if not path:
        return config, None
    source = load_checkpoint(path, weights=False)
    stored = stored_config(source["config"], path)
    model = dataclasses.replace(stored.model, dropout=config.model.dropout)
    adopted = {f"model.{key}": value for key, value in dataclasses.asdict(model).items()}
    adopted["data.tokenizer_path"] = stored.data.tokenizer_path
    for key, value in adopted.items():
        section, name = key.split(".")
        mine = getattr(getattr(config, section), name)
        require(key not in cli_keys or mine == value, f"{key}={mine!r} on the command line "
                f"contradicts {path}, whose value is {value!r} — drop that override: "
                "training.init_from sets the model and the tokenizer")
    if is_main:
        print(f"training.init_from: model ({model.num_layers} layers x {model.embed_dim}, vocab "
              f"{model.vocab_size}) and tokenizer {stored.data.tokenizer_path} come from "
              f"{path}, replacing the config's", flush=True)
    data = dataclasses.replace(config.data, tokenizer_path=stored.data.tokenizer_path)
    t = config.training
    training = adopt_adapter(t, cli_keys) if t.init_adapter else t
    return Config(model=model, data=data, training=training), source


def adopt_adapter(t: TrainingConfig, cli_keys: Collection[str]) -> TrainingConfig:
    """training.init_adapter's rank, alpha and targets in place of the config's; a value set
    otherwise (on the command line, or other than the default) is refused. Dropout stays a
    training choice."""
    adapter = read_peft_settings(t.init_adapter)
    defaults = TrainingConfig()
    for key, theirs in adapter.items():
        mine, default = getattr(t, key), getattr(defaults, key)
        same = set(mine) == set(theirs) if key == "lora_targets" else mine == theirs
        unset = mine == default and f"training.{key}" not in cli_keys
        require(same or unset, f"training.{key}={mine!r} contradicts the adapter "
                f"{t.init_adapter}, whose value is {theirs!r} — drop it: training.init_adapter "
                "sets the rank, alpha and targets")
    return dataclasses.replace(t, **adapter)
