"""The data pipeline every engine shares: tables in, float32 matrices and a JSON recipe out.

Decisions (the README repeats them):
- CSV (read through pyarrow) or Parquet, chosen by `data.format` or the file's extension. A CSV
  is text in `data.encoding` (UTF-8 unless told); a value that does not decode is a data error
  naming the encoding to set, never a category made of bytes. Numbers take `data.decimal`'s
  mark; a text column made only of numbers with a comma ("1,5") is a data error naming it.
  A header must name each column once; without feature_columns, a column without a name (a
  written index) is no feature.
- Task `auto`: a text, boolean or categorical target means classification; a numeric target
  whose values are all whole numbers with at most 20 distinct values means classification;
  anything else is regression.
- Features: numeric columns are standardised with the training split's mean and standard
  deviation (a constant column gets std 1); missing numbers are filled with the training mean.
  Text columns (or those listed in `categorical_columns`) are one-hot encoded over their
  `data.max_categories` most frequent training values; unseen values encode as all zeros.
  A text column with more distinct values than that, or a number column with stray text in it,
  is a data error, not a guess.
- Labels: classes are the sorted distinct training values, encoded 0..C-1; a regression target is
  standardised for training and every reported error (mae, rmse) is in its own units.
- `validation_split` takes a seeded random share of the rows (seed = the job's seed).
- Every row is checked, whichever split it lands in: a missing label, an infinite number or
  stray text in a number column is a data error in the validation rows as in the training
  rows. Whether a column holds numbers or text is decided on the whole file, so the split
  cannot change it. Errors name rows as a person counts them in the file: the first row below
  the header is row 1.
- The order of samples in epoch e is `epoch_order(seed, e, n)`: a pure function, so a resumed
  job sees the same batches as one that never stopped.
"""
import datetime
import difflib
import importlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd

from daemon.errors import DataError

if TYPE_CHECKING:
    from .stream import Stream

MISSING = "<missing>"
ROWS_NOTE = "rows count from 1 below the header"
FEATURE, TARGET = "feature column", "target column"  # what a column is, in errors
CLASSIFICATION_MAX_INT_CLASSES = 20
PREPROCESS_VERSION = 1


@dataclass
class Prepared:
    task: str                    # "classification" | "regression"
    x_train: np.ndarray | None   # float32 (n, input_dim); None when streaming
    y_train: np.ndarray | None   # int64 class indices, or float32 standardised targets
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    n_outputs: int               # 1 for regression and binary classification, else classes
    preprocess: dict             # JSON: everything needed to encode new data and decode outputs
    stream: "Stream | None" = None  # streaming: the encoded rows on disk (engines/stream.py)
    notes: list[str] = field(default_factory=list)  # worth knowing, not an error (run_started)

    @property
    def input_dim(self) -> int:
        return self.preprocess["input_dim"]

    @property
    def n_train(self) -> int:
        return self.stream.train.n if self.stream else len(self.x_train)

    @property
    def n_val(self) -> int:
        if self.stream:
            return self.stream.val.n if self.stream.val else 0
        return 0 if self.x_val is None else len(self.x_val)


def epoch_order(seed: int, epoch: int, n: int, shuffle: bool = True) -> np.ndarray:
    """Sample order of epoch `epoch` (1-based): depends on (seed, epoch) and nothing else."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def check_file(path: str, what: str) -> None:
    p = Path(path)
    if not p.exists():
        raise DataError(f'{what} "{path}" does not exist. Expected: a CSV or Parquet file; '
                        "check the path in the job file (a relative one starts at the daemon's base "
                        "folder: the spool's parent unless `serve --base-dir` says otherwise).")
    if not p.is_file():
        raise DataError(f'{what} "{path}" is not a regular file. Expected: a CSV or Parquet file.')


def table_format(path: str, options: dict) -> str:
    """"csv" or "parquet": `data.format`, or for "auto" the file's extension."""
    fmt = options.get("format", "auto")
    if fmt == "auto":
        fmt = "parquet" if Path(path).suffix.lower() in (".parquet", ".pq") else "csv"
    return fmt


class Fixes(NamedTuple):
    """What an error about a table tells its user to change: the job file, or predict's options."""
    names: str      # the column names are wrong
    delimiter: str  # a template: {sep} is the JSON-quoted separator
    encoding: str   # a template: {enc} is the JSON-quoted text encoding
    decimal: str = 'set "data": {"decimal": ","} in the job file'
    parquet: str = 'name it .parquet, or set "data": {"format": "parquet"} in the job file'


JOB_FIXES = Fixes("Fix the job's column names.", 'set "data": {{"delimiter": {sep}}} in the job file',
                  'set "data": {{"encoding": {enc}}} in the job file')
READ_DEFAULTS = {"delimiter": ",", "encoding": "utf-8", "decimal": ".", "missing_values": ()}


def read_options(options: dict) -> dict:
    """How a CSV was read (`data.delimiter`, `encoding`, `decimal`, `missing_values`): saved in
    the recipe, so that `epochd predict` reads new data as the job read its own."""
    read = {key: options.get(key, default) for key, default in READ_DEFAULTS.items()}
    read["missing_values"] = list(read["missing_values"])
    return read


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}  # suffix -> the module that reads it


def open_bytes(path: str):
    """A CSV's bytes as a binary file: a `.gz`, `.bz2` or `.xz` file decompressed as it is read,
    and the one file in a `.zip` (as pandas reads them); any other as it is."""
    suffix = Path(path).suffix.lower()
    if suffix == ".zip":
        import zipfile
        archive = zipfile.ZipFile(path)  # closed with the member: nothing else refers to it
        names = [n for n in archive.namelist() if not n.endswith("/")]
        if len(names) != 1:
            archive.close()
            raise DataError(f'"{path}" is a zip file of {len(names)} files ({", ".join(names[:5])}). '
                            "Expected: a zip file holding one CSV; unzip it and name the CSV.")
        return archive.open(names[0])
    if suffix == ".zst":
        raise DataError(f'"{path}" is compressed with zstd, which epochd does not read. Expected: '
                        "a CSV, plain or compressed with gzip (.gz), bzip2 (.bz2), xz (.xz) or zip; "
                        "decompress it (zstd -d) or recompress it.")
    module = COMPRESSED.get(suffix)
    if module is None:
        return open(path, "rb")
    return importlib.import_module(module).open(path, "rb")


def parse_hint(path: str, options: dict, fixes: Fixes, error: Exception) -> str:
    """What to do about a row with more fields than the header: another delimiter where the
    header holds one (a TSV read as a CSV: a comma in a value splits it), else quoting."""
    if not re.search(r"Expected \d+ columns, got \d+", str(error)):
        return ""
    try:
        with open_bytes(path) as f:
            header = f.readline(1 << 16).decode(options.get("encoding", "utf-8"), errors="replace")
    except (OSError, EOFError, LookupError):
        return ""
    delimiter = options.get("delimiter", ",")
    seps = [s for s in "\t;|," if s != delimiter and s in header and delimiter not in header]
    if seps:
        return (f" Its header holds no {delimiter!r} but {seps[0]!r}: "
                f"{fixes.delimiter.format(sep=json.dumps(seps[0]))}.")
    return (f" A row has more fields than the header: a value holding {delimiter!r} must be in "
            'double quotes ("New York, NY").')


def read_table(path: str, options: dict, what: str, fixes: Fixes = JOB_FIXES) -> pd.DataFrame:
    check_file(path, what)
    p, fmt = Path(path), table_format(path, options)
    encoding = options.get("encoding", "utf-8")
    if fmt == "csv":
        check_format(path, options, what, fixes)
        check_byte_order_mark(path, encoding, what, fixes)
    try:
        if fmt == "parquet":
            df = pd.read_parquet(p)
        else:
            df = pd.read_csv(p, sep=options.get("delimiter", ","), engine="pyarrow",
                             encoding=encoding, decimal=options.get("decimal", "."),
                             na_values=list(options.get("missing_values") or ()) or None)
    except Exception as e:  # pyarrow and pandas raise many types for unreadable files
        expected = (parquet_hint(path, options) if fmt == "parquet" else
                    encoding_hint(path, encoding, fixes) if not_text(e) else
                    "Expected: a well-formed CSV file with a header row."
                    + parse_hint(path, options, fixes, e))
        raise DataError(f'could not read {what} "{path}" as {fmt.upper()}: '
                        f"{type(e).__name__}: {str(e).rstrip('.')}. {expected}") from None
    if fmt == "csv" and any(re.fullmatch(r".+\.\d+", str(c)) for c in df.columns):
        check_unique(csv_header(path, options), what, path)  # pandas renamed a repeat "a" "a.1"
    if fmt == "csv":
        check_text(df, path, what, encoding, fixes)
    # the index is the row's place in the file (0-based), which splitting keeps: what error
    # messages name (a Parquet file written from pandas may bring an index of its own)
    return df.reset_index(drop=True)


def parquet_hint(path: str, options: dict) -> str:
    """How an error about a file read as Parquet ends: a CSV taken for one (by `data.format` or
    by its name) is said to be text."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PAR1"):
        return "Expected: a complete Parquet file; this one may be cut short or damaged."
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "Expected: a Parquet file (it begins with PAR1); this one does not."
    fix = ('set "data": {"format": "auto"} (or "csv")' if options.get("format") == "parquet"
           else "name it .csv")
    return (f"Expected: a Parquet file (it begins with PAR1); this one begins with text "
            f"({text.splitlines()[0][:40] if text else ''!r}), as a CSV does: if it is one, {fix}.")


def unnamed(names: list[str]) -> list[str]:
    """A header's names as pandas reads them: a column without a name (the index that
    `DataFrame.to_csv` writes) is "Unnamed: <its place, from 0>", which a job may list."""
    return [name if name else f"Unnamed: {i}" for i, name in enumerate(names)]


def csv_header(path: str, options: dict) -> list[str]:
    """The column names of a CSV as its header row has them (pyarrow, reading one block)."""
    import pyarrow.csv as pcsv
    with open_bytes(path) as f, pcsv.open_csv(
            f, read_options=pcsv.ReadOptions(block_size=1 << 20, use_threads=False,
                                              encoding=options.get("encoding", "utf-8")),
            parse_options=pcsv.ParseOptions(delimiter=options.get("delimiter", ","))) as r:
        return list(r.schema.names)


def check_unique(names: list[str], what: str, path: str) -> None:
    """DataError for a header that names a column twice: which of them a job means is a guess."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names, 1):
        if name in seen and name.strip():  # (columns without a name are dealt with elsewhere)
            if looks_like_data(names):
                raise DataError(f'{what} "{path}" has no header row, it seems: its first row '
                                f"({', '.join(names[:10])}) looks like data. Expected: a header "
                                "row naming the columns; add one.")
            raise DataError(f'{what} "{path}" names the column "{name}" twice in its header '
                            f"(columns {seen[name]} and {i}). Expected: distinct column names; "
                            "rename one.")
        seen.setdefault(name, i)


_TO_PARQUET = 'convert it with pandas: pandas.{reader}("{path}"{extra}).to_parquet("data.parquet")'
OTHER_FORMATS = {  # file name suffix -> (what the file is, how to turn it into one epochd reads)
    ".xlsx": ("an Excel workbook", "read_excel", ""), ".xlsm": ("an Excel workbook", "read_excel", ""),
    ".xls": ("an Excel workbook", "read_excel", ""), ".ods": ("an OpenDocument spreadsheet", "read_excel", ""),
    ".json": ("JSON", "read_json", ""), ".jsonl": ("JSON lines", "read_json", ", lines=True"),
    ".ndjson": ("JSON lines", "read_json", ", lines=True"),
    ".feather": ("an Arrow (Feather) file", "read_feather", ""),
    ".arrow": ("an Arrow (Feather) file", "read_feather", ""),
    ".h5": ("HDF5", "read_hdf", ""), ".hdf5": ("HDF5", "read_hdf", ""),
    ".pkl": ("a Python pickle", "read_pickle", ""), ".pickle": ("a Python pickle", "read_pickle", ""),
}
MAGIC = ((b"PAR1", "a Parquet file"), (b"PK\x03\x04", "a zip archive (as an Excel .xlsx workbook is)"),
         (b"\xd0\xcf\x11\xe0", "an old Excel (.xls) or other Office file"), (b"\x89HDF", "HDF5"),
         (b"ARROW1", "an Arrow (Feather) file"), (b"\x1f\x8b", "gzip-compressed"))


def check_format(path: str, options: dict, what: str, fixes: Fixes) -> None:
    """A file read as CSV that its name or first bytes show to be something else (a workbook,
    JSON, Parquet under another name...) would fail with the CSV parser's puzzling words, or
    parse as one garbled column: say what it is and how to make a CSV or Parquet of it. (With
    `data.format` "csv" the name is not held against it; the first bytes still are.)"""
    suffix = Path(path).suffix.lower()
    if suffix in OTHER_FORMATS and options.get("format", "auto") == "auto":
        kind, reader, extra = OTHER_FORMATS[suffix]
        how = _TO_PARQUET.format(reader=reader, path=path, extra=extra)
        if reader == "read_pickle":  # never unpickled here: loading a pickle runs its code
            kind += ", which epochd never loads (unpickling can run any code)"
            how = "load it where you trust it, then save it with DataFrame.to_parquet"
        elif reader == "read_excel":
            how = f"save the sheet as CSV, or {how}"
        raise DataError(f'{what} "{path}" is {kind} ({suffix}), not CSV or Parquet. Expected: a CSV '
                        f"or Parquet file; {how}.")
    if suffix in COMPRESSED or suffix == ".zip":
        return
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, kind in MAGIC:
        if head.startswith(magic):
            fix = (fixes.parquet if magic == b"PAR1" else
                   'name it with .gz at the end (data.csv.gz): epochd reads gzip by its name'
                   if magic == b"\x1f\x8b" else "save it as CSV or Parquet")
            raise DataError(f'{what} "{path}" is {kind}, read as CSV by its name. Expected: a CSV '
                            f"file here; {fix}.")


# A CSV is read as text in `data.encoding` (UTF-8 unless told). pyarrow reads a column whose bytes
# are not UTF-8 as bytes rather than failing: left alone, b'caf\xe9' would become a category.
def check_byte_order_mark(path: str, encoding: str, what: str, fixes: Fixes) -> None:
    """A UTF-16 file (Excel's "Unicode text") read as UTF-8 parses as one garbled column."""
    with open_bytes(path) as f:
        head = f.read(2)
    if head in UTF16_BOMS and "16" not in encoding:
        raise DataError(f'{what} "{path}" is UTF-16 text (it begins with a UTF-16 byte-order '
                        f'mark). Expected: {encoding} text: '
                        f"{fixes.encoding.format(enc=json.dumps('utf-16'))}, or save it as UTF-8.")


def not_text(e: Exception) -> bool:
    """Whether a reader's exception says that bytes did not decode."""
    return isinstance(e, UnicodeError) or any(w in str(e).lower() for w in ("utf8", "utf-8", "decode"))


def encoding_hint(path: str, encoding: str, fixes: Fixes, sample: bytes | None = None) -> str:
    """What was expected, what the bytes probably are (cp1252 where they decode as such, else
    latin-1) and what to set: how an error about undecodable text ends."""
    if sample is None:
        with open_bytes(path) as f:
            sample = f.read(1 << 16)
    guess = "cp1252" if _decodes(sample, "cp1252") else "latin-1"
    return (f"Expected: {encoding} text. The file may be {guess} (Excel on Windows writes cp1252): "
            f"{fixes.encoding.format(enc=json.dumps(guess))}, or save it as UTF-8.")


def _decodes(data: bytes, encoding: str) -> bool:
    try:
        data.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def check_text(df: pd.DataFrame, path: str, what: str, encoding: str, fixes: Fixes,
               first_row: int = 0) -> None:
    """DataError for a column pyarrow read as bytes: the first row whose bytes do not decode.
    `first_row`: the row in the file of the frame's first row (a streaming block's)."""
    for name in df.columns:
        col = df[name]
        if col.dtype != object:
            continue
        first = col.first_valid_index()
        if first is None or not isinstance(col.loc[first], bytes):
            continue
        at = next((i for i, v in enumerate(col) if isinstance(v, bytes) and not _decodes(v, "utf-8")), 0)
        value = col.iloc[at]
        raise DataError(f'{what} "{path}" column "{name}" holds text that is not {encoding}: row '
                        f"{first_row + at + 1} holds {value!r} ({ROWS_NOTE}). "
                        f"{encoding_hint(path, encoding, fixes, value)}")


def rows_where(col: pd.Series, mask) -> str:
    """The rows of the file where `mask` holds: "row 7" or "rows 7, 12, 30 and 4 more"."""
    hits = np.flatnonzero(np.asarray(mask))
    rows = np.sort(col.index.to_numpy()[hits])  # in file order, whatever order the split left
    labels = ", ".join(str(int(r) + 1) for r in rows[:5])
    more = f" and {len(hits) - 5} more" if len(hits) > 5 else ""
    return f"{'row' if len(hits) == 1 else 'rows'} {labels}{more}"


def missing(y: pd.Series) -> str:
    n = int(y.isna().sum())
    return (f"has missing values in {n} row{'s' if n > 1 else ''} "
            f"({rows_where(y, y.isna())}; {ROWS_NOTE})")


def check_values(df: pd.DataFrame, features: list[str], target: str, cats, what: str, path: str,
                 task: str = "auto") -> None:
    """The checks that do not depend on the split, on every row of a file: missing labels, and
    for each column not listed as categorical, stray text among numbers, numbers written with a
    decimal comma, and infinities."""
    y, where = df[target], f'{what} "{path}": '
    if y.isna().any():
        raise DataError(f'{what} "{path}": the target column "{target}" {missing(y)}. Expected: a '
                        "value in every row; drop or fill those rows.")
    if not _is_text(y):
        _finite(y, _numeric(y, where, TARGET), where, TARGET)
    elif task != "classification":
        check_decimal_comma(y, where, TARGET)
    for name in features:
        col = df[name]
        if isinstance(cats, list) and name in cats:
            continue
        if _is_text(col):
            check_decimal_comma(col, where)
            check_missing_marks(col, where)
        if _is_text(col) and pd.to_numeric(col, errors="coerce").notna().mean() < 0.9:
            continue  # text: a categorical column (its own checks come with the fit)
        _finite(col, _numeric(col, where), where)


# What people write in a cell for "no value", besides what is read as empty already
MISSING_MARKS = frozenset({"?", "-", "--", "---", ".", "na", "n.a.", "none", "missing", "unknown",
                           "nil", "\u2014"})


def check_missing_marks(col: pd.Series, where: str = "") -> None:
    """DataError for a text column of numbers whose every other value is a mark for a missing
    value ("?" in UCI's files): read as text, it would become categories. The numbers must be
    at least half of its cells with a value."""
    text = col.dropna()
    for values in (text.iloc[:1000], text) if len(text) > 1000 else (text,):
        values = values.astype(str)  # (a sample first: a column of words ends there)
        numbers = pd.to_numeric(values, errors="coerce")
        others = values[numbers.isna()]
        if not others.str.strip().str.lower().isin(MISSING_MARKS).all():
            return
    if not len(others) or numbers.notna().sum() < len(others):
        return
    found = sorted(set(others.str.strip()))
    marks, listed = ", ".join(map(repr, found)), ", ".join(map(json.dumps, found))
    raise DataError(f'{where}feature column "{col.name}" holds numbers and {marks}, in '
                    f"{rows_where(others, np.ones(len(others), bool))} ({ROWS_NOTE}), which makes "
                    "it text. Expected: numbers, with empty cells where a value is missing. If "
                    f'{marks} marks a missing value, list it in data.missing_values ("data": '
                    f'{{"missing_values": [{listed}]}}): such cells then take the training mean; '
                    "or fix those rows.")


COMMA_NUMBER, WHOLE_NUMBER = r"\s*[+-]?\d*,\d+\s*", r"\s*[+-]?\d+\s*"
THOUSANDS = r"\s*[+-]?\d{1,3}(?:,\d{3})+\s*"  # "1,000" or "12,500,000"


def check_decimal_comma(col: pd.Series, where: str = "", kind: str = FEATURE,
                        fixes: Fixes = JOB_FIXES) -> None:
    """DataError for a text column whose every value is a number written with a comma ("1,5",
    "1,000") or a whole number: read as text, it would become categories (or classes) rather
    than numbers. A sample is matched first, the whole column only if it is all such numbers."""
    text = col.dropna()
    for values in (text.iloc[:1000], text) if len(text) > 1000 else (text,):
        values = values.astype(str)
        comma = values.str.fullmatch(COMMA_NUMBER) | values.str.fullmatch(THOUSANDS)
        if not comma.any() or not (comma | values.str.fullmatch(WHOLE_NUMBER)).all():
            return
    first = int(comma.to_numpy().argmax())
    also = ", or list the column in categorical_columns to one-hot encode its values" \
        if kind == FEATURE else ""
    row = (f"row {int(values.index[first]) + 1} holds {values.iloc[first]!r} ({ROWS_NOTE})")
    if values[comma].str.fullmatch(THOUSANDS).all():  # "1,000" is a thousand or one
        raise DataError(f'{where}{kind} "{col.name}" holds numbers written with a comma, which '
                        f"would be read as text: {row}. Expected: plain numbers. If the comma "
                        "separates thousands, write the numbers without it; if it is the decimal "
                        f"mark, {fixes.decimal}{also}.")
    raise DataError(f'{where}{kind} "{col.name}" holds numbers written with a decimal comma, '
                    f"which would be read as text: {row}. Expected: numbers with a decimal point, "
                    f"or the file's decimal mark: {fixes.decimal}{also}.")


def default_features(columns, target: str, path: str) -> list[str]:
    """The features of a job without feature_columns: every column but the target and those
    without a header name (the index `DataFrame.to_csv` writes unless told not to), which
    pandas calls "Unnamed: 0" and pyarrow "". A row number is no feature."""
    features = [str(c) for c in columns
                if c != target and str(c).strip() and not re.fullmatch(r"Unnamed: \d+", str(c))]
    if not features:
        left = [str(c) for c in columns if c != target]
        raise DataError(f'train_data_path "{path}" has no feature columns: only the target "{target}"'
                        + (f" and {len(left)} column(s) without a header name" if left else "")
                        + ". Expected: a header naming the features, or feature_columns listing "
                          "them.")
    return features


def check_columns(df: pd.DataFrame, wanted: list[str], what: str, path: str,
                  fixes: Fixes = JOB_FIXES) -> None:
    """DataError unless `df` has every `wanted` column. `fixes`: what to do about wrong names,
    and about a wrong delimiter (a template taking the JSON-quoted separator as `sep`)."""
    missing = [c for c in wanted if c not in df.columns]
    if not missing:
        return
    spare = [str(x) for x in df.columns if x not in wanted]  # a column in use is no typo
    hints = []
    for c in missing:
        near = difflib.get_close_matches(c, spare, n=1, cutoff=0.6)
        if near:
            spare.remove(near[0])  # one column is one missing name's typo, not two
        hints.append(f'"{c}"' + (f' (did you mean "{near[0]}"?)' if near else ""))
    raise DataError(f"{what} \"{path}\" has no column {', '.join(hints)}. Columns found: "
                    f"{', '.join(map(str, df.columns[:30]))}. {_fix(df.columns, fixes)}")


def _fix(found, fixes: Fixes) -> str:
    """What to change: the column names, or, when the whole header came out as one column that
    holds a separator, the file's delimiter (a semicolon CSV from a spreadsheet, a TSV)."""
    seps = [s for s in ";\t|," if len(found) == 1 and s in str(found[0])]
    if seps:
        return (f"The header was read as one column but holds {seps[0]!r}: "
                f"{fixes.delimiter.format(sep=json.dumps(seps[0]))}.")
    return NO_HEADER if looks_like_data(found) else fixes.names


NO_HEADER = ("The first row looks like data, not a header (its names are mostly numbers): add a "
             "header row naming the columns.")


def looks_like_data(names) -> bool:
    """Whether a header row is mostly numbers: a file without one (UCI's iris.data, say)."""
    numbers = [c for c in map(str, names)
               if re.fullmatch(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*", c)]
    return len(numbers) * 2 > len(names)


def table_bytes(path: str) -> int | None:
    """What a table takes once read, at least: a CSV's size (its numbers take about as much
    as float64 as they do as text, often more), a Parquet file's uncompressed size from its
    footer. None for a compressed CSV or what cannot be told."""
    try:
        if Path(path).suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq
            meta = pq.ParquetFile(path).metadata
            return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if Path(path).suffix.lower() in (*COMPRESSED, ".zip", ".zst"):
            return None
        return Path(path).stat().st_size
    except Exception:  # unreadable here: read_table says why, in its own words
        return None


def check_fits_in_memory(spec: dict) -> None:
    """Data read whole that is larger than the memory the job may use can only end with the
    kernel killing the worker (and the daemon retrying it): said at once, with the setting made
    for such data."""
    from daemon.sysinfo import LIMIT, memory_excess
    sizes = {key: table_bytes(spec[key]) for key in ("train_data_path", "val_data_path") if spec[key]}
    dist = spec.get("distributed") or {}
    ranks = dist.get("processes", 1) if dist.get("strategy") == "ddp" else 1  # each reads it all
    excess = memory_excess(sum(size for size in sizes.values() if size), ranks,
                           (spec.get("limits") or {}).get("memory_mb"))
    if excess is None:
        return
    _, room, where = excess
    each = f", once in each of its {ranks} DDP ranks" if ranks > 1 and where != LIMIT else ""
    files = ", ".join(f'{key} "{spec[key]}" ({size / 2**30:.1f} GiB)' for key, size in sizes.items() if size)
    raise DataError(f"the data is larger than {where} ({room / 2**30:.1f} GiB): {files}, read "
                    f'whole{each}. Expected: data that fits, or "data": {{"streaming": true}}, which '
                    "trains from disk in chunks with bounded memory.")


def prepare(spec: dict, stream_folder: Path | None = None) -> Prepared:
    """Read, check, split, fit the preprocessing on the training rows, and encode both splits.
    Streaming jobs (`data.streaming`) keep their encoded rows on disk, in `stream_folder`."""
    if spec["data"].get("streaming"):
        from .stream import prepare_streaming
        if stream_folder is None:
            raise ValueError("a streaming job needs a folder for its encoded rows")
        return prepare_streaming(spec, stream_folder)
    opts = spec["data"]
    check_fits_in_memory(spec)
    train = read_table(spec["train_data_path"], opts, "train_data_path")
    target = spec["target_column"]
    # without feature_columns the features are the other columns: only the target can be missing
    check_columns(train, (spec["feature_columns"] or []) + [target], "train_data_path",
                  spec["train_data_path"])
    features = spec["feature_columns"] or default_features(train.columns, target, spec["train_data_path"])
    val = None
    if spec["val_data_path"]:
        val = read_table(spec["val_data_path"], opts, "val_data_path")
        check_columns(val, features + [target], "val_data_path", spec["val_data_path"])
    check_values(train, features, target, spec["categorical_columns"], "train_data_path",
                 spec["train_data_path"], spec["task"])
    if spec["val_data_path"]:
        check_values(val, features, target, spec["categorical_columns"], "val_data_path",
                     spec["val_data_path"], spec["task"])
    else:
        whole = train
        train, val = split(train, spec["validation_split"], spec["seed"])
        if val is not None and train[target].nunique() == 1 and whole[target].nunique() > 1 \
                and detect_task(whole[target], spec["task"]) == "classification":
            raise DataError(
                f'the training rows hold a single class ({_plain(train[target].iloc[0])!r}): '
                f'train_data_path "{spec["train_data_path"]}" has {len(whole)} rows and '
                f"{whole[target].nunique()} classes, and validation_split "
                f"{spec['validation_split']} took {len(val)} of the rows for validation. Expected: "
                "more rows of each class, a smaller validation_split, or a val_data_path file.")
    if len(train) == 0:
        raise DataError(f'train_data_path "{spec["train_data_path"]}" has no data rows. '
                        "Expected: a header and at least one row.")
    task = detect_task(train[target], spec["task"])
    recipe = fit(train, features, target, task, spec)
    x_train, y_train = encode(train, recipe), encode_target(train[target], recipe, "training")
    if val is not None and len(val):
        x_val, y_val = encode(val, recipe), encode_target(val[target], recipe, "validation")
    else:
        x_val = y_val = None
    notes = data_notes(recipe, len(train), len(val) if x_val is not None else 0,
                       empty_numbers(val, recipe) if x_val is not None else {},
                       unseen_categories(val, recipe) if x_val is not None else {})
    recipe["rows"] = {"train": len(train), "val": 0 if x_val is None else len(x_val)}
    recipe["read"] = read_options(opts)
    n_outputs = 1 if task == "regression" or len(recipe["target"]["classes"]) == 2 \
        else len(recipe["target"]["classes"])
    return Prepared(task, x_train, y_train, x_val, y_val, n_outputs, recipe, notes=notes)


def split(df: pd.DataFrame, share: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    if share <= 0 or len(df) < 2:
        return df, None
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(df))
    n_val = min(len(df) - 1, max(1, round(len(df) * share)))
    return df.iloc[order[n_val:]], df.iloc[order[:n_val]]  # each row keeps its place in the file


def detect_task(y: pd.Series, task: str) -> str:
    if y.isna().any():
        raise DataError(f'the target column "{y.name}" {missing(y)}. Expected: a value in every '
                        "row; drop or fill those rows.")
    if task != "auto":
        return task
    if not pd.api.types.is_numeric_dtype(y) or pd.api.types.is_bool_dtype(y):
        return "classification"
    values = y.to_numpy(dtype=float)
    whole = np.all(np.isfinite(values)) and np.all(values == np.round(values))
    return "classification" if whole and y.nunique() <= CLASSIFICATION_MAX_INT_CLASSES else "regression"


def fit(df: pd.DataFrame, features: list[str], target: str, task: str, spec: dict) -> dict:
    cats = spec["categorical_columns"]
    columns = [_fit_column(df[c], cats, spec["data"]["max_categories"]) for c in features]
    return {"version": PREPROCESS_VERSION, "features": columns,
            "input_dim": sum(1 if c["kind"] == "numeric" else len(c["categories"]) for c in columns),
            "target": _fit_target(df[target], task)}


def _fit_column(col: pd.Series, cats, max_categories: int) -> dict:
    name = str(col.name)
    categorical = (name in cats) if isinstance(cats, list) else _is_text(col)
    if categorical:
        return _fit_categorical(col, max_categories, explicit=isinstance(cats, list))
    values = _finite(col, _numeric(col))
    if np.isnan(values).all():
        raise DataError(f'feature column "{name}" has no values at all in the training rows. '
                        "Expected: numbers; drop the column from feature_columns.")
    mean = float(np.nanmean(values))
    std = float(np.nanstd(np.where(np.isnan(values), mean, values)))
    return {"name": name, "kind": "numeric", "mean": mean, "std": std if std > 0 else 1.0,
            "fill": mean, "missing_in_train": int(np.isnan(values).sum())}


def _is_text(col: pd.Series) -> bool:
    return not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col))


def _numeric(col: pd.Series, where: str = "", kind: str = FEATURE) -> np.ndarray:
    if pd.api.types.is_bool_dtype(col):
        return col.astype(float).to_numpy()
    if pd.api.types.is_numeric_dtype(col):
        return col.to_numpy(dtype=float, na_value=np.nan)
    converted = pd.to_numeric(col, errors="coerce")
    bad = (col.notna() & converted.isna()).to_numpy()
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        value = str(col.iloc[first])
        if value.strip() == str(col.name).strip():
            fix = REPEATED_HEADER
        elif re.fullmatch(COMMA_NUMBER, value):
            fix = ('it looks like a number with a decimal comma: read the file with the decimal mark '
                   '"," ("data": {"decimal": ","} in a job file, --decimal , for epochd predict), or '
                   "fix the value.")
        elif value.strip().lower() in MISSING_MARKS:
            fix = ("it looks like a mark for a missing value: leave such cells empty, or list it in "
                   "the job's data.missing_values (epochd predict reads cells as the job did).")
        elif kind == TARGET:
            fix = ('fix the value; or, if the column holds class labels, set "task": '
                   '"classification" (or "auto").')
        else:
            fix = "fix the value, or list the column in categorical_columns to one-hot encode it."
        raise DataError(f'{where}{kind} "{col.name}" is not numeric: {rows_where(col, bad)} '
                        f"{'holds' if bad.sum() == 1 else 'hold text, the first'} "
                        f"{col.iloc[first]!r} ({ROWS_NOTE}). Expected: numbers; {fix}")
    return converted.to_numpy(dtype=float, na_value=np.nan)


REPEATED_HEADER = ("it is the column's own name: the header line comes again there, as when "
                   "CSV files are joined with their headers (cat a.csv b.csv); remove the repeated "
                   "header lines.")


def _finite(col: pd.Series, values: np.ndarray, where: str = "", kind: str = FEATURE) -> np.ndarray:
    """`values` (the numbers of `col`), once none is infinite; missing ones (NaN) are allowed."""
    infinite = np.isinf(values)
    if infinite.any():
        raise DataError(f'{where}{kind} "{col.name}" holds infinite values '
                        f"({rows_where(col, infinite)}; {ROWS_NOTE}). Expected: finite numbers; "
                        "fix those rows, or leave the cells empty to fill them with the mean.")
    return values


def _fit_categorical(col: pd.Series, max_categories: int, explicit: bool) -> dict:
    text = _as_text(col)
    counts = text.value_counts()
    numeric_share = pd.to_numeric(col, errors="coerce").notna().mean() if not explicit else 0
    if numeric_share >= 0.9:  # mostly numbers: stray text is a data error, not a category
        _numeric(col)
    if len(counts) > max_categories and not explicit:
        examples = ", ".join(repr(v) for v in counts.index[:3])
        raise DataError(too_many_values(str(col.name), holds(col), f"{len(counts)}", examples,
                                        max_categories))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_categories]
    return {"name": str(col.name), "kind": "categorical", "categories": [k for k, _ in ranked]}


def holds(col: pd.Series) -> str:
    """What a column that is not numbers holds, in words: "dates", "times" or "text"."""
    if pd.api.types.is_datetime64_any_dtype(col):
        return "times"
    first = col.first_valid_index()
    return "dates" if first is not None and isinstance(col.loc[first], datetime.date) else "text"


def too_many_values(name: str, what: str, count: str, examples: str, max_categories: int) -> str:
    """The error for a feature column of text (or dates) with too many values to be categories."""
    fixes = ("epochd derives no numbers from dates: add number columns computed from it (days "
             "since a start, day of the week...) and drop it from feature_columns, or list it in "
             "categorical_columns (keeps the most frequent)" if what != "text" else
             "list it in categorical_columns (keeps the most frequent), raise data.max_categories, "
             "or drop it from feature_columns")
    return (f'feature column "{name}" is not numeric: it holds {what} with {count} distinct values '
            f"(e.g. {examples}). Expected: numbers, or a categorical column with at most "
            f"{max_categories} distinct values; {fixes}.")


def _as_text(col: pd.Series) -> pd.Series:
    return col.astype(object).where(col.notna(), MISSING).astype(str)


def text_target(name: str, example) -> DataError:
    return DataError(f'the target column "{name}" holds text (e.g. {example!r}), which cannot be '
                     'regressed, and "task" is "regression". Expected: numbers; or, for class '
                     'labels, "task": "classification" (or "auto").')


def check_class_values(name: str, classes: list, whole: bool) -> None:
    """Classification asked for on a column of measurements (numbers that are not whole, more of
    them than auto would take for classes) would make each value a class of its own."""
    if not whole and len(classes) > CLASSIFICATION_MAX_INT_CLASSES:
        shown = ", ".join(f"{v:.6g}" for v in classes[:3])
        raise DataError(f'the target column "{name}" holds {len(classes):,} distinct numbers that are '
                        f'not whole ({shown}, ...), and "task" is "classification": each value would '
                        'be a class of its own. Expected: "task": "regression" (or "auto"), or a '
                        "column of class labels.")


def _fit_target(y: pd.Series, task: str) -> dict:
    if task == "regression":
        numbers = pd.to_numeric(y, errors="coerce") if _is_text(y) else None
        if numbers is not None and numbers.notna().mean() < 0.9:  # labels; else strays, named below
            raise text_target(str(y.name), y[numbers.isna()].iloc[0])
        values = _numeric(y, kind=TARGET)
        std = float(np.std(values))
        return {"name": str(y.name), "task": task, "mean": float(np.mean(values)),
                "std": std if std > 0 else 1.0}
    classes = sorted(pd.unique(y).tolist(), key=lambda v: (str(type(v)), v))
    if pd.api.types.is_float_dtype(y):
        v = y.to_numpy(dtype=float)
        check_class_values(str(y.name), classes, bool(np.all(v == np.round(v))))
    if len(classes) < 2:
        raise DataError(f'the target column "{y.name}" has a single class ({classes[0]!r}) in the '
                        "training rows. Expected: at least two classes for classification; check "
                        'the data, or set "task": "regression".')
    return {"name": str(y.name), "task": task, "classes": [_plain(c) for c in classes]}


def _plain(value):
    """A numpy scalar as the JSON-able Python value it stands for."""
    return value.item() if hasattr(value, "item") else value


def encode(df: pd.DataFrame, recipe: dict, where: str = "") -> np.ndarray:
    """Features of `df` as the float32 matrix the model takes, by the recipe fitted on training.
    `where` begins error messages (the file, for one)."""
    blocks = []
    for c in recipe["features"]:
        if c["name"] not in df.columns:
            raise DataError(f'{where}the data has no column "{c["name"]}", which the model was '
                            "trained on.")
        if c["kind"] == "numeric":
            v = _finite(df[c["name"]], _numeric(df[c["name"]], where), where)
            blocks.append(((np.where(np.isnan(v), c["fill"], v) - c["mean"]) / c["std"])[:, None])
        else:
            text = _as_text(df[c["name"]]).to_numpy()
            blocks.append(text[:, None] == np.asarray(c["categories"], dtype=object)[None, :])
    return np.ascontiguousarray(np.hstack(blocks), dtype=np.float32)


def prediction_notes(df: pd.DataFrame, recipe: dict) -> list[str]:
    """What `epochd predict` tells its user of `df`, one line per feature: empty numbers (they
    take the training mean), and values the recipe has no category for (they encode as all
    zeros), with how many rows and up to three of the values."""
    notes = []
    unseen = unseen_categories(df, recipe)
    for c in recipe["features"]:
        if c["name"] not in df.columns:
            continue
        if c["kind"] == "numeric":
            empty = int(df[c["name"]].isna().sum())
            if empty:
                notes.append(f'column "{c["name"]}": {empty} of {len(df)} rows are empty; they '
                             f"take the training mean, {c['fill']:.6g}")
        elif c["name"] in unseen:
            notes.append(unseen_note(c, unseen[c["name"]], len(df)))
    return notes


def unseen_categories(df: pd.DataFrame, recipe: dict) -> dict[str, dict[str, int]]:
    """For each categorical feature of `recipe` in `df`: its values the recipe has no category
    for, with how many rows hold each (features without such values are left out)."""
    found = {}
    for c in recipe["features"]:
        if c["kind"] != "categorical" or c["name"] not in df.columns:
            continue
        text = _as_text(df[c["name"]])
        unseen = text[~text.isin(c["categories"])]
        if len(unseen):
            found[c["name"]] = {str(v): int(n) for v, n in unseen.value_counts().items()}
    return found


def add_unseen(total: dict[str, dict[str, int]], more: dict[str, dict[str, int]]) -> None:
    for name, values in more.items():
        counts = total.setdefault(name, {})
        for value, n in values.items():
            counts[value] = counts.get(value, 0) + n


def unseen_note(c: dict, values: dict[str, int], rows: int) -> str:
    """One line on the values of feature `c` that encode as none of its categories."""
    ranked = sorted(values, key=lambda v: (-values[v], v))
    shown = ", ".join(repr(v) for v in ranked[:3]) + (", ..." if len(ranked) > 3 else "")
    held = sum(values.values())
    return (f'column "{c["name"]}": {held} of {rows} rows hold {len(ranked)} '
            f"value{'s' if len(ranked) > 1 else ''} the model has no category for ({shown}); they "
            f"encode as none of its {len(c['categories'])} categories")


def empty_numbers(df: pd.DataFrame, recipe: dict) -> dict[str, int]:
    """For each numeric feature of `recipe` in `df` with empty cells: how many (they take the
    training mean)."""
    found = {}
    for c in recipe["features"]:
        if c["kind"] == "numeric" and c["name"] in df.columns:
            n = int(df[c["name"]].isna().sum())
            if n:
                found[c["name"]] = n
    return found


def fill_note(which: str, empty: dict[str, int], rows: int) -> str:
    """One line on the empty cells of numeric features in the `which` rows (five columns named,
    the rest counted)."""
    shown = ", ".join(f'"{name}" ({n} of {rows} rows)' for name, n in list(empty.items())[:5])
    if len(empty) > 5:
        shown += f", and {len(empty) - 5} more"
    many = len(empty) > 1
    return (f"{which} rows: numeric column{'s' if many else ''} {shown} ha{'ve' if many else 's'} "
            "empty cells; they take the training mean")


def data_notes(recipe: dict, train_rows: int, val_rows: int, val_empty: dict[str, int],
               val_unseen: dict[str, dict[str, int]]) -> list[str]:
    """`run_started`'s notes on the data, facts worth knowing that are not errors: empty numbers
    (in the training rows, then the validation rows), which take the training mean, and values
    of a categorical feature in the validation rows that the training rows do not hold (or hold
    too rarely to be among the `max_categories` kept), which are scored as if the feature were
    none of its categories. The run goes on either way."""
    train_empty = {c["name"]: c["missing_in_train"] for c in recipe["features"]
                   if c["kind"] == "numeric" and c.get("missing_in_train")}
    notes = [fill_note("training", train_empty, train_rows)] if train_empty else []
    if val_empty:
        notes.append(fill_note("validation", val_empty, val_rows))
    return notes + [f"validation rows, {unseen_note(c, val_unseen[c['name']], val_rows)}"
                    for c in recipe["features"] if c["name"] in val_unseen]


def encode_target(y: pd.Series, recipe: dict, which: str, where: str = "") -> np.ndarray:
    t = recipe["target"]
    if y.isna().any():
        raise DataError(f'{where}the target column "{y.name}" {missing(y)}. Expected: a value in '
                        "every row; drop or fill those rows.")
    if t["task"] == "regression":
        values = _finite(y, _numeric(y, where, TARGET), where, TARGET)
        return ((values - t["mean"]) / t["std"]).astype(np.float32)
    index = {c: i for i, c in enumerate(t["classes"])}
    codes = y.map(lambda v: index.get(_plain(v), -1)).to_numpy(dtype=np.int64)
    if (codes < 0).any():
        # (a whole number streamed as a float, 40.0, is the label 40 a user wrote)
        unseen = sorted({str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
                         for v, c in zip(y, codes) if c < 0})
        shown = f"{unseen[:5]}{' and more' if len(unseen) > 5 else ''}"
        raise DataError(f"{where}the {which} data has labels the training rows do not: {shown}, in "
                        f"{int((codes < 0).sum())} of the {len(codes)} rows checked. Expected: labels among "
                        f"{t['classes'][:10]}{' ...' if len(t['classes']) > 10 else ''}. The model "
                        "cannot score a class it has no output for: add training rows of those "
                        f"labels, or leave those rows out of the {which} data.")
    return codes


def decode(outputs: np.ndarray, recipe: dict) -> pd.DataFrame:
    """Model outputs (probabilities, or standardised values) as a table in the data's own terms."""
    t = recipe["target"]
    if t["task"] == "regression":
        return pd.DataFrame({"prediction": outputs.reshape(-1) * t["std"] + t["mean"]})
    classes = t["classes"]
    probs = outputs if outputs.shape[1] > 1 else np.hstack([1 - outputs, outputs])
    table = pd.DataFrame({"prediction": [classes[i] for i in probs.argmax(axis=1)]})
    for i, c in enumerate(classes):
        table[f"p_{c}"] = probs[:, i]
    return table


def regression_scale(recipe: dict) -> float:
    return recipe["target"]["std"] if recipe["target"]["task"] == "regression" else 1.0


def safe_float(value: float) -> float | None:
    """Metrics go into JSON: NaN and infinities become null rather than invalid JSON."""
    return value if value is not None and math.isfinite(value) else None
