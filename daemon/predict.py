"""`epochd predict`: rebuild a trained model from its output folder alone and apply it.

The folder holds model.json (architecture, task, framework), preprocess.json (scaling,
encodings, label map) and the weights (safetensors): nothing is unpickled. With --best, best.json
(both descriptions of the best weights, written as soon as a run has them) when there is one.
"""
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import orjson
import pandas as pd

from .errors import DataError


def predict_table(folder: Path, data_path: str, best: bool = False,
                  read: dict | None = None, keep: tuple[str, ...] = ()) -> tuple[pd.DataFrame, list[str]]:
    """The predictions for the table at `data_path`, and notes on what in it the model was not
    trained on (empty numbers, categorical values it has no category for). `read`: how to read a CSV
    (delimiter, encoding, decimal); what it leaves out is read as the job read its own data.
    `keep`: columns of the table to put before the predictions (an id to join them on)."""
    from engines import load_engine
    from engines.data import (Fixes, check_columns, decode, encode, read_options, read_table,
                              prediction_notes)

    from .spec import tab_separated_name
    folder = Path(folder)
    try:
        described_by = "best.json" if best and (folder / "best.json").is_file() else "model.json"
        if described_by == "best.json":  # written with a run's first best weights
            both = orjson.loads((folder / "best.json").read_bytes())
            arch, recipe = both["model"], both["preprocess"]
        else:
            arch = orjson.loads((folder / "model.json").read_bytes())
            recipe = orjson.loads((folder / "preprocess.json").read_bytes())
    except FileNotFoundError as e:
        so_far = ("; --best uses the best weights so far" if (folder / "best.json").is_file()
                  else "")
        raise DataError(f"{folder} has no {Path(e.filename).name}. Expected: a model folder "
                        f"written by a completed epochd job (output_path){so_far}.") from None
    name = arch["best_weights"] if best else arch["weights"]
    weights = folder / name
    if not weights.is_file():
        raise DataError(f"{folder} has no {name}, the {'best' if best else 'final'} weights its "
                        f"{described_by} names. Expected: the folder as the job wrote it"
                        + ("." if best else "; --best uses the best weights, if any."))
    with native_noise_filtered():
        engine = load_engine(arch["framework"])
    predictor = engine.predictor(folder, arch, weights)
    names = [c["name"] for c in recipe["features"]]
    fixes = Fixes(f"Expected: every feature column the model was trained on "
                  f"({', '.join(names[:30])}); other columns are ignored.",
                  "pass --delimiter {sep}", "pass --encoding {enc}", "pass --decimal ,",
                  "name it .parquet")
    options = {"format": "auto", **read_options(recipe.get("read", {})), **(read or {})}
    if "delimiter" not in (read or {}) and tab_separated_name(str(data_path)):
        options["delimiter"] = "\t"  # as a job reads a .tsv file: its name says tabs
    table = read_table(data_path, options, "--data", fixes)
    check_columns(table, names, "--data", data_path, fixes)
    if keep:
        check_columns(table, list(keep), "--data", data_path, Fixes(
            "Expected: the columns --keep names, as the table's header spells them.", *fixes[1:]))
    predictions = decode(predictor(encode(table, recipe, f'--data "{data_path}": ')), recipe)
    if keep:
        clash = [c for c in keep if c in predictions.columns]
        kept = table[list(keep)].rename(columns={c: f"input_{c}" for c in clash}).reset_index(drop=True)
        predictions = pd.concat([kept, predictions.reset_index(drop=True)], axis=1)
    return predictions, prediction_notes(table, recipe)


# What TensorFlow's native libraries print as they load, whatever TF_CPP_MIN_LOG_LEVEL says
# (absl logs to the stderr file descriptor before it is initialised): noise in a command's output
NATIVE_NOISE = re.compile(rb"All log messages before absl::InitializeLog\(\) is called|"
                          rb"oneDNN custom operations are on")


@contextmanager
def native_noise_filtered():
    """Native code's writes to stderr are held while the block runs, then passed on without the
    lines NATIVE_NOISE matches (all of them if the block raises)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().splitlines(keepends=True)
            kept = b"".join(line for line in lines if failed or not NATIVE_NOISE.search(line))
            if kept:
                sys.stderr.write(kept.decode(errors="replace"))
                sys.stderr.flush()
