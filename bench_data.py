"""Benchmark of preparing a corpus's token cache (data.py prepare), on a corpus it writes:

    python bench_data.py configs.yaml [MB] [--formats txt,jsonl.gz,parquet]

MB megabytes of real text (default 200): the default corpus's plays, then the Python sources
and docs of the installed packages, as DATA_FILES files per format. Each format is prepared
three ways: one worker and one worker per core, each worker's tokenizer on one thread
(RAYON_NUM_THREADS=1); then one process whose tokenizer uses every core. Each row gives MB/s of
text, tokens/s and the peak RSS of the largest process. Beside them it prints the fast encoder
(tiktoken) and Hugging Face tokenizers' encode_batch_fast on the same documents in memory, and a
re-prepare after adding a DATA_ADDED_MB file. Numbers are printed, not asserted: compare ratios
taken in one run.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from bpe import BPETokenizer, hf_encode_batch, load_tokenizer
from plays import DEFAULT_CORPUS, build_default_corpus
from pool import cpu_cores
from shards import text_pieces
from utils import ArgumentParser, Config, load_config, require, require_within, run_cli

DATA_FILES = 16              # files per format, as datasets ship shards
DATA_ADDED_MB = 10           # the file added to time an incremental prepare
DATA_FORMATS = ("txt", "jsonl.gz", "parquet")


def real_documents(size_mb: float, plays: str) -> tuple[list[str], int]:
    """About `size_mb` MB of real, varied text: the plays, then the Python sources and docs of
    the installed packages, a file a document, in path order (never repeated paragraphs, which
    Hugging Face tokenizers' word cache would make unrealistically fast); -> (documents, how
    many files they came from)."""
    documents, size, files = [plays], len(plays.encode()), 1
    for root, directories, names in os.walk(sysconfig.get_paths()["purelib"]):
        directories.sort()
        for name in sorted(names):
            if size >= size_mb * 1e6:
                return documents, files
            if name.endswith((".py", ".md", ".rst", ".txt")):
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    with open(os.path.join(root, name), encoding="utf-8") as f:
                        text = f.read()
                    if text.strip():
                        documents.append(text)
                        size, files = size + len(text.encode()), files + 1
    return documents, files


def write_data_corpus(directory: str, documents: list[str],
                      formats: list[str]) -> dict[str, str]:
    """`documents` in `formats` of DATA_FORMATS, DATA_FILES files each: .txt (a file is one
    document), .jsonl.gz and .parquet (a line or row per document); -> format: its folder."""
    folders = {kind: os.path.join(directory, kind.replace(".", "_")) for kind in formats}
    for folder in folders.values():
        os.makedirs(folder)
    for index in range(DATA_FILES):
        part = documents[index::DATA_FILES]
        paths = {kind: os.path.join(folder, f"{index:03d}.{kind}")
                 for kind, folder in folders.items()}  # a format's name is its suffix
        if "txt" in paths:
            with open(paths["txt"], "w", encoding="utf-8") as f:
                f.writelines(part)
        if "jsonl.gz" in paths:
            with gzip.open(paths["jsonl.gz"], "wt", compresslevel=1, encoding="utf-8") as f:
                f.writelines(json.dumps({"text": document}) + "\n" for document in part)
        if "parquet" in paths:
            pq.write_table(pa.table({"text": part}), paths["parquet"], row_group_size=1000)
    return folders


def process_tree_peak_rss_mb(root: int) -> float:
    """The largest peak RSS (VmHWM) among process `root` and its descendants alive now."""
    parents = {}
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{entry}/stat") as f:  # "pid (name) state ppid ..."
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    tree, peak_kb = {root}, 0
    for pid in sorted(parents):  # a child's pid is almost always above its parent's
        if parents[pid] in tree:
            tree.add(pid)
    for pid in tree:
        with contextlib.suppress(OSError, StopIteration):
            with open(f"/proc/{pid}/status") as f:
                line = next(line for line in f if line.startswith("VmHWM:"))
                peak_kb = max(peak_kb, int(line.split()[1]))
    return peak_kb / 1024


def time_prepare(config_path: str, corpus: str, cache: str, workers: int, threads: int) -> dict:
    """`data.py prepare` in a process of its own, each worker's tokenizer on `threads` threads:
    its seconds (as it prints them), its tokens, and the peak RSS of its largest process."""
    command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                            "data.py"), "prepare", config_path,
               f"data.raw_text_path={corpus}", f"data.cache_dir={cache}", f"--workers={workers}"]
    peak_rss_mb = 0.0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err,
                                   env={**os.environ, "RAYON_NUM_THREADS": str(threads)})
        while process.poll() is None:
            peak_rss_mb = max(peak_rss_mb, process_tree_peak_rss_mb(process.pid))
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    require(process.returncode == 0, f"data.py prepare failed: {stderr.strip()[-500:]}")
    ready = re.search(r"([\d,]+) tokens ready for training \(([\d.]+) s\)", stdout)
    require(ready is not None, f"data.py prepare printed no result: {stdout.strip()[-500:]}")
    return {"workers": workers, "threads": threads, "seconds": float(ready.group(2)),
            "tokens": int(ready.group(1).replace(",", "")), "peak_rss_mb": peak_rss_mb}


def encode_rates(tokenizer: BPETokenizer, texts: list[str]) -> dict[str, tuple[float, float]]:
    """(MB/s, tokens/s) of the fast encoder (tiktoken) and of Hugging Face tokenizers'
    encode_batch_fast on `texts` held in memory, each on the tokenizer's threads (Hugging
    Face's: RAYON_NUM_THREADS); a long text is cut into pieces as prepare cuts it, so that no
    thread is left with one large file."""
    texts = [piece for text in texts for piece in text_pieces(text)]
    require(tokenizer.fast is not None, f"the tokenizer takes no fast path: "
            f"{tokenizer.why_not_fast}")
    text_mb, rates = sum(len(text.encode()) for text in texts) / 1e6, {}
    for name, encode in (("tiktoken", tokenizer.encode_batch),
                         ("HF encode_batch_fast",
                          lambda batch: hf_encode_batch(tokenizer.hf, batch))):
        start, tokens = time.perf_counter(), 0
        for first in range(0, len(texts), 1000):
            tokens += sum(len(ids) for ids in encode(texts[first:first + 1000]))
        seconds = time.perf_counter() - start
        rates[name] = (text_mb / seconds, tokens / seconds)
    return rates


def bench_data(config_path: str, config: Config, size_mb: float, formats: list[str]) -> None:
    """Prepare a generated corpus with one worker and with one per core, print MB/s of
    text, tokens/s and the largest process's peak RSS; then time an incremental prepare."""
    cores = cpu_cores()
    default_corpus = os.path.join(os.path.dirname(os.path.abspath(__file__)), DEFAULT_CORPUS)
    if not os.path.exists(default_corpus):  # built on first use, as a default run builds it
        build_default_corpus(default_corpus)
    with open(default_corpus, encoding="utf-8") as f:
        documents, sources = real_documents(size_mb, f.read())
    text_mb = sum(len(document.encode()) for document in documents) / 1e6
    # first: the kernel writing the corpus's files back to disk would take CPU from it
    rates = encode_rates(load_tokenizer(config.data.tokenizer_path, threads=cores), documents)
    with tempfile.TemporaryDirectory(prefix="slm-bench-data-") as scratch:
        folders = write_data_corpus(scratch, documents, formats)
        os.sync()
        added = "".join(documents[:max(1, len(documents) * DATA_ADDED_MB // int(text_mb))])
        del documents
        print(f"\n{text_mb:,.0f} MB of text ({sources:,} files: the plays and installed "
              f"packages' sources and docs), {DATA_FILES} files per format")
        print(f"in memory, {cores} threads: " + "; ".join(
            f"{name} {mb_per_sec:.2f} MB/s, {tokens_per_sec:,.0f} tokens/s"
            for name, (mb_per_sec, tokens_per_sec) in rates.items())
            + f"; tiktoken / HF {rates['tiktoken'][0] / rates['HF encode_batch_fast'][0]:.2f}x")
        encode_mb_per_sec = rates["HF encode_batch_fast"][0]
        print(f"{'prepare':<12}{'workers':>8}{'threads':>8}{'seconds':>9}{'MB/s':>7}"
              f"{'tokens/s':>11}{'peak RSS MB':>12}")
        for kind in formats:
            rows = [time_prepare(config_path, folders[kind], os.path.join(scratch, f"{kind}{run}"),
                                 workers, threads)
                    for run, (workers, threads) in enumerate([(1, 1), (cores, 1), (1, cores)])]
            for row in rows:
                print(f"{kind:<12}{row['workers']:>8}{row['threads']:>8}{row['seconds']:>9.1f}"
                      f"{text_mb / row['seconds']:>7.2f}{row['tokens'] / row['seconds']:>11,.0f}"
                      f"{row['peak_rss_mb']:>12,.0f}")
            print(f"  {cores} workers / 1 worker, one thread each: "
                  f"{rows[0]['seconds'] / rows[1]['seconds']:.2f}x; {cores} workers / "
                  f"HF in memory: {text_mb / rows[1]['seconds'] / encode_mb_per_sec:.2f}x")
            if kind == "txt":
                with open(os.path.join(folders["txt"], "added.txt"), "w", encoding="utf-8") as f:
                    f.write(added)
                again = time_prepare(config_path, folders[kind], os.path.join(scratch, "txt1"),
                                     cores, 1)
                print(f"  a {DATA_ADDED_MB} MB file added, re-prepared by {cores} workers: "
                      f"{again['seconds']:.1f} s = {again['seconds'] / rows[1]['seconds']:.1%} "
                      "of the full prepare")


def main() -> None:
    parser = ArgumentParser(description="Time data.py prepare on a generated corpus.")
    parser.add_argument("config", help="YAML config, e.g. configs.yaml (its tokenizer)")
    parser.add_argument("megabytes", type=float, nargs="?", default=200, metavar="MB",
                        help="megabytes of text in each format (default 200)")
    parser.add_argument("--formats", default=",".join(DATA_FORMATS),
                        help=f"which of {','.join(DATA_FORMATS)} to time")
    args = parser.parse_args()
    require_within("MB", args.megabytes, 1, 1e6)
    formats = args.formats.split(",")
    require(set(formats) <= set(DATA_FORMATS), f"--formats {args.formats} names a format this "
            f"benchmark does not write — choose among {','.join(DATA_FORMATS)}")
    bench_data(args.config, load_config(args.config), args.megabytes, formats)


if __name__ == "__main__":
    run_cli(main)
