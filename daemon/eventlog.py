"""The append-only JSONL event log of one job: the truth from which its state is folded.

Line format: the event's JSON object whose last key is `crc`, the CRC-32 (8 hex digits) of the
line's own bytes with the `crc` member removed, so a damaged line is detected rather than
guessed. Reading stops before a torn tail (a crash mid-append: a last stretch that lacks its
newline or does not check out, with no valid line after it); the next writer truncates it away
and records that it did (`log_repaired`). A bad line followed by valid ones is corruption:
`LogCorrupt`, never repaired silently.

One writer at a time: callers hold the job's lock (see `spool.JobLock`) while an `EventLog` is
open for appending.
"""
import errno
import os
import signal
import sys
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable
from typing import BinaryIO

import orjson

from . import faults
from .errors import LogCorrupt
from .events import Event, LogRepaired, upcast
from .replay import SEES_PREVIOUS_RECORD

CRC_PREFIX = b',"crc":"'
CRC_SUFFIX_LEN = len(CRC_PREFIX) + 8 + 2  # ,"crc":"xxxxxxxx"}
CRC_TAIL = CRC_PREFIX + b'%08x"}'          # what a line with that CRC-32 ends with


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode(seq: int, ts: str, event: Event) -> bytes:
    body = orjson.dumps({"seq": seq, "ts": ts, "type": event.type, "v": event.v,
                         **event.payload()})
    crc = zlib.crc32(body)
    return b"%s%s%08x\"}\n" % (body[:-1], CRC_PREFIX, crc)


def decode(line: bytes) -> dict | None:
    """The record a line holds, or None when its checksum or JSON does not check out."""
    if len(line) < CRC_SUFFIX_LEN or line[-CRC_SUFFIX_LEN:-10] != CRC_PREFIX:
        return None
    body = line[:-CRC_SUFFIX_LEN] + b"}"
    try:
        if int(line[-10:-2], 16) != zlib.crc32(body):
            return None
        record = orjson.loads(body)
    except ValueError:  # orjson.JSONDecodeError is a ValueError, as is a bad hex digit
        return None
    return record if isinstance(record, dict) else None


@dataclass
class LogContents:
    records: list[dict]
    good_bytes: int       # length of the valid prefix
    torn_bytes: int       # bytes after it: a torn tail, cut by the next writer
    torn_preview: bytes
    last_seq: int = 0     # seq of the last valid record (records may leave progress out)


def read_log(path: Path, foldable: bool = False) -> LogContents:
    """All valid records of a log, upcast to current versions. Raises LogCorrupt.

    `foldable`: leave out each `progress` record that a later `progress` supersedes, keeping
    those just before a record whose fold reads the one before it (`SEES_PREVIOUS_RECORD`).
    `fold` keeps only the latest position, so its result is the same, and a long log is mostly
    progress: the left-out lines are checked (checksum, seq) but not parsed.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return LogContents([], 0, 0, b"")
    return parse_log(data, path, foldable)


PROGRESS_TYPE = b'"type":"progress"'  # `encode` writes seq, ts, type first: within 80 bytes


def _checked_seq(line: bytes) -> int | None:
    """The seq of a line whose checksum checks out, read without parsing the JSON; else None."""
    if len(line) < CRC_SUFFIX_LEN or line[-CRC_SUFFIX_LEN:-10] != CRC_PREFIX or not line.startswith(b'{"seq":'):
        return None
    try:
        if int(line[-10:-2], 16) != zlib.crc32(line[:-CRC_SUFFIX_LEN] + b"}"):
            return None
        return int(line[7:line.index(b",", 7)])
    except ValueError:
        return None


PARALLEL_MIN_BYTES = 32 << 20  # ~160,000 lines, ~0.3 s alone: less is not worth a process
PARALLEL_CHUNK_BYTES = 16 << 20
MAX_PARSERS = 8
BLOCK_BYTES = 1 << 20


def parse_log(data: bytes, path="<log>", foldable: bool = False, first_seq: int = 1) -> LogContents:
    """`data` is a whole log, or the rest of one from the start of the line with `first_seq`.

    A long log read for a fold is checked in pieces by forked processes side by side (see
    `_parse_in_parallel`); anything unusual there and it is read here, one line after another,
    which is also what says exactly where a damaged log goes wrong."""
    if foldable and len(data) >= PARALLEL_MIN_BYTES:
        contents = _parse_in_parallel(data, first_seq)
        if contents is not None:
            return contents
    return _parse(data, path, foldable, first_seq)


def _parsers(size: int) -> int:
    """How many processes check a log of `size` bytes: one per CPU this process may run on."""
    if sys.platform != "linux":  # fork without exec is Linux-only here (macOS frameworks break)
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), size // PARALLEL_CHUNK_BYTES, MAX_PARSERS))


def _parse_in_parallel(data: bytes, first_seq: int) -> LogContents | None:
    """`_parse(data, foldable=True)` with the log cut at line ends into one piece per CPU: this
    process checks the first, forked children the others (copy-on-write: nothing is copied or
    read again), each sending back its records as JSON. A cold replay of a 1,000,000-event log
    is then bound by the slowest piece, not their sum. None when there is one CPU, or when a
    piece is not plainly sound (a bad line, a seq that does not follow on from the piece
    before, a child that failed): the caller then reads the log in one piece.

    Forking a process that has threads (the daemon's watchdog) is safe here because the child
    takes no lock: it slices bytes, runs zlib and orjson, writes a pipe and `_exit`s."""
    n = _parsers(len(data))
    cuts = [0]
    for k in range(1, n):
        cut = data.find(b"\n", len(data) * k // n) + 1
        if cut <= cuts[-1] or cut >= len(data):
            break
        cuts.append(cut)
    if len(cuts) < 2:
        return None
    cuts.append(len(data))
    children = []
    try:
        for start, end in zip(cuts[1:-1], cuts[2:]):
            try:
                children.append(_fork_parser(data, start, end))
            except OSError:  # no process to be had (EAGAIN, ENOMEM): one piece, then
                return None
        try:
            first = _parse(data, foldable=True, first_seq=first_seq, end=cuts[1])
        except LogCorrupt:
            return None
        if first.torn_bytes:  # a bad line before the next piece's: corruption, said exactly by _parse
            return None
        records, due = first.records, first.last_seq + 1
        for i, (pid, reader) in enumerate(children):
            reply = reader.read()
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:  # reaped by someone else: its status is unknown
                status = -1
            children[i] = (0, reader)
            if status != 0 or not reply:
                return None
            seq, last_seq, good, torn, piece = orjson.loads(reply)
            if seq != due or (torn and i < len(children) - 1):
                return None
            records += piece
            due = last_seq + 1
        good_end = cuts[-2] + good
        return LogContents(records, good_end, len(data) - good_end,
                           data[good_end:good_end + 64], due - 1)
    finally:
        for pid, reader in children:
            reader.close()
            if pid:  # not collected: the parent gave up early
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass


def _fork_parser(data: bytes, start: int, end: int) -> tuple[int, BinaryIO]:
    """A child checking `data[start:end]`, which begins a line; (pid, read end of its pipe)."""
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        raise
    if pid:
        os.close(w)
        return pid, open(r, "rb")
    code = 1
    try:  # the child: never back into the caller's code, whatever happens
        os.close(r)
        for sig in (signal.SIGINT, signal.SIGTERM):  # a shutdown: finish the second's work
            signal.signal(sig, signal.SIG_IGN)
        first_line_end = data.find(b"\n", start, end)
        seq = None if first_line_end < 0 else _checked_seq(data[start:first_line_end])
        if seq is not None:
            c = _parse(data, foldable=True, first_seq=seq, start=start, end=end)
            reply = orjson.dumps([seq, c.last_seq, c.good_bytes, c.torn_bytes, c.records])
            with open(w, "wb") as f:
                f.write(reply)
            code = 0
    except BaseException:  # LogCorrupt and the like: the parent reads the log in one piece
        pass
    finally:
        os._exit(code)


def _parse(data: bytes, path="<log>", foldable: bool = False, first_seq: int = 1,
           start: int = 0, end: int | None = None) -> LogContents:
    """`parse_log` of `data[start:end]`, without copying it.

    Every line up to the first bad one checks out, and line n of a log carries seq n, so the
    line an error names is the seq that was due there: its line in the whole log, also when
    `data` is the rest of a log after a cached prefix."""
    end = len(data) if end is None else end
    records: list[dict] = []
    due = first_seq  # the seq the next valid line must carry
    bad_at: tuple[int, str] | None = None  # the first line that does not check out, and why
    held = None      # foldable: the latest checked progress line, parsed once it is not superseded
    last_held = None  # foldable: (index, line) of the last progress line behind other records
    crc32, find, suffix, tail = zlib.crc32, PROGRESS_TYPE if foldable else None, CRC_SUFFIX_LEN, CRC_TAIL
    # what follows the last newline is at best a torn append
    lines_end = data.rfind(b"\n", start, end) + 1 or start
    blocks = []  # (first line number, offset) of each block: where a torn tail begins
    whole = 0    # whole lines seen
    pos = start
    while pos < lines_end:
        # a block of lines at a time, not a list of every line: the memory of one block's lines
        # is reused by the next, which halves the cost of splitting a long log
        stop = data.find(b"\n", pos + BLOCK_BYTES, lines_end) + 1 or lines_end
        blocks.append((whole + 1, pos))
        lines = data[pos:stop - 1].split(b"\n")
        pos, whole = stop, whole + len(lines)
        rest = iter(lines)
        if bad_at is None:
            for line in rest:
                if find and line.find(find, 0, 80) > 0:
                    # the hot path of a long log, inlined: checksum and seq without parsing JSON
                    if (line.startswith(b'{"seq":%d,' % due)
                            and line.endswith(tail % crc32(b"}", crc32(line[:-suffix])))):
                        held = line
                        due += 1
                        continue
                    seq = _checked_seq(line)  # slow path: say exactly what is wrong
                    if seq is not None:
                        raise LogCorrupt(path, due, f"seq {seq} where {due} was due (lost or repeated events)")
                record = decode(line)
                if record is None:
                    bad_at = (due, "checksum or JSON does not check out")
                    break
                if record.get("seq") != due:
                    raise LogCorrupt(path, due, f"seq {record.get('seq')!r} where "
                                                f"{due} was due (lost or repeated events)")
                if held is not None:
                    if record["type"] in SEES_PREVIOUS_RECORD:
                        records.append(upcast(decode(held)))
                        last_held = None
                    else:  # kept only if no later progress supersedes it
                        last_held = (len(records), held)
                    held = None
                records.append(upcast(record))
                due += 1
        for line in rest:  # after a bad line nothing may check out: it is a torn tail, or damage
            if decode(line) is not None:
                raise LogCorrupt(path, *bad_at)
    if held is not None:
        records.append(upcast(decode(held)))
    elif last_held is not None:  # the log's last progress, in its place
        records.insert(last_held[0], upcast(decode(last_held[1])))
    good = due - first_seq  # lines that check out: the valid prefix
    if good == whole:
        good_end = lines_end
    else:  # a bad line then nothing after it (a torn tail): up to the end of the last good line
        first, offset = next(b for b in reversed(blocks) if b[0] <= good + 1)
        lines = data[offset:lines_end].split(b"\n", good + 1 - first)
        good_end = offset + sum(map(len, lines[:good + 1 - first])) + good + 1 - first
    return LogContents(records, good_end - start, end - good_end,
                       data[good_end:min(good_end + 64, end)], due - 1)


def read_records(path: Path) -> list[dict]:
    return read_log(path).records


def read_foldable(path: Path) -> list[dict]:
    """What `fold` needs of a log (see `read_log`): the daemon's and the CLI's replay."""
    return read_log(path, foldable=True).records


class EventLog:
    """Appends events to one job's log; each append is one write plus fsync.

    fsync every event: an epoch is minutes of work, and ~0.25 ms per event is nothing beside it.
    """

    def __init__(self, path: Path, clock: Callable[[], str] = utc_now):
        self.path = Path(path)
        self.clock = clock
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        contents = parse_log(data, self.path, foldable=True)
        self.records = contents.records   # foldable: superseded progress records left out
        self.last_seq = contents.last_seq
        # the valid log's length and CRC-32, kept up to date: a fold cache can be written
        # without reading the file again (see foldcache)
        self.offset, self.crc = contents.good_bytes, zlib.crc32(memoryview(data)[:contents.good_bytes])
        del data
        self.broken: OSError | None = None
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        if contents.torn_bytes:
            self._cut_torn_tail(contents)

    def _cut_torn_tail(self, contents: LogContents) -> None:
        os.ftruncate(self.fd, contents.good_bytes)
        os.fsync(self.fd)
        self.append(LogRepaired(
            truncated_bytes=contents.torn_bytes,
            reason="torn last write (a crash mid-append) cut away before appending",
            tail_preview=repr(contents.torn_preview)))

    @property
    def next_seq(self) -> int:
        return self.last_seq + 1

    def append(self, event: Event) -> dict:
        if self.broken is not None:
            raise OSError(errno.EIO, f"{self.path}: an earlier write or fsync failed ({self.broken}); "
                                     "this writer appends nothing more", str(self.path))
        line = encode(self.next_seq, self.clock(), event)
        if faults.armed("append.torn"):
            os.write(self.fd, line[:len(line) // 2])
            faults.die()
        try:
            written = os.write(self.fd, line)
            if written != len(line):
                # a short write leaves a torn tail: the next writer cuts it
                raise OSError(errno.EIO, f"short write to {self.path}: {written} of {len(line)} bytes")
            faults.point("append.unsynced")
            os.fsync(self.fd)
        except OSError as e:
            # after a failed write or fsync the file's state is unknown (the line may be in it
            # or not, the kernel may have dropped dirty pages): never retry, never go on as if
            # it were written. The next writer reads what is really there.
            self.broken = e
            raise
        record = decode(line[:-1])
        self.records.append(record)
        self.last_seq += 1
        self.offset, self.crc = self.offset + len(line), zlib.crc32(line, self.crc)
        return record

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LogFollower:
    """Reads records appended since the last call (`epochd tail -f`). It keeps the offset where
    its first incomplete line starts and rereads from there, so a torn tail that a writer cut
    and wrote over is read afresh; if the file shrank further, it starts over and skips the
    records it has already returned.

    `latest_progress_only`: of the progress lines read in one call, return only one that is the
    last line read; the others are skipped without being decoded. A display that overwrites its
    progress line shows nothing else of them, and a long log is mostly progress: catching up
    on a 1,000,000-event log takes 1.1 s rather than 2.6 s."""

    def __init__(self, path: Path, latest_progress_only: bool = False):
        self.path, self.line_start, self.last_seq = Path(path), 0, 0
        self.skip = PROGRESS_TYPE if latest_progress_only else None

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self.line_start:
                    self.line_start = 0
                f.seek(self.line_start)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[:data.rfind(b"\n") + 1]
        self.line_start += len(complete)
        records, skip = [], self.skip
        lines = complete.split(b"\n")
        last = len(lines) - 2
        for i, line in enumerate(lines[:-1]):
            if skip and i < last and line.find(skip, 0, 80) > 0:
                continue
            record = decode(line)
            if record is not None and record["seq"] > self.last_seq:
                self.last_seq = record["seq"]
                records.append(upcast(record))
        return records
