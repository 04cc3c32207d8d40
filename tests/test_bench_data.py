"""bench_data.py is smoke-tested here: it runs and reports sane numbers; its figures are not
targets."""
import os
import re

from conftest import run_script, tiny_config, write_config


def test_bench_data_times_prepare_with_one_worker_and_one_per_core(tmp_path, corpus):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, corpus))
    result = run_script("bench_data.py", str(config), "1", "--formats", "txt",
                        cwd=tmp_path, env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^txt +(\d+) +(\d+) +([\d.]+) +([\d.]+) +([\d,]+) +([\d,]+)$",
                      result.stdout, re.MULTILINE)
    cores = str(len(os.sched_getaffinity(0)))
    assert [(workers, threads) for workers, threads, *_ in rows] == [
        ("1", "1"), (cores, "1"), ("1", cores)]
    assert all(float(mb_per_sec) > 0 and int(rss.replace(",", "")) > 50
               for *_, mb_per_sec, _, rss in rows)
    assert re.search(r"in memory, \d+ threads: tiktoken [\d.]+ MB/s, [\d,]+ tokens/s; HF "
                     r"encode_batch_fast [\d.]+ MB/s, [\d,]+ tokens/s; tiktoken / HF [\d.]+x",
                     result.stdout)
    assert re.search(r"a 10 MB file added, re-prepared by \d+ workers: [\d.]+ s", result.stdout)
    assert not list(tmp_path.glob("slm-bench-data-*")), "the generated corpus is removed"
