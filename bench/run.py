"""`make bench`: epochd's epochs against the loops people write by hand, side by side: a
hand-optimised PyTorch loop for the PyTorch engine, Keras `model.fit` for the TensorFlow engine.

The machines this runs on are shared and noisy: absolute numbers drift, ratios measured in one
run hold. So everything is interleaved (hand loop, epochd, hand loop, epochd ...) and reported
as medians with ratios.

- Throughput: the seed's MLP (20 -> 128 -> 64 -> 32 -> 1, ReLU, dropout 0.2, Adam 1e-3) on
  200,000 generated rows x 20 features, batch 32 and 256. The hand loop times its training
  steps per epoch. epochd runs as the real daemon on a temp spool, and its epoch is timed
  all-in from the event log: from one `epoch_completed` to the next, minus evaluation, so
  progress events, checkpoints, the best-model file and every fsync count against it.
- TensorFlow: the same model and data through epochd's TensorFlow engine against Keras
  `model.fit` (bench/keras_fit.py) at steps_per_execution 1 (Keras' default) and 64 (several
  steps per graph call, the fastest setting we found for fit); the ratio is to the fastest.
- Pause latency: a control file dropped at a random moment mid-epoch, to the `paused` event.
- Checkpoint and event-append cost, against an epoch's time.
- The daemon's own costs (bench/daemon_costs.py): job pickup, worker start-up against a bare
  import of torch plus the CSV read, replay of a 1,000,000-event log, and the daemon's memory
  and idle CPU on a spool of 1,000 finished jobs.

Each round runs the hand loop, then epochd, on the same batch size; a round's ratio is the
median epochd epoch over the median hand epoch, and the table gives the median of those ratios
and their range (the range is the noise of the machine). A second ratio divides samples by
process CPU seconds instead of wall seconds: what the loop itself costs, blind to whatever else
the host runs meanwhile (and to fsync waits, which the wall-clock ratio does count).

- Every peer side by side (bench/lightning_fit.py needs the `bench` extra): the hand loop, the
  same with a DataLoader, Lightning with in-memory batches and with its defaults, Keras fit at
  steps_per_execution 1 and 64, and both epochd engines, with each process's peak RSS.

Usage: python bench/run.py [--rows N] [--rounds R] [--tf-rounds R] [--keras-spe 1,64]
                           [--peer-rounds R] [--peer-epochs E] [--epochs E] [--pauses P]
                           [--cost-trials N]
"""
import argparse
import json
import os
import platform
import random
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon import control  # noqa: E402
from daemon.cli import drop_job  # noqa: E402
from daemon.eventlog import LogFollower  # noqa: E402
from daemon.spool import Spool  # noqa: E402


def make_data(folder: Path, rows: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows + 2000, 20)).astype(np.float32)
    y = (x[:, :5].sum(axis=1) + rng.normal(scale=0.5, size=len(x)) > 0).astype(int)
    table = pd.DataFrame(x, columns=[f"f{i}" for i in range(20)])
    table["target"] = y
    table.iloc[:rows].to_csv(folder / "train.csv", index=False)
    table.iloc[rows:].to_csv(folder / "val.csv", index=False)
    return folder / "train.csv", folder / "val.csv"


# On a machine with 2+ CPUs the measured process (the hand loop, or the daemon with its worker)
# runs alone on the last CPU and this driver on the first: the comparison is then not at the
# mercy of which core the scheduler picked or what shares it.
MEASURED_CPU = (os.cpu_count() or 1) - 1


def pin_measured() -> None:
    if MEASURED_CPU > 0:
        os.sched_setaffinity(0, {MEASURED_CPU})


def peer_run(script: str, train: Path, batch: int, epochs: int, *extra: str) -> tuple[list[float], list[float], float]:
    """A peer loop (bench/handwritten.py, keras_fit.py, lightning_fit.py) in its own process:
    samples per wall second and per CPU second of each steady-state epoch (the first warms up),
    and the process's peak RSS in MB."""
    args = [sys.executable, str(ROOT / "bench" / script), str(train), str(batch), str(epochs), *extra]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            preexec_fn=pin_measured)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # its own rusage, peak RSS included
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, args)
    rows = [json.loads(l) for l in out.splitlines()][1:]
    return ([r["samples"] / r["seconds"] for r in rows], [r["samples"] / r["cpu_seconds"] for r in rows],
            usage.ru_maxrss / 1024)


def peer_loop(script: str, train: Path, batch: int, epochs: int, *extra: str) -> tuple[list[float], list[float]]:
    wall, cpu, _ = peer_run(script, train, batch, epochs, *extra)
    return wall, cpu


def hand_loop(train: Path, batch: int, epochs: int) -> tuple[list[float], list[float]]:
    return peer_loop("handwritten.py", train, batch, epochs)


class Daemon:
    def __init__(self, spool: Path, max_jobs: int = 1, extra: tuple[str, ...] = ()):
        self.spool = spool
        Spool(spool).ensure()
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "serve", "--spool", str(spool),
                                      "--max-jobs", str(max_jobs), *extra], cwd=ROOT, stderr=subprocess.DEVNULL,
                                     preexec_fn=pin_measured)  # its workers inherit the CPU

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def submit(spool: Path, name: str, job: dict) -> str:
    """The job id it gets: `epochd submit`'s own safe drop (write, then link in)."""
    return drop_job(Spool(spool), json.dumps(job).encode(), name)


def wait(spool: Path, job_id: str, predicate, timeout: float = 900.0, poll: float = 1.0) -> list[dict]:
    """Follow the job's log (reading only what is new) until `predicate(records)` holds. While
    epochs are timed the poll is slow: on a 2-vCPU machine a busy poller slows the worker."""
    deadline = time.monotonic() + timeout
    follower, records = LogFollower(Spool(spool).events_path(job_id)), []
    while time.monotonic() < deadline:
        records += follower.poll()
        if records and predicate(records):
            return records
        if records and records[-1]["type"] == "failed":
            raise RuntimeError(records[-1]["message"])
        time.sleep(poll)  # polling the event log
    raise TimeoutError(f"job {job_id}")


def ts(record: dict) -> float:
    return datetime.fromisoformat(record["ts"]).timestamp()


def seed_job(train: Path, val: Path, batch: int, epochs: int, framework: str = "pytorch") -> dict:
    return {"name": "bench", "framework": framework, "epochs": epochs, "batch_size": batch, "learning_rate": 0.001,
            "train_data_path": str(train), "val_data_path": str(val), "target_column": "target",
            "algorithm_params": {"model_type": "mlp", "hidden_units": [128, 64, 32], "dropout_rate": 0.2}}


def epochd_run(spool: Path, train: Path, val: Path, batch: int, epochs: int, tag: str,
               framework: str = "pytorch") -> tuple[list[float], list[float], float]:
    """epochd's steady-state epochs (wall and CPU samples/s) and its worker's largest RSS at an
    epoch's end, in MB."""
    job_id = submit(spool, tag, seed_job(train, val, batch, epochs, framework))
    records = wait(spool, job_id, lambda r: r[-1]["type"] in ("completed", "failed"))
    done = [r for r in records if r["type"] == "epoch_completed"]
    samples = next(r for r in records if r["type"] == "run_started")["train_samples"]
    # all-in: from the end of one epoch to the end of the next, evaluation excluded
    wall = [samples / (ts(b) - ts(a) - b["eval_time"]) for a, b in zip(done, done[1:])]
    return wall, [samples / r["cpu_time"] for r in done[1:]], max(r["memory_usage"] for r in done)


def epochd_loop(spool: Path, train: Path, val: Path, batch: int, epochs: int, tag: str,
                framework: str = "pytorch") -> tuple[list[float], list[float]]:
    wall, cpu, _ = epochd_run(spool, train, val, batch, epochs, tag, framework)
    return wall, cpu


# Every loop of the peers table: (label, script and its arguments) or an epochd engine.
PEERS = [("hand-optimised PyTorch", ("handwritten.py",)),
         ("PyTorch with DataLoader", ("handwritten.py", "dataloader")),
         ("Lightning, in-memory batches", ("lightning_fit.py", "inmemory")),
         ("Lightning defaults", ("lightning_fit.py", "defaults")),
         ("Keras fit defaults", ("keras_fit.py", "1")),
         ("Keras fit, steps_per_execution=64", ("keras_fit.py", "64"))]
ENGINES = [("epochd, PyTorch engine (all-in)", "pytorch"), ("epochd, TensorFlow engine (all-in)", "tensorflow")]


def peers_rounds(spool: Path, train: Path, val: Path, args) -> dict:
    """Every peer and both engines, one after another per batch size: (label, batch) -> lists
    of per-round median samples/s and peak RSS."""
    results: dict = {}
    for r in range(args.peer_rounds):
        for batch in (32, 256):
            for label, (script, *extra) in PEERS:
                wall, _, rss = peer_run(script, train, batch, args.peer_epochs, *extra)
                results.setdefault((label, batch), ([], []))[0].append(statistics.median(wall))
                results[(label, batch)][1].append(rss)
            for label, framework in ENGINES:
                wall, _, rss = epochd_run(spool, train, val, batch, args.peer_epochs,
                                          f"peers-{framework}-b{batch}-r{r}", framework)
                results.setdefault((label, batch), ([], []))[0].append(statistics.median(wall))
                results[(label, batch)][1].append(rss)
            print(f"peers round {r + 1}/{args.peer_rounds}, batch {batch} done", file=sys.stderr)
    return results


def report_peers(args, results: dict) -> None:
    if not args.peer_rounds:
        return
    print(f"\nEvery peer and both engines ({args.peer_rounds} round(s), {args.peer_epochs - 1} timed "
          "epoch(s) each, one after another on the same core; ratio: epochd's faster engine over "
          "the loop)\n")
    print("| loop | batch 32 (samples/s) | epochd / it | batch 256 (samples/s) | epochd / it | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    speed = {key: statistics.median(v[0]) for key, v in results.items()}
    best = {b: max(speed[(label, b)] for label, _ in ENGINES) for b in (32, 256)}
    for label in [p[0] for p in PEERS] + [e[0] for e in ENGINES]:
        cells = []
        for b in (32, 256):
            cells += [f"{speed[(label, b)]:,.0f}", f"{best[b] / speed[(label, b)]:.2f}x"]
        rss = max(max(results[(label, b)][1]) for b in (32, 256))
        print(f"| {label} | {' | '.join(cells)} | {rss:,.0f} |")
    for b in (32, 256):
        fastest = max((speed[(p[0], b)], p[0]) for p in PEERS)
        for label, _ in ENGINES:
            print(f"\nbatch {b}: {label} / fastest peer ({fastest[1]}) = "
                  f"{speed[(label, b)] / fastest[0]:.2f}x", end="")
    print()


def pause_latencies(spool: Path, train: Path, val: Path, trials: int) -> list[float]:
    job_id = submit(spool, "pauses", seed_job(train, val, 32, 1000))
    latencies = []
    for i in range(trials):
        wait(spool, job_id, lambda r: sum(x["type"] == "run_started" for x in r) == i + 1
             and r[-1]["type"] == "progress", poll=0.02)
        time.sleep(random.uniform(0.0, 1.0))  # a random moment mid-epoch, the point of the trial
        dropped = time.time()
        control.drop(Spool(spool), job_id, "pause")
        records = wait(spool, job_id, lambda r: sum(x["type"] == "paused" for x in r) == i + 1, poll=0.02)
        latencies.append(ts([r for r in records if r["type"] == "paused"][-1]) - dropped)
        control.drop(Spool(spool), job_id, "resume")
    control.drop(Spool(spool), job_id, "cancel")
    return latencies


def checkpoint_and_append_costs(train: Path, val: Path, folder: Path) -> tuple[float, float]:
    from daemon import spec as specs
    from daemon.eventlog import EventLog
    from daemon.events import EpochCompleted
    from daemon.fsutil import atomic_write_with, sha256_file
    from engines import load_engine
    from engines.data import prepare
    spec = specs.normalise(specs.validate(seed_job(train, val, 32, 1)), job_id="b", base_dir=folder,
                           spool_root=folder / "spool", allow_roots=[])
    engine = load_engine("pytorch")(spec, prepare(spec), 1)
    ckpt = []
    for _ in range(20):
        t = time.perf_counter()
        atomic_write_with(folder / "c.pt", engine.save_checkpoint)
        sha256_file(folder / "c.pt")
        ckpt.append(time.perf_counter() - t)
    event = EpochCompleted(epoch=1, train_loss=0.5, train_accuracy=0.8, val_loss=0.5, val_accuracy=0.8,
                           learning_rate=0.001, time_per_epoch=6.0, samples_per_sec=30000.0,
                           memory_usage=300.0, gpu_utilization=None, gpu_memory=None, data_time=0.01,
                           compute_time=6.0, eval_time=0.1, cpu_time=6.0, steps=6250)
    appends = []
    with EventLog(folder / "events.jsonl") as log:
        for _ in range(200):
            t = time.perf_counter()
            log.append(event)
            appends.append(time.perf_counter() - t)
    return statistics.median(ckpt), statistics.median(appends)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5, help="PyTorch rounds")
    ap.add_argument("--tf-rounds", type=int, default=3, help="TensorFlow rounds (0: skip)")
    ap.add_argument("--keras-spe", default="1,64",
                    help="steps_per_execution values Keras fit runs with, comma-separated")
    ap.add_argument("--epochs", type=int, default=4, help="per run; the first is warm-up")
    ap.add_argument("--peer-rounds", type=int, default=3,
                    help="rounds of the every-peer table (Lightning needs the bench extra; 0: skip)")
    ap.add_argument("--peer-epochs", type=int, default=3, help="per peer run; the first is warm-up")
    ap.add_argument("--pauses", type=int, default=8)
    ap.add_argument("--cost-trials", type=int, default=10,
                    help="jobs for the pickup and start-up timings (0: skip bench/daemon_costs.py)")
    ap.add_argument("--stream-rows", type=int, default=200_000,
                    help="rows of the 1x file of bench/streaming.py's 1x/4x/16x (0: skip)")
    args = ap.parse_args()
    spes = [int(v) for v in args.keras_spe.split(",")]
    if MEASURED_CPU > 0:
        os.sched_setaffinity(0, set(range(MEASURED_CPU)))
    with tempfile.TemporaryDirectory(prefix="epochd-bench-") as tmp:
        folder = Path(tmp)
        train, val = make_data(folder, args.rows)
        spool = folder / "spool"
        daemon = Daemon(spool)
        try:
            results = {b: {k: [] for k in ("hand", "epochd", "pairs", "cpu_pairs")} for b in (32, 256)}
            for r in range(args.rounds):
                for batch in (32, 256):
                    hand, hand_cpu = hand_loop(train, batch, args.epochs)
                    ours, ours_cpu = epochd_loop(spool, train, val, batch, args.epochs, f"b{batch}-r{r}")
                    results[batch]["hand"] += hand
                    results[batch]["epochd"] += ours
                    results[batch]["pairs"].append(statistics.median(ours) / statistics.median(hand))
                    results[batch]["cpu_pairs"].append(statistics.median(ours_cpu) / statistics.median(hand_cpu))
                    print(f"round {r + 1}/{args.rounds}, batch {batch}: hand {statistics.median(hand):,.0f}, "
                          f"epochd {statistics.median(ours):,.0f} samples/s", file=sys.stderr)
            tf_results = tensorflow_rounds(spool, train, val, args, spes)
            peer_results = peers_rounds(spool, train, val, args)
            pauses = pause_latencies(spool, train, val, args.pauses)
        finally:
            daemon.stop()
        ckpt_s, append_s = checkpoint_and_append_costs(train, val, folder)
    report(args, results, pauses, ckpt_s, append_s)
    report_tensorflow(args, spes, tf_results)
    report_peers(args, peer_results)
    sys.path.insert(0, str(ROOT / "bench"))
    if args.cost_trials:
        import daemon_costs
        daemon_costs.report(daemon_costs.measure(args.cost_trials))
    if args.stream_rows:
        import streaming
        streaming.report(streaming.measure(args.stream_rows, [1, 4, 16]))


def tensorflow_rounds(spool: Path, train: Path, val: Path, args, spes: list[int]) -> dict:
    """Keras fit at each steps_per_execution, then epochd's TensorFlow engine, interleaved; a
    round's ratio is epochd over the fastest Keras configuration of that round."""
    results = {b: {"keras": {s: [] for s in spes}, "epochd": [], "pairs": [], "cpu_pairs": []}
               for b in (32, 256)}
    for r in range(args.tf_rounds):
        for batch in (32, 256):
            res = results[batch]
            best = best_cpu = 0.0
            for spe in spes:
                keras_wall, keras_cpu = peer_loop("keras_fit.py", train, batch, args.epochs, str(spe))
                res["keras"][spe] += keras_wall
                best = max(best, statistics.median(keras_wall))
                best_cpu = max(best_cpu, statistics.median(keras_cpu))
            ours, ours_cpu = epochd_loop(spool, train, val, batch, args.epochs, f"tf-b{batch}-r{r}",
                                         "tensorflow")
            res["epochd"] += ours
            res["pairs"].append(statistics.median(ours) / best)
            res["cpu_pairs"].append(statistics.median(ours_cpu) / best_cpu)
            print(f"TF round {r + 1}/{args.tf_rounds}, batch {batch}: fastest Keras fit {best:,.0f}, "
                  f"epochd {statistics.median(ours):,.0f} samples/s", file=sys.stderr)
    return results


def report(args, results, pauses, ckpt_s, append_s) -> None:
    if not args.rounds:  # the costs below are shares of a batch-32 epoch these rounds time
        return
    print(f"\n`make bench` ({args.rows:,} rows x 20 features, seed MLP 128-64-32, {args.rounds} rounds "
          f"interleaved, {args.epochs - 1} timed epochs per run, measured processes on CPU {MEASURED_CPU}; {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"torch {__import__('torch').__version__})\n")
    print("| batch | hand-optimised PyTorch (samples/s) | epochd all-in (samples/s) | ratio, median of rounds "
          "| range | ratio per CPU second | range |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    epoch32 = None
    for batch, r in results.items():
        hand, ours = statistics.median(r["hand"]), statistics.median(r["epochd"])
        epoch32 = epoch32 or args.rows / ours
        print(f"| {batch} | {hand:,.0f} | {ours:,.0f} | {statistics.median(r['pairs']):.2f}x | "
              f"{min(r['pairs']):.2f}-{max(r['pairs']):.2f} | {statistics.median(r['cpu_pairs']):.2f}x | "
              f"{min(r['cpu_pairs']):.2f}-{max(r['cpu_pairs']):.2f} |")
    print("\n| daemon cost | value |\n| --- | --- |")
    if pauses:
        pauses = sorted(pauses)
        p99 = pauses[min(len(pauses) - 1, int(round(0.99 * (len(pauses) - 1))))]
        print(f"| pause latency, control file to `paused`, mid-epoch ({len(pauses)} trials) | "
              f"median {statistics.median(pauses) * 1000:.0f} ms, max {p99 * 1000:.0f} ms |")
    print(f"| checkpoint (write, fsync, rename, sha256) | {ckpt_s * 1000:.1f} ms = "
          f"{ckpt_s / epoch32 * 100:.2f}% of a batch-32 epoch |")
    print(f"| event append + fsync | {append_s * 1e6:.0f} us; ~{epoch32 + 3:.0f} events per batch-32 epoch "
          f"= {(epoch32 + 3) * append_s / epoch32 * 100:.2f}% |")


def report_tensorflow(args, spes: list[int], results: dict) -> None:
    if not args.tf_rounds:
        return
    from importlib.metadata import PackageNotFoundError, version

    def installed(*names: str) -> str:  # without importing TensorFlow (and its banner) here
        for name in names:
            try:
                return f"{name} {version(name)}"
            except PackageNotFoundError:
                pass
        return f"{names[0]} (not installed)"
    print(f"\nTensorFlow engine against Keras `model.fit` ({args.tf_rounds} rounds interleaved, same "
          f"data and model, one intra-op thread; {installed('tensorflow-cpu', 'tensorflow')}, "
          f"{installed('keras')})\n")
    heads = " | ".join(f"Keras fit, steps_per_execution={s} (samples/s)" for s in spes)
    print(f"| batch | {heads} | epochd all-in (samples/s) | ratio to the fastest fit, median | range "
          "| ratio per CPU second | range |")
    print("| --- | " + "--- | " * len(spes) + "--- | --- | --- | --- | --- |")
    for batch, r in results.items():
        cells = " | ".join(f"{statistics.median(r['keras'][s]):,.0f}" for s in spes)
        print(f"| {batch} | {cells} | {statistics.median(r['epochd']):,.0f} | "
              f"{statistics.median(r['pairs']):.2f}x | {min(r['pairs']):.2f}-{max(r['pairs']):.2f} | "
              f"{statistics.median(r['cpu_pairs']):.2f}x | "
              f"{min(r['cpu_pairs']):.2f}-{max(r['cpu_pairs']):.2f} |")


if __name__ == "__main__":
    main()
