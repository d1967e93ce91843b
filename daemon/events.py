"""Every fact epochd records about a job, as frozen past-tense dataclasses.

An event's type name and field names are the contract that users' scripts read: add fields and
types, never rename. On disk an event is one JSON line (see `eventlog`): its payload fields are
top-level keys beside `seq` (position in the log), `ts`, `type`, `v` (schema version of the
type) and `crc`. `seq` and `v` are kept apart on purpose: a log written by an older epochd is
read through the `UPCASTERS` below, one small function per version step.
"""
from dataclasses import dataclass, fields
from typing import Any, ClassVar

ENVELOPE_KEYS = ("seq", "ts", "type", "v", "crc")


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    type: ClassVar[str] = ""
    v: ClassVar[int] = 1
    # payload keys whose Python names differ ("from" is a keyword)
    renamed: ClassVar[dict[str, str]] = {}
    # optional fields left out of the line when None (regression-only metrics, say)
    omit_if_none: ClassVar[frozenset[str]] = frozenset()

    def payload(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in self.omit_if_none:
                continue
            out[self.renamed.get(f.name, f.name)] = value
        return out


@dataclass(frozen=True, kw_only=True, slots=True)
class JobAccepted(Event):
    type: ClassVar[str] = "job_accepted"
    job_id: str
    source_file: str | None        # the name the user dropped, e.g. "exp1.json"
    spec: dict                     # normalised: every default filled in, paths resolved
    spec_sha256: str               # of the normalised spec, canonical JSON
    file_sha256: str               # of job.json, byte for byte as dropped
    recovered: bool = False        # acceptance finished at startup after a crash


@dataclass(frozen=True, kw_only=True, slots=True)
class RunStarted(Event):
    type: ClassVar[str] = "run_started"
    attempt: int                   # 1 for the first run, +1 for every run after a stop
    pid: int
    host: str
    devices: list
    framework: str
    versions: dict
    resumed_from: dict | None      # {"epoch", "step", "checkpoint"} or None for a fresh start
    steps_per_epoch: int
    train_samples: int
    val_samples: int
    task: str
    gpus: tuple = ()               # nvidia-smi indices the daemon gave this run (on this machine)
    data: dict | None = None       # data file -> {path, bytes, mtime_ns, sha256} (daemon/datafiles.py)
    notes: tuple = ()              # facts about the data worth knowing that are not errors


@dataclass(frozen=True, kw_only=True, slots=True)
class Progress(Event):
    type: ClassVar[str] = "progress"
    epoch: int                     # 1-based, the epoch in progress
    step: int                      # steps done in this epoch
    steps_per_epoch: int
    samples_per_sec: float
    loss: float                    # running mean train loss of this epoch so far
    eta_seconds: float             # to the end of the job at the current speed


@dataclass(frozen=True, kw_only=True, slots=True)
class EpochCompleted(Event):
    type: ClassVar[str] = "epoch_completed"
    omit_if_none: ClassVar[frozenset[str]] = frozenset(
        {"train_mae", "train_rmse", "val_mae", "val_rmse", "val_r2", "memory_peak"})
    epoch: int                     # 1-based
    train_loss: float
    train_accuracy: float | None   # classification only; None for regression
    val_loss: float | None         # None when the job has no validation data
    val_accuracy: float | None
    learning_rate: float           # the rate of the epoch's last step
    time_per_epoch: float          # seconds, wall clock, training plus evaluation
    samples_per_sec: float         # training samples / training compute seconds
    memory_usage: float            # process RSS, MB
    gpu_utilization: float | None  # %, mean over the epoch; None without a GPU
    gpu_memory: float | None       # MB used by this process on its GPU; None without one
    data_time: float               # seconds spent preparing the epoch's batches
    compute_time: float            # seconds spent in training steps
    eval_time: float               # seconds spent evaluating
    cpu_time: float                # process CPU seconds of the training part (wall >> cpu: contention)
    steps: int
    train_mae: float | None = None     # regression: in the target's own units
    train_rmse: float | None = None
    val_mae: float | None = None
    val_rmse: float | None = None
    val_r2: float | None = None
    memory_peak: float | None = None   # the worker's highest RSS so far (this run), MB


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointSaved(Event):
    type: ClassVar[str] = "checkpoint_saved"
    epoch: int                     # the epoch the state belongs to (1-based)
    step: int                      # steps of that epoch done; == steps_per_epoch at its end
    steps_per_epoch: int
    path: str                      # relative to the job folder
    bytes: int
    sha256: str
    epoch_seconds: float = 0.0     # time already spent in this epoch (a mid-epoch checkpoint)
    compute_seconds: float = 0.0
    data_seconds: float = 0.0
    cpu_seconds: float = 0.0


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointRemoved(Event):
    type: ClassVar[str] = "checkpoint_removed"
    path: str
    reason: str                    # "keep_last" pruning


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointRejected(Event):
    type: ClassVar[str] = "checkpoint_rejected"
    path: str
    reason: str                    # sha256 mismatch, missing, or does not load


@dataclass(frozen=True, kw_only=True, slots=True)
class BestModelSaved(Event):
    type: ClassVar[str] = "best_model_saved"
    epoch: int
    monitor: str
    value: float
    path: str


@dataclass(frozen=True, kw_only=True, slots=True)
class LrChanged(Event):
    type: ClassVar[str] = "lr_changed"
    renamed: ClassVar[dict[str, str]] = {"from_": "from"}
    epoch: int                     # the first epoch that runs at the new rate
    from_: float
    to: float
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class EarlyStopped(Event):
    type: ClassVar[str] = "early_stopped"
    epoch: int
    monitor: str
    best_value: float | None
    best_epoch: int | None
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ControlReceived(Event):
    type: ClassVar[str] = "control_received"
    action: str                    # pause | resume | cancel
    source_file: str               # name of the control file, relative to the spool
    reason: str | None = None      # the user's own words, if the file carried any
    outcome: str = "accepted"      # accepted | already <status> (a harmless repeat)


@dataclass(frozen=True, kw_only=True, slots=True)
class Paused(Event):
    type: ClassVar[str] = "paused"
    epoch: int
    step: int
    checkpoint: str | None


@dataclass(frozen=True, kw_only=True, slots=True)
class Resumed(Event):
    type: ClassVar[str] = "resumed"
    epoch: int
    step: int
    checkpoint: str | None


@dataclass(frozen=True, kw_only=True, slots=True)
class Interrupted(Event):
    type: ClassVar[str] = "interrupted"
    reason: str                    # shutdown | crash detected at startup | worker killed by signal N ...
    crash: bool = False            # counts toward the retry limit (a worker died on its own)
    epoch: int | None = None
    step: int | None = None
    checkpoint: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Completed(Event):
    type: ClassVar[str] = "completed"
    epochs_run: int
    stop_reason: str               # max_epochs | early_stopping
    best: dict | None              # {"epoch", "monitor", "value"}
    final_metrics: dict
    outputs: dict                  # name -> path (relative to the job folder when inside it)


@dataclass(frozen=True, kw_only=True, slots=True)
class Failed(Event):
    type: ClassVar[str] = "failed"
    error: str                     # exception class, e.g. "DataError"
    message: str
    traceback: str | None
    retryable: bool                # whether running it again could succeed


@dataclass(frozen=True, kw_only=True, slots=True)
class Cancelled(Event):
    type: ClassVar[str] = "cancelled"
    epoch: int
    step: int
    reason: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class LogRepaired(Event):
    type: ClassVar[str] = "log_repaired"
    truncated_bytes: int           # the torn tail cut away before this append
    reason: str
    tail_preview: str              # repr of the first bytes cut, for forensics


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls for cls in (
        JobAccepted, RunStarted, Progress, EpochCompleted, CheckpointSaved, CheckpointRemoved,
        CheckpointRejected, BestModelSaved, LrChanged, EarlyStopped, ControlReceived, Paused,
        Resumed, Interrupted, Completed, Failed, Cancelled, LogRepaired)
}


# (type, version) -> function turning a record of that version into the next version's shape.
# Empty while every type is at v1; an old log stays readable by adding one function per step.
UPCASTERS: dict[tuple[str, int], Any] = {}


def upcast(record: dict) -> dict:
    cls = EVENT_TYPES.get(record["type"])
    while cls is not None and record["v"] < cls.v:
        record = UPCASTERS[(record["type"], record["v"])](record)
    return record
