import math

import pytest
import torch

from conftest import make_model, prefill_then_decode
from model import apply_rope, rope_tables


def test_shapes_and_loss():
    model = make_model()
    idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 16, 97)
    assert loss.shape == () and abs(loss.item() - math.log(97)) < 0.5  # near-uniform at init
    assert model(idx)[1] is None
    last = model(idx, last_only=True)[
        0
    ]  # what generation asks for: only the last position's logits
    assert last.shape == (2, 1, 97) and torch.allclose(last, logits[:, -1:], atol=1e-6)


def test_dropout_acts_in_training_only():
    model = make_model(dropout=0.5)
    idx = torch.randint(0, 97, (2, 16))
    assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])


def test_causal_future_tokens_do_not_change_earlier_logits():
    model = make_model()
    idx = torch.randint(0, 97, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97
    before, after = model(idx)[0], model(changed)[0]
    assert torch.allclose(before[0, :12], after[0, :12], atol=1e-6)
    assert not torch.allclose(before[0, 12:], after[0, 12:], atol=1e-3)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    head_dim = 16
    cos, sin = rope_tables(head_dim, 64, theta=10000.0)
    q, k = torch.randn(1, 1, 1, head_dim), torch.randn(1, 1, 1, head_dim)

    def score(q_pos, k_pos):
        q_rot = apply_rope(q, cos[q_pos : q_pos + 1], sin[q_pos : q_pos + 1])
        k_rot = apply_rope(k, cos[k_pos : k_pos + 1], sin[k_pos : k_pos + 1])
        return (q_rot * k_rot).sum()

    assert torch.allclose(score(5, 2), score(25, 22), atol=1e-5)
    assert torch.allclose(score(40, 0), score(47, 7), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)
    rotated = apply_rope(q.expand(1, 1, 10, head_dim), cos[:10], sin[:10])
    assert torch.allclose(
        rotated.norm(dim=-1), q.norm(dim=-1).expand(1, 1, 10), atol=1e-5
    )  # a pure rotation


def test_grouped_query_attention_equals_mha_with_shared_kv_heads():
    gqa = make_model(num_kv_heads=2)
    mha = make_model(num_kv_heads=4)
    state = gqa.state_dict()
    head_dim, groups = 16, 2
    for name, weight in list(state.items()):
        if name.endswith(
            ("k_proj.weight", "v_proj.weight")
        ):  # kv head j serves query heads 2j and 2j+1
            state[name] = (
                weight.view(2, head_dim, -1)
                .repeat_interleave(groups, dim=0)
                .reshape(4 * head_dim, -1)
            )
    mha.load_state_dict(state)
    assert gqa.layers[0].self_attn.k_proj.weight.shape == (32, 64)
    idx = torch.randint(0, 97, (2, 20))
    assert torch.allclose(gqa(idx)[0], mha(idx)[0], atol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_kv_cache_prefill_and_decode_give_the_full_forward_logits(num_kv_heads):
    model = make_model(num_kv_heads=num_kv_heads)
    sequence = torch.randint(0, 97, (2, 30))
    assert torch.allclose(
        prefill_then_decode(model, sequence, 10)[0], model(sequence)[0], atol=1e-5
    )


def test_cache_under_autocast_is_kept_in_the_autocast_dtype():
    model = make_model(
        num_kv_heads=2
    )  # infer.py and bench.py generate under autocast (bf16 on a GPU)
    sequence = torch.randint(0, 97, (1, 20))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        cached, caches = prefill_then_decode(model, sequence, 12)
        assert caches[0].k.dtype == caches[0].v.dtype == torch.bfloat16
        assert torch.allclose(cached.float(), model(sequence)[0].float(), atol=0.02)


def test_embedding_and_head_are_tied_through_training_and_state_dict():
    model = make_model().train()
    assert model.lm_head.weight is model.embed_tokens.weight
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 97, (2, 16))
    model(idx, idx)[1].backward()
    optimizer.step()
    assert model.lm_head.weight is model.embed_tokens.weight
    reloaded = make_model()
    reloaded.load_state_dict(model.state_dict())
    assert reloaded.lm_head.weight is reloaded.embed_tokens.weight
    assert torch.equal(reloaded.lm_head.weight, model.embed_tokens.weight)


def test_init_scales_residual_projections_and_counts_flops():
    model = make_model(embed_dim=256, ff_dim=512, num_layers=8, num_heads=4, num_kv_heads=4)
    assert model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    n = 97 * 256 + 8 * (4 * 256 * 256 + 3 * 256 * 512 + 2 * 256) + 256
    assert model.num_params() == n
    assert model.flops_per_token(32) == 6 * n + 12 * 8 * 256 * 32
