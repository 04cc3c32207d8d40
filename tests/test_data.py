import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from bpe import load_tokenizer
from chat import DEFAULT_TEMPLATE, assistant_spans, chat_format, trained_mask
from conftest import TOKENIZER, assert_one_error_line, run_main, write_conversations
from plays import DEFAULT_CORPUS
from data import (
    EOT,
    IGNORE_INDEX,
    TokenWindows,
    corpus_fingerprint,
    epoch_order,
    prepare_tokens,
    split_tokens,
    train_tokenizer,
)
from utils import DataConfig, UserError

SAMPLES = [
    "ROMEO:\nBut soft, what light through yonder window breaks?",
    "Ünïcödé — naïve café, Straße, 日本語の文章, Ελληνικά, עברית",
    "emoji 🎭👑🗡️ and a family 👨‍👩‍👧‍👦 with skin tone 👍🏽",
    "  leading spaces,\ttabs,\r\nCRLF and trailing newlines\n\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


def write_jsonl(path: Path, records: list, blank_lines: bool = False) -> Path:
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n", encoding="utf-8")
    return path


DOCUMENTS = ["First document.\nTwo lines.", "Ünïcode, second one", "third"]


def test_jsonl_lines_are_documents_each_ended_by_end_of_text(tmp_path, tokenizer):
    corpus = write_jsonl(
        tmp_path / "docs.jsonl", [{"text": doc, "id": i} for i, doc in enumerate(DOCUMENTS)], True
    )
    tokens, _ = prepare_tokens(
        DataConfig(raw_text_path=str(corpus), context_length=2, val_split=0.5), tokenizer
    )
    eot = tokenizer.token_id(EOT)
    expected = [i for doc in DOCUMENTS for i in tokenizer.encode(doc) + [eot]]
    assert tokens.tolist() == expected


def test_text_field_names_where_the_document_is(tmp_path, tokenizer):
    corpus = write_jsonl(tmp_path / "docs.jsonl", [{"body": doc} for doc in DOCUMENTS])
    data = DataConfig(raw_text_path=str(corpus), context_length=2, val_split=0.5, text_field="body")
    eot = tokenizer.token_id(EOT)
    assert prepare_tokens(data, tokenizer)[0].tolist() == [
        i for doc in DOCUMENTS for i in tokenizer.encode(doc) + [eot]
    ]


def test_a_directory_mixes_text_and_jsonl_files(tmp_path, tokenizer):
    (tmp_path / "mixed" / "sub").mkdir(parents=True)
    write_jsonl(tmp_path / "mixed" / "sub" / "a.jsonl", [{"text": doc} for doc in DOCUMENTS])
    (tmp_path / "mixed" / "b.txt").write_text("A plain text file.\n", encoding="utf-8")
    (tmp_path / "mixed" / "notes.md").write_text("not part of the corpus", encoding="utf-8")
    tokens, _ = prepare_tokens(
        DataConfig(raw_text_path=str(tmp_path / "mixed"), context_length=2, val_split=0.5),
        tokenizer,
    )
    assert int((np.asarray(tokens) == tokenizer.token_id(EOT)).sum()) == len(DOCUMENTS) + 1


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"text": "unterminated', "line 2: not a JSON line"),
        ('["a", "list"]', "line 2: no string field 'text'"),
        ('{"title": "no text field"}', "line 2: no string field 'text'"),
        (
            '{"text": 42}',
            "line 2: no string field 'text' — fix that line, or set data.text_field",
        ),
    ],
)
def test_a_malformed_jsonl_line_is_one_error_with_its_file_and_line(
    tmp_path, tokenizer, bad_line, message
):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "fine"}\n' + bad_line + '\n{"text": "fine"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(f"{corpus}, ") + message):
        prepare_tokens(DataConfig(raw_text_path=str(corpus), context_length=4), tokenizer)
    assert not list(tmp_path.glob("*.shards"))


def test_default_corpus_path_is_built_on_first_use(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = DataConfig(raw_text_path=DEFAULT_CORPUS)
    tokens, _ = prepare_tokens(config, tokenizer)
    assert (tmp_path / DEFAULT_CORPUS).exists()
    assert len(tokens) > 1_000_000 and tokens.dtype == np.uint16


def test_token_cache_is_reused_and_invalidated(tmp_path, tokenizer):
    text_path = tmp_path / "text.txt"
    text_path.write_text("To be, or not to be, that is the question.\n" * 50, encoding="utf-8")
    config = DataConfig(raw_text_path=str(text_path), context_length=8)
    first, _ = prepare_tokens(config, tokenizer)
    (bin_path,) = Path(str(text_path) + ".shards").glob("bpe_4096-*/*.tokens.bin")
    assert np.array_equal(
        first[:-1], tokenizer.encode(text_path.read_text())
    )
    assert first[-1] == tokenizer.token_id(EOT)
    stamp = bin_path.stat().st_mtime_ns
    assert np.array_equal(prepare_tokens(config, tokenizer)[0], first)
    assert bin_path.stat().st_mtime_ns == stamp, "unchanged text and tokenizer must reuse the cache"

    with open(text_path, "a", encoding="utf-8") as f:
        f.write("Whether 'tis nobler in the mind to suffer\n")
    assert len(prepare_tokens(config, tokenizer)[0]) > len(first), "changed text must re-tokenize"
    assert not bin_path.exists(), "the changed file's old shard is removed"

    other_path = tmp_path / "other.json"
    train_tokenizer([str(text_path)], str(other_path), vocab_size=300)
    other = load_tokenizer(str(other_path))
    retokenized, _ = prepare_tokens(config, other)
    assert np.array_equal(
        retokenized[:-1], other.encode(text_path.read_text())
    ), "new tokenizer must re-tokenize"


def test_directory_and_glob_corpora(tmp_path, tokenizer):
    (tmp_path / "books").mkdir()
    for i in range(3):
        (tmp_path / "books" / f"b{i}.txt").write_text(f"book {i} " * 20, encoding="utf-8")
    from_dir, _ = prepare_tokens(
        DataConfig(raw_text_path=str(tmp_path / "books"), context_length=8), tokenizer
    )
    from_glob, _ = prepare_tokens(
        DataConfig(raw_text_path=str(tmp_path / "books" / "b*.txt"), context_length=8), tokenizer
    )
    assert np.array_equal(from_dir, from_glob)
    eots = np.asarray(from_dir) == tokenizer.token_id(EOT)
    assert int(eots.sum()) == 3  # one boundary after each file


def test_bad_corpora_are_clear_errors(tmp_path, tokenizer):
    with pytest.raises(UserError, match="no text found"):
        prepare_tokens(DataConfig(raw_text_path=str(tmp_path / "missing.txt")), tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="is empty"):
        prepare_tokens(DataConfig(raw_text_path=str(empty)), tokenizer)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("abc café".encode("latin-1"))
    with pytest.raises(UserError, match=r"not valid UTF-8 \(byte offset 7\)"):
        prepare_tokens(DataConfig(raw_text_path=str(latin1)), tokenizer)
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.", encoding="utf-8")
    with pytest.raises(UserError, match="too short for one train and one val window of 128"):
        prepare_tokens(DataConfig(raw_text_path=str(short)), tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "empty.txt",
        "latin1.txt",
        "short.txt",
    ]  # no cache


def test_windows_are_shifted_and_non_overlapping():
    tokens = np.arange(101, dtype=np.uint16)
    windows = TokenWindows(tokens, context_length=10)
    assert len(windows) == 10
    x, y = windows[3]
    assert (
        x.dtype == torch.int64
        and torch.equal(x, torch.arange(30, 40))
        and torch.equal(y, torch.arange(31, 41))
    )


def test_split_takes_validation_from_the_end():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split_tokens(tokens, DataConfig(context_length=10, batch_size=4, val_split=0.1))
    assert len(train.tokens) == 900 and val.tokens[0] == 900
    assert int(train.tokens[-1]) < int(val.tokens[0])
    with pytest.raises(UserError, match="too short"):
        split_tokens(np.arange(30, dtype=np.uint16), DataConfig(context_length=16, val_split=0.1))


def test_epoch_order_is_a_seeded_shuffle_held_as_an_int32_array():
    order = epoch_order(100, seed=1, epoch=0)
    assert isinstance(order, np.ndarray) and order.dtype == np.int32
    assert sorted(order) == list(range(100)) and order.tolist() != list(range(100))
    assert order.tolist() == epoch_order(100, seed=1, epoch=0).tolist()
    assert order.tolist() != epoch_order(100, seed=1, epoch=1).tolist()
    assert order.tolist() != epoch_order(100, seed=2, epoch=0).tolist()
    # torch.randperm's int64 order, as earlier versions kept it: old snapshots resume exactly
    seeded = torch.Generator().manual_seed(1)
    assert order.tolist() == torch.randperm(100, generator=seeded).tolist()


def test_a_window_past_two_billion_tokens_is_read_at_its_offset(tmp_path):
    index, context = 2_200_000, 1024  # index x context passes 2**31: int32 arithmetic overflows
    path = tmp_path / "big.tokens.bin"
    with open(path, "wb") as f:  # a sparse file: only the marked window takes disk space
        f.truncate(2 * (index + 2) * context)
        f.seek(2 * index * context)
        f.write(np.arange(1, context + 2, dtype=np.uint16).tobytes())
    windows = TokenWindows(np.memmap(path, dtype=np.uint16, mode="r"), context)
    x, y = windows[np.int32(index)]  # the index type epoch_order hands out
    assert x.tolist() == list(range(1, context + 1)) and y[-1] == context + 1


def test_each_rank_walks_its_share_of_the_epoch_like_distributed_sampler():
    from torch.utils.data import DistributedSampler

    windows = TokenWindows(np.arange(1001, dtype=np.uint16), context_length=10)  # 100 windows
    for world_size in (1, 2, 3):
        shares = []
        for rank in range(world_size):
            sampler = DistributedSampler(
                windows, num_replicas=world_size, rank=rank, shuffle=True, seed=5, drop_last=True
            )
            sampler.set_epoch(3)
            shares.append(
                epoch_order(len(windows), seed=5, epoch=3, rank=rank, world_size=world_size)
            )
            assert shares[-1].tolist() == list(sampler)
        assert sum(map(len, shares)) == 100 - 100 % world_size
        assert len(set().union(*shares)) == 100 - 100 % world_size  # disjoint
    two_ranks = [epoch_order(100, seed=5, epoch=3, rank=rank, world_size=2) for rank in (0, 1)]
    one_process = epoch_order(100, seed=5, epoch=3)
    assert one_process.tolist() == [i for pair in zip(*two_ranks) for i in pair]  # one order


def test_train_tokenizer_command_reads_text_and_jsonl(tmp_path, monkeypatch, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"text": doc * 20} for doc in DOCUMENTS])
    (tmp_path / "b.txt").write_text("Plain text, plain words.\n" * 40, encoding="utf-8")
    out = tmp_path / "tok" / "bpe.json"
    argv = ["train-tokenizer", "a.jsonl", "b.txt", "--vocab-size", "300", "--out", str(out)]
    code, stdout, stderr = run_main(data.main, argv, tmp_path, monkeypatch, capsys)
    assert code == 0, stderr
    assert f"wrote {out} (300 tokens from 2 file(s)); train with data.tokenizer_path=" in stdout
    trained = load_tokenizer(str(out), vocab_size=300)
    for text in [*DOCUMENTS, *SAMPLES]:
        assert trained.decode(trained.encode(text)) == text
    # merges were learned from both files: words that only one of them holds are compressed
    assert len(trained.encode("First document")) <= len("First document") // 2
    assert len(trained.encode("plain words")) <= len("plain words") // 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train-tokenizer", "a.jsonl", "--vocab-size", "100", "--out", "t.json"],
            r"--vocab-size must be in \[258, ",
        ),
        (
            ["train-tokenizer", "nope.txt", "--vocab-size", "300", "--out", "t.json"],
            "no text found at data.raw_text_path='nope.txt'",
        ),
        (
            ["train-tokenizer", "a.jsonl", "--vocab-size", "300"],
            "the following arguments are required: --out",
        ),
        (["tokenise"], "argument COMMAND: invalid choice: 'tokenise'"),
        (
            ["train-tokenizer", "empty.txt", "--vocab-size", "300", "--out", "t.json"],
            r"empty.txt hold\(s\) no text — a tokenizer needs text",
        ),
        (
            ["train-tokenizer", "one.txt", "--vocab-size", "300", "--out", "t.json"],
            "holds no pair of tokens seen twice, so no merge was learned and t.json was not",
        ),
    ],
)
def test_train_tokenizer_command_mistakes_are_one_line(
    tmp_path, monkeypatch, capsys, argv, message
):
    write_jsonl(tmp_path / "a.jsonl", [{"text": doc} for doc in DOCUMENTS])
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "one.txt").write_text("x")
    code, stdout, stderr = run_main(data.main, argv, tmp_path, monkeypatch, capsys)
    assert_one_error_line(code, stderr, message)
    assert not (tmp_path / "t.json").exists()


GOOD_CONVERSATION = '{"messages": [{"role": "user", "content": "hi"}, ' \
    '{"role": "assistant", "content": "hello"}]}'


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"messages": "hi"}', "line 2: 'messages' is not a non-empty list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "line 2: message 1 has role 'bot'"),
        ('{"messages": [{"role": "user", "content": 3}]}', "line 2: message 1's content is not"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "line 2: it has no assistant turn"),
        ('{"text": "a document"}', "line 2: a text document after the conversation of line 1"),
    ],
)
def test_a_malformed_conversation_line_is_one_error_with_its_file_and_line(
    tmp_path, tokenizer, bad_line, message
):
    corpus = tmp_path / "chat.jsonl"
    corpus.write_text(f"{GOOD_CONVERSATION}\n{bad_line}\n{GOOD_CONVERSATION}\n")
    with pytest.raises(UserError, match=re.escape(f"{corpus}, ") + re.escape(message)):
        prepare_tokens(DataConfig(raw_text_path=str(corpus), context_length=4), tokenizer)
    assert not list(tmp_path.glob("*.shards"))


def test_conversations_and_text_in_one_corpus_are_refused_in_one_line(tmp_path, tokenizer):
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text(GOOD_CONVERSATION + "\n")
    (tmp_path / "mixed" / "b.txt").write_text("plain text " * 50)
    with pytest.raises(UserError, match="holds conversations and .*b.txt text — a run trains"):
        prepare_tokens(DataConfig(raw_text_path=str(tmp_path / "mixed"), context_length=4),
                       tokenizer)


def test_conversations_cache_a_mask_of_the_assistant_tokens_checked_like_the_tokens(
    tmp_path, tokenizer
):
    corpus = write_conversations(tmp_path / "chat.jsonl", 40)
    data = DataConfig(raw_text_path=str(corpus), context_length=8, val_split=0.2)
    tokens, mask = prepare_tokens(data, tokenizer)
    chat = chat_format(TOKENIZER)
    expected_tokens, expected_mask = [], []
    for line in corpus.read_text().splitlines():
        text, spans = assistant_spans(chat, json.loads(line)["messages"])
        encoding = tokenizer.hf.encode(text, add_special_tokens=False)
        expected_tokens += encoding.ids
        expected_mask += trained_mask(encoding.offsets, spans)
    assert tokens.tolist() == expected_tokens and (np.asarray(mask) > 0).tolist() == expected_mask
    train, val = split_tokens(tokens, data, mask)
    x, y = train[3]
    assert x.tolist() == tokens[24:32].tolist()
    assert y.tolist() == [t if m else IGNORE_INDEX for t, m in zip(tokens[25:33], mask[25:33])]
    assert val.mask is not None and len(val.mask) == len(val.tokens)
    assert corpus_fingerprint(tokens, mask) != corpus_fingerprint(tokens)
    flipped = np.array(mask)
    flipped[len(mask) // 2] ^= 1
    assert corpus_fingerprint(tokens, flipped) != corpus_fingerprint(tokens, mask)

    (mask_path,) = Path(str(corpus) + ".shards").glob("*/*.mask.bin")
    mask_path.write_bytes(mask_path.read_bytes()[:-1])  # a truncated mask: rebuilt
    assert np.array_equal(prepare_tokens(data, tokenizer)[1], mask)
    lower = DEFAULT_TEMPLATE.replace("upper", "lower").replace("ASSISTANT", "assistant")
    (tmp_path / "chat_template.jinja").write_text(lower)
    moved = dataclasses.replace(data, tokenizer_path=str(tmp_path / "tok.json"))
    shutil.copy(TOKENIZER, tmp_path / "tok.json")
    retemplated, _ = prepare_tokens(moved, load_tokenizer(moved.tokenizer_path))
    assert not np.array_equal(retemplated, tokens), "another template must re-tokenize"
