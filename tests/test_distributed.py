"""Data parallelism through the daemon. PyTorch DDP: two CPU ranks (gloo) started by torch's
elastic launcher train one job; rank 0 alone writes the log, checkpoints and outputs; pause and
resume reach every rank and resume bit for bit. TensorFlow MirroredStrategy: two replicas on two
logical CPU devices in one worker, the same guarantees."""
import numpy as np
import pytest

from daemon import control
from daemon.spool import Spool
from tests.conftest import (classification_csv, drop_job, events_of, model_weights, same_weights,
                            seed_job, wait_for_event, wait_for_status)

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


def test_a_pause_reaches_every_rank_and_the_resumed_run_ends_bit_for_bit(tmp_path, spool, daemon_factory):
    """Dropout on, so each rank's RNG state must come back from the checkpoint too."""
    data = classification_csv(tmp_path / "train.csv", rows=8000)  # 1,600 steps an epoch, seconds
    job = lambda out: seed_job(data, out, epochs=2, batch_size=2, algorithm_params={"hidden_units": [16]}, **DDP)
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
    import os
    import signal

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
