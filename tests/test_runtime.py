"""runtime.py: the device helpers a training run relies on."""
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from runtime import autocast_context, choose_cpu_precision, pick_device, setup_precision
from utils import UserError


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


def test_auto_on_a_cpu_is_fp32_without_timing_when_bf16_matmuls_are_not_much_faster():
    def never(name):
        raise AssertionError("timed a step although the peak gate failed")

    choice, line = choose_cpu_precision({"fp32": 100e9, "bf16": 140e9}, never)
    assert choice == "fp32"
    assert "bf16 140 / fp32 100 GFLOP/s = 1.40x, below 1.5x: bf16 not timed" in line


@pytest.mark.parametrize(
    "bf16_seconds, choice", [(0.8, "bf16"), (0.86, "bf16"), (0.88, "fp32"), (1.2, "fp32")]
)
def test_auto_on_a_cpu_takes_bf16_only_when_it_trains_at_least_15_percent_faster(
    bf16_seconds, choice
):
    seconds = {"fp32": 1.0, "bf16": bf16_seconds}
    chosen, line = choose_cpu_precision(PEAKS, seconds.__getitem__)
    assert chosen == choice
    assert line.startswith(f"precision auto: {choice} (this model's training step: fp32 1,000 ms")
    assert f"bf16 {1000 * bf16_seconds:,.0f} ms = {1 / bf16_seconds:.2f}x" in line
