"""Which data a run trained on: each data file's size, modification time and sha256, recorded
in `run_started` as `data`.

A checkpoint means something only on the rows it was trained on: the scaling, the categories,
the validation split and every epoch's order come from them. So before a job goes on from a
checkpoint its worker checks the files against the last record, before reading them (a
streaming job's encoded rows stay as they were). A file whose size and modification time are
as recorded is taken as unchanged without reading it; otherwise its sha256 decides, so that a
copy or a `touch` of the same bytes is no change. A changed file fails the job (retryable: put
the file back and resume it) instead of training the checkpoint's weights on other rows.

A first run hashes its files in a thread while the data is read (hashlib and pyarrow both let
go of the GIL), which costs about a second a gigabyte of CPU, and nothing on resume.
"""

import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from .fsutil import sha256_file

KEYS = ("train_data_path", "val_data_path")


def _stat(path: str) -> dict | None:
    try:
        st = os.stat(path)
    except OSError:  # missing or unreadable: reading the data says so, in its own words
        return None
    return {"path": str(Path(path).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def identify(spec: dict, recorded: dict | None = None, hash_files: bool = True) -> dict:
    """key -> {path, bytes, mtime_ns, sha256} for each data file of the job. A file whose size
    and modification time match `recorded` keeps its recorded sha256 unread; `hash_files`
    False leaves the others' sha256 None."""
    found = {}
    for key in KEYS:
        if not spec.get(key) or (now := _stat(spec[key])) is None:
            continue
        then = (recorded or {}).get(key) or {}
        if then.get("sha256") and (then["bytes"], then["mtime_ns"]) == (now["bytes"], now["mtime_ns"]):
            now["sha256"] = then["sha256"]
        else:
            now["sha256"] = _sha256(spec[key]) if hash_files else None
        found[key] = now
    return found


def _sha256(path: str) -> str | None:
    try:
        return sha256_file(Path(path))
    except OSError:
        return None


class Identifying:
    """`identify` in a thread, for a first run to hash its files while it reads them."""

    def __init__(self, spec: dict, hash_files: bool = True):
        self._result: dict = {}
        self._thread = threading.Thread(target=self._run, args=(spec, hash_files),
                                        name="epochd-hash-data", daemon=True)
        self._thread.start()

    def _run(self, spec: dict, hash_files: bool) -> None:
        self._result = identify(spec, hash_files=hash_files)

    def result(self) -> dict:
        self._thread.join()
        return self._result


def changes(recorded: dict, current: dict) -> list[str]:
    """One sentence for each data file whose bytes differ from the recorded ones (a file now
    missing is left to the data reader's error)."""
    found = []
    for key in KEYS:
        then, now = recorded.get(key), current.get(key)
        if not then or not now or not then.get("sha256") or not now["sha256"] \
                or then["sha256"] == now["sha256"]:
            continue
        moved = "" if then["path"] == now["path"] else f' (then {then["path"]}, now {now["path"]})'
        found.append(
            f'{key} "{now["path"]}" is not the file the run began with{moved}: then '
            f'{then["bytes"]:,} bytes modified {_when(then["mtime_ns"])}, sha256 '
            f'{then["sha256"][:12]}; now {now["bytes"]:,} bytes modified {_when(now["mtime_ns"])}, '
            f'sha256 {(now["sha256"] or "?")[:12]}')
    return found


def _when(mtime_ns: int) -> str:
    return datetime.fromtimestamp(mtime_ns / 1e9, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def check(state, current: dict | None = None) -> str | None:
    """Why a job (its folded `state`) cannot go on from its checkpoints with its data files as
    they are now (`current`, else identified here), or None."""
    recorded = (state.run or {}).get("data")
    if not (recorded and state.checkpoints):
        return None
    changed = changes(recorded, identify(state.spec, recorded) if current is None else current)
    if not changed:
        return None
    last = state.checkpoints[-1]
    return (f"the job's data changed since its checkpoints were made: {'; '.join(changed)}. The "
            f"checkpoints (the last at epoch {last['epoch']}, step {last['step']}) were trained on "
            "the rows as they were, and their scaling, validation split and epoch order come from "
            "those rows. Expected: the data the run began with. Put that file back, then "
            f'"epochd resume {state.job_id}" goes on from the last checkpoint; to train on the new '
            "data, submit the job again under another name (it starts from scratch).")
