"""Load: a burst of job files is accepted exactly once each, with inotify keeping up or the
rescan catching what it missed (an inotify queue overflow while the daemon is stopped)."""
import json
import os
import signal

import psutil
import pytest

from daemon.eventlog import read_records
from daemon.spool import Spool
from tests.conftest import classification_csv, seed_job, wait_until


def burst(spool, job: dict, count: int, prefix: str) -> None:
    """`count` job files renamed into incoming/ as fast as Python can."""
    data = json.dumps(job).encode()
    incoming = spool / "incoming"
    for i in range(count):
        tmp = incoming / f".{prefix}{i}.tmp"
        tmp.write_bytes(data)
        os.rename(tmp, incoming / f"{prefix}{i:05d}.json")


def all_accepted_once(spool, prefix: str, count: int) -> None:
    s = Spool(spool)
    def done():
        return (not any(n.startswith(prefix) for n in os.listdir(spool / "incoming"))
                and sum(1 for n in os.listdir(s.jobs) if n.startswith(prefix)) == count)
    wait_until(done, 600, interval=0.5, what=f"{count} {prefix} jobs accepted")
    assert not any(n.startswith(prefix) for n in os.listdir(spool / "rejected"))
    for i in range(count):
        records = read_records(s.events_path(f"{prefix}{i:05d}"))
        assert [r["type"] for r in records].count("job_accepted") == 1
        assert records[0]["source_file"] == f"{prefix}{i:05d}.json"


@pytest.mark.parametrize("count", [100, pytest.param(1000, marks=pytest.mark.slow)])
def test_a_burst_of_job_files_is_accepted_exactly_once_each(tmp_path, spool, daemon_factory, count):
    """The jobs queue behind one worker slot; what is checked is acceptance: every file becomes
    exactly one job, none is lost, rejected or taken twice."""
    data = classification_csv(tmp_path / "train.csv")
    d = daemon_factory(spool, "--max-jobs", "1")
    burst(spool, seed_job(data, epochs=1), count, "b")
    all_accepted_once(spool, "b", count)
    assert d.proc.poll() is None


@pytest.mark.slow
def test_an_inotify_overflow_is_caught_by_the_rescan(tmp_path, spool, daemon_factory):
    """SIGSTOP the daemon while 20,000 files arrive (more than the kernel's default queue of
    16,384 events): after SIGCONT the periodic rescan takes every one, exactly once."""
    data = classification_csv(tmp_path / "train.csv")
    d = daemon_factory(spool, "--max-jobs", "1")
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        burst(spool, seed_job(data, epochs=1), 20_000, "o")
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    all_accepted_once(spool, "o", 20_000)


def steady_fds(pid: int) -> dict[int, str]:
    """The daemon's open files at its quietest of 20 looks over a second: its main loop opens
    daemon.log, a job's lock or its event log for a moment, so a single look can catch one of
    those. A file left open per job is open at every look."""
    looks: list[dict[int, str]] = []

    def look() -> bool:
        fds = {}
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                fds[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
            except FileNotFoundError:  # closed while listed
                pass
        looks.append(fds)
        return len(looks) == 20
    wait_until(look, 10, interval=0.05, what="20 looks at the daemon's open files")
    return min(looks, key=len)


# 200 jobs: about a second and a half each, two at a time: past the suite's 300 s per test
@pytest.mark.parametrize("jobs", [4, pytest.param(200, marks=[pytest.mark.slow, pytest.mark.timeout(1500)])])
def test_the_daemons_memory_and_open_files_stay_flat_as_jobs_finish(tmp_path, spool, daemon_factory, jobs):
    """Measured once 2 jobs have come and gone, then again after `jobs` more: the same open
    files, and no more than a few MB of memory (Python's allocator moves a little)."""
    data = classification_csv(tmp_path / "train.csv", rows=60)
    d = daemon_factory(spool, "--max-jobs", "2")
    daemon = psutil.Process(d.proc.pid)

    def run(prefix: str, count: int) -> tuple[int, float]:
        burst(spool, seed_job(data, epochs=1), count, prefix)
        s = Spool(spool)
        def finished():
            ids = [n for n in os.listdir(s.jobs) if n.startswith(prefix)]
            return len(ids) == count and all(
                s.state(i).status == "completed" for i in ids) and d.proc.poll() is None
        wait_until(finished, 60 + 5 * count, interval=0.2, what=f"{count} {prefix} jobs to finish")
        wait_until(lambda: not daemon.children(), 30, what="every worker to be reaped")
        return steady_fds(d.proc.pid), daemon.memory_info().rss / 2**20
    fds_before, rss_before = run("w", 2)
    fds_after, rss_after = run("m", jobs)
    # a file left open per job (a worker.log, a lock) shows here
    assert len(fds_after) == len(fds_before), sorted(
        set(fds_after.values()) ^ set(fds_before.values()))
    assert rss_after - rss_before < 4.0, (rss_before, rss_after)
