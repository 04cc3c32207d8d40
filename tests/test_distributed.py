"""distributed.py: what the loop's collectives and waits give each rank."""
import subprocess
import sys

from conftest import REPO


RANK_0S = """
import sys, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import distributed
dist.init_process_group("gloo")
choice = distributed.rank_0s("bf16" if dist.get_rank() == 0 else "")
print(f"rank {dist.get_rank()} runs in", choice)
dist.destroy_process_group()
"""


def test_under_torchrun_every_rank_takes_rank_0s_value(tmp_path):
    script = tmp_path / "rank_0s.py"
    script.write_text(RANK_0S)
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [sys.executable, *launch, str(script), str(REPO)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rank 0 runs in bf16" in result.stdout and "rank 1 runs in bf16" in result.stdout
