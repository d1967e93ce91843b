"""Peak memory against data size: the same job in memory and with `data.streaming`, through the
real daemon, on generated CSVs of 1x, 4x and 16x a base size. Part of `make bench`, or alone.

Each job trains the seed's MLP for one epoch (batch 256) with a 10% validation split. The
figures come from its `run_started` and `epoch_completed` events: the worker's peak RSS
(`memory_peak`, getrusage), the time from `job_accepted` to `run_started` (reading, fitting
and encoding the data; for streaming, building its cache) and the epoch's samples per second.

Usage: python bench/streaming.py [--rows 100000] [--factors 1,4,16]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import Daemon, submit, ts, wait  # noqa: E402

FEATURES = 20


def write_csv(path: Path, rows: int, block: int = 200_000) -> float:
    """`rows` rows of the bench's classification table, written a block at a time; MB on disk."""
    rng = np.random.default_rng(0)
    names = [f"f{i}" for i in range(FEATURES)] + ["target"]
    with pcsv.CSVWriter(str(path), pa.schema([(n, pa.float32()) for n in names[:-1]]
                                               + [("target", pa.int64())])) as writer:
        for a in range(0, rows, block):
            x = rng.normal(size=(min(block, rows - a), FEATURES)).astype(np.float32)
            y = (x[:, :5].sum(axis=1) + rng.normal(scale=0.5, size=len(x)) > 0).astype(np.int64)
            writer.write_table(pa.table([*(pa.array(x[:, i]) for i in range(FEATURES)), pa.array(y)],
                                        names=names))
    return path.stat().st_size / 2**20


def job(train: Path, streaming: bool) -> dict:
    return {"name": "stream-bench", "epochs": 1, "batch_size": 256, "validation_split": 0.1,
            "train_data_path": str(train), "target_column": "target",
            "algorithm_params": {"model_type": "mlp", "hidden_units": [128, 64, 32], "dropout_rate": 0.2},
            "data": {"streaming": streaming}, "checkpoint": {"every_epochs": 0}}


def measure(rows: int, factors: list[int]) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="epochd-stream-bench-") as tmp:
        folder = Path(tmp)
        spool = folder / "spool"
        daemon = Daemon(spool)
        try:
            for k in factors:
                train = folder / f"train-{k}x.csv"
                csv_mb = write_csv(train, rows * k)
                row = {"factor": k, "rows": rows * k, "csv_mb": csv_mb,
                       "array_mb": rows * k * (FEATURES + 1) * 4 / 2**20}
                for streaming in (False, True):
                    job_id = submit(spool, f"{k}x-{'stream' if streaming else 'mem'}", job(train, streaming))
                    records = wait(spool, job_id, lambda r: r[-1]["type"] in ("completed", "failed"),
                                   timeout=3600, poll=0.5)
                    accepted = next(r for r in records if r["type"] == "job_accepted")
                    started = next(r for r in records if r["type"] == "run_started")
                    epoch = next(r for r in records if r["type"] == "epoch_completed")
                    key = "stream" if streaming else "mem"
                    row[f"{key}_peak"] = epoch["memory_peak"]
                    row[f"{key}_prep"] = ts(started) - ts(accepted)
                    row[f"{key}_speed"] = epoch["samples_per_sec"]
                    print(f"{k}x {key}: peak {epoch['memory_peak']:.0f} MB, prep "
                          f"{row[f'{key}_prep']:.1f} s, {epoch['samples_per_sec']:,.0f} samples/s",
                          file=sys.stderr)
                train.unlink()
                results.append(row)
        finally:
            daemon.stop()
    return results


def report(results: list[dict]) -> None:
    print("\nPeak RSS of the worker against data size (one epoch, batch 256, 10% validation):\n")
    print("| data | rows | CSV (MB) | as float32 (MB) | in memory: peak RSS (MB) | streaming: peak RSS (MB) "
          "| in memory: start-up (s) | streaming: start-up (s) | in memory: samples/s | streaming: samples/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['factor']}x | {r['rows']:,} | {r['csv_mb']:,.0f} | {r['array_mb']:,.0f} | "
              f"{r['mem_peak']:,.0f} | {r['stream_peak']:,.0f} | {r['mem_prep']:.1f} | "
              f"{r['stream_prep']:.1f} | {r['mem_speed']:,.0f} | {r['stream_speed']:,.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000, help="rows of the 1x file")
    ap.add_argument("--factors", default="1,4,16")
    args = ap.parse_args()
    t = time.monotonic()
    report(measure(args.rows, [int(f) for f in args.factors.split(",")]))
    print(f"\n({time.monotonic() - t:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
