"""evaluation.py: validation loss and bits per byte, each rank's share of the batches."""
import numpy as np
import pytest
import torch

from conftest import REPO
from bpe import load_tokenizer, token_byte_lengths
from data import IGNORE_INDEX, TokenWindows
from evaluation import evaluate_across_ranks, fixed_val_batches
from model import Transformer
from utils import ModelConfig, config_from_dict


def test_evaluate_reports_bits_per_byte_consistent_with_loss():
    tokenizer = load_tokenizer(str(REPO / "tokenizer" / "bpe_4096.json"))
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            embed_dim=32, num_heads=2, num_kv_heads=2, ff_dim=64, num_layers=1, max_seq_len=32
        )
    )
    ids = torch.tensor(
        tokenizer.encode("But, soft! what light through yonder window breaks? " * 3)[:33]
    )
    batches = [(ids[None, :-1], ids[None, 1:])]
    token_bytes = torch.from_numpy(token_byte_lengths(tokenizer.hf))
    loss, bpb = evaluate_across_ranks(model, batches, token_bytes, "fp32")
    num_bytes = token_bytes[ids[1:]].sum().item()
    assert bpb == pytest.approx(loss * 32 / (num_bytes * 0.6931471805599453), rel=1e-6)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_rank_gets_as_many_batches_and_together_they_score_all(world_size):
    """Under FSDP every forward meets the other ranks, so a rank short of a batch (5 batches
    over 2 or 3 ranks) runs one with no trained target: the ranks' sums are one process's."""
    windows = TokenWindows(np.arange(5 * 2 * 8 + 1) % 97, context_length=8)
    config = config_from_dict({"data": {"batch_size": 2, "context_length": 8},
                               "training": {"eval_batches": 5}})
    whole = fixed_val_batches(windows, config, 0, 1)
    shares = [fixed_val_batches(windows, config, rank, world_size) for rank in range(world_size)]
    assert len(whole) == 5 and len({len(share) for share in shares}) == 1
    trained = [x for share in shares for x, y in share if (y != IGNORE_INDEX).any()]
    assert sorted(map(tuple, torch.cat(trained).tolist())) == sorted(
        map(tuple, torch.cat([x for x, _ in whole]).tolist()))
    token_bytes = torch.ones(97)
    model = Transformer(ModelConfig(vocab_size=97, embed_dim=32, num_heads=2, num_kv_heads=2,
                                    ff_dim=64, num_layers=1, max_seq_len=8))
    sums = [evaluate_across_ranks(model, share, token_bytes, "fp32") for share in shares]
    targets = [sum(int((y != IGNORE_INDEX).sum()) for _, y in share) for share in shares]
    mean_loss = sum(loss * count for (loss, _), count in zip(sums, targets)) / sum(targets)
    assert mean_loss == pytest.approx(evaluate_across_ranks(model, whole, token_bytes,
                                                            "fp32")[0], rel=1e-6)
