"""Pause, resume and cancel requests: files named control/<job-id>.<action>.

A request is consumed by whoever holds the job's lock: the worker while it runs the job (it
looks between training steps, so a pause lands within about a second), the daemon otherwise.
Either way the request goes on record in the job's log (`control_received`) before the file is
removed, then it is acted on. A request that makes no sense (an unknown job, resuming a
completed one) goes to rejected/ with the reason; a repeat (pausing a paused job) is recorded
as harmless and consumed.
"""
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from . import faults
from .errors import BadJobFile
from .events import Cancelled, ControlReceived, Event, Paused, Resumed
from .fsutil import atomic_write_bytes
from .replay import JobState, Status
from .spool import VALID_ID, Spool, read_dropped, reject

ACTIONS = ("pause", "resume", "cancel")
MAX_CONTROL_BYTES = 64 * 1024


@dataclass(frozen=True)
class Request:
    job_id: str
    action: str
    path: Path

    @property
    def source(self) -> str:
        return f"control/{self.path.name}"


@dataclass(frozen=True)
class Decision:
    kind: str          # "act" | "repeat" | "reject"
    why: str = ""


def parse_name(name: str) -> tuple[str, str] | None:
    job_id, _, action = name.rpartition(".")
    if action in ACTIONS and VALID_ID.match(job_id):
        return job_id, action
    return None


def scan(spool: Spool) -> tuple[list[Request], list[str]]:
    """Requests in control/, oldest first, and the names that are not requests at all."""
    requests, strays = [], []
    try:
        entries = list(os.scandir(spool.control))
    except FileNotFoundError:
        return [], []
    for entry in sorted(entries, key=_mtime):
        if entry.name.startswith(".") or entry.name.endswith(".tmp") or entry.name == ".gitkeep":
            continue
        parsed = parse_name(entry.name)
        if parsed:
            requests.append(Request(parsed[0], parsed[1], Path(entry.path)))
        else:
            strays.append(entry.name)
    return requests, strays


def _mtime(entry: os.DirEntry) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return 0.0


def pending_for(spool: Spool, job_id: str) -> list[Request]:
    """The worker's between-steps check: three stat calls, a few microseconds."""
    found = [Request(job_id, a, spool.control / f"{job_id}.{a}") for a in ACTIONS]
    return sorted((r for r in found if os.path.lexists(r.path)), key=lambda r: os.lstat(r.path).st_mtime)


def read_reason(request: Request) -> str | None:
    """The optional {"reason": ...} a control file carries. Raises BadJobFile for a FIFO, link..."""
    data = read_dropped(request.path, limit=MAX_CONTROL_BYTES, what="control file")
    if not data.strip():
        return None
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode("utf-8", errors="replace").strip()[:500]
    if isinstance(body, dict) and body.get("reason") is not None:
        return str(body["reason"])[:500]
    return None


def retryable_failure(state: JobState) -> bool:
    """Failed for a cause outside the job (a full disk, an I/O error, memory): resumable."""
    return state.status == Status.FAILED and bool((state.last_error or {}).get("retryable"))


def decide(status: Status | None, action: str, retryable: bool = False) -> Decision:
    """What a request means for a job in `status` (pure). `retryable`: the job failed for a
    cause outside it (a full disk, an I/O error, memory): resume continues it."""
    if status is None:
        return Decision("reject", "the job has not been accepted yet")
    if status == Status.FAILED and retryable and action in ("resume", "cancel"):
        return Decision("act")
    if status in (Status.COMPLETED, Status.FAILED) or (
            status == Status.CANCELLED and action != "cancel"):
        return Decision("reject", f"the job is {status}; there is nothing to {action}. "
                                  'Submit it again to train it again ("epochd submit FILE").')
    match action, status:
        case ("pause", Status.PAUSED) | ("cancel", Status.CANCELLED):
            return Decision("repeat", f"already {status}")
        case ("resume", Status.RUNNING | Status.PENDING | Status.INTERRUPTED):
            return Decision("repeat", f"already {status}: not paused")
    return Decision("act")


def consume(spool: Spool, request: Request, status: Status | None,
            record: Callable[[Event], object], retryable: bool = False) -> tuple[Decision, str | None] | None:
    """Put a request on record (`control_received`) and remove its file, or move it to rejected/
    with the reason. Returns (decision, the user's reason) when it went on record. The caller
    holds the job's lock and acts on an "act" decision."""
    try:
        reason = read_reason(request)
    except BadJobFile as e:
        reject(spool, spool.control, request.path.name, e.errors, kind="control file")
        return None
    decision = decide(status, request.action, retryable)
    if decision.kind == "reject":
        reject(spool, spool.control, request.path.name, [decision.why], kind="control file",
               what_next=f'check "epochd status {request.job_id}"')
        return None
    record(received(request, reason, decision))
    faults.point("control.unconsumed")
    request.path.unlink(missing_ok=True)
    faults.point("control.unacted")
    return decision, reason


def received(request: Request, reason: str | None, decision: Decision) -> ControlReceived:
    outcome = "accepted" if decision.kind == "act" else decision.why
    return ControlReceived(action=request.action, source_file=request.source, reason=reason,
                           outcome=outcome)


def idle_outcome(state: JobState, action: str, reason: str | None) -> Event:
    """The event a request leads to when no worker holds the job (the daemon acts)."""
    epoch, step = state.position
    checkpoint = state.last_checkpoint["path"] if state.last_checkpoint else None
    match action:
        case "pause":
            return Paused(epoch=epoch, step=step, checkpoint=checkpoint)
        case "resume":
            return Resumed(epoch=epoch, step=step, checkpoint=checkpoint)
        case "cancel":
            return Cancelled(epoch=epoch, step=step, reason=reason)
    raise ValueError(action)


def drop(spool: Spool, job_id: str, action: str, reason: str | None = None) -> Path:
    """Write a request the safe way (temp file, then rename), as `epochd pause` does."""
    path = spool.control / f"{job_id}.{action}"
    body = orjson.dumps({"reason": reason}) if reason else b""
    atomic_write_bytes(path, body)
    return path
