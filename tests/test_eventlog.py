"""The event log: checksummed lines, contiguous seq, torn tails cut and recorded, corruption
reported, never guessed."""
import os
import zlib

import orjson
import psutil
import pytest

from daemon import eventlog, foldcache
from daemon.errors import LogCorrupt
from daemon.eventlog import EventLog, LogFollower, decode, encode, read_log, read_records
from daemon.events import (EVENT_TYPES, Cancelled, CheckpointSaved, Completed, ControlReceived,
                           EpochCompleted, Interrupted, JobAccepted, LrChanged, Paused, Progress,
                           Resumed, RunStarted)
from daemon.replay import fold


def fill(path, n=5):
    with EventLog(path) as log:
        log.append(JobAccepted(job_id="j", source_file="j.json", spec={"epochs": 3},
                               spec_sha256="a", file_sha256="b"))
        for i in range(1, n):
            log.append(ControlReceived(action="pause", source_file=f"control/j{i}.pause"))
    return path.read_bytes()


def test_every_line_has_the_envelope_and_a_checksum_of_itself(tmp_path):
    """Each event: seq 1,2,3..., ts in UTC with milliseconds, type, v, payload, crc."""
    data = fill(tmp_path / "events.jsonl", 3)
    lines = data.splitlines()
    for seq, line in enumerate(lines, start=1):
        record = orjson.loads(line)
        assert record["seq"] == seq and record["v"] == 1 and record["type"]
        assert record["ts"].endswith("Z") and len(record["ts"]) == len("2026-01-01T00:00:00.000Z")
        assert list(record)[-1] == "crc"
        assert decode(line) is not None
    flipped = lines[1].replace(b"pause", b"pausf")
    assert decode(flipped) is None


def test_lr_changed_writes_its_from_field_under_that_name(tmp_path):
    line = encode(1, "2026-01-01T00:00:00.000Z", LrChanged(epoch=2, from_=0.1, to=0.01, reason="step"))
    record = decode(line[:-1])
    assert record["from"] == 0.1 and "from_" not in record


def test_regression_metrics_are_left_out_of_classification_epochs():
    base = dict(epoch=1, train_loss=0.5, train_accuracy=0.8, val_loss=0.6, val_accuracy=0.7,
                learning_rate=0.1, time_per_epoch=1.0, samples_per_sec=10.0, memory_usage=100.0,
                gpu_utilization=None, gpu_memory=None, data_time=0.0, compute_time=1.0,
                eval_time=0.1, cpu_time=1.0, steps=3)
    payload = EpochCompleted(**base).payload()
    assert "val_mae" not in payload and payload["gpu_utilization"] is None
    assert EpochCompleted(**{**base, "val_mae": 1.5}).payload()["val_mae"] == 1.5


def test_event_types_are_past_tense_facts_in_one_registry():
    assert {"job_accepted", "run_started", "progress", "epoch_completed", "checkpoint_saved",
            "best_model_saved", "lr_changed", "early_stopped", "control_received", "paused",
            "resumed", "interrupted", "completed", "failed", "cancelled"} <= set(EVENT_TYPES)


def test_torn_tail_at_every_byte_offset_is_tolerated_then_cut_and_recorded(tmp_path):
    """Truncate the last record at every byte offset: reading stops before it, and the next
    writer cuts it away and says so in a log_repaired event."""
    path = tmp_path / "events.jsonl"
    full = fill(path, 4)
    last_start = full.rstrip(b"\n").rfind(b"\n") + 1
    for cut in range(last_start, len(full)):
        path.write_bytes(full[:cut])
        contents = read_log(path)
        assert len(contents.records) == 3
        assert contents.torn_bytes == cut - last_start
        with EventLog(path) as log:
            if cut > last_start:
                assert log.records[-1]["type"] == "log_repaired"
                assert log.records[-1]["truncated_bytes"] == cut - last_start
            log.append(Cancelled(epoch=1, step=0))
        records = read_records(path)
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
        assert records[-1]["type"] == "cancelled"


@pytest.mark.parametrize("junk", [b"\x00" * 4096, b"garbage without newline", b"{\"seq\": 9}\n",
                                  b"\x00\x00\x00\n\x00\x00\n", b"\xff\xfe\n"])
def test_zeros_and_garbage_appended_are_a_torn_tail(tmp_path, junk):
    path = tmp_path / "events.jsonl"
    full = fill(path, 3)
    path.write_bytes(full + junk)
    assert len(read_records(path)) == 3
    with EventLog(path) as log:
        log.append(Cancelled(epoch=1, step=0))
    assert [r["type"] for r in read_records(path)][-2:] == ["log_repaired", "cancelled"]


def test_a_damaged_line_in_the_middle_is_corruption(tmp_path):
    path = tmp_path / "events.jsonl"
    lines = fill(path, 4).splitlines(keepends=True)
    lines[1] = lines[1].replace(b"pause", b"pausX")
    path.write_bytes(b"".join(lines))
    with pytest.raises(LogCorrupt) as err:
        read_records(path)
    assert err.value.line_no == 2
    with pytest.raises(LogCorrupt):
        EventLog(path)  # no writer appends after damage it cannot explain


def test_a_lost_or_repeated_event_is_corruption(tmp_path):
    path = tmp_path / "events.jsonl"
    lines = fill(path, 4).splitlines(keepends=True)
    path.write_bytes(b"".join([lines[0], lines[2], lines[3]]))
    with pytest.raises(LogCorrupt, match="seq 3 where 2 was due"):
        read_records(path)
    path.write_bytes(b"".join([lines[0], lines[1], lines[1]]))
    with pytest.raises(LogCorrupt):
        read_records(path)


def test_append_is_visible_to_a_fresh_reader_at_once(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.append(Paused(epoch=1, step=2, checkpoint=None))
        assert read_records(path)[-1]["type"] == "paused"


def test_follower_reads_only_what_is_new_and_survives_a_cut_tail(tmp_path):
    path = tmp_path / "events.jsonl"
    fill(path, 2)
    follower = LogFollower(path)
    assert [r["seq"] for r in follower.poll()] == [1, 2]
    assert follower.poll() == []
    with open(path, "ab") as f:
        f.write(b'{"seq":3,"half a line')
    assert follower.poll() == []
    with EventLog(path) as log:  # cuts the torn tail, then appends
        log.append(Cancelled(epoch=1, step=0))
    assert [r["type"] for r in follower.poll()] == ["log_repaired", "cancelled"]


def test_a_follower_for_people_skips_progress_lines_that_later_lines_supersede(tmp_path):
    path = tmp_path / "events.jsonl"
    progress_log(path, epochs=2, per_epoch=3)  # accepted, 3 progress, control, 3 progress, control
    every, latest = LogFollower(path), LogFollower(path, latest_progress_only=True)
    assert len(every.poll()) == 9
    assert [r["type"] for r in latest.poll()] == ["job_accepted", "control_received", "control_received"]
    with EventLog(path) as log:
        for step in (1, 2):
            log.append(Progress(epoch=3, step=step, steps_per_epoch=3, samples_per_sec=1.0,
                                loss=0.5, eta_seconds=1.0))
    # the last line read is progress: it is the one to show
    assert [(r["type"], r["step"]) for r in latest.poll()] == [("progress", 2)]
    with EventLog(path) as log:
        log.append(Progress(epoch=3, step=3, steps_per_epoch=3, samples_per_sec=1.0,
                            loss=0.5, eta_seconds=1.0))
        log.append(Cancelled(epoch=3, step=3))
    assert [r["type"] for r in latest.poll()] == ["cancelled"]
    assert [r["seq"] for r in every.poll()] == [10, 11, 12, 13]


def progress_log(path, epochs=4, per_epoch=6):
    """A log shaped like a real one: runs of progress, then the epoch's other events."""
    with EventLog(path) as log:
        log.append(JobAccepted(job_id="j", source_file="j.json", spec={"epochs": epochs},
                               spec_sha256="a", file_sha256="b"))
        for e in range(1, epochs + 1):
            for s in range(1, per_epoch + 1):
                log.append(Progress(epoch=e, step=s, steps_per_epoch=per_epoch, samples_per_sec=1.0,
                                    loss=1.0 / s, eta_seconds=1.0))
            log.append(ControlReceived(action="pause", source_file="control/j.pause",
                                       outcome="already paused"))
    return path.read_bytes()


def training_log(path, epochs=3, per_epoch=5):
    """A log shaped like a real job's: runs of progress between each epoch's other events, a
    crash the daemon found after a progress line, a resume from a checkpoint, a pause, the end.
    A clock a second per event, so the time a run took depends on which record came last."""
    ticks = iter(range(10 ** 6))

    def clock():
        t = next(ticks)
        return f"2026-01-01T{t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d}.000Z"

    def progress(log, epoch, steps):
        for s in range(1, steps + 1):
            log.append(Progress(epoch=epoch, step=s, steps_per_epoch=per_epoch, samples_per_sec=1.0,
                                loss=1.0 / s, eta_seconds=1.0))

    def run(log, attempt, resumed_from):
        log.append(RunStarted(attempt=attempt, pid=1, host="h", devices=["cpu"], framework="pytorch",
                              versions={}, resumed_from=resumed_from, steps_per_epoch=per_epoch,
                              train_samples=100, val_samples=10, task="classification"))

    def epoch_end(log, epoch):
        log.append(EpochCompleted(epoch=epoch, train_loss=1.0 / epoch, train_accuracy=0.5,
                                  val_loss=1.0, val_accuracy=0.5, learning_rate=0.001,
                                  time_per_epoch=1.0, samples_per_sec=1.0, memory_usage=1.0,
                                  gpu_utilization=None, gpu_memory=None, data_time=0.0,
                                  compute_time=1.0, eval_time=0.0, cpu_time=1.0, steps=per_epoch))
        log.append(CheckpointSaved(epoch=epoch, step=per_epoch, steps_per_epoch=per_epoch,
                                   path=f"checkpoints/e{epoch}.pt", bytes=1, sha256="0" * 64))

    with EventLog(path, clock=clock) as log:
        log.append(JobAccepted(job_id="j", source_file="j.json", spec={"epochs": epochs + 1},
                               spec_sha256="a", file_sha256="b"))
        run(log, 1, None)
        for epoch in range(1, epochs + 1):
            progress(log, epoch, per_epoch)
            epoch_end(log, epoch)
        progress(log, epochs + 1, 2)
        log.append(Interrupted(reason="crash detected at startup", crash=True))
        resumed = {"epoch": epochs, "step": per_epoch, "epochs_done": epochs,
                   "checkpoint": f"checkpoints/e{epochs}.pt"}
        run(log, 2, resumed)
        progress(log, epochs + 1, 3)
        log.append(ControlReceived(action="pause", source_file="control/j.pause"))
        log.append(Paused(epoch=epochs + 1, step=3, checkpoint=None))
        log.append(Resumed(epoch=epochs + 1, step=3, checkpoint=None))
        run(log, 3, resumed)
        progress(log, epochs + 1, per_epoch)
        epoch_end(log, epochs + 1)
        log.append(Completed(epochs_run=epochs + 1, stop_reason="max_epochs", best=None,
                             final_metrics={}, outputs={}))
    return path.read_bytes()


@pytest.mark.parametrize("block", [eventlog.BLOCK_BYTES, 300])
def test_the_foldable_read_leaves_out_superseded_progress_and_folds_the_same_at_every_cut(
        tmp_path, monkeypatch, block):
    monkeypatch.setattr(eventlog, "BLOCK_BYTES", block)  # 300: a few lines per block
    path = tmp_path / "events.jsonl"
    full = training_log(path)
    starts = [0] + [i + 1 for i, b in enumerate(full) if b == ord("\n")]
    cuts = sorted(set(starts) | {s + 9 for s in starts[:-1]})  # every line end, and torn lines
    for cut in cuts:
        path.write_bytes(full[:cut])
        every, foldable = read_log(path), read_log(path, foldable=True)
        assert fold(foldable.records) == fold(every.records)
        assert (foldable.good_bytes, foldable.torn_bytes) == (every.good_bytes, every.torn_bytes)
        assert foldable.last_seq == len(every.records)
    kept = [r["type"] for r in read_log(path, foldable=True).records]
    every = [r["type"] for r in read_log(path).records]
    # the progress the crash's run time is measured to, and the last one: no others
    assert kept.count("progress") == 2 and kept[kept.index("interrupted") - 1] == "progress"
    assert [t for t in kept if t != "progress"] == [t for t in every if t != "progress"]
    assert fold(read_log(path).records).running_seconds > 0


@pytest.fixture
def in_pieces(monkeypatch):
    """Every foldable read checked by four processes side by side, however short the log."""
    monkeypatch.setattr(eventlog, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(eventlog, "_parsers", lambda size: 4)


def no_children_left():
    return psutil.Process().children() == []


def test_a_long_log_checked_in_pieces_side_by_side_reads_as_in_one(tmp_path, in_pieces):
    path = tmp_path / "events.jsonl"
    full = training_log(path, epochs=12, per_epoch=20)
    starts = [0] + [i + 1 for i, b in enumerate(full) if b == ord("\n")]
    cuts = starts[len(starts) // 2::7] + [s + 9 for s in starts[len(starts) // 2:-1:11]] + [len(full)]
    in_pieces_at_least_once = False
    for cut in cuts:
        data = full[:cut]
        one = eventlog._parse(data, foldable=True)
        pieces = eventlog._parse_in_parallel(data, 1)
        in_pieces_at_least_once |= pieces is not None
        for contents in (pieces, eventlog.parse_log(data, foldable=True)):
            if contents is None:  # a piece whose first line is torn: read in one piece instead
                continue
            assert fold(contents.records) == fold(one.records)
            assert (contents.good_bytes, contents.torn_bytes, contents.torn_preview, contents.last_seq) \
                == (one.good_bytes, one.torn_bytes, one.torn_preview, one.last_seq)
    assert in_pieces_at_least_once
    assert eventlog._parse_in_parallel(full, 1) is not None
    path.write_bytes(full)
    assert foldcache.replay(path) == fold(read_records(path))  # the daemon's and the CLI's replay
    assert no_children_left()


@pytest.mark.parametrize("where", [0.1, 0.35, 0.6, 0.85])
def test_damage_in_any_piece_is_reported_as_reading_in_one_piece_reports_it(tmp_path, in_pieces, where):
    path = tmp_path / "events.jsonl"
    lines = training_log(path, epochs=12, per_epoch=20).splitlines(keepends=True)
    i = int(len(lines) * where)
    damaged = b"".join(lines[:i] + [lines[i].replace(b'"v":1', b'"v":2')] + lines[i + 1:])
    lost = b"".join(lines[:i] + lines[i + 1:])
    for data, message in ((damaged, "checksum"), (lost, f"seq {i + 2} where {i + 1} was due")):
        with pytest.raises(LogCorrupt) as one:
            eventlog._parse(data, foldable=True)
        assert message in str(one.value) and one.value.line_no == i + 1
        assert eventlog._parse_in_parallel(data, 1) is None
        with pytest.raises(LogCorrupt) as err:
            eventlog.parse_log(data, foldable=True)
        assert (err.value.line_no, str(err.value)) == (one.value.line_no, str(one.value))
    assert no_children_left()


def test_a_piece_that_does_not_follow_on_from_the_one_before_is_not_trusted(tmp_path, in_pieces):
    """A line lost exactly where a piece ends: each piece checks out alone, the seqs between
    them do not."""
    path = tmp_path / "events.jsonl"
    full = training_log(path, epochs=12, per_epoch=20)
    cut = full.find(b"\n", len(full) // 4) + 1  # where the first piece ends
    lost = full[:cut] + full[full.find(b"\n", cut) + 1:]
    assert lost.find(b"\n", len(lost) // 4) + 1 == cut  # still where the first piece ends
    with pytest.raises(LogCorrupt, match="was due") as err:
        eventlog.parse_log(lost, foldable=True)
    assert err.value.line_no == full[:cut].count(b"\n") + 1
    assert no_children_left()


def test_damage_in_a_left_out_progress_line_is_still_corruption(tmp_path):
    path = tmp_path / "events.jsonl"
    lines = progress_log(path).splitlines(keepends=True)
    damaged = lines[2].replace(b'"step":2', b'"step":7')
    path.write_bytes(b"".join(lines[:2] + [damaged] + lines[3:]))
    with pytest.raises(LogCorrupt) as err:
        read_log(path, foldable=True)
    assert err.value.line_no == 3
    path.write_bytes(b"".join(lines[:2] + lines[3:]))  # a progress line lost
    with pytest.raises(LogCorrupt, match="seq 4 where 3 was due"):
        read_log(path, foldable=True)


def test_the_fold_cache_is_used_while_the_prefix_is_unchanged_and_never_trusted_after(tmp_path, monkeypatch):
    monkeypatch.setattr(foldcache, "MIN_CACHED_BYTES", 1000)
    path = tmp_path / "events.jsonl"
    progress_log(path, epochs=8)
    cache = tmp_path / foldcache.CACHE_NAME
    assert foldcache.replay(path) == fold(read_records(path)) and cache.exists()
    # white box: a state the log could never give shows the cached fold is what was used
    body = orjson.loads(cache.read_bytes())
    body["state"]["source_file"] = "from-the-cache.json"
    cache.write_bytes(orjson.dumps(body))
    assert foldcache.replay(path).source_file == "from-the-cache.json"
    # folded by other code (another fold, other upcasters): never used, and replaced
    monkeypatch.setattr(foldcache, "FOLD_CODE", "another epochd's fold")
    assert foldcache.replay(path) == fold(read_records(path))
    assert orjson.loads(cache.read_bytes())["fold_code"] == "another epochd's fold"
    monkeypatch.setattr(foldcache, "FOLD_CODE", foldcache._fold_code())
    assert foldcache.replay(path) == fold(read_records(path))  # the real code's cache: stored again
    body = orjson.loads(cache.read_bytes())
    body["state"]["source_file"] = "from-the-cache.json"
    cache.write_bytes(orjson.dumps(body))
    assert foldcache.replay(path).source_file == "from-the-cache.json"
    with EventLog(path) as log:  # appended after the cached prefix: applied on top of it
        log.append(Cancelled(epoch=3, step=1))
    state = foldcache.replay(path)
    assert state.status == "cancelled" and state.last_seq == len(read_records(path))
    with EventLog(path) as log:
        log.append(Cancelled(epoch=3, step=2))
    lines = path.read_bytes().splitlines(keepends=True)  # damage after the cached prefix
    path.write_bytes(b"".join(lines[:-2] + [lines[-2].replace(b'"v":1', b'"v":2')] + lines[-1:]))
    with pytest.raises(LogCorrupt) as err:
        foldcache.replay(path)
    assert err.value.line_no == len(lines) - 1  # its line in the whole log, not after the prefix
    path.write_bytes(b"".join(lines))
    data = bytearray(path.read_bytes())  # a flipped byte inside the cached prefix
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(LogCorrupt):
        foldcache.replay(path)
    path.unlink()
    progress_log(path)
    cache.write_bytes(b"\x00garbage")  # a torn or foreign cache: replayed in full, never an error
    assert foldcache.replay(path) == fold(read_records(path))


def test_a_writer_keeps_the_logs_length_and_crc_for_the_fold_cache(tmp_path):
    """What a long run's worker stores now and then (every 4 MiB of log): a cache a replay after
    a crash starts from, checked against the log's own bytes."""
    path = tmp_path / "events.jsonl"
    data = progress_log(path)
    path.write_bytes(data + b'{"seq":99,"torn')  # a torn tail: cut, and not counted
    with EventLog(path) as log:
        log.append(Cancelled(epoch=1, step=0))
        assert log.offset == path.stat().st_size and log.crc == zlib.crc32(path.read_bytes())
        state = fold(read_records(path))
        state.source_file = "stored-by-the-writer.json"  # shows the cache is what replay used
        foldcache.store(path, state, log.offset, log.crc)
    assert foldcache.replay(path).source_file == "stored-by-the-writer.json"
    with EventLog(path) as log:
        log.append(Cancelled(epoch=1, step=0))
    assert foldcache.replay(path).last_seq == len(read_records(path))


def test_after_a_failed_write_a_writer_appends_nothing_more(tmp_path):
    """A write or fsync that failed leaves the file's state unknown: no retry, no going on as
    if it were written (which could also repeat a seq). The next writer reads what is there."""
    path = tmp_path / "events.jsonl"
    fill(path, 2)
    log = EventLog(path)
    os.close(log.fd)
    log.fd = os.open(os.devnull, os.O_RDONLY)  # every write now fails (EBADF)
    with pytest.raises(OSError):
        log.append(Cancelled(epoch=1, step=0))
    with pytest.raises(OSError, match="appends nothing more"):
        log.append(Cancelled(epoch=1, step=0))
    log.close()
    with EventLog(path) as fresh:
        fresh.append(Cancelled(epoch=1, step=0))
    assert [r["seq"] for r in read_records(path)] == [1, 2, 3]
