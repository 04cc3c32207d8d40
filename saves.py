"""The saves of a snapshot path: which there are, whether each is whole, which one a resume
takes, which ones stay. snapshots.py says what a save holds and writes and loads it.

- A file snapshot's newest save is the file itself; the ones before it are kept beside it,
  named by their step (snapshot.step-00000040.pth). The zip that torch.save writes holds a
  CRC-32 of every entry: that is the file's check.
- A sharded snapshot's saves are directories (step-00000040/) of DCP's files, RUN_RECORD and
  MANIFEST, every file's size and CRC-32, written once all of them are in place: a save
  without one was cut short. LATEST names the newest complete save.

A resume takes the newest save that passes its check, with one line naming what was wrong with
a newer one; where saves exist and none passes, it is refused (never a restart from step 0).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import zipfile
import zlib

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata

from checkpoints import SHARDED_LATEST, load_checkpoint, save_checkpoint
from distributed import (all_gather_objects, broadcast_rank_0s, is_rank_0,
                         require_same_on_all_ranks)
from files import atomic_write
from utils import UserError, warn

RUN_RECORD = "run.pth"  # in a sharded save: the snapshot's record but its model and optimizer
MANIFEST = "manifest.json"  # in a sharded save: {"files": {name: {"bytes", "crc32"}}}
SAVE_NAME = re.compile(r"step-(\d{8,})")
START_OVER = (
    "point training.snapshot_path and training.checkpoint_path at new paths to start over")


def save_name(step: int) -> str:
    """A sharded save's directory."""
    return f"step-{step:08d}"


def older_file(path: str, step: int) -> str:
    """Where the save before file snapshot `path` is kept: snapshot.step-00000040.pth."""
    root, extension = os.path.splitext(path)
    return f"{root}.step-{step:08d}{extension}"


def older_files(path: str) -> dict[int, str]:
    """The earlier saves kept beside file snapshot `path`, by step."""
    root, extension = os.path.splitext(path)
    name = re.compile(re.escape(os.path.basename(root)) + r"\.step-(\d{8,})" + re.escape(extension))
    directory = os.path.dirname(path)
    found = os.listdir(directory or ".") if os.path.isdir(directory or ".") else []
    return {int(match[1]): os.path.join(directory, entry) for entry in found
            if (match := name.fullmatch(entry))}


def sharded_saves(path: str) -> dict[int, str]:
    """The save directories of sharded snapshot `path` (complete or not), by step."""
    found = os.listdir(path) if os.path.isdir(path) else []
    return {int(match[1]): os.path.join(path, entry) for entry in found
            if (match := SAVE_NAME.fullmatch(entry)) and os.path.isdir(os.path.join(path, entry))}


def saves_seen(path: str) -> str:
    """The saves this process sees at snapshot `path`, by name (a file's with its size), for
    the ranks to compare."""
    if os.path.isdir(path):
        names = [os.path.basename(save) for _, save in sorted(sharded_saves(path).items())]
    else:
        files = [older for _, older in sorted(older_files(path).items())]
        files += [path] if os.path.isfile(path) else []
        names = [f"{os.path.basename(file)} ({os.path.getsize(file):,} bytes)" for file in files]
    return ", ".join(names) or f"no snapshot at {path}"


def find_snapshot_across_ranks(path: str) -> str | None:
    """The save at snapshot `path` to resume (a file, or a sharded save's directory): the newest
    that passes its check, once every rank has found the same saves; None where none was ever
    written. Rank 0 names in one line what was wrong with newer ones; a path whose every save
    fails is refused, never trained again from step 0."""
    require_same_on_all_ranks(saves_seen(path), "the snapshot to resume", "put "
                              "training.snapshot_path on storage every rank can see, at the same "
                              "path")
    if os.path.isdir(path):
        return find_sharded_save_across_ranks(path)
    return broadcast_rank_0s(lambda: find_file_save(path))


def find_file_save(path: str) -> str | None:
    """The file snapshot itself if it passes its check, else the newest earlier save that does."""
    candidates = sorted(older_files(path).items(), reverse=True)
    if os.path.isfile(path):
        candidates.insert(0, (None, path))
    problems = [] if os.path.isfile(path) else [f"{path} is missing"]
    for step, candidate in candidates:
        problem = file_save_problem(candidate)
        if problem is None:
            if candidate != path:
                warn(f"{'; '.join(problems)} — resuming from {candidate}, step {step}")
            return candidate
        problems.append(problem)
    if not candidates:
        return None
    raise UserError(f"no save at {path} can be resumed ({'; '.join(problems)}) — {START_OVER}")


def file_save_problem(path: str) -> str | None:
    """What makes file snapshot `path` unusable: unreadable, or an entry whose CRC-32 fails."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        load_checkpoint(path, weights=False)
    except UserError as err:
        return f"{path} cannot be read ({str(err).split(' — ')[0]})"
    except Exception as err:  # BadZipFile, OSError, EOFError, by the kind of damage
        return f"{path} cannot be read ({str(err) or type(err).__name__})"
    if damaged is not None:
        return f"{path} fails its check ({damaged} is not the data that was saved)"
    return None


def find_sharded_save_across_ranks(path: str) -> str | None:
    """The newest save directory that passes its check, each rank checking its share of the
    files (every rank sees the same saves: find_snapshot_across_ranks compared them)."""
    latest = read_latest(path)
    saves = sorted(sharded_saves(path).items(), reverse=True)
    if not saves and latest is None:
        return None
    names = [os.path.basename(save) for _, save in saves]
    problems = [{None: "latest is missing", "": "latest is empty"}.get(
        latest, f"latest names {latest}, which is missing")] if latest not in names else []
    for step, save in saves:
        found = [problem for problems_of_rank in all_gather_objects(save_problems(save, latest))
                 for problem in problems_of_rank]
        if not found:
            if latest != os.path.basename(save) and is_rank_0():
                reasons = problems or [f"latest names {latest}, an older save"]
                warn(f"{path}: {'; '.join(reasons)} — resuming from {save}, step {step}")
            return save
        problems.append(f"{os.path.basename(save)} {found[0]}")
    raise UserError(f"no save in {path} can be resumed ({'; '.join(problems)}) — {START_OVER}")


def read_latest(path: str) -> str | None:
    """The save LATEST names ("" if it names none), or None where there is no LATEST."""
    try:
        with open(os.path.join(path, SHARDED_LATEST), encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def is_complete(save: str, latest: str | None) -> bool:
    """Whether a sharded save was completed: it has its manifest, or it is the save LATEST
    names with a record, which an SLM from before manifests wrote (loaded unchecked)."""
    return os.path.isfile(os.path.join(save, MANIFEST)) or (
        os.path.basename(save) == latest and os.path.isfile(os.path.join(save, RUN_RECORD)))


def save_problems(save: str, latest: str | None) -> list[str]:
    """What this rank finds wrong with its share of a sharded save's files."""
    if not is_complete(save, latest):
        return ["was cut short (it has no manifest)"]
    if not os.path.isfile(os.path.join(save, MANIFEST)):
        return []
    try:
        with open(os.path.join(save, MANIFEST), encoding="utf-8") as f:
            files = {name: (int(entry["bytes"]), int(entry["crc32"]))
                     for name, entry in json.load(f)["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [f"has a damaged {MANIFEST}"]
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problems = []
    for name in sorted(files)[rank::world_size]:
        saved_size, saved_crc = files[name]
        try:
            size, crc = checksum(os.path.join(save, name))
        except OSError as err:
            problems.append(f"has no readable {name} ({err.strerror})")
            continue
        if size != saved_size:
            problems.append(f"has {name} of {size:,} bytes, {saved_size:,} when saved")
        elif crc != saved_crc:
            problems.append(f"fails its check ({name} is not the data that was saved)")
    return problems


def checksum(path: str) -> tuple[int, int]:
    """(bytes, CRC-32) of a file, read in pieces."""
    size, crc = 0, 0
    with open(path, "rb") as f:
        while piece := f.read(1 << 22):
            size, crc = size + len(piece), zlib.crc32(piece, crc)
    return size, crc


def snapshot_record(save: str) -> dict:
    """A save without its weights and optimizer state (a file snapshot's are mapped, not read,
    unless the caller uses them): a file, or a sharded save's directory."""
    if os.path.isfile(save):
        return load_checkpoint(save, weights=False)
    try:
        return torch.load(os.path.join(save, RUN_RECORD), map_location="cpu", weights_only=True)
    except Exception as err:  # a missing or damaged record, by the kind of damage
        raise UserError(f"cannot read the sharded snapshot {save} ({type(err).__name__}) — "
                        f"{START_OVER}") from None


def save_file(path: str, snapshot: dict, keep: int) -> None:
    """Write file snapshot `path`. While `keep` > 1 the save it replaces is first hard-linked
    under its step's name (so it stays whole, whenever a crash comes), and once the new one is in
    place the oldest beyond `keep` go; a later step's never does."""
    step = snapshot["progress"]["step"]
    if keep > 1 and os.path.isfile(path):
        try:
            previous = load_checkpoint(path, weights=False).get("progress", {}).get("step")
        except UserError:  # a damaged file is no save to keep
            previous = None
        if previous is not None and previous != step:
            older = older_file(path, previous)
            with contextlib.suppress(FileNotFoundError):
                os.remove(older)
            try:
                os.link(path, older)
            except OSError:  # a file system without hard links: a crash now leaves only `older`
                os.replace(path, older)
    save_checkpoint(snapshot, path)
    earlier = sorted(older for older in older_files(path) if older < step)
    for older in earlier[:max(0, len(earlier) - (keep - 1))]:
        os.remove(older_file(path, older))


def write_manifest_across_ranks(save: str, metadata: Metadata) -> None:
    """Once DCP's files and RUN_RECORD are in place: each rank reads back the files it wrote
    for their sizes and CRC-32s, and rank 0 writes them, with its own, into MANIFEST."""
    written = {item.relative_path for item in metadata.storage_data.values()}
    mine = {file: checksum(os.path.join(save, file)) for file in written
            if writer_rank(file) == dist.get_rank()}
    sums = {file: sizes for rank_sums in all_gather_objects(mine)
            for file, sizes in rank_sums.items()}
    if is_rank_0():
        for file in set(os.listdir(save)) - set(sums):  # DCP's metadata and the record
            sums[file] = checksum(os.path.join(save, file))
        manifest = {"files": {file: {"bytes": size, "crc32": crc}
                              for file, (size, crc) in sorted(sums.items())}}
        atomic_write(os.path.join(save, MANIFEST),
                     lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def writer_rank(file: str) -> int:
    """The rank that wrote a DCP file: FileSystemWriter names them __<rank>_<n>.distcp (one it
    names otherwise is summed by rank 0, which reads every rank's files)."""
    match = re.match(r"__(\d+)_", file)
    return int(match[1]) if match else 0


def remove_old_saves(path: str, step: int, keep: int, latest: str | None) -> None:
    """Once save `step` is complete: the saves cut short go, and the complete ones before it
    beyond `keep`; a later complete save never does. `latest`: what LATEST named before this
    save. A save loses its manifest first, so one half removed reads as cut short."""
    saves = sharded_saves(path)
    complete = sorted(other for other, save in saves.items() if is_complete(save, latest))
    earlier = [other for other in complete if other < step]
    kept = {*earlier[max(0, len(earlier) - (keep - 1)):], *[other for other in complete
                                                            if other >= step]}
    for other, save in saves.items():
        if other not in kept:
            if os.path.isfile(os.path.join(save, MANIFEST)):
                os.remove(os.path.join(save, MANIFEST))
            shutil.rmtree(save, ignore_errors=True)
