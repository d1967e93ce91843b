"""The checks that need a GPU, in one script: run it whenever a machine with an NVIDIA GPU is at
hand (`python bench/gpu_check.py`), and put what it printed, and the date, in the README.

Through the real daemon, on the bench's generated data (seed MLP, 20 features):
1. PyTorch on CUDA: `run_started` names the GPU; every `epoch_completed` carries nvidia-ml-py
   readings (`gpu_utilization` in 0..100, `gpu_memory` > 0).
2. PyTorch fp16 with its gradient scaler: a job paused mid-epoch holds the scaler's state in its
   checkpoint, resumes, and ends with the uninterrupted run's weights (the difference printed;
   CUDA kernels are deterministic for a fixed shape and device, so it should be 0).
3. PyTorch `mixed_precision: "auto"` (bf16 where the GPU has it) completes with finite losses.
4. TensorFlow on CUDA: names the GPU, and thanks to memory growth holds a small part of it
   (`gpu_memory` well under the GPU's total) rather than all of it.
5. With two GPUs or more: DDP over NCCL and MirroredStrategy over two GPUs complete, two
   one-GPU jobs run on different GPUs (`run_started.gpus`), and a MultiWorkerMirrored job
   spans two daemons of one GPU each, as two machines would. With one GPU: a one-rank DDP job
   over NCCL is paused mid-epoch, resumed and completes.
A check that raises is reported as failed and the others still run.
Then speed: epochd's CUDA epochs against a hand-written CUDA loop, with and without a CUDA
graph of the whole step (forward, backward, Adam), at batch 32 and 256.

`--cpu` runs the same script on the CPU (the GPU checks are reported as skipped): a dry run of
its plumbing on a machine without a GPU.

Usage: python bench/gpu_check.py [--rows 200000] [--cpu]
(On a GPU machine without network whose Python lacks epochd's other dependencies:
bench/gpu_offline.sh.)
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import Daemon, make_data, seed_job, submit, ts, wait  # noqa: E402

from daemon import control  # noqa: E402
from daemon.spool import Spool  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []
JOB_TIMEOUT = 300  # seconds for any one job: a hung one fails its check, not the whole run


def report(name: str, ok: bool | None, detail: str) -> None:
    status = "skipped" if ok is None else ("pass" if ok else "FAIL")
    RESULTS.append((name, status, detail))
    print(f"{status:7} {name}: {detail}", file=sys.stderr)


def gpu_total_mb() -> float | None:
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**20
    except Exception:
        return None


def guarded(check, *args) -> None:
    """A check that raises (a job that never ends, a missing event) is reported as failed and
    the others still run: one run on a borrowed GPU machine should say as much as it can."""
    try:
        check(*args)
    except Exception as e:  # the check's boundary: reported, with the reason
        report(check.__name__, False, f"raised {type(e).__name__}: {e}")


def run_job(spool: Path, name: str, job: dict) -> list[dict]:
    return end_of(spool, submit(spool, name, job))


def end_of(spool: Path, job_id: str) -> list[dict]:
    """The job's records once it has completed or failed."""
    return wait(spool, job_id, lambda r: r[-1]["type"] in ("completed", "failed"), timeout=JOB_TIMEOUT, poll=0.5)


def pause_mid_epoch(spool: Path, job_id: str) -> dict:
    """Pause the job once it shows progress: the record it stopped at (`paused`, or its end
    when it finished first)."""
    wait(spool, job_id, lambda r: any(x["type"] == "progress" for x in r)
         or r[-1]["type"] in ("completed", "failed"), poll=0.2, timeout=JOB_TIMEOUT)
    control.drop(Spool(spool), job_id, "pause")
    return wait(spool, job_id, lambda r: r[-1]["type"] in ("paused", "completed", "failed"),
                poll=0.2, timeout=JOB_TIMEOUT)[-1]


def weights(path: Path) -> dict:
    from safetensors.numpy import load_file
    return load_file(str(path))


def check_cuda_training(spool: Path, train: Path, val: Path, device: str, gpu: bool) -> None:
    job = seed_job(train, val, 256, 3) | {"devices": device}
    records = run_job(spool, "cuda", job)
    if records[-1]["type"] != "completed":
        return report("PyTorch training", False, records[-1].get("message", "failed"))
    run = next(r for r in records if r["type"] == "run_started")
    epochs = [r for r in records if r["type"] == "epoch_completed"]
    readings = [(r["gpu_utilization"], r["gpu_memory"]) for r in epochs]
    report("PyTorch training", True, f"devices {run['devices']}, {epochs[-1]['samples_per_sec']:,.0f} samples/s")
    if not gpu:
        return report("nvidia-ml-py readings in epoch_completed", None, f"no GPU: {readings}")
    ok = all(u is not None and 0 <= u <= 100 and m is not None and m > 0 for u, m in readings)
    report("nvidia-ml-py readings in epoch_completed", ok, f"(utilization %, MB) per epoch: {readings}")


def check_fp16_pause_resume(spool: Path, train: Path, val: Path, device: str, gpu: bool, out: Path) -> None:
    """(fp16 autocast runs on the CPU too, slowly: the dry run checks the same things.)"""
    import torch
    job = lambda name: seed_job(train, val, 32, 2) | {"devices": device, "mixed_precision": "fp16",
                                                        "output_path": str(out / name)}
    ref = run_job(spool, "fp16-ref", job("ref"))
    job_id = submit(spool, "fp16-p", job("p"))
    paused = pause_mid_epoch(spool, job_id)
    if paused["type"] != "paused":
        return report("fp16 with a gradient scaler, paused and resumed", False, f"ended {paused['type']}")
    state = torch.load(spool / "jobs" / job_id / paused["checkpoint"], map_location="cpu", weights_only=True)
    scale = state.get("scaler", {}).get("scale")
    control.drop(Spool(spool), job_id, "resume")
    done = end_of(spool, job_id)
    if ref[-1]["type"] != "completed" or done[-1]["type"] != "completed":
        return report("fp16 with a gradient scaler, paused and resumed", False, "a run failed")
    a, b = weights(out / "ref" / "model.safetensors"), weights(out / "p" / "model.safetensors")
    diff = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    report("fp16 with a gradient scaler, paused and resumed", scale is not None and diff < 1e-3,
           f"paused at epoch {paused['epoch']} step {paused['step']}, scale in checkpoint {scale}, "
           f"max weight difference to the uninterrupted run {diff:g} ({'bit for bit' if diff == 0 else 'not bit for bit'})")


def check_auto_precision(spool: Path, train: Path, val: Path, device: str, gpu: bool) -> None:
    records = run_job(spool, "auto", seed_job(train, val, 256, 2) | {"devices": device, "mixed_precision": "auto"})
    losses = [r["train_loss"] for r in records if r["type"] == "epoch_completed"]
    ok = records[-1]["type"] == "completed" and all(np.isfinite(losses))
    report('mixed_precision "auto"' + ("" if gpu else " (full precision on the CPU)"), ok, f"train_loss {losses}")


def check_tensorflow(spool: Path, train: Path, val: Path, device: str, gpu: bool) -> None:
    import importlib.util
    if importlib.util.find_spec("tensorflow") is None:  # a GPU image without it (gpu_offline.sh)
        for name in ("TensorFlow training", "TensorFlow memory growth"):
            report(name, None, "TensorFlow is not installed in this Python")
        return
    records = run_job(spool, "tf", seed_job(train, val, 256, 2, framework="tensorflow") | {"devices": device})
    if records[-1]["type"] != "completed":
        return report("TensorFlow training", False, records[-1].get("message", "failed"))
    run = next(r for r in records if r["type"] == "run_started")
    epochs = [r for r in records if r["type"] == "epoch_completed"]
    report("TensorFlow training", True, f"devices {run['devices']}, {epochs[-1]['samples_per_sec']:,.0f} samples/s")
    total = gpu_total_mb()
    if not gpu or total is None:
        return report("TensorFlow memory growth", None, "no GPU")
    used = max(r["gpu_memory"] or 0 for r in epochs)
    report("TensorFlow memory growth", 0 < used < 0.5 * total, f"{used:,.0f} MB of {total:,.0f} MB")


def check_several_gpus(spool: Path, train: Path, val: Path, gpus: int) -> None:
    """DDP over NCCL and MirroredStrategy over two GPUs; two one-GPU jobs on different GPUs;
    a multi-worker TensorFlow job over two one-GPU "machines"."""
    names = ("DDP over NCCL, 2 GPUs", "MirroredStrategy, 2 GPUs", "two jobs side by side on two GPUs")
    if gpus < 2:
        for name in names + ("MultiWorkerMirrored, 2 nodes x 1 GPU",):
            report(name, None, f"needs 2 GPUs; {gpus} visible")
        if gpus <= 1:  # (on the CPU dry run: the same over gloo)
            check_one_rank_ddp(spool, train, val, gpus == 1)
        return
    for name, job in zip(names, (
            seed_job(train, val, 256, 2) | {"devices": 2, "distributed": {"strategy": "ddp", "processes": 2}},
            seed_job(train, val, 256, 2, framework="tensorflow")
            | {"devices": 2, "distributed": {"strategy": "mirrored", "replicas": 2}})):
        records = run_job(spool, name.split(",")[0].replace(" ", "-").lower(), job)
        run = next((r for r in records if r["type"] == "run_started"), {})
        losses = [r["train_loss"] for r in records if r["type"] == "epoch_completed"]
        report(name, records[-1]["type"] == "completed" and all(np.isfinite(losses)),
               f"{records[-1]['type']}: devices {run.get('devices')}, gpus {run.get('gpus')}, "
               f"train_loss {losses} " + records[-1].get("message", ""))
    side = spool.parent / "side-spool"  # a daemon that runs two jobs at once
    daemon = Daemon(side, max_jobs=2)
    try:
        ids = [submit(side, f"side-{i}", seed_job(train, val, 256, 2) | {"devices": 1}) for i in range(2)]
        runs = [end_of(side, j) for j in ids]
    finally:
        daemon.stop()
    given = [next((r["gpus"] for r in rs if r["type"] == "run_started"), None) for rs in runs]
    overlap = runs[1][0]["ts"] < runs[0][-1]["ts"] and runs[0][0]["ts"] < runs[1][-1]["ts"]
    report(names[2], all(rs[-1]["type"] == "completed" for rs in runs) and given[0] != given[1]
           and overlap, f"gpus {given}, {'at the same time' if overlap else 'one after the other'}")
    check_multi_worker(spool.parent, train, val)


def check_one_rank_ddp(spool: Path, train: Path, val: Path, gpu: bool) -> None:
    """With one GPU: a one-rank DDP job over NCCL (the process group, the DDP wrapper and rank
    0's writing on CUDA), paused mid-epoch and resumed. Without one, the same over gloo."""
    backend = "nccl" if gpu else "gloo"
    name = f"DDP over {backend.upper()}, {'1 GPU' if gpu else 'CPU'} (1 rank), paused and resumed"
    job_id = submit(spool, "ddp-1", seed_job(train, val, 32, 3) | {  # long enough to pause
        "devices": 1 if gpu else "cpu", "distributed": {"strategy": "ddp", "processes": 1, "backend": backend}})
    paused = pause_mid_epoch(spool, job_id)["type"] == "paused"
    if paused:
        control.drop(Spool(spool), job_id, "resume")
    records = end_of(spool, job_id)
    runs = [r for r in records if r["type"] == "run_started"]
    losses = [r["train_loss"] for r in records if r["type"] == "epoch_completed"]
    report(name, records[-1]["type"] == "completed" and paused and all(np.isfinite(losses)),
           f"{records[-1]['type']} ({'paused and resumed' if paused else 'ended before the pause'}): "
           f"devices {[r['devices'] for r in runs]}, train_loss {losses} " + records[-1].get("message", ""))


def check_multi_worker(folder: Path, train: Path, val: Path) -> None:
    """MultiWorkerMirroredStrategy over NCCL: two daemons, one GPU each (`--gpus 0`, `--gpus 1`),
    stand for two machines meeting over loopback."""
    import socket
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    spools = [folder / f"node{k}-spool" for k in range(2)]
    daemons = [Daemon(s, extra=("--gpus", str(k))) for k, s in enumerate(spools)]
    try:
        for k, s in enumerate(spools):
            submit(s, "mw", seed_job(train, val, 256, 2, framework="tensorflow") | {
                "devices": 1, "distributed": {"strategy": "mirrored", "node_rank": k, "rdzv_timeout": 300,
                                              "workers": [f"127.0.0.1:{p}" for p in ports]}})
        runs = [end_of(s, "mw") for s in spools]
    finally:
        for d in daemons:
            d.stop()
    losses = [[r["train_loss"] for r in rs if r["type"] == "epoch_completed"] for rs in runs]
    report("MultiWorkerMirrored, 2 nodes x 1 GPU", all(rs[-1]["type"] == "completed" for rs in runs)
           and losses[0] == losses[1] and all(np.isfinite(losses[0])),
           f"{[rs[-1]['type'] for rs in runs]}: train_loss {losses[0]} / {losses[1]}")


# ---------------------------------------------------------------- speed

def hand_loop(train: Path, batch: int, epochs: int, device: str, graphs: bool) -> float:
    """A hand-written loop on `device` (data on the device, randperm + index_select per epoch,
    contiguous slices, fused Adam, one sync per epoch); with `graphs`, the whole step is one
    CUDA graph replayed per batch (static input buffers, capturable Adam; full batches only).
    Median samples/s of the epochs after the first."""
    import torch
    from peer_data import load
    from handwritten import seed_mlp
    torch.set_num_threads(1)  # as bench/handwritten.py: the fastest for this model on a CPU
    torch.manual_seed(0)
    x, y = load(str(train))
    X, Y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    model = seed_mlp(X.shape[1]).to(device)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    n = len(X)
    if graphs:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
        sx, sy = X[:batch].clone(), Y[:batch].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                loss_fn(model(sx), sy).backward()
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_loss = loss_fn(model(sx), sy)
            static_loss.backward()
            opt.step()
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    speeds = []
    for _ in range(epochs):
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        t = time.perf_counter()
        order = torch.randperm(n, device=device)
        xs, ys = X.index_select(0, order), Y.index_select(0, order)
        total = torch.zeros((), device=device)
        steps = n // batch if graphs else -(-n // batch)
        for i in range(steps):
            xb, yb = xs[i * batch:(i + 1) * batch], ys[i * batch:(i + 1) * batch]
            if graphs:
                sx.copy_(xb)
                sy.copy_(yb)
                graph.replay()
                total += static_loss.detach()
            else:
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
                total += loss.detach()
        total.item()
        sync()
        speeds.append(steps * batch / (time.perf_counter() - t) if graphs else n / (time.perf_counter() - t))
    return statistics.median(speeds[1:])


def speed_row(rows: list, spool: Path, train: Path, val: Path, batch: int, device: str, gpu: bool) -> None:
    hand = hand_loop(train, batch, 4, device, graphs=False)
    graphed = hand_loop(train, batch, 4, device, graphs=True) if gpu else None
    rows.append((batch, hand, graphed, epochd_speed(spool, train, val, batch, device)))


def epochd_speed(spool: Path, train: Path, val: Path, batch: int, device: str) -> float:
    records = run_job(spool, f"speed-{batch}", seed_job(train, val, batch, 4) | {"devices": device})
    done = [r for r in records if r["type"] == "epoch_completed"]
    samples = next(r for r in records if r["type"] == "run_started")["train_samples"]
    return statistics.median(samples / (ts(b) - ts(a) - b["eval_time"]) for a, b in zip(done, done[1:]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--cpu", action="store_true", help="a dry run on the CPU (GPU checks skipped)")
    args = ap.parse_args()
    import torch
    gpu = torch.cuda.is_available() and not args.cpu
    if not gpu and not args.cpu:
        sys.exit("no CUDA GPU is visible: run this on a machine with one (or --cpu for a dry run)")
    device = "cuda" if gpu else "cpu"
    name = torch.cuda.get_device_name(0) if gpu else "CPU"
    print(f"epochd GPU checks on {name}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}", file=sys.stderr)
    speed_rows = []
    with tempfile.TemporaryDirectory(prefix="epochd-gpu-") as tmp:
        folder = Path(tmp)
        train, val = make_data(folder, args.rows)
        spool = folder / "spool"
        daemon = Daemon(spool)
        try:
            guarded(check_cuda_training, spool, train, val, device, gpu)
            guarded(check_fp16_pause_resume, spool, train, val, device, gpu, folder / "out")
            guarded(check_auto_precision, spool, train, val, device, gpu)
            guarded(check_tensorflow, spool, train, val, device, gpu)
            guarded(check_several_gpus, spool, train, val, torch.cuda.device_count() if gpu else 0)
            for batch in (32, 256):
                guarded(speed_row, speed_rows, spool, train, val, batch, device, gpu)
        finally:
            daemon.stop()
    print(f"\nGPU checks ({name}, {time.strftime('%Y-%m-%d')}, `python bench/gpu_check.py`):\n")
    print("| check | result | detail |\n| --- | --- | --- |")
    for check, status, detail in RESULTS:
        print(f"| {check} | {status} | {detail} |")
    print(f"\nSpeed on {name} ({args.rows:,} rows x 20 features, seed MLP, samples/s, median of "
          "3 steady-state epochs):\n")
    print("| batch | hand-written loop | hand-written loop, CUDA graph of the step | epochd all-in "
          "| epochd / hand loop | epochd / graphed loop |\n| --- | --- | --- | --- | --- | --- |")
    for batch, hand, graphed, ours in speed_rows:
        g = f"{graphed:,.0f}" if graphed else "-"
        rg = f"{ours / graphed:.2f}x" if graphed else "-"
        print(f"| {batch} | {hand:,.0f} | {g} | {ours:,.0f} | {ours / hand:.2f}x | {rg} |")
    if any(status == "FAIL" for _, status, _ in RESULTS):
        sys.exit(1)


if __name__ == "__main__":
    main()
