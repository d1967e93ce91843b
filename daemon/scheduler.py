"""Which queued jobs run next: pure functions of the jobs' folded states and the time.

Order: higher `priority` first, then earlier acceptance. A job whose worker crashed waits
`retry_delay_seconds(crashes)` after the crash before it runs again (1, 2, 4 ... 60 s).
"""
from dataclasses import dataclass
from datetime import datetime

from .replay import RUNNABLE, JobState, Status


@dataclass(frozen=True)
class Entry:
    """What the daemon keeps in memory per job: small, so 1,000 finished jobs cost little."""
    job_id: str
    status: Status
    priority: int
    accepted_at: str
    not_before: float       # unix seconds; 0 when it may run at once
    crashes: int
    wants_gpu: bool


def retry_delay_seconds(crashes: int) -> float:
    return 0.0 if crashes <= 0 else float(min(60, 2 ** (crashes - 1)))


def entry(state: JobState) -> Entry:
    not_before = 0.0
    if state.status == Status.INTERRUPTED and state.crashes and state.last_crash_at:
        crashed_at = datetime.fromisoformat(state.last_crash_at).timestamp()
        not_before = crashed_at + retry_delay_seconds(state.crashes)
    devices = (state.spec or {}).get("devices", "auto")
    return Entry(state.job_id or "", state.status, state.priority, state.accepted_at or "",
                 not_before, state.crashes, wants_gpu=devices not in ("cpu", 0)
                 and not (state.spec or {}).get("distributed"))


def pick(entries: list[Entry], free_slots: int, now: float) -> list[str]:
    """Up to `free_slots` runnable jobs, best first."""
    if free_slots <= 0:
        return []
    ready = [e for e in entries if e.status in RUNNABLE and e.not_before <= now]
    ready.sort(key=lambda e: (-e.priority, e.accepted_at, e.job_id))
    return [e.job_id for e in ready[:free_slots]]


def next_wakeup(entries: list[Entry], now: float) -> float | None:
    """Seconds until the earliest back-off ends, if any job is waiting on one."""
    waits = [e.not_before - now for e in entries if e.status in RUNNABLE and e.not_before > now]
    return min(waits) if waits else None
