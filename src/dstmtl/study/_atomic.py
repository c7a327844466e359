"""Files that appear whole or not at all, so that a crash never leaves half of one."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success, flush it to disk and rename it.

    The rename is atomic on one file system, so readers see the old file or the new one,
    and the directory is flushed after it, so the new file survives a power cut.
    On an exception the temporary file is removed and ``path`` is left as it was. A process
    killed outright (SIGKILL, out of memory) cannot clean up, and an image cache temporary
    is gigabytes, so the next write of ``path`` removes the temporaries that processes of
    this host which have since exited left for it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path)
    temporary = path.with_name(f"{_temporary_prefix(path)}{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
        _sync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as temporary:
        temporary.write_bytes(data)


def _sync_directory(directory: Path) -> None:
    # The rename lives in the directory: without this, a power cut can undo it.
    if os.name != "posix":  # a directory cannot be opened for fsync on Windows
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        # Some network and FUSE file systems cannot sync a directory; the file itself is
        # already whole and in place, so that is no reason to fail the write.
        if error.errno != errno.EINVAL:
            raise
    finally:
        os.close(descriptor)


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def _remove_abandoned(path: Path) -> None:
    # Only a PID of this host can be checked; on a shared file system another host's
    # temporary may belong to a build still running there.
    if os.name != "posix":  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows
        return
    prefix, host = _temporary_prefix(path), socket.gethostname()
    for candidate in path.parent.iterdir():
        name = candidate.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        owner, _, pid = name[len(prefix) : -len(".tmp")].rpartition(".")
        if owner == host and pid.isdigit() and not _running(int(pid)):
            with suppress(PermissionError):  # another user's, in a shared folder
                candidate.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True
