"""Streaming data: tables larger than memory, read a block at a time and trained from disk.

`"data": {"streaming": true}` changes how the rows reach the engine, not what they mean: the
same recipe format (scaling, encodings, label map), the same encoded values, the same models.

Decisions (the README repeats them):
- Two passes over the source, each holding one block of it at a time (pyarrow's streaming CSV
  reader, block by block; Parquet batch by batch). The first fits the recipe on the training
  rows: numbers by count, mean and sum of squared deviations merged block by block (Chan et
  al.), text by value counts; the second encodes every row to float32 and appends it to the
  job's cache, `jobs/<id>/stream/` (`train.x`, `train.y`, `val.x`, `val.y`, and `manifest.json`
  written last). A run finds the cache by its manifest (the source files' sizes and times and
  the data keys of the job) and reuses it; anything else rebuilds it. It is removed when the
  job ends.
- CSV column types come from the file's first block, with whole numbers read as floats so a
  later "1.5" is not an error; text in a column that started as numbers is a data error that
  says where, unless the column is listed in `categorical_columns`.
- `validation_split`: each row goes to validation with probability `validation_split`, drawn in
  file order from a generator seeded by the job's seed: the same rows in every run, and a count
  near the share rather than exactly it.
- Order: the training rows are cut, in file order, into chunks of `data.chunk_rows` rows. Epoch
  e permutes the chunks (seeded by (seed, e)) and takes them `data.shuffle_chunks` at a time;
  the rows of each such window are shuffled together (seeded by (seed, e, window)), and the
  batches run through the windows in turn. Like `epoch_order`, a pure function of (seed, epoch),
  so a resumed epoch sees the batches it would have. Memory holds one window, never the data.
  With `shuffle: false` the rows come in file order.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from daemon.errors import DataError

from . import data as D

STREAM_VERSION = 1
READ_BLOCK_BYTES = 256 << 10    # CSV bytes pyarrow parses at a time (it reads 32 blocks ahead)
FRAME_BYTES = 4 << 20           # parsed blocks are handed on in frames of about this size
PARQUET_BATCH_ROWS = 65_536
MAX_DISTINCT = 100_000          # distinct values a categorical column or class label may reach


@dataclass
class DiskRows:
    """Encoded rows in two flat files: x (float32, n x dim) and y (int64 or float32)."""
    folder: Path
    prefix: str
    n: int
    dim: int
    y_dtype: str

    @property
    def x_path(self) -> Path:
        return self.folder / f"{self.prefix}.x"

    @property
    def y_path(self) -> Path:
        return self.folder / f"{self.prefix}.y"

    def read(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows a..b-1, read from disk (through the page cache, not mapped into the process)."""
        count = max(0, min(b, self.n) - a)
        x = np.fromfile(self.x_path, np.float32, count * self.dim, offset=a * self.dim * 4)
        y_type = np.dtype(self.y_dtype)
        y = np.fromfile(self.y_path, y_type, count, offset=a * y_type.itemsize)
        if len(y) != count or len(x) != count * self.dim:
            raise DataError(f"the streaming cache {self.folder} is shorter than its manifest says "
                            f"(rows {a}..{b} of {self.n}). Expected: intact files; delete the "
                            "folder and the next run rebuilds it.")
        return x.reshape(count, self.dim), y

    def blocks(self, rows: int):
        """(x, y) of consecutive runs of `rows` rows, in file order."""
        for a in range(0, self.n, rows):
            yield self.read(a, a + rows)


class EpochRows:
    """The training rows in epoch order, fetched a window of chunks at a time into two buffers
    allocated once (one read, one shuffled): memory holds a window, never the data, and does
    not creep up from allocations of ever new sizes."""

    def __init__(self, rows: DiskRows, seed: int, chunk_rows: int, shuffle_chunks: int, shuffle: bool):
        self.rows, self.seed, self.shuffle = rows, seed, shuffle
        self.chunk_rows, self.window_chunks = chunk_rows, shuffle_chunks
        self.n = rows.n
        self.n_chunks = max(1, math.ceil(self.n / chunk_rows))
        self._plan: tuple[int, list[np.ndarray], np.ndarray] | None = None
        self._loaded: tuple[int, int, int] | None = None  # (epoch, window, rows)
        cap = self.window_rows = min(self.n, chunk_rows * shuffle_chunks)
        y_type = np.dtype(rows.y_dtype)
        self._raw = (np.empty((cap, rows.dim), np.float32), np.empty(cap, y_type))
        self._win = (np.empty((cap, rows.dim), np.float32), np.empty(cap, y_type))

    def plan(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Epoch `epoch`'s windows (chunk ids each) and the first epoch row of every window."""
        if self._plan is None or self._plan[0] != epoch:
            chunks = D.epoch_order(self.seed, epoch, self.n_chunks, self.shuffle)
            windows = [chunks[i:i + self.window_chunks]
                       for i in range(0, self.n_chunks, self.window_chunks)]
            sizes = [sum(self._chunk_size(c) for c in w) for w in windows]
            self._plan = (epoch, windows, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        return self._plan[1], self._plan[2]

    def _chunk_size(self, c: int) -> int:
        return min(self.n, (c + 1) * self.chunk_rows) - c * self.chunk_rows

    def _load(self, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        if self._loaded is not None and self._loaded[:2] == (epoch, w):
            m = self._loaded[2]
            return self._win[0][:m], self._win[1][:m]
        self._loaded = None
        windows, _ = self.plan(epoch)
        raw_x, raw_y = self._raw
        m = 0
        with open(self.rows.x_path, "rb") as fx, open(self.rows.y_path, "rb") as fy:
            for c in windows[w]:
                k = self._chunk_size(c)
                a = c * self.chunk_rows
                _read_into(fx, a * self.rows.dim * 4, raw_x[m:m + k], self.rows)
                _read_into(fy, a * raw_y.itemsize, raw_y[m:m + k], self.rows)
                m += k
        win_x, win_y = self._win
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, w]).permutation(m)
            np.take(raw_x[:m], order, axis=0, out=win_x[:m])
            np.take(raw_y[:m], order, out=win_y[:m])
        else:
            win_x[:m], win_y[:m] = raw_x[:m], raw_y[:m]
        self._loaded = (epoch, w, m)
        return win_x[:m], win_y[:m]

    def span(self, epoch: int, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows a..b-1 of epoch `epoch`'s order: a view of the window buffer (valid until the
        next call) when they lie in one window, else a copy."""
        _, starts = self.plan(epoch)
        b = min(b, self.n)
        xs, ys = [], []
        w = int(np.searchsorted(starts, a, side="right")) - 1
        while a < b:
            x, y = self._load(epoch, w)
            lo, hi = a - starts[w], min(b, starts[w + 1]) - starts[w]
            if len(xs) == 0 and b <= starts[w + 1]:
                return x[lo:hi], y[lo:hi]
            xs.append(x[lo:hi].copy())
            ys.append(y[lo:hi].copy())
            a = starts[w + 1]
            w += 1
        return np.concatenate(xs), np.concatenate(ys)


def _read_into(f, offset: int, out: np.ndarray, rows: DiskRows) -> None:
    f.seek(offset)
    view = memoryview(out).cast("B")
    if f.readinto(view) != len(view):
        raise DataError(f"the streaming cache {rows.folder} is shorter than its manifest says. "
                        "Expected: intact files; delete the folder and the next run rebuilds it.")


@dataclass
class Stream:
    train: DiskRows
    val: DiskRows | None
    chunk_rows: int
    shuffle_chunks: int

    def epoch_rows(self, seed: int, shuffle: bool) -> EpochRows:
        return EpochRows(self.train, seed, self.chunk_rows, self.shuffle_chunks, shuffle)


# ---------------------------------------------------------------- reading blocks

def _columns(path: str, options: dict, what: str) -> list[str]:
    import pyarrow.parquet as pq
    D.check_file(path, what)
    fmt, encoding = D.table_format(path, options), options.get("encoding", "utf-8")
    if fmt == "csv":
        D.check_format(path, options, what, D.JOB_FIXES)
        D.check_byte_order_mark(path, encoding, what, D.JOB_FIXES)
    try:
        if fmt == "parquet":
            return list(pq.ParquetFile(path).schema_arrow.names)
        names = D.unnamed(D.csv_header(path, options))  # as read_table names them
    except Exception as e:
        expected = (D.parquet_hint(path, options) if fmt == "parquet" else
                    D.encoding_hint(path, encoding, D.JOB_FIXES) if D.not_text(e) else
                    "Expected: a well-formed CSV file with a header row."
                    + D.parse_hint(path, options, D.JOB_FIXES, e))
        raise DataError(f'could not read {what} "{path}" as {fmt.upper()}: '
                        f"{type(e).__name__}: {str(e).rstrip('.')}. {expected}") from None
    D.check_unique(names, what, path)
    return names


def iter_frames(path: str, options: dict, columns: list[str], text_columns: list[str], what: str):
    """The file's rows as pandas frames of about FRAME_BYTES each (Parquet: a batch each), only
    `columns`; `text_columns` are read as text whatever they look like."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq
    fmt = D.table_format(path, options)
    row = 0
    try:
        if fmt == "parquet":
            for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
                frame = _placed(batch.to_pandas(), row)
                row += len(frame)
                yield frame
            return
        encoding, decimal = options.get("encoding", "utf-8"), options.get("decimal", ".")
        nulls = pcsv.ConvertOptions().null_values + list(options.get("missing_values") or ())
        parse = pcsv.ParseOptions(delimiter=options["delimiter"])
        read = pcsv.ReadOptions(block_size=READ_BLOCK_BYTES, use_threads=False, encoding=encoding)
        header = D.csv_header(path, options)
        if not all(header):  # a column without a name: pandas' name for it, as _columns gives
            read = pcsv.ReadOptions(block_size=READ_BLOCK_BYTES, use_threads=False, encoding=encoding,
                                    column_names=D.unnamed(header), skip_rows=1)
        text = {c: pa.string() for c in text_columns}
        # (a Python file object: given a path, pyarrow reads far ahead of the parser, which
        # holds much of the file in memory at once)
        with D.open_bytes(path) as f, pcsv.open_csv(
                f, read_options=read, parse_options=parse,
                convert_options=pcsv.ConvertOptions(include_columns=columns, column_types=text,
                                                    strings_can_be_null=True,
                                                    decimal_point=decimal, null_values=nulls)) as probe:
            schema = probe.schema
        # whole numbers are read as floats: the first block's "1" must not refuse a later "1.5"
        # (a column empty in its first block is taken for numbers)
        types = {f.name: (pa.float64() if pa.types.is_integer(f.type) or pa.types.is_null(f.type)
                          else f.type) for f in schema}
        types.update(text)
        with D.open_bytes(path) as f, pcsv.open_csv(
                f, read_options=read, parse_options=parse,
                convert_options=pcsv.ConvertOptions(include_columns=columns, column_types=types,
                                                    strings_can_be_null=True,
                                                    decimal_point=decimal, null_values=nulls)) as reader:
            batches, size = [], 0
            for batch in reader:
                batches.append(batch)
                size += batch.nbytes
                if size >= FRAME_BYTES:
                    frame = _placed(pa.Table.from_batches(batches).to_pandas(), row)
                    D.check_text(frame, path, what, encoding, D.JOB_FIXES, row)
                    batches, size = [], 0
                    row += len(frame)
                    yield frame
            if batches:
                frame = _placed(pa.Table.from_batches(batches).to_pandas(), row)
                D.check_text(frame, path, what, encoding, D.JOB_FIXES, row)
                row += len(frame)
                yield frame
    except DataError:
        raise
    except Exception as e:
        if fmt == "csv" and D.not_text(e):
            raise DataError(f'could not read {what} "{path}" as CSV after row {row}: '
                            f"{type(e).__name__}: {e}. "
                            + D.encoding_hint(path, options.get("encoding", "utf-8"), D.JOB_FIXES)) from None
        hint = ""
        if "conversion" in str(e).lower():
            found = re.search(r"CSV column #(\d+)", str(e))
            header = _columns(path, options, what) if found else []
            column = (f'"{header[int(found[1])]}"' if found and int(found[1]) < len(header)
                      else "A column")
            hint = (f" {column} began with numbers and holds text further down: list it in "
                    "categorical_columns to read it as text, or fix the value.")
        if fmt == "csv" and not hint:
            hint = D.parse_hint(path, options, D.JOB_FIXES, e)
        raise DataError(f'could not read {what} "{path}" as {fmt.upper()} after row {row}: '
                        f"{type(e).__name__}: {e}.{hint} Expected: a well-formed {fmt.upper()} "
                        "file with a header row.") from None


def _placed(frame: pd.DataFrame, first_row: int) -> pd.DataFrame:
    """`frame` indexed by each row's place in the file (0-based), which errors name."""
    frame.index = pd.RangeIndex(first_row, first_row + len(frame))
    return frame


def _split_masks(share: float, seed: int, has_val_file: bool):
    """A callable giving, block by block, which rows go to validation (True)."""
    rng = np.random.default_rng([seed, 0x5EED])
    def masks(n: int) -> np.ndarray:
        if has_val_file or share <= 0:
            return np.zeros(n, dtype=bool)
        return rng.random(n) < share
    return masks


# ---------------------------------------------------------------- pass 1: the recipe

class NumberStats:
    def __init__(self):
        self.count = self.rows = self.missing = 0
        self.mean = self.m2 = 0.0

    def add(self, values: np.ndarray, col: pd.Series, kind: str = D.FEATURE) -> None:
        """`values`: the numbers of `col`, a block of the file's rows."""
        D._finite(col, values, kind=kind)
        ok = values[~np.isnan(values)]
        self.rows += len(values)
        self.missing += len(values) - len(ok)
        if not len(ok):
            return
        n_b, mean_b = len(ok), float(ok.mean())
        m2_b = float(((ok - mean_b) ** 2).sum())
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n


class TextStats:
    def __init__(self, name: str, explicit: bool, max_categories: int):
        self.name, self.explicit, self.max_categories = name, explicit, max_categories
        self.counts: Counter = Counter()
        self.rows = self.numeric = 0
        self.first_text: tuple[int, object] | None = None  # (row, value) of the first non-number
        self.holds: str | None = None  # "text", "dates" or "times", from the first block

    def add(self, col: pd.Series, whole: pd.Series) -> None:
        """`col`: a block's training rows, whose values are the categories; `whole`: all the
        block's rows, which say whether the column holds numbers (not the split)."""
        self.counts.update(D._as_text(col).value_counts().to_dict())
        if self.holds is None:
            self.holds = D.holds(whole)
        if not self.explicit:
            numbers = pd.to_numeric(whole, errors="coerce")
            self.numeric += int(numbers.notna().sum())
            text = np.flatnonzero((whole.notna() & numbers.isna()).to_numpy())
            if self.first_text is None and len(text):
                self.first_text = (int(whole.index[int(text[0])]) + 1, whole.iloc[int(text[0])])
        self.rows += len(whole)
        if not self.explicit and len(self.counts) > self.max_categories:
            self.check()
        elif len(self.counts) > MAX_DISTINCT:
            raise DataError(f'categorical column "{self.name}" has more than {MAX_DISTINCT:,} '
                            "distinct values. Expected: a column with a bounded set of values; "
                            "drop it from categorical_columns and feature_columns.")

    def check(self) -> None:
        if self.explicit:
            return
        if self.rows and self.numeric / self.rows >= 0.9 and self.first_text is not None:
            row, value = self.first_text  # mostly numbers: stray text is a data error
            fix = (D.REPEATED_HEADER if str(value).strip() == self.name.strip() else
                   "fix the value, or list the column in categorical_columns to one-hot encode it.")
            raise DataError(f'feature column "{self.name}" is not numeric: row {row} holds '
                            f"{value!r} ({D.ROWS_NOTE}). Expected: numbers; {fix}")
        if len(self.counts) > self.max_categories:
            examples = ", ".join(repr(v) for v, _ in self.counts.most_common(3))
            raise DataError(D.too_many_values(self.name, self.holds or "text",
                                              f"more than {self.max_categories}", examples,
                                              self.max_categories))

    def recipe(self) -> dict:
        ranked = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:self.max_categories]
        return {"name": self.name, "kind": "categorical", "categories": [k for k, _ in ranked]}


class TargetStats:
    def __init__(self, name: str):
        self.name = name
        self.text = False
        self.values: set = set()
        self.many = False  # more distinct values than MAX_DISTINCT
        self.whole = True
        self.numbers = NumberStats()
        self.rows = 0
        self.example = None

    def add(self, y: pd.Series, text: bool) -> None:
        if y.isna().any():
            raise DataError(f'the target column "{y.name}" {D.missing(y)}. Expected: a value in '
                            "every row; drop or fill those rows.")
        if text and self.example is None:  # what a text target's error shows: a text value
            words = y[pd.to_numeric(y, errors="coerce").isna()]
            self.example = words.iloc[0] if len(words) else None
        self.rows += len(y)
        self.text = self.text or text
        if not text:
            v = D._numeric(y, kind=D.TARGET)
            self.numbers.add(v, y, D.TARGET)
            self.whole = self.whole and bool(np.all(v == np.round(v)))
        if not self.many:
            self.values.update(pd.unique(y).tolist())
            if len(self.values) > MAX_DISTINCT:
                self.many, self.values = True, set()

    def task(self, asked: str) -> str:
        if asked != "auto":
            return asked
        if self.text:
            return "classification"
        return "classification" if self.whole and not self.many and len(self.values) <= \
            D.CLASSIFICATION_MAX_INT_CLASSES else "regression"

    def recipe(self, task: str, int_like: bool) -> dict:
        if task == "regression":
            if self.text:
                raise D.text_target(self.name, self.example)
            std = math.sqrt(self.numbers.m2 / max(self.numbers.count, 1))
            return {"name": self.name, "task": task, "mean": self.numbers.mean,
                    "std": std if std > 0 else 1.0}
        if self.many:
            raise DataError(f'the target column "{self.name}" has more than {MAX_DISTINCT:,} '
                            'distinct values. Expected: class labels; or "task": "regression".')
        values = [int(v) if int_like and not self.text else v for v in self.values]
        classes = sorted(values, key=lambda v: (str(type(v)), v))
        if not self.text:
            D.check_class_values(self.name, classes, self.whole)
        if len(classes) < 2:
            raise DataError(f'the target column "{self.name}" has a single class ({classes[0]!r}) '
                            "in the training rows. Expected: at least two classes for "
                            'classification; check the data, or set "task": "regression".')
        return {"name": self.name, "task": task, "classes": [D._plain(c) for c in classes]}


def fit_streaming(spec: dict, features: list[str], val_masks) -> tuple[dict, str, int]:
    """Pass 1: the recipe, the task and the number of training rows."""
    opts, target = spec["data"], spec["target_column"]
    cats = spec["categorical_columns"]
    explicit = isinstance(cats, list)
    text_cols = list(cats) if explicit else []
    stats: dict[str, NumberStats | TextStats] = {}
    target_stats = TargetStats(target)
    int_target = None
    n_train = 0
    for frame in iter_frames(spec["train_data_path"], opts, features + [target], text_cols,
                             "train_data_path"):
        keep = ~val_masks(len(frame))
        train = frame[keep] if not keep.all() else frame
        n_train += len(train)
        if int_target is None and len(frame):
            int_target = not D._is_text(frame[target])
        for c in features:
            col = train[c]
            if c not in stats:
                categorical = (c in cats) if explicit else D._is_text(col)
                stats[c] = (TextStats(c, explicit, opts["max_categories"]) if categorical
                            else NumberStats())
            s = stats[c]
            if isinstance(s, TextStats):
                if not explicit:
                    D.check_decimal_comma(frame[c], f'train_data_path "{spec["train_data_path"]}": ')
                    D.check_missing_marks(frame[c], f'train_data_path "{spec["train_data_path"]}": ')
                s.add(col, frame[c])
            else:
                if D._is_text(col):  # a column that looked numeric turned out to hold text
                    D._numeric(col)
                s.add(D._numeric(col), col)
        if spec["task"] != "classification" and D._is_text(frame[target]):
            D.check_decimal_comma(frame[target], f'train_data_path "{spec["train_data_path"]}": ',
                                  D.TARGET)
        if len(train):
            target_stats.add(train[target], D._is_text(train[target]) or
                             pd.api.types.is_bool_dtype(train[target]))
    if n_train == 0:
        raise DataError(f'train_data_path "{spec["train_data_path"]}" has no training rows. '
                        "Expected: a header and at least one row.")
    columns = []
    for c in features:
        s = stats[c]
        if isinstance(s, TextStats):
            s.check()
            columns.append(s.recipe())
            continue
        if s.count == 0:
            raise DataError(f'feature column "{c}" has no values at all in the training rows. '
                            "Expected: numbers; drop the column from feature_columns.")
        std = math.sqrt(s.m2 / s.rows)
        columns.append({"name": c, "kind": "numeric", "mean": s.mean, "std": std if std > 0 else 1.0,
                        "fill": s.mean, "missing_in_train": s.missing})
    task = target_stats.task(spec["task"])
    recipe = {"version": D.PREPROCESS_VERSION, "features": columns,
              "input_dim": sum(1 if c["kind"] == "numeric" else len(c["categories"]) for c in columns),
              "target": target_stats.recipe(task, bool(int_target) and target_stats.whole)}
    return recipe, task, n_train


# ---------------------------------------------------------------- pass 2: the cache

def _fingerprint(spec: dict) -> dict:
    files = {}
    for key in ("train_data_path", "val_data_path"):
        if spec[key]:
            st = os.stat(spec[key])
            files[key] = [str(Path(spec[key]).resolve()), st.st_size, st.st_mtime_ns]
    keys = {k: spec[k] for k in ("feature_columns", "target_column", "categorical_columns",
                                 "validation_split", "seed", "task", "data")}
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()
    return {"version": STREAM_VERSION, "files": files, "keys": digest}


def header_features(spec: dict) -> list[str]:
    """The job's features, from its data files' headers alone (one block of each file read):
    DataError for what those show wrong (a missing or repeated column, another encoding, no
    header row). `epochd submit` asks it before a job is dropped."""
    opts, target = spec["data"], spec["target_column"]
    train_cols = _columns(spec["train_data_path"], opts, "train_data_path")
    _check_names(train_cols, (spec["feature_columns"] or []) + [target], "train_data_path",
                 spec["train_data_path"])
    features = spec["feature_columns"] or D.default_features(train_cols, target, spec["train_data_path"])
    if spec["val_data_path"]:
        val_cols = _columns(spec["val_data_path"], opts, "val_data_path")
        _check_names(val_cols, features + [target], "val_data_path", spec["val_data_path"])
    return features


def prepare_streaming(spec: dict, folder: Path) -> D.Prepared:
    """Fit, encode and cache the job's data under `folder` (or reuse a cache that matches)."""
    opts = spec["data"]
    features = header_features(spec)
    fingerprint = _fingerprint(spec)
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = None
    if not manifest or manifest.get("fingerprint") != fingerprint:
        manifest = _build_cache(spec, features, folder, fingerprint)
    return _prepared(manifest, folder, opts)


def _check_names(found: list[str], wanted: list[str], what: str, path: str) -> None:
    D.check_columns(pd.DataFrame(columns=found), wanted, what, path)


def _build_cache(spec: dict, features: list[str], folder: Path, fingerprint: dict) -> dict:
    from daemon.fsutil import atomic_write_bytes
    opts, target = spec["data"], spec["target_column"]
    has_val_file = bool(spec["val_data_path"])
    recipe, task, n_train = fit_streaming(spec, features, _split_masks(
        spec["validation_split"], spec["seed"], has_val_file))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)
    text_cols = [c["name"] for c in recipe["features"] if c["kind"] == "categorical"]
    y_dtype = "float32" if task == "regression" else "int64"
    counts = {"train": 0, "val": 0}
    unseen: dict[str, dict[str, int]] = {}  # validation values without a category
    val_empty: dict[str, int] = {}  # empty numbers in the validation rows
    files = {name: open(folder / name, "wb") for name in ("train.x", "train.y", "val.x", "val.y")}
    try:
        def write(which: str, frame: pd.DataFrame, label: str, source: str) -> None:
            if not len(frame):
                return
            where = f'{source} "{spec[source]}": '
            x = D.encode(frame, recipe, where)
            y = np.asarray(D.encode_target(frame[target], recipe, label, where), dtype=y_dtype)
            if which == "val":
                D.add_unseen(unseen, D.unseen_categories(frame, recipe))
                for name, n in D.empty_numbers(frame, recipe).items():
                    val_empty[name] = val_empty.get(name, 0) + n
            files[f"{which}.x"].write(x.tobytes())
            files[f"{which}.y"].write(y.tobytes())
            counts[which] += len(frame)

        masks = _split_masks(spec["validation_split"], spec["seed"], has_val_file)
        for frame in iter_frames(spec["train_data_path"], opts, features + [target], text_cols,
                                 "train_data_path"):
            to_val = masks(len(frame))
            write("train", frame[~to_val] if to_val.any() else frame, "training", "train_data_path")
            if to_val.any():
                write("val", frame[to_val], "validation", "train_data_path")
        if has_val_file:
            for frame in iter_frames(spec["val_data_path"], opts, features + [target], text_cols,
                                     "val_data_path"):
                write("val", frame, "validation", "val_data_path")
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    if counts["train"] != n_train:
        raise DataError(f'train_data_path "{spec["train_data_path"]}" changed while it was read '
                        f"({n_train} training rows, then {counts['train']}). Expected: a file "
                        "that stays put while the job prepares it.")
    recipe["rows"] = dict(counts)
    recipe["read"] = D.read_options(opts)
    n_outputs = 1 if task == "regression" or len(recipe["target"]["classes"]) == 2 \
        else len(recipe["target"]["classes"])
    manifest = {"fingerprint": fingerprint, "task": task, "n_outputs": n_outputs,
                "input_dim": recipe["input_dim"], "y_dtype": y_dtype, "rows": counts,
                "recipe": recipe,
                "notes": D.data_notes(recipe, counts["train"], counts["val"], val_empty, unseen)}
    atomic_write_bytes(folder / "manifest.json", json.dumps(manifest).encode())
    return manifest


def _prepared(manifest: dict, folder: Path, opts: dict) -> D.Prepared:
    rows, dim, y_dtype = manifest["rows"], manifest["input_dim"], manifest["y_dtype"]
    train = DiskRows(folder, "train", rows["train"], dim, y_dtype)
    val = DiskRows(folder, "val", rows["val"], dim, y_dtype) if rows["val"] else None
    for r in (train, val):
        if r is not None and (not r.x_path.exists() or r.x_path.stat().st_size != r.n * dim * 4):
            raise DataError(f"the streaming cache {folder} does not match its manifest. "
                            "Expected: intact files; delete the folder and the next run rebuilds it.")
    stream = Stream(train, val, opts["chunk_rows"], opts["shuffle_chunks"])
    return D.Prepared(manifest["task"], None, None, None, None, manifest["n_outputs"],
                      manifest["recipe"], stream=stream, notes=manifest.get("notes", []))
