"""Export a trained SLM checkpoint as a Hugging Face LlamaForCausalLM directory, and read one back.

    python export.py --ckpt_path checkpoints/best_model.pth --out exported/

model.py is Llama module for module (rotate-half RoPE, RMSNorm in fp32, SwiGLU, repeat_kv-order GQA,
tied head), so the export only renames tensors: no permutation of q/k rows is needed. The directory
holds config.json, model.safetensors and the tokenizer (tokenizer.json, tokenizer_config.json,
special_tokens_map.json); transformers loads it offline, and `infer.py --ckpt_path exported/` too.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from safetensors.torch import load_file, save

from data import EOT, load_tokenizer
from model import Transformer, load_weights
from files import check_writable, load_checkpoint
from utils import (ArgumentParser, ModelConfig, UserError, config_to_dict, run_cli,
                   stored_config)

HF_PREFIX = "model."          # LlamaForCausalLM keeps the decoder under .model, lm_head beside it
TIED_HEAD = "lm_head.weight"  # the tensor of embed_tokens.weight: stored once, as transformers does
EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")


def hf_config(model: ModelConfig, eot_id: int, slm_config: dict) -> dict:
    """config.json for LlamaForCausalLM; the full SLM config rides along for an exact way back."""
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
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,                                           # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},  # 5.x
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "use_cache": True,
        "slm_config": slm_config,
    }


def export(ckpt_path: str, out_dir: str, tokenizer_path: str | None = None,
           force: bool = False) -> None:
    checkpoint = load_checkpoint(ckpt_path)
    config = stored_config(checkpoint["config"], ckpt_path)
    tokenizer_path = tokenizer_path or config.data.tokenizer_path
    tokenizer = load_tokenizer(tokenizer_path, config.model.vocab_size,
                               "pass --tokenizer with the one the checkpoint was trained on")
    if os.path.isfile(out_dir) or (os.path.isdir(out_dir) and os.listdir(out_dir) and not force):
        raise UserError(f"{out_dir} already exists and is not empty — choose a new --out, or add "
                        "--force to overwrite the exported files in it")
    model = Transformer(config.model)
    load_weights(model, checkpoint, ckpt_path)  # refuses bad weights before writing anything

    # safetensors refuses tensors that share memory, and transformers re-ties the head on load.
    tensors = {HF_PREFIX + name: tensor.contiguous() for name, tensor in model.state_dict().items()
               if name != TIED_HEAD}
    eot_id = tokenizer.token_to_id(EOT)
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                        "model_max_length": config.model.max_seq_len, "add_bos_token": False,
                        "add_eos_token": False, "clean_up_tokenization_spaces": False}
    json_files = {"config.json": hf_config(config.model, eot_id, config_to_dict(config)),
                  "tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special}
    contents = {name: (json.dumps(content, indent=2) + "\n").encode()
                for name, content in json_files.items()}
    contents["tokenizer.json"] = tokenizer.to_str().encode()
    contents["model.safetensors"] = save(tensors, metadata={"format": "pt"})
    write_directory(out_dir, contents)


def write_directory(out_dir: str, contents: dict[str, bytes]) -> None:
    """Write the files into a staging directory beside `out_dir`, then move them in: a failure
    half-way (a full disk) leaves `out_dir` as it was, so the same command can simply run again."""
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
        for name in contents:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    except OSError as err:
        raise UserError(f"could not write {out_dir} ({err.strerror or err}); it was left as it "
                        "was — free disk space, then run the same command again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_exported(directory: str) -> dict:
    """An exported directory as a checkpoint dict ({"model", "config"}), as infer.py takes it.

    The tokenizer path points into the directory, so the export is self-contained.
    """
    missing = [name for name in EXPORT_FILES if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise UserError(f"{directory} is not an SLM export (missing {', '.join(missing)}) — "
                        "create one with python export.py --ckpt_path ... --out DIR")
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            hf = json.load(f)
    except ValueError as err:  # not JSON, or not UTF-8
        raise UserError(f"{directory}/config.json is damaged ({str(err)[:80]}) — export the "
                        "checkpoint again") from None
    if not isinstance(hf, dict) or "slm_config" not in hf:
        raise UserError(f"{directory}/config.json has no slm_config — only directories written "
                        "by export.py load")
    config = stored_config(hf["slm_config"], f"{directory}/config.json")
    config.data.tokenizer_path = os.path.join(directory, "tokenizer.json")
    try:
        tensors = load_file(os.path.join(directory, "model.safetensors"))
    except Exception as err:  # safetensors has its own error type for bad headers and short files
        raise UserError(f"cannot read {directory}/model.safetensors ({str(err)[:120]}) — export "
                        "it again") from None
    state = {name.removeprefix(HF_PREFIX): tensor for name, tensor in tensors.items()}
    if "embed_tokens.weight" in state:
        state[TIED_HEAD] = state["embed_tokens.weight"]
    return {"model": state, "config": config_to_dict(config)}


def main() -> None:
    parser = ArgumentParser(description="Export an SLM checkpoint as a Hugging Face "
                                     "LlamaForCausalLM directory (config, weights, tokenizer).")
    parser.add_argument("--ckpt_path", default="checkpoints/best_model.pth",
                        help="checkpoint written by train.py")
    parser.add_argument("--out", required=True,
                        help="output directory (created; must be empty unless --force)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer JSON (default: the checkpoint config's)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite the export files in a non-empty --out")
    args = parser.parse_args()
    export(args.ckpt_path, args.out, args.tokenizer, args.force)
    print(f"exported {args.ckpt_path} to {args.out}/ ({', '.join(EXPORT_FILES)})", flush=True)


if __name__ == "__main__":
    run_cli(main)
