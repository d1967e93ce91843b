"""A kill at every named crash point (daemon/faults.py), then a restart: the job ends exactly as
an untouched run does.

Each scenario arms one point through the environment, drops a job, pauses and resumes it while
it trains, and lets the point fire: the process that reaches it SIGKILLs itself and the test then
kills everything else, as a power cut would. A daemon started without the fault finishes the
job. Checked every time: the point really fired; every event on record before the kill is still
there, in place; the job was accepted once and its runs never overlapped; each request was
carried out and its control file consumed; epochs 1..4 are in the history once each; no temp
file is left; the final weights equal the untouched run's, bit for bit.

The default run covers one case of each kind; `-m slow` runs every point at several visits.
"""
import os
import subprocess
from pathlib import Path

import pytest

from daemon import control, faults
from daemon.eventlog import read_log
from daemon.replay import fold
from daemon.spool import Spool
from tests.conftest import (WEIGHT_FILES, DaemonProcess, alive, classification_csv, drop_job,
                            events_of, kill_workers, model_weights, same_weights, seed_job, wait_until)

RUN_ENDS = {"interrupted", "paused", "cancelled", "completed", "failed"}


def job(data: Path, out: Path, every_seconds: float = 0.05) -> dict:
    """Four epochs of about 0.3 s (to a second on a busy machine), a checkpoint every 0.05 s:
    every point is on its path, and the run after the pause alone appends more than the 21
    events the latest visit of a point needs (checkpoints kept by time, each one saved and, past
    the last 3, removed). Three epochs with one every 0.2 s appended 20 when the pause landed
    early in epoch 1 (a time-kept checkpoint waits for the engine call to end: a few an epoch).
    The full-disk tests keep to 0.2 s: fewer events to fit in the room left on the disk."""
    return seed_job(data, out, epochs=4, batch_size=2, algorithm_params={"hidden_units": [16]},
                    checkpoint={"every_seconds": every_seconds})


def disk_job(data: Path, out: Path) -> dict:
    return job(data, out, every_seconds=0.2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The data and the final weights of a run nothing disturbed."""
    root = tmp_path_factory.mktemp("reference")
    data = classification_csv(root / "train.csv", rows=8000)
    spool = root / "spool"
    Spool(spool).ensure()
    d = DaemonProcess(spool)
    try:
        drop_job(spool, "j.json", job(data, root / "out"))
        wait_until(lambda: status(spool) == "completed", 120, what="the reference run")
    finally:
        d.stop()
    return data, model_weights(root / "out" / WEIGHT_FILES["pytorch"][0])


def status(spool: Path) -> str | None:
    path = Spool(spool).events_path("j")
    return fold(events_of(spool, "j")).status if path.exists() else None


class User:
    """Pauses the job once it trains, resumes it once paused: requests for the control points."""

    def __init__(self, spool: Path):
        self.spool, self.paused, self.resumed = spool, False, 0

    def act(self) -> None:
        path = Spool(self.spool).events_path("j")
        if not path.exists():
            return
        state = fold(events_of(self.spool, "j"))
        if not self.paused and state.last_progress is not None and state.status == "running":
            control.drop(Spool(self.spool), "j", "pause")
            self.paused = True
        elif state.status == "paused" and not (self.spool / "control" / "j.resume").exists():
            control.drop(Spool(self.spool), "j", "resume")
            self.resumed += 1


def crash_and_recover(tmp_path: Path, reference, case: str) -> None:
    data, expected = reference
    spool, mark = tmp_path / "spool", tmp_path / "fired"
    Spool(spool).ensure()
    d = DaemonProcess(spool, env={"EPOCHD_FAULT": case, "EPOCHD_FAULT_MARK": str(mark)})
    user = User(spool)
    try:
        drop_job(spool, "j.json", job(data, tmp_path / "out"))

        def fired_or_done():
            if mark.exists():
                return True
            user.act()
            assert status(spool) != "completed", f"{case}: the job completed and the point never fired"
            return False
        wait_until(fired_or_done, 120, what=f"{case} to fire")
        # the process at the point kills itself; the power cut takes everything else with it
        pids = [r["pid"] for r in events_of(spool, "j") if r["type"] == "run_started"] \
            if Spool(spool).events_path("j").exists() else []
        d.kill()
        kill_workers(spool)
        wait_until(lambda: not any(alive(p) for p in pids), 30, what="every worker to die")
        before = read_log(Spool(spool).events_path("j")).records

        d = DaemonProcess(spool)
        wait_until(lambda: user.act() or status(spool) == "completed", 180,
                   what=f"job j to complete after the crash at {case}")
    finally:
        d.stop()
        kill_workers(spool)

    records = events_of(spool, "j")
    assert records[:len(before)] == before, "an event on record before the crash was lost or changed"
    types = [r["type"] for r in records]
    assert types.count("job_accepted") == 1
    running = False
    for t in types:  # one worker at a time: every run ends before the next starts
        assert not (t == "run_started" and running), f"two runs at once: {types}"
        running = (running or t == "run_started") and t not in RUN_ENDS
    if user.paused:  # the request survived the crash: carried out, its file consumed
        assert "paused" in types and "resumed" in types
    assert not any((spool / "control").iterdir()) and not any((spool / "incoming").iterdir())
    assert not any((spool / "rejected").iterdir())
    state = fold(records)
    assert state.status == "completed" and [h["epoch"] for h in state.history] == [1, 2, 3, 4]
    leftovers = [p for p in tmp_path.rglob(".*.tmp")]
    assert not leftovers, f"temp files left behind: {leftovers}"
    assert same_weights(model_weights(tmp_path / "out" / WEIGHT_FILES["pytorch"][0]), expected)


# The default run: a torn append in the worker, a pause acknowledged but not carried out.
# `-m slow` runs every case.
QUICK = ["append.torn@4", "control.unacted@1/worker"]
VISITS = {"accept.claimed": [1], "accept.recorded": [1], "append.torn": [1, 2, 3, 5, 8, 13, 21],
          "append.unsynced": [1, 2, 3, 5, 8, 13, 21], "file.unrenamed": [1, 2, 3, 4, 6],
          "checkpoint.unrecorded": [1, 2, 3, 5], "epoch.unrecorded": [1, 2, 3],
          "control.unconsumed": [1], "control.unacted": [1], "finish.unrecorded": [1]}
# the worker consumes the pause, the daemon the resume: a control point for each of them
EVERY = [f"{point}@{n}" + (f"/{role}" if point.startswith("control.") else "")
         for point, visits in VISITS.items() for n in visits for role in ("worker", "daemon")
         if point.startswith("control.") or role == "worker"]


def test_every_point_has_cases():
    assert VISITS.keys() == faults.POINTS.keys()


@pytest.mark.parametrize("case", QUICK)
def test_a_kill_at_a_crash_point_changes_no_outcome(tmp_path, reference, case):
    crash_and_recover(tmp_path, reference, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in EVERY if c not in QUICK])
def test_every_crash_point_at_several_visits(tmp_path, reference, case):
    crash_and_recover(tmp_path, reference, case)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a disk that fills up. Needs the right to mount (root in CI's container)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    kill_workers(disk / "spool")
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_at_a_checkpoint_fails_clearly_and_resume_continues(tmp_path, small_disk, reference):
    """The disk fills up mid-run: the checkpoint write fails with ENOSPC, nothing torn or
    half-written is left, the job fails with a message that says what to do, and once space is
    freed `resume` finishes it with the untouched run's weights."""
    data, expected = reference
    spool = small_disk / "spool"
    Spool(spool).ensure()
    d = DaemonProcess(spool)
    try:
        drop_job(spool, "j.json", disk_job(data, small_disk / "out"))
        wait_until(lambda: any(r["type"] == "checkpoint_saved" for r in events_of(spool, "j")), 60,
                   what="a first checkpoint")
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler = small_disk / "filler"
        filler.write_bytes(b"\0" * max(free - 16 * 1024, 0))  # room for events, not for a checkpoint
        state = wait_until(lambda: status(spool) == "failed" and fold(events_of(spool, "j")), 60,
                           what="the job to fail on the full disk")
        error = state.last_error
        assert error["retryable"] and error["error"] == "OSError", error
        assert "the disk is full" in error["message"] and '"epochd resume j"' in error["message"]
        contents = read_log(Spool(spool).events_path("j"))
        assert contents.torn_bytes == 0
        assert not list(small_disk.rglob("*.tmp"))  # the half-written checkpoint was removed
        filler.unlink()
        control.drop(Spool(spool), "j", "resume")
        state = wait_until(lambda: status(spool) == "completed" and fold(events_of(spool, "j")), 120,
                           what="the resumed job to complete")
    finally:
        d.stop()
    assert [h["epoch"] for h in state.history] == [1, 2, 3, 4]
    assert same_weights(model_weights(small_disk / "out" / WEIGHT_FILES["pytorch"][0]), expected)


def fill(disk: Path) -> Path:
    """Write until the disk refuses another byte."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_a_disk_too_full_for_any_event_leaves_the_daemon_serving(tmp_path, small_disk, reference):
    """Not one more byte: the worker cannot even record its failure and dies; the daemon cannot
    record that either, and keeps serving. Once space is freed it records the crash, retries,
    and the job ends with the untouched run's weights, each epoch once."""
    data, expected = reference
    spool = small_disk / "spool"
    Spool(spool).ensure()
    d = DaemonProcess(spool, log_dir=tmp_path)  # its stderr off the disk that fills up
    try:
        drop_job(spool, "j.json", disk_job(data, small_disk / "out"))
        wait_until(lambda: any(r["type"] == "checkpoint_saved" for r in events_of(spool, "j")), 60,
                   what="a first checkpoint")
        worker = next(r["pid"] for r in events_of(spool, "j") if r["type"] == "run_started")
        filler = fill(small_disk)
        wait_until(lambda: not alive(worker), 60, what="the worker to die on the full disk")
        wait_until(lambda: "cannot record the end of its worker" in d.log(), 30,
                   what="the daemon to say it cannot record")
        assert d.proc.poll() is None  # still serving (what the worker freed may let it record at once)
        filler.unlink()
        state = wait_until(lambda: status(spool) == "completed" and fold(events_of(spool, "j")), 120,
                           what="the job to complete once space is back")
    finally:
        d.stop()
    crashes = [r for r in events_of(spool, "j") if r["type"] == "interrupted"]
    assert crashes and crashes[0]["crash"]
    assert [h["epoch"] for h in state.history] == [1, 2, 3, 4]
    assert same_weights(model_weights(small_disk / "out" / WEIGHT_FILES["pytorch"][0]), expected)


@pytest.fixture
def lying_disk(tmp_path):
    """An ext4 filesystem on a loop device whose backing file lies on a tmpfs that is full:
    write() succeeds (into the page cache) and the error comes at fsync, from the block device
    below the filesystem, as it does from a failing disk. Needs the right to mount and a loop
    device (root in CI's container)."""
    backing, disk = tmp_path / "backing", tmp_path / "lying"
    backing.mkdir()
    disk.mkdir()
    def run(*cmd):
        return subprocess.run(list(cmd), capture_output=True, text=True)
    mounted = run("mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(backing))
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        image = backing / "disk.img"
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        # metadata written out now, so that only new data blocks need room on the backing
        made = run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image))
        if made.returncode:
            pytest.skip(f"cannot make an ext4 filesystem here: {made.stderr.strip()}")
        looped = run("mount", "-o", "loop", str(image), str(disk))
        if looped.returncode:
            pytest.skip(f"cannot mount a loop device here: {looped.stderr.strip()}")
        (disk / "out").mkdir()
        os.sync()
        fill(backing)  # now every new data block the filesystem writes back fails below it
        yield disk
    finally:
        kill_workers(tmp_path / "spool")
        run("umount", "-l", str(disk))
        run("umount", "-l", str(backing))


def test_an_fsync_error_from_below_the_filesystem_fails_the_job_and_is_never_ignored(tmp_path, lying_disk):
    """The outputs' disk accepts the writes and fails the fsync. The worker must not retry the
    fsync (a second one can report success for data the kernel already dropped) nor rename the
    file into place: the job fails at once, retryable, saying the disk failed, and no output
    file claims to be there."""
    data = classification_csv(tmp_path / "train.csv", rows=2000)
    spool = tmp_path / "spool"
    Spool(spool).ensure()
    out = lying_disk / "out"
    d = DaemonProcess(spool)
    try:
        drop_job(spool, "j.json", seed_job(data, out, epochs=2, algorithm_params={"hidden_units": [64, 64]}))
        state = wait_until(lambda: status(spool) in ("failed", "completed") and fold(events_of(spool, "j")),
                           120, what="the job to end")
    finally:
        d.stop()
    assert state.status == "failed", state.status
    error = state.last_error
    assert error["retryable"] and error["error"] == "OSError", error
    assert ("the disk is full" in error["message"] or "I/O error" in error["message"]), error
    assert '"epochd resume j"' in error["message"] and str(out) in error["message"]
    records = events_of(spool, "j")
    assert records[-1]["type"] == "failed"
    assert not any(r["type"] in ("best_model_saved", "completed") for r in records)
    assert [p.name for p in out.iterdir()] == []  # nothing renamed into place, no temp left
