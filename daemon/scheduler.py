"""Which queued jobs run next: pure functions of the jobs' folded states and the time.

Order: higher `priority` first, then earlier acceptance. A job whose worker crashed waits
`retry_delay_seconds(crashes)` after the crash before it runs again (1, 2, 4 ... 60 s).

GPUs: a job gets the GPUs its `devices` asks for (a number: the lowest free indices; a list:
exactly those) or waits. A GPU job that has to wait keeps the GPUs it is waiting for from the
jobs behind it (for a number, every GPU free now), so a job asking for four GPUs is not
starved by a stream of one-GPU jobs; CPU jobs behind it still start.

Output folders: two jobs with the same `output_path` never run at once, and a job waits while
another one writing there is unfinished: running, paused, or queued ahead of it. Their best
weights, model.json and final weights would otherwise interleave, and a job restoring its best
weights at the end could load the other's. The job that waits then writes its outputs over the
earlier one's, as the job file says. Output paths are compared as real paths, so a folder
named through a symlink is the same folder (`same_folder`).
"""
import os
from dataclasses import dataclass
from datetime import datetime

from .replay import RUNNABLE, JobState, Status
from .spec import gpu_count_asked


@dataclass(frozen=True)
class Entry:
    """What the daemon keeps in memory per job: small, so 1,000 finished jobs cost little."""
    job_id: str
    status: Status
    priority: int
    accepted_at: str
    not_before: float       # unix seconds; 0 when it may run at once
    crashes: int
    gpus: int = 0                    # GPUs it asks for; "auto" asks for 1, if there are any
    gpu_ids: tuple[int, ...] = ()    # the exact GPUs, when its devices is a list
    gpu_optional: bool = False       # "auto": the CPU on a machine without GPUs
    output: str | None = None        # its output_path when the job file names one, as a real path

    def gpus_needed(self, machine_gpus: int) -> int:
        return 0 if self.gpu_optional and machine_gpus == 0 else self.gpus


def retry_delay_seconds(crashes: int) -> float:
    return 0.0 if crashes <= 0 else float(min(60, 2 ** (crashes - 1)))


def entry(state: JobState) -> Entry:
    not_before = 0.0
    if state.status == Status.INTERRUPTED and state.crashes and state.last_crash_at:
        crashed_at = datetime.fromisoformat(state.last_crash_at).timestamp()
        not_before = crashed_at + retry_delay_seconds(state.crashes)
    spec = state.spec or {}
    devices = spec.get("devices", "auto")
    auto = devices == "auto" and not spec.get("distributed")  # distributed "auto": CPU ranks
    return Entry(state.job_id or "", state.status, state.priority, state.accepted_at or "",
                 not_before, state.crashes, gpus=1 if auto else gpu_count_asked(devices),
                 gpu_ids=tuple(devices) if isinstance(devices, list) else (), gpu_optional=auto,
                 output=same_folder(spec.get("output_path")))


def same_folder(path: str | None) -> str | None:
    """`path` with its symlinks resolved (as far as it exists), so that two spellings of one
    folder compare equal; None stays None. The one call here that reads the disk."""
    return None if path is None else os.path.realpath(path)


def output_holder(e: Entry, entries, running=frozenset()) -> Entry | None:
    """The job that keeps `e` from writing its output folder now, or None: another job with
    the same output_path that is running (or in `running`, the jobs with a worker), paused, or
    queued ahead of it (accepted earlier)."""
    if e.output is None:
        return None
    ahead = (e.accepted_at, e.job_id)
    for o in entries:
        if o.job_id == e.job_id or o.output != e.output:
            continue
        if o.job_id in running or o.status in (Status.RUNNING, Status.PAUSED) or (
                o.status in RUNNABLE and (o.accepted_at, o.job_id) < ahead):
            return o
    return None


def unmet(e: Entry, machine: list[int]) -> str | None:
    """Why the job can never run on these GPUs (the daemon's), or None. A machine without
    GPUs starts it anyway: its worker says what it could not find."""
    if not machine or not e.gpus_needed(len(machine)):
        return None
    missing = [i for i in e.gpu_ids if i not in machine]
    if missing:
        return (f"devices names GPU(s) {missing}, which this daemon does not have (it has "
                f"{machine}). Expected: indices among those, or a number of GPUs")
    if e.gpus > len(machine):
        return (f"devices asks for {e.gpus} GPUs; this daemon has {len(machine)} ({machine}). "
                "Expected: at most that many; resume the job once the daemon has enough")
    return None


def pick(entries: list[Entry], free_slots: int, now: float, machine: list[int] | None = None,
         busy: set[int] | frozenset = frozenset()) -> list[tuple[str, tuple[int, ...]]]:
    """Up to `free_slots` runnable jobs, best first, each with the GPUs it gets (from
    `machine`, the daemon's GPUs, less the `busy` ones). Jobs `unmet` says can never run are
    left out: the daemon fails them."""
    machine = machine or []
    if free_slots <= 0:
        return []
    ready = [e for e in entries if e.status in RUNNABLE and e.not_before <= now]
    ready.sort(key=lambda e: (-e.priority, e.accepted_at, e.job_id))
    free = [g for g in machine if g not in busy]
    out: list[tuple[str, tuple[int, ...]]] = []
    for e in ready:
        if len(out) == free_slots:
            break
        need = e.gpus_needed(len(machine))
        if need == 0 or not machine:
            out.append((e.job_id, ()))
        elif unmet(e, machine) is not None:
            continue
        elif e.gpu_ids and all(g in free for g in e.gpu_ids):
            out.append((e.job_id, e.gpu_ids))
            free = [g for g in free if g not in e.gpu_ids]
        elif not e.gpu_ids and len(free) >= need:
            out.append((e.job_id, tuple(free[:need])))
            free = free[need:]
        else:  # it waits, and what it waits for stays free for it
            free = [g for g in free if g not in e.gpu_ids] if e.gpu_ids else []
    return out


def next_wakeup(entries: list[Entry], now: float) -> float | None:
    """Seconds until the earliest back-off ends, if any job is waiting on one."""
    waits = [e.not_before - now for e in entries if e.status in RUNNABLE and e.not_before > now]
    return min(waits) if waits else None
