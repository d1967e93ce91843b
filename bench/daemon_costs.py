"""What epochd's own machinery costs, apart from training: part of `make bench`, or alone.

- pickup: a job file renamed into `incoming/` to its `job_accepted` event, with the daemon idle;
  tiny jobs, one at a time, each once the last one's worker exited; alternately as `epochd
  submit` drops them (a rename within `incoming/`) and as `mv` from another folder does. Then a
  burst: 10 files moved in back to back, then 10 moved in 100 ms apart (each rejected for a
  misspelt key, so no worker runs), each from its rename to the daemon taking it.
- start-up: `job_accepted` to `run_started` (the worker has imported its framework, read and
  encoded the CSV, built the model: the next thing it does is the first step), against a bare
  `python -c "import torch; pandas.read_csv(..., engine='pyarrow')"` of the same file.
- replay of a 1,000,000-event log (20 progress events, an epoch_completed and a checkpoint_saved
  per epoch), four ways: every record read and folded (`fold(read_records)`: `epochd tail`
  reads every record from the start); the daemon's cold replay (`foldcache.replay` with no
  cache: every line's checksum and seq checked, superseded progress lines not parsed, the log
  cut into one piece per CPU checked side by side), and the same in one piece; and its warm replay
  (the cached fold of the prefix, checked by one CRC over its bytes, plus the 4 MiB of events
  past it that a worker's crash can leave at most, since it refreshes the cache that often).
- daemon footprint: RSS and CPU of `epochd serve` idle on a spool holding 1,000 finished jobs.

Usage: python bench/daemon_costs.py [--trials N]
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon import eventlog, foldcache  # noqa: E402
from daemon import spec as specs  # noqa: E402
from daemon.cli import drop_job  # noqa: E402
from daemon.eventlog import EventLog, encode, read_records  # noqa: E402
from daemon.events import (CheckpointSaved, Completed, EpochCompleted, JobAccepted, Progress,  # noqa: E402
                           RunStarted)
from daemon.replay import fold  # noqa: E402
from daemon.spool import Spool  # noqa: E402

TS = "2026-01-01T00:00:00.000Z"


def ts(record: dict) -> float:
    return datetime.fromisoformat(record["ts"]).timestamp()


def serve(spool: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "serve", "--spool", str(spool)],
                            cwd=ROOT, stderr=subprocess.DEVNULL)
    log = spool / "daemon.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if log.exists() and any(json.loads(l).get("event") == "started" and json.loads(l).get("pid") == proc.pid
                                for l in log.read_text().splitlines()):
            return proc
        time.sleep(0.05)
    raise TimeoutError("the daemon did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)


def wait_for(path: Path, predicate, timeout: float = 120.0, poll: float = 0.01) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = read_records(path) if path.exists() else []
        if records and predicate(records):
            return records
        time.sleep(poll)
    raise TimeoutError(str(path))


def pickup_and_startup(folder: Path, trials: int) -> tuple[list[float], list[float], list[float]]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 20))
    table = pd.DataFrame(x, columns=[f"f{i}" for i in range(20)])
    table["target"] = (x[:, 0] > 0).astype(int)
    csv = folder / "small.csv"
    table.to_csv(csv, index=False)
    spool = folder / "pickup-spool"
    Spool(spool).ensure()
    proc = serve(spool)
    pickups, startups = {"submit": [], "mv": []}, []
    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    try:
        for i in range(trials):
            job = {"train_data_path": str(csv), "target_column": "target", "epochs": 1}
            how = "mv" if i % 2 else "submit"
            if how == "mv":
                job_id = f"p{i}"
                (elsewhere / f"{job_id}.json").write_text(json.dumps(job))
                dropped = time.time()
                os.rename(elsewhere / f"{job_id}.json", Spool(spool).incoming / f"{job_id}.json")
            else:
                dropped = time.time()
                job_id = drop_job(Spool(spool), json.dumps(job).encode(), f"p{i}")
            records = wait_for(Spool(spool).events_path(job_id),
                               lambda r: r[-1]["type"] in ("completed", "failed"))
            accepted = next(r for r in records if r["type"] == "job_accepted")
            started = next(r for r in records if r["type"] == "run_started")
            pickups[how].append(ts(accepted) - dropped)
            startups.append(ts(started) - ts(accepted))
            worker = psutil.Process(started["pid"]) if psutil.pid_exists(started["pid"]) else None
            if worker is not None:  # the next trial starts on an idle machine
                try:
                    worker.wait(60)
                except psutil.NoSuchProcess:
                    pass
    finally:
        stop(proc)
    bare = []
    for _ in range(trials):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, pandas; "
                        f"pandas.read_csv({str(csv)!r}, engine='pyarrow')"], check=True)
        bare.append(time.perf_counter() - t)
    return pickups, startups, bare


def burst_pickups(folder: Path, n: int = 10, every: float = 0.0) -> list[float]:
    """Seconds from each file's rename into incoming/ to the daemon taking it, for `n` files
    moved in one after another, `every` seconds apart."""
    spool = folder / f"burst-spool-{every}"
    Spool(spool).ensure()
    elsewhere = folder / f"burst-elsewhere-{every}"
    elsewhere.mkdir()
    for i in range(n):
        (elsewhere / f"b{i}.json").write_text(json.dumps({"train_data_path": "x.csv", "target_column": "t",
                                                          "epoch": 1}))
    proc = serve(spool)
    renamed = {}
    try:
        for i in range(n):
            renamed[f"b{i}.json"] = time.time()
            os.rename(elsewhere / f"b{i}.json", Spool(spool).incoming / f"b{i}.json")
            time.sleep(every)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            taken = {e["file"]: datetime.fromisoformat(e["ts"]).timestamp()
                     for e in map(json.loads, (spool / "daemon.jsonl").read_text().splitlines())
                     if e["event"] == "rejected"}
            if len(taken) == n:
                break
            time.sleep(0.05)
    finally:
        stop(proc)
    return [taken[name] - at for name, at in renamed.items()]


def million_event_log(path: Path, n: int = 1_000_000) -> None:
    spec = specs.normalise(specs.validate(specs.example_job() | {"train_data_path": "/data/train.csv"}),
                           job_id="j", base_dir=Path("/"), spool_root=Path("/spool"), allow_roots=[])
    lines = [encode(1, TS, JobAccepted(job_id="j", source_file="j.json", spec=spec, spec_sha256="0" * 64,
                                       file_sha256="0" * 64, recovered=False)),
             encode(2, TS, RunStarted(attempt=1, pid=1, host="h", devices=["cpu"], framework="pytorch",
                                      versions={}, resumed_from=None, steps_per_epoch=6250,
                                      train_samples=200000, val_samples=2000, task="classification"))]
    epoch = 1
    while len(lines) < n:
        for k in range(20):
            lines.append(encode(len(lines) + 1, TS, Progress(
                epoch=epoch, step=300 * (k + 1), steps_per_epoch=6250, samples_per_sec=40000.0,
                loss=0.5, eta_seconds=100.0)))
        lines.append(encode(len(lines) + 1, TS, EpochCompleted(
            epoch=epoch, train_loss=0.5, train_accuracy=0.8, val_loss=0.5, val_accuracy=0.8,
            learning_rate=0.001, time_per_epoch=6.0, samples_per_sec=30000.0, memory_usage=300.0,
            gpu_utilization=None, gpu_memory=None, data_time=0.01, compute_time=6.0, eval_time=0.1,
            cpu_time=6.0, steps=6250)))
        lines.append(encode(len(lines) + 1, TS, CheckpointSaved(
            epoch=epoch, step=6250, steps_per_epoch=6250, path=f"checkpoints/e{epoch:05d}.pt",
            bytes=100000, sha256="0" * 64, epoch_seconds=0.0, compute_seconds=0.0,
            data_seconds=0.0, cpu_seconds=0.0)))
        epoch += 1
    path.write_bytes(b"".join(lines[:n]))


def replay_seconds(folder: Path, rounds: int = 5) -> dict:
    job = folder / "replay"
    job.mkdir()
    path = job / "events.jsonl"
    million_event_log(path)
    times = {"full": [], "cold": [], "one piece": [], "warm": []}
    cache = job / foldcache.CACHE_NAME
    in_pieces = eventlog.PARALLEL_MIN_BYTES
    pinned = os.sched_getaffinity(0)
    try:
        # `make bench` pins its driver to one CPU; the daemon replays with every CPU it has
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except OSError:  # a cpuset narrower than the machine: what it allows
        pass
    try:
        for i in range(rounds):
            if i < 3:
                t = time.perf_counter()
                full = fold(read_records(path))
                times["full"].append(time.perf_counter() - t)
            # the daemon's cold replay, and the same with the log's lines checked in one piece
            for key, threshold in (("cold", in_pieces), ("one piece", path.stat().st_size + 1)):
                eventlog.PARALLEL_MIN_BYTES = threshold
                cache.unlink(missing_ok=True)
                t = time.perf_counter()
                cold = foldcache.replay(path)
                times[key].append(time.perf_counter() - t)
                assert cold == full and cache.exists()
    finally:
        eventlog.PARALLEL_MIN_BYTES = in_pieces
        pieces = eventlog._parsers(path.stat().st_size)
        os.sched_setaffinity(0, pinned)
    with EventLog(path) as log:  # what a restart after a crash finds: the cache up to 4 MiB behind
        for i in range((4 << 20) // 210):  # progress lines are about 210 bytes
            log.append(Progress(epoch=1, step=i, steps_per_epoch=6250, samples_per_sec=1.0,
                                loss=0.5, eta_seconds=1.0))
    for _ in range(rounds):
        t = time.perf_counter()
        foldcache.replay(path)
        times["warm"].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()} | {"pieces": pieces}


def finished_spool(spool: Path, jobs: int = 1000) -> None:
    Spool(spool).ensure()
    spec = specs.normalise(specs.validate(specs.example_job() | {"train_data_path": "/data/train.csv"}),
                           job_id="j", base_dir=Path("/"), spool_root=spool, allow_roots=[])
    for i in range(jobs):
        job_id = f"done-{i:04d}"
        Spool(spool).job_dir(job_id).mkdir(parents=True)
        with EventLog(Spool(spool).events_path(job_id)) as log:
            log.append(JobAccepted(job_id=job_id, source_file=f"{job_id}.json", spec=spec,
                                   spec_sha256="0" * 64, file_sha256="0" * 64, recovered=False))
            log.append(RunStarted(attempt=1, pid=1, host="h", devices=["cpu"], framework="pytorch",
                                  versions={}, resumed_from=None, steps_per_epoch=10,
                                  train_samples=300, val_samples=60, task="classification"))
            for e in range(1, 4):
                log.append(EpochCompleted(
                    epoch=e, train_loss=0.5, train_accuracy=0.8, val_loss=0.5, val_accuracy=0.8,
                    learning_rate=0.001, time_per_epoch=0.1, samples_per_sec=3000.0,
                    memory_usage=300.0, gpu_utilization=None, gpu_memory=None, data_time=0.0,
                    compute_time=0.1, eval_time=0.0, cpu_time=0.1, steps=10))
            log.append(Completed(epochs_run=3, stop_reason="max_epochs", best=None,
                                 final_metrics={"train_loss": 0.5}, outputs={}))


def daemon_footprint(folder: Path, idle_seconds: float = 20.0) -> tuple[float, float]:
    """(RSS MB, CPU % of one core) of the daemon, idle after start-up on 1,000 finished jobs."""
    spool = folder / "big-spool"
    finished_spool(spool)
    proc = serve(spool)
    try:
        p = psutil.Process(proc.pid)
        time.sleep(2.0)  # start-up scan done; then measure a quiet stretch
        cpu0, t0 = sum(p.cpu_times()[:2]), time.monotonic()
        time.sleep(idle_seconds)
        cpu = (sum(p.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0) * 100
        rss = p.memory_info().rss / 2**20
    finally:
        stop(proc)
    return rss, cpu


def measure(trials: int = 10) -> dict:
    with tempfile.TemporaryDirectory(prefix="epochd-costs-") as tmp:
        folder = Path(tmp)
        pickups, startups, bare = pickup_and_startup(folder, trials)
        burst = {every: burst_pickups(folder, every=every) for every in (0.0, 0.1)}
        replay = replay_seconds(folder)
        rss, cpu = daemon_footprint(folder)
    return {"pickups": pickups, "burst": burst, "startups": startups, "bare": bare, "replay": replay,
            "rss_mb": rss, "idle_cpu": cpu}


def report(m: dict) -> None:
    med = statistics.median
    print("\n| daemon cost (goal) | measured |\n| --- | --- |")
    for how, label in (("submit", "`epochd submit` (rename within incoming/)"), ("mv", "`mv` from another folder")):
        p = m["pickups"][how]
        if p:
            print(f"| pickup, {label} to `job_accepted` (< 50 ms) | median {med(p) * 1000:.0f} ms, "
                  f"max {max(p) * 1000:.0f} ms ({len(p)} jobs) |")
    for every, b in m["burst"].items():
        spacing = "back to back" if not every else f"{every * 1000:.0f} ms apart"
        print(f"| pickup, {len(b)} files moved in {spacing}, rename to taken | median {med(b) * 1000:.0f} ms, "
              f"max {max(b) * 1000:.0f} ms |")
    print(f"| start-up, `job_accepted` to `run_started` (< 1.5x bare import torch + read CSV) | "
          f"median {med(m['startups']):.2f} s vs {med(m['bare']):.2f} s = {med(m['startups']) / med(m['bare']):.2f}x |")
    r = m["replay"]
    print(f"| replay of 1,000,000 events (< 2 s) | daemon: {r['warm']:.2f} s with its fold cache "
          f"(4 MiB behind, the most a crash leaves), {r['cold']:.2f} s cold (no cache: a log from "
          f"before the cache, or after an upgrade that changed the fold), its lines checked in "
          f"{r['pieces']} pieces side by side ({r['one piece']:.2f} s in one piece); every record "
          f"read and folded: {r['full']:.2f} s |")
    print(f"| daemon RSS with 1,000 finished jobs (< 80 MB) | {m['rss_mb']:.0f} MB |")
    print(f"| daemon idle CPU (< 1%) | {m['idle_cpu']:.2f}% of one core |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    report(measure(ap.parse_args().trials))
