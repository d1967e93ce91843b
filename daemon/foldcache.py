"""Replay of a job's log from a cached fold of its prefix: a long log is folded once, not on
every restart.

`jobs/<id>/.fold-cache` holds the folded `JobState` of the log's first `offset` bytes together
with their CRC-32. The log is append-only, so while those bytes are unchanged the fold of the
whole log is the cached state with the records after `offset` applied. The check is one
`zlib.crc32` over the prefix (C speed, ~0.1 s for 200 MB); any difference, a damaged or foreign
cache, or a state folded by other code and the log is replayed in full, which also reports
corruption exactly as before. The cache is never the truth: deleting it is always safe.

"Other code" is a digest of the three modules whose code decides the folded state (the fold,
the events' upcasters, the log reader), not epochd's version: an upgrade that leaves them alone
keeps every cache, so a restart after it does not replay each long log in full.
"""
import dataclasses
import hashlib
import os
import zlib
from pathlib import Path

import orjson

from . import __version__, eventlog, events, replay as replay_module
from .eventlog import parse_log
from .replay import JobState, Status, apply, fold

CACHE_NAME = ".fold-cache"
MIN_CACHED_BYTES = 1 << 20   # smaller logs fold in milliseconds: no cache file for them
_LAYOUT = [f.name for f in dataclasses.fields(JobState)]


def _fold_code() -> str:
    """A digest of the source of the modules the folded state depends on; the version where a
    source file cannot be read (an install without .py files)."""
    digest = hashlib.sha256()
    for module in (replay_module, events, eventlog):
        try:
            digest.update(Path(module.__file__).read_bytes())
        except (OSError, TypeError):
            return f"version {__version__}"
    return digest.hexdigest()


FOLD_CODE = _fold_code()


def replay(path: Path) -> JobState:
    """fold(read_records(path)), from the cache where it still applies. Raises LogCorrupt."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return fold([])
    cache_path = path.parent / CACHE_NAME
    state, offset, seq = _load(cache_path, data)
    if state is None:
        contents = parse_log(data, path, foldable=True)
        state = fold(contents.records)
    else:
        contents = parse_log(data[offset:], path, foldable=True, first_seq=seq + 1)
        for record in contents.records:
            apply(state, record)
        contents.good_bytes += offset
    if contents.good_bytes - offset >= MIN_CACHED_BYTES:
        end = contents.good_bytes
        _store(cache_path, state, end, zlib.crc32(memoryview(data)[:end]))
    return state


def store(log_path: Path, state: JobState, offset: int, crc: int) -> None:
    """Cache `state`, the fold of the log's first `offset` bytes (CRC-32 `crc`): the writer of
    a long run calls it now and then, so a replay after a crash folds only the rest."""
    _store(Path(log_path).parent / CACHE_NAME, state, offset, crc)


def _load(cache_path: Path, data: bytes) -> tuple[JobState | None, int, int]:
    try:
        cache = orjson.loads(cache_path.read_bytes())
        offset = cache["offset"]
        if (cache["fold_code"] != FOLD_CODE or cache["layout"] != _LAYOUT or offset > len(data)
                or zlib.crc32(memoryview(data)[:offset]) != cache["crc"]):
            return None, 0, 0
        state = JobState(**cache["state"])
        state.status = None if state.status is None else Status(state.status)
        state.position = tuple(state.position)
        return state, offset, state.last_seq
    except (OSError, ValueError, KeyError, TypeError):  # missing, torn, foreign: replay in full
        return None, 0, 0


def _store(cache_path: Path, state: JobState, offset: int, crc: int) -> None:
    body = orjson.dumps({"fold_code": FOLD_CODE, "layout": _LAYOUT, "offset": offset,
                         "crc": crc, "state": state})
    tmp = cache_path.with_name(f"{CACHE_NAME}.{os.getpid()}.tmp")
    try:  # no fsync: a cache lost to a power cut costs one full replay
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with open(fd, "wb") as f:
            f.write(body)
        os.replace(tmp, cache_path)
    except OSError:  # a read-only reader (epochd status as another user): no cache, no error
        tmp.unlink(missing_ok=True)
