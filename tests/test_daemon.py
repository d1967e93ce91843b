"""The real daemon, driven through the spool: job files in, control files in, event logs and
model files out. Real processes, real signals, real (tiny) training runs."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest

from daemon.replay import fold
from daemon.spool import Spool
from tests.conftest import (REPO, alive, classification_csv, drop_job, events_of, last, regression_csv,
                            seed_job, wait_for_event, wait_for_status, wait_until)

EPOCH_FIELDS = {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate",
                "time_per_epoch", "samples_per_sec", "memory_usage", "gpu_utilization", "gpu_memory",
                "data_time", "compute_time"}


def test_bad_files_are_rejected_with_reasons_while_other_jobs_train(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv")
    daemon_factory(spool)
    bad = {
        "typo.json": json.dumps({**seed_job(data), "epoch": 3}).encode(),
        "notjson.json": b"{'epochs': 3",
        "empty.json": b"",
        "bom.json": b"\xef\xbb\xbf" + json.dumps(seed_job(data)).encode(),
        "types.json": json.dumps({**seed_job(data), "epochs": "ten", "batch_size": -1}).encode(),
    }
    drop_job(spool, "good.json", seed_job(data, epochs=2))
    for name, content in bad.items():
        drop_job(spool, name, content)
    rejected = spool / "rejected"
    wait_until(lambda: all((rejected / f"{n[:-5]}.error.json").exists() for n in bad), 30,
               what="every bad file rejected")
    for name, content in bad.items():
        assert (rejected / name).read_bytes() == content  # the original bytes are kept
        report = json.loads((rejected / f"{name[:-5]}.error.json").read_text())
        assert report["errors"] and report["file"] == name and report["what_next"]
    typo = json.loads((rejected / "typo.error.json").read_text())["errors"]
    assert any('Did you mean "epochs"?' in e for e in typo)
    types = json.loads((rejected / "types.error.json").read_text())["errors"]
    assert len(types) == 2 and any('Received: "ten"' in e for e in types)
    wait_for_status(spool, "good", "completed")
    log = [json.loads(l) for l in (spool / "daemon.jsonl").read_text().splitlines()]
    assert sum(l["event"] == "rejected" for l in log) == len(bad)
    assert list((spool / "incoming").iterdir()) == []


def test_links_fifos_and_folders_never_block_and_are_never_followed(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv")
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps(seed_job(data)))
    incoming = spool / "incoming"
    (incoming / "link.json").symlink_to(secret)
    os.mkfifo(incoming / "pipe.json")
    (incoming / "folder.json").mkdir()
    outside = tmp_path / "hard.json"
    outside.write_text("{}")
    os.link(outside, incoming / "hard.json")
    daemon_factory(spool)
    drop_job(spool, "after.json", seed_job(data, epochs=1))
    wait_for_status(spool, "after", "completed")
    rejected = spool / "rejected"
    for name, needle in (("link", "symbolic link"), ("pipe", "FIFO"), ("folder", "directory"),
                         ("hard", "hard links")):
        # a regular file written before the daemon started (the hard link) is looked at only
        # once quiet for 2 s, which the other job may not outlast
        wait_until((rejected / f"{name}.error.json").exists, 30, what=f"{name}.json to be rejected")
        report = json.loads((rejected / f"{name}.error.json").read_text())
        assert needle in report["errors"][0]
    assert (rejected / "link.json").is_symlink() and secret.exists()  # the link moved, not its target
    assert json.loads(secret.read_text())["epochs"] == 3


def test_file_names_that_are_not_utf8_are_taken_and_shown_escaped(tmp_path, spool, daemon_factory):
    """A Latin-1 name ("caf\\xe9.json", from a Windows share) comes from os.listdir with a lone
    surrogate, which JSON cannot hold: writing it to daemon.jsonl used to kill the daemon, which
    then died again on each restart. Now the job is taken (its id sanitised), a bad one rejected,
    and the names show their odd bytes escaped."""
    data = classification_csv(tmp_path / "train.csv")
    incoming, control = os.fsencode(spool / "incoming"), os.fsencode(spool / "control")
    with open(incoming + b"/caf\xe9.json", "wb") as f:
        f.write(json.dumps(seed_job(data, epochs=1)).encode())
    with open(incoming + b"/bad\xff.json", "wb") as f:
        f.write(b'{"epoch": 3}')
    with open(control + b"/w\xe9.pause", "wb"):
        pass
    # a claim a crash interrupted, its marker holding such a name's bytes
    (spool / "jobs" / "half").mkdir()
    (spool / "jobs" / "half" / ".accepting").write_bytes(b"half\xe9.json")
    (spool / "jobs" / "half" / "job.json").write_text(json.dumps(seed_job(data, epochs=1)))
    daemon = daemon_factory(spool)
    assert wait_for_status(spool, "caf", "completed").job_id == "caf"
    assert events_of(spool, "caf")[0]["source_file"] == "caf\\xe9.json"
    assert events_of(spool, "half")[0]["source_file"] == "half\\xe9.json"
    wait_for_status(spool, "half", "completed")
    rejected = os.fsencode(spool / "rejected")
    wait_until(lambda: os.path.exists(rejected + b"/bad\xff.error.json"), 30, what="the bad file rejected")
    with open(rejected + b"/bad\xff.error.json", "rb") as f:
        report = json.loads(f.read())
    assert report["file"] == "bad\\xff.json" and 'Did you mean "epochs"?' in report["errors"][-1]
    assert os.path.exists(rejected + b"/bad\xff.json")  # the bytes as dropped, under their own name
    wait_until(lambda: any(b"w\xe9.pause" in n for n in os.listdir(rejected)), 30, what="the stray request rejected")
    entries = [json.loads(line) for line in (spool / "daemon.jsonl").read_text().splitlines()]
    assert {"caf\\xe9.json", "bad\\xff.json"} <= {e.get("source_file") or e.get("file") for e in entries}
    assert daemon.proc.poll() is None and "Traceback" not in daemon.log()


def test_a_file_written_in_place_is_not_read_half_written(tmp_path, spool, daemon_factory):
    """Written in place (not renamed in) and still being written: taken only once complete."""
    data = classification_csv(tmp_path / "train.csv")
    daemon_factory(spool)
    body = json.dumps(seed_job(data, epochs=1)).encode()
    path = spool / "incoming" / "slow.json"
    with open(path, "wb") as f:
        for i in range(0, len(body), 40):
            f.write(body[i:i + 40])
            f.flush()
            time.sleep(0.1)  # a slow writer, the thing under test
    wait_for_status(spool, "slow", "completed")
    assert not (spool / "rejected" / "slow.error.json").exists()


def test_a_file_moved_in_from_another_folder_is_taken_at_once(tmp_path, spool, daemon_factory):
    """`mv job.json incoming/` is complete the moment it lands: inotify reports a move in, which
    is taken without waiting for the file to be quiet. Its mtime is set an hour ahead, so the
    quiet rule alone could never take it: only the move can."""
    daemon_factory(spool)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("moved", "moved-too"):
        src = elsewhere / f"{name}.json"
        src.write_text(json.dumps({"train_data_path": "x.csv", "target_column": "t", "epoch": 1}))
        ahead = time.time() + 3600
        os.utime(src, (ahead, ahead))
        os.rename(src, spool / "incoming" / f"{name}.json")
        wait_until(lambda: (spool / "rejected" / f"{name}.error.json").exists(), 20,
                   what=f"{name}.json to be taken")
        errors = json.loads((spool / "rejected" / f"{name}.error.json").read_text())["errors"]
        assert any('Did you mean "epochs"?' in e for e in errors)


def test_a_file_arriving_just_after_the_daemon_took_another_is_not_held_behind_it(tmp_path, spool, daemon_factory):
    """Each file the daemon takes leaves incoming/ by a rename to a folder it does not watch.
    watchdog holds such a half-rename for its pairing delay (0.5 s by default) and every event
    of the folder queues behind it: a file moved in just after waited out the rest. Each file
    here arrives right after the daemon took the one before (its mtime an hour ahead, so only
    its own event can take it); the median wait must be far below those 0.5 s."""
    daemon_factory(spool)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    waits = []
    for i in range(5):
        src = elsewhere / f"next{i}.json"
        src.write_text(json.dumps({"train_data_path": "x.csv", "target_column": "t", "epoch": 1}))
        ahead = time.time() + 3600
        os.utime(src, (ahead, ahead))
        moved_at = time.time()
        os.rename(src, spool / "incoming" / f"next{i}.json")
        taken = wait_until(lambda: [r for r in map(json.loads, (spool / "daemon.jsonl").read_text().splitlines())
                                    if r["event"] == "rejected" and r["file"] == f"next{i}.json"],
                           20, interval=0.005, what=f"next{i}.json to be taken")
        waits.append(datetime.fromisoformat(taken[0]["ts"]).timestamp() - moved_at)
    assert sorted(waits)[2] < 0.25, waits


def test_data_errors_fail_the_job_at_once_without_retry(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv")
    first = daemon_factory(spool)
    drop_job(spool, "nofile.json", seed_job(tmp_path / "missing.csv"))
    drop_job(spool, "nocol.json", seed_job(data, feature_columns=["feature1", "feature9"]))
    drop_job(spool, "outfile.json", seed_job(data, output_path=str(data / "model")))  # a file in the way
    for job_id, error, needle in (("nofile", "DataError", "does not exist"),
                                  ("nocol", "DataError", 'no column "feature9"'),
                                  ("outfile", "PathNotAllowed", f"{data} is a file, not a folder")):
        state = wait_for_status(spool, job_id, "failed")
        assert state.last_error["error"] == error and needle in state.last_error["message"]
        assert state.last_error["retryable"] is False and state.last_error["traceback"] is None
    drop_job(spool, "after.json", seed_job(data, epochs=1))  # a retry would come before this ends
    wait_for_status(spool, "after", "completed")
    for job_id in ("nofile", "nocol", "outfile"):
        assert [r["type"] for r in events_of(spool, job_id)] == ["job_accepted", "failed"]
    # the daemon's own log (the journal, under systemd) says how each job ended
    wait_until(lambda: "job after: completed after 1 epochs (max_epochs); best val_loss" in first.log(),
               30, what="the daemon to log the outcome")
    told = first.log()
    assert "job after: starting on CPU (worker pid" in told
    assert "WARNING epochd.daemon: job nofile: failed: DataError: train_data_path" in told
    first.stop()
    again = daemon_factory(spool)  # finished jobs are known, not runnable
    wait_until(lambda: "4 jobs known, 0 runnable" in again.log(), 30, what="the startup line")


def test_a_framework_that_is_not_installed_fails_the_job_with_the_install_command(tmp_path, spool, daemon_factory):
    """A TensorFlow job where TensorFlow does not import (here: a package on PYTHONPATH that
    raises ImportError, as a missing install does): failed at once, not retried, and the message
    names the extra to install. PyTorch jobs on the same daemon still train."""
    fake = tmp_path / "site"
    (fake / "tensorflow").mkdir(parents=True)
    (fake / "tensorflow" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'tensorflow'\", name='tensorflow')\n")
    data = classification_csv(tmp_path / "train.csv")
    daemon_factory(spool, env={"PYTHONPATH": f"{fake}{os.pathsep}{REPO}"})
    drop_job(spool, "tfjob.json", seed_job(data, framework="tf", epochs=1))
    state = wait_for_status(spool, "tfjob", "failed")
    assert state.last_error["error"] == "EngineUnavailable" and state.last_error["retryable"] is False
    assert "pip install 'epochd[tensorflow]'" in state.last_error["message"]
    assert '"tensorflow"' in state.last_error["message"]
    assert [r["type"] for r in events_of(spool, "tfjob")] == ["job_accepted", "failed"]
    drop_job(spool, "pt.json", seed_job(data, epochs=1))
    wait_for_status(spool, "pt", "completed")


def test_an_allow_root_or_base_dir_that_is_not_a_folder_is_said_at_start(tmp_path, spool, daemon_factory):
    daemon = daemon_factory(spool, "--allow-root", str(tmp_path / "dta"), "--allow-root", str(tmp_path),
                            "--base-dir", str(tmp_path / "srv"))
    wait_until(lambda: "serving" in daemon.log(), timeout=30, what="the daemon to serve")
    said = daemon.log()
    assert f"--allow-root {tmp_path / 'dta'} is not a folder: no job can read data" in said
    assert f"--allow-root {tmp_path} is" not in said
    assert f"the base folder {tmp_path / 'srv'} (--base-dir, else the spool's parent) is not a folder" in said
    daemon.stop()
    again = daemon_factory(spool)
    wait_until(lambda: "serving" in again.log(), timeout=30, what="the daemon to serve")
    assert "the base folder" not in again.log()  # the spool's parent is one


def test_a_second_daemon_on_the_same_spool_exits_with_a_clear_message(spool, daemon_factory):
    daemon_factory(spool)
    second = subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--spool", str(spool)],
                            capture_output=True, text=True, timeout=30, cwd=REPO)
    assert second.returncode == 75
    assert "already served by epochd pid" in second.stderr and "another --spool" in second.stderr


def test_a_spool_that_cannot_be_created_or_written_is_a_clear_error_at_start(tmp_path):
    (tmp_path / "file").write_text("")
    unwritable = tmp_path / "ro"
    unwritable.mkdir(mode=0o555)
    cases = [(tmp_path / "file" / "spool", "Not a directory")]
    if os.geteuid() != 0:  # root may write anywhere
        cases.append((unwritable / "spool", "Permission denied"))
    for where, why in cases:
        serve = subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--spool", str(where)],
                               capture_output=True, text=True, timeout=30, cwd=REPO)
        assert serve.returncode == 1 and "Traceback" not in serve.stderr, serve.stderr
        assert f"Error: cannot serve {where}: " in serve.stderr and why in serve.stderr
        assert "Expected: a spool folder the user " in serve.stderr and "or pass another --spool" in serve.stderr


def test_the_daemon_process_never_loads_torch(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv")
    d = daemon_factory(spool)
    drop_job(spool, "j.json", seed_job(data, epochs=1))
    wait_for_status(spool, "j", "completed")
    maps = open(f"/proc/{d.proc.pid}/maps").read()
    assert "libtorch" not in maps and "tensorflow" not in maps
    import torch  # noqa: F401  (the control: the same check sees torch where it is loaded)
    assert "libtorch" in open("/proc/self/maps").read()


def test_a_worker_that_keeps_dying_ends_failed_after_the_retry_limit(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv", rows=3000)
    daemon_factory(spool, "--max-retries", "0")
    drop_job(spool, "d.json", seed_job(data, epochs=50, batch_size=4))
    records = wait_for_event(spool, "d", "run_started")
    os.kill(next(r["pid"] for r in records if r["type"] == "run_started"), signal.SIGKILL)
    state = wait_for_status(spool, "d", "failed")
    assert state.last_error["error"] == "WorkerCrashed" and "worker.log" in state.last_error["message"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_shutdown_interrupts_running_jobs_and_the_next_start_continues_them(tmp_path, spool, daemon_factory, sig):
    """SIGTERM is systemd's stop; SIGHUP comes when the terminal that runs `epochd serve` closes,
    and used to kill the daemon at once, unrecorded, its workers left unsupervised."""
    data = classification_csv(tmp_path / "train.csv", rows=12000)  # epochs of 4,800 steps, seconds
    d = daemon_factory(spool)
    drop_job(spool, "s.json", seed_job(data, epochs=4, batch_size=2, algorithm_params={"hidden_units": [16]}))
    wait_for_event(spool, "s", "progress")
    assert d.stop(sig=sig) == 0
    entries = [json.loads(line) for line in (spool / "daemon.jsonl").read_text().splitlines()]
    assert [e["signal"] for e in entries if e["event"] == "stopping"] == [signal.Signals(sig).name]
    assert f"{signal.Signals(sig).name}: stopping; checkpointing 1 running jobs" in d.log()
    state = fold(events_of(spool, "s"))
    assert state.status == "interrupted"
    last = events_of(spool, "s")[-1]
    assert last["type"] == "interrupted" and last["reason"] == "shutdown" and last["checkpoint"]
    daemon_factory(spool)
    state = wait_for_status(spool, "s", "completed", timeout=120)
    assert [h["epoch"] for h in state.history] == [1, 2, 3, 4]


def test_a_crash_between_claim_and_acceptance_is_finished_at_startup(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv")
    job_dir = spool / "jobs" / "half"
    job_dir.mkdir()
    (job_dir / ".accepting").write_text("half.json")
    (job_dir / "job.json").write_text(json.dumps(seed_job(data, epochs=1)))
    daemon_factory(spool)
    wait_for_status(spool, "half", "completed")
    accepted = events_of(spool, "half")[0]
    assert accepted["recovered"] is True and accepted["source_file"] == "half.json"


def test_a_torn_tail_in_a_queued_jobs_log_is_cut_before_it_runs(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv")
    d = daemon_factory(spool, "--max-jobs", "1")
    drop_job(spool, "a.json", seed_job(data, epochs=1))
    wait_for_status(spool, "a", "completed")
    d.stop()
    log = Spool(spool).events_path("a")
    with open(log, "ab") as f:
        f.write(b'{"seq": 99, "ts": "torn')
    daemon_factory(spool)  # restart with a torn tail present: no crash, the job stays completed
    drop_job(spool, "b.json", seed_job(data, epochs=1))
    wait_for_status(spool, "b", "completed")
    assert fold(events_of(spool, "a")).status == "completed"


def test_a_corrupt_log_quarantines_that_job_and_the_others_run(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv")
    d = daemon_factory(spool)
    drop_job(spool, "c.json", seed_job(data, epochs=1))
    wait_for_status(spool, "c", "completed")
    d.stop()
    log = Spool(spool).events_path("c")
    lines = log.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"attempt":1', b'"attempt":7')
    log.write_bytes(b"".join(lines))
    daemon_factory(spool)
    drop_job(spool, "other.json", seed_job(data, epochs=1))
    wait_for_status(spool, "other", "completed")
    entries = [json.loads(l) for l in (spool / "daemon.jsonl").read_text().splitlines()]
    assert any(e["event"] == "quarantined" and e["job_id"] == "c" for e in entries)


def test_a_log_damaged_while_the_daemon_runs_is_quarantined_once_and_back_once_restored(
        tmp_path, spool, daemon_factory):
    """A request for a job whose log was damaged under a running daemon: rejected once with
    the reason (it used to stay in control/ with an error line in daemon.jsonl every tick).
    Restoring the log from a backup brings the job back without a restart: a pause made
    then is carried out."""
    data = classification_csv(tmp_path / "train.csv")
    daemon_factory(spool)
    drop_job(spool, "q.json", seed_job(data, epochs=1))
    wait_for_status(spool, "q", "completed")

    def journal():
        return [json.loads(l) for l in (spool / "daemon.jsonl").read_text().splitlines()]
    wait_until(lambda: any(e["event"] == "worker_exited" and e["job_id"] == "q" for e in journal()),
               30, what="the daemon to see q's worker exit")  # so that it has read the log whole
    log = Spool(spool).events_path("q")
    backup = log.read_bytes()
    lines = backup.splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"attempt":1', b'"attempt":7')
    log.write_bytes(b"".join(lines))
    (spool / "control" / "q.cancel").write_text("")
    report = spool / "rejected" / "q.cancel.error.json"
    wait_until(report.exists, 30, what="the request for a damaged job to be rejected")
    assert "job q is quarantined: event log" in report.read_text()
    drop_job(spool, "after.json", seed_job(data, epochs=1))  # the daemon serves on meanwhile
    wait_for_status(spool, "after", "completed")
    assert [e["event"] for e in journal() if e.get("job_id") == "q"].count("quarantined") == 1
    assert not any(e["event"] == "error" for e in journal())

    log.write_bytes(backup)  # restored: back in service
    wait_until(lambda: any(e["event"] == "unquarantined" and e["job_id"] == "q" for e in journal()),
               30, what="the restored job to be back")
    (spool / "control" / "q.resume").write_text("")
    report = spool / "rejected" / "q.resume.error.json"
    wait_until(report.exists, 30, what="the resume of a completed job to be refused")
    assert "the job is completed; there is nothing to resume" in report.read_text()


def test_requests_for_unknown_jobs_and_stray_control_files_are_rejected(spool, daemon_factory):
    daemon_factory(spool)
    (spool / "control" / "ghost.pause").write_text("")
    (spool / "control" / "notes.txt").write_text("hello")
    os.utime(spool / "control" / "notes.txt", (0, 0))
    rejected = spool / "rejected"
    wait_until(lambda: (rejected / "ghost.pause.error.json").exists()
               and (rejected / "notes.txt.error.json").exists(), 30, what="control files rejected")
    assert 'no job "ghost"' in json.loads((rejected / "ghost.pause.error.json").read_text())["errors"][0]


def test_job_ids_come_from_file_names_and_never_collide(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv")
    daemon_factory(spool)
    drop_job(spool, "same.json", seed_job(data, epochs=1))
    wait_for_status(spool, "same", "completed")
    drop_job(spool, "same.json", seed_job(data, epochs=1))
    drop_job(spool, "we ird!name.json", seed_job(data, epochs=1))
    drop_job(spool, "my job (1).json", seed_job(data, epochs=1))
    assert wait_for_event(spool, "same-2", "job_accepted")[0]["source_file"] == "same.json"
    assert wait_for_event(spool, "we-ird-name", "job_accepted")[0]["source_file"] == "we ird!name.json"
    assert wait_for_event(spool, "my-job-1", "job_accepted")[0]["source_file"] == "my job (1).json"
    assert [r["type"] for r in events_of(spool, "same")].count("job_accepted") == 1


def test_regression_job_end_to_end(tmp_path, spool, daemon_factory):
    data = regression_csv(tmp_path / "reg.csv", rows=400)
    daemon_factory(spool)
    job = seed_job(data, epochs=3, early_stopping={"monitor": "val_mae", "patience": 2})
    del job["algorithm_params"]["early_stopping_patience"]
    drop_job(spool, "reg.json", job)
    state = wait_for_status(spool, "reg", "completed")
    last = state.history[-1]
    assert last["train_accuracy"] is None and {"val_mae", "val_rmse", "val_r2"} <= set(last)


def test_queued_jobs_run_by_priority_then_by_arrival(tmp_path, spool, daemon_factory):
    """With one slot taken, jobs dropped meanwhile run highest priority first, and among
    equals the one accepted first (run_started's order)."""
    data = classification_csv(tmp_path / "train.csv")
    longer = classification_csv(tmp_path / "longer.csv", rows=20000)  # seconds: the queue forms
    daemon_factory(spool, "--max-jobs", "1")
    drop_job(spool, "busy.json", seed_job(longer, epochs=2))
    wait_for_event(spool, "busy", "job_accepted")
    for name, priority in (("low", 0), ("high", 5), ("low2", 0), ("mid", 1)):
        drop_job(spool, f"{name}.json", seed_job(data, epochs=1, priority=priority))
        wait_for_event(spool, name, "job_accepted")  # arrival order is acceptance order
    started = {job: wait_for_event(spool, job, "run_started", timeout=120)[-1]["ts"]
               for job in ("busy", "low", "high", "low2", "mid")}
    assert sorted(started, key=started.get) == ["busy", "high", "mid", "low", "low2"]


def test_removing_a_jobs_folder_forgets_the_job_and_never_stalls_the_queue(tmp_path, spool, daemon_factory):
    """`rm -r jobs/<id>` is how finished jobs are cleared out, and how a queued one is dropped.
    A queued job's folder removed used to stall the queue (the daemon failed to start it every
    tick, and every job behind it waited); a running one's worker went on with no log to show
    for it. Now the daemon forgets both, kills the running one's worker, and runs the next."""
    data = classification_csv(tmp_path / "train.csv")
    daemon = daemon_factory(spool, "--max-jobs", "1")
    # no checkpoint to write, its outputs elsewhere: the worker would run on for hours
    drop_job(spool, "busy.json", seed_job(data, tmp_path / "out", epochs=100_000,
                                          checkpoint={"every_epochs": 0}))
    pid = last(wait_for_event(spool, "busy", "run_started"), "run_started")["pid"]
    drop_job(spool, "queued.json", seed_job(data, epochs=1))
    wait_for_event(spool, "queued", "job_accepted")
    drop_job(spool, "after.json", seed_job(data, epochs=1))
    wait_for_event(spool, "after", "job_accepted")
    follower = subprocess.Popen([sys.executable, "-m", "daemon.cli", "tail", "-f", "--spool", str(spool), "busy"],
                                stdout=(tmp_path / "tail.out").open("w"), stderr=subprocess.PIPE, text=True)
    wait_until(lambda: "accepted busy.json as busy" in (tmp_path / "tail.out").read_text(), timeout=30,
               what="tail -f to follow the log")
    shutil.rmtree(spool / "jobs" / "queued")
    shutil.rmtree(spool / "jobs" / "busy")
    wait_for_status(spool, "after", "completed", timeout=60)
    wait_until(lambda: not alive(pid), timeout=10, what="the removed job's worker to end")
    # `tail -f` of a removed job ends, saying so, instead of following nothing for ever
    try:
        assert follower.wait(timeout=30) == 3
    finally:
        follower.kill()
    assert "job busy: its log was removed" in follower.stderr.read()

    def forgotten():
        entries = map(json.loads, (spool / "daemon.jsonl").read_text().splitlines())
        return {e["job_id"] for e in entries if e.get("event") == "forgotten"}
    assert wait_until(lambda: forgotten() == {"busy", "queued"}, timeout=10, what="both forgotten")
    assert not (spool / "jobs" / "busy").exists() and not (spool / "jobs" / "queued").exists()
    assert "job busy: its folder was removed while it ran; killing its worker" in daemon.log()
    # a removal that left part of the folder behind (rm raced a checkpoint being written): the
    # job is forgotten as well, and the daemon never writes into what is left
    drop_job(spool, "partly.json", seed_job(data, tmp_path / "out2", epochs=100_000))
    pid = last(wait_for_event(spool, "partly", "run_started"), "run_started")["pid"]
    for name in ("events.jsonl", "job.json", "worker.log"):
        (spool / "jobs" / "partly" / name).unlink()
    os.kill(pid, signal.SIGKILL)  # as when the worker then fails on its vanished log
    assert wait_until(lambda: "partly" in forgotten(), timeout=20, what="the partly removed job forgotten")
    assert sorted(p.name for p in (spool / "jobs" / "partly").iterdir()) == ["checkpoints", "lock"]
    assert not (spool / "jobs" / "partly" / "events.jsonl").exists()
    assert "None" not in daemon.log() and "partly: interrupted" not in daemon.log()
    assert daemon.proc.poll() is None and "cannot write" not in daemon.log()


def test_one_writer_per_output_folder_is_decided_from_the_jobs_states():
    from daemon import scheduler
    from daemon.replay import Status

    def job(job_id, status, at, output="/m"):
        return scheduler.Entry(job_id, status, 0, at, 0.0, 0, output=output)
    b = job("b", Status.PENDING, "2")
    assert scheduler.output_holder(job("b", Status.PENDING, "2", None), [job("a", Status.RUNNING, "1", None)]) is None
    for status, holds in ((Status.RUNNING, True), (Status.PAUSED, True), (Status.PENDING, True),
                          (Status.INTERRUPTED, True), (Status.COMPLETED, False), (Status.FAILED, False),
                          (Status.CANCELLED, False)):
        holder = scheduler.output_holder(b, [b, job("a", status, "1")])
        assert (holder is not None and holder.job_id == "a") is holds, status
    # a job queued behind it does not hold it, unless it runs, or is paused
    assert scheduler.output_holder(b, [job("c", Status.PENDING, "3")]) is None
    assert scheduler.output_holder(b, [job("c", Status.PAUSED, "3")]).job_id == "c"
    assert scheduler.output_holder(b, [job("c", Status.PENDING, "3")], running={"c"}).job_id == "c"
    assert scheduler.output_holder(b, [job("a", Status.RUNNING, "1", "/other")]) is None


def test_jobs_writing_one_output_folder_run_one_after_the_other(tmp_path, spool, daemon_factory):
    """With room for two jobs, a second job naming the first's output_path waits while the first
    runs and while it is paused (submit and status say so), and starts once it has ended. The
    second names the folder through a symlink: still the same folder."""
    from click.testing import CliRunner

    from daemon import control
    from daemon.cli import cli
    data = classification_csv(tmp_path / "train.csv", rows=4000)
    out = tmp_path / "shared"
    daemon_factory(spool, "--max-jobs", "2")
    drop_job(spool, "a.json", seed_job(data, out, epochs=2, batch_size=2, algorithm_params={"hidden_units": [16]}))
    wait_for_event(spool, "a", "progress")
    alias = tmp_path / "models"
    alias.symlink_to(out, target_is_directory=True)
    (tmp_path / "b.json").write_text(json.dumps(seed_job(data, alias, epochs=2, algorithm_params={"hidden_units": [8]})))
    submitted = CliRunner().invoke(cli, ["submit", "--spool", str(spool), str(tmp_path / "b.json")])
    assert submitted.exit_code == 0, submitted.output
    assert f"note: job a (running) writes the same output_path {alias}: this job waits" in submitted.output
    wait_for_event(spool, "b", "job_accepted")
    shown = CliRunner().invoke(cli, ["status", "--spool", str(spool), "b"]).output
    assert f"queued: waits for job a (running), which writes the same output_path {alias}" in shown
    assert json.loads(CliRunner().invoke(cli, ["status", "--spool", str(spool), "b", "--json"]).output)[
        "waits_for"] == "a"
    control.drop(Spool(spool), "a", "pause")
    wait_for_status(spool, "a", "paused")
    shown = CliRunner().invoke(cli, ["status", "--spool", str(spool), "b"]).output
    assert 'waits for job a (paused)' in shown and '"epochd resume a" or "epochd cancel a"' in shown
    control.drop(Spool(spool), "a", "cancel")
    wait_for_status(spool, "b", "completed")
    cancelled = next(r for r in events_of(spool, "a") if r["type"] == "cancelled")
    started = next(r for r in events_of(spool, "b") if r["type"] == "run_started")
    assert started["ts"] > cancelled["ts"]  # never while a ran or was paused
    assert json.loads((out / "model.json").read_text())["job_id"] == "b"
