"""Corpus files: which files `data.raw_text_path` names, and how each format reads as documents.

Every format is one entry of FORMATS: its file suffix, its reader, and the data settings that
change what it reads. The file resolver, the token cache's key and the error messages all take
them from there, so a new format is a reader and one line in the table. Text and JSONL also come
compressed (gzip, zstd), read through a decompressing stream. The default corpus (plays.py) is
built on first use.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import glob
import gzip
import io
import itertools
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator

import zstandard

from chat import conversation_problem
from plays import DEFAULT_CORPUS, build_default_corpus
from utils import DataConfig, UserError, require, warn

if TYPE_CHECKING:  # imported where a parquet file is read: slow to import
    import pyarrow.parquet

READ_CHUNK_BYTES = 1 << 22   # read 4 MiB at a time: memory stays flat however large the corpus
LINE_END_BYTES = 1 << 20     # how far past READ_CHUNK_BYTES a text piece may run to end on a line
WHITESPACE = b" \t\n\r\v\f"  # ASCII: a cut before one of them never splits a UTF-8 character
PARQUET_BATCH_ROWS = 1024    # rows decoded at a time; a chunk gathers batches up to 4 MiB
ZSTD_READ_BYTES = 1 << 17    # compressed bytes handed to the decompressor at a time


@dataclass
class Chunk:
    """Part of a corpus file. With `whole_documents`, each text is one document, which the
    token stream ends with the end-of-text token; without, the single text continues a document
    that a chunk with an empty text ends. `num_bytes`: the file bytes it was read from;
    `text_bytes`: the text's bytes as they decompress (default: num_bytes). A chunk of
    conversations (chat.py's messages lists) holds them instead of texts."""
    texts: list[str]
    whole_documents: bool
    num_bytes: int
    conversations: list[list[dict]] = field(default_factory=list)
    text_bytes: int = -1

    def __post_init__(self) -> None:
        if self.text_bytes < 0:
            self.text_bytes = self.num_bytes


def read_text(f: BinaryIO, path: str, data: DataConfig) -> Iterator[Chunk]:
    """A UTF-8 text file is one document, read in pieces of 4 MiB that run on to the end of a
    line. A piece whose line does not end within LINE_END_BYTES more ends just before its last
    whitespace instead (the tokenizer's words begin with their space), or, with none, before its
    last character: memory stays bounded for text without newlines too."""
    offset, rest = 0, b""  # rest: what a cut left for the next piece
    while True:
        piece = rest + f.read(max(READ_CHUNK_BYTES - len(rest), 0))
        piece += f.readline(READ_CHUNK_BYTES + LINE_END_BYTES - len(piece))
        if not piece:
            break
        rest = b""
        if len(piece) == READ_CHUNK_BYTES + LINE_END_BYTES and not piece.endswith(b"\n"):
            cut = text_cut(piece)
            piece, rest = piece[:cut], piece[cut:]
        try:
            yield Chunk([piece.decode("utf-8")], False, len(piece))
        except UnicodeDecodeError as err:
            raise UserError(f"{path} is not valid UTF-8 (byte offset {offset + err.start}) — "
                            "re-encode it as UTF-8, e.g. iconv -t UTF-8") from None
        offset += len(piece)
    yield Chunk([""], True, 0)


def text_cut(piece: bytes) -> int:
    """Where UTF-8 text that runs on without a line end is cut: before its last whitespace
    byte after the first (the tokenizer's words begin with their space; an ASCII byte is never
    part of a longer character), else before the lead byte of its last character; 0: nowhere."""
    cut = max(piece.rfind(byte, 1) for byte in WHITESPACE)
    if cut > 0:
        return cut
    cut = len(piece) - 1
    while cut > max(0, len(piece) - 4) and piece[cut] & 0xC0 == 0x80:  # a continuation byte
        cut -= 1
    return max(cut, 0)


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


def row_group_starts(parquet: pyarrow.parquet.ParquetFile) -> list[int]:
    """The byte where each row group of a parquet file begins (its first column's first page):
    a piece of the file [start, end) holds the row groups that begin in it."""
    starts = []
    for group in range(parquet.metadata.num_row_groups):
        column = parquet.metadata.row_group(group).column(0)
        dictionary = column.has_dictionary_page and column.dictionary_page_offset
        starts.append(dictionary or column.data_page_offset)
    return starts


def read_parquet(f: BinaryIO, path: str, data: DataConfig, start: int = 0,
                 end: int | None = None) -> Iterator[Chunk]:
    """Each row of a parquet file is a document in its `data.text_field` column, or a
    conversation in its `messages` column (as a JSONL line is). Rows are decoded a batch at a
    time, row group after row group, so memory stays bounded by a row group at any file size.
    With a byte range, only the row groups that begin in it (a shard's piece of the file)."""
    import pyarrow.parquet  # here: slow to import, and only a parquet corpus needs it

    end = f.seek(0, os.SEEK_END) if end is None else end
    try:
        parquet = pyarrow.parquet.ParquetFile(f)
        columns = parquet.schema_arrow.names
        conversations = "messages" in columns
        column = "messages" if conversations else data.text_field
        require(column in columns, f"{path} has no column '{column}' (its columns: "
                f"{', '.join(columns)[:200]}) — set data.text_field to the column that holds the "
                "text, or give conversations a 'messages' column")
        groups = [group for group, first in enumerate(row_group_starts(parquet))
                  if start <= first < end]
        rows = [parquet.metadata.row_group(group).num_rows for group in groups]
        records, size, row, counted = [], 0, 0, 0
        first_row = sum(parquet.metadata.row_group(group).num_rows
                        for group in range(groups[0] if groups else 0))
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column],
                                       row_groups=groups) if groups else []
        for batch in batches:
            values = batch.column(0).to_pylist()
            for number, value in enumerate(values, first_row + row + 1):
                if conversations:
                    problem = conversation_problem({"messages": value})
                    require(not problem, f"{path}, row {number}: {problem} — fix that row "
                            "(messages: [{\"role\": \"user\"|\"assistant\"|\"system\", "
                            "\"content\": \"...\"}, ...])")
                elif not isinstance(value, str):
                    raise UserError(f"{path}, row {number}: column '{column}' holds "
                                    f"{'null' if value is None else type(value).__name__}, not "
                                    "text — fix or remove that row, or set data.text_field to "
                                    "the column that holds the text")
            records += values
            size, row = size + batch.nbytes, row + len(values)
            if size >= READ_CHUNK_BYTES or row == sum(rows):
                # read by column, not front to back: the piece's bytes are shared out by rows
                done = (end - start) * row // sum(rows)
                yield (Chunk([], True, done - counted, records, size) if conversations
                       else Chunk(records, True, done - counted, text_bytes=size))
                records, size, counted = [], 0, done
    except pyarrow.ArrowException as err:
        problem = str(err).strip().split("\n")[0]
        raise UserError(f"{path} is not a readable parquet file ({problem}) — re-download or "
                        "re-write it") from None


def zstd_blocks(f: BinaryIO) -> Iterator[bytes]:
    """The decompressed bytes of a zstd file, frame after frame. zstandard's own stream_reader
    ends silently where a truncated file does, so the frames are followed here: a file that
    stops inside one raises EOFError."""
    frame = None  # the decompressor of the frame under way
    while block := f.read(ZSTD_READ_BYTES):
        while block:
            if frame is None:
                frame = zstandard.ZstdDecompressor().decompressobj()
            yield frame.decompress(block)
            block, frame = (frame.unused_data, None) if frame.eof else (b"", frame)
    if frame is not None:
        raise EOFError("the file ends inside a zstd frame")


class BlocksFile(io.RawIOBase):
    """An iterator of byte blocks as a binary file: io.BufferedReader over it adds read(n),
    readline and iterating over lines, as the text and JSONL readers use them."""

    def __init__(self, blocks: Iterator[bytes]):
        self.blocks, self.pending = blocks, memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        while not self.pending:
            block = next(self.blocks, None)
            if block is None:
                return 0
            self.pending = memoryview(block)
        size = min(len(buffer), len(self.pending))
        buffer[:size], self.pending = self.pending[:size], self.pending[size:]
        return size


def open_gzip(f: BinaryIO) -> BinaryIO:
    return gzip.GzipFile(fileobj=f, mode="rb")


def open_zstd(f: BinaryIO) -> BinaryIO:
    return io.BufferedReader(BlocksFile(zstd_blocks(f)))


Reader = Callable[[BinaryIO, str, DataConfig], Iterator[Chunk]]
DAMAGED = (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError)


def compressed(read: Reader, kind: str, decompress: Callable[[BinaryIO], BinaryIO]) -> Reader:
    """`read` over the decompressed stream of a `kind` file: its chunks count the compressed
    bytes read (the progress bars total the file sizes), and a damaged file is one error."""
    def read_compressed(f: BinaryIO, path: str, data: DataConfig) -> Iterator[Chunk]:
        counted = 0
        try:
            for chunk in read(decompress(f), path, data):
                position = f.tell()
                yield dataclasses.replace(chunk, num_bytes=position - counted,
                                          text_bytes=chunk.num_bytes)
                counted = position
        except DAMAGED as err:
            raise UserError(f"{path} is truncated or not valid {kind} ({err}) — re-download or "
                            "re-compress it") from None
    return read_compressed


@dataclass(frozen=True)
class Format:
    suffix: str        # files with it, in a directory or a glob, are read this way
    read: Reader
    settings: tuple[str, ...]  # DataConfig fields that change what the reader yields


FORMATS = (
    Format(".txt", read_text, ()),
    Format(".jsonl", read_jsonl, ("text_field",)),
    Format(".parquet", read_parquet, ("text_field",)),
    Format(".txt.gz", compressed(read_text, "gzip", open_gzip), ()),
    Format(".jsonl.gz", compressed(read_jsonl, "gzip", open_gzip), ("text_field",)),
    Format(".txt.zst", compressed(read_text, "zstd", open_zstd), ()),
    Format(".jsonl.zst", compressed(read_jsonl, "zstd", open_zstd), ("text_field",)),
)


def suffixes() -> str:
    """The formats' suffixes, as error messages and help texts name them: ".txt/.jsonl"."""
    return "/".join(fmt.suffix for fmt in FORMATS)


def format_of(path: str) -> Format:
    """The format of a corpus file by its suffix; a file named by itself with another suffix
    (a .md, a .py) is read as text."""
    return next((fmt for fmt in FORMATS if path.endswith(fmt.suffix)), FORMATS[0])


def read_corpus_file(path: str, data: DataConfig, start: int = 0,
                     end: int | None = None) -> Iterator[Chunk]:
    """The chunks of a corpus file, or of its bytes [start, end) where a large file is cut: an
    uncompressed text or JSONL file at a line start (errors then name the piece's first byte),
    a parquet file where a row group begins. A text piece before the file's end does not end
    the document: the next piece goes on with it."""
    try:
        f = open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror}) — make it readable or take it out "
                        "of data.raw_text_path") from None
    with f:
        size, read = os.fstat(f.fileno()).st_size, format_of(path).read
        end = size if end is None else end
        if (start, end) == (0, size):
            yield from read(f, path, data)
            return
        if read is read_parquet:
            yield from read_parquet(f, path, data, start, end)
            return
        f.seek(start)
        blocks = iter(lambda: f.read(min(READ_CHUNK_BYTES, end - f.tell())), b"")
        for chunk in read(io.BufferedReader(BlocksFile(blocks)), f"{path} (from byte {start})",
                          data):
            if not (read is read_text and end < size and chunk.texts == [""]):
                yield chunk


def reading_key(files: list[str], data: DataConfig) -> str:
    """What the token cache depends on besides the files and the tokenizer: the settings of
    every format among `files`."""
    formats = {format_of(path) for path in files}
    return "\0".join(f"{name}={getattr(data, name)}" for fmt in FORMATS if fmt in formats
                     for name in fmt.settings)


Matcher = Callable[[str], bool] | str
RECURSIVE = "**"  # the glob segment that matches zero or more directories


def segment_matcher(segment: str) -> Matcher:
    """Whether a name matches one segment of a glob, as glob.glob(recursive=True) decides: `**`
    is RECURSIVE; a wildcard matches no hidden name (one starting with '.') unless the segment
    starts with '.' too; a segment without wildcards matches the name it spells."""
    if segment == RECURSIVE:
        return RECURSIVE
    if not glob.has_magic(segment):
        return segment.__eq__
    match, hidden_too = re.compile(fnmatch.translate(segment)).match, segment.startswith(".")
    return lambda name: (hidden_too or not name.startswith(".")) and match(name) is not None


def split_glob(pattern: str) -> tuple[str, list[Matcher]]:
    """A glob as the directory it starts in (what comes before its first wildcard, written as
    glob writes it in the paths it gives) and a matcher for each segment below it."""
    parts = pattern.split("/")
    first = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
    top = pattern[:sum(len(part) + 1 for part in parts[:first])]
    segments = [part for part in parts[first:-1] if part] + parts[-1:]  # glob skips a "//"
    return top.rstrip("/") or top, [segment_matcher(part) for part in segments]


def walk_matching(top: str, matchers: list[Matcher]
                  ) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """What glob.glob(recursive=True) finds below directory `top` for a pattern of segments
    `matchers`, walking each directory once (once per place in the pattern) however many paths
    lead to it: (path, real path) of every file, the broken symlinks, and the paths of
    directories passed over as walked already (a symlink loop, or a second path to one).
    Directories are walked in the sorted order of their paths, so by the first path to each."""
    end = len(matchers)
    # onward[i]: place i in the pattern and those after it that RECURSIVE segments reach by
    # matching no directory
    onward = [frozenset(range(i, next((k for k in range(i, end) if matchers[k] is not RECURSIVE),
                                      end) + 1)) for i in range(end + 1)]
    files, broken, repeats, walked = [], [], [], set()
    try:
        stat = os.stat(top or os.curdir)
    except OSError:
        return files, broken, repeats
    pending = [(top, os.path.realpath(top or os.curdir), (stat.st_dev, stat.st_ino),
                onward[0] - {end})]
    while pending:
        path, real, identity, states = pending.pop()
        if (identity, states) in walked:
            repeats.append(path)
            continue
        walked.add((identity, states))
        try:
            with os.scandir(path or os.curdir) as listing:
                entries = list(listing)
        except OSError:  # unreadable or gone: glob passes over it too
            continue
        below = []
        for entry in entries:
            reached = frozenset()
            for state in states:
                matcher = matchers[state]
                if matcher is RECURSIVE and not entry.name.startswith("."):
                    reached |= onward[state]
                elif matcher is not RECURSIVE and matcher(entry.name):
                    reached |= onward[state + 1]
            if not reached:
                continue
            listed = os.path.join(path, entry.name)
            try:  # they stat a symlink only, and once
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError:  # a symlink to itself
                is_dir = is_file = False
            if is_dir:
                if reached - {end}:
                    below.append((listed, entry, reached - {end}))
            elif end in reached and is_file:
                files.append((listed, os.path.realpath(listed) if entry.is_symlink()
                              else os.path.join(real, entry.name)))
            elif end in reached and entry.is_symlink() and not os.path.exists(listed):
                broken.append(listed)
        for listed, entry, rest in sorted(below, key=lambda d: d[0] + "/", reverse=True):
            with contextlib.suppress(OSError):
                stat = entry.stat()
                real_path = (os.path.realpath(listed) if entry.is_symlink()
                             else os.path.join(real, entry.name))
                pending.append((listed, real_path, (stat.st_dev, stat.st_ino), rest))
    return files, broken, repeats


def resolve_corpus_files(raw_text_path: str) -> list[str]:
    """A file, a directory (its files of every format, recursively) or a glob; the default
    corpus is built on first use. The paths are the ones glob.glob(recursive=True) gives,
    sorted, but each real file once, by the first of its paths, and each directory walked once:
    a symlink loop, or a link to a directory reached another way too, adds nothing."""
    if raw_text_path == DEFAULT_CORPUS and not os.path.exists(raw_text_path):
        build_default_corpus(raw_text_path)
    if os.path.isfile(raw_text_path):
        return [raw_text_path]
    if os.path.isdir(raw_text_path):  # as the globs <dir>/**/*<suffix>, one per format
        known = tuple(fmt.suffix for fmt in FORMATS)
        matches, broken, repeats = walk_matching(raw_text_path.rstrip("/") or raw_text_path, [
            RECURSIVE, lambda name: not name.startswith(".") and name.endswith(known)])
    else:
        matches, broken, repeats = walk_matching(*split_glob(raw_text_path))
    files, real_paths, duplicates = [], set(), []
    for path, real_path in sorted(matches):
        (duplicates if real_path in real_paths else files).append(path)
        real_paths.add(real_path)
    if broken:
        warn(f"skipping {len(broken)} broken symlink(s) in the corpus, e.g. {min(broken)}")
    if duplicates or repeats:
        warn(f"skipped {len(duplicates)} duplicate path(s) of files already in the corpus and "
             f"{len(repeats)} path(s) to directories already walked (symlink loops, or a second "
             f"path to one directory), e.g. {min(repeats) if repeats else duplicates[0]}")
    require(bool(files), f"no text found at data.raw_text_path='{raw_text_path}' — give a UTF-8 "
            f"file, a directory of {suffixes()} files or a glob")
    return files
