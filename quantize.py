"""The weights a decode step reads, and in what dtype: `--dtype auto|fp32|bf16|int8` of infer.py,
serve.py and eval.py.

A batch-1 decode step reads every weight once to make one token, so its speed is the rate at
which weights stream from memory: a kernel that streams them faster, then fewer bytes per
weight, are the levers (docs/generation.md has the figures and the CPU they were taken on).

- fp32: the weights as trained. A compiled step has inductor turn each one-row product, the
  head's too, into a reduction of its own (generate.CPU_COMPILE_OPTIONS), which streams a weight
  matrix faster than the BLAS call F.linear makes for one row.
- bf16: the blocks' weights in bf16, multiplied by activations rounded to bf16; the head, the
  embedding, the norms, attention and the residual stream stay fp32 (bf16 logits would flip
  top-1 wherever two tokens are close). Only where bf16 is native (a GPU, or a CPU with
  AVX512-BF16 or AMX): elsewhere each product converts in software, so it is refused.
- int8: the blocks' and the head's weights quantized when the model loads, symmetric per
  output channel (int8 values, a scale per row), multiplied by bf16 activations
  (aten._weight_int8pack_mm: its fp32-activation kernel is not vectorised on every CPU). A
  quarter of fp32's bytes.
- auto: fp32, unless int8 (or bf16, where native) decodes this model at least AUTO_MIN_SPEEDUP
  faster, compiled or eager as the run will decode, and its top-1 agreement with fp32 meets its
  bound, measured on text the fp32 model samples. Decided once per CPU, threads, torch,
  checkpoint and way of decoding, and kept (runtime.decided_once).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import TrainedModel
from generate import generate
from model import Transformer
from runtime import (BUSY_SHARE, autocast_context, cpu_identity, decided_once, decisions_path,
                     with_others_share)
from utils import require

DTYPES = ("auto", "fp32", "bf16", "int8")
AGREEMENT_BOUND = {"bf16": 0.99, "int8": 0.98}  # top-1 with fp32, as llama.cpp's files meet
AUTO_MIN_SPEEDUP = 1.3       # a lower precision must decode this much faster to be chosen
AUTO_SAMPLE_TOKENS = 128     # fp32's sample that agreement is measured on
AUTO_TIMED_STEPS = 16        # decode steps timed per dtype and round
AUTO_TIMED_ROUNDS = 3        # rounds, the dtypes in turns


class Int8Linear(nn.Module):
    """A Linear's weight as int8 rows and a scale per row: y = (x @ q.T) * scale."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scale)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


class BF16Linear(nn.Module):
    """A Linear's weight in bf16, multiplied by the input rounded to bf16; the output goes back
    to the input's dtype, so the residual stream stays fp32."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)


def products(model: Transformer) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, name, Linear) for every block product and the head: what a step streams."""
    return [(parent, name, child) for parent in model.modules()
            for name, child in parent.named_children() if isinstance(child, nn.Linear)]


def bf16_is_native(device: torch.device) -> bool:
    """A GPU, or a CPU with AVX512-BF16 or AMX: bf16 products without software conversion."""
    return device.type != "cpu" or torch.cpu._is_avx512_bf16_supported() or (
        torch.cpu._is_amx_tile_supported())


def with_dtype(trained: TrainedModel, dtype: str) -> TrainedModel:
    """`trained` decoding in `dtype` (fp32, bf16 or int8): a copy of its model for bf16 and int8,
    the same model for fp32. int8's head gets weights of its own (the embedding keeps fp32's)."""
    if dtype == "fp32":
        return dataclasses.replace(trained, precision="fp32")
    # a copy sharing every tensor, whose Linear slots are its own to replace
    model = copy.deepcopy(trained.model, {id(tensor): tensor for tensor in [
        *trained.model.parameters(), *trained.model.buffers()]})
    for parent, name, linear in products(model):
        if dtype == "int8":
            setattr(parent, name, Int8Linear(linear.weight))
        elif linear is not model.lm_head:  # bf16 logits would flip the near-ties of top-1
            setattr(parent, name, BF16Linear(linear.weight))
    # a GPU keeps its autocast (attention and the cache in bf16); a CPU computes the rest in fp32
    precision = trained.precision if trained.device.type != "cpu" else "fp32"
    return dataclasses.replace(trained, model=model.eval(), precision=precision)


def resolve_dtype(trained: TrainedModel, dtype: str, checkpoint_path: str,
                  compiled: bool = False) -> TrainedModel:
    """`trained` decoding in `dtype`; auto decided as the module's docstring says, for decoding
    compiled or eager as the caller will run it, and printed on one line with what was
    measured."""
    require(dtype in DTYPES, f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    if dtype == "bf16":
        require(bf16_is_native(trained.device), "--dtype bf16 needs native bf16 (a GPU, or a "
                "CPU with AVX512-BF16 or AMX); this CPU would convert every product in "
                "software and decode slower than fp32 — use --dtype int8 or fp32")
    if dtype != "auto":
        return with_dtype(trained, dtype)
    if trained.device.type != "cpu":  # a GPU's autocast precision (runtime.setup_precision)
        return trained
    stat = os.stat(checkpoint_path)
    key = {"decision": "decode_dtype", **cpu_identity(), "rule": [AUTO_MIN_SPEEDUP,
           AGREEMENT_BOUND], "model": dataclasses.asdict(
        trained.model.config), "checkpoint": [os.path.abspath(checkpoint_path), stat.st_size,
                                              stat.st_mtime_ns], "compiled": compiled}
    choice, reason, kept = decided_once(key, lambda: measure_dtypes(trained, compiled))
    decoding = "compiled" if compiled else "eager"
    where = (f"decided once for this CPU, checkpoint and {decoding} decoding, kept in "
             f"{decisions_path()}" if kept else "not kept")
    print(f"dtype auto: {choice} ({reason}); {where} — pin it with --dtype fp32 or int8",
          file=sys.stderr, flush=True)
    return with_dtype(trained, choice)


def measure_dtypes(trained: TrainedModel, compiled: bool) -> tuple[str, str, bool]:
    """auto's choice: the fastest lower precision that meets its agreement bound on a sample of
    fp32's and decodes AUTO_MIN_SPEEDUP x faster (compiled or eager), else fp32; fp32, not
    kept, when other processes held the CPUs during the timing. -> (dtype, what was measured,
    whether to keep it)"""
    candidates = ["int8"] + ["bf16"] * bf16_is_native(trained.device)
    generator = torch.Generator(trained.device).manual_seed(0)
    start = torch.tensor([[trained.tokenizer.end_of_text_id]], device=trained.device)
    sample = torch.cat([start] + [token[:, None] for token in generate(
        trained.model, start, min(AUTO_SAMPLE_TOKENS, trained.context_length - 1),
        trained.context_length, temperature=1.0, generator=generator)], dim=1)
    variants = {"fp32": trained, **{dtype: with_dtype(trained, dtype) for dtype in candidates}}
    agreement = {dtype: top1_agreement(trained, variants[dtype], [sample[0].tolist()])
                 for dtype in candidates}
    # an untimed warm-up: the compile (its C++ compiler's processes would count as others'
    # load) and the weights' first touch
    for variant in variants.values():
        timed_decode_steps(variant, compiled)
    seconds, others_share = with_others_share(
        lambda: decode_step_seconds(variants, compiled))
    if others_share > BUSY_SHARE:  # a noisy timing could flip the choice from start to start
        return "fp32", (f"other processes took {others_share:.0%} of the CPUs while the dtypes "
                        "were timed: fp32 until a quiet start times them"), False
    speedup = {dtype: seconds["fp32"] / seconds[dtype] for dtype in candidates}
    passing = [dtype for dtype in candidates if agreement[dtype] >= AGREEMENT_BOUND[dtype]
               and speedup[dtype] >= AUTO_MIN_SPEEDUP]
    choice = max(passing, key=speedup.get, default="fp32")
    measured = "; ".join(f"{dtype} {speedup[dtype]:.2f}x fp32's decode speed, top-1 agreement "
                         f"{agreement[dtype]:.1%} (needs {AUTO_MIN_SPEEDUP}x, "
                         f"{AGREEMENT_BOUND[dtype]:.0%})" for dtype in candidates)
    return choice, measured, True


@torch.inference_mode()
def top1_agreement(reference: TrainedModel, other: TrainedModel,
                   windows: list[list[int]]) -> float:
    """The share of positions of `windows` (token lists) where both models' likeliest next
    token is the same."""
    same = total = 0
    for window in windows:
        ids = torch.tensor([window], device=reference.device)
        with autocast_context(reference.device, reference.precision):
            expected = reference.model(ids)[0].argmax(-1)
        with autocast_context(other.device, other.precision):
            got = other.model(ids)[0].argmax(-1)
        same, total = same + int((expected == got).sum()), total + expected.numel()
    return same / max(1, total)


def timed_decode_steps(trained: TrainedModel, compiled: bool,
                       prompt_tokens: int = 128) -> list[float]:
    """Seconds of each of AUTO_TIMED_STEPS batch-1 greedy decode steps of `trained`, as
    generate() runs them, after a prompt short enough that no step refills the window."""
    length = max(1, min(prompt_tokens, trained.context_length - AUTO_TIMED_STEPS - 1))
    prompt = torch.full((1, length), trained.tokenizer.end_of_text_id, device=trained.device)
    with autocast_context(trained.device, trained.precision):
        times = [time.perf_counter() for _ in generate(  # the first token is the prefill's
            trained.model, prompt, AUTO_TIMED_STEPS + 1, trained.context_length,
            temperature=0.0, compile=compiled)]
    return [after - before for before, after in zip(times, times[1:])]


def decode_step_seconds(variants: dict[str, TrainedModel], compiled: bool) -> dict[str, float]:
    """Median seconds of a decode step of each model (timed_decode_steps), the models taking
    turns so that a neighbour's burst slows them alike. Compiled, each step should have been
    compiled before."""
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(AUTO_TIMED_ROUNDS):
        for name, trained in variants.items():
            seconds[name] += timed_decode_steps(trained, compiled)
    return {name: statistics.median(times) for name, times in seconds.items()}
