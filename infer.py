"""Prompt-based generation from a trained checkpoint, streamed to stdout as it is produced.

    python infer.py --ckpt_path checkpoints/best_model.pth --prompt "ROMEO:" --max-length 100
"""
from __future__ import annotations

import argparse

import torch

from checkpoints import load_trained
from data import decode, end_of_text
from generate import generate
from runtime import autocast_context
from utils import MAX_SEED, ArgumentParser, UserError, require_within, run_cli, warn

WINDOW_RULE = ("The model sees at most the context it was trained on (data.context_length in the "
               "checkpoint): a longer prompt keeps its newest tokens, and a full window drops to "
               "its newest half and goes on from there, with or without the KV cache.")


def parse_args() -> argparse.Namespace:
    parser = ArgumentParser(description="Generate text from a trained SLM checkpoint.",
                            epilog=WINDOW_RULE)
    parser.add_argument("--config", help="YAML config for tokenizer and device (default: stored)")
    parser.add_argument("--ckpt_path", default="checkpoints/best_model.pth",
                        help="checkpoint written by train.py, or a Hugging Face Llama directory "
                        "(export.py's, or a downloaded one such as SmolLM2)")
    parser.add_argument("--prompt", default="",
                        help="text to continue; empty: the end-of-text token")
    parser.add_argument("--max-length", type=int, default=200, help="number of new tokens")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    parser.add_argument("--num-samples", type=int, default=1, help="independent samples to print")
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda", "mps"),
                        help="default: training.device of the config")
    parser.add_argument("--no-cache", action="store_true", help="recompute the window each step")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step: seconds to compile once, then more "
                        "tokens/s (README, Performance); pays off for long or many samples")
    args = parser.parse_args()
    for flag, low, high in (("max_length", 1, 1 << 20), ("top_k", 1, 1 << 24),
                            ("temperature", 0, 100), ("seed", 0, MAX_SEED),
                            ("num_samples", 1, 1 << 16)):
        if getattr(args, flag) is not None:
            require_within(f"--{flag.replace('_', '-')}", getattr(args, flag), low, high)
    require_within("--top-p", args.top_p, 0, 1, open_low=True)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as err:  # the shell passed bytes that are not UTF-8
        raise UserError(f"--prompt is not UTF-8 text (byte {ord(args.prompt[err.start]) & 0xFF:#x} "
                        f"at character {err.start}) — pass the prompt as UTF-8") from None
    return args


def main() -> None:
    args = parse_args()
    trained = load_trained(args.ckpt_path, args.config, args.device)
    model, tokenizer, device = trained.model, trained.tokenizer, trained.device
    eot_id = tokenizer.token_to_id(end_of_text(trained.tokenizer_path))
    prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids or [eot_id]
    context = trained.context_length
    if len(prompt_ids) > context:
        warn(f"prompt has {len(prompt_ids)} tokens, more than the {context} the model was "
             f"trained on; it sees the last {context}")
    seed = args.seed if args.seed is not None else torch.seed()  # torch.seed(): a fresh one
    generator = torch.Generator(device=device).manual_seed(seed)

    for sample in range(args.num_samples):
        if sample:
            print("\n" + "-" * 40)
        print(args.prompt, end="")
        prompt = torch.tensor([prompt_ids], device=device)
        new_ids, printed = [], 0
        with autocast_context(device, trained.precision):
            for token in generate(model, prompt, args.max_length, context,
                                  temperature=args.temperature, top_k=args.top_k or 0,
                                  top_p=args.top_p, eos_id=eot_id, use_cache=not args.no_cache,
                                  generator=generator, compile=args.compile):
                if int(token) == eot_id:
                    break
                new_ids.append(int(token))
                text = decode(tokenizer, new_ids)
                if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
                    continue
                print(text[printed:], end="", flush=True)
                printed = len(text)
        print(decode(tokenizer, new_ids)[printed:], flush=True)


if __name__ == "__main__":
    run_cli(main)
