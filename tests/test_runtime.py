"""runtime.py: the device helpers a training run relies on."""
import dataclasses
import os
import subprocess
import sys
import time

import pytest
import torch

import runtime
from conftest import REPO
from runtime import (autocast_context, choose_cpu_precision, decide_cpu_precision,
                     decide_newton_schulz_dtype, decisions_path, pick_device, setup_precision,
                     with_others_share)
from utils import Config, UserError


def test_auto_is_fp32_on_a_cpu_and_explicit_choices_are_kept():
    cpu = torch.device("cpu")
    assert pick_device("cpu") == cpu
    assert setup_precision("auto", cpu) == "fp32" and setup_precision("bf16", cpu) == "bf16"
    with autocast_context(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_context(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_a_missing_device_is_one_clear_error():
    with pytest.raises(UserError, match="training.device is 'cuda' but none is visible"):
        pick_device("cuda")


FAULTS_PER_STEP = """
import resource, torch
from runtime import keep_freed_memory
keep_freed_memory()
faults = []
for _ in range(5):  # a step's activations: 4 x 16 MiB, all freed at its end
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = [torch.ones(1 << 22) for _ in range(4)]
    del activations
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc settings")
def test_cpu_training_steps_reuse_freed_activation_memory():
    # Without keep_freed_memory glibc unmaps the blocks and every step faults all 16,384 pages
    # back in; with it the later steps reuse the heap.
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_STEP],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    assert int(result.stdout) < 1000


PEAKS = {"fp32": 100e9, "bf16": 400e9}


def steps(fp32_ms: list[float], bf16_ms: list[float], others_share: float = 0.0):
    """What choose_cpu_precision's timing would return: step seconds, others' CPU share."""
    return lambda: ({"fp32": [ms / 1000 for ms in fp32_ms],
                     "bf16": [ms / 1000 for ms in bf16_ms]}, others_share)


def test_auto_on_a_cpu_is_fp32_without_timing_when_bf16_matmuls_are_not_much_faster():
    def never():
        raise AssertionError("timed a step although the peak gate failed")

    choice, reason, trusted = choose_cpu_precision({"fp32": 100e9, "bf16": 140e9}.get, never)
    assert choice == "fp32" and trusted
    assert reason == "matmul peak bf16 140 / fp32 100 GFLOP/s = 1.40x, below 1.5x: bf16 not timed"


@pytest.mark.parametrize(
    "bf16_ms, choice", [(500, "bf16"), (769, "bf16"), (780, "fp32"), (1200, "fp32")]
)
def test_auto_on_a_cpu_takes_bf16_only_when_its_median_step_is_at_least_1_3x_faster(
    bf16_ms, choice
):
    # One slow fp32 outlier and one slow bf16 outlier: the medians ignore both.
    timed = steps([1000, 990, 5000, 1010, 1000], [bf16_ms, 4 * bf16_ms, bf16_ms, bf16_ms, bf16_ms])
    chosen, reason, trusted = choose_cpu_precision(PEAKS.get, timed)
    assert chosen == choice and trusted
    assert reason.startswith("this model's median training step: fp32 1,000 ms, "
                             f"bf16 {bf16_ms:,} ms = {1000 / bf16_ms:.2f}x, bf16 needs 1.3x")


def test_a_timing_taken_while_other_processes_held_the_cpus_is_fp32_and_not_trusted():
    chosen, reason, trusted = choose_cpu_precision(PEAKS.get, steps([1000], [400], 0.38))
    assert (chosen, trusted) == ("fp32", False)
    assert reason.startswith("other processes took 38% of the CPUs while fp32 and bf16 were timed")


def test_others_share_counts_a_busy_neighbour_and_not_the_measurement_itself():
    spin = "import time\nend = time.time() + 3\nwhile time.time() < end: pass"
    neighbours = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count())]
    try:
        time.sleep(0.5)
        _, busy = with_others_share(lambda: time.sleep(1.0))
    finally:
        for neighbour in neighbours:
            neighbour.wait()
    work = torch.randn(512, 512)
    _, quiet = with_others_share(lambda: [work @ work for _ in range(400)])
    assert busy > 0.5 and quiet < busy / 2, (busy, quiet)


def auto_precision(config: Config, fp32_ms: list[float], bf16_ms: list[float],
                   others_share: float = 0.0) -> tuple[str, str, bool]:
    """decide_cpu_precision as a start of `config` would call it, with these step timings.
    -> (choice, printed line, whether it timed the steps)"""
    def step_seconds():
        timed.append(1)
        return {"fp32": [ms / 1000 for ms in fp32_ms], "bf16": [ms / 1000 for ms in bf16_ms]}

    timed: list[int] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime, "with_others_share", lambda measure: (measure(), others_share))
        choice, line = decide_cpu_precision(config, "bf16", PEAKS.get, step_seconds)
    return choice, line, bool(timed)


def test_noisy_timings_around_the_threshold_give_one_answer_over_repeated_starts():
    # Starts of one command measured 1.28x, 1.03x, 1.15x, 0.95x, 1.04x, then 1.34x, which
    # alone would choose bf16: the first start's choice is every start's, word for word, and
    # only the first one times anything.
    config, fp32_ms = Config(), [1000.0] * 3
    lines, timed = [], []
    for speedup in (1.28, 1.03, 1.15, 0.95, 1.04, 1.34):
        choice, line, measured = auto_precision(config, fp32_ms, [1000 / speedup] * 3)
        lines.append(line)
        timed.append(measured)
    assert choice == "fp32" and lines == [lines[0]] * 6 and timed == [True] + [False] * 5
    assert lines[0].startswith("precision auto: fp32 (this model's median training step: fp32 "
                               "1,000 ms, bf16 781 ms = 1.28x, bf16 needs 1.3x")
    assert lines[0].endswith(f"decided once for this CPU, model and batch, kept in "
                             f"{decisions_path()} — pin it with training.precision=fp32 or bf16")


def test_a_clear_win_still_chooses_bf16_and_is_kept():
    lines = [auto_precision(Config(), [1000.0] * 3, [bf16_ms] * 3)[1] for bf16_ms in (500, 1000)]
    assert lines[0].startswith("precision auto: bf16 (") and lines[1] == lines[0]


def test_muons_dtype_is_measured_once_per_cpu_and_held_back_instructions(monkeypatch):
    """Two runs on one machine orthogonalise alike even if a busy moment lowers the bf16 peak;
    holding oneDNN to AVX2 (as an AVX2-only CPU) is another CPU and is measured anew."""
    cpu = torch.device("cpu")
    fast, slow = {"fp32": 1e11, "bf16": 3e11}.__getitem__, {"fp32": 1e11, "bf16": 1e11}.__getitem__
    assert decide_newton_schulz_dtype(cpu, fast) == "bf16"
    assert decide_newton_schulz_dtype(cpu, slow) == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert decide_newton_schulz_dtype(cpu, slow) == "fp32"
    assert decide_newton_schulz_dtype(torch.device("cuda"), slow) == "bf16"


def test_another_model_or_a_busy_start_is_timed_anew():
    base = Config()
    assert auto_precision(base, [1000], [1000])[0] == "fp32"
    wider = Config(model=dataclasses.replace(base.model, embed_dim=256, ff_dim=704))
    choice, line, measured = auto_precision(wider, [1000], [500], others_share=0.5)
    assert (choice, measured) == ("fp32", True) and "; not kept — pin it" in line
    choice, line, measured = auto_precision(wider, [1000], [500])  # the next, quiet start
    assert (choice, measured) == ("bf16", True) and "kept in" in line
    assert auto_precision(wider, [1000], [1000])[:2] == (choice, line)
    assert auto_precision(base, [1000], [500])[0] == "fp32"  # the first model's stays


def test_an_unreadable_decisions_file_is_warned_of_and_rewritten(capsys):
    os.makedirs(os.path.dirname(decisions_path()))
    with open(decisions_path(), "w") as f:
        f.write("{not json")
    choice, _, measured = auto_precision(Config(), [1000], [500])
    assert (choice, measured) == ("bf16", True)
    assert f"warning: ignoring {decisions_path()}" in capsys.readouterr().err
    choice, _, measured = auto_precision(Config(), [1000], [1000])
    assert (choice, measured) == ("bf16", False)  # the rewritten file's answer


def test_without_a_writable_cache_directory_each_start_measures(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where the directory would go
    choice, line, measured = auto_precision(Config(), [1000], [500])
    assert (choice, measured) == ("bf16", True) and "; not kept — pin it" in line
    assert "warning: cannot keep measured choices in" in capsys.readouterr().err
    assert auto_precision(Config(), [1000], [500])[2]  # measured again
