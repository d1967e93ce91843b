"""Named crash points, for the tests that prove a kill at any of them changes no outcome.

Disarmed (the only state outside the tests) a point costs one comparison with None. The tests arm
one through the environment, which workers inherit from the daemon:

    EPOCHD_FAULT=<point>[@<n>][/<role>]   die the n-th time (default: the first) a process
                                 reaches it; with a role ("daemon" or "worker"), only there
    EPOCHD_FAULT_MARK=<path>     fire only if this file can still be created: once in all processes

"Die" is SIGKILL of the process itself: no handler, no flush, no finally, the same as a power cut
as far as the process can tell (what it wrote to the page cache survives, as it does on a kill -9).
`append.torn` dies halfway through writing an event line, leaving a torn tail.
"""
import os
import signal

POINTS = {
    "accept.claimed": "daemon: job file renamed into jobs/<id>/, before job_accepted",
    "accept.recorded": "daemon: job_accepted appended, before the acceptance marker is removed",
    "append.torn": "any: half of an event line written, no newline, no fsync",
    "append.unsynced": "any: an event line written in full, before its fsync",
    "file.unrenamed": "any: a durable write's temp file complete and synced, before its rename",
    "checkpoint.unrecorded": "worker: checkpoint file in place, before checkpoint_saved",
    "epoch.unrecorded": "worker: an epoch's last step done, before epoch_completed",
    "control.unconsumed": "any: control_received appended, the control file not yet removed",
    "control.unacted": "any: request on record and its file removed, before it is carried out",
    "finish.unrecorded": "worker: final weights and outputs written, before completed",
}

ROLES = ("daemon", "worker")
role = "any"  # set by the daemon's and the worker's entry points

_armed = os.environ.get("EPOCHD_FAULT")
_where, _, _role = (_armed or "").partition("/")
_name, _, _nth = _where.partition("@")
_remaining = int(_nth or 1)
_mark = os.environ.get("EPOCHD_FAULT_MARK")
if _armed is not None and (_name not in POINTS or (_role and _role not in ROLES)):
    raise SystemExit(f"EPOCHD_FAULT={_armed!r}: expected <point>[@<n>][/daemon|/worker] with a point "
                     f"among: {', '.join(POINTS)}")


def armed(name: str) -> bool:
    """True when this visit to `name` is the one that must die (counts the visit)."""
    global _remaining
    if _armed is None or name != _name or (_role and _role != role):
        return False
    _remaining -= 1
    if _remaining != 0:
        return False
    if _mark is not None:
        try:
            os.close(os.open(_mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False  # another process fired it already
    return True


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def point(name: str) -> None:
    """Die here if the tests armed this point."""
    if _armed is not None and armed(name):
        die()
