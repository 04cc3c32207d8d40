"""quantize.py: --dtype. int8 and bf16 agree with fp32 on a trained model within their bounds,
the fp32 model is left as it was, bf16 is refused where the CPU lacks it, auto is decided once
and kept, and a compiled int8 step gives the eager one's tokens."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import generate as generate_module
import quantize
from checkpoints import load_trained
from conftest import make_decisive_model
from generate import generate
from quantize import (AGREEMENT_BOUND, Int8Linear, products, resolve_dtype, top1_agreement,
                     with_dtype)
from utils import UserError


@pytest.fixture(scope="module")
def trained(trained_run):
    return load_trained(str(trained_run / "ckpt" / "best.pth"))


def held_out_windows(trained, corpus: str, count: int = 24) -> list[list[int]]:
    """Windows of the model's context from the end of its corpus (its validation split)."""
    ids = trained.tokenizer.encode(corpus[-40_000:])
    context = trained.context_length
    return [ids[start:start + context] for start in range(0, count * context, context)]


@pytest.mark.parametrize("dtype", ["int8", "bf16"])
def test_a_lower_precision_agrees_with_fp32_within_its_bound(trained, corpus, dtype):
    windows = held_out_windows(trained, corpus.read_text(encoding="utf-8"))
    lower = with_dtype(trained, dtype)
    assert top1_agreement(trained, lower, windows) >= AGREEMENT_BOUND[dtype]
    # the fp32 model is untouched; int8's head has weights of its own, bf16's stays fp32
    assert all(type(module) is nn.Linear for _, _, module in products(trained.model))
    assert lower.model.layers[0].mlp.up_proj.weight.dtype == getattr(torch, dtype.replace(
        "bf16", "bfloat16"))
    head = lower.model.lm_head
    assert head.weight.dtype == (torch.int8 if dtype == "int8" else torch.float32)
    assert lower.model.embed_tokens.weight is trained.model.embed_tokens.weight


def test_int8_rows_rebuild_the_weight_within_half_a_step():
    weight = torch.randn(48, 64)
    linear = Int8Linear(weight)
    rebuilt = linear.weight.float() * linear.scale.float()[:, None]
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    # half a step of rounding, and the scale's own bf16 rounding (8 bits of mantissa)
    assert ((rebuilt - weight).abs() <= 0.5 * step + weight.abs() * 2**-8).all()
    x = torch.randn(3, 5, 64)
    expected = x @ rebuilt.T  # activations and products in bf16: within a percent of the range
    assert (linear(x) - expected).abs().max() <= 0.01 * expected.abs().max()


def test_bf16_is_refused_in_one_line_where_it_is_not_native(trained, monkeypatch):
    monkeypatch.setattr(quantize, "bf16_is_native", lambda device: False)
    with pytest.raises(UserError, match=r"--dtype bf16 needs native bf16 .* use --dtype int8"):
        resolve_dtype(trained, "bf16", "ckpt.pth")


def test_auto_is_measured_once_and_kept(trained, trained_run, monkeypatch, capsys):
    path = str(trained_run / "ckpt" / "best.pth")
    # a timing while other processes hold the CPUs is not kept; here, as if none did
    monkeypatch.setattr(quantize, "with_others_share", lambda measure: (measure(), 0.0))
    monkeypatch.setattr(quantize, "bf16_is_native", lambda device: False)  # int8 the candidate
    first = resolve_dtype(trained, "auto", path)
    line = capsys.readouterr().err
    assert re.fullmatch(r"dtype auto: (fp32|int8) \(int8 [\d.]+x fp32's decode speed, top-1 "
                        r"agreement [\d.]+% \(needs 1.3x, 98%\)\); decided once for this CPU, "
                        r"checkpoint and eager decoding, kept in .* — pin it with --dtype fp32 or "
                        r"int8\n", line)
    monkeypatch.setattr(quantize, "measure_dtypes", lambda *args: pytest.fail("measured again"))
    again = resolve_dtype(trained, "auto", path)
    assert capsys.readouterr().err == line
    assert type(first.model.lm_head) is type(again.model.lm_head)


def test_auto_decides_compiled_decoding_apart_from_eager(trained, trained_run, tmp_path,
                                                         monkeypatch, capsys):
    """int8 can lead fp32 eagerly and trail it compiled (the compiled fp32 step streams its
    weights faster than BLAS does): each is timed as it will run, and kept apart. The compile
    happens before the timing, whose share of others' load would count its C++ compiler."""
    path = tmp_path / "best.pth"
    path.write_bytes((trained_run / "ckpt" / "best.pth").read_bytes())
    monkeypatch.setattr(quantize, "bf16_is_native", lambda device: False)
    compiles = []
    traced_and_compiled = generate_module.traced_and_compiled
    monkeypatch.setattr(generate_module, "traced_and_compiled",
                        lambda *args: compiles.append(args) or traced_and_compiled(*args))

    def others_share(measure):
        before = len(compiles)
        result = measure()
        assert len(compiles) == before, "a compile inside the timed decode steps"
        return result, 0.0

    monkeypatch.setattr(quantize, "with_others_share", others_share)
    timed = []
    decode_step_seconds = quantize.decode_step_seconds

    def step_seconds(variants: dict, compiled: bool) -> dict[str, float]:
        timed.append(compiled)
        real = decode_step_seconds(variants, compiled)
        assert set(real) == {"fp32", "int8"} and all(seconds > 0 for seconds in real.values())
        return {"fp32": 2.0, "int8": 1.0} if not compiled else {"fp32": 1.0, "int8": 1.25}

    monkeypatch.setattr(quantize, "decode_step_seconds", step_seconds)
    resolve_dtype(trained, "auto", str(path))
    assert "int8 2.00x fp32's decode speed" in capsys.readouterr().err
    compiled = resolve_dtype(trained, "auto", str(path), compiled=True)
    line = capsys.readouterr().err
    assert line.startswith("dtype auto: fp32 (int8 0.80x fp32's decode speed") and (
        "checkpoint and compiled decoding, kept in" in line)
    assert compiled.model is trained.model and timed == [False, True]
    assert len(compiles) == 2  # fp32's step and int8's, each once


def test_a_compiled_int8_step_gives_the_eager_steps_tokens():
    model = make_decisive_model(num_kv_heads=2)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child.weight))
    prompt = torch.randint(0, 97, (1, 7))

    def tokens(compile: bool) -> torch.Tensor:
        return torch.stack(list(generate(model, prompt, 40, 32, temperature=0.0,
                                         compile=compile)))

    torch._dynamo.reset()
    assert torch.equal(tokens(True), tokens(False))


def test_auto_keeps_fp32_and_nothing_when_others_held_the_cpus(trained, trained_run, monkeypatch,
                                                               capsys):
    monkeypatch.setattr(quantize, "with_others_share", lambda measure: (measure(), 0.5))
    chosen = resolve_dtype(trained, "auto", str(trained_run / "ckpt" / "best.pth"))
    assert chosen.model is trained.model  # fp32: the model as loaded
    assert re.fullmatch(r"dtype auto: fp32 \(other processes took 50% of the CPUs .*\); not kept"
                        r" — .*\n", capsys.readouterr().err)
