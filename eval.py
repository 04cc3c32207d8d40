"""Benchmark scores of a trained model: multiple-choice tasks by log-likelihood, as
lm-evaluation-harness scores them (scoring.py), on raw text.

    python eval.py --ckpt_path checkpoints/best_model.pth --tasks shakespeare-line my_task.jsonl
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time

from checkpoints import load_trained
from quantize import DTYPES, resolve_dtype
from scoring import Encoder, Task, score_task_across_ranks, with_fewshot
from tasks import BUILTIN, load_tasks
from utils import ArgumentParser, require_within, run_cli


def parse_args() -> argparse.Namespace:
    parser = ArgumentParser(description="Score a trained SLM checkpoint or Hugging Face Llama "
                            "directory on multiple-choice tasks.",
                            epilog='A task file has one JSON object per line: {"context": "...", '
                            '"choices": ["...", "..."], "gold": <index of the right choice>}.')
    parser.add_argument("--ckpt_path", default="checkpoints/best_model.pth",
                        help="checkpoint written by train.py, or a Hugging Face Llama directory")
    parser.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                        help=f"JSONL task files or built-in tasks ({', '.join(BUILTIN)})")
    parser.add_argument("--limit", type=int, default=None, help="score the first N examples")
    parser.add_argument("--fewshot", type=int, default=0,
                        help="prefix each example with K others from its task (fixed seed)")
    parser.add_argument("--json", action="store_true", help="print one JSON line of results on "
                        "stdout (the table goes to stderr)")
    parser.add_argument("--config", help="YAML config for tokenizer and device (default: stored)")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="weights and products: as trained by default (fp32 on a CPU, the "
                        "config's autocast on a GPU), or int8 or bf16 for a quick look "
                        "(docs/generation.md)")
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda", "mps"),
                        help="default: training.device of the config")
    args = parser.parse_args()
    if args.limit is not None:
        require_within("--limit", args.limit, 1, 1 << 30)
    require_within("--fewshot", args.fewshot, 0, 1 << 16)
    return args


def format_row(name: str, result: dict[str, float], seconds: float) -> str:
    def with_error(metric: str) -> str:
        error = result[f"{metric}_stderr"]
        return f"{result[metric]:.4f} ± {error:.4f}" if not math.isnan(error) else \
            f"{result[metric]:.4f}"

    return (f"{name:<24} {result['n']:>6} {with_error('acc'):>17} {with_error('acc_norm'):>17} "
            f"{result['n'] / seconds:>9.1f}")


def main() -> None:
    args = parse_args()
    results = {}
    # With --json, stdout holds the JSON line alone: the table and any progress note go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        tasks = [with_fewshot(task, args.fewshot) for task in load_tasks(args.tasks)]
        tasks = [Task(task.name, task.examples[:args.limit]) for task in tasks]
        trained = load_trained(args.ckpt_path, args.config, args.device)
        if args.dtype is not None:
            trained = resolve_dtype(trained, args.dtype, args.ckpt_path)
        encoder = Encoder(trained.tokenizer)
        rows = [f"{'task':<24} {'n':>6} {'acc':>17} {'acc_norm':>17} {'examples/s':>9}"]
        for task in tasks:
            start = time.perf_counter()
            result = score_task_across_ranks(trained.model, encoder, task,
                                             trained.context_length, trained.device,
                                             trained.precision, show_progress=True)
            rows.append(format_row(task.name, result, time.perf_counter() - start))
            results[task.name] = {key: result[key] for key in ("acc", "acc_norm", "n")}
        print(f"{args.ckpt_path}, {args.fewshot}-shot, {trained.device.type} "
              f"({args.dtype or trained.precision}):")
        print("\n".join(rows), flush=True)
    if args.json:
        print(json.dumps(results), flush=True)


if __name__ == "__main__":
    run_cli(main)
