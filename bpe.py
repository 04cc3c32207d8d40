"""The tokenizer, loaded once per process (load_tokenizer) as a BPETokenizer that encodes,
decodes, and carries its end-of-text token, chat format and fingerprint.

It encodes through tiktoken where that gives exactly Hugging Face tokenizers' ids,
`encode(text, add_special_tokens=False).ids`, and through Hugging Face tokenizers elsewhere.

The mapping: tiktoken's mergeable ranks are the vocabulary's byte strings (ByteLevel writes each
byte as one printable character: the inverse of GPT-2's bytes_to_unicode) ranked by id, its
pattern is the pre-tokenizer's regex, and the added tokens are its special tokens. tiktoken
merges the adjacent pair of lowest rank, Hugging Face the pair of the earliest merge, and
tiktoken takes a whole pre-token found in the vocabulary at once: the two agree when the ids
grow in merge order and each merge is the last one tiktoken's rule makes on its token's bytes.
That is checked at load, with every structure of the JSON; anything else falls back.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import tiktoken
from tokenizers import Tokenizer

from chat import ChatFormat, chat_format
from utils import UserError, require

# The regexes of ByteLevel(use_regex=True) (GPT-2's) and of Llama-3's Split pre-tokenizer
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class NotExact(Exception):
    """Why a tokenizer cannot take the fast path."""


def require_exact(ok: object, why: str) -> None:
    if not ok:
        raise NotExact(why)


@dataclass(frozen=True)
class BPETokenizer:
    """A tokenizer as a process loads it once and passes it along: its encoders, what ends a
    document, its chat format and the fingerprint checkpoints record."""
    path: str                       # its JSON file
    hf: Tokenizer                   # Hugging Face tokenizers: decoding, offsets, the fallback
    fast: tiktoken.Encoding | None  # the same ids, where the JSON maps onto tiktoken exactly
    why_not_fast: str               # "" on the fast path
    chat: ChatFormat                # how its conversations render as text
    end_of_text: str                # the token that ends a document
    end_of_text_id: int
    fingerprint: str
    threads: int = 1                # encode_batch's threads

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """The text's ids, as transformers' encode(add_special_tokens=False) gives them: added
        tokens inside the text are matched, none is added around it."""
        if self.fast is not None:
            try:
                return self.fast.encode(text, allowed_special="all")
            except ValueError:  # tiktoken's regex gives up on a run of ~1M spaces
                pass
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's ids as an array of unsigned or signed integers, as encode gives them, on
        `threads` threads."""
        if self.fast is None:
            return hf_encode_batch(self.hf, texts)
        if self.threads == 1:
            return [self._encode_array(text) for text in texts]
        with ThreadPoolExecutor(self.threads) as pool:
            return list(pool.map(self._encode_array, texts))

    def _encode_array(self, text: str) -> np.ndarray:
        # tiktoken's buffer, not a list: a Python int per id would hold the GIL, and threads
        # would wait on each other
        try:
            ids = self.fast.encode_to_numpy(text, allowed_special="all")
        except ValueError:  # as in encode
            return np.asarray(self.hf.encode(text, add_special_tokens=False).ids, np.int64)
        return ids

    def decode(self, ids: list[int]) -> str:
        """Exact inverse of encode: special tokens are kept, not silently dropped."""
        return self.hf.decode(ids, skip_special_tokens=False)


def hf_encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Hugging Face tokenizers' ids, on its thread pool, without offsets where it can."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return [np.asarray(encoding.ids, dtype=np.int64)
            for encoding in encode(texts, add_special_tokens=False)]


def load_tokenizer(path: str, vocab_size: int | None = None, fix: str = "",
                   threads: int = 1) -> BPETokenizer:
    """The tokenizer at `path`, with the chat format and end-of-text token of its directory's
    settings (chat.py); with `vocab_size`, one larger than it is refused with `fix` (a model's
    embedding may be padded beyond its tokenizer)."""
    require(os.path.isfile(path), f"tokenizer '{path}' not found — set data.tokenizer_path to a "
            "tokenizer JSON (e.g. tokenizer/bpe_4096.json) or train one (python data.py "
            "train-tokenizer FILES --vocab-size N --out PATH)")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception:  # the Rust side raises a bare Exception for any parse failure
        raise UserError(f"'{path}' is not a tokenizer JSON — point data.tokenizer_path at one"
                        ) from None
    chat = chat_format(path)
    end_of_text_id = tokenizer.token_to_id(chat.end_of_turn)
    require(end_of_text_id is not None, f"tokenizer '{path}' has no {chat.end_of_turn} token "
            "to end documents with — train one with python data.py train-tokenizer")
    require(vocab_size is None or tokenizer.get_vocab_size() <= vocab_size,
            f"tokenizer {path} has {tokenizer.get_vocab_size()} tokens but model.vocab_size is "
            f"{vocab_size} — {fix or 'use the tokenizer the model was trained with'}")
    spec = json.loads(tokenizer.to_str())
    try:
        fast, why_not_fast = exact_encoding(spec), ""
    except NotExact as reason:
        fast, why_not_fast = None, str(reason)
    return BPETokenizer(path, tokenizer, fast, why_not_fast, chat, chat.end_of_turn,
                        end_of_text_id, tokenizer_fingerprint(spec), threads)


def tokenizer_fingerprint(spec: dict) -> str:
    """An identity of what a tokenizer (its JSON, parsed) maps text to and from: checkpoints
    record it, so a model is never paired with another tokenizer, even one of the same size."""
    canonical = json.dumps(spec, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
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
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
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


def byte_of_char() -> dict[str, int]:
    """The byte each printable character of ByteLevel's alphabet stands for."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [byte for byte in range(256) if byte not in printable]  # written as chr(256 + k)
    return {**{chr(byte): byte for byte in printable},
            **{chr(256 + k): byte for k, byte in enumerate(others)}}


def pattern_of(pre_tokenizer: dict | None) -> str:
    """The one regex that cuts text as the pre-tokenizer does: ByteLevel's own (GPT-2's), or a
    Split by Llama-3's regex before ByteLevel without one; a Digits step folded in."""
    steps = (pre_tokenizer or {}).get("pretokenizers") if (
        pre_tokenizer or {}).get("type") == "Sequence" else [pre_tokenizer]
    kinds = [step.get("type") if step else None for step in steps]
    require_exact(kinds[-1:] == ["ByteLevel"] and not steps[-1].get("add_prefix_space"),
                  f"its pre-tokenizer {kinds} does not end in ByteLevel without a prefix space")
    if steps[-1].get("use_regex", True):
        require_exact(kinds[:-1] in ([], ["Digits"]), f"its pre-tokenizer {kinds} is not one "
                      "tiktoken can follow")
        pattern = GPT2_PATTERN
    else:
        require_exact(sorted(kinds[:-1]) in (["Split"], ["Digits", "Split"]),
                      f"its pre-tokenizer {kinds} is not one tiktoken can follow")
        split = steps[kinds.index("Split")]
        require_exact(split.get("pattern", {}).get("Regex") in (GPT2_PATTERN, LLAMA3_PATTERN)
                      and split.get("behavior") == "Isolated" and not split.get("invert"),
                      "its Split pre-tokenizer is not GPT-2's or Llama-3's regex, isolated")
        pattern = split["pattern"]["Regex"]
    if "Digits" not in kinds:
        return pattern
    individual = steps[kinds.index("Digits")]["individual_digits"]
    if "Split" in kinds and kinds.index("Digits") > kinds.index("Split"):
        # after Llama-3's Split: its pieces holding digits hold digits only
        require_exact(pattern == LLAMA3_PATTERN, "Digits after a Split other than Llama-3's")
        return pattern.replace(r"\p{N}{1,3}", r"\p{N}") if individual else pattern
    # Digits first: a digit ends every piece, so no space joins one and (?!\S) stops at one
    pattern = pattern.replace(r" ?\p{N}+", r"\p{N}+").replace(r"(?!\S)", r"(?![^\s\p{N}])")
    if individual:
        pattern = pattern.replace(r"\p{N}+", r"\p{N}").replace(r"\p{N}{1,3}", r"\p{N}")
    return pattern


def last_merge(piece: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The pair tiktoken's rule (the lowest rank, leftmost first) merges last on `piece`."""
    parts, last = [piece[i:i + 1] for i in range(len(piece))], None
    while len(parts) > 1:
        pair_ranks = [ranks.get(left + right, -1) for left, right in zip(parts, parts[1:])]
        known = [rank for rank in pair_ranks if rank >= 0]
        if not known:
            return None
        i = pair_ranks.index(min(known))
        last, parts[i:i + 2] = (parts[i], parts[i + 1]), [parts[i] + parts[i + 1]]
    return last


def exact_encoding(tokenizer_json: dict) -> tiktoken.Encoding:
    """The tiktoken Encoding with the tokenizer's exact ids, or NotExact saying why not."""
    model, added = tokenizer_json["model"], tokenizer_json.get("added_tokens") or []
    require_exact(not tokenizer_json.get("normalizer"), "it has a normalizer")
    require_exact(model.get("type") == "BPE" and not any(model.get(key) for key in (
        "dropout", "continuing_subword_prefix", "end_of_word_suffix")),
        "its model is not a plain BPE")
    pattern = pattern_of(tokenizer_json.get("pre_tokenizer"))
    require_exact(all(token["content"] and not any(token.get(key) for key in (
        "lstrip", "rstrip", "single_word")) for token in added),
        "an added token has lstrip, rstrip or single_word set")
    require_exact(len({bool(token.get("normalized")) for token in added}) < 2,
                  "its added tokens are matched in two passes (normalized and not)")
    contents = sorted(token["content"] for token in added)  # tiktoken takes no longest match
    require_exact(not any(longer.startswith(shorter) for shorter, longer in
                          zip(contents, contents[1:])), "an added token is a prefix of another")
    added_ids, char_byte = {token["id"] for token in added}, byte_of_char()
    vocab = {token: i for token, i in model["vocab"].items() if i not in added_ids}
    require_exact(all(char in char_byte for token in vocab for char in token),
                  "its vocabulary is not byte-level")
    ranks = {bytes(char_byte[char] for char in token): i for token, i in vocab.items()}
    require_exact(len(ranks) == len(vocab) and all(bytes([b]) in ranks for b in range(256)),
                  "two ids stand for the same bytes, or a byte has no token")
    merges = [merge.split(" ") if isinstance(merge, str) else merge
              for merge in model.get("merges") or []]
    require_exact(all(left in vocab and right in vocab and left + right in vocab
                       for left, right in merges), "a merge makes or takes an unknown token")
    pairs = [(bytes(char_byte[c] for c in left), bytes(char_byte[c] for c in right))
             for left, right in merges]
    made = [ranks[left + right] for left, right in pairs]
    require_exact(all(earlier < later for earlier, later in zip(made, made[1:])),
                  "its ids do not grow in merge order")
    require_exact(len(made) == sum(len(piece) > 1 for piece in ranks),
                  "a token of its vocabulary is made by no merge")
    for left, right in pairs:
        require_exact(last_merge(left + right, ranks) == (left, right),
                      f"its merge {left!r} + {right!r} is not the one tiktoken would make")
    try:
        return tiktoken.Encoding("slm-bpe", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens={token["content"]: token["id"]
                                                 for token in added})
    except ValueError as err:  # its regex engine refused the pattern
        raise NotExact(f"tiktoken cannot compile its pattern ({str(err)[:80]})") from None
