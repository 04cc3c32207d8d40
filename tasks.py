"""Which task a name means: a JSONL file (scoring.read_task_file) or a built-in task, made
deterministically from the default corpus's validation text, the tail of the token stream that
the default run holds out and never trains on. Four choices each, so chance is 0.25:

- shakespeare-line: a verse line cut after half its words; which second half completes it.
- shakespeare-next-line: a speech's first lines; which line comes next.

The wrong choices are answers to other contexts of the same kind, drawn at random.
"""
from __future__ import annotations

import os
import random
from typing import Callable

from bpe import load_tokenizer
from data import prepare_tokens
from plays import Speech, build_default_corpus, speeches
from scoring import Example, Task, read_task_file
from utils import DataConfig, UserError

REPO = os.path.dirname(os.path.abspath(__file__))
MAX_EXAMPLES = 500        # per built-in task
NUM_CHOICES = 4


def validation_text() -> str:
    """The default corpus's validation split as text: the default data config's token stream
    (built and cached in the repository on first use), its last val_split decoded."""
    defaults = DataConfig()
    data = DataConfig(tokenizer_path=os.path.join(REPO, defaults.tokenizer_path),
                      raw_text_path=os.path.join(REPO, defaults.raw_text_path))
    if not os.path.exists(data.raw_text_path):  # built on first use, as a default run builds it
        build_default_corpus(data.raw_text_path)
    tokenizer = load_tokenizer(data.tokenizer_path)
    tokens, _ = prepare_tokens(data, tokenizer)
    num_val = int(len(tokens) * data.val_split)
    return tokenizer.decode(tokens[len(tokens) - num_val:].tolist())


def multiple_choice(pairs: list[tuple[str, str]], name: str) -> list[Example]:
    """Up to MAX_EXAMPLES of the (context, answer) pairs, drawn with a fixed seed, each with
    three other pairs' answers as its wrong choices and its own in a random place."""
    rng = random.Random(0)
    answers = sorted({answer for _, answer in pairs})
    examples = []
    for index in sorted(rng.sample(range(len(pairs)), min(MAX_EXAMPLES, len(pairs)))):
        context, answer = pairs[index]
        choices = [other for other in rng.sample(answers, NUM_CHOICES + 2) if other != answer]
        choices = rng.sample(choices, NUM_CHOICES - 1)
        gold = rng.randrange(NUM_CHOICES)
        choices.insert(gold, answer)
        examples.append(Example(context, tuple(choices), gold, name))
    return examples


def line_endings(plays: list[list[Speech]]) -> list[Example]:
    """A speech's speaker and its lines so far, then the first half of a line of six words or
    more; which second half completes it."""
    pairs = []
    for speaker, lines in (speech for play in plays for speech in play):
        for index, line in enumerate(lines):
            words = line.split(" ")
            if len(words) >= 6 and not line.startswith("["):  # [Aside] and the like
                earlier = "".join(f"{earlier}\n" for earlier in lines[:index])
                half = len(words) // 2
                pairs.append((f"{speaker}:\n{earlier}" + " ".join(words[:half]),
                              " ".join(words[half:])))
    return multiple_choice(pairs, "shakespeare-line")


def next_lines(plays: list[list[Speech]]) -> list[Example]:
    """A speech's speaker and its first lines (one or more); which line comes next."""
    pairs = [(f"{speaker}:\n" + "".join(f"{line}\n" for line in lines[:index]), lines[index])
             for play in plays for speaker, lines in play for index in range(1, len(lines))
             if not lines[index].startswith("[")]
    return multiple_choice(pairs, "shakespeare-next-line")


BUILTIN: dict[str, Callable[[list[list[Speech]]], list[Example]]] = {
    "shakespeare-line": line_endings,
    "shakespeare-next-line": next_lines,
}


def load_tasks(specs: list[str]) -> list[Task]:
    """The tasks `specs` name: a built-in task's name, else a JSONL file."""
    tasks, plays = [], None
    for spec in specs:
        if spec in BUILTIN:
            plays = plays or speeches(validation_text())
            tasks.append(Task(spec, BUILTIN[spec](plays)))
        elif os.path.exists(spec) or spec.endswith(".jsonl") or os.sep in spec:
            tasks.append(read_task_file(spec))
        else:
            raise UserError(f"unknown task '{spec}' — give a JSONL file or a built-in task: "
                            f"{', '.join(BUILTIN)}")
    names = [task.name for task in tasks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"two tasks are named {duplicates[0]} — rename one file: results are "
                        "reported by name")
    return tasks
