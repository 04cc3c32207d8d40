"""Hugging Face Llama directories, both ways: SLM weights written as a `LlamaForCausalLM`
directory (export.py), and any supported Llama directory read back as SLM's config and weights
(infer.py, and train.py's `training.init_from`). PEFT LoRA adapter directories, both ways too
(export.py --format peft, and `training.init_adapter`).

model.py is Llama module for module (rotate-half RoPE, RMSNorm in fp32, SwiGLU, repeat_kv-order
GQA), so the weights only change names: LlamaForCausalLM keeps the decoder under `model.` and the
head beside it, and a tied head is stored once, as transformers does. A Llama feature SLM cannot
represent is refused by name rather than loaded wrongly.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save

from tokenizers import Tokenizer

from bpe import tokenizer_fingerprint
from chat import ChatFormat
from files import check_writable
from utils import (LORA_TARGETS, Config, DataConfig, ModelConfig, TrainingConfig, UserError,
                   config_to_dict, require, stored_config)

HF_PREFIX = "model."
HEAD = "lm_head.weight"
WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
SHADOWS = (WEIGHTS_INDEX, "chat_template.jinja", "generation_config.json")  # an older export's or
# a source's files that a reader would take over the new export's (with the index's shards)
DERIVED_BUFFER = "rotary_emb.inv_freq"  # older Llama files store it; RoPE recomputes it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PEFT_PREFIX = "base_model.model." + HF_PREFIX  # PeftModel's path to LlamaForCausalLM's decoder
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
HF_NUMBERS = {**dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "head_dim",
                               "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                               "max_position_embeddings"), int),
              "rms_norm_eps": (int, float), "rope_theta": (int, float)}


def hf_config(model: ModelConfig, context_length: int, token_ids: dict[str, int],
              slm_config: dict) -> dict:
    """config.json for LlamaForCausalLM, advertising the context the model was trained on; the
    full SLM config rides along for an exact way back."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.embed_dim,
        "intermediate_size": model.ff_dim,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_kv_heads,
        "head_dim": model.embed_dim // model.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": context_length,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,                                           # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},  # 5.x
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": model.tie_embeddings,
        "bos_token_id": token_ids["bos_token"],
        "eos_token_id": token_ids["eos_token"],
        "pad_token_id": token_ids["pad_token"],
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "use_cache": True,
        "slm_config": slm_config,
    }


def directory_contents(state: dict[str, torch.Tensor], config: Config, tokenizer: Tokenizer,
                       chat: ChatFormat) -> dict[str, bytes]:
    """The files of an export: config, weights (safetensors) and the tokenizer with its chat
    template and special tokens (a bos or pad the source names none of is its eos)."""
    # safetensors refuses tensors that share memory, and transformers re-ties the head on load.
    tensors = {(name if name == HEAD else HF_PREFIX + name): tensor.contiguous()
               for name, tensor in state.items()
               if not (name == HEAD and config.model.tie_embeddings)}
    eos = chat.end_of_turn
    special = {"bos_token": eos, "pad_token": eos, **chat.special_tokens}
    token_ids = {key: tokenizer.token_to_id(token) for key, token in special.items()}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                        "model_max_length": config.data.context_length, "add_bos_token": False,
                        "add_eos_token": False, "clean_up_tokenization_spaces": False,
                        "chat_template": chat.template}
    json_files = {"config.json": hf_config(config.model, config.data.context_length, token_ids,
                                           config_to_dict(config)),
                  "tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special}
    contents = {name: (json.dumps(content, indent=2) + "\n").encode()
                for name, content in json_files.items()}
    contents["tokenizer.json"] = tokenizer.to_str().encode()
    contents[WEIGHTS] = save(tensors, metadata={"format": "pt"})
    return contents


def write_directory(out_dir: str, contents: dict[str, bytes]) -> None:
    """Write the files into a staging directory beside `out_dir`, then move them in: a failure
    half-way (a full disk) leaves `out_dir` as it was, so the same command can simply run again.
    Then remove what would shadow them (SHADOWS, and the shards an old index lists); any other
    file in `out_dir` stays."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    check_writable(parent)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.tmp-")
    try:
        for name, data in contents.items():
            with open(os.path.join(staging, name), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.makedirs(out_dir, exist_ok=True)
        try:
            shards = _weight_shards(out_dir)
        except UserError:  # a damaged index names nothing to trust; it goes all the same
            shards = []
        shadows = [name for name in (*SHADOWS, *shards) if name not in contents]
        for name in contents:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
        for name in shadows:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(out_dir, name))
    except OSError as err:
        raise UserError(f"could not write {out_dir} ({err.strerror or err}); it was left as it "
                        "was — free disk space, then run the same command again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as err:  # not JSON, or not UTF-8
        raise UserError(f"{path} is damaged ({str(err)[:80]}) — fetch or export it again"
                        ) from None


def model_config_from_hf(hf: Any, source: str) -> ModelConfig:
    """SLM's model section for a Llama config.json; a feature it cannot represent is refused."""
    if not (isinstance(hf, dict) and "hidden_size" in hf):
        raise UserError(f"{source} has no slm_config and is not a Llama config.json — only "
                        "export.py's directories and Hugging Face Llama directories load")
    for key, kinds in HF_NUMBERS.items():
        value = hf.get(key)
        require(value is None or isinstance(value, kinds) and not isinstance(value, bool),
                f"{source}: {key} is {value!r}, not {'an integer' if kinds is int else 'a number'}"
                " — the file is damaged or edited; fetch or export the directory again")
    rope = hf.get("rope_parameters") or {}
    heads = hf.get("num_attention_heads", 0)
    unsupported = {
        "model_type": (hf.get("model_type"), "llama"),
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "mlp_bias": (hf.get("mlp_bias", False), False),
        "rope_scaling": (hf.get("rope_scaling") or rope.get("rope_type", "default"), "default"),
        "head_dim": (hf.get("head_dim") or hf["hidden_size"] // max(1, heads),
                     hf["hidden_size"] // max(1, heads)),
    }
    for name, (value, supported) in unsupported.items():
        if value != supported:
            raise UserError(f"{source}: {name}={value!r} is a Llama feature SLM's model cannot "
                            f"represent (it needs {supported!r}) — use a plain Llama checkpoint")
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"], num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads, ff_dim=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], max_seq_len=hf["max_position_embeddings"],
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=hf.get("tie_word_embeddings", False))  # LlamaConfig's own default
    except KeyError as err:
        raise UserError(f"{source} lacks {err} — it is not a complete Llama config.json"
                        ) from None


def _weight_shards(directory: str) -> list[str]:
    """The files a directory's weight index lists (none without an index)."""
    index_path = os.path.join(directory, WEIGHTS_INDEX)
    if not os.path.isfile(index_path):
        return []
    weight_map = _read_json(index_path).get("weight_map", {})
    require(isinstance(weight_map, dict) and all(
        isinstance(name, str) and os.path.basename(name) == name for name in weight_map.values()),
        f"{index_path} is damaged (its weight_map does not list files beside it) — fetch or "
        "export the directory again")
    return sorted(set(weight_map.values()))


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    """The safetensors weights of a directory: model.safetensors where there is one, else the
    shards its index lists (transformers' order of precedence)."""
    use_single = os.path.isfile(os.path.join(directory, WEIGHTS))
    files = [WEIGHTS] if use_single else _weight_shards(directory) or [WEIGHTS]
    tensors = {}
    for name in files:
        path = os.path.join(directory, name)
        try:
            tensors.update(load_file(path))
        except Exception as err:  # safetensors has its own error type for bad headers, short files
            raise UserError(f"cannot read {path} ({str(err)[:120]}) — fetch or export it again"
                            ) from None
    return tensors


def load_hf_config(directory: str) -> Config:
    """The config of a Hugging Face Llama directory (one export.py wrote: exactly its SLM config;
    any other supported one: its model, and a context as long as its positions); the tokenizer
    is the directory's tokenizer.json."""
    missing = [name for name in ("config.json", *TOKENIZER_FILES)
               if not os.path.isfile(os.path.join(directory, name))]
    if not any(os.path.isfile(os.path.join(directory, name)) for name in (WEIGHTS, WEIGHTS_INDEX)):
        missing.append(WEIGHTS)
    if missing:
        raise UserError(f"{directory} is not a Hugging Face Llama directory (missing "
                        f"{', '.join(missing)}) — export one with python export.py, or point at "
                        "a downloaded model's directory")
    source = os.path.join(directory, "config.json")
    hf = _read_json(source)
    if isinstance(hf, dict) and "slm_config" in hf:
        config = stored_config(hf["slm_config"], source)
    else:
        model = model_config_from_hf(hf, source)
        config = Config(model=model, data=DataConfig(context_length=model.max_seq_len))
    config.data.tokenizer_path = os.path.join(directory, "tokenizer.json")
    return config


def load_hf_directory(directory: str, weights: bool = True) -> dict:
    """A Hugging Face Llama directory as a checkpoint dict {"model" (in fp32; left out unless
    `weights`), "config", "tokenizer" (the fingerprint of its tokenizer.json)}, plus the
    "directory" it came from."""
    config = load_hf_config(directory)
    state = {name.removeprefix(HF_PREFIX): tensor.float()
             for name, tensor in _read_weights(directory).items()
             if not name.endswith(DERIVED_BUFFER)} if weights else {}
    if config.model.tie_embeddings and "embed_tokens.weight" in state:
        state[HEAD] = state["embed_tokens.weight"]
    try:
        tokenizer = Tokenizer.from_file(config.data.tokenizer_path)
    except Exception:  # the Rust side raises a bare Exception for any parse failure
        raise UserError(f"{config.data.tokenizer_path} is not a tokenizer JSON — fetch or export "
                        "the directory again") from None
    return {**({"model": state} if weights else {}), "config": config_to_dict(config),
            "tokenizer": tokenizer_fingerprint(json.loads(tokenizer.to_str())),
            "directory": directory}


def peft_adapter_contents(adapter: dict[str, torch.Tensor], t: TrainingConfig,
                          base: str) -> dict[str, bytes]:
    """The files of a PEFT LoRA adapter directory over the base at `base`: the adapter's
    tensors under PeftModel's names, and its adapter_config.json."""
    tensors = {PEFT_PREFIX + name: tensor.contiguous() for name, tensor in adapter.items()}
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": t.lora_rank, "lora_alpha": t.lora_alpha or 2 * t.lora_rank,
        "lora_dropout": t.lora_dropout, "target_modules": sorted(t.lora_targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
    return {ADAPTER_CONFIG: (json.dumps(adapter_config, indent=2) + "\n").encode(),
            ADAPTER_WEIGHTS: save(tensors, metadata={"format": "pt"})}


def read_peft_settings(directory: str) -> dict[str, Any]:
    """A PEFT LoRA adapter directory's settings, as training's keys {"lora_rank", "lora_alpha",
    "lora_targets"}; an adapter SLM cannot train on is refused by name."""
    path = os.path.join(directory, ADAPTER_CONFIG)
    require(os.path.isfile(path) and os.path.isfile(os.path.join(directory, ADAPTER_WEIGHTS)),
            f"training.init_adapter {directory} is not a PEFT adapter directory (no "
            f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}) — point it at one, e.g. written by "
            "python export.py --format peft")
    peft = _read_json(path)
    require(isinstance(peft, dict), f"{path} is damaged (not a JSON object) — fetch it again")
    targets, rank, alpha = peft.get("target_modules"), peft.get("r"), peft.get("lora_alpha", 8)
    require(isinstance(targets, list) and bool(targets) and set(targets) <= set(LORA_TARGETS),
            f"{path}: target_modules={targets!r} — SLM's LoRA adapts a list among "
            f"{', '.join(LORA_TARGETS)}; use such an adapter")
    require(isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= 1 << 16
            and isinstance(alpha, (int, float)) and alpha > 0, f"{path}: r={rank!r}, "
            f"lora_alpha={alpha!r} — an adapter needs a rank of 1 or more and a positive alpha; "
            "fetch or export it again")
    unsupported = {"peft_type": (peft.get("peft_type"), "LORA"), "bias": (peft.get("bias"), "none"),
                   **{name: (peft.get(name) or None, None) for name in (
                       "use_rslora", "use_dora", "lora_bias", "modules_to_save",
                       "layers_to_transform", "layer_replication", "exclude_modules",
                       "alora_invocation_tokens", "rank_pattern", "alpha_pattern")}}
    for name, (value, supported) in unsupported.items():
        require(value == supported, f"{path}: {name}={peft.get(name)!r} is an adapter SLM's LoRA "
                f"cannot train (it needs {supported!r}) — use a plain LoRA adapter of a Llama "
                "model")
    return {"lora_rank": rank, "lora_alpha": float(alpha), "lora_targets": sorted(targets)}


def read_peft_weights(directory: str) -> dict[str, torch.Tensor]:
    """A PEFT LoRA adapter directory's tensors, by model.py's names."""
    path = os.path.join(directory, ADAPTER_WEIGHTS)
    try:
        tensors = load_file(path)
    except Exception as err:  # safetensors has its own error type for bad headers, short files
        raise UserError(f"cannot read {path} ({str(err)[:120]}) — fetch or export it again"
                        ) from None
    return {name.removeprefix(PEFT_PREFIX).replace(".default.", "."): tensor.float()
            for name, tensor in tensors.items()}
