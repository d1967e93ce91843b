"""Data parallelism through the daemon. PyTorch DDP: two CPU ranks (gloo) started by torch's
elastic launcher train one job; rank 0 alone writes the log, checkpoints and outputs; pause and
resume reach every rank and resume bit for bit. TensorFlow MirroredStrategy: two replicas on two
logical CPU devices in one worker, the same guarantees. Several machines: two daemons on two
spools join one job over loopback, through DDP's rendezvous or MultiWorkerMirroredStrategy."""
import datetime
import json
import logging
import os
import signal
import socket
import threading

import numpy as np
import pytest

from daemon import control
from daemon.spool import Spool
from daemon.worker import Flags, fresh_rendezvous
from tests.conftest import (DaemonProcess, classification_csv, daemon_records, drop_job, events_of, last,
                            model_weights, same_weights, seed_job, wait_for_event, wait_for_status,
                            wait_until)

DDP = {"distributed": {"processes": 2}, "devices": "cpu"}


def test_two_ranks_train_as_one_process_with_their_global_batch(tmp_path, spool, daemon_factory):
    """2 ranks x 16 rows a step against one process with 32: the same updates (the step's
    rows split between the ranks, the gradients averaged), up to float rounding."""
    data = classification_csv(tmp_path / "train.csv", rows=1000)
    params = {"hidden_units": [16], "dropout_rate": 0.0}
    daemon_factory(spool, "--max-jobs", "2")
    drop_job(spool, "ddp.json", seed_job(data, tmp_path / "ddp", epochs=2, batch_size=16,
                                         algorithm_params=params, **DDP))
    drop_job(spool, "one.json", seed_job(data, tmp_path / "one", epochs=2, batch_size=32,
                                         algorithm_params=params, devices="cpu"))
    ddp = wait_for_status(spool, "ddp", "completed", timeout=180)
    one = wait_for_status(spool, "one", "completed", timeout=180)
    run = next(r for r in events_of(spool, "ddp") if r["type"] == "run_started")
    assert run["devices"] == ["cpu", "cpu"] and run["steps_per_epoch"] == 25  # 800 rows / 32
    a, b = model_weights(tmp_path / "ddp" / "model.safetensors"), model_weights(tmp_path / "one" / "model.safetensors")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert [h["train_accuracy"] for h in ddp.history] == [h["train_accuracy"] for h in one.history]
    assert [h["val_loss"] for h in ddp.history] == pytest.approx([h["val_loss"] for h in one.history], rel=1e-4)
    assert not list((tmp_path / "ddp").glob(".*.tmp"))


@pytest.mark.parametrize("streaming", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_pause_reaches_every_rank_and_the_resumed_run_ends_bit_for_bit(tmp_path, spool, daemon_factory, streaming):
    """Dropout on, so each rank's RNG state must come back from the checkpoint too. Streaming:
    the ranks' per-step hit sums too, from chunks of 1,000 rows."""
    data = classification_csv(tmp_path / "train.csv", rows=8000)  # 1,600 steps an epoch, seconds
    extra = {"data": {"streaming": True, "chunk_rows": 1000, "shuffle_chunks": 2}} if streaming else {}
    job = lambda out: seed_job(data, out, epochs=2, batch_size=2, algorithm_params={"hidden_units": [16]},
                               **DDP) | extra
    daemon_factory(spool, "--max-jobs", "2")
    drop_job(spool, "ref.json", job(tmp_path / "ref"))
    drop_job(spool, "p.json", job(tmp_path / "p"))
    wait_for_event(spool, "p", "progress", timeout=180)
    control.drop(Spool(spool), "p", "pause")
    paused = [r for r in wait_for_event(spool, "p", "paused") if r["type"] == "paused"][0]
    assert paused["step"] > 0 and paused["checkpoint"]
    control.drop(Spool(spool), "p", "resume")
    state = wait_for_status(spool, "p", "completed", timeout=240)
    runs = [r for r in events_of(spool, "p") if r["type"] == "run_started"]
    assert len(runs) == 2 and runs[1]["resumed_from"]["step"] == paused["step"]
    assert [h["epoch"] for h in state.history] == [1, 2]
    ref = wait_for_status(spool, "ref", "completed", timeout=240)
    assert same_weights(model_weights(tmp_path / "ref" / "model.safetensors"),
                        model_weights(tmp_path / "p" / "model.safetensors"))
    assert [h["train_loss"] for h in ref.history] == [h["train_loss"] for h in state.history]


@pytest.mark.slow
def test_a_rank_killed_mid_run_is_a_crash_that_resumes_from_the_last_checkpoint(tmp_path, spool, daemon_factory):
    """kill -9 of rank 1 alone: the launcher stops rank 0, the daemon records a crash and
    retries, and the job still ends with an untouched run's weights."""
    import psutil
    data = classification_csv(tmp_path / "train.csv", rows=12000)
    job = lambda out, **kw: seed_job(data, out, epochs=2, batch_size=2,
                                     algorithm_params={"hidden_units": [16]}, **DDP, **kw)
    daemon_factory(spool, "--max-jobs", "2")
    drop_job(spool, "ref.json", job(tmp_path / "ref"))
    drop_job(spool, "k.json", job(tmp_path / "k", checkpoint={"every_seconds": 0.5}))
    wait_for_event(spool, "k", "checkpoint_saved", timeout=180)
    rank0 = psutil.Process(next(r["pid"] for r in events_of(spool, "k") if r["type"] == "run_started"))
    # the other rank: rank 0's sibling that the launcher spawned (not multiprocessing's tracker)
    rank1 = [p for p in rank0.parent().children()
             if p.pid != rank0.pid and "spawn_main" in " ".join(p.cmdline())]
    assert len(rank1) == 1
    os.kill(rank1[0].pid, signal.SIGKILL)
    state = wait_for_status(spool, "k", "completed", timeout=300)
    interrupted = [r for r in events_of(spool, "k") if r["type"] == "interrupted"]
    assert interrupted and interrupted[0]["crash"]
    assert [h["epoch"] for h in state.history] == [1, 2]
    wait_for_status(spool, "ref", "completed", timeout=300)
    assert same_weights(model_weights(tmp_path / "ref" / "model.safetensors"),
                        model_weights(tmp_path / "k" / "model.safetensors"))


def test_a_launcher_killed_mid_run_leaves_a_clean_log_and_the_job_resumes(tmp_path, spool, daemon_factory):
    """kill -9 of the worker that launched the ranks: torch sends them SIGINT as their parent
    dies, and rank 0 checkpoints and writes its last events as it stops. The daemon records the
    crash only once they have ended, so the log keeps one writer at a time (its seqs follow on,
    and it folds), and the job resumes from the checkpoint rank 0 wrote last."""
    import psutil
    data = classification_csv(tmp_path / "train.csv", rows=6000)
    daemon_factory(spool)
    drop_job(spool, "k.json", seed_job(data, tmp_path / "k", epochs=2, batch_size=2, algorithm_params={
        "hidden_units": [16]}, checkpoint={"every_seconds": 0.5}, **DDP))
    wait_for_event(spool, "k", "checkpoint_saved", timeout=180)
    rank0 = psutil.Process(next(r["pid"] for r in events_of(spool, "k") if r["type"] == "run_started"))
    launcher = rank0.parent()
    assert "daemon.worker" in " ".join(launcher.cmdline()), launcher.cmdline()
    launcher.kill()
    state = wait_for_status(spool, "k", "completed", timeout=300)
    records = events_of(spool, "k")
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    stops = [r for r in records if r["type"] == "interrupted"]
    assert [(r["reason"], r["crash"]) for r in stops] == [
        ("shutdown", False), ("worker killed by signal SIGKILL", True)]
    resumed = [r["resumed_from"] for r in records if r["type"] == "run_started"][1]
    assert resumed["checkpoint"] == stops[0]["checkpoint"] and stops[1]["step"] == stops[0]["step"]
    assert [h["epoch"] for h in state.history] == [1, 2]


def can_be_pid_1() -> bool:
    import subprocess
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not can_be_pid_1(), reason="needs unshare --pid (root, or user namespaces)")
def test_as_a_containers_pid_1_the_daemon_reaps_the_ranks_a_killed_launcher_leaves(tmp_path, spool):
    """In a container without an init, the daemon is PID 1 and adopts every orphan: the ranks of
    a launcher killed with kill -9 end as its children. It reaps them (no zombies left) and
    still waits for them before it records the crash."""
    import subprocess
    import sys

    import psutil

    from tests.conftest import REPO, kill_workers
    data = classification_csv(tmp_path / "train.csv", rows=6000)
    Spool(spool).ensure()
    box = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable,
                            "-m", "daemon.cli", "serve", "--spool", str(spool), "--rescan-seconds", "0.5"],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "daemon.err", "wb"))
    try:
        wait_until(lambda: (spool / "daemon.jsonl").exists() and any(
            r["event"] == "started" and r["pid"] == 1 for r in daemon_records(spool)), 30, what="PID 1")
        daemon = wait_until(lambda: psutil.Process(box.pid).children(), 10)[0]
        drop_job(spool, "k.json", seed_job(data, tmp_path / "k", epochs=2, batch_size=2, algorithm_params={
            "hidden_units": [16]}, checkpoint={"every_seconds": 0.5}, **DDP))
        wait_for_event(spool, "k", "checkpoint_saved", timeout=180)
        launcher = next(p for p in daemon.children() if "daemon.worker" in " ".join(p.cmdline()))
        launcher.kill()
        wait_until(lambda: sum(r["type"] == "run_started" for r in events_of(spool, "k")) == 2, 120,
                   what="the job to run again")
        zombies = lambda: [p.pid for p in daemon.children() if p.status() == psutil.STATUS_ZOMBIE]
        wait_until(lambda: not zombies(), 10, what="the adopted ranks to be reaped")
        state = wait_for_status(spool, "k", "completed", timeout=300)
        assert [h["epoch"] for h in state.history] == [1, 2]
        records = events_of(spool, "k")
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
        daemon.terminate()
        assert box.wait(60) == 0
    finally:
        box.kill()
        kill_workers(spool)


MIRRORED = {"framework": "tensorflow", "distributed": {"strategy": "mirrored", "replicas": 2}, "devices": "cpu"}


def test_two_mirrored_replicas_train_as_one_device_with_their_global_batch(tmp_path, spool, daemon_factory):
    """TensorFlow, 2 replicas x 2 micro-batches x 4 rows a step against one device with 16 rows:
    the same updates (L2 weight decay included, which each replica adds its share of)."""
    data = classification_csv(tmp_path / "train.csv", rows=1000)
    params = {"hidden_units": [16], "dropout_rate": 0.0}
    adam = {"name": "adam", "weight_decay": 0.01}
    daemon_factory(spool, "--max-jobs", "2")
    drop_job(spool, "mir.json", seed_job(data, tmp_path / "mir", epochs=2, batch_size=4,
                                         gradient_accumulation_steps=2, optimizer=adam,
                                         algorithm_params=params, **MIRRORED))
    drop_job(spool, "one.json", seed_job(data, tmp_path / "one", epochs=2, batch_size=16, optimizer=adam,
                                         algorithm_params=params, framework="tensorflow", devices="cpu"))
    mir = wait_for_status(spool, "mir", "completed", timeout=180)
    one = wait_for_status(spool, "one", "completed", timeout=180)
    run = next(r for r in events_of(spool, "mir") if r["type"] == "run_started")
    assert run["devices"] == ["cpu", "cpu"] and run["steps_per_epoch"] == 50  # 800 rows / 16
    a, b = model_weights(tmp_path / "mir" / "model.weights.h5"), model_weights(tmp_path / "one" / "model.weights.h5")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert [h["train_accuracy"] for h in mir.history] == [h["train_accuracy"] for h in one.history]
    assert [h["val_loss"] for h in mir.history] == pytest.approx([h["val_loss"] for h in one.history], rel=1e-4)


@pytest.mark.slow
def test_a_mirrored_job_paused_mid_epoch_resumes_bit_for_bit(tmp_path, spool, daemon_factory):
    """Dropout on: the replicas' seed-generator states come back from the checkpoint too."""
    data = classification_csv(tmp_path / "train.csv", rows=8000)  # 3,200 steps an epoch, seconds
    job = lambda out: seed_job(data, out, epochs=2, batch_size=1, algorithm_params={"hidden_units": [16]},
                               **MIRRORED)
    daemon_factory(spool, "--max-jobs", "2")
    drop_job(spool, "ref.json", job(tmp_path / "ref"))
    drop_job(spool, "p.json", job(tmp_path / "p"))
    wait_for_event(spool, "p", "progress", timeout=180)
    control.drop(Spool(spool), "p", "pause")
    paused = [r for r in wait_for_event(spool, "p", "paused") if r["type"] == "paused"][0]
    assert 0 < paused["step"] < 3200 and paused["checkpoint"]
    control.drop(Spool(spool), "p", "resume")
    state = wait_for_status(spool, "p", "completed", timeout=300)
    runs = [r for r in events_of(spool, "p") if r["type"] == "run_started"]
    assert len(runs) == 2 and runs[1]["resumed_from"]["step"] == paused["step"]
    ref = wait_for_status(spool, "ref", "completed", timeout=300)
    assert same_weights(model_weights(tmp_path / "ref" / "model.weights.h5"),
                        model_weights(tmp_path / "p" / "model.weights.h5"))
    assert [h["train_loss"] for h in ref.history] == [h["train_loss"] for h in state.history]


def two_machine_spools(tmp_path) -> list:
    """The spools of two machines' daemons (node 0's, node 1's), ready to serve."""
    spools = [tmp_path / f"node{k}" / "spool" for k in range(2)]
    for s in spools:
        Spool(s).ensure()
    return spools


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_store(port: int):
    """What node 0's launcher hosts at rdzv_endpoint: a TCPStore server."""
    from torch.distributed import TCPStore
    return TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                    timeout=datetime.timedelta(seconds=30))


def test_a_machine_waits_out_node_0s_finished_rendezvous_and_joins_the_next(caplog):
    """Node 0's store of a finished attempt is still up when node 1's daemon comes back: node 1
    has been to it before, so it waits (visiting again and again) until node 0 hosts a new
    store on the same port, and joins that one."""
    caplog.set_level(logging.INFO, logger="epochd.worker")
    port = free_port()
    hosted = [rendezvous_store(port)]  # the earlier attempt's
    assert fresh_rendezvous("j", f"127.0.0.1:{port}", 1, 30, Flags())  # the earlier attempt's visit
    done = []
    waiting = threading.Thread(target=lambda: done.append(
        fresh_rendezvous("j", f"127.0.0.1:{port}", 1, 60, Flags())), daemon=True)
    waiting.start()
    wait_until(lambda: int(hosted[0].get("epochd/visited/node1")) >= 3, 30,
               what="node 1 to visit the old store again")
    assert waiting.is_alive() and not done
    assert "still serves an earlier attempt" in caplog.text
    hosted[0] = None  # node 0's launcher exits (the store's last reference) ...
    hosted[0] = rendezvous_store(port)  # ... and its next attempt hosts a new store
    waiting.join(60)
    assert done == [True]
    assert int(hosted[0].get("epochd/visited/node1")) == 1
    assert fresh_rendezvous("j", f"127.0.0.1:{port}", 2, 30, Flags())  # another machine's first visit


def test_a_machine_waiting_for_node_0_gives_up_after_rdzv_timeout_or_at_shutdown():
    port = free_port()
    store = rendezvous_store(port)
    assert fresh_rendezvous("j", f"127.0.0.1:{port}", 1, 30, Flags())
    with pytest.raises(TimeoutError, match=rf"127.0.0.1:{port} did not start a new attempt within rdzv_timeout"):
        fresh_rendezvous("j", f"127.0.0.1:{port}", 1, 1.5, Flags())
    del store
    flags = Flags()
    flags.shutdown = True  # SIGTERM while nobody listens on the port
    assert fresh_rendezvous("j", f"127.0.0.1:{port}", 1, 30, flags) is False
    with pytest.raises(TimeoutError):
        fresh_rendezvous("j", f"127.0.0.1:{port}", 1, 1.0, Flags())


def two_node_job(data, out, node_rank: int, port: int, **overrides) -> dict:
    dist = {"strategy": "ddp", "processes": 1, "nnodes": 2, "node_rank": node_rank,
            "rdzv_endpoint": f"127.0.0.1:{port}", "rdzv_id": "two-nodes", "rdzv_timeout": 120}
    return seed_job(data, out, **{"epochs": 2, "batch_size": 16, "devices": "cpu", "distributed": dist,
                                  "algorithm_params": {"hidden_units": [16], "dropout_rate": 0.0},
                                  **overrides})


def test_one_job_on_two_machines_two_daemons_one_rendezvous(tmp_path):
    """Two daemons, each on its own spool (two machines), each given the job with its
    node_rank, meet at node 0's rendezvous on loopback: one DDP job of two ranks. Each machine
    writes its own log, checkpoints and outputs; both end with the same weights, which are a
    single process's with the global batch."""
    data = classification_csv(tmp_path / "train.csv", rows=1000)
    port = free_port()
    spools = two_machine_spools(tmp_path)
    daemons = [DaemonProcess(s) for s in spools]
    try:
        for k, spool in enumerate(spools):
            drop_job(spool, "j.json", two_node_job(data, tmp_path / f"out{k}", k, port))
        states = [wait_for_status(spool, "j", "completed", timeout=240) for spool in spools]
        drop_job(spools[0], "one.json", seed_job(data, tmp_path / "one", epochs=2, batch_size=32, devices="cpu",
                                                 algorithm_params={"hidden_units": [16], "dropout_rate": 0.0}))
        wait_for_status(spools[0], "one", "completed", timeout=120)
    finally:
        for d in daemons:
            d.stop()
    for k, (spool, state) in enumerate(zip(spools, states)):
        run = next(r for r in events_of(spool, "j") if r["type"] == "run_started")
        assert run["devices"] == ["cpu", "cpu"] and run["steps_per_epoch"] == 25  # 800 rows / 32
        assert [h["epoch"] for h in state.history] == [1, 2]
        assert list((spool / "jobs" / "j" / "checkpoints").glob("*.pt"))  # each machine its own
        assert (spool / "jobs" / "j" / "ranks").is_dir()
    a, b = (model_weights(tmp_path / f"out{k}" / "model.safetensors") for k in (0, 1))
    assert same_weights(a, b)
    assert [h["train_loss"] for h in states[0].history] == [h["train_loss"] for h in states[1].history]
    one = model_weights(tmp_path / "one" / "model.safetensors")
    for k in a:
        np.testing.assert_allclose(a[k], one[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_the_machines_of_a_job_differ_only_where_each_has_its_own_setting():
    from types import SimpleNamespace

    from daemon.worker import machine_differences, machine_fingerprint
    spec = {"epochs": 2, "batch_size": 16, "output_path": "/a", "train_data_path": "/d/a.csv", "devices": [0, 1],
            "optimizer": {"name": "adam", "lr": 0.1}, "distributed": {"nnodes": 2, "node_rank": 0, "rdzv_timeout": 60}}
    data = SimpleNamespace(n_train=800, n_val=200, preprocess={"mean": [0.5], "input_dim": 1})
    other = {**spec, "output_path": "/b", "train_data_path": "/e/b.csv", "devices": [2, 3],
             "distributed": {"nnodes": 2, "node_rank": 1, "rdzv_timeout": 90}}
    same = machine_differences({0: machine_fingerprint(spec, data), 1: machine_fingerprint(other, data)})
    assert same == []
    other |= {"batch_size": 32, "optimizer": {"name": "adam", "lr": 0.2}, "devices": 1}
    other_data = SimpleNamespace(n_train=800, n_val=200, preprocess={"mean": [0.6], "input_dim": 1})
    differences = machine_differences({0: machine_fingerprint(spec, data), 1: machine_fingerprint(other, other_data)})
    assert differences[0] == "batch_size: 16 on node 0, 32 on node 1"
    assert "optimizer.lr: 0.1 on node 0, 0.2 on node 1" in differences
    assert any(d.startswith("data (preprocessing fitted on it): ") for d in differences)
    assert 'devices: "2 GPU(s)" on node 0, "1 GPU(s)" on node 1' in differences
    assert len(differences) == 4


@pytest.mark.slow
@pytest.mark.slow
def test_a_machine_waiting_for_the_others_pauses_cancels_and_stops_at_once(tmp_path):
    """Node 1's machine waits for a node 0 that never comes, and node 0's for a node 1 that
    never comes (`rdzv_timeout` 600 s). `status` says so; a pause on node 1, a cancel on node
    0 and a SIGTERM of node 1's daemon each take effect within seconds, not after the wait.
    Node 1's daemon rescans only hourly: the pause is carried out because its worker left."""
    from click.testing import CliRunner
    from daemon.cli import cli
    data = classification_csv(tmp_path / "train.csv", rows=200)
    spools = two_machine_spools(tmp_path)
    ports = [free_port(), free_port()]  # each machine its own endpoint: they never meet
    daemons = [DaemonProcess(spools[0]), DaemonProcess(spools[1], "--rescan-seconds", "3600")]
    try:
        for k in (0, 1):
            job = two_node_job(data, tmp_path / f"out{k}", k, ports[k])
            job["distributed"]["rdzv_timeout"] = 600
            drop_job(spools[k], "j.json", job)
        for k in (0, 1):
            wait_until(lambda: any(r["event"] == "worker_started" for r in daemon_records(spools[k])), 60,
                       what=f"node {k}'s worker")
            shown = CliRunner().invoke(cli, ["status", "--spool", str(spools[k]), "j"]).output
            assert (f"waits for the other machines at the rendezvous 127.0.0.1:{ports[k]}, as node {k} of 2"
                    in shown), shown
            worker = json.loads(CliRunner().invoke(cli, ["status", "--spool", str(spools[k]), "j", "--json"]).output)
            assert worker["status"] == "pending" and worker["worker"]["pid"] > 0
        wait_until(lambda: "starting 1 DDP ranks on node 0" in (spools[0] / "jobs/j/worker.log").read_text(),
                   60, what="node 0 to host its rendezvous")
        control.drop(Spool(spools[1]), "j", "pause")
        control.drop(Spool(spools[0]), "j", "cancel")
        wait_for_status(spools[1], "j", "paused", timeout=30)
        wait_for_status(spools[0], "j", "cancelled", timeout=30)
        control.drop(Spool(spools[1]), "j", "resume")
        wait_until(lambda: (spools[1] / "jobs/j/worker.log").read_text().count("looks for node 0's rendezvous")
                   == 2, 60, what="node 1's worker to wait again")
        assert daemons[1].stop(timeout=30) == 0  # its worker left the wait at once: not killed
    finally:
        for d in daemons:
            d.stop()
    for k in (0, 1):
        assert "leaving before the run starts" in (spools[k] / "jobs/j/worker.log").read_text()
        assert not [r for r in events_of(spools[k], "j") if r["type"] in ("run_started", "interrupted", "failed")]
    assert events_of(spools[1], "j")[-1]["type"] == "resumed"  # pending again, for the next start


def test_machines_given_different_job_files_fail_together_naming_the_difference(tmp_path):
    """Node 1's job file has another batch_size: both machines fail at the start, before any
    step, each saying what differs, instead of hanging in a collective."""
    data = classification_csv(tmp_path / "train.csv", rows=200)
    port = free_port()
    spools = two_machine_spools(tmp_path)
    daemons = [DaemonProcess(s) for s in spools]
    try:
        for k, spool in enumerate(spools):
            drop_job(spool, "j.json", two_node_job(data, tmp_path / f"out{k}", k, port, batch_size=16 * (k + 1)))
        failures = [last(wait_for_event(s, "j", "failed", timeout=180), "failed") for s in spools]
    finally:
        for d in daemons:
            d.stop()
    for failed in failures:
        assert failed["error"] == "MachinesDisagree" and not failed["retryable"]
        assert "batch_size: 16 on node 0, 32 on node 1" in failed["message"]
    assert not any(r["type"] == "epoch_completed" for s in spools for r in events_of(s, "j"))


@pytest.mark.slow
def test_two_machines_pause_together_stop_together_and_resume_bit_for_bit(tmp_path):
    """A pause dropped on node 0 pauses both machines at one step (in epoch 2). Node 1's pause
    checkpoint is then damaged: resumed on each machine, node 1 falls back to its end-of-epoch-1
    checkpoint and node 0 goes back there with it. Then node 1's daemon is stopped (SIGTERM):
    both machines checkpoint and stop at one step; node 0's daemon retries at once and waits at
    the rendezvous until node 1's daemon is back. The weights at the end are an undisturbed
    run's (one machine, two ranks)."""
    data = classification_csv(tmp_path / "train.csv", rows=8000)  # 1,600 steps an epoch, seconds
    port = free_port()
    spools = two_machine_spools(tmp_path)
    params = {"batch_size": 2, "algorithm_params": {"hidden_units": [16]}}
    daemons = [DaemonProcess(s) for s in spools]
    try:
        for k, spool in enumerate(spools):
            drop_job(spool, "j.json", two_node_job(data, tmp_path / f"out{k}", k, port, **params))
        wait_until(lambda: any(r["type"] == "progress" and r["epoch"] == 2 for r in events_of(spools[0], "j")),
                   180, what="node 0 in epoch 2")
        control.drop(Spool(spools[0]), "j", "pause")
        paused = [last(wait_for_event(s, "j", "paused"), "paused") for s in spools]
        assert paused[0]["step"] == paused[1]["step"] > 0 and paused[0]["epoch"] == paused[1]["epoch"] == 2
        damaged = spools[1] / "jobs" / "j" / paused[1]["checkpoint"]
        damaged.write_bytes(damaged.read_bytes()[:-100] + bytes(100))
        for s in spools:
            control.drop(Spool(s), "j", "resume")
        runs = [last(wait_for_event(s, "j", "run_started", count=2), "run_started") for s in spools]
        assert [r["resumed_from"]["epoch"] for r in runs] == [1, 1]  # both from the end of epoch 1
        assert [r["resumed_from"]["step"] for r in runs] == [runs[0]["steps_per_epoch"]] * 2
        wait_for_event(spools[1], "j", "progress", count=len([r for r in events_of(spools[1], "j")
                                                               if r["type"] == "progress"]) + 1, timeout=180)
        daemons[1].stop()  # SIGTERM: node 1's ranks checkpoint, and node 0's stop with them
        stops = [next(r for r in reversed(events_of(s, "j")) if r["type"] == "interrupted") for s in spools]
        assert stops[0]["reason"] == stops[1]["reason"] == "shutdown"
        assert (stops[0]["epoch"], stops[0]["step"]) == (stops[1]["epoch"], stops[1]["step"])
        daemons[1] = DaemonProcess(spools[1])
        states = [wait_for_status(s, "j", "completed", timeout=300) for s in spools]
        drop_job(spools[0], "ref.json", seed_job(data, tmp_path / "ref", epochs=2, devices="cpu",
                                                 distributed={"processes": 2}, **params))
        wait_for_status(spools[0], "ref", "completed", timeout=300)
    finally:
        for d in daemons:
            d.stop()
    for state in states:
        assert [h["epoch"] for h in state.history] == [1, 2]
    for s in spools:  # the run, the resumed run, the one after the restart: no rendezvous failed
        exits = [r for r in daemon_records(s) if r["event"] == "worker_exited" and r["job_id"] == "j"]
        assert len(exits) == 3, (s, exits)
    assert any(r["type"] == "checkpoint_rejected" for r in events_of(spools[1], "j"))
    ref = model_weights(tmp_path / "ref" / "model.safetensors")
    for k in (0, 1):
        assert same_weights(model_weights(tmp_path / f"out{k}" / "model.safetensors"), ref)


def two_worker_job(data, out, node_rank: int, ports: list[int], **overrides) -> dict:
    dist = {"strategy": "mirrored", "workers": [f"127.0.0.1:{p}" for p in ports], "node_rank": node_rank,
            "rdzv_timeout": 120}
    return seed_job(data, out, **{"epochs": 2, "batch_size": 16, "devices": "cpu", "distributed": dist,
                                  "framework": "tensorflow",
                                  "algorithm_params": {"hidden_units": [16], "dropout_rate": 0.0},
                                  **overrides})


def test_one_tensorflow_job_on_two_machines_multi_worker_mirrored(tmp_path):
    """TensorFlow on two machines: two daemons on two spools, each given the job with its
    node_rank and the list of both machines' addresses, run one MultiWorkerMirroredStrategy of
    two replicas. Each machine writes its own log, checkpoints and outputs; both end with the
    weights of two mirrored replicas in one process."""
    data = classification_csv(tmp_path / "train.csv", rows=1000)
    ports = [free_port(), free_port()]
    spools = two_machine_spools(tmp_path)
    daemons = [DaemonProcess(s) for s in spools]
    try:
        for k, spool in enumerate(spools):
            drop_job(spool, "j.json", two_worker_job(data, tmp_path / f"out{k}", k, ports))
        states = [wait_for_status(spool, "j", "completed", timeout=240) for spool in spools]
        drop_job(spools[0], "ref.json", seed_job(data, tmp_path / "ref", epochs=2, batch_size=16, devices="cpu",
                                                 framework="tensorflow", distributed={"strategy": "mirrored"},
                                                 algorithm_params={"hidden_units": [16], "dropout_rate": 0.0}))
        wait_for_status(spools[0], "ref", "completed", timeout=180)
    finally:
        for d in daemons:
            d.stop()
    for spool, state in zip(spools, states):
        run = next(r for r in events_of(spool, "j") if r["type"] == "run_started")
        assert run["devices"] == ["cpu"] and run["steps_per_epoch"] == 25  # 800 rows / (2 x 16)
        assert [h["epoch"] for h in state.history] == [1, 2]
        assert list((spool / "jobs" / "j" / "checkpoints").glob("*.h5"))  # each machine its own
    a, b = (model_weights(tmp_path / f"out{k}" / "model.weights.h5") for k in (0, 1))
    assert same_weights(a, b)
    assert [h["train_loss"] for h in states[0].history] == [h["train_loss"] for h in states[1].history]
    ref = model_weights(tmp_path / "ref" / "model.weights.h5")
    for k in a:
        np.testing.assert_allclose(a[k], ref[k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.slow
def test_a_tensorflow_machine_whose_partner_never_comes_waits_again_and_takes_a_pause(tmp_path):
    """Node 1 of a TensorFlow job alone: each rdzv_timeout (10 s) without node 0 ends its worker
    with no crash on record (it would fail the job after --max-retries), the daemon starts it
    again, and a pause made meanwhile is carried out when that wait ends."""
    data = classification_csv(tmp_path / "train.csv", rows=200)
    spools = two_machine_spools(tmp_path)
    daemon = DaemonProcess(spools[1], "--max-retries", "1")
    try:
        job = two_worker_job(data, tmp_path / "out1", 1, [free_port(), free_port()])
        job["distributed"]["rdzv_timeout"] = 10
        drop_job(spools[1], "j.json", job)
        wait_until(lambda: sum(r["event"] == "worker_started" for r in daemon_records(spools[1])) == 3, 180,
                   what="node 1's worker to start a third time")
        control.drop(Spool(spools[1]), "j", "pause")
        wait_for_status(spools[1], "j", "paused", timeout=90)
    finally:
        daemon.stop()
    assert (spools[1] / "jobs/j/worker.log").read_text().count("did not all register within rdzv_timeout") >= 2
    assert not [r for r in events_of(spools[1], "j") if r["type"] in ("run_started", "interrupted", "failed")]


@pytest.mark.slow
def test_a_port_another_program_holds_fails_the_job_until_it_is_free_then_resume_runs_it(tmp_path):
    """Node 0's entry in workers names a port another program listens on: node 0's run fails at
    once, retryable, saying which port and what to do; freed, `resume` runs the job with node 1."""
    data = classification_csv(tmp_path / "train.csv", rows=200)
    spools = two_machine_spools(tmp_path)
    daemons = [DaemonProcess(spools[0])]
    try:
        with socket.socket() as held:
            held.bind(("", 0))
            held.listen()
            ports = [held.getsockname()[1], free_port()]
            drop_job(spools[0], "j.json", two_worker_job(data, tmp_path / "out0", 0, ports))
            wait_for_status(spools[0], "j", "failed", timeout=120)
        failed = last(events_of(spools[0], "j"), "failed")
        assert failed["error"] == "PortInUse" and failed["retryable"], failed
        assert f"port {ports[0]}" in failed["message"] and 'epochd resume j' in failed["message"]
        daemons.append(DaemonProcess(spools[1]))
        drop_job(spools[1], "j.json", two_worker_job(data, tmp_path / "out1", 1, ports))
        control.drop(Spool(spools[0]), "j", "resume")
        for s in spools:
            wait_for_status(s, "j", "completed", timeout=180)
    finally:
        for d in daemons:
            d.stop()


@pytest.mark.slow
def test_two_tensorflow_machines_pause_together_stop_together_and_resume_bit_for_bit(tmp_path):
    """The multi-worker job paused on node 0 pauses both machines at one step; resumed on
    both, node 1's daemon is stopped (SIGTERM) and both checkpoint and stop at one step; node 0
    waits for node 1's daemon to come back. Then node 1's worker is killed (-9): node 0's run
    fails in its next collective, both daemons record a crash and retry, and the machines meet
    again. Dropout on: the end is an undisturbed run's."""
    data = classification_csv(tmp_path / "train.csv", rows=8000)  # 1,600 steps an epoch, seconds
    ports = [free_port(), free_port()]
    spools = two_machine_spools(tmp_path)
    params = {"epochs": 4, "batch_size": 2, "algorithm_params": {"hidden_units": [16], "dropout_rate": 0.2}}
    daemons = [DaemonProcess(s) for s in spools]
    try:
        for k, spool in enumerate(spools):
            drop_job(spool, "j.json", two_worker_job(data, tmp_path / f"out{k}", k, ports, **params))
        wait_for_event(spools[0], "j", "progress", timeout=180)
        control.drop(Spool(spools[0]), "j", "pause")
        paused = [last(wait_for_event(s, "j", "paused"), "paused") for s in spools]
        assert (paused[0]["epoch"], paused[0]["step"]) == (paused[1]["epoch"], paused[1]["step"])
        assert paused[0]["step"] > 0
        for s in spools:
            control.drop(Spool(s), "j", "resume")
        for s in spools:
            wait_for_event(s, "j", "run_started", count=2)
        wait_for_event(spools[1], "j", "progress", count=len([r for r in events_of(spools[1], "j")
                                                               if r["type"] == "progress"]) + 1, timeout=180)
        daemons[1].stop()
        stops = [next(r for r in reversed(events_of(s, "j")) if r["type"] == "interrupted") for s in spools]
        assert stops[0]["reason"] == stops[1]["reason"] == "shutdown"
        assert (stops[0]["epoch"], stops[0]["step"]) == (stops[1]["epoch"], stops[1]["step"])
        daemons[1] = DaemonProcess(spools[1])
        runs = [last(wait_for_event(s, "j", "run_started", count=3, timeout=180), "run_started") for s in spools]
        wait_for_event(spools[1], "j", "progress", count=len([r for r in events_of(spools[1], "j")
                                                               if r["type"] == "progress"]) + 1, timeout=180)
        os.kill(runs[1]["pid"], signal.SIGKILL)  # node 1's worker dies; node 0's sees it go
        states = [wait_for_status(s, "j", "completed", timeout=300) for s in spools]
        for k, spool in enumerate(spools):
            drop_job(spool, "ref.json", two_worker_job(data, tmp_path / f"ref{k}", k, ports, **params))
        for s in spools:
            wait_for_status(s, "ref", "completed", timeout=300)
    finally:
        for d in daemons:
            d.stop()
    for spool, state in zip(spools, states):
        assert [h["epoch"] for h in state.history] == [1, 2, 3, 4]
        assert any(r["type"] == "interrupted" and r["crash"] for r in events_of(spool, "j"))
    ref = model_weights(tmp_path / "ref0" / "model.weights.h5")
    for k in (0, 1):
        assert same_weights(model_weights(tmp_path / f"out{k}" / "model.weights.h5"), ref)
    assert same_weights(model_weights(tmp_path / "ref1" / "model.weights.h5"), ref)


@pytest.mark.parametrize("framework, dist", [
    ("pytorch", {"strategy": "ddp", "processes": 2}),
    ("tensorflow", {"strategy": "mirrored", "replicas": 2})])
def test_streaming_data_parallel_equals_one_process_streaming_the_global_batch(tmp_path, spool, daemon_factory,
                                                                                framework, dist):
    """Streaming in chunks of 100 rows shuffled two at a time, so steps cross windows: 2 ranks
    or replicas x 16 rows take the same rows in the same order as one process with 32. Each
    machine's leader encodes the cache once; the other rank opens it."""
    csv = classification_csv(tmp_path / "train.csv", rows=1000)
    common = {"epochs": 2, "algorithm_params": {"hidden_units": [16], "dropout_rate": 0.0},
              "framework": framework, "devices": "cpu"}
    streaming = {"data": {"streaming": True, "chunk_rows": 100, "shuffle_chunks": 2}}
    daemon_factory(spool, "--max-jobs", "2")
    drop_job(spool, "par.json", seed_job(csv, tmp_path / "par", batch_size=16, distributed=dist, **common) | streaming)
    drop_job(spool, "one.json", seed_job(csv, tmp_path / "one", batch_size=32, **common) | streaming)
    par = wait_for_status(spool, "par", "completed", timeout=240)
    one = wait_for_status(spool, "one", "completed", timeout=240)
    run = next(r for r in events_of(spool, "par") if r["type"] == "run_started")
    assert run["devices"] == ["cpu", "cpu"] and run["steps_per_epoch"] == 25  # 800 rows / 32
    name = "model.safetensors" if framework == "pytorch" else "model.weights.h5"
    a, b = model_weights(tmp_path / "par" / name), model_weights(tmp_path / "one" / name)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert [h["train_accuracy"] for h in par.history] == [h["train_accuracy"] for h in one.history]
    assert [h["train_loss"] for h in par.history] == pytest.approx([h["train_loss"] for h in one.history], rel=1e-4)
    assert [h["val_loss"] for h in par.history] == pytest.approx([h["val_loss"] for h in one.history], rel=1e-4)
    wait_until(lambda: not Spool(spool).stream_dir("par").exists(), 30,
               what="the daemon to remove the ended job's streaming cache")


@pytest.mark.slow
def test_streaming_on_two_tensorflow_machines_equals_one_process_streaming_the_global_batch(tmp_path):
    """Each machine of a multi-worker job encodes its own cache and reads the same windows in
    the same order: two machines x 16 rows a step train as one process with 32."""
    csv = classification_csv(tmp_path / "train.csv", rows=1000)
    streaming = {"data": {"streaming": True, "chunk_rows": 100, "shuffle_chunks": 2}}
    ports = [free_port(), free_port()]
    spools = two_machine_spools(tmp_path)
    daemons = [DaemonProcess(s) for s in spools]
    try:
        for k, spool in enumerate(spools):
            drop_job(spool, "j.json", two_worker_job(csv, tmp_path / f"out{k}", k, ports) | streaming)
        drop_job(spools[0], "one.json", seed_job(csv, tmp_path / "one", epochs=2, batch_size=32, devices="cpu",
                                                 framework="tensorflow",
                                                 algorithm_params={"hidden_units": [16], "dropout_rate": 0.0})
                 | streaming)
        states = [wait_for_status(s, "j", "completed", timeout=240) for s in spools]
        one = wait_for_status(spools[0], "one", "completed", timeout=240)
    finally:
        for d in daemons:
            d.stop()
    ref = model_weights(tmp_path / "one" / "model.weights.h5")
    for k in (0, 1):
        a = model_weights(tmp_path / f"out{k}" / "model.weights.h5")
        for key in a:
            np.testing.assert_allclose(a[key], ref[key], rtol=1e-4, atol=1e-6, err_msg=key)
    for state in states:
        assert [h["train_accuracy"] for h in state.history] == [h["train_accuracy"] for h in one.history]
