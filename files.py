"""Files that survive crashes and neighbours: outputs probed before work starts, written by
temp file + fsync + rename, and locked to one run at a time."""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import socket
import tempfile
import time
from typing import Any, BinaryIO, Callable, Iterator

from utils import UserError, require


def check_writable(*directories: str,
                   fix: str = "choose a writable output path or free some space") -> None:
    """Fail now, not an hour into training, if a directory cannot be written; leaves nothing."""
    for directory in directories:
        existing = os.path.abspath(directory)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        require(os.path.isdir(existing),
                f"cannot create {directory}: {existing} is a file — {fix}")
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
                pass
        except OSError as err:
            raise UserError(f"cannot write to {existing} ({err.strerror}) — {fix}") from None


class _KeepsWriteError:
    """A file that remembers its first failed write: torch.save reports a full disk as a
    RuntimeError about zip positions, and the OSError behind it is the one to report."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"  # "-" parts a temp name
OTHER_HOST_STALE_SECONDS = 3600  # another host's temp file unwritten this long: its writer died


def _writer_is_gone(temp_path: str) -> bool:
    """Whether the writer of temp file `.<name>.tmp-<host>-<pid>-…` has ended. On this host:
    its pid is not alive. Another host's pids cannot be seen from here (several nodes on
    shared storage), so its temp file counts as dead only when unwritten for
    OTHER_HOST_STALE_SECONDS."""
    parts = os.path.basename(temp_path).rsplit(".tmp-", 1)[1].split("-")
    host, pid = (parts[0], parts[1]) if len(parts) == 3 else (HOST, parts[0])
    if host != HOST:
        try:
            return time.time() - os.path.getmtime(temp_path) > OTHER_HOST_STALE_SECONDS
        except OSError:  # gone already: renamed into place, or removed
            return False
    if not pid.isdigit():  # written by an older SLM, which named no writer
        return True
    try:
        os.kill(int(pid), 0)  # signal 0 only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return True
    except OSError:  # alive, and another user's
        pass
    return False


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write a temp file beside `path`, fsync, rename: a crash mid-write keeps the previous file.
    A temp file is named after its writer's host and pid; one whose writer has died goes at the
    next write of the path, while a live run's temp file, on any host, is left alone."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.tmp-*")):
        if _writer_is_gone(stale):
            with contextlib.suppress(OSError):
                os.unlink(stale)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{name}.tmp-{HOST}-{os.getpid()}-")
    try:
        with os.fdopen(fd, "wb") as f:
            file = _KeepsWriteError(f)
            try:
                write(file)
            except Exception as err:
                raise file.error or err
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; outputs should read like any other file
        os.replace(tmp_path, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        if isinstance(err, OSError):  # disk full, quota, permissions changed mid-run
            raise UserError(f"could not write {path} ({err.strerror or err}); the previous "
                            "version is intact — free disk space or fix the permissions, then "
                            "run the same command again") from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself survive a power cut (POSIX)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def claimed(path: str, setting: str) -> Iterator[None]:
    """Hold a lock on output `path` while inside, so no second run writes it meanwhile; the OS
    drops it too when the process ends, however it ends (kill -9 included). The lock file,
    `.<name>.lock` beside the path, holds the holder's pid and stays: removing it could let a
    second run lock a new file while the first still holds the old one."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f".{name}.lock"), "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise UserError(f"another run (pid {holder}) is writing {path} — wait for it to end, "
                            f"or give this run another {setting}") from None
        try:
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
