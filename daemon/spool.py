"""The spool: its folders, job ids, locks, and how a dropped file is claimed or rejected.

```
spool/
  incoming/           users drop <name>.json here (write elsewhere, then rename in)
  control/            <job-id>.pause | .resume | .cancel
  jobs/<job-id>/      job.json (as dropped), events.jsonl, checkpoints/, model/, worker.log, lock
  rejected/           what could not be accepted, each with <name>.error.json saying why
  daemon.jsonl        the daemon's own log
  daemon.lock         flock: one daemon per spool
```

Claiming is a rename: a valid file moves to jobs/<id>/job.json, then `job_accepted` is
appended. A crash between the two leaves a job folder with a job.json and no events; startup
finishes the acceptance (`recover_acceptances`). Nothing is picked up twice or lost.
"""
import errno
import fcntl
import hashlib
import itertools
import os
import re
import shutil
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import orjson

from . import faults, foldcache
from . import spec as specs
from .errors import BadJobFile, LogCorrupt, SpoolLocked
from .eventlog import EventLog, read_log, utc_now
from .events import JobAccepted
from .fsutil import atomic_write_bytes, fsync_dir, pid_alive, remove_stale_temps
from .replay import JobState

VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
ACCEPTING_MARKER = ".accepting"      # holds the source file name while a claim is under way
QUIET_SECONDS = 2.0                  # a file written in place is taken once untouched this long
FOLDER_MODES = {"incoming": 0o2770, "control": 0o2770, "jobs": 0o2750, "rejected": 0o2750}


@dataclass(frozen=True)
class Spool:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(os.path.abspath(self.root)))

    incoming = property(lambda self: self.root / "incoming")
    control = property(lambda self: self.root / "control")
    jobs = property(lambda self: self.root / "jobs")
    rejected = property(lambda self: self.root / "rejected")
    daemon_log = property(lambda self: self.root / "daemon.jsonl")
    lock_file = property(lambda self: self.root / "daemon.lock")

    def ensure(self) -> None:
        """Create the layout. incoming/ and control/ are group-writable (setgid) so a group of
        submitters can drop files; job folders are readable by the group, writable by us only."""
        for name, mode in FOLDER_MODES.items():
            path = self.root / name
            if not path.exists():
                path.mkdir(parents=True)
                os.chmod(path, mode)

    def job_dir(self, job_id: str) -> Path:
        if not VALID_ID.match(job_id):
            raise ValueError(f"invalid job id {job_id!r}")
        return self.jobs / job_id

    def in_incoming(self, job_id: str) -> bool:
        """incoming/<job_id>.json is a file (never followed) the daemon has yet to take or reject."""
        try:
            return stat.S_ISREG((self.incoming / f"{job_id}.json").lstat().st_mode)
        except FileNotFoundError:
            return False

    def events_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "events.jsonl"

    def stream_dir(self, job_id: str) -> Path:
        """A streaming job's encoded rows (a cache: rebuilt from the data when missing)."""
        return self.job_dir(job_id) / "stream"

    def drop_stream_cache(self, job_id: str) -> bool:
        """Remove a streaming job's cache (once it has ended: it can be as big as its data)."""
        folder = self.stream_dir(job_id)
        if not folder.is_dir():
            return False
        shutil.rmtree(folder, ignore_errors=True)
        return True

    def job_ids(self) -> list[str]:
        try:
            names = os.listdir(self.jobs)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if VALID_ID.match(n) and (self.jobs / n).is_dir())

    def state(self, job_id: str) -> JobState:
        return foldcache.replay(self.events_path(job_id))


# ------------------------------------------------------------------ locks

class FileLock:
    """An flock on a file. Held by the worker for its whole life (and by the daemon for a short
    write when no worker holds the job); the kernel drops it when the holder dies, which is how a
    restarted daemon tells a live orphan worker from a dead one."""

    def __init__(self, path: Path):
        self.path, self.fd = Path(path), -1

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1

    @property
    def held(self) -> bool:
        return self.fd >= 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def job_lock(spool: Spool, job_id: str) -> FileLock:
    return FileLock(spool.job_dir(job_id) / "lock")


def lock_spool(spool: Spool) -> FileLock:
    lock = FileLock(spool.lock_file)
    if not lock.acquire():
        holder = spool.lock_file.read_text(errors="replace").strip() or "another process"
        raise SpoolLocked(f"spool {spool.root} is already served by {holder} (daemon.lock is "
                          "held). Stop that daemon first, or start this one with another --spool.")
    os.ftruncate(lock.fd, 0)
    os.write(lock.fd, f"epochd pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return lock


def daemon_serving(spool: Spool) -> bool | None:
    """Whether a daemon holds this spool's daemon.lock, read from /proc/locks: None where that
    cannot be told. It looks without trying the lock itself, which would make a daemon
    starting at that moment exit as if another one served the spool.

    A lock on the file's device and inode says yes. So does any lock held by the pid the file
    names (`epochd pid N on HOST`, written by the daemon that holds it), for filesystems such
    as overlayfs whose locks /proc/locks lists under another device and inode."""
    try:
        st = spool.lock_file.stat()
    except FileNotFoundError:
        return False  # no daemon has ever served it
    except OSError:
        return None
    try:
        holder = spool.lock_file.read_text(errors="replace").split()
    except OSError:  # not readable by this user (it is the service user's): the lock alone tells
        holder = []
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    here = len(holder) == 5 and holder[4] == socket.gethostname()
    pid = holder[2] if here and holder[2].isdigit() else None
    try:
        with open("/proc/locks") as f:
            # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2297168 0 EOF"; "1: -> FLOCK ..." waits
            for fields in (line.split() for line in f):
                if len(fields) > 5 and fields[1] == "FLOCK" and (fields[5] == key or fields[4] == pid):
                    return True
    except OSError:
        return None
    # no lock seen: nobody serves it, unless the daemon that last wrote the file runs elsewhere
    # (or, where the file could not be read, under a filesystem that lists its lock otherwise)
    return False if here else None


def daemon_log_backwards(spool: Spool, *marks: bytes, block: int = 1 << 20):
    """The entries of daemon.jsonl from the last one back, read from the file's end a block at
    a time (the log grows by job); only lines holding one of `marks` are parsed, if any given."""
    try:
        f = open(spool.daemon_log, "rb")
    except OSError:  # none yet, or not this user's to read
        return
    with f:
        end = f.seek(0, os.SEEK_END)
        rest = b""  # the start of a line cut by the block boundary
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start) + rest
            lines = chunk.split(b"\n")
            rest, lines = (lines[0], lines[1:]) if start > 0 else (b"", lines)
            for line in reversed(lines):
                if not line or (marks and not any(m in line for m in marks)):
                    continue
                try:
                    entry = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(entry, dict):
                    yield entry
            end = start


def last_daemon_start(spool: Spool, block: int = 1 << 20) -> dict | None:
    """The last `started` line of daemon.jsonl (the daemon's options: base_dir, allow_roots,
    max_jobs, gpus, max_retries)."""
    for entry in daemon_log_backwards(spool, b'"started"', block=block):
        if entry.get("event") == "started":
            return entry
    return None


def live_worker(spool: Spool, job_id: str, block: int = 1 << 20) -> dict | None:
    """The `worker_started` entry of the job's worker if the serving daemon started one that has
    not exited (daemon.jsonl since the daemon's last start), with its pid still alive."""
    quoted = orjson.dumps(job_id)
    for entry in daemon_log_backwards(spool, b'"started"', quoted, block=block):
        event = entry.get("event")
        if event == "started":
            return None  # before this daemon: its own workers are the ones it logged since
        if entry.get("job_id") != job_id or event not in ("worker_started", "worker_exited"):
            continue
        if event == "worker_exited" or not isinstance(entry.get("pid"), int):
            return None
        return entry if pid_alive(entry["pid"]) else None
    return None


# ------------------------------------------------------------------ the daemon's own log

def shown_name(name: str) -> str:
    """A file name as JSON and people can have it. A name that is not UTF-8 (a Latin-1 name from
    a Windows share) comes from os.listdir with its odd bytes as lone surrogates, which no UTF-8
    text may hold: they are shown escaped, "caf\\xe9.json"."""
    try:
        name.encode()
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def _printable(value):
    """`value` with every text fit for UTF-8 (lone surrogates escaped), for daemon_log's fallback."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode()
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_printable(v) for v in value]
    return value


def daemon_log(spool: Spool, event: str, **fields) -> None:
    """One JSON line in daemon.jsonl: started, stopped, accepted, rejected, ..."""
    entry = {"ts": utc_now(), "event": event, **fields}
    try:
        line = orjson.dumps(entry, default=str) + b"\n"
    except TypeError:  # text no UTF-8 may hold, from a name or an error: escaped, never a crash
        line = orjson.dumps(_printable(entry), default=str) + b"\n"
    fd = os.open(spool.daemon_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ job ids

def sanitise(stem: str) -> str:
    # "my job (1)" -> "my-job-1": no separator left dangling at either end
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).lstrip("._-")[:60].rstrip("._-")
    return cleaned or "job"


def allocate_id(stem: str, spool: Spool) -> str:
    """The file's stem when it is a valid, free id; else a sanitised stem, then -2, -3, ..."""
    base = stem if VALID_ID.match(stem) else sanitise(stem)
    if not (spool.jobs / base).exists():
        return base
    for n in itertools.count(2):
        candidate = f"{base[:60]}-{n}"
        if not (spool.jobs / candidate).exists():
            return candidate
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ incoming files

def is_candidate(name: str) -> bool:
    """Only *.json counts; dotfiles and temp files are someone's work in progress."""
    return name.endswith(".json") and not name.startswith(".") and not name.endswith(".tmp")


def read_dropped(path: Path, limit: int = specs.MAX_JOB_FILE_BYTES, what: str = "job file") -> bytes:
    """The bytes of a dropped regular file, never following a link or blocking on a FIFO."""
    st = os.lstat(path)
    kind = _kind(st.st_mode)
    if kind != "regular file":
        raise BadJobFile([f"{path.name} is a {kind}, not a regular file. Expected: a {what} "
                          "written elsewhere and renamed in."])
    if st.st_nlink > 1:
        raise BadJobFile([f"{path.name} has {st.st_nlink} hard links. Expected: a file of its own; "
                          "copy it instead of linking it."])
    if st.st_size > limit:
        raise BadJobFile([f"the file is {st.st_size:,} bytes. Expected: a {what} under "
                          f"{limit:,} bytes."])
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between lstat and open
            raise BadJobFile([f"{path.name} changed into a non-regular file while being read."])
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISLNK, "symbolic link"),
                       (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"), (stat.S_ISBLK, "device")):
        if test(mode):
            return name
    return "special file"


@dataclass(frozen=True)
class Settings:
    """What acceptance needs to know about the daemon: where relative paths start, where job
    files may read and write."""
    base_dir: Path
    allow_roots: tuple[Path, ...] = ()


def accept(spool: Spool, name: str, settings: Settings) -> str:
    """Validate incoming/<name> and claim it. Returns the job id; raises BadJobFile."""
    path = spool.incoming / name
    data = read_dropped(path)
    spec = specs.validate(specs.parse_job_bytes(data))
    job_id = allocate_id(Path(name).stem, spool)
    normalised = specs.normalise(spec, job_id=job_id, base_dir=settings.base_dir,
                                 spool_root=spool.root, allow_roots=list(settings.allow_roots))
    job_dir = spool.job_dir(job_id)
    job_dir.mkdir()
    atomic_write_bytes(job_dir / ACCEPTING_MARKER, os.fsencode(name))  # the name's bytes, as they are
    os.rename(path, job_dir / "job.json")
    fsync_dir(spool.incoming)
    fsync_dir(job_dir)
    faults.point("accept.claimed")
    if (job_dir / "job.json").read_bytes() != data:  # rewritten between our read and the rename
        _unclaim(spool, job_id, name)
        raise BadJobFile(["the file changed while it was being accepted. Expected: a complete "
                          "file, written elsewhere and renamed into incoming/."])
    record_acceptance(spool, job_id, name, data, normalised)
    return job_id


def _unclaim(spool: Spool, job_id: str, name: str) -> None:
    job_dir = spool.job_dir(job_id)
    os.rename(job_dir / "job.json", spool.incoming / name)
    (job_dir / ACCEPTING_MARKER).unlink(missing_ok=True)
    job_dir.rmdir()


def record_acceptance(spool: Spool, job_id: str, source: str | None, data: bytes,
                      normalised: dict, recovered: bool = False) -> None:
    job_dir = spool.job_dir(job_id)
    lock = job_lock(spool, job_id)
    if not lock.acquire():
        raise RuntimeError(f"job {job_id} is locked during its own acceptance")
    with lock, EventLog(job_dir / "events.jsonl") as log:
        log.append(JobAccepted(job_id=job_id, source_file=source and shown_name(source), spec=normalised,
                               spec_sha256=specs.spec_sha256(normalised),
                               file_sha256=hashlib.sha256(data).hexdigest(), recovered=recovered))
        faults.point("accept.recorded")
    (job_dir / ACCEPTING_MARKER).unlink(missing_ok=True)
    daemon_log(spool, "accepted", job_id=job_id, source_file=source and shown_name(source), recovered=recovered)


def reject(spool: Spool, folder: Path, name: str, errors: list[str], kind: str = "job file",
           what_next: str | None = None, as_name: str | None = None) -> Path:
    """Move folder/<name> into rejected/ (never following it) beside <stem>.error.json."""
    dest = _free_name(spool.rejected, as_name or name, kind == "job file")
    stem = dest.stem if kind == "job file" else dest.name
    report = {"file": shown_name(name), "kind": kind, "rejected_at": utc_now(), "errors": errors,
              "what_next": what_next or "fix the file and drop it into incoming/ again "
                                        "(epochd submit FILE does it safely)."}
    atomic_write_bytes(spool.rejected / f"{stem}.error.json",  # _printable: never a crash on odd text
                       orjson.dumps(_printable(report), option=orjson.OPT_INDENT_2) + b"\n")
    os.rename(folder / name, dest)
    fsync_dir(folder)
    fsync_dir(spool.rejected)
    daemon_log(spool, "rejected", file=shown_name(name), kind=kind,
               moved_to=f"rejected/{shown_name(dest.name)}", errors=errors)
    return dest


def _free_name(folder: Path, name: str, by_stem: bool = True) -> Path:
    """A name in `folder` that neither a file nor its error report uses: <stem>.error.json for
    a job file (`by_stem`), <name>.error.json for a control file (exp.pause beside exp.json)."""
    candidate = folder / name
    p = Path(name)
    for n in itertools.count(2):
        error_file = folder / f"{candidate.stem if by_stem else candidate.name}.error.json"
        if not os.path.lexists(candidate) and not error_file.exists():
            return candidate
        candidate = folder / f"{p.stem}-{n}{p.suffix}"
    raise AssertionError("unreachable")


def recover_acceptances(spool: Spool, settings: Settings) -> list[str]:
    """Finish claims a crash interrupted: a job folder with job.json but no events, or with only
    the torn first line of a `job_accepted` that never reached the disk whole."""
    finished = []
    for job_id in spool.job_ids():
        job_dir = spool.job_dir(job_id)
        marker = job_dir / ACCEPTING_MARKER
        events = spool.events_path(job_id)
        has_bytes = events.exists() and events.stat().st_size > 0
        if has_bytes and not marker.exists():
            continue  # the common case: accepted long ago
        if has_bytes:
            try:
                contents = read_log(events)
            except LogCorrupt:
                continue  # on record, damaged: the daemon quarantines it and says why
            if contents.records:  # accepted; the crash came before the marker was removed
                marker.unlink(missing_ok=True)
                continue
            # half a job_accepted, never acknowledged: nothing on record to keep
            daemon_log(spool, "acceptance_log_reset", job_id=job_id, torn_bytes=contents.torn_bytes,
                       preview=repr(contents.torn_preview))
            os.truncate(events, 0)
        source = os.fsdecode(marker.read_bytes()) if marker.exists() else None
        if not (job_dir / "job.json").exists():
            marker.unlink(missing_ok=True)  # crashed before the rename: the file is still in incoming/
            _remove_if_empty(job_dir)
            continue
        finished.append(_finish_claim(spool, job_id, source, settings))
    return [j for j in finished if j]


def _finish_claim(spool: Spool, job_id: str, source: str | None, settings: Settings) -> str | None:
    data = (spool.job_dir(job_id) / "job.json").read_bytes()
    try:
        spec = specs.validate(specs.parse_job_bytes(data))
        normalised = specs.normalise(spec, job_id=job_id, base_dir=settings.base_dir,
                                     spool_root=spool.root, allow_roots=list(settings.allow_roots))
    except BadJobFile as e:  # the settings changed while we were down: it is no longer valid
        reject(spool, spool.job_dir(job_id), "job.json", e.errors, as_name=source or f"{job_id}.json")
        (spool.job_dir(job_id) / ACCEPTING_MARKER).unlink(missing_ok=True)
        _remove_if_empty(spool.job_dir(job_id))
        return None
    record_acceptance(spool, job_id, source, data, normalised, recovered=True)
    return job_id


def _remove_if_empty(folder: Path) -> None:
    remove_stale_temps(folder)  # the acceptance marker's, if the crash came mid-write
    for leftover in ("events.jsonl", "lock"):
        p = folder / leftover
        if p.exists() and p.stat().st_size == 0:
            p.unlink()
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty: leave it for a human rather than delete what we did not expect
