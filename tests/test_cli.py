"""The CLI on real spools, through click's CliRunner (and a real daemon for submit --follow)."""
import io
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from daemon.cli import Exit, cli
from daemon.eventlog import EventLog
from daemon.events import ControlReceived, EpochCompleted, Failed, JobAccepted, Progress
from daemon.spool import Spool
from tests.conftest import (REPO, classification_csv, drop_job, events_of, seed_job, wait_for_event, wait_for_status,
                            wait_until)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One completed job in a spool, trained once by a real daemon for the whole module."""
    from tests.conftest import DaemonProcess, kill_workers
    tmp = tmp_path_factory.mktemp("cli")
    spool = tmp / "spool"
    Spool(spool).ensure()
    data = classification_csv(tmp / "train.csv")
    table = pd.read_csv(data)  # and a text column, one-hot encoded over its three values
    table.insert(3, "colour", np.random.default_rng(5).choice(["red", "green", "blue"], len(table)))
    table.to_csv(data, index=False)
    d = DaemonProcess(spool)
    try:
        drop_job(spool, "done.json", seed_job(data, epochs=2, feature_columns=[
            "feature1", "feature2", "feature3", "colour"]))
        wait_for_status(spool, "done", "completed")
    finally:
        d.stop()
        kill_workers(spool)
    return spool, data


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_every_command_is_documented_with_examples_each_on_its_own_line():
    for name in cli.commands:
        lines = invoke(name, "--help").output.splitlines()
        at = next(i for i, line in enumerate(lines) if line.strip() in ("Example:", "Examples:"))
        examples = lines[at + 1:lines.index("Options:", at) - 1]  # click's wrapping left them alone
        assert examples and all(e.startswith(f"    epochd {name} ") for e in examples), (name, examples)


def test_status_lists_jobs_and_shows_one_as_json(trained):
    spool, _ = trained
    table = invoke("status", "--spool", spool)
    assert table.exit_code == 0 and "done" in table.output and "completed" in table.output
    one = json.loads(invoke("status", "--spool", spool, "done", "--json").output)
    assert one["status"] == "completed" and one["epochs_done"] == 2 and one["outputs"]["model"]
    every = json.loads(invoke("status", "--spool", spool, "--json").output)
    assert [j["job_id"] for j in every] == ["done"]
    detail = invoke("status", "--spool", spool, "done").output
    assert detail.startswith("job done: completed (max_epochs)") and "outputs: model=" in detail
    # no "position: epoch 3 step 0": a finished job is not at an epoch past its last
    assert "  epochs: 2/2  attempts: 1\n" in detail and "position" not in detail


def test_history_json_is_the_seeds_training_history(trained):
    spool, _ = trained
    history = json.loads(invoke("history", "--spool", spool, "done", "--json").output)
    assert history["epoch"] == [1, 2] and len(history["train_loss"]) == 2
    assert "learning_rate" in history and "val_accuracy" in history
    assert "EPOCH" in invoke("history", "--spool", spool, "done").output


def accepted_job(spool: Spool, job_id: str) -> EventLog:
    """A job folder in `spool` whose log holds its acceptance; the log is open for more."""
    spool.ensure()
    spool.job_dir(job_id).mkdir()
    log = EventLog(spool.events_path(job_id))
    log.append(JobAccepted(job_id=job_id, source_file=f"{job_id}.json", spec={"epochs": 3},
                           spec_sha256="a", file_sha256="b"))
    return log


def test_history_names_its_columns_for_the_task_and_says_when_there_is_none(tmp_path):
    spool = Spool(tmp_path / "spool")
    with accepted_job(spool, "reg") as log:
        assert "no epoch has finished yet" in invoke("history", "--spool", spool.root, "reg").output
        log.append(EpochCompleted(
            epoch=1, train_loss=0.25, train_accuracy=None, val_loss=0.5, val_accuracy=None,
            learning_rate=0.001, time_per_epoch=1.0, samples_per_sec=100.0, memory_usage=100.0,
            gpu_utilization=None, gpu_memory=None, data_time=0.0, compute_time=1.0, eval_time=0.0,
            cpu_time=1.0, steps=10, train_mae=1.5, train_rmse=2.0, val_mae=2.5, val_rmse=3.0, val_r2=0.75))
    header, row = invoke("history", "--spool", spool.root, "reg").output.splitlines()
    assert header.split() == ["EPOCH", "TRAIN_LOSS", "TRAIN_MAE", "VAL_LOSS", "VAL_MAE", "LR", "SECONDS"]
    assert row.split() == ["1", "0.2500", "1.5000", "0.5000", "2.5000", "0.001", "1.00"]


def test_history_and_plot_of_a_job_that_failed_before_an_epoch_say_it_will_not_get_one(tmp_path):
    spool = Spool(tmp_path / "spool")
    with accepted_job(spool, "bad") as log:
        log.append(Failed(error="DataError", message="no rows", traceback=None, retryable=False))
    said = invoke("history", "--spool", spool.root, "bad").output
    assert 'job bad failed before an epoch finished: "epochd status bad" says why' in said
    assert "tail -f" not in said
    drawn = CliRunner().invoke(cli, ["plot", "--spool", str(spool.root), "bad", "-o", str(tmp_path / "p.png")])
    assert drawn.exit_code == Exit.REFUSED and "failed before an epoch finished" in drawn.output
    assert not (tmp_path / "p.png").exists()


def test_the_status_table_keeps_its_columns_with_long_job_ids(tmp_path):
    spool = Spool(tmp_path / "spool")
    for job_id in ("a", "b" * 40):
        accepted_job(spool, job_id).close()
    lines = invoke("status", "--spool", spool.root).output.splitlines()[:3]
    assert len({line.index(word) for line, word in zip(lines, ("STATUS", "pending", "pending"))}) == 1


def test_tail_prints_the_story_and_raw_json(trained):
    spool, _ = trained
    out = invoke("tail", "--spool", spool, "done").output
    assert "accepted done.json as done" in out and "epoch 2/2" in out and "completed: 2 epochs" in out
    raw = [json.loads(l) for l in invoke("tail", "--spool", spool, "done", "--raw").output.splitlines()]
    assert raw[0]["type"] == "job_accepted" and raw[-1]["type"] == "completed"
    assert invoke("tail", "--spool", spool, "done", "-f").exit_code == Exit.OK  # ends at completion


def test_tail_lines_prints_only_the_last_n_lines_of_what_the_log_holds(trained):
    """epochd tail -n N [--raw] [-f] done"""
    spool, _ = trained
    story = invoke("tail", "--spool", spool, "done").output.splitlines()
    assert len(story) > 3
    assert invoke("tail", "--spool", spool, "done", "-n", 3).output.splitlines() == story[-3:]
    assert invoke("tail", "--spool", spool, "done", "-n", 1000).output.splitlines() == story
    assert invoke("tail", "--spool", spool, "done", "-n", 0).output == ""
    raw = invoke("tail", "--spool", spool, "done", "--raw", "-n", 1).output.splitlines()
    assert [json.loads(line)["type"] for line in raw] == ["completed"]
    followed = invoke("tail", "--spool", spool, "done", "-n", 1, "-f")
    assert followed.exit_code == Exit.OK and followed.output.splitlines() == story[-1:]
    refused = invoke("tail", "--spool", spool, "done", "-n", -1)
    assert refused.exit_code == Exit.USAGE and "-1" in refused.output


def test_tail_on_a_terminal_shows_the_latest_progress_as_a_live_line(trained, tmp_path):
    """Under a pseudo-terminal `tail` draws progress as one line it overwrites: the latest
    progress is drawn, and progress that later lines supersede is not drawn at all."""
    lines = Spool(trained[0]).events_path("done").read_bytes().splitlines(keepends=True)
    spool = tmp_path / "spool"  # the trained job's first epoch, then a running second one
    root = Spool(spool)
    root.ensure()
    first_epoch = next(i for i, l in enumerate(lines) if b'"type":"epoch_completed"' in l)
    root.job_dir("live").mkdir()
    root.events_path("live").write_bytes(b"".join(lines[:first_epoch + 1]))
    with EventLog(root.events_path("live")) as log:
        for step in (1, 2, 3):
            log.append(Progress(epoch=2, step=step, steps_per_epoch=4, samples_per_sec=1000.0,
                                loss=step / 10, eta_seconds=5.0))
            if step == 2:
                log.append(ControlReceived(action="pause", source_file="control/live.pause",
                                           outcome="already paused"))
    code, text = on_a_terminal("tail", "--spool", spool, "live")
    assert code == 0, text
    assert "epoch 1/2" in text and "pause requested" in text
    assert "\repoch 2/2 [" in text and "3/4 loss 0.3000" in text
    assert "1/4 loss" not in text and "2/4 loss" not in text
    code, text = on_a_terminal("tail", "--spool", spool, "live", "-n", 0)  # the live line alone
    assert code == 0 and text.startswith("\repoch 2/2 [") and "\n" not in text, text


def test_status_of_a_running_job_shows_where_it_is_in_its_epoch(trained, tmp_path):
    """The latest progress of the epoch in progress: in the detail and in --json; none once
    the epoch it belongs to has ended."""
    lines = Spool(trained[0]).events_path("done").read_bytes().splitlines(keepends=True)
    root = Spool(tmp_path / "spool")
    root.ensure()
    first_epoch = next(i for i, l in enumerate(lines) if b'"type":"epoch_completed"' in l)
    root.job_dir("live").mkdir()
    root.events_path("live").write_bytes(b"".join(lines[:first_epoch + 1]))
    shown = invoke("status", "--spool", root.root, "live").output
    assert "running" in shown and "now:" not in shown  # the first epoch's progress is history
    with EventLog(root.events_path("live")) as log:
        log.append(Progress(epoch=2, step=3, steps_per_epoch=4, samples_per_sec=1234.0,
                            loss=0.25, eta_seconds=95.0))
    shown = invoke("status", "--spool", root.root, "live").output
    assert "  now: epoch 2/2 [" in shown and "3/4 loss 0.2500 1,234 samples/s eta 1m35s" in shown
    progress = json.loads(invoke("status", "--spool", root.root, "live", "--json").output)["progress"]
    assert progress["step"] == 3 and progress["eta_seconds"] == 95.0
    assert json.loads(invoke("status", "--spool", trained[0], "done", "--json").output)["progress"] is None


def on_a_terminal(*args) -> tuple[int, str]:
    """Run `epochd ARGS` with a pseudo-terminal as its stdout: its exit code and what it drew."""
    leader, follower = os.openpty()
    try:
        try:
            proc = subprocess.run([sys.executable, "-m", "daemon.cli", *map(str, args)],
                                  stdout=follower, stderr=follower, timeout=60)
        finally:
            os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(leader)
    return proc.returncode, out.decode()


def test_plot_and_predict(trained, tmp_path):
    spool, data = trained
    png = tmp_path / "curves.png"
    assert invoke("plot", "--spool", spool, "done", "-o", png).exit_code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "pred.csv"
    result = invoke("predict", "--spool", spool, "done", "--data", data, "-o", out)
    assert result.exit_code == 0 and out.read_text().startswith("prediction,p_0,p_1")
    folder = Spool(spool).job_dir("done") / "model"
    best = invoke("predict", "--spool", spool, str(folder), "--data", data, "--best")
    assert best.exit_code == 0 and len(best.output.splitlines()) == 241
    assert json.loads((folder / "model.json").read_text())["weights"] == "model.safetensors"
    # the data may follow MODEL, as with most commands; once, not twice
    final = invoke("predict", "--spool", spool, "done", "--data", data).output
    assert invoke("predict", "--spool", spool, "done", data).output == final
    twice = invoke("predict", "--spool", spool, "done", data, "--data", data)
    assert twice.exit_code == 2 and "got the data twice" in twice.output
    none = invoke("predict", "--spool", spool, "done")
    assert none.exit_code == 2 and "no data to predict on" in none.output


def test_plot_and_predict_write_what_o_asks_for_and_refuse_what_they_cannot_write(trained, tmp_path):
    """plot's `-o curves.svg` used to hold PNG bytes, and a missing folder ended in a traceback."""
    spool, data = trained
    for name, magic in (("c.svg", b"<?xml"), ("c.PDF", b"%PDF-"), ("c.png", b"\x89PNG"), ("curves", b"\x89PNG")):
        assert invoke("plot", "--spool", spool, "done", "-o", tmp_path / name).exit_code == 0
        assert (tmp_path / name).read_bytes().startswith(magic), name
    odd = invoke("plot", "--spool", spool, "done", "-o", tmp_path / "c.txt")
    assert odd.exit_code == Exit.USAGE and "its name ends .txt. Expected: a name ending .png, .svg, .pdf" in odd.output
    nowhere = invoke("plot", "--spool", spool, "done", "-o", tmp_path / "no" / "c.png")
    assert nowhere.exit_code == Exit.USAGE
    assert f"the folder {tmp_path / 'no'} does not exist. Expected: a file in an existing folder" in nowhere.output
    assert not (tmp_path / "c.txt").exists() and not (tmp_path / "no").exists()
    # predict's -o likewise: refused before any work, not a pandas traceback after it
    nowhere = invoke("predict", "--spool", spool, "done", data, "-o", tmp_path / "no" / "p.csv")
    assert nowhere.exit_code == Exit.USAGE and f"the folder {tmp_path / 'no'} does not exist" in nowhere.output
    (tmp_path / "ro").mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        denied = invoke("predict", "--spool", spool, "done", data, "-o", tmp_path / "ro" / "p.csv")
        assert denied.exit_code == Exit.ERROR and "Permission denied. Expected: a file this user may write" in denied.output


def test_predict_keeps_the_input_columns_asked_for_before_the_predictions(trained, tmp_path):
    """--keep id: predictions come in row order, and an id to join them on saves a paste."""
    import io

    import pandas as pd
    spool, data = trained
    table = pd.read_csv(data)
    table.insert(0, "id", [f"r{i}" for i in range(len(table))])
    table["prediction"] = "mine"  # the input's own column of that name is kept apart
    with_id = tmp_path / "with_id.csv"
    table.to_csv(with_id, index=False)
    plain = pd.read_csv(io.StringIO(invoke("predict", "--spool", spool, "done", with_id).output))
    kept = invoke("predict", "--spool", spool, "done", with_id, "--keep", "id", "-k", "prediction")
    assert kept.exit_code == 0
    out = pd.read_csv(io.StringIO(kept.output))
    assert list(out.columns) == ["id", "input_prediction", *plain.columns]
    assert list(out["id"]) == list(table["id"]) and set(out["input_prediction"]) == {"mine"}
    pd.testing.assert_frame_equal(out[plain.columns], plain)
    missing = invoke("predict", "--spool", spool, "done", with_id, "--keep", "ID")
    assert missing.exit_code == Exit.ERROR
    assert 'has no column "ID". Columns found: id, ' in missing.output
    assert "Expected: the columns --keep names, as the table's header spells them." in missing.output


def test_predict_reads_standard_input_and_pipes_telling_the_format_by_the_first_bytes(trained, tmp_path):
    """`zcat new.csv.gz | epochd predict JOB -` and `epochd predict JOB <(...)`: the table has no
    file name, so its first bytes say whether it is CSV, gzip or Parquet."""
    import gzip
    import threading

    import pandas as pd
    spool, data = trained
    want = invoke("predict", "--spool", spool, "done", data).output
    with open(data, "rb") as f:
        raw = f.read()
    pq = tmp_path / "new.parquet"
    pd.read_csv(data).to_parquet(pq)
    for given in (raw, gzip.compress(raw), pq.read_bytes()):
        piped = CliRunner().invoke(cli, ["predict", "--spool", str(spool), "done", "-"], input=given)
        assert piped.exit_code == 0 and piped.output == want
    fifo = tmp_path / "pipe"  # what a shell's <(zcat new.csv.gz) hands over
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(gzip.compress(raw)))
    writer.start()
    assert invoke("predict", "--spool", spool, "done", fifo).output == want
    writer.join(timeout=10)
    lacking = CliRunner().invoke(cli, ["predict", "--spool", str(spool), "done", "-"],
                                 input=b"feature1,feature2\n1,2\n")
    assert lacking.exit_code == Exit.ERROR
    assert 'Error: --data "standard input" has no column "feature3"' in lacking.output
    assert "epochd-predict-" not in lacking.output  # the copy it read is not the user's concern
    # "-" with nothing piped in (standard input a terminal) would wait for typing: it says so
    import subprocess
    import sys
    primary, secondary = os.openpty()
    try:
        for args in (["predict", "done", "-"], ["submit", "-"]):
            run = subprocess.run([sys.executable, "-m", "daemon.cli", args[0], "--spool", str(spool), *args[1:]],
                                 stdin=secondary, capture_output=True, text=True, timeout=60, cwd=REPO)
            assert run.returncode == Exit.USAGE
            assert 'from standard input, but it is a terminal. Expected: ' in run.stderr
    finally:
        os.close(primary)
        os.close(secondary)


def test_predict_reads_other_delimiters_and_names_what_the_data_lacks(trained, tmp_path):
    """epochd predict JOB new.csv where new.csv lacks a column, or is a semicolon/tab file:
    the error names the model's columns, or the --delimiter to pass; with it, the
    predictions are those of the comma file."""
    import pandas as pd
    spool, data = trained
    table = pd.read_csv(data)
    want = invoke("predict", "--spool", spool, "done", data).output
    for sep, flag in ((";", ";"), ("\t", "tab"), ("|", "|")):
        other = tmp_path / "other.csv"
        table.to_csv(other, sep=sep, index=False)
        refused = invoke("predict", "--spool", spool, "done", other)
        assert refused.exit_code == Exit.ERROR
        assert f"The header was read as one column but holds {sep!r}: pass --delimiter " in refused.output
        assert invoke("predict", "--spool", spool, "done", other, "--delimiter", flag).output == want
    short = tmp_path / "short.csv"
    table.drop(columns=["feature3"]).rename(columns={"feature2": "feature_2"}).to_csv(short, index=False)
    lacking = invoke("predict", "--spool", spool, "done", short)
    assert lacking.exit_code == Exit.ERROR
    assert 'has no column "feature2" (did you mean "feature_2"?), "feature3". Columns found:' in lacking.output
    assert "Expected: every feature column the model was trained on (feature1, feature2, feature3" in lacking.output
    bad = invoke("predict", "--spool", spool, "done", data, "--delimiter", ";;")
    assert bad.exit_code == 2 and "expected one character" in bad.output
    wide = tmp_path / "unicode.txt"  # Excel's "Unicode text"
    table.to_csv(wide, index=False, encoding="utf-16")
    refused = invoke("predict", "--spool", spool, "done", wide)
    assert refused.exit_code == Exit.ERROR
    assert 'is UTF-16 text (it begins with a UTF-16 byte-order mark). Expected: utf-8 text: pass --encoding "utf-16"' in refused.output
    assert invoke("predict", "--spool", spool, "done", wide, "--encoding", "utf-16").output == want
    unknown = invoke("predict", "--spool", spool, "done", data, "--encoding", "utf-9")
    assert unknown.exit_code == 2 and "'utf-9' is not a text encoding Python knows" in unknown.output
    tabs = tmp_path / "new.tsv"  # named so: read with tabs, as a job reads one
    table.to_csv(tabs, sep="\t", index=False)
    assert invoke("predict", "--spool", spool, "done", tabs).output == want
    assert invoke("predict", "--spool", spool, "done", tabs, "--delimiter", ",").exit_code == Exit.ERROR


def test_predict_notes_empty_numbers_and_categorical_values_the_model_was_not_trained_on(trained, tmp_path):
    """A value of a text column that training never saw encodes as none of its categories, an
    empty number takes the training mean: predict still predicts every row, and says on stderr
    which column, how many rows and which values, so that the CSV on stdout stays clean."""
    spool, data = trained
    table = pd.read_csv(data)
    assert invoke("predict", "--spool", spool, "done", data).stderr == ""
    table.loc[[0, 5, 9], "colour"] = ["purple", "teal", "purple"]
    newer = tmp_path / "newer.csv"
    table.to_csv(newer, index=False)
    result = invoke("predict", "--spool", spool, "done", newer)
    assert result.exit_code == 0
    assert len(pd.read_csv(io.StringIO(result.stdout))) == len(table)
    assert result.stderr == (f'note: column "colour": 3 of {len(table)} rows hold 2 values the '
                             "model has no category for ('purple', 'teal'); they encode as none of "
                             "its 3 categories\n")
    table.loc[[1, 2], "feature2"] = np.nan  # and empty numbers take the training mean
    table.to_csv(newer, index=False)
    fill = json.loads((Spool(spool).job_dir("done") / "model" / "preprocess.json").read_text())[
        "features"][1]["fill"]
    notes = invoke("predict", "--spool", spool, "done", newer).stderr.splitlines()
    assert notes[0] == (f'note: column "feature2": 2 of {len(table)} rows are empty; they take the '
                        f"training mean, {fill:.6g}") and len(notes) == 2


def test_a_run_notes_validation_values_it_has_no_category_for_in_its_log_status_and_tail(
        tmp_path, spool, daemon_factory):
    """A validation file whose text column holds a value the training rows do not: the job
    trains (those rows encode as none of the categories) and its run_started says so, which
    `status` and `tail` show below the run's line."""
    data = classification_csv(tmp_path / "train.csv", rows=60)
    table = pd.read_csv(data)
    table.insert(3, "colour", ["red", "green", "blue"] * 20)
    table.to_csv(data, index=False)
    val = tmp_path / "val.csv"
    table.head(12).assign(colour=["red", "purple"] * 6).to_csv(val, index=False)
    daemon_factory(spool)
    job = seed_job(data, epochs=1, val_data_path=str(val), feature_columns=[
        "feature1", "feature2", "feature3", "colour"])
    job.pop("validation_split", None)
    drop_job(spool, "noted.json", job)
    wait_for_status(spool, "noted", "completed")
    note = ('validation rows, column "colour": 6 of 12 rows hold 1 value the model has no category '
            "for ('purple'); they encode as none of its 3 categories")
    started = next(r for r in events_of(spool, "noted") if r["type"] == "run_started")
    assert started["notes"] == [note]
    assert f"  note: {note}\n" in invoke("status", "--spool", spool, "noted").output
    assert json.loads(invoke("status", "--spool", spool, "noted", "--json").output)["notes"] == [note]
    story = invoke("tail", "--spool", spool, "noted").output.splitlines()
    run = next(i for i, line in enumerate(story) if " run 1 started on cpu" in line)
    assert story[run + 1] == f"  note: {note}"
    for lines in (len(story) - run, len(story) - run - 1):  # -n counts the note as a line
        assert invoke("tail", "--spool", spool, "noted", "-n", lines).output.splitlines() == story[-lines:]


def test_predict_reads_new_data_as_the_job_read_its_own(tmp_path, spool, daemon_factory):
    """A job trained on a ";"-separated file with decimal commas (data.delimiter, data.decimal)
    writes how it read it into preprocess.json: predict reads a file like it without flags,
    and the flags still say otherwise for a file that is not."""
    table = pd.read_csv(classification_csv(tmp_path / "plain.csv"))
    european = tmp_path / "train.csv"
    table.to_csv(european, sep=";", decimal=",", index=False)
    daemon_factory(spool)
    job = seed_job(european, epochs=1)
    job["data"] = {"delimiter": ";", "decimal": ","}
    drop_job(spool, "eu.json", job)
    wait_for_status(spool, "eu", "completed")
    read_back = invoke("predict", "--spool", spool, "eu", european)
    assert read_back.exit_code == 0, read_back.output
    plain = invoke("predict", "--spool", spool, "eu", tmp_path / "plain.csv",
                   "--delimiter", ",", "--decimal", ".")
    assert plain.output == read_back.output and len(plain.output.splitlines()) == 241
    wrong = invoke("predict", "--spool", spool, "eu", european, "--decimal", ".")
    assert wrong.exit_code == Exit.ERROR
    assert 'it looks like a number with a decimal comma: read the file with the decimal mark ","' in wrong.output


def test_the_plot_marks_the_best_epoch(trained, tmp_path):
    from daemon.plot import plot_history
    state = Spool(trained[0]).state("done")
    plain = plot_history(state.training_history(), tmp_path / "plain.png", "t").read_bytes()
    marked = plot_history(state.training_history(), tmp_path / "best.png", "t", state.best_saved)
    assert state.best_saved and marked.read_bytes() != plain


def test_the_plot_counts_epochs_in_whole_numbers():
    import matplotlib.pyplot as plt

    from daemon.plot import figure
    history = {"epoch": [1, 2], "train_loss": [0.9, 0.8], "val_loss": [1.0, 0.9],
               "train_accuracy": [0.5, 0.6], "val_accuracy": [0.4, 0.5], "learning_rate": [1e-3, 1e-3]}
    fig = figure(history, "two epochs")
    for ax in fig.axes:
        low, high = ax.get_xlim()
        shown = [t for t in ax.get_xticks() if low <= t <= high]
        assert shown and all(float(t).is_integer() for t in shown), shown
    plt.close(fig)


def test_predict_uses_the_best_model_so_far_while_a_job_runs_and_after_it_is_cancelled(
        tmp_path, spool, daemon_factory):
    """best.json (model and preprocessing) is written with the first best weights: `predict
    --best` works on a running or paused job and on a cancelled one; without --best it says
    there is no final model yet, and where the best so far is. A finished model of an earlier
    job in the same folder stays whole meanwhile."""
    from daemon import control
    data = classification_csv(tmp_path / "train.csv", rows=20000)
    out = tmp_path / "out"
    daemon_factory(spool)
    drop_job(spool, "before.json", seed_job(classification_csv(tmp_path / "small.csv"), out, epochs=1,
                                            algorithm_params={"hidden_units": [8]}))
    wait_for_status(spool, "before", "completed")
    earlier = invoke("predict", "--spool", spool, out, data).output
    # batch 2: epochs of thousands of steps, so that the job is still running when paused
    drop_job(spool, "run.json", seed_job(data, out, epochs=50, batch_size=2,
                                         algorithm_params={"hidden_units": [16]}))
    wait_for_event(spool, "run", "best_model_saved")
    control.drop(Spool(spool), "run", "pause")
    wait_for_status(spool, "run", "paused")
    assert json.loads((out / "best.json").read_text())["model"]["job_id"] == "run"
    assert json.loads((out / "model.json").read_text())["job_id"] == "before"
    final = invoke("predict", "--spool", spool, "run", data)
    assert final.exit_code == Exit.REFUSED
    assert "run is paused; it has no final model yet" in final.output
    assert "--best uses its best so far (epoch " in final.output
    best = invoke("predict", "--spool", spool, "run", data, "--best")
    assert best.exit_code == Exit.OK and len(best.output.splitlines()) == 20001
    assert invoke("predict", "--spool", spool, out, data, "--best").output == best.output
    assert invoke("predict", "--spool", spool, out, data).output == earlier  # still the earlier job's
    only = tmp_path / "only"  # a folder whose job has not ended: its best so far, nothing final
    only.mkdir()
    for name in ("best.json", "best.safetensors"):
        (only / name).write_bytes((out / name).read_bytes())
    assert invoke("predict", "--spool", spool, only, data, "--best").output == best.output
    unfinished = invoke("predict", "--spool", spool, only, data)
    assert unfinished.exit_code == 1
    assert "has no model.json" in unfinished.output and "--best uses the best weights so far" in unfinished.output

    control.drop(Spool(spool), "run", "cancel")
    wait_for_status(spool, "run", "cancelled")
    assert invoke("predict", "--spool", spool, "run", data, "--best").output == best.output
    ended = invoke("predict", "--spool", spool, "run", data)
    assert ended.exit_code == Exit.REFUSED and "it ended without a final model; --best" in ended.output


def test_status_names_files_in_incoming_that_the_daemon_never_takes(spool):
    """job.JSON or job.txt sit in incoming/ for ever (only *.json counts): status says so and
    what to do; someone's dotfile or *.tmp being written is not mentioned."""
    for name in ("exp.JSON", "notes.txt", "ok.json", ".exp.json.swp", "half.json.tmp"):
        (spool / "incoming" / name).write_text("{}")
    listed = invoke("status", "--spool", spool).output
    assert "not accepted yet, in incoming/: ok.json\n" in listed
    assert ("never taken, not named *.json, in incoming/: exp.JSON, notes.txt (a job file must "
            "end in .json: rename it, or use epochd submit FILE)") in listed
    assert ".swp" not in listed and "half" not in listed


def test_without_a_daemon_the_cli_says_nothing_runs_until_one_does(tmp_path, spool, daemon_factory):
    """Files dropped where no daemon serves wait silently; the CLI says so (to stderr), and
    says why a queued job waits once one serves."""
    from daemon.spool import daemon_serving
    data = classification_csv(tmp_path / "train.csv", rows=20000)
    job = tmp_path / "long.json"
    job.write_text(json.dumps(seed_job(data, epochs=50, batch_size=2, algorithm_params={"hidden_units": [16]})))
    assert daemon_serving(Spool(spool)) is False
    submitted = invoke("submit", "--spool", spool, job)
    assert submitted.exit_code == 0 and f"note: no daemon is serving {spool}" in submitted.output
    listed = invoke("status", "--spool", spool).output
    assert "not accepted yet, in incoming/: long.json" in listed and "no daemon is serving" in listed
    early = invoke("status", "--spool", spool, "long")
    assert early.exit_code == Exit.NOT_FOUND
    assert "job long is not accepted yet: incoming/long.json waits for the daemon. No daemon" in early.output

    d = daemon_factory(spool, "--max-jobs", "1")
    assert daemon_serving(Spool(spool)) is True
    wait_for_status(spool, "long", "running")
    assert "not accepted yet" not in invoke("status", "--spool", spool).output
    drop_job(spool, "next.json", seed_job(data, epochs=1))
    wait_for_status(spool, "next", "pending")
    queued = invoke("status", "--spool", spool, "next").output
    assert "queued: the daemon (at most 1 at once) starts it when a slot is free" in queued
    assert "no daemon" not in queued
    paused = invoke("pause", "--spool", spool, "long")
    assert paused.exit_code == 0 and "note:" not in paused.output
    wait_for_status(spool, "next", "completed")
    d.stop()
    assert daemon_serving(Spool(spool)) is False
    resumed = invoke("resume", "--spool", spool, "long")
    assert resumed.exit_code == 0 and "no daemon is serving" in resumed.output
    follower = subprocess.Popen([sys.executable, "-m", "daemon.cli", "tail", "-f", "--spool", str(spool),
                                 "long"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stopper = threading.Timer(30, follower.kill)  # should it say nothing, the read still ends
    stopper.start()
    try:  # it follows a job nothing will move; first it says so
        assert "no daemon is serving" in follower.stderr.readline()
    finally:
        stopper.cancel()
        follower.kill()
        follower.wait()


def test_a_job_waiting_out_a_crash_says_when_it_is_retried(spool):
    from daemon.events import Interrupted
    from daemon.spool import daemon_log, lock_spool
    daemon_log(Spool(spool), "started", pid=1, max_jobs=2, max_retries=3, base_dir=str(spool.parent))
    Spool(spool).job_dir("shaky").mkdir()
    with EventLog(Spool(spool).events_path("shaky")) as log:
        log.append(JobAccepted(job_id="shaky", source_file="shaky.json", spec={"epochs": 2},
                               spec_sha256="a", file_sha256="b"))
        for _ in range(2):
            log.append(Interrupted(reason="worker killed by signal 9", crash=True, epoch=1, step=0))
    with lock_spool(Spool(spool)):  # as a serving daemon holds it
        shown = invoke("status", "--spool", spool, "shaky").output
    assert "queued: the daemon (at most 2 at once) continues it when a slot is free" in shown
    assert ", 2 s after its last crash at 20" in shown and "(2 in a row; one past 3 fails it;" in shown


def test_predict_on_a_job_that_ended_before_any_model_was_saved_says_so(tmp_path, spool):
    from daemon.events import Cancelled
    Spool(spool).job_dir("early").mkdir()
    with EventLog(Spool(spool).events_path("early")) as log:
        log.append(JobAccepted(job_id="early", source_file="early.json", spec={"epochs": 2},
                               spec_sha256="a", file_sha256="b"))
        log.append(Cancelled(epoch=1, step=0))
    data = classification_csv(tmp_path / "new.csv")
    for best in ([], ["--best"]):
        result = invoke("predict", "--spool", spool, "early", data, *best)
        assert result.exit_code == Exit.REFUSED
        assert "job early is cancelled; it ended before any model was saved" in result.output
    # it never started a run: it has no position in an epoch to show
    assert "  epochs: 0/2  attempts: 0\n" in invoke("status", "--spool", spool, "early").output


def test_unknown_jobs_and_nonsense_requests_are_refused(trained):
    spool, _ = trained
    missing = invoke("status", "--spool", spool, "nope")
    assert missing.exit_code == Exit.NOT_FOUND and 'no job "nope"' in missing.output
    refused = invoke("resume", "--spool", spool, "done")
    job_file = Spool(spool).job_dir("done") / "job.json"
    assert refused.exit_code == Exit.REFUSED
    assert (f"job done is completed; nothing to resume. To train it again from the start: epochd submit "
            f"{job_file} (its file as accepted; it gets a new id).") in refused.output
    assert list((spool / "control").iterdir()) == []  # nothing was dropped
    assert "job id done-2 " in invoke("submit", "--spool", spool, job_file).output  # as it says
    Spool(spool).job_dir("bad").mkdir()
    with EventLog(Spool(spool).events_path("bad")) as log:
        log.append(JobAccepted(job_id="bad", source_file="bad.json", spec={"epochs": 2},
                               spec_sha256="a", file_sha256="b"))
        log.append(Failed(error="DataError", message="no column x", traceback=None, retryable=False))
    failed = invoke("resume", "--spool", spool, "bad")
    assert failed.exit_code == Exit.REFUSED
    assert ('job bad failed (DataError; "epochd status bad" says why), for a cause that resuming cannot '
            "change; nothing to resume. Once the cause is fixed, train it again from the start") in failed.output


def test_a_spool_that_does_not_exist_is_named_as_such_not_as_empty(tmp_path):
    typo = tmp_path / "sppol"
    for args in (["status"], ["status", "--json"], ["status", "done"], ["tail", "done"],
                 ["history", "done"], ["pause", "done"]):
        result = invoke(*args, "--spool", typo)
        assert result.exit_code == Exit.NOT_FOUND, (args, result.output)
        assert f"{typo} is not a spool" in result.output and "--spool" in result.output, args
    assert not typo.exists()  # nothing was created by looking
    Spool(typo).ensure()
    assert invoke("status", "--spool", typo).output.startswith("no jobs in")


def test_submit_refuses_an_invalid_file_and_drops_nothing(tmp_path, spool):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_data_path": "x.csv", "target_column": "t", "epoch": 3}))
    result = invoke("submit", "--spool", spool, bad)
    assert result.exit_code == Exit.USAGE and 'Did you mean "epochs"?' in result.output
    assert list((spool / "incoming").iterdir()) == []


def test_submit_reads_the_data_headers_and_refuses_what_the_job_would_fail_on(tmp_path, spool):
    """A misspelt column, or a file read with the wrong delimiter, would fail the job as soon as
    the daemon read the data: submit reads the headers (one block of each file) and says so
    first, dropping nothing; --no-path-check drops the file all the same."""
    data = classification_csv(tmp_path / "x.csv")
    val = tmp_path / "v.csv"
    pd.read_csv(data).drop(columns="feature2").to_csv(val, index=False)
    for name, job, needle in (
            ("typo", seed_job(data, target_column="Target"),
             'has no column "Target" (did you mean "target"?)'),
            ("semi", {**seed_job(data), "data": {"delimiter": ";"}},
             'The header was read as one column but holds \',\': set "data": {"delimiter": ","}'),
            ("val", seed_job(data, val_data_path=str(val)), f'val_data_path "{val}" has no column "feature2"')):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(job))
        refused = invoke("submit", "--spool", spool, path)
        assert refused.exit_code == Exit.USAGE, refused.output
        assert "would not run on this spool; nothing was submitted" in refused.output
        assert needle in refused.output and "(--no-path-check submits it anyway.)" in refused.output
        assert list((spool / "incoming").iterdir()) == []
    assert invoke("submit", "--spool", spool, path, "--no-path-check").exit_code == 0
    assert [p.name for p in (spool / "incoming").iterdir()] == ["val.json"]


def test_submit_never_overwrites_a_drop_or_reuses_a_job_id(tmp_path, spool):
    job = tmp_path / "exp.json"
    job.write_text(json.dumps(seed_job(classification_csv(tmp_path / "x.csv"))))
    (spool / "jobs" / "exp").mkdir()
    assert "job id exp-2" in invoke("submit", "--spool", spool, job).output
    assert "job id exp-3" in invoke("submit", "--spool", spool, job).output
    assert sorted(p.name for p in (spool / "incoming").iterdir()) == ["exp-2.json", "exp-3.json"]


def test_a_user_the_spool_refuses_is_told_which_group_to_join_not_shown_a_traceback(tmp_path, spool):
    """alice was added to the epochd group but has not logged in again: status, tail and
    submit used to end in a PermissionError traceback."""
    import shutil
    import subprocess
    import sys
    as_other = []
    if os.geteuid() == 0:  # root reads anything: ask as nobody
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: no user to be refused")
        as_other = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        if subprocess.run([*as_other, sys.executable, "-c", "import daemon.cli"], cwd=REPO,
                          capture_output=True).returncode != 0:
            pytest.skip("nobody cannot read this checkout")
    (spool / "jobs").chmod(0o700)
    (spool / "incoming").chmod(0o700)
    job = json.dumps(seed_job(classification_csv(tmp_path / "x.csv")))  # on stdin: tmp_path may be closed to them
    try:
        for args in (["status"], ["tail", "wine"], ["submit", "-", "--no-path-check"]):
            run = subprocess.run([*as_other, sys.executable, "-m", "daemon.cli", args[0], "--spool", str(spool),
                                  *args[1:]], cwd=REPO, capture_output=True, text=True, timeout=60, input=job)
            assert run.returncode == Exit.ERROR and "Traceback" not in run.stderr, run.stderr
            assert "Error: permission denied: " in run.stderr and "belongs to the group " in run.stderr
            assert "then log in again; `id` lists your groups), or run the command as " in run.stderr
    finally:
        (spool / "jobs").chmod(0o2750)
        (spool / "incoming").chmod(0o2770)


def test_submit_reads_a_job_from_standard_input_naming_it_after_the_job(tmp_path, spool):
    """`jq ... | epochd submit -`: no file name to take the id from, so the job's name gives it."""
    data = classification_csv(tmp_path / "x.csv")
    body = json.dumps(seed_job(data, name="wine sweep #3")).encode()
    piped = CliRunner().invoke(cli, ["submit", "--spool", str(spool), "-"], input=body)
    assert piped.exit_code == 0 and "submitted standard input as incoming/wine-sweep-3.json" in piped.output
    assert (spool / "incoming" / "wine-sweep-3.json").read_bytes() == body  # byte for byte
    nameless = json.dumps({k: v for k, v in seed_job(data).items() if k != "name"}).encode()
    assert "job id job " in CliRunner().invoke(cli, ["submit", "--spool", str(spool), "-"], input=nameless).output
    named = CliRunner().invoke(cli, ["submit", "--spool", str(spool), "-", "--name", "mine"], input=body)
    assert "job id mine " in named.output
    bad = CliRunner().invoke(cli, ["submit", "--spool", str(spool), "-"], input=b'{"epoch": 3}')
    assert bad.exit_code == Exit.USAGE
    assert "standard input is not a valid job file; nothing was submitted" in bad.output
    assert sorted(p.name for p in (spool / "incoming").iterdir()) == ["job.json", "mine.json", "wine-sweep-3.json"]


def test_submit_follow_through_a_real_daemon(tmp_path, spool, daemon_factory):
    data = classification_csv(tmp_path / "train.csv")
    job = tmp_path / "follow.json"
    job.write_text(json.dumps(seed_job(data, epochs=1)))
    daemon_factory(spool)
    result = invoke("submit", "--spool", spool, job, "--follow")
    assert result.exit_code == Exit.OK and "completed: 1 epochs" in result.output
    assert "waiting" not in result.output  # a serving daemon takes it at once: nothing to say
    bad = tmp_path / "fails.json"
    bad.write_text(json.dumps(seed_job(tmp_path / "missing.csv")))
    failed = invoke("submit", "--spool", spool, bad, "--follow", "--no-path-check")
    assert failed.exit_code == Exit.JOB_FAILED and "does not exist" in failed.output


def test_settings_a_job_does_not_use_are_noted_by_submit_and_in_its_run(tmp_path, spool, daemon_factory):
    """The seed's body switched to model_type "linear", its hidden_units and dropout_rate left
    as they were: a valid job, which trains a linear model; submit and run_started say what
    it set in vain."""
    data = classification_csv(tmp_path / "train.csv")
    body = seed_job(data, epochs=1)
    body["algorithm_params"]["model_type"] = "linear"
    job = tmp_path / "lin.json"
    job.write_text(json.dumps(body))
    daemon_factory(spool)
    submitted = invoke("submit", "--spool", spool, job)
    notes = ['algorithm_params.hidden_units [128, 64, 32] is ignored: model_type "linear" has no hidden layers',
             'algorithm_params.dropout_rate 0.2 is ignored: model_type "linear" has no hidden layers']
    assert submitted.exit_code == Exit.OK
    assert [line for line in submitted.stderr.splitlines() if "is ignored" in line] == [f"note: {n}" for n in notes]
    wait_for_status(spool, "lin", "completed")
    started = next(r for r in events_of(spool, "lin") if r["type"] == "run_started")
    assert started["notes"] == notes
    weights = json.loads((spool / "jobs" / "lin" / "model" / "model.json").read_text())
    assert weights["model_type"] == "linear"


def test_submit_follow_says_once_that_it_still_waits_when_no_daemon_serves(tmp_path, spool, daemon_factory):
    """epochd submit JOB --follow with no daemon: the note at submit, then after a few seconds
    one line that it still waits and why; a daemon started then takes the job and the command
    follows it to its end."""
    job = tmp_path / "later.json"
    job.write_text(json.dumps(seed_job(classification_csv(tmp_path / "train.csv"), epochs=1)))
    submit = subprocess.Popen([sys.executable, "-m", "daemon.cli", "submit", "--spool", str(spool),
                               str(job), "--follow"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    stopper = threading.Timer(60, submit.kill)  # should it hang, the reads still end
    stopper.start()
    try:
        assert "no daemon is serving" in submit.stderr.readline()
        waiting = submit.stderr.readline()
        assert "still waiting for a daemon to take incoming/later.json; no daemon is serving" in waiting
        daemon_factory(spool)
        out, err = submit.communicate()
    finally:
        stopper.cancel()
        submit.kill()
    assert submit.returncode == Exit.OK and "completed: 1 epochs" in out and "waiting" not in err


def test_submit_follow_reports_its_own_rejection_not_an_older_file_of_the_same_name(
        tmp_path, spool, daemon_factory):
    """An exp.json dropped by hand was rejected (rejected/exp.error.json); the fixed one, given
    to submit --follow while no daemon serves, is followed to its end once one does, rather than
    reported rejected at once. A later drop that the daemon does reject (its --allow-root, set
    after the submit) is reported with its own report, rejected/exp-2.error.json."""
    first = daemon_factory(spool)
    (spool / "incoming" / "exp.json").write_text("{not json")
    wait_until(lambda: (spool / "rejected" / "exp.error.json").exists(), what="the first rejection")
    first.stop()
    job = tmp_path / "exp.json"
    job.write_text(json.dumps(seed_job(classification_csv(tmp_path / "train.csv"), epochs=1)))

    def submit_then_serve(dropped: str, *serve_args: str):
        submit = subprocess.Popen([sys.executable, "-m", "daemon.cli", "submit", "--spool", str(spool),
                                   str(job), "--follow"], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: (spool / "incoming" / dropped).exists() or submit.poll() is not None,
                       what=f"incoming/{dropped}")
            daemon = daemon_factory(spool, *serve_args)
            out, err = submit.communicate(timeout=60)
        finally:
            submit.kill()
        daemon.stop()
        return submit.returncode, out, err

    code, out, err = submit_then_serve("exp.json")
    assert code == Exit.OK and "completed: 1 epochs" in out, (out, err)
    code, out, err = submit_then_serve("exp-2.json", "--allow-root", str(tmp_path / "elsewhere"))
    assert code == Exit.USAGE and "job id exp-2" in out
    report = json.loads((spool / "rejected" / "exp-2.error.json").read_text())
    assert report["file"] == "exp-2.json" and f"rejected: {'; '.join(report['errors'])}" in err


def test_submit_resolves_paths_as_the_daemon_will_and_refuses_what_it_would_not_run(
        tmp_path, spool, daemon_factory, monkeypatch):
    """A relative path starts at the daemon's base folder, not the current one: submit says so
    before anything is dropped, and names the file that was probably meant. Once a daemon has
    started with --base-dir and --allow-root, submit resolves and bounds paths as it does."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    data = classification_csv(work / "data" / "train.csv")
    job = work / "rel.json"
    job.write_text(json.dumps(seed_job("data/train.csv", epochs=1)))
    monkeypatch.chdir(work)
    refused = invoke("submit", "--spool", spool, job)
    assert refused.exit_code == Exit.USAGE, refused.output
    out = " ".join(refused.output.split())
    assert 'Received: "data/train.csv", which resolves to ' + str(tmp_path / "data" / "train.csv") in out
    assert f"relative paths start at the daemon's base folder, {tmp_path})" in out
    assert f'write "{data}" in the job file' in out and "--no-path-check" in out
    assert list((spool / "incoming").iterdir()) == []

    daemon_factory(spool, "--base-dir", str(work), "--allow-root", str(work))
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(seed_job(classification_csv(tmp_path / "elsewhere.csv"))))
    fenced = invoke("submit", "--spool", spool, outside)
    assert fenced.exit_code == Exit.USAGE and "outside the folders this daemon may use" in fenced.output
    assert list((spool / "incoming").iterdir()) == []
    accepted = invoke("submit", "--spool", spool, job, "--name", "rel")
    assert accepted.exit_code == Exit.OK, accepted.output
    record = wait_for_event(spool, "rel", "job_accepted")[0]
    assert record["spec"]["train_data_path"] == str(data)


def test_the_last_daemon_start_is_found_however_far_back_it_is(tmp_path):
    """daemon.jsonl grows by job: the last `started` line is read back from the end, a block at
    a time, whatever the block boundaries cut."""
    from daemon.spool import last_daemon_start
    root = Spool(tmp_path / "spool")
    root.ensure()
    assert last_daemon_start(root) is None
    started = [json.dumps({"event": "started", "pid": pid, "base_dir": "/b"}) for pid in (1, 2)]
    jobs = [json.dumps({"event": "accepted", "job_id": f"j{i}"}) for i in range(2000)]
    root.daemon_log.write_text("\n".join(started + jobs) + "\n")
    for block in (7, 100, 4096, 1 << 20):
        assert last_daemon_start(root, block)["pid"] == 2, block
    root.daemon_log.write_text("\n".join(jobs) + "\n")
    assert last_daemon_start(root, 100) is None


def test_status_says_a_queued_job_is_starting_while_the_daemon_has_its_worker_running(tmp_path):
    """The worker the serving daemon started for a job and has not seen exit, read back from
    daemon.jsonl since the daemon's last start, with its pid alive: `status JOB` says the job is
    starting (and --json gives the worker) instead of that it waits for a slot."""
    from daemon.spool import live_worker, lock_spool
    root = Spool(tmp_path / "spool")
    root.ensure()
    for job_id in ("q", "gone", "old", "dead"):
        root.job_dir(job_id).mkdir()
        with EventLog(root.events_path(job_id)) as log:
            log.append(JobAccepted(job_id=job_id, source_file=f"{job_id}.json", spec={"epochs": 2},
                                   spec_sha256="a", file_sha256="b"))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    live, dead = sleeper.pid, exited.pid
    lines = [{"event": "started", "pid": 1},
             {"event": "worker_started", "job_id": "old", "pid": live, "ts": "t0"},
             {"event": "started", "pid": 2},  # a daemon since: "old"'s worker is not its own
             {"event": "worker_started", "job_id": "q", "pid": live, "ts": "t1"},
             {"event": "worker_started", "job_id": "gone", "pid": live, "ts": "t1"},
             {"event": "worker_started", "job_id": "dead", "pid": dead, "ts": "t1"},
             {"event": "accepted", "job_id": "q2"},
             {"event": "worker_exited", "job_id": "gone", "code": 0}]
    root.daemon_log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    lock = lock_spool(root)  # as if a daemon served the spool, or status would say none does
    try:
        for block in (16, 1 << 20):
            assert live_worker(root, "q", block)["pid"] == live
            assert [live_worker(root, j, block) for j in ("gone", "old", "dead", "q2")] == [None] * 4
        shown = invoke("status", "--spool", root.root, "q").output
        assert f"starting: its worker (pid {live}) runs since t1: the first step comes once it has read the data" \
            in shown, shown
        assert "when a slot is free" not in shown
        assert json.loads(invoke("status", "--spool", root.root, "q", "--json").output)["worker"] == \
            {"pid": live, "since": "t1"}
        assert "queued: the daemon" in invoke("status", "--spool", root.root, "gone").output
        assert json.loads(invoke("status", "--spool", root.root, "gone", "--json").output)["worker"] is None
    finally:
        lock.release()
        sleeper.kill()
        sleeper.wait()


def test_rename_noreplace_moves_or_refuses_and_never_overwrites(tmp_path):
    """What submit's drop rests on: the file moves in one step, or FileExistsError and both files
    stay as they were."""
    from daemon.fsutil import rename_noreplace
    (tmp_path / "a").write_text("new")
    (tmp_path / "taken").write_text("someone else's")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "someone else's" and (tmp_path / "a").read_text() == "new"
    rename_noreplace(tmp_path / "a", tmp_path / "free")
    assert not (tmp_path / "a").exists() and (tmp_path / "free").read_text() == "new"
    assert (tmp_path / "free").stat().st_nlink == 1


def test_a_job_that_failed_for_an_outside_cause_can_be_resumed_from_the_cli(tmp_path, spool):
    """`failed` with retryable (a full disk): `epochd resume` drops the request and status says
    so; a job's own failure (bad data) stays refused."""
    for job_id, retryable in (("disk", True), ("data", False)):
        Spool(spool).job_dir(job_id).mkdir()
        with EventLog(Spool(spool).events_path(job_id)) as log:
            log.append(JobAccepted(job_id=job_id, source_file=f"{job_id}.json", spec={"epochs": 2},
                                   spec_sha256="a", file_sha256="b"))
            log.append(Failed(error="OSError", message="the disk is full",
                              traceback="Traceback ...\nOSError: [Errno 28]" if retryable else None,
                              retryable=retryable))
    disk = invoke("status", "--spool", spool, "disk").output
    assert 'fix the cause, then "epochd resume disk"' in disk
    assert '"epochd status disk --json" prints it' in disk  # where its traceback is
    shown = json.loads(invoke("status", "--spool", spool, "disk", "--json").output)
    assert shown["last_error"]["traceback"].endswith("[Errno 28]")
    assert "traceback" not in invoke("status", "--spool", spool, "data").output  # none recorded
    resumed = invoke("resume", "--spool", spool, "disk")
    assert resumed.exit_code == Exit.OK and (spool / "control" / "disk.resume").exists()
    refused = invoke("resume", "--spool", spool, "data")
    assert refused.exit_code == Exit.REFUSED and not (spool / "control" / "data.resume").exists()


def test_tail_goes_past_a_failure_that_was_resumed_and_ends_with_the_job(spool):
    """A retryable failure, `epochd resume`, then completion: tail shows the whole story and
    exits as the job ended, not at the first failure."""
    from daemon.events import Completed, Failed, Resumed
    root = Spool(spool)
    root.job_dir("again").mkdir()
    with EventLog(root.events_path("again")) as log:
        log.append(JobAccepted(job_id="again", source_file="again.json", spec_sha256="a", file_sha256="b",
                               spec={"epochs": 1, "framework": "pytorch", "algorithm_params": {"model_type": "mlp"}}))
        log.append(Failed(error="OSError", message="the disk is full", traceback=None, retryable=True))
        assert invoke("tail", "--spool", spool, "again", "-f").exit_code == Exit.JOB_FAILED
        log.append(ControlReceived(action="resume", source_file="control/again.resume", outcome="accepted"))
        log.append(Resumed(epoch=1, step=0, checkpoint=None))
        log.append(Completed(epochs_run=1, stop_reason="max_epochs", best=None, final_metrics={},
                             outputs={}))
    for args in ([], ["-f"]):
        result = invoke("tail", "--spool", spool, "again", *args)
        assert result.exit_code == Exit.OK, (args, result.output)
        assert "failed: OSError: the disk is full" in result.output
        assert result.output.rstrip().endswith("completed: 1 epochs (max_epochs)"), result.output


def test_tail_lines_carry_the_users_reason_and_the_outcome():
    from daemon.display import event_line
    record = {"type": "control_received", "action": "pause", "source_file": "control/j.pause",
              "reason": "need the GPU", "outcome": "accepted"}
    assert event_line(record, 3) == 'pause requested (control/j.pause) "need the GPU": accepted'
    assert event_line(record | {"reason": None, "outcome": "already paused"}, 3) == \
        "pause requested (control/j.pause): already paused"
