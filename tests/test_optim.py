"""optim.py: which parameters each optimizer takes, the fp16 step, and the LR schedule."""
import math

import pytest
import torch

from conftest import make_model
from model import Transformer
from optim import (Muon, configure_optimizers, forward_backward, lr_at, optimizer_step,
                   training_bytes_per_rank)
from utils import TrainingConfig, config_from_dict


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    t = TrainingConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, 0.0, t) == pytest.approx(0.1)
    assert lr_at(9, 0.0, t) == pytest.approx(1.0)
    assert lr_at(10, 0.0, t) == pytest.approx(1.0)
    assert lr_at(60, 0.5, t) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, 1.0, t) == pytest.approx(0.1)
    assert lr_at(120, 1.3, t) == pytest.approx(0.1)  # past the end it stays at min_lr
    decay = [lr_at(10 + i, i / 100, t) for i in range(101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_warmdown_follows_the_cosine_then_falls_linearly_to_min_lr():
    cosine = TrainingConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    warmdown = TrainingConfig(lr=1.0, min_lr=0.1, warmup_steps=10, warmdown_frac=0.4)
    for progress in (0.0, 0.3, 0.6):  # before the warm-down the two schedules agree
        assert lr_at(50, progress, warmdown) == pytest.approx(lr_at(50, progress, cosine))
    at_start = lr_at(50, 0.6, cosine)
    assert lr_at(50, 0.8, warmdown) == pytest.approx((at_start + 0.1) / 2)  # halfway down the line
    assert lr_at(50, 1.0, warmdown) == pytest.approx(0.1)
    assert lr_at(50, 1.5, warmdown) == pytest.approx(0.1)
    linear = TrainingConfig(lr=1.0, min_lr=0.1, warmup_steps=10, warmdown_frac=1.0)
    assert lr_at(50, 0.25, linear) == pytest.approx(0.775)  # all of the decay is the line


def test_muon_takes_exactly_the_block_matrices_and_adamw_the_rest():
    model = make_model(num_kv_heads=2)
    adamw, muon = configure_optimizers(model, TrainingConfig(optimizer="muon"), torch.device("cpu"),
                                       "fp32")
    names = {id(param): name for name, param in model.named_parameters()}
    muon_names = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert muon_names == {
        f"layers.{i}.{part}.{proj}.weight"
        for i in range(3)
        for part, proj in [("self_attn", p) for p in projections[:4]]
        + [("mlp", p) for p in projections[4:]]
    }
    decayed, plain = adamw.param_groups
    assert {names[id(p)] for p in decayed["params"]} == {"embed_tokens.weight"}  # tied head
    assert all(p.dim() == 1 for p in plain["params"]) and decayed["weight_decay"] == 0.1
    assert muon.param_groups[0]["weight_decay"] == 0.1
    assert muon.param_groups[0]["newton_schulz_dtype"] == "fp32"
    adamw_only = TrainingConfig(optimizer="adamw")
    assert len(configure_optimizers(model, adamw_only, torch.device("cpu"), "fp32")) == 1


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_memory_check_counts_what_training_holds_after_a_step(optimizer):
    config = config_from_dict({}, overrides=[
        "model.vocab_size=97", "model.embed_dim=64", "model.num_heads=4", "model.num_kv_heads=2",
        "model.ff_dim=96", "model.num_layers=2", f"training.optimizer={optimizer}"])
    model = Transformer(config.model).train()
    optimizers = configure_optimizers(model, config.training, torch.device("cpu"), "fp32")
    x = torch.randint(0, 97, (2, 16))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    forward_backward(model, x, x, torch.device("cpu"), "fp32", scaler, 1 / x.numel())
    tensors = [*model.parameters(), *(p.grad for p in model.parameters())]
    optimizer_step(optimizers, scaler, 1e-3, 1.0)
    tensors += [value for optimizer in optimizers for state in optimizer.state.values()
                for value in state.values() if isinstance(value, torch.Tensor)]
    held = sum(t.numel() * t.element_size() for t in tensors)
    assert training_bytes_per_rank(config, 1) == pytest.approx(held, rel=0.01)
    sharded = config_from_dict({}, overrides=[f"training.optimizer={optimizer}",
                                              "training.parallelism=fsdp"])
    assert training_bytes_per_rank(sharded, 4) == pytest.approx(
        training_bytes_per_rank(config_from_dict({}, overrides=[
            f"training.optimizer={optimizer}"]), 1) / 4, abs=4)


def test_an_inf_gradient_under_fp16_skips_the_step_and_halves_the_scale():
    model = make_model().train()
    optimizers = configure_optimizers(model, TrainingConfig(optimizer="adamw"), torch.device("cpu"),
                                      "fp32")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    idx = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(idx, idx)[1]
    scaler.scale(loss).backward()
    model.layers[0].self_attn.q_proj.weight.grad[0, 0] = math.inf
    before = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer_step(optimizers, scaler, lr=1e-2, grad_clip=1.0)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert scaler.get_scale() == 512.0
    assert all(state["step"] == 0 for state in optimizers[0].state.values())  # Adam saw no step
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(idx, idx)[1]
    scaler.scale(loss).backward()
    optimizer_step(optimizers, scaler, lr=1e-2, grad_clip=1.0)
    assert not torch.equal(model.embed_tokens.weight, before["embed_tokens.weight"])
    assert scaler.get_scale() == 512.0  # a finite step keeps the scale (growth comes later)


def test_the_schedules_floor_is_a_share_of_the_peak_unless_min_lr_is_set():
    ratio = TrainingConfig(lr=2.0, min_lr_ratio=0.25, warmup_steps=0)
    assert lr_at(100, 1.0, ratio) == pytest.approx(0.5)
    absolute = TrainingConfig(lr=2.0, min_lr=0.1, min_lr_ratio=0.25, warmup_steps=0)
    assert lr_at(100, 1.0, absolute) == pytest.approx(0.1)
    fine_tune = TrainingConfig(lr=1e-4)  # one override is enough: the floor follows the peak
    assert lr_at(10_000, 1.0, fine_tune) == pytest.approx(1e-4 * fine_tune.min_lr_ratio)


def muon_steps(make_optimizer, steps: int = 4) -> tuple[list[torch.Tensor], dict]:
    """Matrices of three shapes (tall, wide, square) after `steps` Muon steps on fixed
    gradients from the optimizer `make_optimizer(params)` makes; and its state_dict."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=generator))
              for shape in ((48, 16), (16, 40), (24, 24))]
    optimizer = make_optimizer(params)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()
    return [param.detach().clone() for param in params], optimizer.state_dict()


def test_muon_in_bf16_is_torchs_muon_bit_for_bit_and_fp32_is_close():
    torch_muon, _ = muon_steps(lambda params: torch.optim.Muon(
        params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"))
    bf16, _ = muon_steps(lambda params: Muon(params, lr=0.02, weight_decay=0.1,
                                             newton_schulz_dtype="bf16"))
    fp32, _ = muon_steps(lambda params: Muon(params, lr=0.02, weight_decay=0.1,
                                             newton_schulz_dtype="fp32"))
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(bf16, torch_muon))
    assert not any(torch.equal(ours, theirs) for ours, theirs in zip(fp32, torch_muon))
    for ours, theirs in zip(fp32, torch_muon):  # bf16's rounding is the only difference
        assert torch.allclose(ours, theirs, rtol=0, atol=5e-3)


def test_muons_dtype_is_in_its_state_and_a_torch_muon_state_resumes_in_bf16():
    _, state = muon_steps(lambda params: Muon(params, lr=0.02, weight_decay=0.1,
                                              newton_schulz_dtype="fp32"), steps=1)
    restored = Muon([torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(3)], lr=0.02,
                    weight_decay=0.1, newton_schulz_dtype="bf16")
    restored.load_state_dict(state)
    assert restored.param_groups[0]["newton_schulz_dtype"] == "fp32"
    _, torch_state = muon_steps(lambda params: torch.optim.Muon(
        params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"), steps=1)
    restored.load_state_dict(torch_state)  # a snapshot written before Muon lived here
    assert restored.param_groups[0]["newton_schulz_dtype"] == "bf16"
