"""The worker's epoch loop through the real daemon: checkpoint policy, best weights, schedules
and early stopping on record, and recovery from a damaged checkpoint."""
import numpy as np
from safetensors.numpy import load_file

from daemon import control
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
