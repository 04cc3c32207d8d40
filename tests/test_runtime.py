"""runtime.py: the device helpers a training run relies on."""
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from runtime import autocast_context, pick_device, setup_precision
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
