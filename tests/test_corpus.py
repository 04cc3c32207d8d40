"""corpus.py: the format table, its readers (plain, compressed, parquet), the file resolver and
the default corpus."""
import glob
import gzip
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import corpus
import data
from bpe import load_tokenizer
from conftest import REPO, TOKENIZER, assert_one_error_line, run_script, write_conversations
from corpus import (
    LINE_END_BYTES,
    READ_CHUNK_BYTES,
    Chunk,
    Format,
    format_of,
    read_corpus_file,
    read_text,
    reading_key,
    resolve_corpus_files,
    text_cut,
)
from utils import DataConfig, UserError


def test_a_format_added_to_the_table_is_resolved_read_keyed_and_named(tmp_path, monkeypatch):
    def read_shouting(f, path, data):
        text = f.read()
        yield Chunk([text.decode("utf-8").upper()], True, len(text))

    shouting = Format(".md", read_shouting, ("text_field",))
    monkeypatch.setattr(corpus, "FORMATS", (*corpus.FORMATS, shouting))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("hello")
    (tmp_path / "b.txt").write_text("world")
    (tmp_path / "c.csv").write_text("not a format")
    md, txt = str(tmp_path / "notes" / "a.md"), str(tmp_path / "b.txt")
    assert sorted(resolve_corpus_files(str(tmp_path))) == sorted([md, txt])
    assert [chunk.texts for chunk in read_corpus_file(md, DataConfig())] == [["HELLO"]]
    one, other = DataConfig(text_field="a"), DataConfig(text_field="b")
    assert reading_key([md], one) != reading_key([md], other)  # its setting keys the cache
    assert reading_key([txt], one) == reading_key([txt], other)  # text reads no setting
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"a directory of \.txt/\.jsonl/.*/\.md files"):
        resolve_corpus_files(str(tmp_path / "empty"))


def test_a_file_named_by_itself_reads_as_text_whatever_its_suffix(tmp_path):
    (tmp_path / "script.py").write_text("print('hi')\n")
    chunks = list(read_corpus_file(str(tmp_path / "script.py"), DataConfig()))
    assert [chunk.texts for chunk in chunks] == [["print('hi')\n"], [""]]
    assert [chunk.whole_documents for chunk in chunks] == [False, True]


WORDS = "thou art more lovely and more temperate rough winds do shake the darling buds".split()
DOCUMENTS = [f"{i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(i % 40)) + " — ünï"
             for i in range(3000)]


def write_parquet(path: Path, column: str, values: list) -> Path:
    """Several row groups, so rows are numbered and read across them."""
    pq.write_table(pa.table({"id": list(range(len(values))), column: values}), path,
                   row_group_size=max(len(values) // 4, 1))
    return path


def compress(path: Path, plain: Path) -> Path:
    """`plain` compressed to `path` by its suffix; zstd in two frames, as concatenated files are."""
    raw = plain.read_bytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(raw))
    else:
        half = len(raw) // 2
        path.write_bytes(zstandard.ZstdCompressor().compress(raw[:half])
                         + zstandard.ZstdCompressor().compress(raw[half:]))
    return path


def tokens_of(path: Path) -> tuple[list[int], list[int]]:
    """The tokens of one corpus file and the mask of its assistant tokens (empty for text)."""
    config = DataConfig(tokenizer_path=TOKENIZER, raw_text_path=str(path), context_length=8)
    tokens, mask = data.prepare_tokens(config, load_tokenizer(TOKENIZER))
    return tokens.tolist(), [] if mask is None else mask.tolist()


@pytest.mark.parametrize("suffix, kind", [
    (".txt.gz", "text"), (".txt.zst", "text"), (".jsonl.gz", "text"), (".jsonl.zst", "text"),
    (".parquet", "text"), (".jsonl.gz", "conversations"), (".jsonl.zst", "conversations"),
    (".parquet", "conversations")])
def test_a_compressed_or_parquet_file_gives_the_tokens_of_its_plain_twin(tmp_path, suffix, kind):
    if kind == "conversations":
        plain = write_conversations(tmp_path / "plain.jsonl", 300)
        messages = [json.loads(line)["messages"] for line in plain.read_text().splitlines()]
    elif suffix.startswith(".txt"):
        plain = tmp_path / "plain.txt"
        plain.write_text("\n".join(DOCUMENTS), encoding="utf-8")
    else:
        plain = tmp_path / "plain.jsonl"
        plain.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in DOCUMENTS))
    twin = tmp_path / f"twin{suffix}"
    if suffix != ".parquet":
        compress(twin, plain)
    elif kind == "conversations":
        write_parquet(twin, "messages", messages)
    else:
        write_parquet(twin, "text", DOCUMENTS)
    tokens, mask = tokens_of(twin)
    assert (tokens, mask) == tokens_of(plain)
    assert len(tokens) > 10_000 and (kind == "text") == (mask == [])
    chunks = list(read_corpus_file(str(twin), DataConfig()))
    assert sum(chunk.num_bytes for chunk in chunks) == os.path.getsize(twin)  # the progress bar
    if suffix != ".parquet":  # and the text's rate beside it
        assert sum(chunk.text_bytes for chunk in chunks) == os.path.getsize(plain)


def test_the_resolver_finds_the_new_suffixes_and_each_file_reads_as_its_own(tmp_path):
    (tmp_path / "sub").mkdir()
    write_parquet(tmp_path / "sub" / "a.parquet", "body", ["from parquet"])
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"body": "from jsonl"}) + "\n")
    text = tmp_path / "text.txt"
    text.write_text("from text")
    for name, source in [("b.jsonl.gz", plain), ("c.jsonl.zst", plain), ("d.txt.gz", text),
                         ("sub/e.txt.zst", text)]:
        compress(tmp_path / name, source)
    (tmp_path / "f.gz").write_bytes(gzip.compress(b"an unknown suffix"))
    files = resolve_corpus_files(str(tmp_path))
    assert [os.path.relpath(path, tmp_path) for path in files] == [
        "b.jsonl.gz", "c.jsonl.zst", "d.txt.gz", "plain.jsonl", "sub/a.parquet", "sub/e.txt.zst",
        "text.txt"]
    body = DataConfig(text_field="body")
    texts = {os.path.relpath(path, tmp_path): [text for chunk in read_corpus_file(path, body)
                                               for text in chunk.texts if text]
             for path in files}
    assert texts == {"b.jsonl.gz": ["from jsonl"], "c.jsonl.zst": ["from jsonl"],
                     "d.txt.gz": ["from text"], "plain.jsonl": ["from jsonl"],
                     "sub/a.parquet": ["from parquet"], "sub/e.txt.zst": ["from text"],
                     "text.txt": ["from text"]}
    assert format_of("x.txt.gz").suffix == ".txt.gz" and format_of("x.gz").suffix == ".txt"
    for path in files:  # the text field keys the cache of the formats that read it
        keyed = reading_key([path], body) != reading_key([path], DataConfig())
        assert keyed == (".txt" not in path), path


def test_train_tokenizer_learns_from_a_zstd_jsonl_and_a_parquet_file(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"text": "Plain words, zstandard words. " * 40}) + "\n")
    zst = compress(tmp_path / "a.jsonl.zst", plain)
    parquet = write_parquet(tmp_path / "b.parquet", "text", ["Columnar rows, parquet rows."] * 40)
    out = tmp_path / "bpe.json"
    trained = data.train_tokenizer([str(zst), str(parquet)], str(out), vocab_size=300)
    assert out.exists()
    # merges were learned from both files: words that only one of them holds are compressed
    assert len(trained.encode("zstandard words").ids) <= len("zstandard words") // 3
    assert len(trained.encode("parquet rows").ids) <= len("parquet rows") // 3


def damaged(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A damaged corpus file and what its error must say after the file's name."""
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    if case == "null parquet text":
        texts = ["fine"] * 40
        texts[30] = None
        return write_parquet(tmp_path / "a.parquet", "text", texts), ", row 31: column 'text' " \
            "holds null, not text — fix or remove that row"
    if case == "bad parquet conversation":
        conversations = [conversation] * 40
        conversations[25] = [{"role": "user", "content": "no answer"}]
        return write_parquet(tmp_path / "a.parquet", "messages", conversations), \
            ", row 26: it has no assistant turn to train on — fix that row"
    if case == "parquet without the column":
        return write_parquet(tmp_path / "a.parquet", "body", ["x"]), \
            " has no column 'text' (its columns: id, body) — set data.text_field"
    if case == "not parquet":
        (tmp_path / "a.parquet").write_text("a CSV, renamed\n" * 10)
        return tmp_path / "a.parquet", " is not a readable parquet file ("
    if case == "garbage gzip":
        (tmp_path / "a.txt.gz").write_bytes(b"not gzip at all " * 10)
        return tmp_path / "a.txt.gz", " is truncated or not valid gzip ("
    if case == "truncated gzip":
        whole = gzip.compress("\n".join(DOCUMENTS).encode())
        (tmp_path / "a.txt.gz").write_bytes(whole[:len(whole) // 2])
        return tmp_path / "a.txt.gz", " is truncated or not valid gzip ("
    if case == "truncated zstd":
        whole = zstandard.ZstdCompressor().compress(
            "".join(json.dumps({"text": doc}) + "\n" for doc in DOCUMENTS).encode())
        (tmp_path / "a.jsonl.zst").write_bytes(whole[:len(whole) // 2])
        return tmp_path / "a.jsonl.zst", " is truncated or not valid zstd ("
    if case == "non-UTF-8 gzip line":
        lines = b'{"text": "fine"}\n' * 2 + b'{"text": "caf\xe9"}\n' + b'{"text": "fine"}\n'
        (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
        return tmp_path / "a.jsonl.gz", ", line 3: not a JSON line (not UTF-8) — fix or remove"
    raise AssertionError(case)


DAMAGES = ["null parquet text", "bad parquet conversation", "parquet without the column",
           "not parquet", "garbage gzip", "truncated gzip", "truncated zstd", "non-UTF-8 gzip line"]


@pytest.mark.parametrize("case", DAMAGES)
def test_a_damaged_file_is_one_error_line_naming_it_and_the_row_or_line(tmp_path, case):
    path, message = damaged(tmp_path, case)
    with pytest.raises(UserError) as error:
        list(read_corpus_file(str(path), DataConfig()))
    assert str(error.value).startswith(f"{path}{message}") and "\n" not in str(error.value)


def test_train_tokenizer_on_a_truncated_zstd_file_exits_with_one_error_line(tmp_path):
    path, message = damaged(tmp_path, "truncated zstd")
    result = run_script("data.py", "train-tokenizer", path.name, "--vocab-size", "300", "--out",
                        "bpe.json", cwd=tmp_path)
    assert_one_error_line(result.returncode, result.stderr, "^error: " + re.escape(
        path.name + message))
    assert not (tmp_path / "bpe.json").exists()


def pieces(raw: bytes) -> list[bytes]:
    """The text pieces read_text reads from `raw`, as the bytes they came from."""
    chunks = read_text(io.BytesIO(raw), "text.txt", DataConfig())
    return [text.encode("utf-8") for chunk in chunks for text in chunk.texts if text]


@pytest.mark.parametrize("spaced", [True, False])
def test_text_without_newlines_is_read_in_bounded_pieces_that_join_back_to_it(spaced):
    raw = (" ".join(["thou", "art", "ünïcödé", "日本語", "🎭\t"] * 400_000) if spaced
           else "ü日🎭" * 1_500_000).encode("utf-8")
    read = pieces(raw)  # each decoded: no piece ends inside a UTF-8 character
    assert len(read) >= 3 and b"".join(read) == raw
    assert max(map(len, read)) <= READ_CHUNK_BYTES + LINE_END_BYTES
    if spaced:  # cut before whitespace: no word is split between two pieces
        assert all(piece[:1].isspace() for piece in read[1:])


def test_text_is_cut_before_its_last_whitespace_else_between_two_characters():
    assert text_cut(b"thou art\tfair") == 8  # before the tab: "fair" keeps its space
    assert text_cut(b" leading") == 7  # a space first only: before the last character
    for char in ("a", "ü", "日", "🎭"):
        run = (char * 5).encode("utf-8")
        cut = text_cut(run)
        assert cut == len(run) - len(char.encode("utf-8"))  # before the last character
        assert run[:cut].decode("utf-8") + run[cut:].decode("utf-8") == char * 5
    assert text_cut("🎭".encode("utf-8")) == 0 and text_cut(b"") == 0


def test_text_with_newlines_is_read_in_the_same_pieces_as_before():
    lines = ["a long line " * 25_000 if i % 5000 == 0 else " ".join(WORDS[: 1 + i % len(WORDS)])
             for i in range(150_000)]
    raw = "\n".join(lines).encode("utf-8")
    before, f = [], io.BytesIO(raw)
    while piece := f.read(READ_CHUNK_BYTES) + f.readline():  # the rule caches were built with
        before.append(piece)
    assert len(before) >= 3 and max(map(len, before)) > READ_CHUNK_BYTES + 100_000  # long lines
    assert pieces(raw) == before


def glob_listing(raw_text_path: str) -> list[str]:
    """The files the resolver listed when it was glob.glob(recursive=True): a loop-free tree
    must keep this list, path for path, so that no cache is rebuilt."""
    patterns = ([os.path.join(raw_text_path, "**", f"*{fmt.suffix}") for fmt in corpus.FORMATS]
                if os.path.isdir(raw_text_path) else [raw_text_path])
    matches = sorted(path for pattern in patterns
                     for path in glob.glob(pattern, recursive=True))
    return [path for path in matches if os.path.isfile(path)]


def write_tree(root: Path, bulk: int = 30) -> Path:
    """Nested directories of files of every format, `bulk` of them in a tree of their own, and
    the names a walker gets wrong: hidden files and directories, a sibling whose name sorts
    between a directory and its files (`a-b` between `a` and `a/`), a directory named like a
    file, an unknown suffix, a glob character, links to a file and a directory outside."""
    names = ["a/1.txt", "a/b/2.jsonl", "a/b/c/3.parquet", "a-b/4.txt.gz", "a.txt", ".hid/5.txt",
             ".h.txt", "sub/.inner/6.txt", "sub/7.jsonl.zst", "sub/shard-1.jsonl.gz",
             "sub/shard-2.jsonl.gz", "sub/notes.md", "we[ird]/8.txt", "x.txt.d/9.txt.zst",
             *(f"bulk/{i % 7}/{i % 3}/doc{i}{corpus.FORMATS[i % 7].suffix}" for i in range(bulk))]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    (root / "folder.txt").mkdir()
    outside = root.parent / f"{root.name}-outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "10.txt").write_text("outside")
    (root.parent / f"{root.name}-outside.txt").write_text("outside")
    (root / "linked.txt").symlink_to(root.parent / f"{root.name}-outside.txt")
    (root / "a" / "linked").symlink_to(outside)
    return root


RECURSIVE_GLOBS = ["**/*.txt", "**/shard-*.jsonl.gz", "**", "*/**/*.txt", "**/.inner/*.txt",
                   "a/**/c/*", "**/b/**", "sub/*.jsonl.gz"]


def test_a_corpus_without_duplicates_lists_the_same_files_in_the_same_order_as_before(tmp_path):
    root = write_tree(tmp_path / "corpus", bulk=3000)
    files = resolve_corpus_files(str(root))
    assert len(files) == 3000 + 12 and files == glob_listing(str(root))
    for pattern in RECURSIVE_GLOBS:
        assert resolve_corpus_files(f"{root}/{pattern}") == glob_listing(f"{root}/{pattern}")


def test_a_symlink_loop_in_a_corpus_directory_reads_each_file_once_and_says_so(tmp_path,
                                                                               capsys):
    root = write_tree(tmp_path / "corpus")
    before = resolve_corpus_files(str(root))
    (root / "loop").symlink_to(".")
    assert resolve_corpus_files(str(root)) == before
    warnings = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert warnings == [f"warning: skipped 0 duplicate path(s) of files already in the corpus "
                        f"and 1 path(s) to directories already walked (symlink loops, or a "
                        f"second path to one directory), e.g. {root}/loop"]


def test_a_corpus_with_two_symlink_loops_resolves_at_once_reading_each_file_once(tmp_path):
    root = write_tree(tmp_path / "corpus")
    before = resolve_corpus_files(str(root))
    (root / "loop").symlink_to(".")
    (root / "a" / "b" / "up").symlink_to("../..")
    listing = subprocess.run(  # a separate process: a walker that loops fails here, not hangs
        [sys.executable, "-c", "import sys, corpus\nfor path in corpus.resolve_corpus_files("
         "sys.argv[1]): print(path)", str(root)], cwd=REPO, capture_output=True, text=True,
        timeout=120)
    assert listing.stdout.splitlines() == before
    assert "and 2 path(s) to directories already walked" in listing.stderr


def test_a_directory_also_reached_through_a_link_is_read_once_by_its_first_sorted_path(
        tmp_path, capsys):
    root = tmp_path / "corpus"
    (root / "middle").mkdir(parents=True)
    (root / "middle" / "play.txt").write_text("to be")
    (root / "middle" / "poem.jsonl").write_text('{"text": "or not"}\n')
    (root / "link").symlink_to("middle")
    (root / "link-2").symlink_to("middle")  # "link-2/" sorts before "link/"
    (root / "z-copy.txt").symlink_to(root / "middle" / "play.txt")
    assert resolve_corpus_files(str(root)) == [f"{root}/link-2/play.txt",
                                               f"{root}/link-2/poem.jsonl"]
    assert "skipped 1 duplicate path(s) of files already in the corpus and 2 path(s) to " \
           "directories already walked" in capsys.readouterr().err


@pytest.mark.parametrize("pattern", ["**/*.txt", "**/shard-*.jsonl.gz", "*/**/*.jsonl.zst"])
def test_a_recursive_glob_over_a_tree_with_a_loop_matches_each_file_once(tmp_path, pattern):
    root = write_tree(tmp_path / "corpus")
    before = glob_listing(f"{root}/{pattern}")
    (root / "sub" / "loop").symlink_to("..")
    assert resolve_corpus_files(f"{root}/{pattern}") == before
