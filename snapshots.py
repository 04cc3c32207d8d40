"""Snapshots: a training run's whole state, to continue it. One file (one process, or DDP, where
rank 0 writes it), or under FSDP a directory that every rank writes its shards into at once
(torch.distributed.checkpoint, DCP). A snapshot resumes bitwise on the same number of ranks,
and on another number when the global batch (batch_size x grad_accum_steps x ranks) is kept:
the data order deals the same windows to each global step whatever the split, so only the
position in the epoch is rescaled (dropout's masks are drawn per rank, so they differ then).

A file snapshot is a best checkpoint's record plus "optimizer", "scaler", "precision",
"progress" (RunState), "batch_plan" and every rank's "rng". A sharded save holds DCP's files of
the model and optimizer state and saves.RUN_RECORD, the rest of the record. saves.py keeps the
last training.keep_snapshots saves and checks one before it is resumed.
"""
from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule

from bpe import BPETokenizer
from checkpoints import (SHARDED_LATEST, check_best_checkpoint, load_checkpoint, load_weights,
                         model_record, save_checkpoint)
from data import TokenWindows, corpus_fingerprint
from distributed import (all_gather_objects, broadcast_rank_0s, is_rank_0,
                         require_same_on_all_ranks, trained_weights)
from files import atomic_write
from model import Transformer
from saves import (RUN_RECORD, START_OVER, find_snapshot_across_ranks, remove_old_saves,
                   read_latest, save_file, save_name, snapshot_record,
                   write_manifest_across_ranks)
from utils import Config, TrainingConfig, UserError, require

SNAPSHOT_KEYS = ("progress", "optimizer", "batch_plan")
RESHARDABLE = ("processes", "data.batch_size", "training.grad_accum_steps")  # global batch kept


@dataclass
class RunState:
    """Where a run stands: a snapshot's "progress", restored from it as a whole."""
    run_name: str                    # TensorBoard sub-directory
    run_id: str = ""                 # also in its best checkpoint ("" in an older SLM's snapshot)
    step: int = 0                    # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0          # micro-batches of this epoch each rank has consumed
    train_seconds: float = 0.0       # wall clock of the loop, over every process that resumed it
    best_val_loss: float = math.inf  # nats per token
    best_val_bpb: float = math.inf   # bits per UTF-8 byte
    base_fingerprint: str = ""       # a LoRA run's frozen base (lora.fingerprint), kept checked


def batch_plan(config: Config, train_set: TokenWindows, world_size: int) -> dict:
    """What decides which windows each optimizer step trains on, and the optimizer whose state
    the snapshot holds: a resume needs all of it unchanged but RESHARDABLE's split of the global
    batch (the run's length, learning rate, logging and outputs may change too)."""
    d, t = config.data, config.training
    return {"global_batch": d.batch_size * t.grad_accum_steps * world_size,
            "processes": world_size, "data.batch_size": d.batch_size,
            "training.grad_accum_steps": t.grad_accum_steps,
            "data.context_length": d.context_length, "data.val_split": d.val_split,
            "training.seed": t.seed, "training.optimizer": t.optimizer,
            "training.lora_rank": t.lora_rank,
            "training.lora_targets": sorted(t.lora_targets) if t.lora_rank else [],
            "corpus": corpus_fingerprint(train_set.tokens, train_set.mask)}


def check_shared_across_ranks(directory: str, setting: str) -> None:
    """Stop every rank with one line unless all of them see `directory` as the same storage:
    rank 0 writes a file there that every other rank must find. Nothing is left behind."""
    probe, made = broadcast_rank_0s(lambda: write_probe(directory))
    require_same_on_all_ranks(os.path.isfile(probe), f"whether they see {setting}'s directory "
                              f"{directory}", f"put {setting} on storage every node mounts at "
                              "the same path")
    dist.barrier()
    if is_rank_0():
        os.unlink(probe)
        for empty in made:
            os.rmdir(empty)
    dist.barrier()  # no rank looks at the directory while rank 0 removes what it made


def write_probe(directory: str) -> tuple[str, list[str]]:
    """(a new file in `directory`, the directories made for it, innermost first)."""
    made, missing = [], directory
    while not os.path.isdir(missing):
        made.append(missing)
        missing = os.path.dirname(missing)
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".probe-{uuid.uuid4().hex}")
    open(probe, "w").close()
    return probe, made


def save_snapshot_across_ranks(path: str, model: Transformer,
                               optimizers: list[torch.optim.Optimizer],
                               scaler: torch.amp.GradScaler, config: Config,
                               tokenizer: BPETokenizer, precision: str, progress: dict,
                               plan: dict) -> None:
    """All that continuing needs, every rank's RNG state and the precision the run chose
    included: rank 0 writes a file, or under FSDP every rank writes its shards. Every rank
    returns once the snapshot is in place and the saves beyond training.keep_snapshots are gone."""
    rng = {"torch": torch.get_rng_state(),
           **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}
    record = {**model_record({}, config, tokenizer, progress["base_fingerprint"]),
              "scaler": scaler.state_dict(), "precision": precision, "progress": progress,
              "batch_plan": plan, "rng": all_gather_objects(rng)}
    keep = config.training.keep_snapshots
    if isinstance(model, FSDPModule):
        del record["model"]
        save_shards(path, model, optimizers, record, keep)
    elif is_rank_0():
        save_file(path, {**record, "model": trained_weights(model),
                         "optimizer": [optimizer.state_dict() for optimizer in optimizers]}, keep)
    if dist.is_initialized():
        dist.barrier()


def save_shards(path: str, model: Transformer, optimizers: list[torch.optim.Optimizer],
                record: dict, keep: int) -> None:
    """A sharded snapshot's save: every rank's shards into a new save directory, then the
    record, then the manifest of every file's checksum, then LATEST is pointed at it, then
    saves beyond `keep` go."""
    step = record["progress"]["step"]
    save = os.path.join(path, save_name(step))
    if is_rank_0():  # a save of this step that was cut short, or failed its check
        shutil.rmtree(save, ignore_errors=True)
    dist.barrier()
    metadata = dcp.save(sharded_state(model, optimizers), checkpoint_id=save)
    if is_rank_0():
        save_checkpoint(record, os.path.join(save, RUN_RECORD))
    write_manifest_across_ranks(save, metadata)
    if is_rank_0():
        latest = read_latest(path)
        atomic_write(os.path.join(path, SHARDED_LATEST),
                     lambda f: f.write(save_name(step).encode()))
        remove_old_saves(path, step, keep, latest)


def find_resume_point(t: TrainingConfig) -> tuple[str | None, str | None, str]:
    """(the save to resume or None, the precision it trained in, the run's id), every rank
    agreeing; the best checkpoint, if there is one, must be this run's. Nothing of the save is
    kept mapped: a kept save deleted later would hold its disk space until the run ends."""
    if t.parallelism == "fsdp":  # every rank writes its shards there
        check_shared_across_ranks(os.path.abspath(t.snapshot_path), "training.snapshot_path")
    save = find_snapshot_across_ranks(t.snapshot_path)
    snapshot = snapshot_record(save) if save else {}
    precision, run_id = snapshot.get("precision"), snapshot.get("progress", {}).get("run_id", "")
    if not save:
        run_id = broadcast_rank_0s(lambda: uuid.uuid4().hex)
    del snapshot
    broadcast_rank_0s(lambda: check_best_checkpoint(t.checkpoint_path, run_id, save is not None))
    return save, precision, run_id


def resume_or_start(t: TrainingConfig, save: str | None, run_id: str, base_fingerprint: str,
                    model: Transformer, optimizers: list[torch.optim.Optimizer],
                    scaler: torch.amp.GradScaler, device: torch.device, plan: dict) -> RunState:
    """The run's state: restored from `save`, or a fresh one. A LoRA run's base must be the
    one its snapshot was trained over (`base_fingerprint`)."""
    if not save:
        return RunState(run_name=t.run_name or time.strftime("%Y%m%d-%H%M%S"), run_id=run_id,
                        base_fingerprint=base_fingerprint)
    state = RunState(**load_snapshot(save, model, optimizers, scaler, device, plan))
    require(state.base_fingerprint == base_fingerprint, f"training.init_from {t.init_from} "
            f"has changed since {t.snapshot_path} was saved over it (the frozen base's weights "
            f"differ) — restore the base the run started from, or {START_OVER}")
    if is_rank_0():
        print(f"resuming from {t.snapshot_path}: step {state.step}, epoch {state.epoch}, "
              f"batch {state.batch_in_epoch} of that epoch", flush=True)
    return state


def sharded_state(model: Transformer, optimizers: list[torch.optim.Optimizer]) -> dict:
    """What a sharded save holds: the trained weights' shards (a LoRA run's adapters) and the
    optimizer's."""
    return {"model": trained_weights(model),
            "optimizer": get_optimizer_state_dict(model, optimizers)}


def load_snapshot(save: str, model: Transformer, optimizers: list[torch.optim.Optimizer],
                  scaler: torch.amp.GradScaler, device: torch.device, plan: dict) -> dict:
    """Restore from `save` (find_snapshot_across_ranks's choice) weights, optimizer, scaler and
    (on as many ranks as wrote it) this rank's RNG; returns the stored progress, its position
    rescaled to this run's split of the global batch. A snapshot whose batches this run would
    not replay is refused."""
    sharded = isinstance(model, FSDPModule)
    require(sharded == os.path.isdir(save), f"{save} is a "
            f"{'single-file' if sharded else 'sharded (FSDP)'} snapshot — resume it with "
            f"training.parallelism={'ddp' if sharded else 'fsdp'}, or {START_OVER}")
    snapshot = (snapshot_record(save) if sharded else
                load_checkpoint(save, device, merge_adapter=False))
    require(all(key in snapshot for key in SNAPSHOT_KEYS if key != "optimizer" or not sharded),
            f"{save} is not a training snapshot (a best-model checkpoint, or from an older SLM) "
            f"— point training.snapshot_path at a snapshot, or {START_OVER}")
    saved_plan = resumable_plan(snapshot["batch_plan"], plan, save)
    if sharded:
        state = sharded_state(model, optimizers)
        dcp.load(state, checkpoint_id=save)
        frozen = any(not param.requires_grad for param in model.parameters())
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not frozen))
        set_optimizer_state_dict(model, optimizers, state["optimizer"])
    else:
        load_weights(model, snapshot, save)
        for optimizer, saved in zip(optimizers, snapshot["optimizer"]):
            optimizer.load_state_dict(saved)
    scaler.load_state_dict(snapshot["scaler"])
    progress = dict(snapshot["progress"])
    if saved_plan["processes"] == plan["processes"]:
        rng = snapshot["rng"][dist.get_rank() if dist.is_initialized() else 0]
        torch.set_rng_state(rng["torch"].cpu())
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"].cpu())
    windows = progress["batch_in_epoch"] * saved_plan["data.batch_size"] * saved_plan["processes"]
    progress["batch_in_epoch"] = windows // (plan["data.batch_size"] * plan["processes"])
    return progress


def resumable_plan(saved: dict, plan: dict, path: str) -> dict:
    """The snapshot's batch plan, with what an older one lacks filled in, if this run can go
    on from it; else one error line naming the first difference and its fix."""
    saved = {"training.lora_rank": 0, "training.lora_targets": [], **saved,
             "global_batch": saved.get("global_batch", saved["data.batch_size"]
                                                * saved["training.grad_accum_steps"]
                                                * saved["processes"])}
    changed = [(key, saved.get(key), now) for key, now in plan.items()
               if key not in RESHARDABLE and saved.get(key) != now]
    if not changed:
        return saved
    key, was, now = changed[0]
    split = (f"{saved['data.batch_size']} x {saved['training.grad_accum_steps']} x "
             f"{saved['processes']} process(es)")
    per_micro_step = plan["data.batch_size"] * plan["processes"]
    example = (f", e.g. training.grad_accum_steps={was // per_micro_step}"
               if key == "global_batch" and was % per_micro_step == 0 else "")
    what, fix = {
        "global_batch": (f"trained on {was} windows per step ({split}) and this run takes {now}",
                         f"keep data.batch_size x training.grad_accum_steps x processes = {was}"
                         f"{example}"),
        "corpus": ("was saved while training on other text or with another tokenizer",
                   "restore them")}.get(key, (f"was saved with {key}={was} and this run has {now}",
                                              f"set {key} back to {was}"))
    raise UserError(f"{path} {what}, so its batches cannot be replayed — {fix}, or "
                    f"{START_OVER}")
