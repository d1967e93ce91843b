"""Crash recovery: kill -9 of the daemon and its workers at random moments, orphan workers,
restarts with torn logs. Every job ends as if nothing had happened."""
import json
import os
import random
import signal
import time
from datetime import datetime

import numpy as np
import pytest
from safetensors.numpy import load_file

from daemon import control
from daemon.eventlog import EventLog
from daemon.events import JobAccepted
from daemon.replay import fold
from daemon.spool import Settings, Spool
from daemon.supervisor import Daemon, Options
from tests.conftest import (alive, classification_csv, drop_job, events_of, kill_workers, seed_job,
                            wait_for_event, wait_for_status, wait_until)


def same_weights(a, b) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def job(data, out, epochs=4):
    """Epochs of thousands of single-pair steps: on 8,000 rows about a second each."""
    return seed_job(data, out, epochs=epochs, batch_size=2, algorithm_params={"hidden_units": [16]})


def kill_everything(d, spool) -> None:
    d.kill()
    kill_workers(spool)
    records = events_of(spool, "j")
    pids = [r["pid"] for r in records if r["type"] == "run_started"]
    wait_until(lambda: not any(alive(p) for p in pids), 30, what="the workers to die")


def finished(spool) -> bool:
    path = Spool(spool).events_path("j")
    return path.exists() and fold(events_of(spool, "j")).status == "completed"


def runs(spool) -> int:
    path = Spool(spool).events_path("j")
    return sum(r["type"] == "run_started" for r in events_of(spool, "j")) if path.exists() else 0


@pytest.mark.parametrize("seed", [0] + [pytest.param(s, marks=pytest.mark.slow) for s in range(1, 70)])
def test_kill_9_of_daemon_and_workers_at_random_moments(tmp_path, spool, daemon_factory, seed):
    """Three kills at seeded random moments, a restart after each: epochs 1..4 exactly once in
    the history and the final weights of a run that was never touched."""
    rng = random.Random(seed)
    data = classification_csv(tmp_path / "train.csv", rows=8000)
    reference_spool = tmp_path / "reference"
    Spool(reference_spool).ensure()
    daemon_factory(reference_spool)
    drop_job(reference_spool, "j.json", job(data, tmp_path / "ref"))
    d = daemon_factory(spool)
    drop_job(spool, "j.json", job(data, tmp_path / "out"))
    seen = 0
    for _ in range(3):
        wait_until(lambda: runs(spool) > seen or finished(spool), 60, what="a run to start")
        if finished(spool):
            break
        seen = runs(spool)
        time.sleep(rng.uniform(0.2, 2.5))  # the seeded random moment of the kill
        kill_everything(d, spool)
        d = daemon_factory(spool)
    state = wait_for_status(spool, "j", "completed", timeout=180)
    assert [h["epoch"] for h in state.history] == [1, 2, 3, 4]
    wait_for_status(reference_spool, "j", "completed", timeout=180)
    assert same_weights(tmp_path / "ref" / "model.safetensors", tmp_path / "out" / "model.safetensors")
    reasons = {r["reason"] for r in events_of(spool, "j") if r["type"] == "interrupted"}
    assert reasons <= {"crash detected at startup"}
    assert state.crashes == 0  # the daemon's own death is not the job's fault


def test_a_worker_that_outlives_the_daemon_is_not_started_twice(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv", rows=8000)
    d = daemon_factory(spool)
    drop_job(spool, "j.json", job(data, tmp_path / "out"))
    records = wait_for_event(spool, "j", "progress")
    worker = next(r["pid"] for r in records if r["type"] == "run_started")
    d.kill()  # the daemon alone: its worker runs on in its own session
    assert alive(worker)
    daemon_factory(spool)
    state = wait_for_status(spool, "j", "completed", timeout=120)
    assert state.attempts == 1 and [h["epoch"] for h in state.history] == [1, 2, 3, 4]
    log = (spool / "daemon.jsonl").read_text()
    assert '"event":"worker_started"' in log and log.count('"event":"worker_started"') == 1


def test_paused_jobs_stay_paused_across_a_restart(tmp_path, spool, daemon_factory):
    """j is paused and stays so; k, running when the daemon stops, resumes and finishes. j has
    far more epochs than the test can wait for and k some ten seconds of them, so neither ends
    before the daemon stops, however fast the machine."""
    data = classification_csv(tmp_path / "train.csv", rows=8000)
    d = daemon_factory(spool, "--max-jobs", "2")
    drop_job(spool, "j.json", job(data, tmp_path / "out", epochs=1000))
    drop_job(spool, "k.json", job(data, tmp_path / "out2", epochs=10))
    wait_for_event(spool, "j", "progress")
    wait_for_event(spool, "k", "progress")
    control.drop(Spool(spool), "j", "pause")
    wait_for_status(spool, "j", "paused")
    assert d.stop() == 0
    assert fold(events_of(spool, "k")).status == "interrupted"
    daemon_factory(spool, "--max-jobs", "2")
    wait_for_status(spool, "k", "completed", timeout=120)
    assert fold(events_of(spool, "j")).status == "paused"
    assert [r["type"] for r in events_of(spool, "j")].count("run_started") == 1


def test_crashed_workers_are_retried_with_back_off(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv", rows=3000)
    daemon_factory(spool, "--max-retries", "5")
    drop_job(spool, "j.json", seed_job(data, epochs=50, batch_size=4))
    for n in (1, 2):
        records = wait_for_event(spool, "j", "run_started", count=n)
        os.kill([r for r in records if r["type"] == "run_started"][-1]["pid"], signal.SIGKILL)
        wait_for_event(spool, "j", "interrupted", count=n)
    records = wait_for_event(spool, "j", "run_started", count=3)
    ts = lambda r: datetime.fromisoformat(r["ts"].replace("Z", "+00:00")).timestamp()
    crashes = [r for r in records if r["type"] == "interrupted"]
    started = [json.loads(l) for l in (spool / "daemon.jsonl").read_text().splitlines()]
    started = [e for e in started if e["event"] == "worker_started"]
    assert all(c["crash"] for c in crashes) and len(started) == 3
    assert 1.0 <= ts(started[1]) - ts(crashes[0]) < 5.0  # back-off 1 s after the first crash
    assert 2.0 <= ts(started[2]) - ts(crashes[1]) < 6.0  # then 2 s
    control.drop(Spool(spool), "j", "cancel")
    wait_for_status(spool, "j", "cancelled")


def test_startup_recovers_whatever_byte_the_last_write_was_torn_at(tmp_path):
    """A running job's log cut at every offset of its last record: the daemon's startup never
    fails, and the job is marked interrupted (or stays as its complete prefix says)."""
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    spool.job_dir("j").mkdir()
    with EventLog(spool.events_path("j")) as log:
        log.append(JobAccepted(job_id="j", source_file="j.json", spec={"priority": 0, "devices": "cpu"},
                               spec_sha256="", file_sha256=""))
    from daemon.events import RunStarted
    with EventLog(spool.events_path("j")) as log:
        log.append(RunStarted(attempt=1, pid=1, host="h", devices=["cpu"], framework="pytorch", versions={},
                              resumed_from=None, steps_per_epoch=3, train_samples=9, val_samples=0,
                              task="classification"))
    full = spool.events_path("j").read_bytes()
    last = full.rstrip(b"\n").rfind(b"\n") + 1
    for cut in list(range(last, len(full) + 1)) + [-1]:
        data = full[:cut] if cut >= 0 else full + b"\x00" * 512
        spool.events_path("j").write_bytes(data)
        daemon = Daemon(spool, Options(max_jobs=1, settings=Settings(tmp_path)))
        daemon.startup()
        daemon.waker.close()
        state = fold(events_of(spool.root, "j"))
        expected = "interrupted" if cut in (len(full), -1) else "pending"
        assert state.status == expected, (cut, state.status)
        assert daemon.entries["j"].status == expected


def test_a_second_sigterm_stops_at_once_and_the_job_resumes_later(tmp_path, spool, daemon_factory):
    """SIGTERM twice while the worker is still starting up (importing torch, reading a large
    CSV): the daemon kills it instead of waiting, exits 0, and the job completes after a restart."""
    data = classification_csv(tmp_path / "train.csv", rows=400_000)
    d = daemon_factory(spool)
    drop_job(spool, "j.json", seed_job(data, epochs=1, batch_size=4096))
    wait_until(lambda: '"event":"worker_started"' in (spool / "daemon.jsonl").read_text(), 30,
               what="the worker to be spawned")
    d.proc.send_signal(signal.SIGTERM)
    d.proc.send_signal(signal.SIGTERM)
    t = time.monotonic()
    assert d.proc.wait(30) == 0
    assert time.monotonic() - t < 5.0
    last = events_of(spool, "j")[-1]
    assert last["type"] == "interrupted" and last["reason"] == "worker stopped at shutdown before it could checkpoint"
    assert last["crash"] is False
    daemon_factory(spool)
    state = wait_for_status(spool, "j", "completed", timeout=120)
    assert [h["epoch"] for h in state.history] == [1]


def test_a_temp_file_is_removed_once_its_writer_died_even_before_anyone_reaped_it(tmp_path):
    """A worker that died mid-write is a zombie until its parent, or for an orphan init (slow,
    or in a container none at all), reaps it: its temp file is a leftover all the same. One
    whose writer still runs is kept."""
    import subprocess
    import sys

    from daemon.fsutil import remove_stale_temps
    write = "import os, sys; open(os.path.join(sys.argv[1], f'.c.pt.{os.getpid()}.tmp'), 'wb').write(b'x')"
    dead = subprocess.Popen([sys.executable, "-c", write, str(tmp_path)])
    wait_until(lambda: (tmp_path / f".c.pt.{dead.pid}.tmp").exists() and not alive(dead.pid), 30,
               what="the writer to die, unreaped")
    running = subprocess.Popen([sys.executable, "-c", write + "; sys.stdin.read()", str(tmp_path)],
                               stdin=subprocess.PIPE)
    try:
        wait_until(lambda: (tmp_path / f".c.pt.{running.pid}.tmp").exists(), 30, what="the live writer")
        assert remove_stale_temps(tmp_path) == [f".c.pt.{dead.pid}.tmp"]
        assert (tmp_path / f".c.pt.{running.pid}.tmp").exists()
    finally:
        running.communicate(b"")
        dead.wait()
