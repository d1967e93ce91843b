"""The few named exceptions of epochd. Each message says what was received, what was expected
and what to do next; the CLI turns them into `ClickException`s at its edge."""


class EpochdError(Exception):
    """Base class: anything epochd raises on purpose."""


class BadJobFile(EpochdError):
    """A job file that cannot be accepted. `errors` lists every problem found, one per line."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


class LogCorrupt(EpochdError):
    """A damaged line in the middle of an event log: never guessed, never repaired silently."""

    def __init__(self, path, line_no: int, reason: str):
        self.path, self.line_no, self.reason = path, line_no, reason
        super().__init__(
            f"event log {path} is corrupt at line {line_no}: {reason}. "
            "Valid lines follow it, so this is damage rather than a torn last write; "
            "the daemon leaves the job alone (quarantined) until the file changes. Inspect it and "
            "restore it from a backup: the daemon takes the job up again once it reads clean. To "
            "drop the job, move its folder out of jobs/.")


class JobNotFound(EpochdError):
    def __init__(self, job_id: str, spool):
        super().__init__(f'no job "{job_id}" in spool {spool}. Run "epochd status" to list jobs.')


class SpoolLocked(EpochdError):
    """A second daemon on the same spool."""


class DataError(EpochdError):
    """A problem that can only be seen when the data is read. Retrying cannot fix it."""


class DataChanged(EpochdError):
    """A data file is not the one the job's checkpoints were trained on. Putting it back fixes
    that: the failure is retryable."""


class PathNotAllowed(EpochdError):
    """A job file names a path outside the roots the daemon may read or write."""


class CheckpointInvalid(EpochdError):
    """A checkpoint whose bytes do not match the sha256 its event recorded, or that cannot load."""


class DeviceUnavailable(EpochdError):
    """The job asks for a device this machine does not have."""


class MachinesDisagree(EpochdError):
    """The machines of one job were given different job files or different data: their
    collectives would not match. Retrying cannot fix it."""


class PortInUse(EpochdError):
    """A port the job's worker must listen on is held by another program. Freeing it fixes
    that: the failure is retryable."""


class Diverged(EpochdError):
    """Training produced a non-finite loss: more epochs cannot fix it."""


class ModelTooLarge(EpochdError):
    """The network the job describes cannot fit in the memory it may use. Retrying cannot fix it."""


class EngineUnavailable(EpochdError):
    """The job's framework is not installed where the worker runs. Retrying cannot fix it."""


def memory_limit_message(rss: float, limit: float) -> str:
    return (f"the worker's memory (RSS) reached {rss:.0f} MB, past the job's limits.memory_mb of "
            f"{limit:g}. Expected: a job that fits its limit; lower batch_size (keep the update "
            "size with gradient_accumulation_steps), use a smaller network, or raise "
            "limits.memory_mb, then submit again.")
