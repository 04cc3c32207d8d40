"""engine.py: rows stepped together give each request's tokens alone (greedy, up to a near tie
of the solo run's logits) and its own seeded samples whatever its partners, with partners
joining and leaving mid-generation; the window rule per row; cancelled requests free their row;
the memory bound limits the rows, never the results."""
import threading

import pytest
import torch
from torch._dynamo.utils import counters

from checkpoints import load_trained
from conftest import make_decisive_model
from engine import Closed, Engine, Request
from generate import generate

NEAR_TIE = 1e-4  # a solo run's top-2 logit margin below this: rounding may pick either


@pytest.fixture(scope="module")
def trained(trained_run):
    return load_trained(str(trained_run / "ckpt" / "best.pth"), device_name="cpu")


def alone(model, context_length: int, request: Request) -> Request:
    engine = Engine(model, context_length)
    solo = Request(request.prompt, request.max_tokens, request.end_id, request.temperature,
                   request.top_k, request.top_p, request.seed)
    engine.submit(solo)
    engine.run_until_idle()
    return solo


def compared_length(model, request: Request) -> int:
    """How many of the solo tokens a batched row must equal: up to the first near tie."""
    with torch.no_grad():
        logits = model(torch.tensor([request.prompt + request.tokens]))[0][0]
    top2 = logits[len(request.prompt) - 1:].topk(2, dim=-1).values
    ties = ((top2[:, 0] - top2[:, 1]) < NEAR_TIE).nonzero()
    return int(ties[0]) if len(ties) else len(request.tokens)


def prompts(trained, texts: list[str]) -> list[list[int]]:
    return [trained.tokenizer.encode(text) for text in texts]


def run_with_partners(engine: Engine, first: list[Request], later: list[Request],
                      steps_between: int) -> None:
    """`first` start together; after `steps_between` steps (some of them finished by then),
    `later` join."""
    for request in first:
        engine.submit(request)
    for _ in range(steps_between):
        engine.step()
    for request in later:
        engine.submit(request)
    engine.run_until_idle()


def test_greedy_rows_equal_each_request_alone_as_partners_join_and_leave():
    # decisive weights: the next token depends on the whole context (a 50-step model repeats one)
    model, window = make_decisive_model(num_kv_heads=2), 48
    generator = torch.Generator().manual_seed(0)
    requests = [Request(torch.randint(97, (length,), generator=generator).tolist(), max_tokens,
                        temperature=0.0)
                for length, max_tokens in ((5, 20), (12, 4), (1, 25), (30, 9), (7, 14), (2, 3))]
    engine = Engine(model, window, max_batch=4)
    run_with_partners(engine, requests[:3], requests[3:], steps_between=5)
    compared = 0
    for request in requests:
        solo = alone(model, window, request)
        assert request.finish_reason == solo.finish_reason == "length"
        same = compared_length(model, solo)
        assert request.tokens[:same] == solo.tokens[:same]
        compared += same
    assert compared >= 50  # most tokens are no near tie: the rule compares them
    assert len({token for request in requests for token in request.tokens}) > 10
    assert engine.steps < sum(request.max_tokens for request in requests)  # rows shared steps


def test_a_compiled_engine_gives_the_eager_tokens_and_compiles_only_at_warm_up():
    model, window = make_decisive_model(num_kv_heads=2, max_seq_len=160), 160
    generator = torch.Generator().manual_seed(1)
    requests = [Request(torch.randint(97, (length,), generator=generator).tolist(), max_tokens,
                        temperature=0.0)
                for length, max_tokens in ((5, 70), (12, 4), (1, 90), (30, 9), (7, 14), (10, 30))]
    engine = Engine(model, window, max_batch=4, compile=True)
    torch._dynamo.reset()
    counters["inductor"].clear()
    assert engine.warm_up(budget_seconds=600) == [1, 2, 4]
    assert counters["inductor"]["decompose_mm"] > 0  # width 1: products as reductions
    # batches of 1 to 4 rows, the cache growing from 64 positions to 128: no new graph
    with torch._dynamo.config.patch(error_on_recompile=True):
        run_with_partners(engine, requests[:3], requests[3:], steps_between=5)
    assert sum(len(request.tokens) for request in requests) >= 100
    for request in requests:
        solo = alone(model, window, request)
        same = compared_length(model, solo)
        assert same >= 4 and request.tokens[:same] == solo.tokens[:same]



def test_a_width_the_warm_up_did_not_reach_runs_eagerly_without_compiling():
    model = make_decisive_model(num_kv_heads=2, max_seq_len=160)
    engine = Engine(model, 160, max_batch=4, compile=True)
    torch._dynamo.reset()
    assert engine.warm_up(budget_seconds=0) == [1]  # width 1 always; the budget is spent
    requests = [Request([3, 5, 7 + index], 12, temperature=0.0) for index in range(3)]
    with torch._dynamo.config.patch(error_on_recompile=True):  # widths 2 and 4: eager
        run_with_partners(engine, requests, [], steps_between=0)
    assert all(len(request.tokens) == 12 for request in requests)


def test_seeded_rows_draw_their_own_samples_whatever_their_partners(trained):
    model, window = trained.model, trained.context_length
    ids = prompts(trained, ["JULIET:\nO Romeo"])[0]

    def sampled(seed: int, partners: int) -> list[int]:
        engine = Engine(model, window)
        row = Request(ids, 20, temperature=1.0, top_k=40, top_p=0.95, seed=seed)
        others = [Request(ids, 5 + 3 * k, temperature=0.7, seed=100 + k) for k in range(partners)]
        run_with_partners(engine, [row, *others[:1]], others[1:], steps_between=3)
        return row.tokens

    assert sampled(7, 0) == sampled(7, 1) == sampled(7, 4)
    assert sampled(7, 0) != sampled(8, 0)


def test_each_row_follows_the_window_rule_as_generate_does():
    model, window = make_decisive_model(num_kv_heads=2), 16
    rows = [Request(list(range(1, 1 + length)), 40, temperature=0.0) for length in (3, 11, 16)]
    engine = Engine(model, window, max_batch=2)  # the third waits for a free row
    for row in rows:
        engine.submit(row)
    engine.run_until_idle()
    for row in rows:
        expected = [int(token) for token in generate(model, torch.tensor([row.prompt]), 40,
                                                     window, temperature=0.0)]
        assert row.tokens == expected


def test_rows_end_at_their_end_token_or_length_and_a_cancelled_row_frees_its_place():
    model, window, ids = make_decisive_model(), 48, [5, 17, 3]
    greedy = alone(model, window, Request(ids, 10, temperature=0.0))
    end = next((i for i, token in enumerate(greedy.tokens)
                if i > 0 and token not in greedy.tokens[:i]), 0)
    ending = Request(ids, 10, end_id=greedy.tokens[end], temperature=0.0)
    running = Request(ids, 1000, temperature=0.0)
    queued = Request(ids, 10, temperature=0.0)
    engine = Engine(model, window, max_batch=2)
    for request in (ending, running, queued):
        engine.submit(request)
    for _ in range(4):
        engine.step()
    assert ending.finish_reason == "stop" and ending.tokens == greedy.tokens[:end + 1]
    assert queued in engine.rows  # it took the row `ending` freed
    running.cancelled.set()
    engine.step()
    assert running.finish_reason == "cancelled" and running.done.is_set()
    assert running not in engine.rows
    waiting = Request(ids, 10)
    waiting.cancelled.set()
    engine.submit(waiting)
    engine.run_until_idle()
    assert waiting.finish_reason == "cancelled" and waiting.tokens == []
    assert queued.tokens == greedy.tokens and engine.caches == []  # idle: the cache is freed


def test_a_memory_bound_for_one_row_still_serves_every_request(trained):
    model, window = trained.model, trained.context_length
    requests = [Request(ids, 6, temperature=0.0) for ids in prompts(trained, ["A", "B", "C"])]
    engine = Engine(model, window, cache_bytes=1)
    for request in requests:
        engine.submit(request)
    engine.step()
    assert len(engine.rows) == 1
    engine.run_until_idle()
    assert [request.tokens for request in requests] == [
        alone(model, window, request).tokens for request in requests]


def test_a_prompt_the_window_cannot_hold_is_refused():
    engine = Engine(make_decisive_model(), 16)
    with pytest.raises(ValueError, match="1..16 prompt tokens"):
        engine.submit(Request(list(range(17)), 4))
    with pytest.raises(ValueError, match="max_tokens >= 1"):
        engine.submit(Request([1], 0))


def test_a_failed_step_ends_its_rows_as_errors_and_the_engine_serves_on(monkeypatch):
    model, window = make_decisive_model(), 48
    engine = Engine(model, window)
    doomed, later = Request([1, 2, 3], 10, temperature=0.0), Request([4, 5], 3, temperature=0.0)
    engine.submit(doomed)
    decode = engine._decode

    def fail_once() -> None:
        monkeypatch.setattr(engine, "_decode", decode)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine, "_decode", fail_once)
    stop = threading.Event()
    runner = threading.Thread(target=engine.run, args=(stop,))
    runner.start()
    try:
        assert doomed.done.wait(10) and doomed.finish_reason == "error"
        engine.submit(later)
        assert later.done.wait(10) and later.finish_reason == "length"
    finally:
        stop.set()
        runner.join()
    assert later.tokens == alone(model, window, later).tokens


def test_a_closed_engine_finishes_everything_and_takes_no_more_work():
    engine = Engine(make_decisive_model(), 48, max_batch=1)
    running, waiting = Request([1, 2], 30), Request([3], 30)
    engine.submit(running)
    engine.submit(waiting)
    engine.step()
    scoring = engine.call(lambda: 1)
    engine.close("shutdown")
    assert running.finish_reason == waiting.finish_reason == "shutdown"
    assert running.done.is_set() and waiting.done.is_set() and not engine.rows
    with pytest.raises(Closed):
        engine.submit(Request([1], 3))
    with pytest.raises(Closed):
        scoring.result(timeout=1)
    with pytest.raises(Closed):
        engine.call(lambda: 1).result(timeout=1)
