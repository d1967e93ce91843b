"""The shared data pipeline on real files: task detection, encoding, scaling, splits, and the
data errors that fail a job (missing file, missing column, non-numeric feature, empty data,
a single class)."""
import re

import numpy as np
import pandas as pd
import pytest

from daemon import spec as specs
from daemon.errors import BadJobFile, DataError
from engines.data import decode, encode, epoch_order, prepare, split
from tests.conftest import WINE, classification_csv, regression_csv


def job(tmp_path, **raw) -> dict:
    raw = {"train_data_path": str(tmp_path / "train.csv"), "target_column": "target", **raw}
    return specs.normalise(specs.validate(raw), job_id="j", base_dir=tmp_path,
                           spool_root=tmp_path / "spool", allow_roots=[])


def write(tmp_path, table: pd.DataFrame, name="train.csv"):
    table.to_csv(tmp_path / name, index=False)
    return tmp_path / name


def test_wine_is_three_classes_with_text_labels(tmp_path):
    d = prepare(job(tmp_path, train_data_path=str(WINE), target_column="cultivar"))
    assert d.task == "classification" and d.n_outputs == 3
    assert d.preprocess["target"]["classes"] == ["cultivar_1", "cultivar_2", "cultivar_3"]
    assert d.x_train.dtype == np.float32 and d.x_train.shape[1] == 13
    assert len(d.x_train) + len(d.x_val) == 178 and len(d.x_val) == 36


def test_scaling_is_fitted_on_the_training_split_only(tmp_path):
    classification_csv(tmp_path / "train.csv", rows=200)
    d = prepare(job(tmp_path))
    assert np.allclose(d.x_train.mean(axis=0), 0, atol=1e-5)
    assert np.allclose(d.x_train.std(axis=0), 1, atol=1e-3)
    assert not np.allclose(d.x_val.mean(axis=0), 0, atol=1e-5)


def test_the_split_is_seeded(tmp_path):
    classification_csv(tmp_path / "train.csv", rows=100)
    a, b = prepare(job(tmp_path, seed=3)), prepare(job(tmp_path, seed=3))
    c = prepare(job(tmp_path, seed=4))
    assert np.array_equal(a.x_val, b.x_val) and not np.array_equal(a.x_val, c.x_val)


@pytest.mark.parametrize("target, task", [
    (["a", "b"] * 10, "classification"),
    ([True, False] * 10, "classification"),
    ([0, 1, 2, 3] * 5, "classification"),
    ([0.0, 1.0] * 10, "classification"),
    (list(range(20)), "classification"),
    (list(range(21)), "regression"),
    ([0.5, 1.5] * 10, "regression"),
])
def test_task_auto(tmp_path, target, task):
    write(tmp_path, pd.DataFrame({"x": np.arange(len(target), dtype=float), "target": target}))
    assert prepare(job(tmp_path, validation_split=0.0)).task == task


def test_regression_targets_are_standardised_and_decoded_back(tmp_path):
    regression_csv(tmp_path / "train.csv")
    d = prepare(job(tmp_path))
    assert d.task == "regression" and d.n_outputs == 1
    assert abs(d.y_train.mean()) < 1e-5
    decoded = decode(d.y_val.reshape(-1, 1), d.preprocess)["prediction"].to_numpy()
    raw = pd.read_csv(tmp_path / "train.csv")["target"].to_numpy()
    nearest = np.abs(decoded[:, None] - raw[None, :]).min(axis=1)
    assert nearest.max() < 1e-3  # each decoded value is a row's own target (float32 precision)


def test_text_features_are_one_hot_and_missing_numbers_filled(tmp_path):
    write(tmp_path, pd.DataFrame({
        "colour": ["red", "green", "blue", "red", None] * 8,
        "size": [1.0, 2.0, np.nan, 4.0, 5.0] * 8,
        "target": ["yes", "no"] * 20}))
    d = prepare(job(tmp_path, validation_split=0.0))
    kinds = {c["name"]: c for c in d.preprocess["features"]}
    assert kinds["colour"]["kind"] == "categorical"
    assert set(kinds["colour"]["categories"]) == {"red", "green", "blue", "<missing>"}
    assert kinds["size"]["missing_in_train"] == 8 and d.input_dim == 5
    assert not np.isnan(d.x_train).any()
    unseen = encode(pd.DataFrame({"colour": ["purple"], "size": [3.0]}), d.preprocess)
    assert unseen[0, :4].sum() == 0  # an unseen category encodes as all zeros


def test_parquet_reads_like_csv(tmp_path):
    table = pd.read_csv(classification_csv(tmp_path / "train.csv", rows=60))
    table.to_parquet(tmp_path / "train.parquet")
    a = prepare(job(tmp_path))
    b = prepare(job(tmp_path, train_data_path=str(tmp_path / "train.parquet")))
    assert np.allclose(a.x_train, b.x_train)


def test_a_separate_validation_file(tmp_path):
    classification_csv(tmp_path / "train.csv", rows=80)
    classification_csv(tmp_path / "val.csv", rows=20, seed=9)
    d = prepare(job(tmp_path, val_data_path=str(tmp_path / "val.csv")))
    assert len(d.x_train) == 80 and len(d.x_val) == 20


@pytest.mark.parametrize("table, raw, needle", [
    (None, {"train_data_path": "missing.csv"}, 'train_data_path "'),
    (pd.DataFrame({"feature1": [1.0, 2.0], "target": [0, 1]}), {"feature_columns": ["feature1", "featrue2"]},
     'no column "featrue2"'),
    (pd.DataFrame({"feature1": [1.0, 2.0], "Target": [0, 1]}), {}, 'no column "target" (did you mean "Target"?)'),
    (pd.DataFrame({"feature1": [f"{v:.3f}" for v in np.linspace(0, 1, 39)] + ["twelve"], "target": [0, 1] * 20}),
     {"validation_split": 0.0}, "feature column \"feature1\" is not numeric: row 40 holds 'twelve'"),
    (pd.DataFrame({"feature1": [f"id{i}" for i in range(80)], "target": [0, 1] * 40}), {},
     "holds text with 64 distinct values"),
    (pd.DataFrame({"day": pd.date_range("2024-01-01", periods=80).date, "target": [0, 1] * 40}), {},
     "holds dates with 64 distinct values (e.g. '2024-"),
    (pd.DataFrame({"day": pd.date_range("2024-01-01", periods=80).date, "target": [0, 1] * 40}), {},
     "Expected: numbers, or a categorical column with at most 50 distinct values; epochd derives no "
     "numbers from dates: add number columns computed from it"),
    (pd.DataFrame({"at": pd.date_range("2024-01-01", periods=80, freq="h"), "target": [0, 1] * 40}), {},
     "holds times with 64 distinct values"),
    (pd.DataFrame({"feature1": pd.Series([], dtype=float), "target": pd.Series([], dtype=int)}), {},
     "has no data rows"),
    (pd.DataFrame({"feature1": [1.0, 2.0, 3.0], "target": ["a", "a", "a"]}), {"validation_split": 0.0},
     "has a single class"),
    (pd.DataFrame({"feature1": [1.0, 2.0], "target": ["a", "b"]}), {},
     "has 2 rows and 2 classes, and validation_split 0.2 took 1 of the rows for validation"),
    (pd.DataFrame({"feature1": [1.0, 2.0, 3.0, 4.0], "target": [0, None, 1, 0]}), {},
     "has missing values in 1 row (row 2; rows count from 1 below the header)"),
    (pd.DataFrame({"feature1": [1.0, np.inf, 3.0, 4.0], "target": [0, 1, 1, 0]}), {}, "infinite values (row 2;"),
    (pd.DataFrame({"feature1": [1.0, 2.0, 3.0], "target": [1.5, -np.inf, 2.5]}), {},
     'target column "target" holds infinite values (row 2;'),
    (pd.DataFrame({"feature1": [np.nan] * 6, "target": [0, 1] * 3}), {}, "has no values at all"),
])
def test_data_problems_are_clear_errors(tmp_path, table, raw, needle):
    if table is not None:
        write(tmp_path, table)
    with pytest.raises(DataError) as err:
        prepare(job(tmp_path, **raw))
    assert needle in str(err.value)
    assert "Expected" in str(err.value) or "Columns found" in str(err.value)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("column, bad, needle", [
    ("target", None, 'the target column "target" has missing values in 1 row (row {row};'),
    ("feature3", np.inf, 'feature column "feature3" holds infinite values (row {row};'),
    ("feature2", "oops", "feature column \"feature2\" is not numeric: row {row} holds 'oops'"),
])
def test_bad_values_are_errors_in_validation_rows_too_and_name_the_files_row(
        tmp_path, streaming, column, bad, needle):
    """A bad value is an error whichever split its row lands in (a missing label in a
    validation row used to read as an unseen label "nan", an infinity there went into the
    validation loss, stray text there made the column look like text); the error names the
    row as the file numbers it, not its place in the shuffled split."""
    table = pd.read_csv(classification_csv(tmp_path / "clean.csv", rows=100)).astype(object)
    spec = job(tmp_path, **({"data": {"streaming": True}} if streaming else {}))
    if streaming:
        from engines.stream import _split_masks
        to_val = _split_masks(spec["validation_split"], spec["seed"], False)(len(table))
    else:
        to_val = np.isin(np.arange(len(table)), split(table, spec["validation_split"], spec["seed"])[1].index)
    row = int(np.flatnonzero(to_val)[-1])  # a validation row, late in the file
    table.loc[row, column] = bad
    write(tmp_path, table)
    with pytest.raises(DataError) as err:
        prepare(spec, tmp_path / "stream")
    assert needle.format(row=row + 1) in str(err.value)
    assert "rows count from 1 below the header" in str(err.value)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("sep", [";", "\t", "|"])
def test_a_file_with_another_delimiter_names_the_delimiter_setting(tmp_path, streaming, sep):
    """A semicolon CSV (a spreadsheet's export in many locales) or a TSV read with the default
    "," is one column named after the whole header: the error says which delimiter to set,
    and with it set the same file trains."""
    pd.read_csv(classification_csv(tmp_path / "clean.csv", rows=60)).to_csv(
        tmp_path / "train.csv", sep=sep, index=False)
    data = {"streaming": True} if streaming else {}
    with pytest.raises(DataError) as err:
        prepare(job(tmp_path, data=data), tmp_path / "stream")
    assert f'"data": {{"delimiter": "{sep}"}}'.replace("\t", "\\t") in str(err.value)
    assert "Columns found" in str(err.value)
    d = prepare(job(tmp_path, data={**data, "delimiter": sep}), tmp_path / "stream2")
    assert d.task == "classification" and d.preprocess["target"]["classes"] == [0, 1]


def test_a_missing_column_in_a_comma_file_asks_for_the_column_names(tmp_path):
    classification_csv(tmp_path / "train.csv", rows=60)
    with pytest.raises(DataError) as err:
        prepare(job(tmp_path, feature_columns=["feature1", "featur2"]))
    assert '"featur2" (did you mean "feature2"?)' in str(err.value)
    assert "Fix the job's column names." in str(err.value) and "delimiter" not in str(err.value)


def test_predict_data_with_an_infinity_is_an_error_naming_the_row(tmp_path):
    d = prepare(job(tmp_path, train_data_path=str(classification_csv(tmp_path / "train.csv"))))
    new = pd.read_csv(tmp_path / "train.csv").head(5)
    new.loc[3, "feature1"] = -np.inf
    with pytest.raises(DataError, match=r'column "feature1" holds infinite values \(row 4;'):
        encode(new, d.preprocess)


def test_unreadable_file_is_a_data_error(tmp_path):
    (tmp_path / "train.csv").write_bytes(b"target,x\n1,2\n3,4,5,6\n")
    with pytest.raises(DataError, match="could not read"):
        prepare(job(tmp_path))


def test_validation_labels_unseen_in_training(tmp_path):
    write(tmp_path, pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "target": ["a", "b", "a", "b"]}))
    write(tmp_path, pd.DataFrame({"x": [1.0, 2.0], "target": ["a", "c"]}), "val.csv")
    with pytest.raises(DataError, match=r"labels the training rows do not: \['c'\], in 1 of the 2 rows checked\. "
                       r".*add training rows of those labels, or leave those rows out"):
        prepare(job(tmp_path, val_data_path=str(tmp_path / "val.csv")))


def test_validation_values_without_a_category_are_noted_not_errors(tmp_path):
    """A text feature's value that the training rows lack encodes as none of its categories: the
    job trains and scores those validation rows on the other features, and says so in its notes
    (run_started), with the rows and the values, in memory and streaming alike."""
    write(tmp_path, pd.DataFrame({"colour": ["red", "green", "blue", "red"] * 10,
                                  "x": np.arange(40.0), "target": ["a", "b"] * 20}))
    write(tmp_path, pd.DataFrame({"colour": ["red", "teal", "purple", "purple", "green"] * 2,
                                  "x": np.arange(10.0), "target": ["a", "b"] * 5}), "val.csv")
    want = ['validation rows, column "colour": 6 of 10 rows hold 2 values the model has no '
            "category for ('purple', 'teal'); they encode as none of its 3 categories"]
    spec = job(tmp_path, val_data_path=str(tmp_path / "val.csv"))
    assert prepare(spec).notes == want
    streamed = job(tmp_path, val_data_path=str(tmp_path / "val.csv"), data={"streaming": True, "chunk_rows": 3})
    assert prepare(streamed, tmp_path / "cache").notes == want
    assert prepare(streamed, tmp_path / "cache").notes == want  # and from the cache, on a resume
    assert prepare(job(tmp_path)).notes == []  # the training file's own values all have one


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a = epoch_order(7, 3, 1000)
    assert np.array_equal(a, epoch_order(7, 3, 1000))
    assert not np.array_equal(a, epoch_order(7, 4, 1000))
    assert not np.array_equal(a, epoch_order(8, 3, 1000))
    assert sorted(a) == list(range(1000))
    assert np.array_equal(epoch_order(7, 3, 10, shuffle=False), np.arange(10))


def spreadsheet_export(tmp_path, encoding: str, rows: int = 40) -> pd.DataFrame:
    """A table whose text column holds accented values, written in `encoding` (as Excel on
    Windows writes cp1252, or "Unicode text" UTF-16)."""
    table = pd.DataFrame({"x": np.arange(rows, dtype=float),
                          "origin": ["Évora", "Lyon", "Zürich", "Porto"] * (rows // 4),
                          "target": ["yes", "no"] * (rows // 2)})
    table.to_csv(tmp_path / "train.csv", index=False, encoding=encoding)
    return table


@pytest.mark.parametrize("streaming", [False, True])
def test_text_in_another_encoding_is_an_error_naming_the_row_and_the_encoding_to_set(tmp_path, streaming):
    """A cp1252 CSV read as UTF-8 would have its accented column read as bytes (b'\\xc9vora'),
    categories no other file matches: the job fails naming the column, the first row and the
    data.encoding to set; with it, the values are the text they stand for."""
    table = spreadsheet_export(tmp_path, "cp1252")
    data = {"streaming": True, "chunk_rows": 16} if streaming else {}
    folder = (tmp_path / "s") if streaming else None
    with pytest.raises(DataError) as err:
        prepare(job(tmp_path, data=data), folder)
    assert str(err.value).startswith(
        f'train_data_path "{tmp_path / "train.csv"}" column "origin" holds text that is not utf-8: '
        "row 1 holds b'\\xc9vora' (rows count from 1 below the header). Expected: utf-8 text. The "
        'file may be cp1252 (Excel on Windows writes cp1252): set "data": {"encoding": "cp1252"} '
        "in the job file, or save it as UTF-8.")
    d = prepare(job(tmp_path, data={**data, "encoding": "cp1252"}), folder)
    origin = next(c for c in d.preprocess["features"] if c["name"] == "origin")
    assert sorted(origin["categories"]) == sorted(set(table["origin"]))


@pytest.mark.parametrize("streaming", [False, True])
def test_a_utf16_file_and_a_header_in_another_encoding_say_which_encoding_to_set(tmp_path, streaming):
    data = {"streaming": True, "chunk_rows": 16} if streaming else {}
    folder = (tmp_path / "s") if streaming else None
    spreadsheet_export(tmp_path, "utf-16")
    with pytest.raises(DataError, match=r'is UTF-16 text \(it begins with a UTF-16 byte-order mark\). '
                                        r'Expected: utf-8 text: set "data": \{"encoding": "utf-16"\}'):
        prepare(job(tmp_path, data=data), folder)
    d = prepare(job(tmp_path, data={**data, "encoding": "utf-16"}), folder)
    assert d.n_train + d.n_val == 40 and d.input_dim == 5  # x and the four places
    (tmp_path / "train.csv").write_bytes("año,target\n1,yes\n2,no\n3,yes\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"UnicodeDecodeError: .*Expected: utf-8 text\. The file may "
                                        r'be cp1252 .*set "data": \{"encoding": "cp1252"\}'):
        prepare(job(tmp_path, data=data, validation_split=0.0), folder)


def test_an_encoding_python_does_not_know_is_refused_at_submission():
    for name in ("utf-9", "base64"):
        with pytest.raises(BadJobFile, match=f"'{name}' is not a text encoding Python knows"):
            specs.validate({"train_data_path": "t.csv", "target_column": "y", "data": {"encoding": name}})
    assert specs.validate({"train_data_path": "t.csv", "target_column": "y",
                           "data": {"encoding": "latin-1"}}).data.encoding == "latin-1"


@pytest.mark.parametrize("streaming", [False, True])
def test_numbers_with_a_decimal_comma_are_an_error_unless_data_decimal_says_so(tmp_path, streaming):
    """Excel in much of Europe writes "1,5" in ";"-separated files. Read with the decimal point,
    such a column is text: a feature of few values would be one-hot encoded, a numeric target
    taken for classes. The job fails naming the row and data.decimal; with it, they are numbers."""
    data = {"delimiter": ";", **({"streaming": True, "chunk_rows": 16} if streaming else {})}
    folder = (tmp_path / "s") if streaming else None
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"x": np.round(rng.normal(size=40), 2), "n": np.arange(40),
                          "target": [0, 1] * 20})
    table.to_csv(tmp_path / "train.csv", sep=";", decimal=",", index=False)
    first = f"{table['x'][0]:.2f}".replace(".", ",")
    with pytest.raises(DataError) as err:
        prepare(job(tmp_path, data=data), folder)
    assert (f'feature column "x" holds numbers written with a decimal comma, which would be read as '
            f"text: row 1 holds '{first}' (rows count from 1 below the header). Expected: numbers "
            'with a decimal point, or the file\'s decimal mark: set "data": {"decimal": ","} in the '
            "job file, or list the column in categorical_columns") in str(err.value)
    d = prepare(job(tmp_path, data={**data, "decimal": ","}), folder)
    assert [c["kind"] for c in d.preprocess["features"]] == ["numeric"] * 2
    assert d.preprocess["read"] == {"delimiter": ";", "encoding": "utf-8", "decimal": ",", "missing_values": []}
    table["target"] = np.round(rng.normal(10, 2, 40), 1)  # a regression target, with commas
    table.to_csv(tmp_path / "train.csv", sep=";", decimal=",", index=False)
    with pytest.raises(DataError, match=r'target column "target" holds numbers written with a decimal comma'):
        prepare(job(tmp_path, data=data, feature_columns=["n"]), folder)
    assert prepare(job(tmp_path, data={**data, "decimal": ","}), folder).task == "regression"
    # the same file but for a comma that may as well separate thousands
    table.assign(x=[f"{v:,}" for v in rng.integers(1000, 9000, 40)]).to_csv(
        tmp_path / "train.csv", sep=";", index=False)
    with pytest.raises(DataError, match='holds numbers written with a comma, .*If the comma separates '
                                        "thousands, write the numbers without it; if it is the decimal mark"):
        prepare(job(tmp_path, data=data, task="regression"), folder)
    # text that holds a comma here and there is still text
    table.assign(x=["a,b", "red"] * 20).to_csv(tmp_path / "train.csv", sep=";", index=False)
    assert prepare(job(tmp_path, data=data), folder).preprocess["features"][0]["kind"] == "categorical"


@pytest.mark.parametrize("streaming", [False, True])
def test_without_feature_columns_an_unnamed_index_column_is_no_feature(tmp_path, streaming):
    """`DataFrame.to_csv` writes the index as a first column with an empty header: pandas reads
    it as "Unnamed: 0", pyarrow (streaming) as "". Without feature_columns it is left out, so a
    row number is never trained on; a file with nothing but the target says so."""
    data = {"streaming": True, "chunk_rows": 16} if streaming else {}
    folder = (tmp_path / "s") if streaming else None
    table = pd.DataFrame({"a": np.arange(40.0), "b": np.arange(40.0) % 3, "target": [0, 1] * 20})
    table.to_csv(tmp_path / "train.csv")  # with its index
    d = prepare(job(tmp_path, data=data), folder)
    assert [c["name"] for c in d.preprocess["features"]] == ["a", "b"] and d.input_dim == 2
    table[["target"]].to_csv(tmp_path / "train.csv")
    with pytest.raises(DataError, match=r'has no feature columns: only the target "target" and 1 '
                                        r"column\(s\) without a header name"):
        prepare(job(tmp_path, data=data), folder)
    table[["target"]].to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match=r'has no feature columns: only the target "target"\. Expected'):
        prepare(job(tmp_path, data=data), folder)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_header_that_names_a_column_twice_is_an_error(tmp_path, streaming):
    """pandas would rename the second "a" to "a.1" (and streaming failed on it): which one a
    job's "a" means is a guess, so the job fails naming both places. A column really called
    "a.1" is fine."""
    data = {"streaming": True, "chunk_rows": 16} if streaming else {}
    folder = (tmp_path / "s") if streaming else None
    rows = "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40))
    (tmp_path / "train.csv").write_text("a,a,target\n" + rows)
    for features in (None, ["a"]):
        with pytest.raises(DataError, match=r'names the column "a" twice in its header \(columns 1 and '
                                            r"2\)\. Expected: distinct column names; rename one\."):
            prepare(job(tmp_path, data=data, feature_columns=features), folder)
    (tmp_path / "train.csv").write_text("a,a.1,target\n" + rows)
    d = prepare(job(tmp_path, data=data), folder)
    assert [c["name"] for c in d.preprocess["features"]] == ["a", "a.1"]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_file_without_a_header_row_is_named_as_such(tmp_path, streaming):
    """UCI's files often have no header: the first row of numbers is taken for names. The error
    says so, rather than only that the job's columns are missing (or that "1.0" comes twice)."""
    data = {"streaming": True, "chunk_rows": 16} if streaming else {}
    folder = (tmp_path / "s") if streaming else None
    rows = WINE.read_text().splitlines()[1:]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r'has no column "cultivar" \(did you mean "cultivar_1"\?\)\. '
                                        r"Columns found: 14\.23, 1\.71, .* The first row looks like data, "
                                        r"not a header \(its names are mostly numbers\): add a header row"):
        prepare(job(tmp_path, data=data, target_column="cultivar"), folder)
    (tmp_path / "train.csv").write_text("1.0,1.0,0\n2.0,3.0,1\n")
    with pytest.raises(DataError, match=r"has no header row, it seems: its first row \(1\.0, 1\.0, 0\) "
                                        r"looks like data\. Expected: a header row naming the columns"):
        prepare(job(tmp_path, data=data), folder)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_header_repeated_inside_the_file_is_named_as_such(tmp_path, streaming):
    """`cat part1.csv part2.csv > train.csv` repeats the header line mid-file: the error says
    that the text it found is the column's own name, not only that the column is not numeric."""
    data = {"streaming": True, "chunk_rows": 16} if streaming else {}
    folder = (tmp_path / "s") if streaming else None
    part = "x,y,target\n" + "".join(f"{i * 0.5},{i % 7},{i % 2}\n" for i in range(30))
    (tmp_path / "train.csv").write_text(part + part)
    with pytest.raises(DataError) as err:
        prepare(job(tmp_path, data=data), folder)
    assert ('feature column "x" is not numeric: row 31 holds \'x\' (rows count from 1 below the header). '
            "Expected: numbers; it is the column's own name: the header line comes again there, as "
            "when CSV files are joined with their headers (cat a.csv b.csv); remove the repeated "
            "header lines.") in str(err.value)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_mark_for_missing_values_among_numbers_is_named_and_data_missing_values_reads_it(tmp_path, streaming):
    """UCI's adult data writes "?" for a missing value: a column of numbers and "?" would be
    text, one-hot encoded. The job fails naming the rows and data.missing_values; with it,
    those cells are empty numbers (filled with the training mean), or a "<missing>" category."""
    data = {"streaming": True, "chunk_rows": 16} if streaming else {}
    folder = (tmp_path / "s") if streaming else None
    (tmp_path / "train.csv").write_text("age,work,target\n" + "".join(
        f"{'?' if i % 7 == 3 else 20 + i},{'?' if i % 5 == 0 else ['Private', 'Self'][i % 2]},{i % 2}\n"
        for i in range(60)))
    with pytest.raises(DataError) as err:
        prepare(job(tmp_path, data=data), folder)
    assert ('feature column "age" holds numbers and \'?\', in rows 4, 11, 18, 25, 32 and 4 more (rows '
            "count from 1 below the header), which makes it text. Expected: numbers, with empty cells "
            "where a value is missing. If '?' marks a missing value, list it in data.missing_values "
            '("data": {"missing_values": ["?"]}): such cells then take the training mean; or fix '
            "those rows.") in str(err.value)
    d = prepare(job(tmp_path, data={**data, "missing_values": ["?"]}), folder)
    age, work = d.preprocess["features"]
    assert age["kind"] == "numeric" and age["missing_in_train"] > 0
    assert work["kind"] == "categorical" and sorted(work["categories"]) == ["<missing>", "Private", "Self"]
    assert d.preprocess["read"]["missing_values"] == ["?"]
    # a column of text with a "?" here and there is text, "?" one of its values
    (tmp_path / "train.csv").write_text("work,target\n" + "".join(
        f"{['?', 'Private', 'Self'][i % 3]},{i % 2}\n" for i in range(60)))
    assert "?" in prepare(job(tmp_path, data=data), folder).preprocess["features"][0]["categories"]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_task_the_target_does_not_fit_says_which_task_does(tmp_path, streaming):
    """"task" given by hand against the target: text labels with "regression", or measurements
    (numbers that are not whole, one per row) with "classification", where each value would be
    a class of its own. Each fails naming the task that fits; a stray text value in a numeric
    regression target is named with its row, in file order."""
    data = {"streaming": True, "chunk_rows": 16} if streaming else {}
    folder = (tmp_path / "s") if streaming else None
    rng = np.random.default_rng(3)
    x = rng.normal(size=60)
    write(tmp_path, pd.DataFrame({"x": x, "target": np.where(x > 0, "up", "down")}))
    with pytest.raises(DataError, match=r'the target column "target" holds text \(e.g. \'(up|down)\'\), '
                                        r'which cannot be regressed, and "task" is "regression"\. '
                                        r'Expected: numbers; or, for class labels, "task": '
                                        r'"classification" \(or "auto"\)'):
        prepare(job(tmp_path, data=data, task="regression"), folder)
    write(tmp_path, pd.DataFrame({"x": x, "target": 3 * x + 0.5}))
    with pytest.raises(DataError, match=r'holds \d+ distinct numbers that are not whole .*"task" is '
                                        r'"classification": each value would be a class of its own\. '
                                        r'Expected: "task": "regression"'):
        prepare(job(tmp_path, data=data, task="classification"), folder)
    # a few whole-number ratings as classes are fine, as are half-star ones
    for target in (rng.integers(1, 6, 60), rng.integers(1, 11, 60) / 2):
        write(tmp_path, pd.DataFrame({"x": x, "target": target}))
        assert prepare(job(tmp_path, data=data, task="classification"), folder).task == "classification"
    if not streaming:  # (streaming types a column by its first block: text there is a text target)
        target = (3 * x).astype(object)
        target[[40, 7, 55, 21]] = "oops"
        write(tmp_path, pd.DataFrame({"x": x, "target": target}))
        with pytest.raises(DataError, match=r'target column "target" is not numeric: rows 8, 22, 41, 56 '
                                            r"hold text.*fix the value; or, if the column holds class "
                                            r'labels, set "task": "classification"'):
            prepare(job(tmp_path, task="regression", validation_split=0.0), folder)
        with pytest.raises(DataError) as err:  # the training rows of a split, still in file order
            prepare(job(tmp_path, task="regression", validation_split=0.5), folder)
        rows = [int(r) for r in re.search(r"rows? ([\d, ]+) hold", str(err.value)).group(1).split(", ")]
        assert rows == sorted(rows) and len(rows) >= 2


def test_data_larger_than_the_memory_it_may_use_is_refused_before_it_is_read(tmp_path):
    """Read whole, such a file could only end with the kernel killing the worker; the error names
    streaming. The file is sparse: the check is made on its size, before a byte of it is read."""
    path = tmp_path / "train.csv"
    with open(path, "wb") as f:
        f.write(b"x,target\n")
        f.truncate(100 * 2**20)
    with pytest.raises(DataError) as err:
        prepare(job(tmp_path, limits={"memory_mb": 64}))
    assert (f"the data is larger than the job's limits.memory_mb (0.1 GiB): train_data_path \"{path}\" "
            '(0.1 GiB), read whole. Expected: data that fits, or "data": {"streaming": true}') in str(err.value)
    small = classification_csv(tmp_path / "small.csv")
    assert prepare(job(tmp_path, train_data_path=str(small), limits={"memory_mb": 64})).n_train > 0
    from engines.data import table_bytes
    pd.read_csv(small).to_parquet(tmp_path / "small.parquet")  # its footer's uncompressed size
    assert table_bytes(str(tmp_path / "small.parquet")) >= 8 * 3 * len(pd.read_csv(small))
    assert table_bytes(str(tmp_path / "train.csv.gz")) is None  # compressed: cannot be told
