"""The token cache: a corpus as shards of tokens, built once, by N worker processes that end
with the process that started them.

    corpus files --plan--> shards: small files packed together, a large file cut at line starts
    --workers tokenize--> <key>.tokens.bin (+ <key>.mask.bin for conversations) + <key>.json
    --data.TokenStream--> the shards end to end, in plan order, read as one array

A shard's key hashes its pieces (path, size, modification time, byte range), the tokenizer and
the reading settings: a changed file rebuilds only its own shards, and shards no key names any
more are removed. Its .json is written last, so a crash or kill -9 keeps every finished shard.
Processes that share the directory (a node's workers, or several nodes on shared storage) build
each shard once: a worker takes the shard's lock (a byte of the directory's lock file, keyed on
the shard) before building it, and passes over a shard another process holds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
from typing import BinaryIO, Callable, Iterator

import numpy as np
from tqdm import tqdm

from bpe import BPETokenizer
from chat import ChatFormat, assistant_spans, trained_mask
from corpus import (FORMATS, LINE_END_BYTES, Chunk, format_of, read_corpus_file, reading_key,
                    row_group_starts, text_cut)
from files import atomic_write, check_writable
from pool import cpu_cores, read_ahead, run_in_workers
from utils import DataConfig, UserError, require, warn

SHARD_BYTES = 1 << 25        # a shard's share of the corpus: many for the workers, few memmaps
GROUP_MAX_BYTES = 2 * SHARD_BYTES  # small files packed together stop at this
FILE_MIN_WEIGHT = 4096       # an empty file counts as a block on disk when packing
PIECE_BYTES = 1 << 16        # pieces of a long text handed to the Rust tokenizer's thread pool
CUT_READ_BYTES = 1 << 16     # read at a time looking for a line start to cut a large file at
CUTTABLE = (".txt", ".jsonl", ".parquet")  # formats a large file of is cut into pieces
CACHE_VERSION = "shards-1"   # part of every key: a change of layout rebuilds every cache
LOCK_FILE = ".building.lock"
Progress = Callable[[int, int, int], None]  # (file bytes, text bytes, tokens) just done


@dataclasses.dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of a corpus file of `size` bytes modified at `mtime_ns`."""
    path: str
    start: int
    end: int
    size: int
    mtime_ns: int


@dataclasses.dataclass(frozen=True)
class Shard:
    pieces: tuple[Piece, ...]
    key: str

    @property
    def num_bytes(self) -> int:
        return sum(piece.end - piece.start for piece in self.pieces)


@dataclasses.dataclass(frozen=True)
class Reading:
    """How every shard of a corpus is tokenized: what the key hashes besides the pieces."""
    tokenizer_json: str
    eot: str
    chat: ChatFormat
    data: DataConfig
    dtype: str

    @functools.cached_property
    def digest(self) -> str:
        return hashlib.sha256(f"{CACHE_VERSION}\0{self.eot}\0{self.chat.template}\0"
                              f"{self.chat.special_tokens}\0{self.dtype}\0"
                              f"{self.tokenizer_json}".encode()).hexdigest()

    @property
    def name(self) -> str:
        """Names the cache directory of this reading, so that runs with another tokenizer or
        other settings on one corpus keep shards of their own and never remove each other's."""
        settings = sorted({name for fmt in FORMATS for name in fmt.settings})
        values = "\0".join(f"{name}={getattr(self.data, name)}" for name in settings)
        return hashlib.sha256(f"{self.digest}\0{values}".encode()).hexdigest()[:10]

    def key(self, pieces: list[Piece]) -> str:
        settings = reading_key([piece.path for piece in pieces], self.data)
        digest = hashlib.sha256(f"{self.digest}\0{settings}".encode())
        for p in pieces:
            digest.update(f"\0{os.path.abspath(p.path)}\0{p.size}\0{p.mtime_ns}\0{p.start}\0"
                          f"{p.end}".encode())
        return digest.hexdigest()[:32]


def plan_shards(files: list[str], reading: Reading) -> list[Shard]:
    """The shards of `files`, in stream order. A file of CUTTABLE format larger than SHARD_BYTES
    is cut into pieces at line starts; smaller files are packed with their neighbours into
    groups that end after a file by a draw fixed by its name and weighted by its size, so a
    group holds about SHARD_BYTES and a new file changes only the group it joins."""
    shards, group, group_bytes = [], [], 0

    def close_group() -> None:
        nonlocal group_bytes
        if group:
            shards.append(Shard(tuple(group), reading.key(group)))
            group.clear()
            group_bytes = 0

    for path in files:
        stat = os.stat(path)
        if stat.st_size > SHARD_BYTES and format_of(path).suffix in CUTTABLE:
            close_group()
            shards += [Shard((piece,), reading.key([piece]))
                       for piece in cut_file(path, stat.st_size, stat.st_mtime_ns)]
            continue
        group.append(Piece(path, 0, stat.st_size, stat.st_size, stat.st_mtime_ns))
        group_bytes += stat.st_size
        name = os.path.basename(path).encode()  # the same draw wherever the corpus lies
        draw = int(hashlib.sha256(name).hexdigest()[:8], 16) / 2 ** 32
        if (draw < max(stat.st_size, FILE_MIN_WEIGHT) / SHARD_BYTES
                or group_bytes >= GROUP_MAX_BYTES):
            close_group()
    close_group()
    return shards


def cut_file(path: str, size: int, mtime_ns: int) -> list[Piece]:
    """Pieces of a large file, each cut after a multiple of SHARD_BYTES: a parquet file where
    the next row group begins; text or JSONL at the first line start within LINE_END_BYTES,
    text with no newline there where corpus.text_cut cuts it (as corpus.read_text does), a
    JSONL line that long not at all."""
    starts = [0]
    with open(path, "rb") as f:
        if format_of(path).suffix == ".parquet":
            import pyarrow.parquet  # here: slow to import, and only a parquet corpus needs it
            groups = row_group_starts(pyarrow.parquet.ParquetFile(f))
            cuts = [next((start for start in groups if start >= target), size)
                    for target in range(SHARD_BYTES, size, SHARD_BYTES)]
        else:
            cuts = [line_start_near(f, target, format_of(path).suffix == ".txt")
                    for target in range(SHARD_BYTES, size, SHARD_BYTES)]
    for cut in cuts:
        if cut is not None and starts[-1] < cut < size:
            starts.append(cut)
    return [Piece(path, start, end, size, mtime_ns)
            for start, end in zip(starts, starts[1:] + [size])]


def line_start_near(f: BinaryIO, target: int, text: bool) -> int | None:
    """The first line start at or after byte `target` within LINE_END_BYTES; for `text` with no
    newline there, where corpus.text_cut cuts that span; None: no cut here."""
    f.seek(target - 1)
    window = b""  # read on from the byte before the target until a newline
    while b"\n" not in window and len(window) <= LINE_END_BYTES:
        block = f.read(CUT_READ_BYTES)
        if not block:
            break
        window += block
    window = window[:LINE_END_BYTES + 1]
    cut = window.find(b"\n") + 1
    if cut == 0 and text:
        cut = text_cut(window)
    return target - 1 + cut if cut > 0 else None


def text_pieces(text: str) -> list[str]:
    """A long text in pieces of about PIECE_BYTES for the encoder's threads, each cut after a
    newline so no word is split between two."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + PIECE_BYTES)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def _encode_pieces(tokenizer: BPETokenizer, text: str) -> np.ndarray:
    ids = tokenizer.encode_batch(text_pieces(text))
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def _encode_chunk(tokenizer: BPETokenizer, reading: Reading,
                  chunk: Chunk) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A chunk's token ids, and for conversations per id whether it is the assistant's. A whole
    document ends with the end-of-text token; conversations are rendered by the chat template
    and encoded by Hugging Face tokenizers, whose offsets place the assistant's tokens."""
    dtype = np.dtype(reading.dtype)
    if chunk.conversations:
        rendered = [assistant_spans(reading.chat, messages) for messages in chunk.conversations]
        encodings = tokenizer.hf.encode_batch([text for text, _ in rendered],
                                           add_special_tokens=False)
        return ([np.asarray(encoding.ids, dtype=dtype) for encoding in encodings],
                [np.asarray(trained_mask(encoding.offsets, spans), dtype=np.uint8)
                 for encoding, (_, spans) in zip(encodings, rendered)])
    if chunk.whole_documents:
        eot_ids = np.array([tokenizer.token_id(reading.eot)], dtype=dtype)
        return [np.append(ids.astype(dtype), eot_ids)
                for ids in tokenizer.encode_batch(chunk.texts)], []
    # part of a long document: split further for the encoder's threads
    return [_encode_pieces(tokenizer, text).astype(dtype) for text in chunk.texts], []


def tokenize_shard(shard: Shard, tokenizer: BPETokenizer, reading: Reading, directory: str,
                   progress: Progress) -> None:
    """Write a shard's tokens, its mask for conversations, then its .json, which marks it done.
    The mask (a byte per token) goes to a spool file as it is made: memory stays flat. The
    next chunk is read (and decompressed) on a thread of its own while this one is encoded."""
    kinds, num_tokens = {}, 0  # kinds: is a conversation -> the first file of it
    mask_spool = tempfile.TemporaryFile(dir=directory)

    def chunks() -> Iterator[tuple[str, Chunk]]:
        for piece in shard.pieces:
            stat = os.stat(piece.path)
            require((stat.st_size, stat.st_mtime_ns) == (piece.size, piece.mtime_ns),
                    f"{piece.path} changed while the corpus was tokenized — run again once "
                    "nothing writes to it")
            for chunk in read_corpus_file(piece.path, reading.data, piece.start, piece.end):
                yield piece.path, chunk

    def write(out: BinaryIO) -> None:
        nonlocal num_tokens
        for path, chunk in read_ahead(chunks()):
            kinds.setdefault(bool(chunk.conversations), path)
            if len(kinds) > 1:
                raise UserError(f"{kinds[True]} holds conversations and {kinds[False]} text — "
                                "a run trains on text or on conversations, never a mix: give "
                                "data.raw_text_path one kind")
            ids, masks = _encode_chunk(tokenizer, reading, chunk)
            out.write(b"".join(part.tobytes() for part in ids))
            mask_spool.write(b"".join(mask.tobytes() for mask in masks))
            chunk_tokens = sum(map(len, ids))
            num_tokens += chunk_tokens
            progress(chunk.num_bytes, chunk.text_bytes, chunk_tokens)

    with mask_spool:
        atomic_write(_path(directory, shard.key, "tokens.bin"), write)
        if True in kinds:
            mask_spool.seek(0)
            atomic_write(_path(directory, shard.key, "mask.bin"),
                         lambda f: shutil.copyfileobj(mask_spool, f, 1 << 22))
    meta = {"num_tokens": num_tokens, "dtype": reading.dtype, "mask": True in kinds,
            "first_file": next(iter(kinds.values()), shard.pieces[0].path)}
    atomic_write(_path(directory, shard.key, "json"), lambda f: f.write(json.dumps(meta).encode()))


def _path(directory: str, key: str, kind: str) -> str:
    return os.path.join(directory, f"{key}.{kind}")


def finished(directory: str, shard: Shard) -> dict | None:
    """A shard's metadata when its files are complete, else None (build it again). Its dtype
    is part of its key."""
    try:
        with open(_path(directory, shard.key, "json"), encoding="utf-8") as f:
            meta = json.load(f)
        fields = {"num_tokens": int, "dtype": str, "mask": bool, "first_file": str}
        if not all(type(meta.get(name)) is kind for name, kind in fields.items()):
            return None
        sizes = {"tokens.bin": meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize,
                 **({"mask.bin": meta["num_tokens"]} if meta["mask"] else {})}
        if all(os.path.getsize(_path(directory, shard.key, kind)) == size
               for kind, size in sizes.items()):
            return meta
    except (OSError, ValueError, TypeError, AttributeError):  # missing, damaged, not JSON
        pass
    return None


_lock_files: dict[str, int] = {}  # directory -> this process's open lock file, kept open: closing
                                  # any descriptor of a file drops the process's locks on it


@contextlib.contextmanager
def shard_lock(directory: str, key: str, wait: bool) -> Iterator[bool]:
    """Hold the byte of the directory's lock file that stands for the shard `key` (POSIX record
    locks hold across hosts on NFS); without `wait`, yield False when another process holds it."""
    if directory not in _lock_files:
        try:
            _lock_files[directory] = os.open(os.path.join(directory, LOCK_FILE),
                                             os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise UserError(f"cannot open {os.path.join(directory, LOCK_FILE)} ({err.strerror}) "
                            "— make it writable, or set data.cache_dir to a directory of your "
                            "own") from None
    fd, offset = _lock_files[directory], int(key[:7], 16)  # a small offset: NFS takes any
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB), 1, offset)
    except (BlockingIOError, PermissionError):  # held by another process
        yield False
        return
    try:
        yield True
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)


def build_shard(shard: Shard, tokenizer: BPETokenizer, reading: Reading, directory: str,
                progress: Progress, wait: bool = False) -> str:
    """Build a shard unless it is finished, or (without `wait`) another process is building it:
    -> "built", "found" (finished by another process) or "busy"."""
    with shard_lock(directory, shard.key, wait) as held:
        if not held:
            return "busy"
        if finished(directory, shard) is not None:
            return "found"
        tokenize_shard(shard, tokenizer, reading, directory, progress)
        return "built"


_worker: dict = {}  # a worker process's tokenizer and reading


def _start_worker(tokenizer: BPETokenizer, reading: Reading) -> None:
    # read at Hugging Face tokenizers' first use
    os.environ.setdefault("RAYON_NUM_THREADS", str(tokenizer.threads))
    _worker.update(tokenizer=tokenizer, reading=reading)


def _build_in_worker(directory: str, shard: Shard, progress: Progress) -> str:
    return build_shard(shard, _worker["tokenizer"], _worker["reading"], directory, progress)


def build_shards(shards: list[Shard], tokenizer: BPETokenizer, reading: Reading, directory: str,
                 workers: int) -> int:
    """Build the shards not yet finished, with `workers` processes (the largest first, so they
    end together), behind one progress bar; -> how many this process built. A worker's error
    stops the rest and is raised here; the shards finished so far are kept."""
    todo = [shard for shard in shards if finished(directory, shard) is None]
    if not todo:
        return 0
    check_writable(directory, fix="set data.cache_dir to a writable directory for the token "
                   "cache")
    os.makedirs(directory, exist_ok=True)
    todo.sort(key=lambda shard: -shard.num_bytes)
    workers = min(workers, len(todo))
    # RAYON_NUM_THREADS: the tokenizer threads asked of this process (Hugging Face's variable)
    tokenizer = dataclasses.replace(
        tokenizer, threads=int(os.environ.get("RAYON_NUM_THREADS") or cpu_cores()))
    if tokenizer.fast is None:
        warn(f"tokenizing with Hugging Face tokenizers, not tiktoken: {tokenizer.why_not_fast}")
    totals = [0, 0]  # text bytes, tokens
    with tqdm(total=sum(shard.num_bytes for shard in todo), unit="B", unit_scale=True,
              desc=f"tokenizing ({workers} worker{'s' * (workers > 1)}, "
                   f"{'tiktoken' if tokenizer.fast else 'HF tokenizers'})") as bar:
        def progress(file_bytes: int, text_bytes: int, tokens: int) -> None:
            totals[0] += text_bytes
            totals[1] += tokens
            rate = totals[0] / max(bar.format_dict["elapsed"], 1e-9) / 1e6
            bar.set_postfix_str(f"text {rate:.1f} MB/s, {totals[1]:,} tokens", refresh=False)
            bar.update(file_bytes)

        if workers == 1:
            outcomes = {shard: build_shard(shard, tokenizer, reading, directory, progress)
                        for shard in todo}
        else:
            outcomes = run_in_workers(
                functools.partial(_build_in_worker, directory), todo, workers, _start_worker,
                (dataclasses.replace(tokenizer, threads=max(1, cpu_cores() // workers)),
                 reading), progress)
        for shard in [shard for shard, outcome in outcomes.items() if outcome == "busy"]:
            # another process held it: wait for it, then build it if that process died
            outcomes[shard] = build_shard(shard, tokenizer, reading, directory, progress, True)
    return sum(outcome == "built" for outcome in outcomes.values())


def remove_stale(directory: str, shards: list[Shard]) -> None:
    """Remove the shards of files that changed or vanished (keys no plan names any more)."""
    keep = {shard.key for shard in shards}
    for name in os.listdir(directory):
        key, _, kind = name.partition(".")
        if kind in ("tokens.bin", "mask.bin", "json") and key not in keep:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


def remove_if_empty(directory: str) -> None:
    """Remove a cache directory that holds no shard and no shard under way (a first run that
    failed), and its parent left empty, so a bad input leaves nothing beside the corpus."""
    with contextlib.suppress(OSError):
        if set(os.listdir(directory)) <= {LOCK_FILE}:
            if directory in _lock_files:  # a lock on an unlinked file would exclude no one
                os.close(_lock_files.pop(directory))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, LOCK_FILE))
            os.rmdir(directory)
            os.rmdir(os.path.dirname(directory))
