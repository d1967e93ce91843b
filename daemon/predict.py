"""`epochd predict`: rebuild a trained model from its output folder alone and apply it.

The folder holds model.json (architecture, task, framework), preprocess.json (scaling,
encodings, label map) and the weights (safetensors): nothing is unpickled.
"""
from pathlib import Path

import orjson
import pandas as pd

from .errors import DataError


def predict_table(folder: Path, data_path: str, best: bool = False) -> pd.DataFrame:
    from engines import load_engine
    from engines.data import decode, encode, read_table
    folder = Path(folder)
    try:
        arch = orjson.loads((folder / "model.json").read_bytes())
        recipe = orjson.loads((folder / "preprocess.json").read_bytes())
    except FileNotFoundError as e:
        raise DataError(f"{folder} has no {Path(e.filename).name}. Expected: a model folder "
                        "written by a completed epochd job (output_path).") from None
    name = arch["best_weights"] if best else arch["weights"]
    if name is None:  # written while the job runs: only its best weights so far are there
        raise DataError(f"{folder} holds no final model yet: job {arch.get('job_id')} has not "
                        "completed. Expected: a completed job's folder; --best uses the best "
                        "weights so far.")
    weights = folder / name
    if not weights.is_file():
        raise DataError(f"{folder} has no {name}, the {'best' if best else 'final'} weights its "
                        "model.json names. Expected: the folder as the job wrote it"
                        + ("." if best else "; --best uses the best weights, if any."))
    engine = load_engine(arch["framework"])
    predictor = engine.predictor(folder, arch, weights)
    table = read_table(data_path, {"format": "auto"}, "--data")
    return decode(predictor(encode(table, recipe, f'--data "{data_path}": ')), recipe)
