"""The engine contract: every scenario here runs once on the PyTorch engine and once on the
TensorFlow engine, through the real daemon. A user sees the same job keys, events, metric names,
decisions and files whichever framework trains the job; pause and kill -9 resume to the very
weights of a run that never stopped."""
import json
import os
import signal
import subprocess
import sys

import pytest

from daemon import control, policies
from daemon.replay import fold
from daemon.spool import Spool
from tests.conftest import (REPO, WEIGHT_FILES, classification_csv, drop_job, events_of,
                            model_weights, same_weights, seed_job, wait_for_event, wait_for_status,
                            wait_until)

EPOCH_FIELDS = {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate",
                "time_per_epoch", "samples_per_sec", "memory_usage", "gpu_utilization", "gpu_memory",
                "data_time", "compute_time", "eval_time", "cpu_time", "steps"}
EXTRA_FILES = {"pytorch": (), "tensorflow": ("model.keras",)}


def test_the_seed_job_trains_end_to_end(tmp_path, spool, daemon_factory, framework):
    """The seed's request body with a real CSV: accepted, trained, every field on record, and a
    model that `epochd predict` rebuilds from its files alone."""
    data = classification_csv(tmp_path / "train.csv")
    out = tmp_path / "models" / "deep_learning_model"
    daemon_factory(spool)
    job = seed_job(data, out, framework=framework)
    drop_job(spool, "seed.json", job)
    state = wait_for_status(spool, "seed", "completed")
    records = events_of(spool, "seed")
    types = [r["type"] for r in records]
    assert types[0] == "job_accepted" and types[1] == "run_started" and types[-1] == "completed"
    epochs = [r for r in records if r["type"] == "epoch_completed"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    for e in epochs:
        assert EPOCH_FIELDS <= set(e), EPOCH_FIELDS - set(e)
        assert e["memory_usage"] > 10 and e["samples_per_sec"] > 0 and 0 <= e["train_accuracy"] <= 1
        assert e["gpu_utilization"] is None and e["gpu_memory"] is None  # this run is on the CPU
    accepted = records[0]
    assert accepted["source_file"] == "seed.json" and len(accepted["spec_sha256"]) == 64
    assert accepted["spec"]["framework"] == framework
    assert accepted["spec"]["learning_rate_scheduler"] == {"name": "step", "step_size": 30, "gamma": 0.1}
    started = records[1]
    assert started["devices"] == ["cpu"] and started["resumed_from"] is None and started["attempt"] == 1
    assert started["framework"] == framework
    assert {"pytorch": "torch", "tensorflow": "tensorflow"}[framework] in started["versions"]
    checkpoints = [r for r in records if r["type"] == "checkpoint_saved"]
    assert len(checkpoints) == 3
    job_dir = Spool(spool).job_dir("seed")
    assert (job_dir / "job.json").read_bytes() == json.dumps(job).encode()
    for name in (*WEIGHT_FILES[framework], *EXTRA_FILES[framework], "model.json", "preprocess.json",
                 "history.json", "learning_curves.png"):
        assert (out / name).stat().st_size > 0, name
    history = json.loads((out / "history.json").read_text())
    assert history["epoch"] == [1, 2, 3] and len(history["val_loss"]) == 3
    assert state.outputs["model"] == str(out / WEIGHT_FILES[framework][0])
    predicted = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "predict", "--spool", str(spool), "seed", "--data", str(data)],
        capture_output=True, text=True, check=True, cwd=REPO)
    predictions = predicted.stdout.splitlines()
    assert predictions[0] == "prediction,p_0,p_1" and len(predictions) == 241
    assert predicted.stderr == ""  # not even the lines TensorFlow's libraries print as they load


def long_job(data, out, framework, **overrides):
    """On 20,000 rows 8,000 steps an epoch, seconds long: a pause or a kill lands mid-epoch."""
    return seed_job(data, out, framework=framework, epochs=2, batch_size=2,
                    algorithm_params={"hidden_units": [16]}, **overrides)


# PyTorch's pause goes through the same path, with more checks, in test_control.py
@pytest.mark.parametrize("framework", [pytest.param("pytorch", marks=pytest.mark.slow), "tensorflow"])
def test_pause_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(tmp_path, spool, daemon_factory, framework):
    data = classification_csv(tmp_path / "train.csv", rows=20000)
    daemon_factory(spool, "--max-jobs", "2")
    drop_job(spool, "ref.json", long_job(data, tmp_path / "ref", framework))
    drop_job(spool, "p.json", long_job(data, tmp_path / "p", framework))
    wait_for_event(spool, "p", "progress")
    control.drop(Spool(spool), "p", "pause")
    paused = [r for r in wait_for_event(spool, "p", "paused") if r["type"] == "paused"][0]
    assert paused["step"] > 0 and paused["checkpoint"]  # mid-epoch, with a checkpoint of that step
    control.drop(Spool(spool), "p", "resume")
    wait_for_status(spool, "p", "completed", timeout=120)
    runs = [r for r in events_of(spool, "p") if r["type"] == "run_started"]
    assert len(runs) == 2 and runs[1]["resumed_from"]["checkpoint"] == paused["checkpoint"]
    assert (runs[1]["resumed_from"]["epoch"], runs[1]["resumed_from"]["step"]) == (paused["epoch"], paused["step"])
    wait_for_status(spool, "ref", "completed", timeout=120)
    final = WEIGHT_FILES[framework][0]
    assert same_weights(model_weights(tmp_path / "ref" / final), model_weights(tmp_path / "p" / final))
    ref, resumed = fold(events_of(spool, "ref")), fold(events_of(spool, "p"))
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in ref.history]


# PyTorch's kill -9 mid-run is in the default set through test_recovery's random kill
@pytest.mark.parametrize("framework", [pytest.param("pytorch", marks=pytest.mark.slow), "tensorflow"])
def test_kill_9_mid_epoch_resumes_from_the_last_checkpoint_to_the_uninterrupted_weights(
        tmp_path, spool, daemon_factory, framework):
    """kill -9 of the worker after a timed mid-epoch checkpoint: `interrupted` (SIGKILL, a crash),
    a second run resumes from that checkpoint, history holds each epoch once, and the final
    weights equal a run that never stopped."""
    data = classification_csv(tmp_path / "train.csv", rows=20000)
    daemon_factory(spool, "--max-jobs", "2")
    timed = {"checkpoint": {"every_seconds": 0.3}}
    drop_job(spool, "ref.json", long_job(data, tmp_path / "ref", framework))
    drop_job(spool, "k.json", long_job(data, tmp_path / "k", framework, **timed))

    def mid_epoch_checkpoint():
        records = events_of(spool, "k")
        return records if any(r["type"] == "checkpoint_saved" and r["step"] < r["steps_per_epoch"]
                              for r in records) else None
    records = wait_until(mid_epoch_checkpoint, 90, what="a mid-epoch checkpoint of job k")
    pid = next(r["pid"] for r in records if r["type"] == "run_started")
    os.kill(pid, signal.SIGKILL)
    state = wait_for_status(spool, "k", "completed", timeout=120)
    records = events_of(spool, "k")
    interrupted = [r for r in records if r["type"] == "interrupted"]
    assert interrupted and interrupted[0]["reason"] == "worker killed by signal SIGKILL" and interrupted[0]["crash"]
    runs = [r for r in records if r["type"] == "run_started"]
    assert len(runs) == 2 and runs[1]["resumed_from"] and runs[1]["attempt"] == 2
    assert [h["epoch"] for h in state.history] == [1, 2]
    wait_for_status(spool, "ref", "completed", timeout=120)
    final = WEIGHT_FILES[framework][0]
    assert same_weights(model_weights(tmp_path / "ref" / final), model_weights(tmp_path / "k" / final))


def test_schedule_and_early_stopping_decide_from_the_history_alone(tmp_path, spool, daemon_factory, framework):
    """A rate halved every epoch and a patience of 1: the recorded rates and the stopping epoch
    are exactly what the shared policy functions give for the recorded metric history, and with
    restore_best_weights the final model is the best epoch's."""
    data = classification_csv(tmp_path / "train.csv", rows=120)
    job = seed_job(data, tmp_path / "out", framework=framework, epochs=40, learning_rate=0.05,
                   early_stopping={"patience": 1, "restore_best_weights": True},
                   learning_rate_scheduler={"name": "exponential", "gamma": 0.5})
    del job["algorithm_params"]["early_stopping_patience"], job["algorithm_params"]["learning_rate_scheduler"]
    daemon_factory(spool)
    drop_job(spool, "es.json", job)
    state = wait_for_status(spool, "es", "completed")
    records = events_of(spool, "es")
    stopped = [r for r in records if r["type"] == "early_stopped"]
    assert len(stopped) == 1 and state.stop_reason == "early_stopping" and state.epochs_done < 40
    changes = [r for r in records if r["type"] == "lr_changed"]
    assert [c["epoch"] for c in changes] == list(range(2, state.epochs_done + 1))
    assert changes[0]["from"] == 0.05 and changes[0]["to"] == 0.025 and "exponential" in changes[0]["reason"]
    assert [h["learning_rate"] for h in state.history] == [0.05 * 0.5 ** i for i in range(state.epochs_done)]
    # the stop is Keras' rule applied to the recorded val_loss: the first epoch with no
    # improvement since the best one ends the run (patience 1)
    losses = [h["val_loss"] for h in state.history]
    best_epoch, _ = policies.best_epoch(losses, "min")
    assert stopped[0]["best_epoch"] == best_epoch and state.epochs_done == best_epoch + 1
    assert all(losses[i] < min(losses[:i]) for i in range(1, best_epoch))
    best = [r for r in records if r["type"] == "best_model_saved"][-1]
    assert best["epoch"] == stopped[0]["best_epoch"]
    final, best_file = WEIGHT_FILES[framework]
    assert same_weights(model_weights(tmp_path / "out" / final), model_weights(tmp_path / "out" / best_file))


def test_a_worker_loads_only_its_own_framework(tmp_path, spool, daemon_factory, framework):
    """A PyTorch worker never maps TensorFlow's libraries and a TensorFlow worker never maps
    libtorch (read from the running worker's /proc/<pid>/maps)."""
    data = classification_csv(tmp_path / "train.csv", rows=20000)
    daemon_factory(spool)
    drop_job(spool, "w.json", long_job(data, tmp_path / "w", framework))
    records = wait_for_event(spool, "w", "progress")
    pid = next(r["pid"] for r in records if r["type"] == "run_started")
    maps = open(f"/proc/{pid}/maps").read()
    own, other = {"pytorch": ("libtorch", "tensorflow"), "tensorflow": ("tensorflow", "libtorch")}[framework]
    assert own in maps and other not in maps
    control.drop(Spool(spool), "w", "cancel")
    wait_for_status(spool, "w", "cancelled")


def test_gradient_accumulation_through_the_daemon(tmp_path, spool, daemon_factory, framework):
    """batch_size 8 accumulated 4 times: a step is one update over 32 rows, and the log says so."""
    data = classification_csv(tmp_path / "train.csv", rows=400)
    daemon_factory(spool)
    drop_job(spool, "acc.json", seed_job(data, tmp_path / "acc", framework=framework, epochs=2,
                                         batch_size=8, gradient_accumulation_steps=4))
    state = wait_for_status(spool, "acc", "completed")
    run = next(r for r in events_of(spool, "acc") if r["type"] == "run_started")
    assert run["steps_per_epoch"] == -(-run["train_samples"] // 32)
    assert [h["steps"] for h in state.history] == [run["steps_per_epoch"]] * 2
    assert state.spec["gradient_accumulation_steps"] == 4
    assert state.history[1]["train_loss"] < state.history[0]["train_loss"]
