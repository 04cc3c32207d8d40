"""Multiple-choice tasks scored by log-likelihood, by lm-evaluation-harness's rule (its
`_encode_pair`, `_loglikelihood_tokens` and multiple-choice metrics), for eval.py and for the
training loop's `training.eval_tasks`.

A task is a JSONL file, one example per line: {"context": str, "choices": [str, ...], "gold": int},
or a built-in task's name (tasks.py). Each choice is scored as the continuation " " + choice of
its context: the sum of its tokens' log-probabilities. acc takes the best sum, acc_norm the best
sum per character of the choice.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from bpe import BPETokenizer
from distributed import all_reduce
from model import Transformer
from runtime import autocast_context
from utils import UserError, require

TARGET_DELIMITER = " "     # between a context and each choice, as lm-evaluation-harness's default
FEWSHOT_DELIMITER = "\n\n"  # between few-shot examples and before the scored context
FEWSHOT_SEED = 1234         # lm-evaluation-harness's few-shot seed


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    gold: int
    where: str  # "FILE, line N" (or the built-in task's name), for errors that concern it


@dataclass(frozen=True)
class Task:
    name: str  # a file's stem, or a built-in task's name
    examples: list[Example]


def read_task_file(path: str) -> Task:
    """The examples of a JSONL task file; a malformed line is refused with its number."""
    require(os.path.isfile(path), f"task file '{path}' not found — give a JSONL file of "
            '{"context", "choices", "gold"} lines or a built-in task name')
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}) — save it as UTF-8"
                        ) from None
    except OSError as err:
        raise UserError(f"cannot read task file {path} ({err.strerror}) — make it readable"
                        ) from None
    examples = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            examples.append(parse_example(line, f"{path}, line {number}"))
    require(bool(examples), f"task file '{path}' holds no examples — write one JSON object per "
            'line: {"context": "...", "choices": ["...", "..."], "gold": 0}')
    return Task(os.path.splitext(os.path.basename(path))[0], examples)


def parse_example(line: str, where: str) -> Example:
    try:
        item = json.loads(line)
    except ValueError as err:
        raise UserError(f"{where}: not JSON ({str(err)[:80]}) — write one JSON object per line"
                        ) from None
    fix = 'each line is {"context": "...", "choices": ["...", "..."], "gold": <index>}'
    require(isinstance(item, dict), f"{where}: not a JSON object — {fix}")
    context, choices, gold = item.get("context"), item.get("choices"), item.get("gold")
    require(isinstance(context, str), f"{where}: no \"context\" string — {fix}")
    require(isinstance(choices, list) and len(choices) >= 2,
            f"{where}: \"choices\" is not a list of at least two — {fix}")
    for index, choice in enumerate(choices):
        require(isinstance(choice, str) and bool(choice), f"{where}: choice {index} is "
                f"{choice!r}, not a non-empty string — {fix}")
    require(isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices),
            f"{where}: \"gold\" is {gold!r}, not an index into its {len(choices)} choices — "
            f"give 0 to {len(choices) - 1}")
    return Example(context, tuple(choices), gold, where)


def with_fewshot(task: Task, num_shots: int) -> Task:
    """Each example's context after `num_shots` others of the same task (never itself), drawn
    with a fixed seed, each written as its context, a space and its gold choice."""
    if not num_shots:
        return task
    examples = task.examples
    require(num_shots < len(examples), f"--fewshot {num_shots} needs more than {num_shots} "
            f"examples, and {task.name} has {len(examples)} — lower --fewshot")
    shots = []
    for index, example in enumerate(examples):
        rng = random.Random(f"{FEWSHOT_SEED}:{index}")
        picks = [i for i in rng.sample(range(len(examples)), num_shots + 1) if i != index]
        prefix = "".join(examples[i].context + TARGET_DELIMITER
                         + examples[i].choices[examples[i].gold] + FEWSHOT_DELIMITER
                         for i in picks[:num_shots])
        shots.append(Example(prefix + example.context, example.choices, example.gold,
                             example.where))
    return Task(task.name, shots)


class Encoder:
    """Text to token ids as lm-evaluation-harness's HF backend encodes: the tokenizer's own
    special tokens are added (a post-processor that adds bos adds it), except to text that
    already starts with the prefix token (bos, else eos), which an empty context becomes."""

    def __init__(self, tokenizer: BPETokenizer):
        self.tokenizer = tokenizer
        prefix = tokenizer.chat.special_tokens.get("bos_token") or tokenizer.end_of_text
        self.prefix_id = tokenizer.token_id(prefix)
        require(self.prefix_id is not None, f"{tokenizer.path} has no {prefix} token to start "
                "an empty context with — use the tokenizer the model was trained with")
        self.prefix_text = tokenizer.decode([self.prefix_id])
        # what the post-processor adds around a text's ids: the same around every text
        marked = tokenizer.hf.encode("a", add_special_tokens=True).ids
        plain = tokenizer.encode("a")
        start = next((i for i in range(len(marked) - len(plain) + 1)
                      if marked[i:i + len(plain)] == plain), None)
        require(start is not None, f"{tokenizer.path}'s post-processor changes a text's own ids "
                "— use a tokenizer whose post-processor only adds special tokens around them")
        self.before, self.after = marked[:start], marked[start + len(plain):]

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text)
        if special_tokens and not text.startswith(self.prefix_text):
            return self.before + ids + self.after
        return ids

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids): the context's trailing whitespace moves to the
        continuation, whose ids are those of the whole after the context's."""
        if not context:
            ids = self.encode(continuation, special_tokens=False)
            return ([self.prefix_id], ids) if ids[0] != self.prefix_id else (ids[:1], ids[1:])
        stripped = context.rstrip()
        continuation, context = context[len(stripped):] + continuation, stripped
        whole, context_ids = self.encode(context + continuation), self.encode(context)
        return context_ids or [self.prefix_id], whole[len(context_ids):]


def task_requests(task: Task, encoder: Encoder,
                  window: int) -> list[tuple[list[int], list[int]]]:
    """Every (model input, continuation ids) of the task, example by example, choice by choice.
    An input longer than the window keeps its newest tokens, as the harness truncates."""
    requests = []
    for example in task.examples:
        for index, choice in enumerate(example.choices):
            context, continuation = encoder.pair(example.context, TARGET_DELIMITER + choice)
            require(0 < len(continuation) <= window, f"{example.where}: choice {index} is "
                    f"{len(continuation)} tokens, which the model's {window}-token window "
                    "cannot score — shorten it or drop the example")
            requests.append(((context + continuation)[-(window + 1):][:-1], continuation))
    return requests


def shared_prefixes(requests: list[tuple[list[int], list[int]]]
                    ) -> dict[tuple[int, ...], dict[tuple[int, ...], list[int]]]:
    """The requests by the input that predicts their first continuation token, then by
    continuation: {prefix: {continuation: [request index, ...]}} (equal requests share one)."""
    groups: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for i, (inputs, continuation) in enumerate(requests):
        prefix = tuple(inputs[:len(inputs) - len(continuation) + 1])
        groups.setdefault(prefix, {}).setdefault(tuple(continuation), []).append(i)
    return groups


def forwards_needed(requests: list[tuple[list[int], list[int]]]) -> int:
    """How many forwards continuation_logprobs runs for `requests`."""
    return sum(1 + (max(map(len, continuations)) > 1)
               for continuations in shared_prefixes(requests).values())


@torch.inference_mode()
def continuation_logprobs(model: Transformer, requests: list[tuple[list[int], list[int]]],
                          device: torch.device, precision: str, progress: str | None = None,
                          forwards: int = 0) -> list[float]:
    """Each request's summed log-probability of its continuation, the last tokens of its input
    (plus the one the input leaves out). The input up to the position that predicts the first
    continuation token is prefilled once into the KV cache for every request that shares it
    (an example's choices, unless truncation made their inputs differ); their remaining
    continuation tokens then run as one batch on copies of that cache. Equal requests (a
    duplicated choice) are scored once, so they tie exactly. One-token forwards follow until
    `forwards` have run, so that ranks with fewer requests keep in step with the others."""
    groups = shared_prefixes(requests)
    scores = [0.0] * len(requests)
    with tqdm(total=len(requests), desc=progress, unit="choice", disable=progress is None,
              leave=False) as bar, autocast_context(device, precision):
        for prefix, by_continuation in groups.items():
            continuations = list(by_continuation)
            length, longest = len(prefix), max(map(len, continuations)) - 1
            positions = torch.arange(length + longest, device=device)
            caches = model.new_caches(1, length + longest)
            first = model(torch.tensor([prefix], device=device), caches=caches,
                          input_pos=positions[:length], last_only=True)[0].float()
            logits = first.expand(len(continuations), 1, -1)
            if longest:
                for cache in caches:  # a copy of the prefix's keys and values per continuation
                    cache.k, cache.v = (cache.k.expand(len(continuations), -1, -1, -1).clone(),
                                        cache.v.expand(len(continuations), -1, -1, -1).clone())
                tails = torch.zeros(len(continuations), longest, dtype=torch.long)
                for row, continuation in enumerate(continuations):  # right-padded: causal
                    tails[row, :len(continuation) - 1] = torch.tensor(continuation[:-1])
                rest = model(tails.to(device), caches=caches, input_pos=positions[length:])[0]
                logits = torch.cat((logits, rest.float()), dim=1)
            logprobs = logits - logits.logsumexp(dim=-1, keepdim=True)
            for row, continuation in enumerate(continuations):
                steps = torch.arange(len(continuation), device=device)
                score = logprobs[row, steps, torch.tensor(continuation, device=device)].sum()
                for i in by_continuation[continuation]:
                    scores[i] = score.item()
                bar.update(len(by_continuation[continuation]))
        for _ in range(forwards - forwards_needed(requests)):
            model(torch.zeros(1, 1, dtype=torch.long, device=device))
    return scores


def choice_scores(model: Transformer, encoder: Encoder, task: Task, window: int,
                  device: torch.device, precision: str, progress: str | None = None,
                  forwards: int = 0) -> list[list[float]]:
    """Each example's summed log-probability of each of its choices (continuation_logprobs)."""
    flat = continuation_logprobs(model, task_requests(task, encoder, window), device, precision,
                                 progress, forwards)
    scores, start = [], 0
    for example in task.examples:
        scores.append(flat[start:start + len(example.choices)])
        start += len(example.choices)
    return scores


def score_task_across_ranks(model: Transformer, encoder: Encoder, task: Task, window: int,
                            device: torch.device, precision: str,
                            show_progress: bool = False) -> dict[str, float]:
    """acc, acc_norm, their standard errors and n. Under torchrun each rank scores every
    world_size-th example, running as many forwards as the busiest rank (under FSDP each
    forward meets the other ranks), and every rank gets the whole task's result."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = Task(task.name, task.examples[rank::world_size])
    forwards = all_reduce(torch.tensor(forwards_needed(task_requests(mine, encoder, window)),
                                       device=device), dist.ReduceOp.MAX)
    training = model.training
    model.eval()  # no dropout while scoring; a training run's model goes back to training
    scores = choice_scores(model, encoder, mine, window, device, precision,
                           task.name if show_progress and rank == 0 else None, int(forwards))
    model.train(training)
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, scores)
        scores = [gathered[i % world_size][i // world_size] for i in range(len(task.examples))]
    return task_metrics(task.examples, scores)


def task_metrics(examples: Sequence[Example], choice_scores: Sequence[Sequence[float]]
                 ) -> dict[str, float]:
    """lm-evaluation-harness's multiple-choice metrics: the first best choice counts (ties go
    to it); acc_norm divides by the choice's length in characters; the standard error is the
    sample standard deviation over sqrt(n)."""
    def first_best(values: list[float]) -> int:
        return max(range(len(values)), key=values.__getitem__)

    correct = {"acc": [], "acc_norm": []}
    for example, scores in zip(examples, choice_scores):
        per_char = [score / len(choice) for score, choice in zip(scores, example.choices)]
        correct["acc"].append(float(first_best(list(scores)) == example.gold))
        correct["acc_norm"].append(float(first_best(per_char) == example.gold))
    n, result = len(examples), {"n": len(examples)}
    for metric, values in correct.items():
        mean = sum(values) / n
        result[metric] = mean
        result[f"{metric}_stderr"] = (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
                                      / math.sqrt(n) if n > 1 else math.nan)
    return result
