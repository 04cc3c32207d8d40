"""Benchmarks on whatever device the config picks: matmul peak, training throughput and MFU,
generation with and without the KV cache. (bench_data.py times preparing a corpus's token
cache; bench_parallel.py the memory-saving training modes; bench_deploy.py the ways out: GGUF
files in llama.cpp, and serve.py.)

    python bench.py configs.yaml [section.key=value ...] [--json] [--compile] [--steps 20]

MFU is always model FLOP/s (model.flops_per_token) over the matmul peak measured here, on this
device, in the run's precision — never a datasheet constant. Numbers are printed, not asserted:
compare ratios taken in one run, since shared machines are noisy.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import resource
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import TokenWindows, epoch_loader, epoch_order, prepare_data
from generate import generate
from model import Transformer
from optim import FUSED_ADAMW, configure_optimizers, forward_backward, optimizer_step
from runtime import (autocast_context, bf16_is_fast, keep_freed_memory, measure_peak_flops,
                     pick_device, setup_precision, sync)
from utils import ArgumentParser, Config, ModelConfig, load_config, require_within, run_cli

GENERATION_TOKENS = 256
GENERATION_PROMPT = 32
GENERATION_RUNS = 3
GENERATION_RUN_SECONDS = 10.0  # one row stops repeating after this long


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_peak(device: torch.device, precision: str) -> dict:
    """Matmul FLOP/s of this device in fp32, bf16 (on CUDA and CPU), and the run's precision."""
    names = dict.fromkeys(["fp32", *(["bf16"] if device.type != "mps" else []), precision])
    return {name: measure_peak_flops(device, name, seconds=1.0) for name in names}


def training_precisions(device: torch.device, precision: str, peak_flops: dict) -> list[str]:
    """The run's precision, and beside fp32 on a CPU bf16 too where its matmul peak passes the
    gate `precision: auto` applies before it times both."""
    bf16_too = device.type == "cpu" and precision == "fp32" and bf16_is_fast(
        device, peak_flops.__getitem__)
    return [precision, *(["bf16"] if bf16_too else [])]


class ReferenceGPT(nn.Module):
    """`--reference`: a plain GPT-2-style decoder with the work per token of SLM's (same width,
    depth, heads, vocabulary and tied head; a GELU MLP of 4x width costs what SwiGLU's three
    8/3x projections do), but LayerNorm and learned positions instead of RMSNorm and RoPE."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config, self.num_heads = c, c.num_heads
        self.wte, self.wpe = nn.Embedding(c.vocab_size, c.embed_dim), nn.Embedding(
            c.max_seq_len, c.embed_dim)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "ln_1": nn.LayerNorm(c.embed_dim), "qkv": nn.Linear(c.embed_dim, 3 * c.embed_dim),
            "proj": nn.Linear(c.embed_dim, c.embed_dim), "ln_2": nn.LayerNorm(c.embed_dim),
            "fc": nn.Linear(c.embed_dim, 4 * c.embed_dim),
            "fc_proj": nn.Linear(4 * c.embed_dim, c.embed_dim)}) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.embed_dim)
        self.lm_head = nn.Linear(c.embed_dim, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.layers:
            q, k, v = block["qkv"](block["ln_1"](x)).view(B, T, 3, self.num_heads, -1).unbind(2)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=True)
            x = x + block["proj"](y.transpose(1, 2).reshape(B, T, -1))
            x = x + block["fc_proj"](F.gelu(block["fc"](block["ln_2"](x))))
        logits = self.lm_head(self.ln_f(x))
        return logits, None

    num_params = Transformer.num_params  # counted as SLM's are, so MFU compares
    flops_per_token = Transformer.flops_per_token


def bench_training(config: Config, train_set: TokenWindows, device: torch.device, precision: str,
                   newton_schulz_dtype: str, compile_model: bool, steps: int, warmup_steps: int,
                   make_model: Callable[[ModelConfig], nn.Module] = Transformer) -> dict:
    """Steady-state optimizer steps on the real data pipeline, after untimed warmup_steps."""
    torch.manual_seed(config.training.seed)
    model = make_model(config.model).to(device)
    optimizers = configure_optimizers(model, config.training, device, newton_schulz_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    train_model = torch.compile(model) if compile_model else model
    accum = config.training.grad_accum_steps
    batches = (batch for epoch in itertools.count() for batch in epoch_loader(
        train_set, config.data, epoch_order(len(train_set), 0, epoch), 0, device.type == "cuda"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data_seconds, start = 0.0, 0.0
    for step in range(warmup_steps + steps):
        if step == warmup_steps:
            sync(device)
            data_seconds, start = 0.0, time.perf_counter()
        for _ in range(accum):
            fetch_start = time.perf_counter()
            x, y = next(batches)
            data_seconds += time.perf_counter() - fetch_start
            forward_backward(train_model, x, y, device, precision, scaler,
                             1 / (accum * y.numel()))
        optimizer_step(optimizers, scaler, config.training.lr, config.training.grad_clip)
    sync(device)
    seconds = time.perf_counter() - start
    tokens_per_sec = steps * accum * config.data.batch_size * config.data.context_length / seconds
    model_flops = model.flops_per_token(config.data.context_length) * tokens_per_sec
    peak_memory_mb = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
                      else peak_rss_mb())
    return {"params": model.num_params(), "step_ms": 1000 * seconds / steps,
            "tokens_per_sec": tokens_per_sec, "model_flops": model_flops,
            "data_wait_share": data_seconds / seconds, "peak_memory_mb": peak_memory_mb}


def bench_optimizer(model: Transformer, config: Config, device: torch.device,
                    steps: int) -> dict:
    """Milliseconds per optimizer step over the model's parameters: AdamW with torch's fused
    kernels and with its default (foreach) ones (configure_optimizers uses the faster kind on
    each device), and Muon on the block matrices beside AdamW on the rest, orthogonalising in
    bf16 and in fp32."""
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    muon = dataclasses.replace(config.training, optimizer="muon")
    kinds = {"foreach": lambda: [torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False)],
             "fused": lambda: [torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)],
             **{f"muon {dtype}": functools.partial(configure_optimizers, model, muon, device, dtype)
                for dtype in ("bf16", "fp32")}}
    step_ms = {}
    for kind, make in kinds.items():
        optimizers = make()
        for step in range(3 + steps):  # the first steps allocate the moments
            if step == 3:
                sync(device)
                start = time.perf_counter()
            for optimizer in optimizers:
                optimizer.step()
        sync(device)
        step_ms[kind] = 1000 * (time.perf_counter() - start) / steps
    model.zero_grad(set_to_none=True)
    return step_ms


@torch.no_grad()
def bench_generation(model: Transformer, context_length: int, device: torch.device, precision: str,
                     batch_size: int, use_cache: bool, compile_model: bool) -> dict:
    """Prefill = time to the first new token; decode = the other GENERATION_TOKENS - 1 tokens,
    in the window `context_length` (the generation rule); each the best of up to GENERATION_RUNS
    runs, so a burst of other load on a shared machine does not skew one row against another.
    The untimed warm-up (which compiles, when asked) covers the prefill and the decode step."""
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, GENERATION_PROMPT),
                           device=device, generator=torch.Generator(device=device).manual_seed(0))
    options = {"temperature": 0.0, "use_cache": use_cache, "compile": compile_model}
    prefill_seconds, decode_seconds = float("inf"), float("inf")
    with autocast_context(device, precision):
        start = time.perf_counter()
        list(generate(model, prompt, 3, context_length, **options))
        sync(device)
        warmup_seconds = time.perf_counter() - start
        runs_start = time.perf_counter()
        for _ in range(GENERATION_RUNS):
            if time.perf_counter() - runs_start > GENERATION_RUN_SECONDS:
                break
            start, first_token_at = time.perf_counter(), None
            for _ in generate(model, prompt, GENERATION_TOKENS, context_length, **options):
                if first_token_at is None:
                    sync(device)
                    first_token_at = time.perf_counter()
            sync(device)
            prefill_seconds = min(prefill_seconds, first_token_at - start)
            decode_seconds = min(decode_seconds, time.perf_counter() - first_token_at)
    return {"warmup_s": warmup_seconds, "prefill_ms": 1000 * prefill_seconds,
            "decode_tokens_per_sec": batch_size * (GENERATION_TOKENS - 1) / decode_seconds}


def print_table(results: dict) -> None:
    peak = results["peak_flops"]
    print("\npeak matmul: " + ", ".join(f"{name} {flops / 1e9:,.0f} GFLOP/s"
                                        for name, flops in peak.items()))
    print(f"\n{'training':<34}{'params':>11}{'step ms':>10}{'tokens/s':>11}{'GFLOP/s':>10}"
          f"{'MFU':>7}{'data wait':>11}{'peak MB':>9}")
    for name, row in results["training"].items():
        print(f"{name:<34}{row['params']:>11,}{row['step_ms']:>10.1f}"
              f"{row['tokens_per_sec']:>11,.0f}{row['model_flops'] / 1e9:>10.1f}{row['mfu']:>7.1%}"
              f"{row['data_wait_share']:>11.1%}{row['peak_memory_mb']:>9,.0f}")
    for name, row in results["training"].items():
        reference = results["training"].get(f"reference GPT-2, {name}")
        if reference:
            print(f"SLM / reference GPT-2 tokens/s, {name}: "
                  f"{row['tokens_per_sec'] / reference['tokens_per_sec']:.2f}x")
    step_ms = results["optimizer_step_ms"]
    print(f"optimizer step alone: AdamW foreach {step_ms['foreach']:.2f} ms, fused "
          f"{step_ms['fused']:.2f} ms ({step_ms['foreach'] / step_ms['fused']:.2f}x; training "
          f"uses {'fused' if results['fused_adamw'] else 'foreach'} here)")
    training_ms = next(iter(results["training"].values()))["step_ms"]
    print(f"Muon on the blocks + AdamW, orthogonalising in bf16 {step_ms['muon bf16']:.2f} ms, "
          f"in fp32 {step_ms['muon fp32']:.2f} ms ({step_ms['muon bf16'] / training_ms:.0%} and "
          f"{step_ms['muon fp32'] / training_ms:.0%} of the {training_ms:.0f} ms training step "
          f"above; training uses {results['newton_schulz_dtype']} here)")
    print(f"\n{f'generation, {GENERATION_TOKENS} new tokens':<34}{'warm-up s':>10}"
          f"{'prefill ms':>11}{'decode tok/s':>14}")
    for name, row in results["generation"].items():
        print(f"{name:<34}{row['warmup_s']:>10.1f}{row['prefill_ms']:>11.1f}"
              f"{row['decode_tokens_per_sec']:>14,.0f}")
    rows = results["generation"]
    for name, cached in rows.items():
        uncached = rows.get(name.replace("KV cache", "no cache"))
        if "KV cache" in name and uncached:
            print(f"KV cache speed-up at {name.replace(', KV cache', '')}: "
                  f"{cached['decode_tokens_per_sec'] / uncached['decode_tokens_per_sec']:.1f}x")


def main() -> None:
    parser = ArgumentParser(description="Benchmark SLM on the device the config picks.")
    parser.add_argument("config", help="YAML config, e.g. configs.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override one config value")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--compile", action="store_true",
                        help="measure training and generation with torch.compile as well")
    parser.add_argument("--reference", action="store_true",
                        help="also train a plain GPT-2-style model of equal work per token and "
                        "print SLM's tokens/s as a ratio to it")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed training steps first")
    args = parser.parse_args()
    require_within("--steps", args.steps, 1, 1 << 20)
    require_within("--warmup-steps", args.warmup_steps, 0, 1 << 20)
    config = load_config(args.config, args.overrides)
    device = pick_device(config.training.device)
    precision = setup_precision(config.training.precision, device)
    keep_freed_memory()
    print(f"device {device} ({precision}), {torch.get_num_threads()} CPU threads, "
          f"torch {torch.__version__}", flush=True)

    peak_flops = bench_peak(device, precision)  # first: the tokenizer's threads may spin on after
    tokenizer, train_set, _ = prepare_data(config)
    newton_schulz = "bf16" if bf16_is_fast(device, peak_flops.__getitem__) else "fp32"
    results = {"device": str(device), "precision": precision,
               "fused_adamw": device.type in FUSED_ADAMW, "newton_schulz_dtype": newton_schulz,
               "model": dataclasses.asdict(config.model), "peak_flops": peak_flops,
               "training": {}}
    models = {"": Transformer, **({"reference GPT-2, ": ReferenceGPT} if args.reference else {})}
    for (name, make_model), row_precision, compiled in itertools.product(
            models.items(), training_precisions(device, precision, peak_flops),
            (False, True) if args.compile else (False,)):
        row = bench_training(config, train_set, device, row_precision, newton_schulz, compiled,
                             args.steps, args.warmup_steps, make_model)
        row["mfu"] = row["model_flops"] / peak_flops[row_precision]  # against its matmuls' peak
        results["training"][f"{name}{row_precision}{', compiled' if compiled else ''}"] = row
    model = Transformer(config.model).to(device)
    results["optimizer_step_ms"] = bench_optimizer(model, config, device, args.steps)
    model.eval()
    results["generation"] = {
        f"batch {batch}{', compiled' if compiled else ''}, {'KV cache' if cached else 'no cache'}":
        bench_generation(model, config.data.context_length, device, precision, batch, cached,
                         compiled)
        for compiled in ((False, True) if args.compile else (False,)) for batch in (1, 8)
        for cached in (True, False)}
    print_table(results)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    run_cli(main)
