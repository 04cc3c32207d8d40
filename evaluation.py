"""The training loop's evaluation: validation loss and bits per byte on fixed batches, the eval
tasks' scores, a text sample, and the best checkpoint. Under torchrun each function named
`..._across_ranks` meets the other ranks: every rank calls it, at the same point of the loop,
and every rank runs the same number of forwards in it (FSDP gathers weights in each one).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bpe import BPETokenizer
from chat import render
from checkpoints import model_record, save_checkpoint
from data import IGNORE_INDEX, TokenWindows
from distributed import all_reduce, full_weights_across_ranks, is_rank_0
from generate import generate
from model import Transformer
from runtime import autocast_context
from scoring import Encoder, Task, score_task_across_ranks
from snapshots import RunState
from utils import Config

SAMPLE_TURN = "Hello! Who are you?"  # the user turn a conversation run's sample answers


def fixed_val_batches(val_set: TokenWindows, config: Config, rank: int,
                      world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the same eval_batches batches at every eval, spread evenly over the
    validation split. Every rank gets as many batches: a rank short of one repeats a batch with
    no trained target, which adds nothing to the sums."""
    size = config.data.batch_size
    count = min(len(val_set), config.training.eval_batches * size)
    picks = torch.linspace(0, len(val_set) - 1, count).round().long().unique().tolist()
    windows = [val_set[i] for i in picks]
    batches = [tuple(torch.stack(column) for column in zip(*windows[i:i + size]))
               for i in range(0, len(windows), size)]
    mine = batches[rank::world_size]
    x, y = batches[0]
    return mine + [(x, torch.full_like(y, IGNORE_INDEX))] * (-(-len(batches) // world_size)
                                                            - len(mine))


@torch.no_grad()
def evaluate_across_ranks(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]],
                          token_bytes: torch.Tensor, precision: str) -> tuple[float, float]:
    """(mean loss in nats/token, bits per UTF-8 byte) over every rank's batches' trained targets
    (a conversation's: the assistant's); special tokens (0 bytes) are left out of the
    bits-per-byte sum."""
    device = token_bytes.device
    sums = torch.zeros(4, device=device,  # MPS has no float64
                       dtype=torch.float32 if device.type == "mps" else torch.float64)
    model.eval()
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).view(-1)
        with autocast_context(device, precision):
            logits, _ = model(x)
        losses = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y, reduction="none",
                                 ignore_index=IGNORE_INDEX)  # 0 where not trained
        trained = y != IGNORE_INDEX
        target_bytes = token_bytes[y.clamp(min=0)] * trained
        sums += torch.stack((losses.sum(), (losses * (target_bytes > 0)).sum(),
                             target_bytes.sum(), trained.sum()))
    model.train()
    nats, nats_on_bytes, num_bytes, tokens = all_reduce(sums).tolist()
    return nats / max(1.0, tokens), nats_on_bytes / (math.log(2) * max(1.0, num_bytes))


def evaluate_and_keep_best_across_ranks(
        model: Transformer, tokenizer: BPETokenizer, batches: list, token_bytes: torch.Tensor,
        tasks: list[Task], config: Config, precision: str, state: RunState,
        conversations: bool) -> tuple[str, dict[str, float], str | None]:
    """Val loss and bits/byte (of a conversation run: on the assistant's tokens), the eval
    tasks' scores and, if asked, a sample; a new best goes into `state` and rank 0 writes the
    best checkpoint. -> (the lines to print, TensorBoard scalars, the sample)"""
    device, t = model.embed_tokens.weight.device, config.training
    val_loss, val_bpb = evaluate_across_ranks(model, batches, token_bytes, precision)
    encoder = Encoder(tokenizer)
    scores = {task.name: score_task_across_ranks(model, encoder, task,
                                                 config.data.context_length, device, precision)
              for task in tasks}
    improved = val_loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_val_bpb = val_loss, val_bpb
    weights = full_weights_across_ranks(model) if improved else {}  # all ranks, as val_loss
    if improved and is_rank_0():
        record = model_record(weights, config, tokenizer, state.base_fingerprint)
        save_checkpoint({**record, "step": state.step, "run_id": state.run_id,
                         "val_loss": val_loss, "val_bpb": val_bpb}, t.checkpoint_path)
    text = sample(model, tokenizer, config, precision, conversations) if t.sample_tokens else None
    scalars = {"2_val/loss": val_loss, "2_val/bpb": val_bpb,
               "2_val/best_loss": state.best_val_loss, "2_val/best_bpb": state.best_val_bpb,
               **{f"3_eval/{name}/{metric}": result[metric] for name, result in scores.items()
                  for metric in ("acc", "acc_norm")}}
    lines = (f"step {state.step}: val loss {val_loss:.4f}, {val_bpb:.4f} bits/byte"
             + (" (assistant tokens)" if conversations else "")
             + (f" -> saved {t.checkpoint_path}" if improved else "")
             + "".join(f"\n  {name}: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} "
                       f"({result['n']} examples)" for name, result in scores.items()))
    return lines, scalars, text


def sample(model: Transformer, tokenizer: BPETokenizer, config: Config, precision: str,
           conversations: bool) -> str:
    """TensorBoard's text sample, drawn with its own generator (so every rank draws the same
    one): text after the end-of-text token, or in a conversation run the reply to SAMPLE_TURN,
    up to its end of turn."""
    device, chat = model.embed_tokens.weight.device, tokenizer.chat
    eot_id = tokenizer.token_id(chat.end_of_turn)
    prompt = (tokenizer.encode(render(chat, [{"role": "user", "content": SAMPLE_TURN}], True))
              if conversations else [eot_id])
    model.eval()
    with autocast_context(device, precision):
        ids = [int(token) for token in generate(
            model, torch.tensor([prompt], device=device), config.training.sample_tokens,
            config.data.context_length, temperature=0.8, top_k=50,
            eos_id=eot_id if conversations else None,
            generator=torch.Generator(device=device).manual_seed(0))]
    model.train()
    return tokenizer.decode(prompt + ids if conversations else ids)
