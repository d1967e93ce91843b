"""The bench peers' shared data step: the generated table, standardised once, as float32 arrays.
(epochd does its own, through engines/data.py, inside the daemon's timing.)"""
import numpy as np
import pandas as pd


def load(csv: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): features standardised with their mean and std, target as a (n, 1) column."""
    table = pd.read_csv(csv, engine="pyarrow")
    x = table.drop(columns=["target"]).to_numpy(np.float32)
    x = np.ascontiguousarray((x - x.mean(0)) / x.std(0))
    return x, table["target"].to_numpy(np.float32).reshape(-1, 1)
