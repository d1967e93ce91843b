"""The worker's epoch loop through the real daemon: checkpoint policy, best weights, schedules
and early stopping on record, recovery from a damaged checkpoint, and resumes that refuse data
or checkpoints the run did not begin with."""
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from daemon import control
from daemon.cli import Exit, cli
from daemon.spool import Spool
from tests.conftest import (classification_csv, drop_job, events_of, seed_job, wait_for_event,
                            wait_for_status, wait_until)


def weights(path):
    return load_file(str(path))


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_checkpoint_policy_every_n_epochs_keep_last_and_keep_best(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv")
    daemon_factory(spool)
    drop_job(spool, "ck.json", seed_job(data, epochs=7, checkpoint={"every_epochs": 2, "keep_last": 1,
                                                                   "keep_best": False}))
    wait_for_status(spool, "ck", "completed")
    records = events_of(spool, "ck")
    saved = [(r["epoch"], r["step"] == r["steps_per_epoch"]) for r in records if r["type"] == "checkpoint_saved"]
    assert saved == [(2, True), (4, True), (6, True), (7, True)]  # every 2nd epoch and the last
    removed = [r["path"] for r in records if r["type"] == "checkpoint_removed"]
    assert len(removed) == 3
    on_disk = sorted(p.name for p in (Spool(spool).job_dir("ck") / "checkpoints").iterdir())
    assert on_disk == ["e00007-s0000006.pt"]
    for r in records:
        if r["type"] == "checkpoint_saved" and r["path"] not in removed:
            assert (Spool(spool).job_dir("ck") / r["path"]).stat().st_size == r["bytes"]


def test_a_damaged_checkpoint_falls_back_to_the_previous_good_one(tmp_path, spool, daemon_factory):
    """Pause mid-epoch, flip a byte in that checkpoint, resume: sha256 catches it, the run
    resumes from the checkpoint before, and the final weights still equal an uninterrupted run's."""
    data = classification_csv(tmp_path / "train.csv", rows=20000)  # 8,000 steps an epoch
    job = lambda out: seed_job(data, out, epochs=4, batch_size=2, algorithm_params={"hidden_units": [16]})
    daemon_factory(spool, "--max-jobs", "2")
    drop_job(spool, "ref.json", job(tmp_path / "ref"))
    drop_job(spool, "dmg.json", job(tmp_path / "dmg"))
    # pause once epoch 2 is under way, so an epoch-end checkpoint stands before the paused one
    # (a pause at the end of epoch 1 would reuse epoch 1's checkpoint, and with that one damaged
    # the only earlier state is a fresh start). Under way: a progress event of epoch 2, or, as
    # an epoch here may take less than the second between two, the end of epoch 2; the epochs
    # after it leave room for the pause to land
    wait_until(lambda: any(r["type"] in ("progress", "epoch_completed") and r["epoch"] >= 2
                           for r in events_of(spool, "dmg")), 90, what="epoch 2 of dmg under way")
    control.drop(Spool(spool), "dmg", "pause")
    paused = [r for r in wait_for_event(spool, "dmg", "paused") if r["type"] == "paused"][0]
    assert paused["epoch"] >= 2
    path = Spool(spool).job_dir("dmg") / paused["checkpoint"]
    data_bytes = bytearray(path.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF
    path.write_bytes(bytes(data_bytes))
    control.drop(Spool(spool), "dmg", "resume")
    wait_for_status(spool, "dmg", "completed", timeout=120)
    records = events_of(spool, "dmg")
    rejected = [r for r in records if r["type"] == "checkpoint_rejected"]
    assert rejected and rejected[0]["path"] == paused["checkpoint"] and "sha256" in rejected[0]["reason"]
    resumed = [r for r in records if r["type"] == "run_started"][1]["resumed_from"]
    assert resumed["checkpoint"] != paused["checkpoint"]
    assert (resumed["epoch"], resumed["step"]) < (paused["epoch"], paused["step"])
    wait_for_status(spool, "ref", "completed", timeout=120)
    assert same(weights(tmp_path / "ref" / "model.safetensors"), weights(tmp_path / "dmg" / "model.safetensors"))


def test_a_resume_refuses_data_that_changed_and_goes_on_once_it_is_back(tmp_path, spool, daemon_factory):
    """Paused, then its training file gains rows: the resume fails, retryable, naming the file,
    and keeps every checkpoint. With the old bytes written back (another modification time, the
    same content) it goes on from the pause and ends with an uninterrupted run's weights."""
    data = classification_csv(tmp_path / "train.csv", rows=4000)  # 1,600 steps an epoch
    ref_data = tmp_path / "ref.csv"
    ref_data.write_bytes(data.read_bytes())
    job = lambda d, out: seed_job(d, out, epochs=2, batch_size=2, algorithm_params={"hidden_units": [16]})
    daemon_factory(spool, "--max-jobs", "2")
    drop_job(spool, "ref.json", job(ref_data, tmp_path / "ref"))
    drop_job(spool, "d.json", job(data, tmp_path / "d"))
    wait_for_event(spool, "d", "progress")
    control.drop(Spool(spool), "d", "pause")
    paused = [r for r in wait_for_event(spool, "d", "paused") if r["type"] == "paused"][0]
    original = data.read_bytes()
    more = classification_csv(tmp_path / "more.csv", rows=50, seed=7).read_text().split("\n", 1)[1]
    data.write_bytes(original + more.encode())
    # `epochd resume` says so at once, and leaves the job paused
    refused = CliRunner().invoke(cli, ["resume", "--spool", str(spool), "d"])
    assert refused.exit_code == Exit.REFUSED
    assert f'job d was not resumed: the job\'s data changed since its checkpoints were made: ' \
           f'train_data_path "{data.resolve()}" is not the file the run began with' in refused.output
    assert not list(Spool(spool).control.iterdir())
    # a request dropped by hand: its worker fails the job
    control.drop(Spool(spool), "d", "resume")
    state = wait_for_status(spool, "d", "failed")
    error = state.last_error
    assert error["error"] == "DataChanged" and error["retryable"] is True
    assert f'train_data_path "{data.resolve()}" is not the file the run began with' in error["message"]
    assert "Put that file back" in error["message"]
    records = events_of(spool, "d")
    assert not any(r["type"] == "checkpoint_rejected" for r in records)
    assert len([r for r in records if r["type"] == "run_started"]) == 1
    assert state.last_checkpoint["path"] == paused["checkpoint"]
    data.write_bytes(original)
    assert CliRunner().invoke(cli, ["resume", "--spool", str(spool), "d"]).exit_code == 0
    wait_for_status(spool, "d", "completed", timeout=120)
    runs = [r for r in events_of(spool, "d") if r["type"] == "run_started"]
    assert runs[1]["resumed_from"]["checkpoint"] == paused["checkpoint"]
    assert runs[0]["data"]["train_data_path"]["sha256"] == runs[1]["data"]["train_data_path"]["sha256"]
    assert runs[0]["data"]["train_data_path"]["mtime_ns"] != runs[1]["data"]["train_data_path"]["mtime_ns"]
    wait_for_status(spool, "ref", "completed", timeout=120)
    assert same(weights(tmp_path / "ref" / "model.safetensors"), weights(tmp_path / "d" / "model.safetensors"))


@pytest.mark.parametrize("framework", ["pytorch", pytest.param("tensorflow", marks=pytest.mark.slow)],
                         indirect=True)
def test_checkpoints_that_are_whole_but_do_not_fit_the_model_fail_the_job_not_restart_it(
        tmp_path, spool, daemon_factory, framework):
    """A checkpoint whose bytes match its event but that was saved from another network (here
    another job's, as a different epochd layout would be) is not damage: the job fails,
    retryable, and keeps it on record rather than starting over. Deleting the checkpoints, as
    the message says, then starts it over."""
    from daemon.eventlog import EventLog
    from daemon.events import CheckpointSaved
    from daemon.fsutil import sha256_file
    from daemon.spool import job_lock
    data = classification_csv(tmp_path / "train.csv", rows=4000)
    daemon_factory(spool, "--max-jobs", "2")
    drop_job(spool, "other.json", seed_job(data, epochs=1, framework=framework,
                                           algorithm_params={"hidden_units": [8]}))
    drop_job(spool, "j.json", seed_job(data, epochs=2, batch_size=2, framework=framework,
                                       algorithm_params={"hidden_units": [16]}))
    wait_for_event(spool, "j", "progress")
    control.drop(Spool(spool), "j", "pause")
    wait_for_status(spool, "j", "paused")
    other = wait_for_status(spool, "other", "completed").last_checkpoint
    root = Spool(spool)
    foreign = root.job_dir("j") / "checkpoints" / ("e00001-s9999999" + Path(other["path"]).suffix)
    foreign.write_bytes((root.job_dir("other") / other["path"]).read_bytes())
    own = [r for r in events_of(spool, "j") if r["type"] == "checkpoint_saved"]
    for r in own:  # j's own checkpoints are lost: only the foreign one stands whole
        (root.job_dir("j") / r["path"]).unlink()
    lock = job_lock(root, "j")  # written as a worker would: holding the job's lock
    wait_until(lock.acquire, 30, what="the paused worker's exit")
    with lock, EventLog(root.events_path("j")) as log:
        log.append(CheckpointSaved(epoch=1, step=other["step"], steps_per_epoch=other["steps_per_epoch"],
                                   path="checkpoints/" + foreign.name, bytes=foreign.stat().st_size,
                                   sha256=sha256_file(foreign)))
    control.drop(root, "j", "resume")
    state = wait_for_status(spool, "j", "failed")
    assert state.last_error["error"] == "CheckpointInvalid" and state.last_error["retryable"] is True
    message = state.last_error["message"]
    assert "none of the job's 1 checkpoint(s) that are whole on disk loads into the model" in message
    assert f"checkpoints/{foreign.name}" in message
    assert state.last_checkpoint["path"] == f"checkpoints/{foreign.name}"  # kept for a resume
    assert len([r for r in events_of(spool, "j") if r["type"] == "run_started"]) == 1
    foreign.unlink()
    control.drop(root, "j", "resume")
    state = wait_for_status(spool, "j", "completed", timeout=120)
    assert [r for r in events_of(spool, "j") if r["type"] == "run_started"][1]["resumed_from"] is None
    assert [h["epoch"] for h in state.history] == [1, 2]


def test_data_files_are_read_again_only_when_their_size_or_time_moved(tmp_path):
    from daemon import datafiles
    f = tmp_path / "t.csv"
    f.write_text("a,b\n1,2\n")
    spec = {"train_data_path": str(f), "val_data_path": None}
    first = datafiles.identify(spec)
    assert first == {"train_data_path": {"path": str(f.resolve()), "bytes": 8, "mtime_ns": f.stat().st_mtime_ns,
                                         "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}}
    assert datafiles.Identifying(spec).result() == first  # the first run's, hashed in a thread
    planted = {"train_data_path": {**first["train_data_path"], "sha256": "0" * 64}}
    assert datafiles.identify(spec, planted)["train_data_path"]["sha256"] == "0" * 64  # not read
    os.utime(f, ns=(1, 1))  # touched: read again, and the same bytes are no change
    touched = datafiles.identify(spec, first)
    assert touched["train_data_path"]["sha256"] == first["train_data_path"]["sha256"]
    assert datafiles.changes(first, touched) == []
    f.write_text("a,b\n1,3\n")  # the same size, another byte
    [change] = datafiles.changes(first, datafiles.identify(spec, first))
    assert change.startswith(f'train_data_path "{f.resolve()}" is not the file the run began with: then 8 bytes')
    f.unlink()  # a missing file is the data reader's to report
    assert datafiles.identify(spec, first) == {} and datafiles.changes(first, {}) == []


def test_a_gpu_out_of_memory_fails_the_job_retryable_with_what_to_change():
    """No GPU in the tests: the error torch raises is built by hand; what the worker makes of it
    is the same function the GPU check's run goes through."""
    import torch

    from daemon.worker import device_out_of_memory
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)\nmore")
    message = device_out_of_memory(oom)
    assert message.startswith("the GPU ran out of memory (OutOfMemoryError: CUDA out of memory. Tried to "
                              "allocate 2.00 GiB (GPU 0; 79.1 GiB total)). Expected: a job that fits")
    assert "smaller batch_size (gradient_accumulation_steps keeps the update the same)" in message
    assert device_out_of_memory(RuntimeError("CUDA error: out of memory")) is not None
    for other in (MemoryError(), RuntimeError("shape mismatch"), OSError(12, "Cannot allocate memory")):
        assert device_out_of_memory(other) is None
