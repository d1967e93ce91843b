"""Per-job limits: past limits.wall_seconds or limits.memory_mb a job ends `failed` with the
numbers, while the daemon and the other jobs carry on."""
from daemon.replay import fold
from tests.conftest import (classification_csv, drop_job, events_of, seed_job, wait_for_status)


def long_job(data, out, **limits):
    return seed_job(data, out, epochs=1000, batch_size=2, algorithm_params={"hidden_units": [16]},
                    limits=limits)


def test_a_job_past_its_wall_time_fails_and_the_others_carry_on(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv", rows=8000)
    small = classification_csv(tmp_path / "small.csv")
    daemon_factory(spool, "--max-jobs", "2")
    drop_job(spool, "w.json", long_job(data, tmp_path / "w", wall_seconds=2))
    drop_job(spool, "ok.json", seed_job(small, tmp_path / "ok", epochs=2))
    state = wait_for_status(spool, "w", "failed", timeout=60)
    assert state.last_error["error"] == "WallTimeExceeded" and not state.last_error["retryable"]
    assert "past its limits.wall_seconds of 2" in state.last_error["message"]
    assert 2.0 <= state.running_seconds < 30  # from the log: run_started to its last event
    assert state.epochs_done < 1000
    wait_for_status(spool, "ok", "completed")


def test_a_job_past_its_memory_limit_is_stopped_and_the_others_carry_on(tmp_path, spool, daemon_factory):
    """64 MB is less than importing torch takes: the daemon kills the worker as it passes 80 MB."""
    data = classification_csv(tmp_path / "train.csv")
    d = daemon_factory(spool, "--max-jobs", "2")
    drop_job(spool, "m.json", long_job(data, tmp_path / "m", memory_mb=64))
    drop_job(spool, "ok.json", seed_job(data, tmp_path / "ok", epochs=2))
    state = wait_for_status(spool, "m", "failed", timeout=60)
    assert state.last_error["error"] == "MemoryLimitExceeded" and not state.last_error["retryable"]
    assert "past the job's limits.memory_mb of 64" in state.last_error["message"]
    assert "lower batch_size" in state.last_error["message"]
    assert state.crashes == 0  # not counted as a crash: it is not retried
    wait_for_status(spool, "ok", "completed")
    assert d.proc.poll() is None
    assert fold(events_of(spool, "m")).status == "failed"  # and it stays so: nothing restarts it


def test_the_memory_backstop_measures_every_process_of_a_worker_one_by_one(tmp_path):
    """A DDP job's ranks load its data, not their launcher: the daemon's backstop reads the RSS
    of each process in the worker's session. A small leader whose child holds 200 MB, under a
    50 MB limit, is killed with its whole session, and the message gives the child's RSS."""
    import subprocess
    import sys

    from daemon.spool import Settings, Spool
    from daemon.supervisor import Child, Daemon, Options
    from tests.conftest import wait_until
    child_code = "import time; block = bytearray(200 << 20); print('ready', flush=True); time.sleep(60)"
    leader = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, "
                               f"'-c', {child_code!r}]); time.sleep(60)"],
        start_new_session=True, stdout=subprocess.PIPE)
    try:
        assert leader.stdout.readline() == b"ready\n"  # the child holds its 200 MB
        daemon = Daemon(Spool(tmp_path / "spool"), Options(settings=Settings(tmp_path)))
        daemon.children["j"] = child = Child(leader, open(tmp_path / "log", "wb"), (), memory_mb=50)
        daemon.enforce_memory_limits()
        assert leader.wait(10) == -9
        from daemon.fsutil import session_processes
        wait_until(lambda: not session_processes(leader.pid), 10, what="the session to end")
        rss = float(child.killed_for.split("reached ")[1].split(" MB")[0])
        assert rss >= 200 and "past the job's limits.memory_mb of 50" in child.killed_for
        daemon.waker.close()
    finally:
        leader.kill()


def test_a_model_too_large_for_its_memory_is_refused_before_it_is_built(tmp_path, spool, daemon_factory):
    """hidden_units [65536, 65536, 65536] (a typo away from [64, 64, 64]) is 8.6e9 weights, 160 GiB
    to train with Adam: building it took the machine's memory until the kernel killed the worker,
    and the daemon retried it. The worker now adds up the parameters first. Here the bound is the
    job's limits.memory_mb: 8192-wide layers need 1.3 GiB."""
    data = classification_csv(tmp_path / "train.csv")
    daemon_factory(spool)
    drop_job(spool, "big.json", seed_job(data, tmp_path / "big", algorithm_params={"hidden_units": [8192, 8192]},
                                         limits={"memory_mb": 512}))
    drop_job(spool, "ok.json", seed_job(data, tmp_path / "ok", epochs=1, limits={"memory_mb": 4096}))
    state = wait_for_status(spool, "big", "failed")
    assert state.last_error["error"] == "ModelTooLarge" and not state.last_error["retryable"]
    assert ("the model is too large: 67,158,017 parameters (mlp, hidden_units [8192, 8192], 3 inputs) need "
            "about 1.3 GiB for its weights, gradients, adam's state and a copy, more than the job's "
            "limits.memory_mb (0.5 GiB). Expected: a model that fits; use fewer or narrower hidden "
            "layers, or raise limits.memory_mb.") == state.last_error["message"]
    assert [e["type"] for e in events_of(spool, "big")] == ["job_accepted", "failed"]  # as a data error
    wait_for_status(spool, "ok", "completed")


def test_the_memory_a_job_may_use_is_its_cgroups_where_that_is_less_than_the_machine(tmp_path):
    """systemd's MemoryMax= and a container's --memory bound a worker below what psutil reports;
    the model- and data-size checks use the least. Fake cgroup trees, v2 and v1."""
    import psutil

    from daemon.sysinfo import memory_bound
    machine = psutil.virtual_memory().total
    v2 = tmp_path / "v2"
    (v2 / "system.slice" / "epochd.service").mkdir(parents=True)
    (v2 / "system.slice" / "memory.max").write_text("max\n")
    (v2 / "system.slice" / "epochd.service" / "memory.max").write_text(f"{8 * 2**30}\n")
    assert memory_bound("0::/system.slice/epochd.service\n", str(v2)) == (
        8 * 2**30, f"the memory its cgroup allows ({v2}/system.slice/epochd.service/memory.max)")
    (v2 / "system.slice" / "memory.max").write_text(f"{4 * 2**30}\n")  # a parent's bound counts
    assert memory_bound("0::/system.slice/epochd.service\n", str(v2))[0] == 4 * 2**30
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)  # in a container: its own group is the mount itself
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2 * 2**30}\n")
    assert memory_bound("4:memory:/docker/abc\n1:cpu:/\n", str(v1))[0] == 2 * 2**30
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit
    assert memory_bound("4:memory:/docker/abc\n", str(v1)) == (machine, "this machine's memory")
    assert memory_bound("", str(tmp_path / "none")) == (machine, "this machine's memory")
