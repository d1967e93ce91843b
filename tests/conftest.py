"""Shared fixtures: real spools in tmp_path, real daemon processes, tiny real datasets.

Nothing here mocks epochd: tests drop files into a spool, start `epochd serve` as a process,
send it real signals, and poll the event logs with a deadline.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from daemon.eventlog import read_records
from daemon.spec import example_job
from daemon.spool import Spool

REPO = Path(__file__).resolve().parent.parent
WINE = REPO / "examples" / "data" / "wine.csv"

# Each engine's final and best weights files under output_path.
WEIGHT_FILES = {"pytorch": ("model.safetensors", "best.safetensors"),
                "tensorflow": ("model.weights.h5", "best.weights.h5")}


@pytest.fixture(params=["pytorch", "tensorflow"])
def framework(request) -> str:
    """The engine contract suite runs each scenario once per engine."""
    if request.param == "tensorflow" and importlib.util.find_spec("tensorflow") is None:
        pytest.skip("TensorFlow is not installed (pip install -e '.[tensorflow-cpu]'; make test does)")
    return request.param


def model_weights(path: Path) -> dict[str, np.ndarray]:
    """Every array of a weights file: safetensors (PyTorch) or Keras' .weights.h5 (TensorFlow)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        return load_file(str(path))
    import h5py
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return arrays


def same_weights(a: dict, b: dict) -> bool:
    return bool(a) and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def events_of(spool: Path, job_id: str) -> list[dict]:
    return read_records(Spool(spool).events_path(job_id))


def daemon_records(spool: Path) -> list[dict]:
    """The daemon's own journal, daemon.jsonl, as records."""
    return [json.loads(line) for line in (Path(spool) / "daemon.jsonl").read_text().splitlines()]


def wait_for_event(spool: Path, job_id: str, type_: str, count: int = 1, timeout: float = 90.0) -> list[dict]:
    """The job's events once `count` events of `type_` are in its log."""
    def found():
        records = events_of(spool, job_id)
        return records if sum(r["type"] == type_ for r in records) >= count else None
    return wait_until(found, timeout, what=f"{count} x {type_} in job {job_id}")


def last(records: list[dict], type_: str) -> dict:
    """The newest record of `type_` (a log keeps growing after the one waited for)."""
    return next(r for r in reversed(records) if r["type"] == type_)


def wait_for_status(spool: Path, job_id: str, status: str, timeout: float = 90.0):
    from daemon.replay import fold

    def reached():
        if not Spool(spool).events_path(job_id).exists():
            rejected = Path(spool) / "rejected" / f"{job_id}.error.json"
            if rejected.exists():
                raise AssertionError(f"job {job_id} was rejected: {rejected.read_text()}")
            return None
        state = fold(events_of(spool, job_id))
        return state if state.status == status else None
    return wait_until(reached, timeout, what=f"job {job_id} to be {status}")


def drop_job(spool: Path, name: str, job: dict | bytes) -> Path:
    """Write a job file elsewhere, then rename it in, as users are told to."""
    data = job if isinstance(job, bytes) else json.dumps(job).encode()
    tmp = Path(spool) / "incoming" / f".{name}.tmp"
    tmp.write_bytes(data)
    dest = Path(spool) / "incoming" / name
    os.rename(tmp, dest)
    return dest


class DaemonProcess:
    """`epochd serve` in a subprocess, stopped (SIGTERM, then SIGKILL) at teardown."""

    def __init__(self, spool: Path, *args: str, env: dict | None = None, log_dir: Path | None = None):
        self.spool = Path(spool)
        self.stderr_path = Path(log_dir or self.spool.parent) / f"daemon-{time.monotonic_ns()}.err"
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "serve", "--spool", str(spool),
             "--rescan-seconds", "0.5", *args],
            stdout=subprocess.DEVNULL, stderr=self.stderr, env={**os.environ, **(env or {})},
            cwd=REPO)
        wait_until(self.ready, 30, what="the daemon to start")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.log()}")
        log = self.spool / "daemon.jsonl"
        if not log.exists():
            return False
        lines = [json.loads(l) for l in log.read_text().splitlines()]
        starts = [i for i, l in enumerate(lines) if l["event"] == "started" and l["pid"] == self.proc.pid]
        return bool(starts)

    def log(self) -> str:
        if not self.stderr.closed:
            self.stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.stderr.close()


@pytest.fixture
def spool(tmp_path) -> Path:
    root = tmp_path / "spool"
    Spool(root).ensure()
    return root


@pytest.fixture
def daemon_factory():
    started: list[DaemonProcess] = []

    def start(spool: Path, *args: str, env: dict | None = None) -> DaemonProcess:
        d = DaemonProcess(spool, *args, env=env)
        started.append(d)
        return d
    yield start
    for d in started:
        if d.proc.poll() is None:
            d.stop()
        kill_workers(d.spool)


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def kill_workers(spool: Path) -> None:
    """Leave no worker behind: they run in their own sessions."""
    out = subprocess.run(["pgrep", "-f", f"daemon.worker --spool {spool}"], capture_output=True, text=True)
    for pid in out.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def classification_csv(path: Path, rows: int = 240, features: int = 3, seed: int = 0,
                       classes: int = 2) -> Path:
    """A learnable table: the class is the sign pattern of two features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features))
    score = x[:, 0] + 0.5 * x[:, 1]
    y = np.digitize(score, np.quantile(score, np.linspace(0, 1, classes + 1)[1:-1]))
    table = pd.DataFrame(x, columns=[f"feature{i + 1}" for i in range(features)])
    table["target"] = y
    table.to_csv(path, index=False)
    return path


def regression_csv(path: Path, rows: int = 200, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    table = pd.DataFrame(x, columns=["feature1", "feature2", "feature3"])
    table["target"] = 50 + 10 * x[:, 0] - 4 * x[:, 1] + rng.normal(scale=0.5, size=rows)
    table.to_csv(path, index=False)
    return path


def seed_job(data: Path, output: Path | None = None, **overrides) -> dict:
    """The seed's request body with a real CSV and a small, fast run."""
    job = example_job() | {"epochs": 3, "train_data_path": str(data)}
    del job["output_path"]
    if output is not None:
        job["output_path"] = str(output)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    return job
