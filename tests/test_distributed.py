"""distributed.py: what the loop's collectives and waits give each rank."""
import copy
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from distributed import checkpoint_activations
from model import Transformer
from optim import configure_optimizers, training_bytes_per_rank
from utils import ModelConfig, TrainingConfig, config_from_dict


RANK_0S = """
import sys, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import distributed
dist.init_process_group("gloo")
choice = distributed.broadcast_rank_0s(lambda: "bf16" if dist.get_rank() == 0 else "fp32")
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


def saved_bytes(model: Transformer, x: torch.Tensor, y: torch.Tensor,
                block_inputs_kept: bool) -> tuple[int, dict]:
    """The bytes kept for backward in one training forward: what autograd's saved-tensor hooks
    see, plus, under checkpointing, the block inputs it holds (outside those hooks); and the
    gradients of its backward."""
    saved = []
    hooks = [layer.register_forward_pre_hook(lambda _, args: saved.append(
        args[0].numel() * args[0].element_size())) for layer in model.layers
             if block_inputs_kept]
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        torch.manual_seed(5)  # the dropout masks
        _, loss = model(x, y)
    for hook in hooks:
        hook.remove()
    loss.backward()
    return sum(saved), {name: p.grad for name, p in model.named_parameters()}


def test_activation_checkpointing_gives_equal_gradients_with_dropout_and_saves_less():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, embed_dim=64, num_heads=4, num_kv_heads=2, ff_dim=128,
                         num_layers=3, max_seq_len=32, dropout=0.1)
    plain = Transformer(config).train()
    checkpointed = copy.deepcopy(plain)
    checkpoint_activations(checkpointed)
    x, y = torch.randint(0, 97, (4, 32)), torch.randint(0, 97, (4, 32))
    plain_bytes, plain_grads = saved_bytes(plain, x, y, False)
    checkpointed_bytes, checkpointed_grads = saved_bytes(checkpointed, x, y, True)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    for name, grad in plain_grads.items():
        assert torch.equal(grad, checkpointed_grads[name]), name
    assert checkpointed_bytes < 0.5 * plain_bytes
    with torch.no_grad():  # evaluation keeps nothing and computes the same
        assert torch.equal(plain.eval()(x)[0], checkpointed.eval()(x)[0])


TINY = dict(vocab_size=97, embed_dim=64, num_heads=4, num_kv_heads=2, ff_dim=96, num_layers=2,
            max_seq_len=16)
SHARDED_START = f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import optim
from distributed import full_weights_across_ranks, shard_model_across_ranks
from model import Transformer, meta_model
from torch.distributed.tensor import distribute_tensor
from utils import ModelConfig, TrainingConfig
dist.init_process_group("gloo")
rank = dist.get_rank()
config = ModelConfig(**{TINY})
torch.manual_seed(0)
model = Transformer(config) if rank == 0 else meta_model(config)
sharded = shard_model_across_ranks(model, torch.device("cpu"), "fp32", TrainingConfig())
"""  # a 2-rank script's start: the tiny model sharded from rank 0's seeded weights

SHARDED = SHARDED_START + """
weights = full_weights_across_ranks(sharded)
x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(rank))
sharded(x)[0].sum().backward()  # each rank its own batch: the gradients are their mean
grads = {name: p.grad.full_tensor() for name, p in sharded.named_parameters()}
local = [*sharded.parameters(), *(p.grad for p in sharded.parameters())]
adamw = torch.optim.AdamW(sharded.parameters())
adamw.step()
local += [value for state in adamw.state.values() for value in state.values()]
held = sum(t.to_local().numel() * t.element_size() for t in local if t.dim())  # not steps
if rank == 0:
    torch.save({"weights": weights, "grads": grads, "held": held}, sys.argv[2])
dist.destroy_process_group()
"""


def test_fsdp_starts_from_rank_0s_weights_and_averages_the_ranks_gradients(tmp_path):
    """Every rank's shards hold one process's seeded weights, and a backward on two ranks gives
    the mean of the two batches' gradients: gloo has been seen to sum where FSDP asks it to
    average (pytorch#162338). Rank 0 holds the half of the training state the memory check
    counts (its shards may be a row longer than rank 1's)."""
    script, out = tmp_path / "sharded.py", tmp_path / "sharded.pt"
    script.write_text(SHARDED)
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([sys.executable, *launch, str(script), str(REPO), str(out)],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    sharded = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY))
    for name, weight in model.state_dict().items():
        assert torch.equal(sharded["weights"][name], weight), name
    for rank in (0, 1):
        x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(rank))
        (model(x)[0].sum() / 2).backward()
    for name, param in model.named_parameters():
        assert torch.allclose(sharded["grads"][name], param.grad, rtol=1e-5, atol=1e-6), name
    config = config_from_dict({"model": TINY}, overrides=[
        "data.context_length=16", "training.optimizer=adamw", "training.parallelism=fsdp"])
    assert sharded["held"] == pytest.approx(training_bytes_per_rank(config, 2), rel=0.02)


SPREAD_MUON = SHARDED_START + """
grads = torch.load(sys.argv[2], weights_only=True)
for name, param in sharded.named_parameters():
    param.grad = distribute_tensor(grads[name], param.device_mesh, param.placements)
calls = []
orthogonalize = optim.orthogonalize
optim.orthogonalize = lambda matrix, *args: calls.append(tuple(matrix.shape)) or orthogonalize(
    matrix, *args)
_, muon = optim.configure_optimizers(sharded, TrainingConfig(optimizer="muon"),
                                     torch.device("cpu"), "fp32")
for _ in range(2):  # the second step uses the momentum the first left in each rank's shards
    muon.step()
weights = full_weights_across_ranks(sharded)
every_ranks_calls = [None, None]
dist.all_gather_object(every_ranks_calls, calls)
if rank == 0:
    torch.save({"weights": weights, "calls": every_ranks_calls}, sys.argv[3])
dist.destroy_process_group()
"""


def test_fsdp_muon_spreads_the_orthogonalisation_over_the_ranks_and_updates_as_one_process(
        tmp_path):
    """Each rank orthogonalises half of the matrices, and the weights after two Muon steps are
    one process's, bit for bit: the same whole matrices meet the same Newton-Schulz."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY))
    grads = {name: torch.randn_like(param) for name, param in model.named_parameters()}
    script, grads_file, out = tmp_path / "spread.py", tmp_path / "grads.pt", tmp_path / "out.pt"
    script.write_text(SPREAD_MUON)
    torch.save(grads, grads_file)
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([sys.executable, *launch, str(script), str(REPO), str(grads_file),
                             str(out)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    sharded = torch.load(out, weights_only=True)
    _, muon = configure_optimizers(model, TrainingConfig(optimizer="muon"), torch.device("cpu"),
                                   "fp32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank under torchrun: matmuls split work by thread
    try:
        for _ in range(2):
            for name, param in model.named_parameters():
                param.grad = grads[name].clone()
            muon.step()
    finally:
        torch.set_num_threads(threads)
    for name, weight in model.state_dict().items():
        assert torch.equal(sharded["weights"][name], weight), name
    matrices = sum(len(group["params"]) for group in muon.param_groups)
    assert [len(calls) for calls in sharded["calls"]] == [matrices, matrices]  # 2 steps, half each
