"""The fast encoder: a byte-level BPE tokenizer JSON of Hugging Face tokenizers mapped onto a
tiktoken Encoding that gives exactly its ids, `encode(text, add_special_tokens=False).ids`, and
Hugging Face tokenizers where the tokenizer is not one that maps exactly.

The mapping: tiktoken's mergeable ranks are the vocabulary's byte strings (ByteLevel writes each
byte as one printable character: the inverse of GPT-2's bytes_to_unicode) ranked by id, its
pattern is the pre-tokenizer's regex, and the added tokens are its special tokens. tiktoken
merges the adjacent pair of lowest rank, Hugging Face the pair of the earliest merge, and
tiktoken takes a whole pre-token found in the vocabulary at once: the two agree when the ids
grow in merge order and each merge is the last one tiktoken's rule makes on its token's bytes.
That is checked at load, with every structure of the JSON; anything else falls back.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import tiktoken
from tokenizers import Tokenizer

# The regexes of ByteLevel(use_regex=True) (GPT-2's) and of Llama-3's Split pre-tokenizer
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class NotExact(Exception):
    """Why a tokenizer cannot take the fast path."""


def require_exact(ok: object, why: str) -> None:
    if not ok:
        raise NotExact(why)


@dataclass
class TextEncoder:
    """Text to the tokenizer's ids: through `fast` where it is exact, else Hugging Face's."""
    tokenizer: Tokenizer
    fast: tiktoken.Encoding | None
    why_not_fast: str  # "" on the fast path
    threads: int = 1

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's ids (int64), added tokens inside the text matched as Hugging Face does."""
        if self.fast is None:
            return hf_encode_batch(self.tokenizer, texts)
        try:
            ids = self.fast.encode_batch(texts, num_threads=self.threads, allowed_special="all")
        except ValueError:  # tiktoken's regex gives up on a run of ~1M spaces: one text at a time
            return [self.encode(text) for text in texts]
        return [np.asarray(text_ids, dtype=np.int64) for text_ids in ids]

    def encode(self, text: str) -> np.ndarray:
        if self.fast is not None:
            try:
                return np.asarray(self.fast.encode(text, allowed_special="all"), dtype=np.int64)
            except ValueError:  # as above: this text goes to Hugging Face tokenizers
                pass
        return hf_encode_batch(self.tokenizer, [text])[0]


def hf_encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Hugging Face tokenizers' ids, on its thread pool, without offsets where it can."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return [np.asarray(encoding.ids, dtype=np.int64)
            for encoding in encode(texts, add_special_tokens=False)]


def text_encoder(tokenizer: Tokenizer, threads: int = 1) -> TextEncoder:
    """The tokenizer's encoder: tiktoken where the JSON maps onto it exactly."""
    try:
        return TextEncoder(tokenizer, exact_encoding(json.loads(tokenizer.to_str())), "",
                           threads)
    except NotExact as reason:
        return TextEncoder(tokenizer, None, str(reason), threads)


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
