"""Pause, resume and cancel through control files and the real daemon."""
from datetime import datetime

import numpy as np
import pytest
from safetensors.numpy import load_file

from daemon import control
from daemon.replay import Status
from daemon.spool import Spool
from tests.conftest import (classification_csv, drop_job, events_of, seed_job, wait_for_event,
                            wait_for_status, wait_until)


def long_epochs_job(data, out, epochs=3):
    """Epochs of thousands of steps: long enough to pause in the middle of one."""
    return seed_job(data, out, epochs=epochs, batch_size=2, algorithm_params={"hidden_units": [16]})


def seconds_between(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def same_weights(a, b) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_pause_lands_mid_epoch_and_resume_reproduces_the_weights_exactly(tmp_path, spool, daemon_factory):
    """The control file's path through the worker: on record with its reason, consumed, a
    mid-epoch checkpoint, paused while another job finishes, resumed at that step. (The same
    scenario for each engine is in test_contract.py.)"""
    pause_after_progress = 2
    # 32,000 steps an epoch: seconds, so that some progress event lands in an epoch's first half
    # even on a fast machine (with 16,000 steps a run once finished with none there)
    data = classification_csv(tmp_path / "train.csv", rows=80000)
    daemon_factory(spool, "--max-jobs", "2")
    drop_job(spool, "ref.json", long_epochs_job(data, tmp_path / "ref", epochs=2))
    drop_job(spool, "p.json", long_epochs_job(data, tmp_path / "p", epochs=2))
    def early_in_an_epoch():  # a progress event from the first half of an epoch
        progress = [r for r in events_of(spool, "p") if r["type"] == "progress"]
        return len(progress) >= pause_after_progress and progress[-1]["step"] < progress[-1]["steps_per_epoch"] / 2
    wait_until(early_in_an_epoch, 90, what="job p early in an epoch")
    request = control.drop(Spool(spool), "p", "pause", reason="need the GPU")
    records = wait_for_event(spool, "p", "paused")
    assert not request.exists()  # consumed after it went on record
    received = next(r for r in records if r["type"] == "control_received")
    paused = next(r for r in records if r["type"] == "paused")
    assert received["reason"] == "need the GPU" and received["source_file"] == "control/p.pause"
    assert seconds_between(received["ts"], paused["ts"]) < 1.0
    spe = next(r for r in records if r["type"] == "run_started")["steps_per_epoch"]
    assert 0 < paused["step"] < spe and paused["checkpoint"]  # in the middle of an epoch
    ckpt = next(r for r in records if r["type"] == "checkpoint_saved" and r["path"] == paused["checkpoint"])
    assert (ckpt["epoch"], ckpt["step"]) == (paused["epoch"], paused["step"])

    wait_for_status(spool, "ref", "completed", timeout=120)
    assert wait_for_status(spool, "p", "paused").status == Status.PAUSED  # stays paused meanwhile
    control.drop(Spool(spool), "p", "resume")
    state = wait_for_status(spool, "p", "completed", timeout=120)
    runs = [r for r in events_of(spool, "p") if r["type"] == "run_started"]
    assert runs[1]["resumed_from"]["step"] == paused["step"]
    assert [h["epoch"] for h in state.history] == [1, 2]
    assert same_weights(tmp_path / "ref" / "model.safetensors", tmp_path / "p" / "model.safetensors")
    ref = wait_for_status(spool, "ref", "completed")
    assert [h["train_loss"] for h in ref.history] == [h["train_loss"] for h in state.history]
    assert [h["val_loss"] for h in ref.history] == [h["val_loss"] for h in state.history]


def test_cancel_a_running_a_queued_and_a_paused_job(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv", rows=40000)  # seconds an epoch: cancelled long before the end
    daemon_factory(spool, "--max-jobs", "1")
    drop_job(spool, "run.json", long_epochs_job(data, tmp_path / "run"))
    wait_for_event(spool, "run", "progress")
    drop_job(spool, "queued.json", long_epochs_job(data, tmp_path / "queued"))
    drop_job(spool, "later.json", long_epochs_job(data, tmp_path / "later"))
    wait_until(lambda: Spool(spool).events_path("later").exists(), 30, what="later accepted")
    control.drop(Spool(spool), "queued", "cancel")
    control.drop(Spool(spool), "later", "pause")
    assert wait_for_status(spool, "queued", "cancelled")
    assert wait_for_status(spool, "later", "paused")
    control.drop(Spool(spool), "run", "cancel")
    cancelled = wait_for_status(spool, "run", "cancelled")
    assert cancelled.epochs_done < 3
    control.drop(Spool(spool), "later", "cancel")
    assert wait_for_status(spool, "later", "cancelled")
    assert "run_started" not in [r["type"] for r in events_of(spool, "queued")]


def test_repeats_are_harmless_and_nonsense_is_rejected(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv", rows=5000)
    big = classification_csv(tmp_path / "big.csv", rows=40000)  # busy outlasts everything before its cancel
    daemon_factory(spool, "--max-jobs", "1")
    drop_job(spool, "busy.json", long_epochs_job(big, tmp_path / "busy"))
    wait_for_event(spool, "busy", "progress")
    drop_job(spool, "j.json", seed_job(data, epochs=1))
    wait_until(lambda: Spool(spool).events_path("j").exists(), 30, what="j accepted")
    control.drop(Spool(spool), "j", "pause")
    wait_for_status(spool, "j", "paused")
    control.drop(Spool(spool), "j", "pause")
    records = wait_for_event(spool, "j", "control_received", count=2)
    assert records[-1]["outcome"] == "already paused" and records[-1]["type"] == "control_received"
    control.drop(Spool(spool), "busy", "cancel")
    control.drop(Spool(spool), "j", "resume")
    wait_for_status(spool, "j", "completed")
    control.drop(Spool(spool), "j", "resume")
    error = spool / "rejected" / "j.resume.error.json"
    wait_until(error.exists, 30, what="the resume of a completed job rejected")
    assert "the job is completed; there is nothing to resume" in error.read_text()


@pytest.mark.parametrize("status, action, kind", [
    (Status.RUNNING, "pause", "act"), (Status.PENDING, "pause", "act"), (Status.PAUSED, "pause", "repeat"),
    (Status.PAUSED, "resume", "act"), (Status.RUNNING, "resume", "repeat"),
    (Status.INTERRUPTED, "cancel", "act"), (Status.CANCELLED, "cancel", "repeat"),
    (Status.COMPLETED, "resume", "reject"), (Status.FAILED, "pause", "reject"),
    (Status.CANCELLED, "resume", "reject"), (None, "pause", "reject"),
])
def test_decisions(status, action, kind):
    assert control.decide(status, action).kind == kind


def test_a_failure_from_outside_the_job_can_be_resumed_or_cancelled():
    """A full disk or an I/O error fails the job as retryable: after the fix, resume continues."""
    assert control.decide(Status.FAILED, "resume", retryable=True).kind == "act"
    assert control.decide(Status.FAILED, "cancel", retryable=True).kind == "act"
    assert control.decide(Status.FAILED, "pause", retryable=True).kind == "reject"
    assert control.decide(Status.FAILED, "resume", retryable=False).kind == "reject"


def test_control_file_names():
    assert control.parse_name("exp.1.pause") == ("exp.1", "pause")
    assert control.parse_name("exp.stop") is None and control.parse_name(".x.pause") is None


def test_a_request_for_a_job_still_in_incoming_waits_for_its_acceptance(tmp_path, spool, daemon_factory):
    """Submit a job and pause it while no daemon serves (epochd pause works on a job still in
    incoming/), then start the daemon: its file is taken only once quiet for 2 s, and the pause
    waits for it instead of going to rejected/ as a request for no job. The job is accepted
    paused and never starts; a request for a file that is then rejected is rejected too."""
    from daemon.cli import cli
    from click.testing import CliRunner
    data = classification_csv(tmp_path / "train.csv")
    drop_job(spool, "early.json", seed_job(data, epochs=1))
    said = CliRunner().invoke(cli, ["pause", "--spool", str(spool), "early", "--reason", "not yet"])
    assert said.exit_code == 0 and "waits in incoming/ to be accepted" in said.output
    assert (spool / "control" / "early.pause").exists()
    drop_job(spool, "broken.json", b"{not json")
    control.drop(Spool(spool), "broken", "cancel")
    daemon_factory(spool)
    state = wait_for_status(spool, "early", "paused", timeout=30)
    assert [r["type"] for r in events_of(spool, "early")] == ["job_accepted", "control_received", "paused"]
    assert state.controls[0]["reason"] == "not yet" and not (spool / "rejected" / "early.pause").exists()
    wait_until(lambda: (spool / "rejected" / "broken.cancel.error.json").exists(), 30,
               what="the request for a rejected job file to be rejected")
    assert (spool / "rejected" / "broken.error.json").exists()
    assert (spool / "rejected" / "broken.cancel").exists()  # its own name: beside broken.json's report
