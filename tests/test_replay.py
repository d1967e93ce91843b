"""fold(events) -> JobState: event lists in, states out."""
import pytest

from daemon.replay import Status, fold, resume_point

SPEC = {"epochs": 5, "priority": 0, "devices": "auto",
        "early_stopping": {"monitor": "val_loss", "mode": "auto", "patience": 2, "min_delta": 0.0,
                           "baseline": None, "start_from_epoch": 0, "restore_best_weights": False}}


def ev(type_, **payload):
    return {"type": type_, "v": 1, **payload}


def accepted():
    return ev("job_accepted", job_id="j", source_file="j.json", spec=SPEC, spec_sha256="", file_sha256="")


def started(attempt=1, resumed_from=None):
    return ev("run_started", attempt=attempt, pid=1, host="h", devices=["cpu"], framework="pytorch",
              versions={}, resumed_from=resumed_from, steps_per_epoch=10, train_samples=100,
              val_samples=20, task="classification")


def epoch(n, val_loss):
    return ev("epoch_completed", epoch=n, train_loss=1.0, train_accuracy=0.5, val_loss=val_loss,
              val_accuracy=0.5, learning_rate=0.1, time_per_epoch=1.0, samples_per_sec=100.0,
              memory_usage=1.0, gpu_utilization=None, gpu_memory=None, data_time=0.0,
              compute_time=1.0, eval_time=0.0, steps=10)


def ckpt(e, s):
    return ev("checkpoint_saved", epoch=e, step=s, steps_per_epoch=10, path=f"checkpoints/e{e}-s{s}.pt",
              bytes=1, sha256="x")


def numbered(events):
    return [{**e, "seq": i, "ts": f"2026-01-01T00:00:{i:02d}.000Z"} for i, e in enumerate(events, 1)]


@pytest.mark.parametrize("events, status", [
    ([], None),
    ([accepted()], Status.PENDING),
    ([accepted(), started()], Status.RUNNING),
    ([accepted(), started(), ev("paused", epoch=1, step=3, checkpoint=None)], Status.PAUSED),
    ([accepted(), started(), ev("paused", epoch=1, step=3, checkpoint=None),
      ev("resumed", epoch=1, step=3, checkpoint=None)], Status.PENDING),
    ([accepted(), started(), ev("interrupted", reason="shutdown")], Status.INTERRUPTED),
    ([accepted(), ev("cancelled", epoch=1, step=0)], Status.CANCELLED),
    ([accepted(), started(), ev("failed", error="DataError", message="m", traceback=None,
                                retryable=False)], Status.FAILED),
    ([accepted(), started(), epoch(1, 0.5), ev("completed", epochs_run=1, stop_reason="max_epochs",
                                               best=None, final_metrics={}, outputs={})], Status.COMPLETED),
])
def test_status_follows_the_events(events, status):
    assert fold(numbered(events)).status == status


def test_a_resumed_run_rewinds_the_lineage_to_its_checkpoint():
    """Epochs 3 and 4 ran after the checkpoint of epoch 2 and were lost: they must not count twice."""
    state = fold(numbered([
        accepted(), started(),
        epoch(1, 0.9), ckpt(1, 10), epoch(2, 0.8), ckpt(2, 10), epoch(3, 0.7), epoch(4, 0.6),
        ev("interrupted", reason="worker killed by signal SIGKILL", crash=True),
        started(2, {"epoch": 2, "step": 10, "checkpoint": "checkpoints/e2-s10.pt", "epochs_done": 2}),
        epoch(3, 0.7), epoch(4, 0.6), epoch(5, 0.5),
    ]))
    assert [h["epoch"] for h in state.history] == [1, 2, 3, 4, 5]
    assert [c["path"] for c in state.checkpoints] == ["checkpoints/e1-s10.pt", "checkpoints/e2-s10.pt"]
    assert state.attempts == 2 and state.crashes == 0


def test_mid_epoch_resume_keeps_the_finished_epochs_and_the_position():
    state = fold(numbered([
        accepted(), started(), epoch(1, 0.9), ckpt(1, 10), ckpt(2, 4),
        ev("paused", epoch=2, step=4, checkpoint="checkpoints/e2-s4.pt"),
        ev("resumed", epoch=2, step=4, checkpoint="checkpoints/e2-s4.pt"),
        started(2, {"epoch": 2, "step": 4, "checkpoint": "checkpoints/e2-s4.pt", "epochs_done": 1}),
    ]))
    assert state.epochs_done == 1 and state.position == (2, 4)
    assert state.last_checkpoint["path"] == "checkpoints/e2-s4.pt"
    assert resume_point(state.last_checkpoint, 10) == (2, 4)
    assert resume_point(state.checkpoints[0], 10) == (2, 0)
    assert resume_point(None, 10) == (1, 0)


def test_a_cancelled_or_interrupted_run_stands_where_it_stopped_not_at_its_last_progress():
    """Progress comes about once a second; the run goes on between. `status` shows the step
    the cancel (or the crash record) names."""
    progress = ev("progress", epoch=2, step=3, steps_per_epoch=10, samples_per_sec=1.0, loss=0.5,
                  eta_seconds=1.0)
    for end in (ev("cancelled", epoch=2, step=7),
                ev("interrupted", reason="shutdown", epoch=2, step=7)):
        state = fold(numbered([accepted(), started(), epoch(1, 0.9), progress, end]))
        assert state.position == (2, 7), end["type"]


def test_crashes_count_in_a_row_and_a_finished_epoch_resets_them():
    crash = ev("interrupted", reason="worker killed by signal SIGKILL", crash=True)
    state = fold(numbered([accepted(), started(), crash, started(2), crash]))
    assert state.crashes == 2 and state.status == Status.INTERRUPTED
    state = fold(numbered([accepted(), started(), crash, started(2), epoch(1, 0.5), crash]))
    assert state.crashes == 1
    state = fold(numbered([accepted(), started(), ev("interrupted", reason="shutdown")]))
    assert state.crashes == 0


def test_removed_and_rejected_checkpoints_are_not_resumed_from():
    state = fold(numbered([accepted(), started(), ckpt(1, 10), ckpt(2, 10), ckpt(3, 10),
                           ev("checkpoint_removed", path="checkpoints/e1-s10.pt", reason="keep_last"),
                           ev("checkpoint_rejected", path="checkpoints/e3-s10.pt", reason="sha256")]))
    assert [c["epoch"] for c in state.checkpoints] == [2]


def test_early_stopping_counter_comes_from_the_history():
    state = fold(numbered([accepted(), started(), epoch(1, 0.5), epoch(2, 0.6), epoch(3, 0.7)]))
    es = state.early_stopping()
    assert (es.best_epoch, es.wait, es.stop) == (1, 2, True)


def test_training_history_has_the_seeds_shape():
    """One list per metric; index i is epoch i + 1."""
    state = fold(numbered([accepted(), started(), epoch(1, 0.5), epoch(2, 0.4)]))
    history = state.training_history()
    assert history["epoch"] == [1, 2] and history["val_loss"] == [0.5, 0.4]
    assert set(history) >= {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate"}


def test_fold_is_pure():
    events = numbered([accepted(), started(), epoch(1, 0.5)])
    assert fold(events) == fold(events)


def test_an_accepted_request_is_pending_until_carried_out():
    """What the daemon carries out itself when the process that acknowledged a request died."""
    pause = ev("control_received", action="pause", source_file="control/j.pause", reason="GPU",
               outcome="accepted")
    repeat = ev("control_received", action="pause", source_file="control/j.pause", reason=None,
                outcome="already paused")
    state = fold(numbered([accepted(), started(), pause]))
    assert state.pending_control["action"] == "pause" and state.pending_control["reason"] == "GPU"
    state = fold(numbered([accepted(), started(), pause, ev("interrupted", reason="x", crash=True)]))
    assert state.pending_control is not None  # a crash does not carry it out
    paused = ev("paused", epoch=1, step=3, checkpoint=None)
    assert fold(numbered([accepted(), started(), pause, paused])).pending_control is None
    assert fold(numbered([accepted(), started(), pause, paused, repeat])).pending_control is None


def test_running_seconds_add_up_every_run_to_its_last_sign_of_life():
    """limits.wall_seconds counts training time, all runs together: a run the worker ended
    counts to its final event, one a crash ended to its last event before the crash."""
    def at(e, second):
        return {**e, "ts": f"2026-01-01T00:00:{second:02d}.000Z"}
    events = [at(accepted(), 0), at(started(), 1), at(ev("progress", epoch=1, step=3), 5),
              at(ev("paused", epoch=1, step=3, checkpoint=None), 6),       # run 1: 5 s
              at(ev("resumed", epoch=1, step=3, checkpoint=None), 20),
              at(started(2), 21), at(epoch(1, 0.5), 24),
              at(ev("interrupted", reason="crash detected at startup", crash=False), 50),  # run 2: 3 s
              at(started(3), 51)]
    events = [{**e, "seq": i} for i, e in enumerate(events, 1)]
    state = fold(events)
    assert state.running_seconds == 8.0 and state.run_since == "2026-01-01T00:00:51.000Z"
