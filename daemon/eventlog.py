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
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable

import orjson

from . import faults
from .errors import LogCorrupt
from .events import Event, LogRepaired, upcast

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

    `foldable`: leave out each `progress` record that the very next record, also a `progress`,
    supersedes. `fold` keeps only the latest position, so its result is the same, and a long
    log is mostly progress: the left-out lines are checked (checksum, seq) but not parsed.
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


def parse_log(data: bytes, path="<log>", foldable: bool = False, first_seq: int = 1) -> LogContents:
    """`data` is a whole log, or the rest of one from the start of the line with `first_seq`."""
    records: list[dict] = []
    good = 0  # lines that check out so far: the valid prefix is lines[:good]
    first_bad: tuple[int, str] | None = None
    due = first_seq  # the seq the next valid line must carry
    held = None      # foldable: the latest checked progress line, parsed once it is not superseded
    lines = data.split(b"\n")
    crc32, find, suffix, tail = zlib.crc32, PROGRESS_TYPE, CRC_SUFFIX_LEN, CRC_TAIL
    # the piece after the last newline is unterminated: at best a torn append
    for line_no, line in enumerate(lines[:-1], start=1):
        if foldable and line.find(find, 0, 80) > 0:
            # the hot path of a long log, inlined: checksum and seq without parsing the JSON
            if (first_bad is None and line.startswith(b'{"seq":%d,' % due)
                    and line.endswith(tail % crc32(b"}", crc32(line[:-suffix])))):
                held, due, good = line, due + 1, line_no
                continue
            seq = _checked_seq(line)  # slow path: say exactly what is wrong
            if seq is not None:
                if first_bad is not None:
                    raise LogCorrupt(path, first_bad[0], first_bad[1])
                raise LogCorrupt(path, line_no, f"seq {seq} where {due} was due (lost or repeated events)")
        if held is not None:
            records.append(upcast(decode(held)))
            held = None
        record = decode(line)
        if record is None:
            first_bad = first_bad or (line_no, "checksum or JSON does not check out")
            continue
        if first_bad is not None:
            raise LogCorrupt(path, first_bad[0], first_bad[1])
        if record.get("seq") != due:
            raise LogCorrupt(path, line_no, f"seq {record.get('seq')!r} where "
                                            f"{due} was due (lost or repeated events)")
        records.append(upcast(record))
        due, good = due + 1, line_no
    if held is not None:
        records.append(upcast(decode(held)))
    if good == len(lines) - 1:  # every whole line: all but the unterminated piece
        good_end = len(data) - len(lines[-1])
    else:  # a bad line then nothing after it (a torn tail): up to the last good line
        good_end = sum(map(len, lines[:good])) + good
    return LogContents(records, good_end, len(data) - good_end, data[good_end:good_end + 64], due - 1)


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
    records it has already returned."""

    def __init__(self, path: Path):
        self.path, self.line_start, self.last_seq = Path(path), 0, 0

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
        records = []
        for line in complete.split(b"\n")[:-1]:
            record = decode(line)
            if record is not None and record["seq"] > self.last_seq:
                self.last_seq = record["seq"]
                records.append(upcast(record))
        return records
