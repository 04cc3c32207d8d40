"""Export a trained SLM checkpoint as a Hugging Face LlamaForCausalLM directory.

    python export.py --ckpt_path checkpoints/best_model.pth --out exported/

The directory holds config.json, model.safetensors and the tokenizer (tokenizer.json,
tokenizer_config.json, special_tokens_map.json); transformers loads it offline, and so do
`infer.py --ckpt_path exported/` and `training.init_from=exported/` (hf.py reads it back).
"""
from __future__ import annotations

import os

from checkpoints import check_tokenizer, load_checkpoint, load_weights
from chat import stored_chat_format
from data import load_tokenizer
from hf import directory_contents, write_directory
from model import Transformer
from utils import ArgumentParser, UserError, run_cli, stored_config

EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")


def export(ckpt_path: str, out_dir: str, tokenizer_path: str | None = None,
           force: bool = False) -> None:
    checkpoint = load_checkpoint(ckpt_path)
    config = stored_config(checkpoint["config"], ckpt_path)
    tokenizer_path = tokenizer_path or config.data.tokenizer_path
    fix = "pass --tokenizer with the one the checkpoint was trained on"
    tokenizer = load_tokenizer(tokenizer_path, config.model.vocab_size, fix)
    check_tokenizer(checkpoint, tokenizer, tokenizer_path, ckpt_path, fix)
    if os.path.isfile(out_dir) or (os.path.isdir(out_dir) and os.listdir(out_dir) and not force):
        raise UserError(f"{out_dir} already exists and is not empty — choose a new --out, or add "
                        "--force to overwrite the exported files in it")
    model = Transformer(config.model)
    load_weights(model, checkpoint, ckpt_path)  # refuses bad weights before writing anything
    chat = stored_chat_format(checkpoint.get("chat"), tokenizer_path)
    write_directory(out_dir, directory_contents(model.state_dict(), config, tokenizer, chat))


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
