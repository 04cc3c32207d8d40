"""Prompt-based generation from a trained checkpoint, streamed to stdout as it is produced; with
--chat, a conversation through the model's chat template (chat.py); with --prompts, a file of
prompts generated together by the engine (engine.py), one JSON line out per prompt.

    python infer.py --ckpt_path checkpoints/best_model.pth --prompt "ROMEO:" --max-length 100
    python infer.py --ckpt_path checkpoints/chat_model.pth --chat   # a turn per line of stdin
    python infer.py --ckpt_path checkpoints/best_model.pth --prompts prompts.txt --out out.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
from tokenizers.decoders import DecodeStream
from tqdm import tqdm

from chat import ROLES, chat_prompt, render
from checkpoints import TrainedModel, load_trained
from engine import Engine, Request
from files import atomic_write, check_writable
from generate import Sampling, generate
from quantize import DTYPES, resolve_dtype
from runtime import autocast_context
from utils import MAX_SEED, ArgumentParser, UserError, require, require_within, run_cli, warn

WINDOW_RULE = ("The model sees at most the context it was trained on (data.context_length in the "
               "checkpoint): a longer prompt keeps its newest tokens, and a full window drops to "
               "its newest half and goes on from there, with or without the KV cache. With "
               "--chat, the oldest user+assistant pairs are dropped until the prompt takes at "
               "most half the window (never the system turn), and a reply that fills the window "
               "ends there.")


# New tokens from which compiling the decode step pays by default: where the compile from a warm
# inductor cache is clearly repaid, and one from a cold cache about breaks even.
COMPILE_FROM_TOKENS = 8192


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
    parser.add_argument("--top-k", type=int, default=0,
                        help="sample among the k most likely (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    parser.add_argument("--num-samples", type=int, default=1, help="independent samples to print")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights and products for decoding: auto (fp32 unless int8 or "
                        "bf16 measures faster here and agrees with fp32; decided once), fp32, "
                        "bf16 (native bf16 only), int8 (docs/generation.md)")
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda", "mps"),
                        help="default: training.device of the config")
    parser.add_argument("--no-cache", action="store_true", help="recompute the window each step")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the decode step: seconds to compile once (less from "
                        "inductor's on-disk cache), then more tokens/s. Default: compile when "
                        f"--max-length x --num-samples reaches {COMPILE_FROM_TOKENS} tokens "
                        "(with --prompts: only when asked, once per batch width)")
    parser.add_argument("--prompts", metavar="FILE",
                        help="generate for every prompt of FILE together: a prompt per line, or "
                        "a .jsonl file of {\"prompt\": text} or {\"messages\": [...]} lines; "
                        "one JSON line out per prompt, in order")
    parser.add_argument("--out", metavar="FILE", help="with --prompts: write the JSON lines "
                        "here (default: stdout)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="with --prompts: the most prompts generated at once")
    args = parser.parse_args()
    for flag, low, high in (("max_length", 1, 1 << 20), ("seed", 0, MAX_SEED),
                            ("num_samples", 1, 1 << 16), ("max_batch", 1, 4096)):
        if getattr(args, flag) is not None:
            require_within(f"--{flag.replace('_', '-')}", getattr(args, flag), low, high)
    param, problem = Sampling(args.temperature, args.top_k, args.top_p).problem()
    require(not param, f"--{param.replace('_', '-')} {problem}")
    for flag in ("prompt", "system"):
        check_utf8(getattr(args, flag), f"--{flag}")
    if args.prompts:
        clash = [flag for flag, given in (("--prompt", args.prompt), ("--chat", args.chat),
                                          ("--num-samples", args.num_samples > 1),
                                          ("--no-cache", args.no_cache)) if given]
        require(not clash, f"--prompts generates every prompt of its file, with neither "
                f"{', '.join(clash)} — leave those out (a chat prompt is a JSONL line with "
                "\"messages\")")
    if args.compile is None and not args.prompts:  # compiling takes seconds: it pays on long
        args.compile = not args.no_cache and (  # work only, and a step of one shape
            args.max_length * args.num_samples >= COMPILE_FROM_TOKENS)
    require(args.out is None or args.prompts, "--out is where --prompts writes, and no "
            "--prompts was given — give --prompts FILE too, or leave --out out")
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
                              temperature=args.temperature, top_k=args.top_k,
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


def read_prompts(path: str) -> list[dict]:
    """The prompts of --prompts FILE as {"prompt": text} or {"messages": [...]}: each line of a
    text file (empty lines too: the end-of-text token), each line of a .jsonl file."""
    require(os.path.isfile(path), f"--prompts {path} not found — give a file of prompts")
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        check_utf8(line, f"line {number} of {path}")
        if not path.endswith(".jsonl"):
            records.append({"prompt": line})
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError(f"line {number} of {path} is not JSON — write one JSON object per "
                            "line, or use a .txt file of prompts") from None
        text, messages = (record.get("prompt"), record.get("messages")) if isinstance(
            record, dict) else (None, None)
        turns_ok = isinstance(messages, list) and all(
            isinstance(turn, dict) and turn.get("role") in ROLES
            and isinstance(turn.get("content"), str) for turn in messages)
        require(isinstance(text, str) or turns_ok, f"line {number} of {path} has neither "
                "\"prompt\" (a string) nor \"messages\" (a list of {\"role\": system, user "
                "or assistant, \"content\": text}) — give it one")
        records.append({"prompt": text} if isinstance(text, str) else {"messages": messages})
    require(records, f"--prompts {path} holds no prompt — write one per line")
    return records


def generate_file(trained: TrainedModel, args: argparse.Namespace, records: list[dict],
                  seed: int) -> None:
    """--prompts: every prompt of the file (`records`) through the engine, --max-batch at a
    time; a JSON line per prompt, in the file's order."""
    tokenizer, context = trained.tokenizer, trained.context_length
    requests = []
    for index, record in enumerate(records):
        if "messages" in record:
            ids = tokenizer.encode(render(tokenizer.chat, record["messages"], True))
            end_id = tokenizer.token_id(tokenizer.chat.end_of_turn)
        else:
            ids = tokenizer.encode(record["prompt"]) or [tokenizer.end_of_text_id]
            end_id = tokenizer.end_of_text_id
        requests.append(Request(ids[-context:], args.max_length, end_id, args.temperature,
                                args.top_k, args.top_p, (seed + index) % MAX_SEED))
    engine = Engine(trained.model, context, trained.precision, args.max_batch,
                    compile=bool(args.compile))
    if args.compile:
        engine.warm_up(budget_seconds=math.inf)  # every width, before the first prompt
    with tqdm(total=len(requests), unit="prompt", desc="generating") as bar:
        for request in requests:
            engine.submit(request)
        while engine.rows or engine.waiting:
            done = sum(request.done.is_set() for request in requests)
            engine.step()
            bar.update(sum(request.done.is_set() for request in requests) - done)
    lines = "".join(json.dumps({**record, "text": tokenizer.decode(
        request.tokens[:-1] if request.finish_reason == "stop" else request.tokens),
        "finish_reason": request.finish_reason, "completion_tokens": len(request.tokens)},
        ensure_ascii=False) + "\n" for record, request in zip(records, requests))
    if args.out:
        atomic_write(args.out, lambda f: f.write(lines.encode("utf-8")))
    else:
        print(lines, end="", flush=True)


def main() -> None:
    args = parse_args()
    records = read_prompts(args.prompts) if args.prompts else []  # checked before the model loads
    if args.out:
        check_writable(os.path.dirname(os.path.abspath(args.out)))
    trained = resolve_dtype(load_trained(args.ckpt_path, args.config, args.device),
                            args.dtype, args.ckpt_path,
                            compiled=bool(args.compile) and not args.no_cache)
    seed = args.seed if args.seed is not None else torch.seed()  # torch.seed(): a fresh one
    if args.prompts:
        generate_file(trained, args, records, seed)
        return
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
