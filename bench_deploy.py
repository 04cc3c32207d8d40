"""Benchmarks of the ways out of PyTorch's loop, beside SLM's own generate (infer.py's path);
decoding by dtype is bench_decode.py's:

    python bench_deploy.py gguf CKPT [--config configs.yaml]
    python bench_deploy.py serve [CKPT] [--shape default|smollm2] [--prompt-tokens 32]
                                 [--new-tokens 64] [--clients 1,4,8,16]

gguf exports CKPT in each GGUF dtype and compares the files in llama.cpp (llama-cpp-python,
requirements-dev.txt): size, agreement with f32 on validation text, decode tokens/s. serve starts
serve.py on CKPT and times one streamed client (time to first token, tokens/s) beside
generate's, one client sending 8 requests one after another, and each count of clients at once,
every request exactly --new-tokens long (their total tokens/s, the median time to the first
token). Without CKPT it serves a random model of the default shape with a
256-token window, or of SmolLM2-135M's (30 x 576, 9/3 heads, vocabulary 49,152, an 8,192-token
window). Numbers are printed, not asserted: compare ratios taken in one run.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Iterator

import numpy as np
import torch
from tokenizers.decoders import DecodeStream

from bpe import load_tokenizer
from checkpoints import TrainedModel, load_trained, save_checkpoint
from data import prepare_data
from generate import generate
from gguf_export import DTYPES
from model import Transformer
from runtime import autocast_context
from utils import (ArgumentParser, Config, DataConfig, ModelConfig, UserError, config_to_dict,
                   load_config, require, require_within, run_cli)

REPO = os.path.dirname(os.path.abspath(__file__))
RUNS = 3  # each figure is the best of this many runs: other load only ever slows one
ECHO_TOKENS = 2048  # the echo request /health is timed beside (at most the window)
GGUF_WINDOWS = 16  # validation windows each GGUF dtype's logits are compared on
GGUF_WINDOW_TOKENS = 512  # at most: the logits of every position are kept
GGUF_PROMPT = 32
GGUF_DECODE_TOKENS = 256  # at most
SHAPES = {
    "default": ModelConfig(max_seq_len=256),
    "smollm2": ModelConfig(vocab_size=49152, embed_dim=576, num_heads=9, num_kv_heads=3,
                           ff_dim=1536, num_layers=30, max_seq_len=8192, rope_theta=100000.0),
}


def decode_tokens_per_sec(tokens: Iterator) -> float:
    """Tokens/s of a generator of tokens after its first one (the prefill's)."""
    next(tokens)
    start = time.perf_counter()
    count = sum(1 for _ in tokens)
    return count / (time.perf_counter() - start)


def exported_gguf(ckpt_path: str, directory: str, dtype: str) -> str:
    """export.py's GGUF of `ckpt_path` in `dtype`, written in `directory`; -> its path."""
    path = os.path.join(directory, f"{dtype}.gguf")
    exported = subprocess.run([sys.executable, os.path.join(REPO, "export.py"), "--ckpt_path",
                               ckpt_path, "--out", path, "--dtype", dtype],
                              capture_output=True, text=True)
    require(exported.returncode == 0, "export.py failed: " + (
        exported.stderr.strip().splitlines() or ["(no message)"])[-1])
    return path


def bench_gguf(config: Config, ckpt_path: str) -> None:
    """Each GGUF dtype's file size, its logits' agreement with f32's in llama.cpp over
    validation windows (top-1, mean |delta|), and greedy decode tokens/s from GGUF_PROMPT
    tokens (a quarter window at most) on to a full window or GGUF_DECODE_TOKENS: llama.cpp on
    each file, and SLM's generate as infer.py runs it, eager and compiled. The windows are the
    config's validation text, tokenized and cut as the checkpoint was trained."""
    try:
        import llama_cpp  # requirements-dev.txt: compiled for this CPU at install
    except ImportError:
        raise UserError("bench_deploy.py gguf runs llama.cpp through llama-cpp-python — pip "
                        "install -r requirements-dev.txt") from None
    trained = load_trained(ckpt_path, device_name="cpu")
    context, threads = trained.context_length, torch.get_num_threads()
    data = dataclasses.replace(config.data, tokenizer_path=trained.tokenizer.path,
                               context_length=context)
    val_set = prepare_data(Config(trained.model.config, data, config.training))[2]
    windows = [window[:GGUF_WINDOW_TOKENS].tolist()
               for window, _ in itertools.islice(val_set, GGUF_WINDOWS)]
    prompt = windows[0][:min(GGUF_PROMPT, context // 4)]
    count = min(context - len(prompt), GGUF_DECODE_TOKENS)
    logits, rows = {}, {}
    with tempfile.TemporaryDirectory() as directory:
        for dtype in DTYPES:
            path = exported_gguf(ckpt_path, directory, dtype)
            llm = llama_cpp.Llama(model_path=path, n_ctx=context,
                                  n_batch=min(context, GGUF_WINDOW_TOKENS),
                                  n_threads=threads, logits_all=True, verbose=False,
                                  type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
            window_logits = []
            for window in windows:
                llm.reset()
                llm.eval(window)
                window_logits.append(np.array(llm.scores[:len(window)]))
            logits[dtype] = np.concatenate(window_logits)
            rows[dtype] = {"size_mb": os.path.getsize(path) / 1e6, "decode": max(
                decode_tokens_per_sec(itertools.islice(llm.generate(
                    prompt, temp=0.0, repeat_penalty=1.0, reset=True), count))
                for _ in range(RUNS))}
    with autocast_context(trained.device, trained.precision), torch.no_grad():
        logits["SLM"] = torch.cat([trained.model(torch.tensor([window]))[0][0]
                                   for window in windows]).float().numpy()
        for compiled in (False, True):
            rows[f"SLM generate{', compiled' if compiled else ''}"] = {"decode": max(
                slm_decode(trained, torch.tensor([prompt]), count, compiled)
                for _ in range(RUNS))}
    print(f"{ckpt_path}: {trained.model.num_params():,} parameters, {context}-token window, "
          f"{threads} threads; logits over {len(logits['f32']):,} validation positions")
    print(f"{'':<30}{'file MB':>9}{'top-1 = f32':>13}{'mean |dlogit|':>15}"
          f"{'decode tok/s':>14}")
    for name, row in rows.items():
        dtype = "SLM" if name.startswith("SLM") else name
        agreement = (logits[dtype].argmax(-1) == logits["f32"].argmax(-1)).mean()
        delta = np.abs(logits[dtype] - logits["f32"]).mean()
        label = f"{name} ({trained.precision})" if dtype == "SLM" else f"llama.cpp {name}"
        size = f"{row['size_mb']:.2f}" if "size_mb" in row else ""
        print(f"{label:<30}{size:>9}{agreement:>13.2%}{delta:>15.1e}{row['decode']:>14,.0f}")


def random_checkpoint(directory: str, shape: str) -> str:
    """A random model of `shape` with SLM's tokenizer, its window the whole RoPE table; a larger
    vocabulary is padding (zero rows, as in a padded embedding)."""
    model_config = SHAPES[shape]
    config = Config(model=model_config, data=DataConfig(
        tokenizer_path=os.path.join(REPO, DataConfig.tokenizer_path),
        context_length=model_config.max_seq_len))
    tokenizer = load_tokenizer(config.data.tokenizer_path, model_config.vocab_size)
    torch.manual_seed(0)
    model = Transformer(model_config)
    with torch.no_grad():  # rows past the tokenizer score 0, so greedy picks real tokens' text
        model.embed_tokens.weight[tokenizer.vocab_size:] = 0
    path = os.path.join(directory, f"random-{shape}.pth")
    save_checkpoint({"model": model.state_dict(),
                     "config": config_to_dict(config),
                     "tokenizer": tokenizer.fingerprint}, path)
    return path


def generate_timing(trained: TrainedModel, prompt: list[int], new_tokens: int) -> dict:
    """infer.py's path, each token decoded as it streams: time to the first token (the
    prefill) and decode tokens/s after it."""
    pieces = DecodeStream(skip_special_tokens=False)
    start = time.perf_counter()
    with autocast_context(trained.device, trained.precision):
        tokens = generate(trained.model, torch.tensor([prompt], device=trained.device),
                          new_tokens, trained.context_length, temperature=0.0)
        pieces.step(trained.tokenizer.hf, int(next(tokens)))
        first = time.perf_counter()
        count = sum(1 for token in tokens if pieces.step(trained.tokenizer.hf, int(token)) or 1)
    return {"first_token_ms": 1000 * (first - start),
            "tokens_per_sec": count / (time.perf_counter() - first)}


def streamed_timing(url: str, prompt: list[int], new_tokens: int) -> dict:
    """One streamed /v1/completions request of exactly `new_tokens` (ignore_eos): time to its
    first text and tokens/s after it."""
    body = json.dumps({"prompt": [prompt], "max_tokens": new_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body,
                                     {"Content-Type": "application/json"})
    start, first, tokens = time.perf_counter(), None, 0
    with urllib.request.urlopen(request) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"]:
                first = time.perf_counter()
            tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
    end = time.perf_counter()
    return {"first_token_ms": 1000 * (first - start),
            "tokens_per_sec": (tokens - 1) / (end - first), "tokens": tokens,
            "seconds": end - start}


def health_during_echo(url: str, prompt: list[int]) -> tuple[float, float]:
    """The median and the slowest /health answer (ms) while a non-streaming echo of `prompt`
    with logprobs is scored."""
    body = json.dumps({"prompt": [prompt], "max_tokens": 1, "echo": True,
                       "logprobs": 1}).encode()
    scoring = threading.Thread(target=lambda: urllib.request.urlopen(urllib.request.Request(
        f"{url}/v1/completions", body, {"Content-Type": "application/json"})).read())
    scoring.start()
    seconds = []
    while scoring.is_alive():
        start = time.perf_counter()
        urllib.request.urlopen(f"{url}/health").read()
        seconds.append(time.perf_counter() - start)
        time.sleep(0.02)
    scoring.join()
    seconds.sort()
    return 1000 * seconds[len(seconds) // 2], 1000 * seconds[-1]


def clients_at_once(url: str, prompts: list[list[int]], new_tokens: int) -> dict:
    """A client per prompt, all at once: their tokens/s in all and their median first token."""
    start, results = time.perf_counter(), []
    threads = [threading.Thread(target=lambda prompt=prompt: results.append(
        streamed_timing(url, prompt, new_tokens))) for prompt in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    firsts = sorted(result["first_token_ms"] for result in results)
    return {"tokens_per_sec": sum(result["tokens"] for result in results) / (
        time.perf_counter() - start), "first_token_ms": firsts[len(firsts) // 2]}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(ckpt_path: str, max_batch: int, compile: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "serve.py"), "--ckpt_path",
                                ckpt_path, "--port", str(port), "--device", "cpu",
                                "--max-batch", str(max_batch),
                                "--compile" if compile else "--no-compile"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None:
            raise UserError(f"serve.py did not start: {process.stderr.read().strip()[-300:]}")
        try:
            urllib.request.urlopen(f"{url}/health")
            return process, url
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)


def bench_serve(ckpt_path: str | None, shape: str, prompt_tokens: int, new_tokens: int,
                clients: list[int], compile: bool) -> None:
    """infer.py's generate beside serve.py's engine: one streamed client, then N clients at
    once (each its own prompt), and one client sending the 8 requests one after another."""
    label = ckpt_path or f"a random model of the {shape} shape"
    with tempfile.TemporaryDirectory() as directory:
        ckpt_path = ckpt_path or random_checkpoint(directory, shape)
        trained = load_trained(ckpt_path, device_name="cpu")
        require(prompt_tokens + new_tokens - 1 <= trained.context_length, f"--prompt-tokens "
                f"{prompt_tokens} + --new-tokens {new_tokens} do not fit the model's "
                f"{trained.context_length}-token window — ask for fewer")
        draws = torch.Generator().manual_seed(0)
        prompts = [torch.randint(trained.tokenizer.vocab_size, (prompt_tokens,),
                                 generator=draws).tolist() for _ in range(max(clients + [8]))]
        rows = {"generate (infer.py's path)": [generate_timing(trained, prompts[0], new_tokens)
                                               for _ in range(RUNS)]}
        context_length, vocab_size = trained.context_length, trained.tokenizer.vocab_size
        del trained  # the server loads its own copy
        process, url = start_server(ckpt_path, max(clients), compile)
        try:
            rows["serve.py, 1 streamed client"] = [streamed_timing(url, prompts[0], new_tokens)
                                                   for _ in range(RUNS)]
            start = time.perf_counter()
            one_by_one = sum(streamed_timing(url, prompt, new_tokens)["tokens"]
                             for prompt in prompts[:8]) / (time.perf_counter() - start)
            together = {count: clients_at_once(url, prompts[:count], new_tokens)
                        for count in clients}
            echo_tokens = min(ECHO_TOKENS, context_length - 1)
            health = health_during_echo(url, torch.randint(
                vocab_size, (echo_tokens,), generator=draws).tolist())
        finally:
            process.terminate()
            process.wait()
    print(f"{label}: {torch.get_num_threads()} threads, {prompt_tokens}-token prompts, "
          f"exactly {new_tokens} new tokens each, greedy; best of {RUNS} runs")
    print(f"{'':<32}{'first token ms':>15}{'decode tok/s':>14}")
    for name, runs in rows.items():
        print(f"{name:<32}{min(run['first_token_ms'] for run in runs):>15.1f}"
              f"{max(run['tokens_per_sec'] for run in runs):>14,.1f}")
    engine, alone = (max(run["tokens_per_sec"] for run in rows[name]) for name in rows)
    print(f"  serve.py's engine at batch 1 / generate: {alone / engine:.2f}x")
    print(f"{'serve.py, clients at once':<32}{'median first ms':>15}{'tokens/s in all':>16}")
    print(f"{'1 client, 8 requests in turn':<32}{'':>15}{one_by_one:>16,.1f}")
    for count, result in together.items():
        print(f"{f'{count} at once':<32}{result['first_token_ms']:>15.1f}"
              f"{result['tokens_per_sec']:>16,.1f}")
    print(f"/health while a {echo_tokens}-token echo is scored: median {health[0]:.1f} ms, "
          f"slowest {health[1]:.1f} ms")
    rates = {count: result["tokens_per_sec"] for count, result in together.items()}
    if 8 in rates:
        print(f"  8 at once / 8 in turn: {rates[8] / one_by_one:.2f}x" + (
            f"; 16 at once / 8 at once: {rates[16] / rates[8]:.2f}x" if 16 in rates else ""))


def slm_decode(trained: TrainedModel, prompt: torch.Tensor, count: int, compiled: bool) -> float:
    """Greedy decode tokens/s of `trained` after `prompt`, as infer.py runs it."""
    with autocast_context(trained.device, trained.precision):
        return decode_tokens_per_sec(generate(trained.model, prompt, count,
                                              trained.context_length, temperature=0.0,
                                              compile=compiled))


def main() -> None:
    parser = ArgumentParser(description="Benchmark GGUF exports in llama.cpp, or serve.py.")
    commands = parser.add_subparsers(dest="command", required=True)
    gguf = commands.add_parser("gguf", help="each GGUF dtype in llama.cpp beside SLM")
    gguf.add_argument("ckpt_path", help="checkpoint or Hugging Face Llama directory")
    gguf.add_argument("--config", default="configs.yaml",
                      help="config whose corpus gives the validation text")
    serve = commands.add_parser("serve", help="serve.py's streamed requests beside generate")
    serve.add_argument("ckpt_path", nargs="?", help="default: a random model of --shape")
    serve.add_argument("--shape", choices=tuple(SHAPES), default="default")
    serve.add_argument("--prompt-tokens", type=int, default=32)
    serve.add_argument("--new-tokens", type=int, default=64)
    serve.add_argument("--clients", default="1,4,8,16",
                       help="comma-separated counts of clients at once (default 1,4,8,16)")
    serve.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                       help="serve.py's own default; --no-compile times its eager engine")
    args = parser.parse_args()
    if args.command == "gguf":
        bench_gguf(load_config(args.config), args.ckpt_path)
        return
    require_within("--prompt-tokens", args.prompt_tokens, 1, 1 << 20)
    require_within("--new-tokens", args.new_tokens, 2, 1 << 20)
    require(all(count.strip().isdigit() for count in args.clients.split(",")),
            f"--clients {args.clients} is not a list of counts — give e.g. 1,4,8,16")
    clients = [int(count) for count in args.clients.split(",")]
    for count in clients:
        require_within("--clients", count, 1, 1024)
    bench_serve(args.ckpt_path, args.shape, args.prompt_tokens, args.new_tokens, clients,
                args.compile)


if __name__ == "__main__":
    run_cli(main)
