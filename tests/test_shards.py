import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, normalizers

import data
import shards
from conftest import (REPO, TOKENIZER, assert_one_error_line, parent_pid, tiny_config,
                      write_config)
from bpe import load_tokenizer
from data import TokenStream
from utils import DataConfig, UserError

SHARD_BYTES = 4096  # small shards, so a test's few KB make many
PREPARE = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
import shards
shards.SHARD_BYTES = shards.GROUP_MAX_BYTES = {SHARD_BYTES}
tokenize, seconds = shards.tokenize_shard, float(sys.argv[1])
def slow_tokenize(*args):
    time.sleep(seconds)  # room for a kill to land between two shards
    tokenize(*args)
shards.tokenize_shard = slow_tokenize
import data, utils
sys.argv = ["data.py", *sys.argv[2:]]
utils.run_cli(data.main)
"""

SLOW_WORKERS = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
import shards
shards.SHARD_BYTES = shards.GROUP_MAX_BYTES = {SHARD_BYTES}
tokenize = shards.tokenize_shard
def slow_tokenize(*args):
    time.sleep(0.3)  # the forkserver imports this file before it forks the workers: they too
    tokenize(*args)
shards.tokenize_shard = slow_tokenize
if __name__ == "__main__":
    import data, utils
    sys.argv = ["data.py", *sys.argv[1:]]
    utils.run_cli(data.main)
"""


@pytest.fixture(autouse=True)
def small_shards(monkeypatch):
    monkeypatch.setattr(shards, "SHARD_BYTES", SHARD_BYTES)
    monkeypatch.setattr(shards, "GROUP_MAX_BYTES", SHARD_BYTES)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


def lines(count: int, first: int = 0) -> str:
    return "".join(f"Line {i}: to be, or not to be, that is the question.\n"
                   for i in range(first, first + count))


def write_books(directory: Path, count: int, lines_each: int = 60) -> Path:
    """`count` text files of about 3 KB: each its own shard at SHARD_BYTES."""
    directory.mkdir(exist_ok=True)
    for index in range(count):
        (directory / f"book{index:02d}.txt").write_text(lines(lines_each, 100 * index))
    return directory


def prepare(corpus: Path, tokenizer, workers: int = 1, cache: Path | None = None):
    config = DataConfig(tokenizer_path=TOKENIZER, raw_text_path=str(corpus), context_length=8,
                        cache_dir=str(cache or ""))
    return data.prepare_tokens(config, tokenizer, workers)


def shard_directory(corpus: Path) -> Path:
    """Where the cache of a corpus file or directory goes without data.cache_dir, for the
    shipped tokenizer."""
    parent = corpus / "corpus.shards" if corpus.is_dir() else Path(f"{corpus}.shards")
    (directory,) = parent.glob("bpe_4096-*")
    return directory


def finished_shards(corpus: Path) -> list[Path]:
    parent = corpus / "corpus.shards" if corpus.is_dir() else Path(f"{corpus}.shards")
    return sorted(parent.glob("*/*.json"))


def built_now(capsys) -> int:
    out = capsys.readouterr().out
    return int(out.split(" tokenized now")[0].split()[-1]) if "tokenized now" in out else 0


def test_one_and_two_workers_write_the_same_tokens(tmp_path, tokenizer):
    corpus = write_books(tmp_path / "books", 5)
    (corpus / "long.jsonl").write_text("".join(
        json.dumps({"text": lines(3, i)}) + "\n" for i in range(200)))  # cut into pieces
    one, _ = prepare(corpus, tokenizer, 1, tmp_path / "one")
    two, _ = prepare(corpus, tokenizer, 2, tmp_path / "two")
    assert len(list((tmp_path / "two").rglob("*.tokens.bin"))) > 10
    assert one.tolist() == two.tolist()
    eot = tokenizer.token_id(data.EOT)
    whole = [i for k in range(200) for i in tokenizer.encode(lines(3, k)) + [eot]]
    assert one.tolist()[-len(whole):] == whole, "a JSONL file cut at line starts reads the same"


def test_prepare_encodes_with_tiktoken_and_a_tokenizer_it_cannot_follow_falls_back_in_one_line(
        tmp_path, tokenizer, capsys):
    corpus = write_books(tmp_path / "books", 3)
    fast, _ = prepare(corpus, tokenizer, 1, tmp_path / "fast")
    progress = capsys.readouterr().err
    assert "tiktoken)" in progress and "warning:" not in progress
    normalized = Tokenizer.from_file(TOKENIZER)
    normalized.normalizer = normalizers.NFC()  # changes nothing in this text, but is no BPE step
    normalized.save(str(tmp_path / "normalized.json"))
    slow, _ = prepare(corpus, load_tokenizer(str(tmp_path / "normalized.json")), 1,
                      tmp_path / "slow")
    progress = capsys.readouterr().err
    assert ("warning: tokenizing with Hugging Face tokenizers, not tiktoken: it has a "
            "normalizer") in progress and "HF tokenizers)" in progress
    assert slow.tolist() == fast.tolist()


def test_the_default_sized_shard_holds_the_file_as_one_read_gives_it(tmp_path, tokenizer,
                                                                     monkeypatch):
    monkeypatch.setattr(shards, "SHARD_BYTES", 1 << 25)
    text = tmp_path / "plays.txt"
    text.write_text(lines(2000))
    tokens, _ = prepare(text, tokenizer)
    assert len(finished_shards(text)) == 1
    assert tokens.tolist() == tokenizer.encode(text.read_text()) + [
        tokenizer.token_id(data.EOT)]


def test_a_new_file_tokenizes_only_itself_and_a_changed_ones_old_shard_goes(tmp_path, tokenizer,
                                                                            capsys):
    corpus = write_books(tmp_path / "books", 4)
    before, _ = prepare(corpus, tokenizer)
    assert built_now(capsys) == 4
    (corpus / "book01b.txt").write_text(lines(60, 5000))
    after, _ = prepare(corpus, tokenizer)
    assert built_now(capsys) == 1 and len(finished_shards(corpus)) == 5
    new = prepare(corpus / "book01b.txt", tokenizer, cache=tmp_path / "alone")[0].tolist()
    first_two = len(prepare(corpus / "book0[01].txt", tokenizer, cache=tmp_path / "g")[0])
    assert after.tolist() == before.tolist()[:first_two] + new + before.tolist()[first_two:]
    capsys.readouterr()
    (corpus / "book03.txt").write_text(lines(61, 300))
    prepare(corpus, tokenizer)
    assert built_now(capsys) == 1 and len(finished_shards(corpus)) == 5


def test_small_files_are_packed_and_a_new_one_changes_only_its_group(tmp_path, tokenizer,
                                                                     monkeypatch, capsys):
    monkeypatch.setattr(shards, "SHARD_BYTES", 2000)
    monkeypatch.setattr(shards, "GROUP_MAX_BYTES", 4000)
    monkeypatch.setattr(shards, "FILE_MIN_WEIGHT", 1)
    corpus = write_books(tmp_path / "notes", 60, lines_each=2)  # ~110 bytes each
    prepare(corpus, tokenizer)
    groups = built_now(capsys)
    assert 2 <= groups <= 30
    (corpus / "book30b.txt").write_text(lines(2, 9000))
    prepare(corpus, tokenizer)
    assert 1 <= built_now(capsys) <= 2  # its group, which its own draw may split
    assert len(finished_shards(corpus)) in (groups, groups + 1)


def test_a_kill_during_prepare_keeps_finished_shards_and_the_next_does_only_the_rest(
        tmp_path, tokenizer, capsys):
    corpus = write_books(tmp_path / "books", 6)
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, corpus))
    process = subprocess.Popen([sys.executable, "-c", PREPARE, "1.0", "prepare", str(config),
                                "--workers=1"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(finished_shards(corpus)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = len(finished_shards(corpus))
    assert 2 <= kept < 6
    tokens, _ = prepare(corpus, tokenizer)
    assert built_now(capsys) == 6 - kept
    assert tokens.tolist() == prepare(corpus, tokenizer, cache=tmp_path / "fresh")[0].tolist()
    assert not [name for name in os.listdir(shard_directory(corpus)) if ".tmp-" in name]


def process_start(pid: int) -> str | None:
    """A running process's start time, which tells it from a later one given the same pid;
    None when there is none, or only a zombie (ended, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def descendants(pid: int) -> dict[int, str]:
    """The processes below `pid` (children, their children, ...), with their start times."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            children.setdefault(parent_pid(int(entry)), []).append(int(entry))
    family = list(children.get(pid, []))
    for member in family:
        family.extend(children.get(member, []))
    return {member: start for member in family if (start := process_start(member))}


def cache_files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())
            if path.name != shards.LOCK_FILE}


def test_kill_9_of_prepare_ends_its_workers_and_the_next_prepare_builds_the_same_cache(
        tmp_path, tokenizer):
    corpus = write_books(tmp_path / "books", 12)
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, corpus))
    (tmp_path / "slow_prepare.py").write_text(SLOW_WORKERS)
    process = subprocess.Popen([sys.executable, str(tmp_path / "slow_prepare.py"), "prepare",
                                str(config), "--workers=2"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    family: dict[int, str] = {}  # the forkserver, its workers, multiprocessing's tracker

    def survivors() -> list[int]:
        return [pid for pid, start in family.items() if process_start(pid) == start]

    try:
        deadline, workers = time.time() + 120, []
        while (time.time() < deadline and process.poll() is None
               and not (len(workers) == 2 and finished_shards(corpus))):
            family = descendants(process.pid)
            workers = [pid for pid in family if parent_pid(pid) in family]
            time.sleep(0.02)
        process.kill()
        process.wait()
        deadline = time.time() + 5
        while time.time() < deadline and survivors():
            time.sleep(0.05)
        assert len(workers) == 2 and not survivors()
    finally:  # nothing outlives the test, whatever failed
        process.kill()
        for pid in survivors():
            os.kill(pid, signal.SIGKILL)
    assert 1 <= len(finished_shards(corpus)) < 12, "the kill landed while shards were built"
    prepare(corpus, tokenizer, 2)
    prepare(corpus, tokenizer, 1, tmp_path / "fresh")
    (fresh,) = (tmp_path / "fresh").glob("*.shards/bpe_4096-*")
    assert cache_files(shard_directory(corpus)) == cache_files(fresh)


def test_two_processes_on_one_cache_build_each_shard_once(tmp_path):
    corpus = write_books(tmp_path / "books", 6)
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, corpus))
    runs = [subprocess.Popen([sys.executable, "-c", PREPARE, "1.0", "prepare", str(config),
                              "--workers=1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=240) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    built = [int(out.split(" tokenized now")[0].split()[-1]) if "tokenized now" in out else 0
             for out, _ in outputs]
    assert sum(built) == 6 and len(finished_shards(corpus)) == 6


def test_a_workers_error_is_one_line_and_the_finished_shards_stay(tmp_path, tokenizer):
    corpus = write_books(tmp_path / "books", 3)
    prepare(corpus, tokenizer)
    finished = finished_shards(corpus)
    (corpus / "book02b.txt").write_text(lines(60, 7000))
    (corpus / "book02c.txt").write_bytes(b"fine line\n" * 10 + "caf\xe9\n".encode("latin-1"))
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, corpus))
    result = subprocess.run([sys.executable, "-c", PREPARE, "0", "prepare", str(config),
                             "--workers=2"], capture_output=True, text=True, timeout=240)
    assert_one_error_line(result.returncode, result.stderr,
                          r"book02c.txt is not valid UTF-8 \(byte offset 103\)")
    assert set(finished) <= set(finished_shards(corpus))


def test_data_py_prepare_uses_the_tokenizer_training_will_then_training_starts_at_once(
        tmp_path, trained_run):
    corpus = write_books(tmp_path / "books", 3, lines_each=400)
    config = tiny_config(tmp_path, corpus, data={"tokenizer_path": "no/such/tokenizer.json"},
                         training={"init_from": str(trained_run / "ckpt" / "best.pth"),
                                   "max_steps": 2})
    path = write_config(tmp_path / "c.yaml", config)
    prepared = subprocess.run([sys.executable, str(REPO / "data.py"), "prepare", str(path)],
                              capture_output=True, text=True, timeout=240)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    assert "cached" in prepared.stdout and "tokens ready for training" in prepared.stdout
    trained = subprocess.run([sys.executable, str(REPO / "train.py"), str(path)],
                             capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "cached" not in trained.stdout and "tokenizing" not in trained.stderr


def test_a_token_stream_reads_across_shards_as_one_array():
    parts = [np.arange(0, 5, dtype=np.uint16), np.arange(5, 6, dtype=np.uint16),
             np.arange(6, 20, dtype=np.uint16)]
    stream, whole = TokenStream(parts), np.arange(20, dtype=np.uint16)
    assert len(stream) == 20 and stream.dtype == np.uint16
    assert np.array_equal(stream, whole) and stream.tolist() == whole.tolist()
    view = stream[3:17]
    assert isinstance(view, TokenStream) and np.array_equal(view, whole[3:17])
    assert np.array_equal(view[2:9].astype(np.int64), whole[5:12])
    assert view[0] == 3 and view[-1] == 16 and stream[5] == 5
    picks = np.array([0, 4, 5, 6, 13, -1])
    assert np.array_equal(view[picks], whole[3:17][picks])
    assert len(stream[30:40]) == 0 and np.asarray(stream[8:2]).size == 0
    assert np.array_equal(view[-4:], whole[13:17]) and np.array_equal(view[:-12], whole[3:5])
    for bad in (14, -15):
        with pytest.raises(IndexError):
            view[bad]
    with pytest.raises(UserError, match="step 1"):
        stream[::2]
    with pytest.raises(UserError, match="indexed by integers"):
        stream[np.array([True, False])]


def test_a_large_text_file_is_cut_at_line_starts_and_ends_its_document_once(tmp_path,
                                                                            tokenizer):
    text = tmp_path / "long.txt"
    text.write_text(lines(400))  # ~22 KB: five or six pieces
    tokens, _ = prepare(text, tokenizer)
    pieces = shards.cut_file(str(text), text.stat().st_size, text.stat().st_mtime_ns)
    raw = text.read_bytes()
    assert len(pieces) == len(finished_shards(text)) >= 5
    assert all(raw[piece.start - 1:piece.start] == b"\n" for piece in pieces[1:])
    assert [piece.start for piece in pieces[1:]] == [piece.end for piece in pieces[:-1]]
    eot = tokenizer.token_id(data.EOT)
    assert tokens.tolist().count(eot) == 1 and tokens.tolist()[-1] == eot
    pieces_read = [i for piece in pieces
                   for i in tokenizer.encode(raw[piece.start:piece.end].decode())]
    assert tokens.tolist() == pieces_read + [eot]


@pytest.mark.parametrize("content, cut", [
    (b"a" * 4095 + b"\n" + b"b" * 200, 4096),        # a newline just before the target
    (b"a" * 4200 + b"\n" + b"b" * 200, 4201),        # the first newline after it
    (b"word " * 2000, None),                        # no newline: before the last whitespace
    (("日本語" * 1000).encode(), None),              # no whitespace: between two characters
])
def test_where_a_large_file_is_cut(tmp_path, monkeypatch, content, cut):
    monkeypatch.setattr(shards, "LINE_END_BYTES", 1024)
    path = tmp_path / "long.txt"
    path.write_bytes(content)
    pieces = shards.cut_file(str(path), len(content), 0)
    starts = [piece.start for piece in pieces]
    if content.startswith(b"word"):
        assert len(starts) > 1 and all(content[start:start + 1] == b" " for start in starts[1:])
    elif cut is None:  # as corpus.read_text cuts such text: no character is split
        assert len(starts) > 1
        assert "".join(content[p.start:p.end].decode() for p in pieces) == content.decode()
    else:
        assert starts == [0, cut]


def test_windows_and_their_masks_span_shard_boundaries_as_over_one_array():
    tokens = np.arange(1, 104, dtype=np.uint16)
    mask = (np.arange(103) % 3 == 0).astype(np.uint8)
    cuts = [0, 7, 8, 50, 103]  # shards of 7, 1, 42 and 53 tokens
    stream = TokenStream([tokens[a:b] for a, b in zip(cuts, cuts[1:])])
    stream_mask = TokenStream([mask[a:b] for a, b in zip(cuts, cuts[1:])])
    config = DataConfig(context_length=6, batch_size=2, val_split=0.2)
    over_shards = data.split_tokens(stream, config, stream_mask)
    over_array = data.split_tokens(tokens, config, mask)
    for split_shards, split_array in zip(over_shards, over_array):
        assert len(split_shards) == len(split_array) > 0
        for index in data.epoch_order(len(split_array), seed=3, epoch=1):
            for got, expected in zip(split_shards[index], split_array[index]):
                assert torch.equal(got, expected)
    assert data.corpus_fingerprint(stream, stream_mask) == data.corpus_fingerprint(tokens, mask)


def test_a_large_parquet_file_is_cut_where_row_groups_begin_and_reads_as_its_jsonl_twin(
        tmp_path, tokenizer):
    documents = [lines(2, i) for i in range(600)]
    parquet = write_parquet(tmp_path / "docs.parquet", documents)
    twin = tmp_path / "docs.jsonl"
    twin.write_text("".join(json.dumps({"text": document}) + "\n" for document in documents))
    tokens, _ = prepare(parquet, tokenizer)
    assert len(finished_shards(parquet)) >= 3
    assert tokens.tolist() == prepare(twin, tokenizer)[0].tolist()


def test_a_bad_row_in_a_later_piece_of_a_parquet_file_is_named_by_its_row_in_the_file(
        tmp_path, tokenizer):
    documents = [lines(2, i) for i in range(600)]
    documents[450] = None
    with pytest.raises(UserError, match=r"docs.parquet, row 451: column 'text' holds null"):
        prepare(write_parquet(tmp_path / "docs.parquet", documents), tokenizer)


def write_parquet(path: Path, documents: list) -> Path:
    """Row groups of 20 rows (about 2 KB), so the file is cut into many pieces."""
    pq.write_table(pa.table({"text": documents}), path, row_group_size=20)
    return path
