"""`fold(events) -> JobState`: a job's state is a pure function of its event log.

No I/O and no clock here. The CLI's status, history and tail, the daemon's scheduling and the
worker's resume all read this one fold. A `run_started` that resumes from a checkpoint rewinds
the lineage to it: history, checkpoints and best-model records after that point belong to a
run that was lost, so a re-run epoch is never counted twice.
"""
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from . import policies


class Status(StrEnum):
    PENDING = "pending"          # accepted, waiting for a worker slot
    RUNNING = "running"
    PAUSED = "paused"
    INTERRUPTED = "interrupted"  # stopped by shutdown or a crash: pending again by itself
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})
RUNNABLE = frozenset({Status.PENDING, Status.INTERRUPTED})


@dataclass
class JobState:
    job_id: str | None = None
    status: Status | None = None       # None: no job_accepted yet
    spec: dict | None = None
    accepted_at: str | None = None
    source_file: str | None = None
    history: list[dict] = field(default_factory=list)     # epoch_completed payloads, this lineage
    checkpoints: list[dict] = field(default_factory=list)  # live checkpoint_saved payloads, oldest first
    best_saved: dict | None = None      # last best_model_saved payload in this lineage
    position: tuple[int, int] = (1, 0)  # (epoch in progress, steps done in it), last known
    steps_per_epoch: int | None = None
    learning_rate: float | None = None  # the rate of the last epoch run or announced
    attempts: int = 0                   # run_started count
    crashes: int = 0                    # worker deaths in a row without a finished epoch
    last_crash_at: str | None = None
    last_error: dict | None = None
    stop_reason: str | None = None
    outputs: dict | None = None
    controls: list[dict] = field(default_factory=list)    # control_received payloads
    pending_control: dict | None = None  # a request accepted but not yet carried out
    repairs: int = 0
    last_progress: dict | None = None
    updated_at: str | None = None
    last_seq: int = 0
    run: dict | None = None             # the latest run_started payload
    running_seconds: float = 0.0        # time spent in finished runs (for limits.wall_seconds)
    run_since: str | None = None        # ts of the run_started of the run in progress

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    @property
    def last_checkpoint(self) -> dict | None:
        return self.checkpoints[-1] if self.checkpoints else None

    @property
    def priority(self) -> int:
        return (self.spec or {}).get("priority", 0)

    def monitor_values(self, monitor: str) -> list[float | None]:
        return [h.get(monitor) for h in self.history]

    def early_stopping(self) -> policies.EarlyStopState | None:
        es = (self.spec or {}).get("early_stopping")
        if not es:
            return None
        mode = policies.resolve_mode(es["monitor"], es["mode"])
        return policies.early_stopping(
            self.monitor_values(es["monitor"]), patience=es["patience"], mode=mode,
            min_delta=es["min_delta"], baseline=es["baseline"],
            start_from_epoch=es["start_from_epoch"])

    def training_history(self) -> dict[str, list]:
        """The seed's `training_history` shape: one list per metric, index i = epoch i + 1."""
        keys: list[str] = []
        for h in self.history:
            keys += [k for k in h if k not in keys]
        return {k: [h.get(k) for h in self.history] for k in keys}


def fold(records: list[dict]) -> JobState:
    state = JobState()
    for record in records:
        apply(state, record)
    return state


RUN_ENDS = frozenset({"interrupted", "paused", "cancelled", "completed", "failed"})
# The types whose `apply` reads what the record before them left: a crash the daemon records
# ends its run at `updated_at`, the last sign of life. Otherwise a `progress` record only sets
# `position` and `last_progress`, which the next `progress` sets again, so a fold needs the last
# `progress` of a log and those just before these types (see `eventlog.read_log`'s `foldable`).
SEES_PREVIOUS_RECORD = frozenset({"interrupted"})


def apply(s: JobState, r: dict) -> JobState:
    """Mutate `s` by one event record. One flat match over the event types."""
    if s.run_since is not None and r["type"] in RUN_ENDS:
        # the worker's own final word ends its run; an `interrupted` the daemon wrote (a crash,
        # found maybe much later) ends it at its last sign of life
        by_daemon = r["type"] == "interrupted" and r.get("reason") != "shutdown"
        s.running_seconds += _seconds(s.run_since, s.updated_at if by_daemon else r["ts"])
        s.run_since = None
    s.last_seq, s.updated_at = r["seq"], r["ts"]
    match r["type"]:
        case "job_accepted":
            s.job_id, s.spec, s.source_file = r["job_id"], r["spec"], r["source_file"]
            s.status, s.accepted_at = Status.PENDING, r["ts"]
        case "run_started":
            s.status, s.run, s.run_since = Status.RUNNING, _payload(r), r["ts"]
            s.attempts += 1
            s.steps_per_epoch = r["steps_per_epoch"]
            _rewind(s, r["resumed_from"])
        case "progress":
            s.position = (r["epoch"], r["step"])
            s.last_progress = _payload(r)
        case "epoch_completed":
            s.history.append(_payload(r))
            s.position = (r["epoch"] + 1, 0)
            s.learning_rate = r["learning_rate"]
            s.crashes = 0
        case "checkpoint_saved":
            s.checkpoints.append(_payload(r))
        case "checkpoint_removed" | "checkpoint_rejected":
            s.checkpoints = [c for c in s.checkpoints if c["path"] != r["path"]]
        case "best_model_saved":
            s.best_saved = _payload(r)
        case "lr_changed":
            s.learning_rate = r["to"]
        case "early_stopped":
            s.stop_reason = "early_stopping"
        case "control_received":
            s.controls.append(_payload(r))
            if r["outcome"] == "accepted":
                s.pending_control = s.controls[-1]
        case "paused":
            s.status, s.position = Status.PAUSED, (r["epoch"], r["step"])
            s.pending_control = None
        case "resumed":
            s.status, s.pending_control = Status.PENDING, None
        case "interrupted":
            s.status = Status.INTERRUPTED
            if r.get("epoch") is not None and r.get("step") is not None:  # where it stopped
                s.position = (r["epoch"], r["step"])
            if r.get("crash"):
                s.crashes += 1
                s.last_crash_at = r["ts"]
        case "completed":
            s.status, s.stop_reason, s.outputs = Status.COMPLETED, r["stop_reason"], r["outputs"]
            s.pending_control = None
        case "failed":
            s.status, s.last_error, s.pending_control = Status.FAILED, _payload(r), None
        case "cancelled":  # where it stopped: a running job goes on past its last progress
            s.status, s.pending_control, s.position = Status.CANCELLED, None, (r["epoch"], r["step"])
        case "log_repaired":
            s.repairs += 1
    return s


def _rewind(s: JobState, resumed_from: dict | None) -> None:
    """Keep only what the run being started builds on: the lineage up to its checkpoint."""
    s.stop_reason = None
    if resumed_from is None:
        s.history, s.checkpoints, s.best_saved, s.position = [], [], None, (1, 0)
        return
    point = (resumed_from["epoch"], resumed_from["step"])
    done = resumed_from["epochs_done"]
    s.history = [h for h in s.history if h["epoch"] <= done]
    s.checkpoints = [c for c in s.checkpoints if (c["epoch"], c["step"]) <= point]
    if s.best_saved and s.best_saved["epoch"] > done:
        s.best_saved = None
    s.position = (done + 1, 0) if done == point[0] else point


def _seconds(a: str, b: str) -> float:
    return max((datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds(), 0.0)


def _payload(r: dict) -> dict:
    """The record less its envelope. A copy and four deletions: three times a comprehension's
    speed, which counts in a cold replay of a long log."""
    p = r.copy()
    del p["seq"], p["ts"], p["type"], p["v"]
    return p


def resume_point(checkpoint: dict | None, steps_per_epoch: int) -> tuple[int, int]:
    """(epoch, step) a run starts at from a checkpoint: the epoch after a finished one."""
    if checkpoint is None:
        return 1, 0
    if checkpoint["step"] >= steps_per_epoch:
        return checkpoint["epoch"] + 1, 0
    return checkpoint["epoch"], checkpoint["step"]
