"""bpe.py: the tokenizer loaded once, with what it carries (end of text, chat format,
fingerprint, the bytes each token stands for); its fast encoder gives Hugging Face tokenizers'
exact ids, on SLM's tokenizer, a freshly trained one and GPT-2-, Llama-3- and SmolLM2-style ones
built here (nothing can be downloaded), and takes the fast path on each; a tokenizer it cannot
follow falls back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from bpe import LLAMA3_PATTERN, BPETokenizer, load_tokenizer, token_byte_lengths
from chat import DEFAULT_TEMPLATE, EOT
from conftest import TOKENIZER
from data import train_tokenizer
from utils import UserError

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


def loaded(tokenizer: Tokenizer, directory: Path, threads: int = 1) -> BPETokenizer:
    """`tokenizer` as SLM loads it: from its JSON file."""
    path = directory / f"{len(list(directory.iterdir()))}.json"
    tokenizer.save(str(path))
    return load_tokenizer(str(path), threads=threads)


@pytest.fixture(scope="module")
def tokenizers(corpus, tmp_path_factory) -> dict[str, BPETokenizer]:
    directory = tmp_path_factory.mktemp("bpe")
    trained = directory / "trained.json"
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    built = {
        "SLM's bpe_4096": Tokenizer.from_file(TOKENIZER),
        "freshly trained": train_tokenizer([str(corpus)], str(trained), vocab_size=1000),
        "GPT-2 style": styled_tokenizer(byte_level, corpus),
        "Llama-3 style": styled_tokenizer(pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), corpus),
        "SmolLM2 style (digits one by one)": styled_tokenizer(pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), byte_level]), corpus),
    }
    return {style: loaded(tokenizer, directory, threads=2) for style, tokenizer in built.items()}


STYLES = ["SLM's bpe_4096", "freshly trained", "GPT-2 style", "Llama-3 style",
          "SmolLM2 style (digits one by one)"]


@pytest.mark.parametrize("style", STYLES)
def test_the_fast_encoder_runs_and_gives_hugging_faces_ids(tokenizers, style):
    tokenizer = tokenizers[style]
    assert tokenizer.fast is not None, tokenizer.why_not_fast  # a fallback is no success
    for text, ids in zip(VARIED, tokenizer.encode_batch(VARIED)):
        assert ids.tolist() == hf_ids(tokenizer.hf, text), text[:80]
    for text in VARIED[:12]:
        assert tokenizer.encode(text) == hf_ids(tokenizer.hf, text), text[:80]


@pytest.mark.parametrize("style", STYLES)
def test_random_unicode_encodes_to_the_same_ids(tokenizers, style):
    tokenizer = tokenizers[style]
    pieces = st.sampled_from([*SPECIALS, " ", "  ", "\t", "\n", "\r\n", "'s", "'LL", "123", "٣",
                              "²", "e\u0301", "😀", "\u00a0", "def ", "ünï"])

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.one_of(pieces, st.text(max_size=12)), max_size=20).map("".join))
    def same_ids(text: str) -> None:
        assert tokenizer.encode(text) == hf_ids(tokenizer.hf, text)

    same_ids()


def test_a_run_of_a_million_spaces_that_tiktoken_refuses_still_encodes(tokenizers):
    tokenizer = tokenizers["SLM's bpe_4096"]
    text = " " * 1_000_001 + "x"
    ids = tokenizer.encode_batch(["a b", text])
    assert ids[1].tolist() == hf_ids(tokenizer.hf, text) and ids[0].tolist() == hf_ids(
        tokenizer.hf, "a b")
    assert tokenizer.encode(text) == ids[1].tolist()


def test_a_tokenizer_it_cannot_follow_falls_back_to_the_same_ids(corpus, tmp_path):
    tokenizer = loaded(styled_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False), corpus,
                                        normalizers.NFKC()), tmp_path)
    assert tokenizer.fast is None and tokenizer.why_not_fast == "it has a normalizer"
    assert [ids.tolist() for ids in tokenizer.encode_batch(VARIED[:12])] == [
        hf_ids(tokenizer.hf, text) for text in VARIED[:12]]
    assert tokenizer.encode(VARIED[4]) == hf_ids(tokenizer.hf, VARIED[4])


def test_a_batch_on_threads_gives_each_texts_ids_in_order(tokenizers):
    tokenizer = dataclasses.replace(tokenizers["SLM's bpe_4096"], threads=2)
    batch = tokenizer.encode_batch(VARIED)
    assert all(np.issubdtype(ids.dtype, np.integer) for ids in batch)
    assert [ids.tolist() for ids in batch] == [tokenizer.encode(text) for text in VARIED]


SAMPLES = [
    "ROMEO:\nBut soft, what light through yonder window breaks?",
    "Ünïcödé — naïve café, Straße, 日本語の文章, Ελληνικά, עברית",
    "emoji 🎭👑🗡️ and a family 👨‍👩‍👧‍👦 with skin tone 👍🏽",
    "  leading spaces,\ttabs,\r\nCRLF and trailing newlines\n\n",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_shipped_tokenizer_round_trips_any_utf8(text):
    tokenizer = load_tokenizer(TOKENIZER)
    assert tokenizer.vocab_size == 4096
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_the_loaded_tokenizer_carries_its_end_of_text_chat_format_and_fingerprint():
    tokenizer = load_tokenizer(TOKENIZER)
    assert tokenizer.end_of_text == EOT and tokenizer.end_of_text_id == tokenizer.token_id(EOT)
    assert tokenizer.chat.template == DEFAULT_TEMPLATE and tokenizer.chat.end_of_turn == EOT
    # every checkpoint and snapshot records this value: it never changes for the same JSON
    assert tokenizer.fingerprint == "a972223d33e66e50"


def test_a_hugging_face_directorys_settings_name_its_end_of_text(tmp_path):
    Tokenizer.from_file(TOKENIZER).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        '{"eos_token": "<|endoftext|>", "bos_token": {"content": "<|endoftext|>"}, '
        '"chat_template": "{{ messages[0][\'content\'] }}"}')
    tokenizer = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tokenizer.chat.template == "{{ messages[0]['content'] }}"
    assert tokenizer.chat.special_tokens == {"bos_token": EOT, "eos_token": EOT}


def test_tokenizer_of_another_size_is_refused_with_the_fix():
    assert load_tokenizer(TOKENIZER, 4096).vocab_size == 4096
    with pytest.raises(
        UserError, match=r"has 4096 tokens but model.vocab_size is 100 — retrain it$"
    ):
        load_tokenizer(TOKENIZER, 100, "retrain it")


def test_a_missing_or_unreadable_tokenizer_or_one_without_end_of_text_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer '.*nope.json' not found — set "):
        load_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match=r"is not a tokenizer JSON — point data.tokenizer_path"):
        load_tokenizer(str(tmp_path / "bad.json"))
    no_eot = Tokenizer(models.BPE({"a": 0, "b": 1}, []))
    no_eot.save(str(tmp_path / "no_eot.json"))
    with pytest.raises(UserError, match=r"has no <\|endoftext\|> token to end documents"):
        load_tokenizer(str(tmp_path / "no_eot.json"))


def test_token_byte_lengths_count_utf8_bytes():
    tokenizer = load_tokenizer(TOKENIZER)
    lengths = token_byte_lengths(tokenizer.hf)
    for text in SAMPLES:
        assert lengths[tokenizer.encode(text)].sum().item() == len(text.encode("utf-8"))
    assert lengths[tokenizer.token_id(EOT)] == 0


def test_added_tokens_that_are_text_count_their_bytes_and_specials_none():
    extended = Tokenizer.from_file(TOKENIZER)
    extended.add_tokens(["<|user|>", "naïve café"])  # text, as chat templates add
    extended.add_special_tokens(["<|pad|>"])
    lengths = token_byte_lengths(extended)
    text = "<|user|> said naïve café, then <|user|> left\n"
    ids = extended.encode(text).ids
    assert extended.token_to_id("<|user|>") in ids and extended.token_to_id("naïve café") in ids
    assert lengths[ids].sum().item() == len(text.encode("utf-8"))
    assert lengths[extended.token_to_id("<|pad|>")] == 0


def test_sentencepiece_style_pieces_count_their_bytes_and_others_are_refused():
    pieces = {"<|endoftext|>": 0, "<0xC3>": 1, "<0xA9>": 2, "\u2581caf": 3, "\u2581the": 4, "s": 5}
    spm = Tokenizer(models.BPE(pieces, [], byte_fallback=True))
    spm.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback()])
    lengths = token_byte_lengths(spm)
    assert lengths.tolist() == [len(EOT), 1, 1, 4, 4, 1]  # EOT is a plain token here, not added
    spm.decoder = decoders.WordPiece()
    with pytest.raises(UserError, match=r"decoder \(WordPiece\) is neither byte-level nor"):
        token_byte_lengths(spm)
