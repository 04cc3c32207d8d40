"""Tokenizer and dataset: corpus files (corpus.py reads them) --byte-level BPE--> shards of
uint16 tokens cached beside the text (shards.py) --memmaps--> (x, y) windows; the last val_split
of the stream is validation. Conversations are rendered by their chat template (chat.py), and a
mask beside the tokens marks the assistant's: the others are IGNORE_INDEX targets. Commands:

    python data.py prepare configs.yaml [section.key=value ...] [--workers N]
    python data.py train-tokenizer FILES --vocab-size 4096 --out tokenizer/my_bpe.json
    python data.py play-conversations --out data/play_chat.jsonl
"""
from __future__ import annotations

import copy
import hashlib
import os
import signal
import time
from typing import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from bpe import BPETokenizer, load_tokenizer
from chat import EOT
from checkpoints import adopt_pretrained
from corpus import read_corpus_file, resolve_corpus_files, suffixes
from files import atomic_write, check_writable
from plays import write_play_conversations
from pool import cpu_cores
from shards import Reading, build_shards, finished, plan_shards, remove_if_empty, remove_stale
from utils import (ArgumentParser, Config, DataConfig, UserError, load_config, require,
                   require_within, run_cli, warn)

BASE_VOCAB = 257             # byte-level BPE before any merge: 256 bytes + end-of-text
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


def prepare_tokens(data: DataConfig, tokenizer: BPETokenizer, workers: int = 0
                   ) -> tuple[TokenStream, TokenStream | None]:
    """The token stream of the whole corpus, and for conversations the mask of the assistant's
    tokens beside it (else None): the cache's shards end to end (shards.py), those missing
    built first by `workers` processes (0: one per CPU core)."""
    files = resolve_corpus_files(data.raw_text_path)
    require(sum(map(os.path.getsize, files)) > 0, f"the corpus at '{data.raw_text_path}' is "
            "empty — point data.raw_text_path at some text")
    dtype = "uint16" if tokenizer.vocab_size <= 65535 else "uint32"
    reading = Reading(tokenizer.hf.to_str(), tokenizer.end_of_text, tokenizer.chat, data, dtype)
    shards = plan_shards(files, reading)
    tokenizer_name = os.path.splitext(os.path.basename(tokenizer.path))[0]
    directory = os.path.join(_cache_prefix(data, files) + ".shards",
                             f"{tokenizer_name}-{reading.name}")
    try:
        built = build_shards(shards, tokenizer, reading, directory,
                             workers or cpu_cores())
    except BaseException:
        remove_if_empty(directory)
        raise
    metas = [finished(directory, shard) for shard in shards]
    require(None not in metas, f"a shard of the token cache in {directory} vanished as it was "
            "built — is a run on other data sharing data.cache_dir? Give each its own")
    kinds = {meta["mask"]: meta["first_file"] for meta in metas if meta["num_tokens"]}
    require(len(kinds) < 2, f"{kinds.get(True)} holds conversations and {kinds.get(False)} text "
            "— a run trains on text or on conversations, never a mix: give "
            "data.raw_text_path one kind")
    num_tokens = sum(meta["num_tokens"] for meta in metas)
    try:
        check_corpus_length(num_tokens, data)
    except UserError:  # a corpus too short to train on leaves no cache of its own making
        if built == len(shards):
            remove_stale(directory, [])
            remove_if_empty(directory)
        raise
    remove_stale(directory, shards)
    if built:
        print(f"cached {num_tokens:,} tokens in {directory} ({len(shards)} shards, {built} "
              "tokenized now)", flush=True)
    parts = [(os.path.join(directory, shard.key), meta["num_tokens"])
             for shard, meta in zip(shards, metas) if meta["num_tokens"]]  # no empty memmap
    tokens = TokenStream([np.memmap(f"{path}.tokens.bin", dtype=dtype, mode="r", shape=(size,))
                          for path, size in parts])
    mask = (TokenStream([np.memmap(f"{path}.mask.bin", dtype=np.uint8, mode="r", shape=(size,))
                         for path, size in parts]) if True in kinds else None)
    return tokens, mask


def corpus_fingerprint(tokens: np.ndarray, mask: np.ndarray | None = None) -> str:
    """A cheap identity of a token stream (and its mask): its length and 4096 tokens spread
    over it. Any edit that shifts the text after it changes it, and it costs the same for any
    corpus size."""
    picks = np.linspace(0, len(tokens) - 1, num=min(len(tokens), 4096)).astype(np.int64)
    sample = np.concatenate(([len(tokens)], tokens[picks].astype(np.int64)))
    if mask is not None:  # a token's mask as its sign: a text stream's identity is unchanged
        sample[1:] = np.where(mask[picks] > 0, -1 - sample[1:], sample[1:])
    return hashlib.sha256(sample.tobytes()).hexdigest()[:16]


class TokenStream:
    """The shards' tokens end to end as one read-only array, as a numpy array reads: len, an
    integer index or index array, a slice (a view: nothing is read), np.asarray and astype."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts, self.dtype = parts, parts[0].dtype
        self.ends = np.cumsum([len(part) for part in parts], dtype=np.int64)
        self.begins = self.ends - [len(part) for part in parts]
        self.start, self.stop = 0, int(self.ends[-1])  # this view's positions in the stream

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int | slice | np.ndarray) -> TokenStream | np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            require(step == 1, "a token stream is sliced with step 1")
            view = copy.copy(self)
            view.start, view.stop = self.start + start, self.start + max(start, stop)
            return view
        positions = np.asarray(index)
        require(positions.dtype.kind in "iu", f"a token stream is indexed by integers, not "
                f"{positions.dtype}")
        if np.any((positions < -len(self)) | (positions >= len(self))):
            raise IndexError(f"index out of range for a stream of {len(self)} tokens")
        positions = self.start + np.where(positions < 0, positions + len(self), positions)
        parts = np.searchsorted(self.ends, positions, side="right")
        values = np.empty(positions.shape, dtype=self.dtype)
        for part in np.unique(parts):
            picked = parts == part
            values[picked] = self.parts[part][positions[picked] - self.begins[part]]
        return values[()]

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        first = int(np.searchsorted(self.ends, self.start, side="right"))
        pieces, position = [], self.start
        for part in range(first, len(self.parts)):
            if position >= self.stop:
                break
            begin, end = int(self.begins[part]), min(self.stop, int(self.ends[part]))
            pieces.append(self.parts[part][position - begin:end - begin])
            position = end
        array = np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.dtype)
        return array.astype(dtype or self.dtype, copy=False)

    def astype(self, dtype: np.dtype) -> np.ndarray:
        return np.asarray(self, dtype=dtype)

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()


class TokenWindows(Dataset):
    """Non-overlapping windows: item i is x = tokens[i*T : i*T+T], y = the same shifted by one;
    with a mask, a target it does not mark (not the assistant's) is IGNORE_INDEX. The tokens: a
    TokenStream over the cache's shards, or any array."""

    def __init__(self, tokens: np.ndarray, context_length: int, mask: np.ndarray | None = None):
        self.tokens, self.context_length, self.mask = tokens, context_length, mask

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.context_length)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(index) * self.context_length  # a numpy int32 index would overflow
        window = self.tokens[start:start + self.context_length + 1].astype(np.int64)
        targets = window[1:]
        if self.mask is not None:
            trained = np.asarray(self.mask[start + 1:start + self.context_length + 1]) > 0
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


def prepare_data(config: Config) -> tuple[BPETokenizer, TokenWindows, TokenWindows]:
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


def prepare_corpus(config_path: str, overrides: list[str], workers: int) -> None:
    """`prepare`: the token cache of the corpus a training run with this config reads, built
    with the tokenizer it will use (training.init_from's, when it names one)."""
    require_within("--workers", workers, 0, 4096)
    config, _ = adopt_pretrained(load_config(config_path, overrides),
                                 {item.partition("=")[0] for item in overrides}, True)
    tokenizer = load_tokenizer(config.data.tokenizer_path, config.model.vocab_size,
                               "set model.vocab_size to its size or use the matching tokenizer")
    start = time.perf_counter()
    tokens, _ = prepare_tokens(config.data, tokenizer, workers)
    print(f"{len(tokens):,} tokens ready for training ({time.perf_counter() - start:.1f} s)",
          flush=True)


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
    prepare = commands.add_parser("prepare", help="tokenize the configured corpus into the cache",
                                  description="Tokenize data.raw_text_path into the token "
                                  "cache's shards, with the tokenizer training will use, so "
                                  "train.py and data_parallel_train.py start at once.")
    prepare.add_argument("config", help="YAML config, e.g. configs.yaml")
    prepare.add_argument("overrides", nargs="*", metavar="section.key=value",
                         help="override one config value, as for train.py")
    prepare.add_argument("--workers", type=int, default=0,
                         help="tokenizing processes (default: one per CPU core)")
    plays = commands.add_parser("play-conversations", help="conversations from the default "
                                "corpus's plays", description="Write a conversation JSONL: the "
                                "last line of a speech as the user's turn, the next speaker's "
                                "first lines as the reply (a chat fine-tuning example set).")
    plays.add_argument("--out", required=True, help="JSONL file to write")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare_corpus(args.config, args.overrides, args.workers)
        return
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
