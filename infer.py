"""Prompt-based generation from a trained checkpoint, streamed to stdout as it is produced; with
--chat, a conversation through the model's chat template (chat.py).

    python infer.py --ckpt_path checkpoints/best_model.pth --prompt "ROMEO:" --max-length 100
    python infer.py --ckpt_path checkpoints/chat_model.pth --chat   # a turn per line of stdin
"""
from __future__ import annotations

import argparse
import sys

import torch
from tokenizers.decoders import DecodeStream

from chat import chat_prompt
from checkpoints import TrainedModel, load_trained
from generate import generate
from runtime import autocast_context
from utils import MAX_SEED, ArgumentParser, UserError, require_within, run_cli, warn

WINDOW_RULE = ("The model sees at most the context it was trained on (data.context_length in the "
               "checkpoint): a longer prompt keeps its newest tokens, and a full window drops to "
               "its newest half and goes on from there, with or without the KV cache. With "
               "--chat, the oldest user+assistant pairs are dropped until the prompt takes at "
               "most half the window (never the system turn), and a reply that fills the window "
               "ends there.")


def parse_args() -> argparse.Namespace:
    parser = ArgumentParser(description="Generate text from a trained SLM checkpoint.",
                            epilog=WINDOW_RULE)
    parser.add_argument("--config", help="YAML config for tokenizer and device (default: stored)")
    parser.add_argument("--ckpt_path", default="checkpoints/best_model.pth",
                        help="checkpoint written by train.py, or a Hugging Face Llama directory "
                        "(export.py's, or a downloaded one such as SmolLM2)")
    parser.add_argument("--prompt", default="",
                        help="text to continue; empty: the end-of-text token. With --chat: the "
                        "one user turn to answer (without it, each line of stdin is a turn)")
    parser.add_argument("--chat", action="store_true",
                        help="talk to the model through its chat template; replies end at its "
                        "end-of-turn token (eos_token)")
    parser.add_argument("--system", default="", help="with --chat: the system turn")
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
    for flag in ("prompt", "system"):
        check_utf8(getattr(args, flag), f"--{flag}")
    return args


def check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # the shell passed bytes that are not UTF-8
        raise UserError(f"{what} is not UTF-8 text (byte {ord(text[err.start]) & 0xFF:#x} at "
                        f"character {err.start}) — pass it as UTF-8") from None


def stream(trained: TrainedModel, args: argparse.Namespace, prompt_ids: list[int],
           max_new_tokens: int, eos_id: int, generator: torch.Generator) -> tuple[str, bool]:
    """Generate after `prompt_ids`, printing the text as it comes, each token decoded once;
    -> (the text, whether it ended at eos_id)."""
    prompt = torch.tensor([prompt_ids], device=trained.device)
    pieces = DecodeStream(skip_special_tokens=False)  # None while a character is incomplete
    new_ids, printed, ended = [], 0, False
    with autocast_context(trained.device, trained.precision):
        for token in generate(trained.model, prompt, max_new_tokens, trained.context_length,
                              temperature=args.temperature, top_k=args.top_k or 0,
                              top_p=args.top_p, eos_id=eos_id, use_cache=not args.no_cache,
                              generator=generator, compile=args.compile):
            if int(token) == eos_id:
                ended = True
                break
            new_ids.append(int(token))
            piece = pieces.step(trained.tokenizer.hf, new_ids[-1])
            if piece:
                print(piece, end="", flush=True)
                printed += len(piece)
    text = trained.tokenizer.decode(new_ids)  # bytes that never formed a character: U+FFFD
    print(text[printed:], flush=True)
    return text, ended


def chat(trained: TrainedModel, args: argparse.Namespace, generator: torch.Generator) -> None:
    """One reply to --prompt, or a conversation of stdin's lines: the whole history is rendered
    again each turn, the replies kept as their decoded text."""
    tokenizer, context = trained.tokenizer, trained.context_length
    eos_id = tokenizer.token_id(tokenizer.chat.end_of_turn)
    if not args.prompt and sys.stdin.isatty():
        print("chat: type a turn and press Enter; Ctrl-D ends", file=sys.stderr, flush=True)
    history: list[dict] = []
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8: one error line
        sys.stdin.reconfigure(errors="surrogateescape")
    for number, line in enumerate([args.prompt] if args.prompt else sys.stdin, 1):
        if not line.strip():  # an empty line is no turn
            continue
        check_utf8(line, "--prompt" if args.prompt else f"line {number} of stdin")
        history.append({"role": "user", "content": line.rstrip("\r\n")})
        prompt_ids, dropped = chat_prompt(tokenizer.chat, tokenizer.encode, args.system, history,
                                          context)
        del history[:2 * dropped]
        if len(prompt_ids) >= context:
            warn(f"the system and user turns take {len(prompt_ids)} tokens and fill the "
                 f"{context}-token window; the model sees the newest half of them")
            prompt_ids = prompt_ids[-max(1, context // 2):]
        room = context - len(prompt_ids)
        reply, ended = stream(trained, args, prompt_ids, min(args.max_length, room), eos_id,
                              generator)
        if not ended:
            warn(f"the reply filled the {context}-token window and ends here" if room <=
                 args.max_length else f"the reply reached --max-length {args.max_length} "
                 "tokens before its end of turn")
        history.append({"role": "assistant", "content": reply})


def main() -> None:
    args = parse_args()
    trained = load_trained(args.ckpt_path, args.config, args.device)
    seed = args.seed if args.seed is not None else torch.seed()  # torch.seed(): a fresh one
    generator = torch.Generator(device=trained.device).manual_seed(seed)
    if args.chat:
        chat(trained, args, generator)
        return
    tokenizer, context = trained.tokenizer, trained.context_length
    prompt_ids = tokenizer.encode(args.prompt) or [tokenizer.end_of_text_id]
    if len(prompt_ids) > context:
        warn(f"prompt has {len(prompt_ids)} tokens, more than the {context} the model was "
             f"trained on; it sees the last {context}")
    for sample in range(args.num_samples):
        if sample:
            print("\n" + "-" * 40)
        print(args.prompt, end="")
        stream(trained, args, prompt_ids, args.max_length, tokenizer.end_of_text_id, generator)


if __name__ == "__main__":
    run_cli(main)
