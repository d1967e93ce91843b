"""Durable file writes: a file is complete on disk before any event names it.

The recipe is the classic one: write a temp file in the target folder, fsync it, rename it over
the target (atomic on one filesystem), then fsync the folder so the rename itself survives a
power cut.
"""
import ctypes
import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from . import faults

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
except (AttributeError, OSError):
    _renameat2 = None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    # dot-prefixed and .tmp-suffixed: the spool scanner ignores both
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temp path, then make it durable and move it to `path`."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as e:
            # never retried: after a failed fsync the kernel may have dropped the data and a
            # second fsync can report success. The file is abandoned, and the error names it.
            raise OSError(e.errno, e.strerror, str(path)) from e
        finally:
            os.close(fd)
        faults.point("file.unrenamed")
        os.replace(tmp, path)
    except Exception as e:
        # libraries that write for us (torch.save, h5py) may turn ENOSPC into their own error
        # ("unexpected pos 5440 vs 5332"): say what happened if the disk is in fact full
        full = not (isinstance(e, OSError) and e.errno) and _nearly_full(path.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _nearly_full(folder: Path, margin: int = 1 << 20) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < margin


def remove_stale_temps(folder: Path) -> list[str]:
    """Delete the temp files (`temp_path_for`) in `folder` whose writer is dead: the leftovers of
    a crash between writing a file and renaming it. Returns their names."""
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        head, _, pid = name.removesuffix(".tmp").rpartition(".")
        if not (name.startswith(".") and name.endswith(".tmp") and head and pid.isdigit()):
            continue
        if int(pid) != os.getpid() and not pid_alive(int(pid)):
            Path(folder, name).unlink(missing_ok=True)
            removed.append(name)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie: a process that died is one even before
    its parent (or, for an orphan, init, which may be slow or, in a container, absent) reaps it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"  # the name may hold spaces
    except (OSError, IndexError):  # no /proc: what kill() said
        return True


def _process_stats():
    """(pid, the fields of /proc/<pid>/stat after the name: state ppid pgrp session ...) for
    each process; none where there is no /proc to read."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()  # the name may hold spaces
        except OSError:  # it ended while we looked
            continue
        if len(fields) > 3:
            yield int(name), fields


def adopted_zombies(own: set[int]) -> list[int]:
    """This process's children that have died and are not in `own`: as PID 1 (a container's
    init) it adopts every orphan, such as the ranks of a worker that was killed, and no one
    else will reap them."""
    me = str(os.getpid()).encode()
    return [pid for pid, fields in _process_stats()
            if fields[0] == b"Z" and fields[1] == me and pid not in own]


def session_processes(sid: int, exe: str | None = None) -> list[int]:
    """The live (not zombie) processes of session `sid`: a worker's, which the daemon starts in
    a session of its own, holds its DDP ranks too. With `exe`, only those running that program
    (a real path): a pid the session once had, reused since, is no one else's to wait for or
    kill. Empty where there is no /proc to read."""
    found = []
    for pid, fields in _process_stats():
        if fields[0] == b"Z" or int(fields[3]) != sid:
            continue
        try:
            if exe is not None and os.readlink(f"/proc/{pid}/exe") != exe:
                continue
        except OSError:  # ended, or not ours to read
            continue
        found.append(pid)
    return found


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def relative_to_or_absolute(path: Path, base: Path) -> str:
    """Paths stored in events are relative to the job folder when they live inside it."""
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return str(path)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move `src` to `dst` in one step, or raise FileExistsError if `dst` exists.

    renameat2(RENAME_NOREPLACE) where the kernel and filesystem have it: a watcher sees one
    rename (inotify IN_MOVED_TO), so the daemon takes the file at once. Elsewhere a hard link
    then an unlink, which is just as safe but looks like a file created in place, so the daemon
    waits for it to be quiet first."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(src))
    os.link(src, dst)
    os.unlink(src)
