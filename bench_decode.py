"""Decode speed by dtype beside llama.cpp, and the matrix-vector paths behind it:

    python bench_decode.py [CKPT] [--shape default|smollm2] [--agreement TRAINED_CKPT]

Prints, for CKPT (or a random model of --shape: the default shape with a 256-token window, or
SmolLM2-135M's), the GB/s of weights each matrix-vector path PyTorch offers reads in a batch-1
step's products, then batch-1 greedy decode tokens/s of SLM in each --dtype, eager and compiled,
beside llama.cpp (llama-cpp-python, requirements-dev.txt) on f32 and q8_0 GGUFs of the same
weights (f32 KV cache), each run in turn, best of 3; with --agreement, int8's and bf16's top-1
agreement with fp32 on a trained checkpoint's validation text. Numbers are printed, not
asserted: compare ratios taken in one run.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F

from bench_deploy import (GGUF_WINDOWS, RUNS, SHAPES, decode_tokens_per_sec,
                          exported_gguf, random_checkpoint, slm_decode)
from checkpoints import load_trained
from data import prepare_data
from generate import compile_decoder
from model import Transformer
from quantize import Int8Linear, bf16_is_native, products, top1_agreement, with_dtype
from runtime import cpu_name
from utils import ArgumentParser, Config, load_config, run_cli

DECODE_PROMPT = 32
DECODE_TOKENS = 128


def matvec_rates(model: Transformer) -> dict[str, float]:
    """GB/s of weights read by each matrix-vector path on one row through every product of
    `model` in a step's order (the whole step's weights: more than any cache holds)."""
    weights = [linear.weight.detach() for _, _, linear in products(model)]
    rows = {width: torch.randn(1, width) for width in {weight.shape[1] for weight in weights}}
    fp32_bytes = 4 * sum(weight.numel() for weight in weights)

    def each(multiply: Callable, prepared: list) -> Callable[[], None]:
        return lambda: [multiply(rows[weight.shape[1]], weight, extra)
                        for weight, extra in zip(weights, prepared)]

    int8 = [Int8Linear(weight) for weight in weights]
    paths = {
        "fp32 F.linear (BLAS)": (each(lambda x, w, _: F.linear(x, w), weights), 1.0),
        "fp32 oneDNN, packed": (each(lambda x, w, p: torch.ops.mkldnn._linear_pointwise(
            x, p, None, "none", [], ""), [torch.ops.mkldnn._reorder_linear_weight(w, 1)
                                          for w in weights]), 1.0),
        "fp32 compiled step (reductions)": (lambda: step(rows), 1.0),
        "bf16 F.linear": (each(lambda x, w, b: F.linear(x.bfloat16(), b),
                               [w.bfloat16() for w in weights]), 0.5),
        "int8 _weight_int8pack_mm, bf16 rows": (each(lambda x, w, q: q(x), int8), 0.25),
    }
    if torch._C.has_mkl:
        paths["fp32 MKL, packed"] = (each(lambda x, w, p: torch.ops.mkl._mkl_linear(
            x, p, w, None, 1), [torch.ops.mkl._mkl_reorder_linear_weight(w, 1)
                                for w in weights]), 1.0)
    step = compile_decoder(lambda rows: [F.linear(rows[w.shape[1]], w) for w in weights],
                           torch.device("cpu"))  # as decoding compiles: the head's bound too
    rates = {}
    with torch.inference_mode():
        for name, (run, share) in paths.items():
            run()  # warm-up (and the compile)
            seconds = []
            for _ in range(RUNS):
                start = time.perf_counter()
                run()
                seconds.append(time.perf_counter() - start)
            rates[name] = share * fp32_bytes / min(seconds) / 1e9
    return rates


def bench_decode(ckpt_path: str | None, shape: str, agreement_path: str | None,
                 config: Config) -> None:
    """The matvec paths' GB/s, then decode tokens/s of SLM in each dtype and of llama.cpp."""
    import llama_cpp  # requirements-dev.txt
    label = ckpt_path or f"a random model of the {shape} shape"
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as directory:
        ckpt_path = ckpt_path or random_checkpoint(directory, shape)
        trained = load_trained(ckpt_path, device_name="cpu")
        rates = matvec_rates(trained.model)
        prompt = torch.randint(trained.tokenizer.vocab_size, (
            1, min(DECODE_PROMPT, trained.context_length // 4)),
            generator=torch.Generator().manual_seed(0))
        count = min(DECODE_TOKENS, trained.context_length - prompt.shape[1])
        variants = {"fp32": trained, "int8": with_dtype(trained, "int8")}
        if bf16_is_native(trained.device):
            variants["bf16"] = with_dtype(trained, "bf16")
        runs: dict[str, Callable[[], float]] = {}
        for dtype, variant in variants.items():
            for compiled in (False, True):
                runs[f"SLM {dtype}{', compiled' if compiled else ''}"] = functools.partial(
                    slm_decode, variant, prompt, count, compiled)
        for dtype in ("f32", "q8_0"):
            path = exported_gguf(ckpt_path, directory, dtype)
            llm = llama_cpp.Llama(model_path=path, n_ctx=trained.context_length,
                                  n_threads=threads, verbose=False,
                                  type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
            runs[f"llama.cpp {dtype}"] = functools.partial(
                lambda llm: decode_tokens_per_sec(itertools.islice(llm.generate(
                    prompt[0].tolist(), temp=0.0, repeat_penalty=1.0, reset=True), count)), llm)
        for run in runs.values():
            run()  # warm-up: compiles, first touches
        speeds = {name: 0.0 for name in runs}
        for _ in range(RUNS):  # in turns, so that a neighbour's burst slows them alike
            for name, run in runs.items():
                speeds[name] = max(speeds[name], run())
    print(f"{label}: {trained.model.num_params():,} parameters, {threads} threads, "
          f"{cpu_name()}")
    print(f"{'matrix-vector path, one step of products':<44}{'GB/s':>7}")
    for name, rate in rates.items():
        print(f"{name:<44}{rate:>7.1f}")
    head = trained.model.lm_head.weight.numel()
    blocks = sum(linear.weight.numel() for _, _, linear in products(trained.model)) - head
    bytes_per_step = {"fp32": 4 * (blocks + head), "f32": 4 * (blocks + head),
                      "bf16": 2 * blocks + 4 * head,  # quantize.py keeps the head fp32 in bf16
                      "int8": blocks + head, "q8_0": 34 / 32 * (blocks + head)}
    print(f"{'batch-1 greedy decode, ' + str(count) + ' tokens':<44}{'tok/s':>7}{'GB/s':>7}"
          f"{'/ llama.cpp f32':>17}")
    for name, speed in speeds.items():
        dtype = name.split()[1].rstrip(",")
        print(f"{name:<44}{speed:>7.1f}{speed * bytes_per_step[dtype] / 1e9:>7.1f}"
              f"{speed / speeds['llama.cpp f32']:>16.2f}x")
    fp32 = speeds["SLM fp32, compiled"]
    print(f"  int8 / fp32 (compiled): {speeds['SLM int8, compiled'] / fp32:.2f}x; int8 / "
          f"llama.cpp q8_0: {speeds['SLM int8, compiled'] / speeds['llama.cpp q8_0']:.2f}x")
    if agreement_path:
        reference = load_trained(agreement_path, device_name="cpu")
        data = dataclasses.replace(config.data, tokenizer_path=reference.tokenizer.path,
                                   context_length=reference.context_length)
        windows = [window.tolist() for window, _ in itertools.islice(
            prepare_data(Config(reference.model.config, data, config.training))[2],
            GGUF_WINDOWS)]
        print(f"top-1 agreement with fp32 on {agreement_path}'s validation text: " + ", ".join(
            f"{dtype} {top1_agreement(reference, with_dtype(reference, dtype), windows):.2%}"
            for dtype in ("int8", "bf16")))


def main() -> None:
    parser = ArgumentParser(description="Decode tokens/s by dtype beside llama.cpp, and the "
                            "matrix-vector paths' GB/s.")
    parser.add_argument("ckpt_path", nargs="?", help="default: a random model of --shape")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="smollm2")
    parser.add_argument("--agreement", metavar="TRAINED_CKPT",
                        help="a trained checkpoint: int8's and bf16's agreement with fp32")
    parser.add_argument("--config", default="configs.yaml",
                        help="config whose corpus gives --agreement's validation text")
    args = parser.parse_args()
    bench_decode(args.ckpt_path, args.shape, args.agreement, load_config(args.config))


if __name__ == "__main__":
    run_cli(main)
