"""Device scheduling: each job gets the GPUs its `devices` asks for through
CUDA_VISIBLE_DEVICES, jobs run side by side on different GPUs, the rest queue, and a job asking
for GPUs the daemon does not have fails with a reason instead of waiting forever.

The daemon here believes it has two GPUs (EPOCHD_TEST_GPUS=2, read by `gpu_count`): what it
hands out is real, but on a machine without GPUs the workers see none, so the jobs are "auto"
ones, which fall back to the CPU, and scheduling is what is checked. (bench/gpu_check.py runs
jobs on real GPUs.)"""
import json
import os
import subprocess
import sys

import pytest

from daemon import control, scheduler
from daemon.replay import Status
from daemon.spool import Spool
from tests.conftest import (REPO, classification_csv, drop_job, events_of, seed_job, wait_for_event,
                            wait_for_status)

TWO_GPUS = {"EPOCHD_TEST_GPUS": "2"}


def run_of(spool, job_id) -> dict:
    return next(r for r in events_of(spool, job_id) if r["type"] == "run_started")


def entry(job_id, gpus=1, ids=(), priority=0, at="1", optional=False):
    return scheduler.Entry(job_id, Status.PENDING, priority, at, 0.0, 0, gpus=gpus,
                           gpu_ids=tuple(ids), gpu_optional=optional)


def test_jobs_get_free_gpus_in_order_and_a_waiting_job_keeps_what_it_waits_for():
    jobs = [entry("a", at="1"), entry("b", at="2"), entry("c", at="3"), entry("cpu", gpus=0, at="4")]
    assert scheduler.pick(jobs, 8, 0, [0, 1]) == [("a", (0,)), ("b", (1,)), ("cpu", ())]
    assert scheduler.pick(jobs, 8, 0, [0, 1], busy={0}) == [("a", (1,)), ("cpu", ())]
    # four GPUs, one busy: the two-GPU job ahead gets two, the list job gets exactly its own
    jobs = [entry("big", gpus=2, at="1"), entry("three", ids=[3], at="2"), entry("next", at="3")]
    assert scheduler.pick(jobs, 8, 0, [0, 1, 2, 3], busy={0}) == [("big", (1, 2)), ("three", (3,))]
    # the two-GPU job cannot start with one GPU free, and holds it: nothing behind takes it
    assert scheduler.pick(jobs, 8, 0, [0, 1, 2, 3], busy={0, 1, 2}) == []
    assert scheduler.pick([entry("big", gpus=2), entry("small", at="2")], 8, 0, [0, 1], busy={0}) == []
    # a list job waiting for GPU 1 holds only GPU 1 back; higher priority goes first
    jobs = [entry("one", ids=[1], at="1"), entry("any", at="2"), entry("vip", priority=5, at="3")]
    assert scheduler.pick(jobs[:2], 8, 0, [0, 1], busy={1}) == [("any", (0,))]
    assert scheduler.pick(jobs, 8, 0, [0, 1], busy={1}) == [("vip", (0,))]
    assert scheduler.pick(jobs, 1, 0, [0, 1]) == [("vip", (0,))]  # one slot left
    # "auto" on a machine without GPUs runs on the CPU; a GPU job there is started and its
    # worker says what it could not find
    assert scheduler.pick([entry("auto", optional=True), entry("cuda")], 8, 0, []) == [
        ("auto", ()), ("cuda", ())]


def test_a_job_asking_for_gpus_the_daemon_lacks_is_named_unmet():
    assert scheduler.unmet(entry("x", ids=[5]), [0, 1]).startswith("devices names GPU(s) [5]")
    assert "asks for 3 GPUs; this daemon has 2" in scheduler.unmet(entry("x", gpus=3), [0, 1])
    assert scheduler.unmet(entry("x", gpus=3), []) is None  # no GPUs: the worker reports it
    assert scheduler.unmet(entry("x", ids=[1]), [0, 1]) is None
    assert scheduler.pick([entry("x", ids=[5]), entry("y", at="2")], 8, 0, [0, 1]) == [("y", (0,))]


def test_jobs_share_out_the_gpus_queue_for_them_and_free_them_when_they_end(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv", rows=200)
    d = daemon_factory(spool, "--max-jobs", "4", env=TWO_GPUS)
    started = json.loads((spool / "daemon.jsonl").read_text().splitlines()[-1])
    assert started["gpus"] == [0, 1] and started["max_jobs"] == 4
    long = {"epochs": 100000, "algorithm_params": {"early_stopping_patience": None}}
    drop_job(spool, "a.json", seed_job(data, tmp_path / "a", **long))
    drop_job(spool, "b.json", seed_job(data, tmp_path / "b", **long))
    runs = {j: next(r for r in wait_for_event(spool, j, "run_started") if r["type"] == "run_started")
            for j in ("a", "b")}
    assert sorted(runs["a"]["gpus"] + runs["b"]["gpus"]) == [0, 1]
    assert runs["a"]["devices"] == ["cpu"]  # what trained: no GPU is visible on this machine
    # both GPUs busy: a GPU job and a job on GPU 1 wait, a CPU job runs beside them
    drop_job(spool, "c.json", seed_job(data, tmp_path / "c", epochs=1))
    drop_job(spool, "one.json", seed_job(data, tmp_path / "one", epochs=1, devices=[1]))
    drop_job(spool, "cpu.json", seed_job(data, tmp_path / "cpu", epochs=1, devices="cpu"))
    # never-placeable jobs fail at once, with the reason, and can be resumed later
    drop_job(spool, "five.json", seed_job(data, tmp_path / "five", epochs=1, devices=[5]))
    drop_job(spool, "three.json", seed_job(data, tmp_path / "three", epochs=1, devices=3,
                                             distributed={"processes": 3}))
    wait_for_status(spool, "cpu", "completed")
    assert run_of(spool, "cpu")["gpus"] == []
    for job, needle in (("five", "devices names GPU(s) [5], which this daemon does not have"),
                        ("three", "asks for 3 GPUs; this daemon has 2 ([0, 1])")):
        wait_for_status(spool, job, "failed")
        failed = next(r for r in events_of(spool, job) if r["type"] == "failed")
        assert failed["error"] == "DeviceUnavailable" and needle in failed["message"]
        assert failed["retryable"] is True
    s = Spool(spool)
    assert s.state("c").status == Status.PENDING and s.state("one").status == Status.PENDING
    # a ends: its GPU goes to the next GPU job in line
    holder_of_1 = "a" if runs["a"]["gpus"] == [1] else "b"
    other = "b" if holder_of_1 == "a" else "a"
    control.drop(s, other, "cancel")
    wait_for_status(spool, "c", "completed")
    assert run_of(spool, "c")["gpus"] == runs[other]["gpus"]
    assert s.state("one").status == Status.PENDING  # GPU 1 is still taken
    control.drop(s, holder_of_1, "cancel")
    # it asked for a GPU by index, so its worker, given GPU 1, finds no GPU on this machine
    wait_for_status(spool, "one", "failed")
    failed = next(r for r in events_of(spool, "one") if r["type"] == "failed")
    assert failed["error"] == "DeviceUnavailable" and "none is visible" in failed["message"]
    workers = [json.loads(line) for line in (spool / "daemon.jsonl").read_text().splitlines()]
    given = {w["job_id"]: w["gpus"] for w in workers if w["event"] == "worker_started"}
    assert given["one"] == [1] and given["cpu"] == [] and "five" not in given
    assert d.proc.poll() is None


def test_gpus_option_limits_the_daemon_to_the_gpus_it_names(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv", rows=100)
    for value, needle in (("0,2", "GPU(s) [2] do not exist: the driver reports 2"),
                          ("0,0", "expected distinct GPU indices"), ("one", 'got "one"')):
        out = subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--spool", str(spool),
                              "--gpus", value], capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, **TWO_GPUS}, timeout=60)
        assert out.returncode == 2 and needle in out.stderr, out.stderr
    daemon_factory(spool, "--gpus", "1", env=TWO_GPUS)
    drop_job(spool, "a.json", seed_job(data, tmp_path / "a", epochs=1))
    drop_job(spool, "b.json", seed_job(data, tmp_path / "b", epochs=1, devices=[0]))
    wait_for_status(spool, "a", "completed")
    assert run_of(spool, "a")["gpus"] == [1]
    wait_for_status(spool, "b", "failed")
    assert "devices names GPU(s) [0], which this daemon does not have (it has [1])" in next(
        r for r in events_of(spool, "b") if r["type"] == "failed")["message"]


@pytest.mark.slow
def test_a_worker_that_outlived_the_daemon_keeps_its_gpu(tmp_path, spool, daemon_factory):
    """The next daemon learns the GPU from the worker's run_started and gives it to no one
    else until that worker is done."""
    data = classification_csv(tmp_path / "train.csv", rows=200)
    one_gpu = {"EPOCHD_TEST_GPUS": "1"}
    d = daemon_factory(spool, "--max-jobs", "3", env=one_gpu)  # slots to spare: the GPU decides
    drop_job(spool, "j.json", seed_job(data, tmp_path / "j", epochs=100000,
                                       algorithm_params={"early_stopping_patience": None}))
    wait_for_event(spool, "j", "epoch_completed")
    d.kill()  # the daemon alone: its worker runs on in its own session
    daemon_factory(spool, "--max-jobs", "3", env=one_gpu)
    drop_job(spool, "k.json", seed_job(data, tmp_path / "k", epochs=1))
    drop_job(spool, "c.json", seed_job(data, tmp_path / "c", epochs=1, devices="cpu"))
    wait_for_status(spool, "c", "completed")  # the new daemon has been scheduling a while
    assert Spool(spool).state("k").status == Status.PENDING
    control.drop(Spool(spool), "j", "cancel")
    wait_for_status(spool, "k", "completed")
    assert run_of(spool, "j")["gpus"] == run_of(spool, "k")["gpus"] == [0]
