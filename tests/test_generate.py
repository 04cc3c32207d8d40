"""generate.py: the window rule, KV cache against recomputation, the fused decode form, sampling."""

import gc
import weakref

import pytest
import torch
from torch._dynamo.utils import counters

import generate as generate_module
from conftest import make_decisive_model, make_model
from generate import Sampling, cache_positions, generate, sample_next, sample_rows

CONTEXT = 16  # shorter than the test models' max_seq_len=48: the training context rules, not RoPE


def tokens(model, prompt, count, **options) -> torch.Tensor:
    return torch.stack(
        list(generate(model, prompt, count, CONTEXT, temperature=0.0, **options)), dim=1
    )


def greedy_by_the_rule(model, prompt: torch.Tensor, count: int) -> torch.Tensor:
    """The window rule written out: see the newest CONTEXT tokens; when a new token makes the
    window longer than that, keep its newest half."""
    window, out = prompt[:, -CONTEXT:], []
    for _ in range(count):
        out.append(model(window)[0][:, -1].argmax(-1))
        window = torch.cat((window, out[-1][:, None]), dim=1)
        if window.shape[1] > CONTEXT:
            window = window[:, -(CONTEXT // 2) :]
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("prompt_len", [5, CONTEXT, 3 * CONTEXT])  # shorter, equal, longer
@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_cache_and_no_cache_follow_the_window_rule_far_past_the_context(prompt_len, num_kv_heads):
    model = make_decisive_model(num_kv_heads=num_kv_heads)
    prompt = torch.randint(0, 97, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    expected = greedy_by_the_rule(model, prompt, 5 * CONTEXT)
    assert torch.equal(tokens(model, prompt, 5 * CONTEXT, use_cache=True), expected)
    assert torch.equal(tokens(model, prompt, 5 * CONTEXT, use_cache=False), expected)


def test_the_cache_holds_only_the_positions_a_generation_reaches(monkeypatch):
    """A short reply from a long window gets a small cache, rounded up to a power of two, and
    the same greedy tokens as recomputing the window; a long one gets the whole window."""
    assert [cache_positions(prompt, new, 8192) for prompt, new in (
        (5, 10), (40, 30), (2048, 64), (100, 9000), (9000, 4))] == [64, 128, 4096, 8192, 8192]
    assert cache_positions(5, 10, 32) == 32
    model = make_decisive_model(max_seq_len=256)
    lengths = []
    new_caches = model.new_caches
    monkeypatch.setattr(model, "new_caches", lambda batch, length: lengths.append(length) or
                        new_caches(batch, length))
    prompt = torch.randint(0, 97, (1, 70), generator=torch.Generator().manual_seed(2))
    cached = list(generate(model, prompt, 20, 256, temperature=0.0))
    recomputed = list(generate(model, prompt, 20, 256, temperature=0.0, use_cache=False))
    assert lengths == [128] and cached == recomputed


def test_generation_stops_on_eos_and_finished_rows_repeat_it():
    model = make_model()
    prompt = torch.randint(0, 97, (1, 40))
    first = int(tokens(model, prompt, 1)[0, 0])
    assert len(list(generate(model, prompt, 30, CONTEXT, temperature=0.0, eos_id=first))) == 1
    two_rows = torch.cat((prompt, torch.randint(0, 97, (1, 40))))
    out = torch.stack(list(generate(model, two_rows, 30, CONTEXT, temperature=0.0, eos_id=first)))
    assert out.shape[1] == 2 and (out[:, 0] == first).all()


@pytest.mark.parametrize("batch_size", [1, 2])
def test_compiled_generation_matches_eager_and_compiles_the_decode_step_once(batch_size,
                                                                            monkeypatch):
    # a head above inductor's bound of 2,048 rows, and above 8,192
    model = make_decisive_model(num_kv_heads=2, vocab_size=16384)
    prompt = torch.randint(0, 16384, (batch_size, 7))
    eager = tokens(model, prompt, 100)  # 107 > CONTEXT: several refills too
    compiles = []
    traced_and_compiled = generate_module.traced_and_compiled
    monkeypatch.setattr(generate_module, "traced_and_compiled",
                        lambda *args: compiles.append(args) or traced_and_compiled(*args))
    counters["inductor"].clear()
    assert torch.equal(tokens(model, prompt, 100, compile=True), eager)
    # one row: every product a reduction of its own, the head's too (ONE_ROW_REDUCTION_MAX_DIM)
    products = 7 * model.config.num_layers + 1
    assert counters["inductor"]["decompose_mm"] == (products if batch_size == 1 else 0)
    assert torch.equal(tokens(model, prompt, 100, compile=True), eager)  # the same graph again
    assert torch.equal(tokens(model, prompt, 20, top_k=5, compile=True), eager[:, :20])
    assert len(compiles) == 1  # greedy ignores top_k: the same graph
    model_alive = weakref.ref(model)
    del model, compiles[:]
    gc.collect()
    assert model_alive() is None  # the kept graphs do not hold the model


def test_compiled_sampling_with_eos_draws_what_eager_draws():
    model = make_model(vocab_size=97, num_kv_heads=2)
    prompt = torch.randint(0, 97, (2, 5))

    def sampled(compile: bool, eos_id: int | None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(3)
        return torch.stack(list(generate(model, prompt, 40, CONTEXT, temperature=0.9, top_k=20,
                                         top_p=0.9, eos_id=eos_id, generator=generator,
                                         compile=compile)), dim=1)

    eager = sampled(False, None)
    assert torch.equal(sampled(True, None), eager)
    eos_id = int(eager[0, 10])  # row 0 ends by its 11th token; finished rows repeat it
    with_eos = sampled(False, eos_id)
    assert with_eos.shape[1] < 40 or (with_eos[0, 10:] == eos_id).all()
    assert torch.equal(sampled(True, eos_id), with_eos)


def test_a_decode_step_too_deep_for_memory_planning_compiles_without_it(monkeypatch):
    from torch._inductor.codegen import memory_planning

    plans = []

    def too_deep(planner, lines):
        plans.append(lines)
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(memory_planning.MemoryPlanner, "plan", too_deep)
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # plan, not a cache hit
    model = make_decisive_model(num_kv_heads=2)
    prompt = torch.randint(0, 97, (1, 5))
    assert torch.equal(tokens(model, prompt, 8, compile=True), tokens(model, prompt, 8))
    assert len(plans) == 1


def test_compiled_generation_without_cache_and_under_autocast():
    model = make_decisive_model(num_kv_heads=2)
    prompt = torch.randint(0, 97, (2, 7))
    uncached = tokens(model, prompt, 20, use_cache=False, compile=True)
    assert torch.equal(uncached, tokens(model, prompt, 20))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what infer.py does on a GPU
        assert tokens(model, prompt[:1], 3, compile=True).shape == (1, 3)


def test_sampling_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    generator = torch.Generator().manual_seed(0)

    def drawn(temperature: float, top_k: int, top_p: float, draws: int) -> set[int]:
        return {sample_next(logits, temperature, top_k, top_p, torch.rand(
            1, generator=generator, dtype=torch.float64)).item() for _ in range(draws)}

    assert drawn(0.0, 0, 1.0, 1) == {0}
    top1, nucleus = drawn(1.0, 1, 1.0, 50), drawn(1.0, 0, 0.5, 50)
    top2, full = drawn(5.0, 2, 1.0, 200), drawn(5.0, 0, 1.0, 200)
    assert top1 == {0} and nucleus == {0} and top2 == {0, 1} and full == {0, 1, 2, 3}


def test_sampling_draws_each_token_as_often_as_its_probability():
    """Every row its own draw: 4 rows x 5,000 draws of (0.5, 0.3, 0.2, 0) land within 2 % of
    those shares, and the impossible token never."""
    logits = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).log().expand(4, 4)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, 0, 1.0, torch.rand(
        4, generator=generator, dtype=torch.float64)) for _ in range(5000)])
    shares = torch.stack([(draws == token).double().mean(dim=0) for token in range(4)], dim=1)
    assert torch.allclose(shares, torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
                          .expand(4, 4), atol=0.02)
    assert not (draws == 3).any()


def test_each_row_of_a_batch_samples_what_it_would_alone():
    """sample_rows, the engine's sampling, draws each row's token as sample_next draws it for
    that row alone with the same uniform: greedy, top-k, top-p and both, mixed in one batch."""
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    temperature = torch.tensor([0.8, 1.0, 0.5, 0.0, 1.3, 0.9])
    top_k = torch.tensor([0, 5, 40, 0, 0, 3])
    top_p = torch.tensor([1.0, 1.0, 0.9, 1.0, 0.5, 0.7])
    for _ in range(100):
        uniform = torch.rand(6, dtype=torch.float64)
        alone = [sample_next(logits[row:row + 1], float(temperature[row]), int(top_k[row]),
                             float(top_p[row]), uniform[row:row + 1]).item() for row in range(6)]
        assert sample_rows(logits, temperature, top_k, top_p, uniform).tolist() == alone


@pytest.mark.parametrize("settings, setting", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 2.5}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"top_k": True}, "top_k"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"top_p": None}, "top_p"),
])
def test_sampling_settings_are_checked_one_way_for_every_caller(settings, setting):
    param, problem = Sampling(**settings).problem()
    assert param == setting and " — " in problem
    assert Sampling(0.0, 0, 1.0).problem() == Sampling(2, 40, 0.5).problem() == ("", "")
