"""Export a trained SLM checkpoint, or a Hugging Face Llama directory, for other tools:

    python export.py --ckpt_path checkpoints/best_model.pth --out exported/
    python export.py --ckpt_path checkpoints/best_model.pth --out model.gguf --dtype q8_0
    python export.py --ckpt_path lora/best_model.pth --format peft --out adapter/
    python export.py --ckpt_path lora/best_model.pth --format gguf-lora --out adapter.gguf

A Hugging Face LlamaForCausalLM directory (hf.py) holds config.json, model.safetensors and the
tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json); transformers loads it
offline, and so do `infer.py --ckpt_path exported/` and `training.init_from=exported/`. A GGUF
file (gguf_export.py) holds the weights, tokenizer and chat template for llama.cpp, Ollama and
LM Studio. A LoRA checkpoint exports merged into its base as either, or as its adapter alone:
a PEFT adapter directory (hf.py) or a llama.cpp LoRA GGUF (gguf_export.py).
"""
from __future__ import annotations

import os

from bpe import load_tokenizer
from checkpoints import check_tokenizer, load_base, load_checkpoint, load_weights
from chat import stored_chat_format
from files import check_writable
from gguf_export import DTYPES, llama_cpp_pre_tokenizer, write_gguf, write_gguf_lora
from hf import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, directory_contents, peft_adapter_contents,
                write_directory)
from lora import adapter_weights
from model import Transformer
from utils import ArgumentParser, UserError, require, run_cli, stored_config

EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")
FORMATS = ("hf", "gguf", "peft", "gguf-lora")
FILE_FORMATS = ("gguf", "gguf-lora")


def check_out(out: str, out_format: str, force: bool) -> None:
    """--out fits the format, and overwrites an earlier export only with --force."""
    if out_format in FILE_FORMATS:
        if os.path.isdir(out):
            raise UserError(f"{out} is a directory — give a GGUF file path, e.g. "
                            f"{os.path.join(out, 'model.gguf')}")
        check_writable(os.path.dirname(os.path.abspath(out)))
        exists = os.path.exists(out)
    elif os.path.isfile(out):
        single_file = "gguf-lora" if out_format == "peft" else "gguf"
        raise UserError(f"{out} is a file — give a directory for the {out_format} export, or "
                        f"add --format {single_file}")
    else:
        exists = os.path.isdir(out) and bool(os.listdir(out))
    if exists and not force:
        state = "" if out_format in FILE_FORMATS else " and is not empty"
        raise UserError(f"{out} already exists{state}"
                        " — choose a new --out, or add --force to overwrite the export in it")


def export(ckpt_path: str, out: str, tokenizer_path: str | None = None, force: bool = False,
           out_format: str = "hf", dtype: str = "f32") -> None:
    """Write the model at `ckpt_path` to `out` as a Hugging Face directory ("hf") or a GGUF
    file ("gguf", its 2-D weights in `dtype`), a LoRA checkpoint's merged into its base; or a
    LoRA checkpoint's adapter alone as a PEFT directory ("peft") or llama.cpp GGUF
    ("gguf-lora")."""
    if out_format in ("peft", "gguf-lora"):
        export_adapter(ckpt_path, out, force, out_format)
        return
    checkpoint = load_checkpoint(ckpt_path)
    config = stored_config(checkpoint["config"], ckpt_path)
    tokenizer_path = tokenizer_path or config.data.tokenizer_path
    fix = "pass --tokenizer with the one the checkpoint was trained on"
    tokenizer = load_tokenizer(tokenizer_path, config.model.vocab_size, fix)
    check_tokenizer(checkpoint, tokenizer, ckpt_path, fix)
    check_out(out, out_format, force)
    pre_tokenizer = ""
    if out_format == "gguf":  # a tokenizer llama.cpp cannot reproduce is refused first
        pre_tokenizer = llama_cpp_pre_tokenizer(tokenizer.hf, tokenizer_path)
    model = Transformer(config.model)
    load_weights(model, checkpoint, ckpt_path)  # refuses bad weights before writing anything
    chat = stored_chat_format(checkpoint.get("chat"), tokenizer.chat)
    if out_format == "gguf":
        write_gguf(out, model.state_dict(), config, tokenizer.hf, pre_tokenizer, chat, dtype)
    else:
        write_directory(out, directory_contents(model.state_dict(), config, tokenizer.hf, chat))


def export_adapter(ckpt_path: str, out: str, force: bool, out_format: str) -> None:
    """A LoRA checkpoint's adapter, checked against its base first, as a PEFT directory or a
    llama.cpp LoRA GGUF."""
    checkpoint = load_checkpoint(ckpt_path, merge_adapter=False)
    require("base" in checkpoint, f"{ckpt_path} is a whole model, not a LoRA adapter — export "
            "it with --format hf or gguf, or train an adapter (training.lora_rank=8)")
    load_base(checkpoint, ckpt_path)  # a missing or changed base is refused before writing
    config = stored_config(checkpoint["config"], ckpt_path)
    check_out(out, out_format, force)
    adapter = adapter_weights(checkpoint["model"])
    if out_format == "peft":
        write_directory(out, peft_adapter_contents(adapter, config.training,
                                                   checkpoint["base"]["path"]))
    else:
        write_gguf_lora(out, adapter, config)


def main() -> None:
    parser = ArgumentParser(description="Export an SLM checkpoint or a Hugging Face Llama "
                            "directory as a Hugging Face directory or a GGUF file (llama.cpp).")
    parser.add_argument("--ckpt_path", default="checkpoints/best_model.pth",
                        help="checkpoint written by train.py, or a Hugging Face Llama directory")
    parser.add_argument("--out", required=True,
                        help="output directory (hf: created, must be empty unless --force) or "
                        "file (gguf)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="hf: a LlamaForCausalLM directory; gguf: one file for llama.cpp; a "
                        "LoRA checkpoint's adapter alone: peft (a PEFT adapter directory) or "
                        "gguf-lora (llama.cpp's --lora file). Default: gguf when --out ends in "
                        ".gguf, else hf (a LoRA checkpoint merged into its base)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="gguf only: how 2-D weights are stored (default f32; norms stay "
                        "f32, q8_0 rows not a multiple of 32 long are f16)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer JSON (default: the checkpoint config's)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an earlier export at --out")
    args = parser.parse_args()
    out_format = args.format or ("gguf" if args.out.endswith(".gguf") else "hf")
    if args.dtype and out_format != "gguf":
        raise UserError("--dtype applies to GGUF model files only (the Hugging Face export and "
                        "adapters are float32) — drop --dtype, or add --format gguf")
    export(args.ckpt_path, args.out, args.tokenizer, args.force, out_format, args.dtype or "f32")
    written = {"gguf": f"{args.out} ({args.dtype or 'f32'})", "gguf-lora": args.out,
               "peft": f"{args.out}/ ({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS})"}.get(
        out_format, f"{args.out}/ ({', '.join(EXPORT_FILES)})")
    print(f"exported {args.ckpt_path} to {written}", flush=True)


if __name__ == "__main__":
    run_cli(main)
