"""Tokenizer and dataset: corpus files (corpus.py reads them) --byte-level BPE--> a uint16 token
file cached beside the text --np.memmap--> (x, y) windows; the last val_split of the stream is
validation. Conversations are rendered by their chat template (chat.py), and a mask file beside
the tokens marks the assistant's: the others are IGNORE_INDEX targets. Also two commands:

    python data.py train-tokenizer FILES --vocab-size 4096 --out tokenizer/my_bpe.json
    python data.py play-conversations --out data/play_chat.jsonl
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from chat import (EOT, ChatFormat, assistant_spans, chat_format, special_tokens,
                  trained_mask)
from corpus import (Chunk, read_corpus_file, reading_key, resolve_corpus_files, suffixes,
                    write_play_conversations)
from files import atomic_write, check_writable
from utils import (ArgumentParser, Config, DataConfig, UserError, require, require_within,
                   run_cli, warn)

BASE_VOCAB = 257             # byte-level BPE before any merge: 256 bytes + end-of-text
PIECE_BYTES = 1 << 16        # pieces handed to the Rust tokenizer's thread pool
IGNORE_INDEX = -100          # a target no loss counts (cross_entropy's default ignore_index)


def train_tokenizer(files: list[str], out_path: str, vocab_size: int,
                    text_field: str = "text") -> Tokenizer:
    """Byte-level BPE on corpus files (corpus.FORMATS): every byte is in the base alphabet, so
    any UTF-8 text round-trips. Reads in chunks with a progress bar, writes `out_path`
    atomically; a text too small to learn a single merge from is refused and nothing is
    written."""
    data, total_bytes = DataConfig(text_field=text_field), sum(map(os.path.getsize, files))
    require(total_bytes > 0, f"{', '.join(files)[:200]} hold(s) no text — a tokenizer needs text "
            "to learn its merges from")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=True)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="reading") as bar:
        def texts() -> Iterator[str]:
            for path in files:
                for chunk in read_corpus_file(path, data):
                    yield from chunk.texts
                    yield from (message["content"] for conversation in chunk.conversations
                                for message in conversation)
                    bar.update(chunk.num_bytes)

        tokenizer.train_from_iterator(texts(), trainer)
    require(tokenizer.get_vocab_size() > BASE_VOCAB, f"the text in {', '.join(files)[:200]} "
            f"holds no pair of tokens seen twice, so no merge was learned and {out_path} was not "
            "written — give it more text")
    atomic_write(out_path, lambda f: f.write(tokenizer.to_str().encode()))
    return tokenizer


def end_of_text(tokenizer_path: str) -> str:
    """The token that ends a document and a chat turn: the eos_token of a Hugging Face
    directory's tokenizer (e.g. </s>), else <|endoftext|>."""
    return special_tokens(tokenizer_path).get("eos_token", EOT)


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


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """An identity of what the tokenizer maps text to and from: checkpoints record it, so a
    model is never paired with another tokenizer, even one of the same size."""
    canonical = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


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
    """Changes whenever the tokenizer, how the files are read (the formats' settings, the
    end-of-text token) or any text file (path, size, modification time) changes."""
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


def _encode_conversations(tokenizer: Tokenizer, chat: ChatFormat, chunk: Chunk,
                          dtype: type) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The ids of a chunk's rendered conversations, and per id whether it is the assistant's."""
    rendered = [assistant_spans(chat, messages) for messages in chunk.conversations]
    encodings = tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    ids = [np.asarray(encoding.ids, dtype=dtype) for encoding in encodings]
    masks = [np.asarray(trained_mask(encoding.offsets, spans), dtype=np.uint8)
             for encoding, (_, spans) in zip(encodings, rendered)]
    return ids, masks


def tokenize_files(files: list[str], tokenizer: Tokenizer, out_path: str, dtype: type,
                   check_length: Callable[[int], None], data: DataConfig, eot: str = EOT,
                   chat: ChatFormat | None = None, mask_path: str = "") -> tuple[int, bool]:
    """Write the tokens of `files` (read as `data` says) to out_path; return their count and
    whether they are conversations. A text document (a text file, a JSONL line) ends with the
    end-of-text token; conversations are rendered by `chat` (default: the tokenizer's), and the
    mask of their assistant tokens goes to mask_path. `check_length` may refuse the count
    before the rename, so a useless corpus leaves no cache."""
    eot_ids = np.array([tokenizer.token_to_id(eot)], dtype=dtype)
    chat = chat or chat_format(data.tokenizer_path)
    num_tokens, kinds = 0, {}  # kinds: is a conversation -> the first file of it
    # The mask (a byte per token) goes to disk as it is made: memory stays flat at any size.
    cache_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(cache_dir, exist_ok=True)
    mask_spool = tempfile.TemporaryFile(dir=cache_dir)

    def write(out: BinaryIO) -> None:
        nonlocal num_tokens
        total_bytes = sum(map(os.path.getsize, files))
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing") as bar:
            for path in files:
                for chunk in read_corpus_file(path, data):
                    kinds.setdefault(bool(chunk.conversations), path)
                    if len(kinds) > 1:
                        raise UserError(f"{kinds[True]} holds conversations and {kinds[False]} "
                                        "text — a run trains on text or on conversations, never "
                                        "a mix: give data.raw_text_path one kind")
                    if chunk.conversations:
                        ids, masks = _encode_conversations(tokenizer, chat, chunk, dtype)
                        mask_spool.write(b"".join(mask.tobytes() for mask in masks))
                    elif chunk.whole_documents:
                        ids = [np.append(np.asarray(encoding.ids, dtype=dtype), eot_ids)
                               for encoding in _encode_batch(tokenizer, chunk.texts)]
                    else:  # part of a long document: split further for the tokenizer's threads
                        ids = [_encode_pieces(tokenizer, text).astype(dtype)
                               for text in chunk.texts]
                    out.write(b"".join(part.tobytes() for part in ids))
                    num_tokens += sum(map(len, ids))
                    bar.update(chunk.num_bytes)
        check_length(num_tokens)
        if True in kinds:
            mask_spool.seek(0)
            atomic_write(mask_path, lambda f: shutil.copyfileobj(mask_spool, f, 1 << 22))

    with mask_spool:
        atomic_write(out_path, write)
    return num_tokens, True in kinds


def _cached_size_is(path: str, num_bytes: int) -> bool:
    return os.path.isfile(path) and os.path.getsize(path) == num_bytes


def prepare_tokens(data: DataConfig,
                   tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray | None]:
    """The token stream of the whole corpus as a read-only memmap, and for conversations the
    mask of the assistant's tokens beside it (else None); tokenised once, then cached."""
    files = resolve_corpus_files(data.raw_text_path)
    require(sum(map(os.path.getsize, files)) > 0, f"the corpus at '{data.raw_text_path}' is "
            "empty — point data.raw_text_path at some text")
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65535 else np.uint32
    prefix = _cache_prefix(data, files)
    bin_path, mask_path = prefix + ".tokens.bin", prefix + ".mask.bin"
    meta_path = prefix + ".tokens.json"
    eot, chat = end_of_text(data.tokenizer_path), chat_format(data.tokenizer_path)
    reading = f"{reading_key(files, data)}\0{eot}\0{chat.template}\0{chat.special_tokens}"
    key = _cache_key(files, tokenizer, reading)
    meta = _read_cache_meta(meta_path)
    if (meta.get("key") != key or meta.get("dtype") != np.dtype(dtype).name
            or not _cached_size_is(bin_path, meta["num_tokens"] * np.dtype(dtype).itemsize)
            or meta["mask"] and not _cached_size_is(mask_path, meta["num_tokens"])):
        check_writable(os.path.dirname(bin_path), fix="set data.cache_dir to a writable directory "
                       "for the token cache")
        num_tokens, has_mask = tokenize_files(files, tokenizer, bin_path, dtype,
                                              lambda n: check_corpus_length(n, data), data, eot,
                                              chat, mask_path)
        meta = {"key": key, "num_tokens": num_tokens, "dtype": np.dtype(dtype).name,
                "mask": has_mask}
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta).encode()))
        print(f"cached {num_tokens:,} tokens in {bin_path}", flush=True)
    tokens = np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))
    mask = (np.memmap(mask_path, dtype=np.uint8, mode="r", shape=(meta["num_tokens"],))
            if meta["mask"] else None)
    return tokens, mask


def _read_cache_meta(meta_path: str) -> dict:
    """The cache's metadata, or {} (rebuild the cache) when it is missing or damaged."""
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):  # missing, unreadable, truncated, not UTF-8, not JSON
        return {}
    fields = {"key": str, "num_tokens": int, "dtype": str, "mask": bool}
    if not isinstance(meta, dict) or not all(
            type(meta.get(name)) is kind for name, kind in fields.items()):
        return {}
    return meta if meta["num_tokens"] > 0 else {}


def corpus_fingerprint(tokens: np.ndarray, mask: np.ndarray | None = None) -> str:
    """A cheap identity of a token stream (and its mask): its length and 4096 tokens spread
    over it. Any edit that shifts the text after it changes it, and it costs the same for any
    corpus size."""
    picks = np.linspace(0, len(tokens) - 1, num=min(len(tokens), 4096)).astype(np.int64)
    sample = np.concatenate(([len(tokens)], tokens[picks].astype(np.int64)))
    if mask is not None:  # a token's mask as its sign: a text stream's identity is unchanged
        sample[1:] = np.where(mask[picks] > 0, -1 - sample[1:], sample[1:])
    return hashlib.sha256(sample.tobytes()).hexdigest()[:16]


class TokenWindows(Dataset):
    """Non-overlapping windows: item i is x = tokens[i*T : i*T+T], y = the same shifted by one;
    with a mask, a target it does not mark (not the assistant's) is IGNORE_INDEX."""

    def __init__(self, tokens: np.ndarray, context_length: int, mask: np.ndarray | None = None):
        self.tokens, self.context_length, self.mask = tokens, context_length, mask

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.context_length)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(index) * self.context_length  # a numpy int32 index would overflow
        window = self.tokens[start:start + self.context_length + 1].astype(np.int64)
        targets = window[1:]
        if self.mask is not None:
            trained = self.mask[start + 1:start + self.context_length + 1] > 0
            targets = np.where(trained, targets, IGNORE_INDEX)
        return torch.from_numpy(window[:-1]), torch.from_numpy(targets)


def check_corpus_length(num_tokens: int, data: DataConfig) -> None:
    num_val = int(num_tokens * data.val_split)
    if min(num_tokens - num_val, num_val) < data.context_length + 1:
        need = int((data.context_length + 1) / min(data.val_split, 1 - data.val_split)) + 1
        raise UserError(f"corpus has {num_tokens} tokens: too short for one train and one val "
                        f"window of {data.context_length} — use at least ~{need} tokens of text "
                        "or a smaller data.context_length")


def split_tokens(tokens: np.ndarray, data: DataConfig,
                 mask: np.ndarray | None = None) -> tuple[TokenWindows, TokenWindows]:
    check_corpus_length(len(tokens), data)
    num_train = len(tokens) - int(len(tokens) * data.val_split)
    train = TokenWindows(tokens[:num_train], data.context_length,
                         None if mask is None else mask[:num_train])
    val = TokenWindows(tokens[num_train:], data.context_length,
                       None if mask is None else mask[num_train:])
    if len(train) < data.batch_size:
        warn(f"only {len(train)} training windows, fewer than data.batch_size={data.batch_size}; "
             "batches will be smaller — add text or lower the batch size")
    return train, val


def prepare_data(config: Config) -> tuple[Tokenizer, TokenWindows, TokenWindows]:
    """The tokenizer (checked against model.vocab_size) and the train and validation windows."""
    tokenizer = load_tokenizer(config.data.tokenizer_path, config.model.vocab_size,
                               "set model.vocab_size to its size or use the matching tokenizer")
    tokens, mask = prepare_tokens(config.data, tokenizer)
    train_set, val_set = split_tokens(tokens, config.data, mask)
    return tokenizer, train_set, val_set


def epoch_order(num_windows: int, seed: int, epoch: int, rank: int = 0,
                world_size: int = 1) -> np.ndarray:
    """The windows a rank visits in an epoch: a shuffle fixed by (seed, epoch), so a resumed run
    replays it, dealt round-robin to the ranks as DistributedSampler(shuffle=True, seed=seed,
    drop_last=True) does, so one process and N ranks walk the same global order. An array of
    int32 where the count allows (randperm draws the same order in either width): 4 bytes a
    window, where a list of Python ints would take ten times that."""
    generator = torch.Generator().manual_seed(seed + epoch)
    dtype = torch.int32 if num_windows < 2 ** 31 else torch.int64
    order = torch.randperm(num_windows, generator=generator, dtype=dtype)
    return order[rank:num_windows - num_windows % world_size:world_size].clone().numpy()


def epoch_loader(dataset: TokenWindows, data: DataConfig, order: np.ndarray, skip_batches: int,
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
                                  f"{EOT} token) on text, JSONL and parquet files.")
    command.add_argument("files", nargs="+", metavar="FILES",
                         help=f"{suffixes()} files, directories of them, or globs")
    command.add_argument("--vocab-size", type=int, required=True, help="e.g. 4096")
    command.add_argument("--out", required=True, help="tokenizer JSON to write")
    command.add_argument("--text-field", default="text",
                         help="JSONL field / parquet column holding the text")
    plays = commands.add_parser("play-conversations", help="conversations from the default "
                                "corpus's plays", description="Write a conversation JSONL: the "
                                "last line of a speech as the user's turn, the next speaker's "
                                "first lines as the reply (a chat fine-tuning example set).")
    plays.add_argument("--out", required=True, help="JSONL file to write")
    args = parser.parse_args()
    if args.command == "play-conversations":
        check_writable(os.path.dirname(os.path.abspath(args.out)))
        count = write_play_conversations(args.out)
        print(f"wrote {count:,} conversations to {args.out}", flush=True)
        return
    require_within("--vocab-size", args.vocab_size, BASE_VOCAB + 1, 1 << 20)
    files = [path for pattern in args.files for path in resolve_corpus_files(pattern)]
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
