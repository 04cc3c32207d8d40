"""bpe.py: the fast encoder gives Hugging Face tokenizers' exact ids, on SLM's tokenizer, a
freshly trained one and GPT-2-, Llama-3- and SmolLM2-style ones built here (nothing can be
downloaded), and takes the fast path on each; a tokenizer it cannot follow falls back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from bpe import LLAMA3_PATTERN, text_encoder
from conftest import TOKENIZER
from data import train_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CODE = "def f(x):\n\tif x:\n\t\treturn  x  +  1   # a tab\there\n    pass\n\n        \n  \t \n"
VARIED = [
    "", " ", "Hello  world   !", "I'm don't WE'LL You'Re 's", CODE, CODE * 20,
    CODE.replace("\n", "\r\n") * 5, "line1\r\nline2\r\n\r\n  \r\n\tx\r",
    "café naïve Ærøskøbing Ångström e\u0301 ñ ß", "中文字符测试，日本語のテキスト。한국어 텍스트",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ ✨x✨", "1234567890" * 50, "x=3.14159e-10, 1,000,000 and 007",
    "١٢٣٤ ४५६ １２３ ²³ ½", "\u00a0\u2028\u3000\u200b\x0b\x0c\x85 end",
    "a<|endoftext|>b", "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n  42",
    "<|endoftext|", "<|endoftext|>>", " <|im_end|> ", "\x00\x01\x7f", " " * 3000 + "x",
    "".join(chr(0x61 + (i * 7919) % 26) + "/=_-."[i % 5] for i in range(500_000)),  # 1 MB
]


def hf_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def styled_tokenizer(pre_tokenizer: pre_tokenizers.PreTokenizer, corpus: Path,
                     normalizer: normalizers.Normalizer | None = None) -> Tokenizer:
    """A byte-level BPE trained here with `pre_tokenizer`, as GPT-2, Llama-3 and SmolLM2 are."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    text = corpus.read_text(encoding="utf-8")[:300_000]
    tokenizer.train_from_iterator([text, CODE * 50, "1234 5678 90 " * 200], trainer)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers(corpus, tmp_path_factory) -> dict[str, Tokenizer]:
    trained = tmp_path_factory.mktemp("bpe") / "trained.json"
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return {
        "SLM's bpe_4096": Tokenizer.from_file(TOKENIZER),
        "freshly trained": train_tokenizer([str(corpus)], str(trained), vocab_size=1000),
        "GPT-2 style": styled_tokenizer(byte_level, corpus),
        "Llama-3 style": styled_tokenizer(pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), corpus),
        "SmolLM2 style (digits one by one)": styled_tokenizer(pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), byte_level]), corpus),
    }


STYLES = ["SLM's bpe_4096", "freshly trained", "GPT-2 style", "Llama-3 style",
          "SmolLM2 style (digits one by one)"]


@pytest.mark.parametrize("style", STYLES)
def test_the_fast_encoder_runs_and_gives_hugging_faces_ids(tokenizers, style):
    tokenizer = tokenizers[style]
    encoder = text_encoder(tokenizer, threads=2)
    assert encoder.fast is not None, encoder.why_not_fast  # a fallback is no success
    for text, ids in zip(VARIED, encoder.encode_batch(VARIED)):
        assert ids.tolist() == hf_ids(tokenizer, text), text[:80]


@pytest.mark.parametrize("style", STYLES)
def test_random_unicode_encodes_to_the_same_ids(tokenizers, style):
    tokenizer = tokenizers[style]
    encoder = text_encoder(tokenizer)
    pieces = st.sampled_from([*SPECIALS, " ", "  ", "\t", "\n", "\r\n", "'s", "'LL", "123", "٣",
                              "²", "e\u0301", "😀", "\u00a0", "def ", "ünï"])

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.one_of(pieces, st.text(max_size=12)), max_size=20).map("".join))
    def same_ids(text: str) -> None:
        assert encoder.encode(text).tolist() == hf_ids(tokenizer, text)

    same_ids()


def test_a_run_of_a_million_spaces_that_tiktoken_refuses_still_encodes(tokenizers):
    tokenizer = tokenizers["SLM's bpe_4096"]
    text = " " * 1_000_001 + "x"
    ids = text_encoder(tokenizer).encode_batch(["a b", text])
    assert ids[1].tolist() == hf_ids(tokenizer, text) and ids[0].tolist() == hf_ids(tokenizer,
                                                                                    "a b")


def test_a_tokenizer_it_cannot_follow_falls_back_to_the_same_ids(corpus):
    tokenizer = styled_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False), corpus,
                                 normalizers.NFKC())
    encoder = text_encoder(tokenizer)
    assert encoder.fast is None and encoder.why_not_fast == "it has a normalizer"
    assert [ids.tolist() for ids in encoder.encode_batch(VARIED[:12])] == [
        hf_ids(tokenizer, text) for text in VARIED[:12]]


def test_ids_come_as_int64_arrays(tokenizers):
    ids = text_encoder(tokenizers["SLM's bpe_4096"]).encode_batch(["O Romeo"])[0]
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64 and len(ids) > 0
