"""`make demo`: serve the bundled spool/, train examples/wine.json, show where everything is.

Starts `epochd serve` on spool/ unless a daemon already serves it, submits the job with
`epochd submit --follow` (live progress), then prints the model, event log and learning-curve
paths, a few predictions, and stops the daemon it started.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
SPOOL = ROOT / "spool"
EPOCHD = [sys.executable, "-m", "daemon.cli"]


def start_daemon() -> subprocess.Popen | None:
    log = open(SPOOL / "daemon.stderr.log", "ab")
    proc = subprocess.Popen(EPOCHD + ["serve", "--spool", str(SPOOL)], stderr=log, cwd=ROOT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if proc.returncode == 75:  # EX_TEMPFAIL: another daemon already serves the spool
                print("a daemon already serves spool/; using it")
                return None
            sys.exit(f"epochd serve exited with {proc.returncode}; see spool/daemon.stderr.log")
        if started_by(proc.pid):
            return proc
        time.sleep(0.1)  # waiting for the daemon's "started" line
    proc.kill()
    sys.exit("epochd serve did not start within 30 s; see spool/daemon.stderr.log")


def started_by(pid: int) -> bool:
    log = SPOOL / "daemon.jsonl"
    if not log.exists():
        return False
    return any(orjson.loads(l).get("pid") == pid for l in log.read_bytes().splitlines() if b'"started"' in l)


def newest_job_id() -> str:
    jobs = [p for p in (SPOOL / "jobs").iterdir() if (p / "events.jsonl").exists()]
    return max(jobs, key=lambda p: (p / "events.jsonl").stat().st_mtime).name


def main() -> int:
    daemon = start_daemon()
    try:
        print("$ epochd submit examples/wine.json --follow")
        code = subprocess.call(EPOCHD + ["submit", "--spool", str(SPOOL), "examples/wine.json", "--follow"],
                               cwd=ROOT)
        if code != 0:
            return code
        show_results(newest_job_id())
        return 0
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(90)


def show_results(job_id: str) -> None:
    job = SPOOL / "jobs" / job_id
    model = job / "model"
    print(f"""
done. Job {job_id} lives in {job.relative_to(ROOT)}/:
  event log        {(job / 'events.jsonl').relative_to(ROOT)}   (epochd tail {job_id} / epochd history {job_id})
  final model      {(model / 'model.safetensors').relative_to(ROOT)}  + model.json, preprocess.json
  best model       {(model / 'best.safetensors').relative_to(ROOT)}
  history          {(model / 'history.json').relative_to(ROOT)}
  learning curves  {(model / 'learning_curves.png').relative_to(ROOT)}
""")
    head = ROOT / "spool" / f".{job_id}-head.csv"
    lines = (ROOT / "examples" / "data" / "wine.csv").read_text().splitlines()
    rows = lines[1::44]
    head.write_text("\n".join(lines[:1] + rows) + "\n")
    print(f"$ epochd predict {job_id} --data <{len(rows)} rows of wine.csv>")
    subprocess.call(EPOCHD + ["predict", "--spool", str(SPOOL), job_id, "--data", str(head)], cwd=ROOT)
    head.unlink()


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
