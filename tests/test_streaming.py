"""Streaming data (`data.streaming`): rows read a block at a time, encoded once to a cache on
disk, trained from a window of chunks at a time in a seeded, resumable order. The same
recipe and encodings as in memory; bounded memory whatever the size of the file."""
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest

from daemon import control
from daemon import spec as specs
from daemon.errors import DataError
from daemon.spool import Spool
from engines import load_engine
from engines.data import prepare
from engines.stream import DiskRows, EpochRows
from tests.conftest import (WEIGHT_FILES, WINE, classification_csv, drop_job, events_of, last, model_weights,
                            regression_csv, same_weights, seed_job, wait_for_event,
                            wait_for_status, wait_until)
from tests.test_engines import weights


def normalise(tmp_path, **raw) -> dict:
    raw = {"train_data_path": str(WINE), "target_column": "cultivar", "batch_size": 16,
           "algorithm_params": {"hidden_units": [32, 16], "dropout_rate": 0.3},
           "devices": "cpu", **raw}
    return specs.normalise(specs.validate(raw), job_id="j", base_dir=tmp_path,
                           spool_root=tmp_path / "spool", allow_roots=[])


def streaming(tmp_path, chunk_rows=40, shuffle_chunks=2, **raw) -> dict:
    return normalise(tmp_path, data={"streaming": True, "chunk_rows": chunk_rows,
                                     "shuffle_chunks": shuffle_chunks}, **raw)


def train(engine, epochs, chunks=None, lr=0.01):
    for e in range(1, epochs + 1):
        engine.start_epoch(e, 0)
        for n in (chunks or []):
            n = min(n, engine.steps_per_epoch - engine.step)
            if n > 0:
                engine.train_steps([lr] * n)
        if engine.step < engine.steps_per_epoch:
            engine.train_steps([lr] * (engine.steps_per_epoch - engine.step))
    return engine


def disk_rows(tmp_path, n, dim=2) -> DiskRows:
    """Rows whose first feature is their own index in the file."""
    x = np.zeros((n, dim), np.float32)
    x[:, 0] = np.arange(n)
    x.tofile(tmp_path / "train.x")
    np.arange(n, dtype=np.int64).tofile(tmp_path / "train.y")
    return DiskRows(tmp_path, "train", n, dim, "int64")


# ---------------------------------------------------------------- the order

def test_every_row_once_an_epoch_in_a_seeded_order_that_mixes_chunks(tmp_path):
    rows = EpochRows(disk_rows(tmp_path, 1003), seed=7, chunk_rows=100, shuffle_chunks=3, shuffle=True)
    orders = []
    for epoch in (1, 2):
        x, y = rows.span(epoch, 0, 1003)
        assert sorted(y.tolist()) == list(range(1003))      # each row exactly once
        assert np.array_equal(x[:, 0].astype(np.int64), y)  # features travel with their labels
        orders.append(y.copy())
    assert not np.array_equal(orders[0], orders[1])        # a new order each epoch
    windows, starts = rows.plan(1)
    first_window = orders[0][:starts[1]]
    # a window holds its three chunks' rows, shuffled together
    assert set((first_window // 100).tolist()) == set(windows[0].tolist()) and len(windows[0]) == 3
    assert len(set((first_window[:60] // 100).tolist())) == 3
    again = EpochRows(disk_rows(tmp_path, 1003), seed=7, chunk_rows=100, shuffle_chunks=3, shuffle=True)
    # the same order from any starting point, in pieces of any size (as after a resume)
    pieces = [again.span(2, a, a + 37)[1].copy() for a in range(500, 1003, 37)]
    assert np.array_equal(np.concatenate(pieces), orders[1][500:])
    other = EpochRows(disk_rows(tmp_path, 1003), seed=8, chunk_rows=100, shuffle_chunks=3, shuffle=True)
    assert not np.array_equal(other.span(1, 0, 1003)[1], orders[0])


def test_without_shuffle_the_rows_come_in_file_order(tmp_path):
    rows = EpochRows(disk_rows(tmp_path, 250), seed=7, chunk_rows=64, shuffle_chunks=2, shuffle=False)
    assert rows.span(3, 0, 250)[1].tolist() == list(range(250))
    assert rows.span(3, 100, 140)[1].tolist() == list(range(100, 140))


# ---------------------------------------------------------------- the engine

def test_streaming_trains_exactly_like_memory_given_the_same_order(tmp_path, framework):
    """Without shuffling or a validation split both see the same rows in the same order: the
    recipe is the same (to float rounding) and so are the weights."""
    Engine = load_engine(framework)
    common = {"shuffle": False, "val_data_path": str(WINE), "framework": framework}
    memory = normalise(tmp_path, **common)
    stream = streaming(tmp_path, **common)
    a, b = prepare(memory), prepare(stream, tmp_path / "stream")
    assert (a.n_train, a.n_val) == (b.n_train, b.n_val) == (178, 178)
    for fa, fb in zip(a.preprocess["features"], b.preprocess["features"]):
        assert fa.keys() == fb.keys() and fa["name"] == fb["name"]
        assert fa["mean"] == pytest.approx(fb["mean"], rel=1e-12)
        assert fa["std"] == pytest.approx(fb["std"], rel=1e-12)
    assert a.preprocess["target"] == b.preprocess["target"]
    ea, eb = train(Engine(memory, a, 1), 2), train(Engine(stream, b, 1), 2)
    wa, wb = weights(ea), weights(eb)
    assert all(np.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa)
    ma, mb = ea.evaluate(), eb.evaluate()
    assert mb["val_accuracy"] == ma["val_accuracy"]
    assert mb["val_loss"] == pytest.approx(ma["val_loss"], rel=1e-5)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_streaming_steps_in_any_calls_and_a_checkpoint_anywhere_resume_bit_for_bit(tmp_path, task, framework):
    Engine = load_engine(framework)
    if task == "regression":
        spec = streaming(tmp_path, train_data_path=str(regression_csv(tmp_path / "r.csv", rows=300)),
                         target_column="target", chunk_rows=32, shuffle_chunks=3, framework=framework)
    else:
        spec = streaming(tmp_path, framework=framework)
    data = prepare(spec, tmp_path / "stream")
    assert data.stream is not None and data.x_train is None
    a = train(Engine(spec, data, 1), 2)
    b = train(Engine(spec, data, 1), 2, chunks=[1, 2, 3, 1, 5])
    assert same_weights(weights(a), weights(b))
    assert a.train_metrics() == b.train_metrics()
    # stop in the middle of epoch 2, save, load into a fresh engine, finish
    c = train(Engine(spec, data, 1), 1)
    c.start_epoch(2, 0)
    c.train_steps([0.01] * 3)
    checkpoint = tmp_path / f"mid{Engine.checkpoint_suffix}"
    c.save_checkpoint(checkpoint)
    d = Engine(spec, prepare(spec, tmp_path / "stream"), 1)
    assert d.load_checkpoint(checkpoint) == (2, 3)
    d.start_epoch(2, 3)
    d.train_steps([0.01] * (d.steps_per_epoch - 3))
    assert same_weights(weights(a), weights(d))
    assert a.train_metrics() == d.train_metrics()
    assert a.evaluate() == d.evaluate()
    metrics = a.evaluate()
    assert ("val_r2" in metrics) == (task == "regression") and metrics["val_loss"] > 0


def test_the_cache_is_reused_and_rebuilt_when_the_data_or_the_job_changes(tmp_path):
    csv = classification_csv(tmp_path / "t.csv", rows=300)
    spec = streaming(tmp_path, train_data_path=str(csv), target_column="target")
    folder = tmp_path / "stream"
    first = prepare(spec, folder)
    manifest = folder / "manifest.json"
    built = manifest.stat().st_mtime_ns
    assert prepare(spec, folder).n_train == first.n_train and manifest.stat().st_mtime_ns == built
    # a crash mid-build leaves files without a manifest: rebuilt, not trusted
    manifest.unlink()
    (folder / "train.x").write_bytes(b"\0" * 10)
    assert prepare(spec, folder).n_train == first.n_train
    # other data, or another split, is another cache
    classification_csv(csv, rows=500)
    assert prepare(spec, folder).n_train > first.n_train
    other = streaming(tmp_path, train_data_path=str(csv), target_column="target", validation_split=0.5)
    assert prepare(other, folder).n_val == pytest.approx(250, abs=40)
    # a manifest that promises more rows than the files hold is refused with what to do
    body = json.loads(manifest.read_text())
    body["rows"]["train"] += 1000
    manifest.write_text(json.dumps(body))
    with pytest.raises(DataError, match="delete the folder"):
        from engines.stream import _prepared
        _prepared(body, folder, other["data"])


def test_text_columns_and_types_that_change_further_down_the_file(tmp_path):
    """Types come from the first block: whole numbers are read as floats (a later 1.5 is fine),
    a text column is one-hot encoded as in memory, and text in a column that began as numbers
    is a data error that says what to do."""
    rows = 200_000  # several read blocks
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"count": rng.integers(0, 5, rows).astype(object),
                          "colour": rng.choice(["red", "green", "blue"], rows),
                          "target": rng.choice(["yes", "no"], rows)})
    table.loc[rows - 5, "count"] = 2.5
    table.to_csv(tmp_path / "t.csv", index=False)
    spec = streaming(tmp_path, train_data_path=str(tmp_path / "t.csv"), target_column="target",
                     chunk_rows=4096)
    data = prepare(spec, tmp_path / "s1")
    memory = prepare(normalise(tmp_path, train_data_path=str(tmp_path / "t.csv"), target_column="target"))
    kinds = {c["name"]: c for c in data.preprocess["features"]}
    assert kinds["count"]["kind"] == "numeric"
    # (ranked by count in each one's training rows, which the two splits choose differently)
    assert sorted(kinds["colour"]["categories"]) == sorted(
        [c["categories"] for c in memory.preprocess["features"] if c["name"] == "colour"][0])
    assert data.preprocess["target"]["classes"] == ["no", "yes"] and data.input_dim == 4
    for row in (rows - 3, 7):  # text in a later block, and in the block the types come from
        table.loc[row, "count"] = "lots"
        table.to_csv(tmp_path / "t.csv", index=False)
        with pytest.raises(DataError) as err:
            prepare(spec, tmp_path / "s2")
        message = str(err.value)
        assert "count" in message and "lots" in message and "categorical_columns" in message
    listed = streaming(tmp_path, train_data_path=str(tmp_path / "t.csv"), target_column="target",
                       categorical_columns=["count", "colour"])
    cats = prepare(listed, tmp_path / "s3").preprocess["features"][0]
    assert cats["kind"] == "categorical" and "lots" in cats["categories"]


@pytest.mark.parametrize("body, problem", [
    ("a,target\n", "no training rows"),
    ("a,target\n1,x\n2,x\n3,x\n", "single class"),
    ("a,target\n1,x\n2,\n3,y\n", r"missing values in 1 row \(row 2;"),
    ("a,b\n1,2\n", 'no column "target"'),
])
def test_data_errors_while_streaming_say_what_and_what_next(tmp_path, body, problem):
    (tmp_path / "t.csv").write_text(body)
    spec = streaming(tmp_path, train_data_path=str(tmp_path / "t.csv"), target_column="target",
                     validation_split=0.0)
    with pytest.raises(DataError, match=problem):
        prepare(spec, tmp_path / "s")


def test_parquet_streams_too(tmp_path):
    table = pd.read_csv(classification_csv(tmp_path / "t.csv", rows=500))
    table.to_parquet(tmp_path / "t.parquet")
    spec = streaming(tmp_path, train_data_path=str(tmp_path / "t.parquet"), target_column="target")
    memory = normalise(tmp_path, train_data_path=str(tmp_path / "t.csv"), target_column="target")
    a, b = prepare(spec, tmp_path / "s"), prepare(memory)
    assert a.n_train + a.n_val == 500 and a.preprocess["target"] == b.preprocess["target"]


def test_a_column_without_a_header_name_is_read_as_pandas_names_it(tmp_path):
    """The index `DataFrame.to_csv` writes has no header name: pandas calls it "Unnamed: 0". A
    job that lists it as a feature streams as it trains in memory, and one that does not list
    features leaves it out, either way."""
    table = pd.read_csv(classification_csv(tmp_path / "plain.csv", rows=60))
    table.to_csv(tmp_path / "t.csv")  # with the index, its header cell empty
    for features in (["Unnamed: 0", "feature1"], None):
        common = {"train_data_path": str(tmp_path / "t.csv"), "target_column": "target",
                  "feature_columns": features, "validation_split": 0.0, "shuffle": False}
        memory = prepare(normalise(tmp_path, **common))
        streamed = prepare(streaming(tmp_path, **common), tmp_path / f"s{bool(features)}")
        assert streamed.preprocess["features"] == memory.preprocess["features"]
        assert [c["name"] for c in memory.preprocess["features"]][:2] == (
            features or ["feature1", "feature2"])
        assert np.array_equal(streamed.stream.train.read(0, 60)[0], memory.x_train)


def test_empty_numbers_are_noted_for_each_split_in_memory_and_streaming_alike(tmp_path):
    """Empty cells of numeric features take the training mean; run_started's notes say so, per
    split, naming the columns and how many rows (the validation file's own empties included)."""
    table = pd.read_csv(classification_csv(tmp_path / "plain.csv", rows=80))
    train, val = table.iloc[:60].copy(), table.iloc[60:].copy()
    train.loc[[3, 9, 40], "feature1"] = np.nan
    train.loc[[7], "feature3"] = np.nan
    val.loc[[61, 70], "feature1"] = np.nan
    train.to_csv(tmp_path / "train.csv", index=False)
    val.to_csv(tmp_path / "val.csv", index=False)
    common = {"train_data_path": str(tmp_path / "train.csv"), "val_data_path": str(tmp_path / "val.csv"),
              "target_column": "target"}
    expected = ['training rows: numeric columns "feature1" (3 of 60 rows), "feature3" (1 of 60 rows) '
                "have empty cells; they take the training mean",
                'validation rows: numeric column "feature1" (2 of 20 rows) has empty cells; they take '
                "the training mean"]
    assert prepare(normalise(tmp_path, **common)).notes == expected
    assert prepare(streaming(tmp_path, **common), tmp_path / "s").notes == expected
    table.to_csv(tmp_path / "train.csv", index=False)  # no empty cell: no note
    assert prepare(normalise(tmp_path, **common)).notes == expected[1:]


@pytest.mark.parametrize("compression", ["gzip", "bz2", "xz", "zip"])
def test_a_compressed_csv_streams_as_it_reads_in_memory(tmp_path, compression):
    """big.csv.gz (or .bz2, .xz, a .zip of one CSV) is decompressed as it is read, streaming as
    in memory; a zip of several files and a zstd file are refused with what to do."""
    table = pd.read_csv(classification_csv(tmp_path / "plain.csv", rows=300))
    table.insert(1, "city", ["New York, NY", "Paris", "Lyon"] * 100)  # quoted commas inside
    suffix = {"gzip": "gz"}.get(compression, compression)
    path = tmp_path / f"t.csv.{suffix}"
    table.to_csv(path, index=False, compression=compression)
    common = {"train_data_path": str(path), "target_column": "target", "validation_split": 0.0}
    memory = prepare(normalise(tmp_path, **common))
    streamed = prepare(streaming(tmp_path, chunk_rows=64, **common), tmp_path / "s")
    assert streamed.n_train == memory.n_train == 300
    assert streamed.preprocess["features"][1]["name"] == "city"
    assert sorted(streamed.preprocess["features"][1]["categories"]) == ["Lyon", "New York, NY", "Paris"]
    assert np.array_equal(streamed.stream.train.read(0, 300)[0][:, :1], memory.x_train[:, :1])


@pytest.mark.parametrize("name", ["t.tsv", "t.TAB", "t.tsv.gz"])
def test_a_file_named_tsv_is_read_with_tabs_unless_the_job_names_a_delimiter(tmp_path, name):
    table = pd.DataFrame({"a": [1.5, 2.5, 3.5, 4.5] * 10, "city": ["New York, NY", "Paris"] * 20,
                          "target": ["x", "y", "y", "x"] * 10})
    table.to_csv(tmp_path / name, sep="\t", index=False)
    common = {"train_data_path": str(tmp_path / name), "target_column": "target", "validation_split": 0.0}
    for spec in (normalise(tmp_path, **common), streaming(tmp_path, **common)):
        assert spec["data"]["delimiter"] == "\t"
        data = prepare(spec, tmp_path / "s")
        assert data.n_train == 40 and data.preprocess["read"]["delimiter"] == "\t"
        assert sorted(data.preprocess["features"][1]["categories"]) == ["New York, NY", "Paris"]
    told = normalise(tmp_path, **common, data={"delimiter": ","})  # the job's word wins
    assert told["data"]["delimiter"] == ","
    assert normalise(tmp_path, train_data_path=str(tmp_path / "t.csv"),
                     target_column="target")["data"]["delimiter"] == ","


@pytest.mark.parametrize("name, body, problem", [
    ("two.csv.zip", None, r"is a zip file of 2 files \(a.csv, b.csv\)\. Expected: a zip file holding one CSV"),
    ("t.csv.zst", b"(\xb5/\xfd", "compressed with zstd, which epochd does not read"),
    ("t.txt", b"a\tcity\ttarget\n1\tParis\tx\n2\tNew York, NY\ty\n",  # a TSV by another name
     r"""Its header holds no ',' but '\\t': set "data": {"delimiter": "\\t"} in the job file"""),
    ("t.csv", b"a,city,target\n1,Paris,x\n2,New York, NY,y\n",
     "a value holding ',' must be in double quotes"),
    # other formats, by name or by their first bytes
    ("t.xlsx", b"PK\x03\x04 workbook", r'is an Excel workbook \(.xlsx\), not CSV or Parquet. Expected: a '
                                        r"CSV or Parquet file; save the sheet as CSV, or .*read_excel"),
    ("t.jsonl", b'{"a": 1, "target": "x"}\n', r'is JSON lines .*read_json\(".*t.jsonl", lines=True\)'),
    ("t.pkl", b"\x80\x04", "a Python pickle, which epochd never loads"),
    ("t.csv", "parquet", r'is a Parquet file, read as CSV by its name.*"format": "parquet"'),
    ("t.csv", "gzip", r"is gzip-compressed, read as CSV by its name.*data.csv.gz"),
    ("t.txt", b"PK\x03\x04 workbook", "is a zip archive"),
    ("t.parquet", b"a,target\n1,x\n2,y\n", r"Expected: a Parquet file \(it begins with PAR1\); this one "
                                          r"begins with text \('a,target'\), as a CSV does: if it is one, "
                                          r"name it \.csv"),
])
@pytest.mark.parametrize("streams", [False, True])
def test_files_read_wrong_say_what_to_do(tmp_path, name, body, problem, streams):
    path = tmp_path / name
    if body is None:
        import zipfile
        with zipfile.ZipFile(path, "w") as z:
            for member in ("a.csv", "b.csv"):
                z.writestr(member, "a,target\n1,x\n2,y\n")
    elif body == "parquet":
        pd.DataFrame({"a": [1, 2], "target": ["x", "y"]}).to_parquet(path)
    elif body == "gzip":
        pd.DataFrame({"a": [1, 2], "target": ["x", "y"]}).to_csv(path, index=False, compression="gzip")
    else:
        path.write_bytes(body)
    common = {"train_data_path": str(path), "target_column": "target", "validation_split": 0.0}
    spec = streaming(tmp_path, **common) if streams else normalise(tmp_path, **common)
    with pytest.raises(DataError, match=problem):
        prepare(spec, tmp_path / "s")


# ---------------------------------------------------------------- through the daemon

def stream_job(csv, out, data_options=None, **overrides):
    job = seed_job(csv, out, **overrides)
    job["data"] = data_options or {"streaming": True, "chunk_rows": 512, "shuffle_chunks": 2}
    return job


# slow: the engines' test of steps in any calls and a checkpoint anywhere covers the resume;
# this adds the daemon's pause and the cache's removal
@pytest.mark.slow
@pytest.mark.parametrize("framework", ["pytorch", "tensorflow"])
def test_a_streaming_job_pauses_mid_epoch_resumes_exactly_and_leaves_no_cache(tmp_path, spool, daemon_factory,
                                                                              framework):
    # epochs of seconds (TensorFlow's steps are faster here)
    data = classification_csv(tmp_path / "train.csv", rows=12000 if framework == "pytorch" else 60000)
    daemon_factory(spool, "--max-jobs", "2")
    slow = {"epochs": 2, "batch_size": 2, "algorithm_params": {"hidden_units": [16]}, "framework": framework}
    drop_job(spool, "ref.json", stream_job(data, tmp_path / "ref", **slow))
    drop_job(spool, "p.json", stream_job(data, tmp_path / "p", **slow))

    def mid_epoch():
        progress = [r for r in events_of(spool, "p") if r["type"] == "progress"]
        return progress and progress[-1]["step"] < progress[-1]["steps_per_epoch"] * 0.7
    wait_until(mid_epoch, 90, what="job p in the middle of an epoch")
    assert (spool / "jobs" / "p" / "stream" / "manifest.json").exists()
    control.drop(Spool(spool), "p", "pause")
    paused = last(wait_for_event(spool, "p", "paused"), "paused")
    assert paused["step"] > 0
    control.drop(Spool(spool), "p", "resume")
    state = wait_for_status(spool, "p", "completed", timeout=180)
    ref = wait_for_status(spool, "ref", "completed", timeout=180)
    runs = [r for r in events_of(spool, "p") if r["type"] == "run_started"]
    assert runs[1]["resumed_from"]["step"] == paused["step"]
    assert runs[0]["train_samples"] == runs[1]["train_samples"] and runs[0]["val_samples"] > 0
    weights_file = WEIGHT_FILES[framework][0]
    assert same_weights(model_weights(tmp_path / "ref" / weights_file), model_weights(tmp_path / "p" / weights_file))
    assert [h["train_loss"] for h in ref.history] == [h["train_loss"] for h in state.history]
    assert [h["val_accuracy"] for h in ref.history] == [h["val_accuracy"] for h in state.history]
    assert all(h["memory_peak"] > 0 for h in state.history)
    wait_until(lambda: not (spool / "jobs" / "p" / "stream").exists(), 30,
               what="the streaming cache removed after the job ended")
    recipe = json.loads((tmp_path / "p" / "preprocess.json").read_text())
    assert recipe["rows"]["train"] == runs[0]["train_samples"]


def write_big_csv(path, rows: int) -> None:
    rng = np.random.default_rng(0)
    names = [f"f{i}" for i in range(20)]
    with pcsv.CSVWriter(str(path), pa.schema([(n, pa.float32()) for n in names] + [("target", pa.int64())])) as w:
        for a in range(0, rows, 100_000):
            x = rng.normal(size=(min(100_000, rows - a), 20)).astype(np.float32)
            y = (x[:, 0] > 0).astype(np.int64)
            w.write_table(pa.table([*(pa.array(x[:, i]) for i in range(20)), pa.array(y)],
                                   names=names + ["target"]))


def test_streaming_memory_stays_flat_as_the_data_grows_32_fold(tmp_path, spool, daemon_factory):
    """The worker's peak RSS (getrusage, in `epoch_completed`) with 25,000 rows and with
    800,000 (168 MB of CSV, 67 MB even as float32 arrays): within 48 MB of each other. In
    memory the larger file alone would add more than that."""
    small, big = tmp_path / "small.csv", tmp_path / "big.csv"
    write_big_csv(small, 25_000)
    write_big_csv(big, 800_000)
    assert big.stat().st_size > 150 * 2**20
    daemon_factory(spool)
    job = {"epochs": 1, "batch_size": 4096, "learning_rate": 0.01, "validation_split": 0.1,
           "feature_columns": None,
           "algorithm_params": {"hidden_units": [32], "dropout_rate": 0.0},
           "data_options": {"streaming": True, "chunk_rows": 8192, "shuffle_chunks": 2},
           "checkpoint": {"every_epochs": 0}}
    peaks = {}
    for name, csv in (("small", small), ("big", big)):
        drop_job(spool, f"{name}.json", stream_job(csv, tmp_path / name, target_column="target", **job))
        state = wait_for_status(spool, name, "completed", timeout=240)
        peaks[name] = state.history[-1]["memory_peak"]
    assert state.history[-1]["val_accuracy"] > 0.95  # the big one learnt the rule from disk
    big_rows = next(r for r in events_of(spool, "big") if r["type"] == "run_started")["train_samples"]
    assert big_rows > 700_000
    assert peaks["big"] - peaks["small"] < 48, peaks
    os.remove(big)


def test_a_date_column_with_too_many_values_says_dates_while_streaming(tmp_path):
    pd.DataFrame({"day": pd.date_range("2024-01-01", periods=400).date, "x": np.arange(400.0),
                  "target": [0, 1] * 200}).to_csv(tmp_path / "t.csv", index=False)
    spec = streaming(tmp_path, train_data_path=str(tmp_path / "t.csv"), target_column="target")
    with pytest.raises(DataError, match='feature column "day" is not numeric: it holds dates with '
                                        "more than 50 distinct values .*derives no numbers from dates"):
        prepare(spec, tmp_path / "s")
