"""A worker runs one job in a fresh process: `python -m daemon.worker --spool DIR --job ID`.

It takes the job's lock (so it is the log's only writer), folds the log, restores the last good
checkpoint, and runs the epoch loop through an engine. Between calls into the engine (each
call a few steps, sized to last about CHUNK_SECONDS) it looks for a shutdown signal and control
requests, saves timed checkpoints and publishes progress: a pause lands within about a second
even in the middle of a long epoch.

Each epoch, in order: determine the learning rate, run the steps, evaluate, record
`epoch_completed`, checkpoint, record a new best, decide early stopping. Every decision is a
pure function of the log (see `policies`), so a resumed job decides exactly as it would have.
"""
import argparse
import errno
import hashlib
import logging
import math
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import orjson

from . import control, datafiles, faults, foldcache, policies
from .errors import (BadJobFile, CheckpointInvalid, DataChanged, DataError, DeviceUnavailable, Diverged,
                     EngineUnavailable, MachinesDisagree, ModelTooLarge, PathNotAllowed, PortInUse,
                     memory_limit_message)
from .eventlog import EventLog, read_foldable, utc_now
from .events import (BestModelSaved, Cancelled, CheckpointRejected, CheckpointRemoved,
                     CheckpointSaved, Completed, EarlyStopped, EpochCompleted, Event, Failed,
                     Interrupted, LrChanged, Paused, Progress, RunStarted)
from .fsutil import (atomic_write_bytes, atomic_write_with, relative_to_or_absolute,
                     remove_stale_temps, sha256_file)
from .replay import RUNNABLE, Status, apply, fold, resume_point
from .spec import gpu_count_asked, ignored_settings, parse_job_bytes, path_allowed, validate
from .spool import Spool, job_lock
from .sysinfo import LIMIT as MEMORY_LIMIT
from .sysinfo import GpuMonitor, assigned_gpus, memory_excess, peak_rss_mb, rss_mb

log = logging.getLogger("epochd.worker")

EXIT_LOCKED = 75           # another live worker holds the job (EX_TEMPFAIL)
CHUNK_SECONDS = 0.2        # engine call length: bounds pause latency and progress granularity
PROGRESS_SECONDS = 1.0     # at most one progress event a second
CACHE_EVERY_BYTES = 4 << 20  # refresh the fold cache every 4 MiB of log: a replay folds the rest
EXPECTED_ERRORS = (DataError, PathNotAllowed, DeviceUnavailable, Diverged, EngineUnavailable, PortInUse,
                   MachinesDisagree, DataChanged, CheckpointInvalid, ModelTooLarge)


class StopRun(Exception):
    """The run ended on purpose (pause, cancel, shutdown) and its event is on record."""


class Flags:
    """Signal handlers only set flags; the loop acts on them between engine calls."""

    def __init__(self):
        self.shutdown = False

    def handle(self, signum, frame):
        self.shutdown = True


@dataclass
class Timers:
    """Seconds spent in the epoch in progress, carried across a mid-epoch checkpoint."""
    elapsed: float = 0.0
    compute: float = 0.0
    data: float = 0.0
    cpu: float = 0.0


class Worker:
    """One job's run. With DDP (`distributed.processes` > 1) one Worker runs in each rank, in
    lockstep: rank 0 alone reads control files and makes every decision that depends on time or
    on files (`agree` hands it to the others); each machine's first rank (its leader: rank 0
    on one machine) writes that machine's events, checkpoints and outputs; the other ranks
    apply the same events to their own state without writing them, so the decisions taken
    from the history (schedules, early stopping) are the same everywhere. A TensorFlow job on
    several machines has one Worker per machine, each its machine's leader, node 0 deciding.
    `comm` carries what they agree on (`TorchCollectives` or `tf_engine.Collectives`)."""

    def __init__(self, spool: Spool, job_id: str, events: EventLog | None, flags: Flags, cpu_share: int,
                 rank: int = 0, world: int = 1, records: list[dict] | None = None, comm=None):
        self.spool, self.job_id, self.events, self.flags = spool, job_id, events, flags
        self.cpu_share, self.rank, self.world = cpu_share, rank, world
        self.comm = comm if comm is not None or world == 1 else TorchCollectives()
        self.leader = events is not None  # writes this machine's log and files
        self.job_dir = spool.job_dir(job_id)
        records = events.records if events is not None else records
        self.state = fold(records)
        # job.json's sha256 at acceptance: what the file must still hold to be read again
        self.accepted_sha256 = records[0].get("file_sha256") if records else None
        self.cached_at = events.offset if events is not None else 0  # log bytes the fold cache covers
        self.spec = self.state.spec
        self.engine = None
        self.described = False  # best.json written in this run
        self.epoch, self.step = self.state.position
        self.timers = Timers()
        self.last_checkpoint_at = self.last_progress_at = time.monotonic()
        self.run_started_at: float | None = None  # monotonic, once run_started is on record
        self.prior_seconds = 0.0                  # training time of the job's earlier runs

    def record(self, event: Event) -> dict:
        if self.events is None:  # not a machine's leader: the same state, nothing written
            record = {"seq": self.state.last_seq + 1, "ts": utc_now(), "type": event.type,
                      "v": event.v, **event.payload()}
        else:
            record = self.events.append(event)
        apply(self.state, record)
        if self.events is not None and self.events.offset - self.cached_at >= CACHE_EVERY_BYTES:
            foldcache.store(self.events.path, self.state, self.events.offset, self.events.crc)
            self.cached_at = self.events.offset
        return record

    def agree(self, value):
        """Rank 0's `value`, on every rank (one small broadcast); itself in a run of one."""
        return value if self.world == 1 else self.comm.broadcast(value)

    # ---------------------------------------------------------------- the run

    def run(self) -> None:
        if self.state.status not in RUNNABLE:
            log.warning("job %s is %s, not runnable; nothing to do", self.job_id, self.state.status)
            return
        try:
            self.check_stop(shutdown=False, limits=False)  # a pause or cancel that came while queued
            self.setup()
            self.check_stop()
            self.train()
            self.finish()
        except StopRun:
            pass
        except Exception as e:  # the job boundary: every failure ends on record
            self.fail(e)

    def setup(self) -> None:
        from engines import load_engine
        from engines.data import prepare
        spec = self.spec
        self.check_paths()
        hashing = self.check_data_unchanged()
        folder = self.spool.stream_dir(self.job_id)
        if self.world > 1 and spec["data"].get("streaming"):
            # each machine's leader encodes the cache; its other ranks then open it as is
            if self.leader:
                self.data = prepare(spec, folder)
            self.comm.barrier()
            if not self.leader:
                self.data = prepare(spec, folder)
        else:
            self.data = prepare(spec, folder)
        self.data_files = hashing.result() if isinstance(hashing, datafiles.Identifying) else hashing
        if self.world > 1 and (spec.get("distributed") or {}).get("nnodes", 1) > 1:
            self.check_machines_agree()
        self.monitor, self.mode = self.choose_monitor()
        self.out_dir = self.output_dir()
        self.check_model_fits()
        self.engine_cls = load_engine(spec["framework"])
        self.engine = self.engine_cls(spec, self.data, self.cpu_share)
        self.gpu = GpuMonitor(self.engine.gpu_index)
        for folder in (self.job_dir, self.job_dir / "checkpoints", self.out_dir):
            for name in remove_stale_temps(folder):  # a crash mid-write left it; its file never was
                log.info("job %s: removed %s, left by a write a crash interrupted", self.job_id, folder / name)
        checkpoint = self.restore(rebuild=self.world == 1)  # with DDP building is a collective
        if self.world > 1:
            checkpoint = self.agree_on_resume(checkpoint)
        self.epoch, self.step = resume_point(checkpoint, self.engine.steps_per_epoch)
        self.record(RunStarted(
            attempt=self.state.attempts + 1, pid=os.getpid(), host=socket.gethostname(),
            devices=self.engine.devices, framework=spec["framework"],
            versions={"python": sys.version.split()[0], **self.engine.versions()},
            resumed_from=None if checkpoint is None else {
                "epoch": checkpoint["epoch"], "step": checkpoint["step"],
                "checkpoint": checkpoint["path"], "epochs_done": self.epoch - 1},
            steps_per_epoch=self.engine.steps_per_epoch, task=self.data.task,
            train_samples=self.data.n_train, val_samples=self.data.n_val, gpus=assigned_gpus(),
            data=self.data_files, notes=tuple(self.setting_notes() + self.data.notes)))
        self.run_started_at, self.prior_seconds = time.monotonic(), self.state.running_seconds
        log.info("job %s: %s run %d on %s from epoch %d step %d (%d threads)", self.job_id,
                 spec["framework"], self.state.attempts, self.engine.devices, self.epoch,
                 self.step, self.engine.threads)

    def check_data_unchanged(self) -> "dict | datafiles.Identifying":
        """Before the data is read: with checkpoints to go on from, each data file must be the
        one the last run recorded (DataChanged if not). A run with nothing to go on from hashes
        its files while it reads them (`Identifying`); only a machine's leader records them."""
        recorded = (self.state.run or {}).get("data")
        if not (recorded and self.state.checkpoints):
            return datafiles.Identifying(self.spec, hash_files=self.leader)
        current = datafiles.identify(self.spec, recorded)
        problem = datafiles.check(self.state, current)
        if problem:
            raise DataChanged(problem)
        return current

    def train(self) -> None:
        epochs = self.spec["epochs"]
        while self.epoch <= epochs and not self.should_stop_early():
            self.run_epoch()
            self.end_epoch()
            self.epoch, self.step = self.epoch + 1, 0
            self.check_stop()

    def run_epoch(self) -> None:
        engine, spe = self.engine, self.engine.steps_per_epoch
        started = time.monotonic() - self.timers.elapsed
        cpu_started = time.process_time() - self.timers.cpu
        self.announce_lr()
        t = time.monotonic()
        engine.start_epoch(self.epoch, self.step)
        self.timers.data += time.monotonic() - t
        chunk = 8
        while self.step < spe:
            n = min(chunk, spe - self.step)
            # determine the learning rate of each step, then run them in one engine call
            lrs = policies.step_lrs(self.schedule, self.spec["learning_rate"], self.epoch - 1,
                                    self.step, n, spe, self.spec["epochs"], self.plateau_values())
            t = time.monotonic()
            engine.train_steps(lrs)
            dt = time.monotonic() - t
            self.step, self.timers.compute = self.step + n, self.timers.compute + dt
            chunk = max(1, min(4 * n, int(n * CHUNK_SECONDS / max(dt, 1e-6))))
            self.gpu.sample()
            self.timers.elapsed = time.monotonic() - started
            self.timers.cpu = time.process_time() - cpu_started
            if self.step < spe:
                chunk = self.between_chunks(chunk)
        self.record_epoch(time.monotonic() - started, lrs[-1])

    def record_epoch(self, elapsed: float, last_lr: float) -> None:
        t = time.monotonic()
        metrics = {**self.engine.train_metrics(), **self.engine.evaluate()}
        eval_time = time.monotonic() - t
        if not math.isfinite(metrics["train_loss"]):
            raise Diverged(f"training diverged: train_loss is {metrics['train_loss']} in epoch "
                           f"{self.epoch}. Expected: a finite loss; lower the learning_rate, "
                           "check the data for extreme values, or add batch_norm.")
        util, gpu_mb = self.gpu.epoch_readings()
        samples = self.data.n_train
        faults.point("epoch.unrecorded")
        self.record(EpochCompleted(
            epoch=self.epoch, train_loss=metrics["train_loss"],
            train_accuracy=metrics.get("train_accuracy"), val_loss=metrics.get("val_loss"),
            val_accuracy=metrics.get("val_accuracy"), learning_rate=last_lr,
            time_per_epoch=elapsed + eval_time,
            samples_per_sec=samples / self.timers.compute if self.timers.compute > 0 else 0.0,
            memory_usage=rss_mb(), gpu_utilization=util, gpu_memory=gpu_mb,
            data_time=self.timers.data, compute_time=self.timers.compute, eval_time=eval_time,
            cpu_time=self.timers.cpu,
            steps=self.engine.steps_per_epoch, train_mae=metrics.get("train_mae"),
            train_rmse=metrics.get("train_rmse"), val_mae=metrics.get("val_mae"),
            val_rmse=metrics.get("val_rmse"), val_r2=metrics.get("val_r2"),
            memory_peak=peak_rss_mb()))
        self.timers = Timers()
        log.info("job %s: epoch %d/%d train_loss %.4f val_loss %s (%.2fs)", self.job_id,
                 self.epoch, self.spec["epochs"], metrics["train_loss"],
                 _fmt(metrics.get("val_loss")), elapsed + eval_time)

    def end_epoch(self) -> None:
        """After `epoch_completed`: checkpoint (durable first), then the best model."""
        every = self.spec["checkpoint"]["every_epochs"]
        if every and (self.epoch % every == 0 or self.epoch == self.spec["epochs"]):
            self.save_checkpoint(self.epoch, self.engine.steps_per_epoch)
        best_epoch, best_value = policies.best_epoch(self.state.monitor_values(self.monitor), self.mode)
        if best_epoch == self.epoch:
            path = self.out_dir / self.engine_cls.best_file
            if self.leader:
                if not self.described:
                    _write_json(self.out_dir / "best.json", {"model": self.model_description(),
                                                             "preprocess": self.data.preprocess})
                    self.described = True
                atomic_write_with(path, self.engine.save_weights)
            self.record(BestModelSaved(epoch=self.epoch, monitor=self.monitor, value=best_value,
                                       path=relative_to_or_absolute(path, self.job_dir)))

    def should_stop_early(self) -> bool:
        es = self.state.early_stopping()
        if es is None or not es.stop:
            return False
        if self.state.stop_reason != "early_stopping":
            cfg = self.spec["early_stopping"]
            self.record(EarlyStopped(
                epoch=self.state.epochs_done, monitor=cfg["monitor"], best_value=es.best_value,
                best_epoch=es.best_epoch,
                reason=f"{cfg['monitor']} did not improve by more than {cfg['min_delta']} for "
                       f"{es.wait} epochs (patience {cfg['patience']})"))
        return True

    # ---------------------------------------------------------------- between engine calls

    def between_chunks(self, next_chunk: int) -> int:
        """Between engine calls: stop, timed checkpoint, progress; returns the next call's
        steps. Rank 0 decides all four (they depend on the clock and on control files)."""
        plan = None
        if self.rank == 0:
            now = time.monotonic()
            every = self.spec["checkpoint"]["every_seconds"]
            plan = {"stop": self.stop_decision(), "chunk": next_chunk,
                    "checkpoint": bool(every and now - self.last_checkpoint_at >= every),
                    "progress": now - self.last_progress_at >= PROGRESS_SECONDS}
        plan = self.agree(plan)
        if plan["stop"] is None and self.any_machine_stopping():
            plan["stop"] = ("shutdown",)
        if plan["stop"] is not None:
            self.carry_out(plan["stop"])
        if plan["checkpoint"]:
            self.save_checkpoint(self.epoch, self.step)
        if plan["progress"]:
            self.report_progress()
        return plan["chunk"]

    def check_stop(self, shutdown: bool = True, limits: bool = True) -> None:
        stop = self.agree(self.stop_decision(shutdown, limits) if self.rank == 0 else None)
        if stop is None and shutdown and self.any_machine_stopping():
            stop = ("shutdown",)
        if stop is not None:
            self.carry_out(stop)

    def any_machine_stopping(self) -> bool:
        """Several machines: whether any rank was told to shut down (its machine's daemon is
        stopping), so that every machine checkpoints and stops at the same step. One machine's
        ranks all get the signal, and rank 0 decides for them."""
        if self.world == 1 or ((self.spec.get("distributed") or {}).get("nnodes") or 1) == 1:
            return False
        return self.comm.any(self.flags.shutdown)

    def stop_decision(self, shutdown: bool = True, limits: bool = True) -> tuple | None:
        """Whether the run must stop here, and why (rank 0): a shutdown, a pause or cancel
        request (put on record here), or a limit passed."""
        if shutdown and self.flags.shutdown:
            return ("shutdown",)
        for request in control.pending_for(self.spool, self.job_id):
            outcome = control.consume(self.spool, request, self.state.status, self.record)
            if outcome and outcome[0].kind == "act" and request.action in ("pause", "cancel"):
                return (request.action, outcome[1])
        return self.limit_passed() if limits else None

    def carry_out(self, stop: tuple) -> None:
        if stop[0] == "shutdown":
            checkpoint = self.checkpoint_here()
            epoch, step = self.epoch, self.step
            self.record(Interrupted(reason="shutdown", epoch=epoch, step=step, checkpoint=checkpoint))
            log.info("job %s: interrupted by shutdown at epoch %d step %d", self.job_id, epoch, step)
            raise StopRun
        if stop[0] == "limit":
            log.error("job %s: %s", self.job_id, stop[2])
            self.record(Failed(error=stop[1], message=stop[2], traceback=None, retryable=False))
            raise StopRun
        self.act(stop[0], stop[1])

    def limit_passed(self) -> tuple | None:
        """limits.wall_seconds (all runs together) and limits.memory_mb (this process's RSS):
        past either, the job ends `failed` with the numbers. (The daemon kills a worker whose
        memory jumps past 1.25x its limit inside one engine call.)"""
        limits = self.spec.get("limits") or {}
        wall, memory = limits.get("wall_seconds"), limits.get("memory_mb")
        if self.run_started_at is None or (wall is None and memory is None):
            return None
        used = self.prior_seconds + time.monotonic() - self.run_started_at
        if wall is not None and used > wall:
            return ("limit", "WallTimeExceeded", (
                f"the job has trained for {used:.0f} s, past its limits.wall_seconds of {wall:g} "
                f"(stopped in epoch {self.epoch}, step {self.step}). Expected: a run that ends "
                "within its limit; raise limits.wall_seconds or lower epochs, then submit again."))
        rss = rss_mb() if memory is not None else 0.0
        if memory is not None and rss > memory:
            return ("limit", "MemoryLimitExceeded", memory_limit_message(rss, memory))
        return None

    def act(self, action: str, reason: str | None) -> None:
        epoch, step = self.epoch, self.step
        if action == "pause":
            checkpoint = self.checkpoint_here()
            self.record(Paused(epoch=epoch, step=step, checkpoint=checkpoint))
            log.info("job %s: paused at epoch %d step %d", self.job_id, epoch, step)
        elif action == "cancel":
            self.record(Cancelled(epoch=epoch, step=step, reason=reason))
            log.info("job %s: cancelled at epoch %d step %d", self.job_id, epoch, step)
        else:
            return
        raise StopRun

    def report_progress(self) -> None:
        spe, bs = self.engine.steps_per_epoch, self.engine.batch_size  # rows per step
        speed = self.step / self.timers.compute if self.timers.compute > 0 else 0.0
        remaining = (self.spec["epochs"] - self.epoch) * spe + (spe - self.step)
        self.record(Progress(epoch=self.epoch, step=self.step, steps_per_epoch=spe,
                             samples_per_sec=speed * bs,
                             loss=self.engine.train_metrics()["train_loss"],
                             eta_seconds=remaining / speed if speed > 0 else 0.0))
        self.last_progress_at = time.monotonic()

    # ---------------------------------------------------------------- checkpoints

    def checkpoint_here(self) -> str | None:
        """A checkpoint of the current position, reusing the last one when it is already there."""
        last = self.state.last_checkpoint
        if self.engine is None:  # stopped before training began: the last checkpoint stands
            return last["path"] if last else None
        epoch, step = self.epoch, self.step
        if step == 0:  # at an epoch boundary the state is the end of the epoch before
            epoch, step = epoch - 1, self.engine.steps_per_epoch
        if last and (last["epoch"], last["step"]) == (epoch, step):
            return last["path"]
        if epoch == 0:  # nothing trained yet: a fresh start is the exact resume
            return None
        return self.save_checkpoint(epoch, step)

    def save_checkpoint(self, epoch: int, step: int) -> str:
        folder = self.job_dir / "checkpoints"
        folder.mkdir(exist_ok=True)
        path = folder / f"e{epoch:05d}-s{step:07d}{self.engine_cls.checkpoint_suffix}"
        if self.leader:
            atomic_write_with(path, self.engine.save_checkpoint)
        else:
            self.engine.checkpoint_state()  # its part of the gathering; the leader writes the file
        faults.point("checkpoint.unrecorded")
        rel = relative_to_or_absolute(path, self.job_dir)
        mid_epoch = step < self.engine.steps_per_epoch
        written = self.leader
        self.record(CheckpointSaved(
            epoch=epoch, step=step, steps_per_epoch=self.engine.steps_per_epoch, path=rel,
            bytes=path.stat().st_size if written else 0, sha256=sha256_file(path) if written else "",
            epoch_seconds=self.timers.elapsed if mid_epoch else 0.0,
            compute_seconds=self.timers.compute if mid_epoch else 0.0,
            data_seconds=self.timers.data if mid_epoch else 0.0,
            cpu_seconds=self.timers.cpu if mid_epoch else 0.0))
        self.last_checkpoint_at = time.monotonic()
        self.prune_checkpoints()
        return rel

    def prune_checkpoints(self) -> None:
        policy = self.spec["checkpoint"]
        live = self.state.checkpoints
        keep = {c["path"] for c in live[-policy["keep_last"]:]}
        if policy["keep_best"]:
            best, _ = policies.best_epoch(self.state.monitor_values(self.monitor), self.mode)
            keep |= {c["path"] for c in live if c["epoch"] == best and c["step"] == c["steps_per_epoch"]}
        for c in [c for c in live if c["path"] not in keep]:
            self.record(CheckpointRemoved(path=c["path"], reason=f"keep_last {policy['keep_last']}"))
            if self.leader:
                (self.job_dir / c["path"]).unlink(missing_ok=True)

    def check_machines_agree(self) -> None:
        """Every machine of a multi-machine job must train the same job on the same data, or
        their collectives stop matching (a hang, or wrong updates): compare before training."""
        node = self.spec["distributed"]["node_rank"]
        every = dict(self.comm.gather((node, machine_fingerprint(self.spec, self.data))))
        differences = machine_differences(every)
        if differences:
            raise MachinesDisagree(
                f"the machines of this job were not given the same job and data: "
                f"{'; '.join(differences)}. Expected: the same job file on every machine but for "
                f"distributed.node_rank (each machine's paths, output_path, name, priority, "
                f"threads, limits, rdzv_timeout and which GPUs may differ), and the same data. Fix "
                f"it, then submit the job again on every machine.")

    def agree_on_resume(self, checkpoint: dict | None) -> dict | None:
        """Every rank resumes from the same point. Ranks on one machine read one log and agree
        already; machines can differ when one crashed between writing a checkpoint and the
        others writing theirs: all go back to the earliest, which each machine still keeps
        (the last `keep_last` are kept)."""
        mine = (0, 0) if checkpoint is None else (checkpoint["epoch"], checkpoint["step"])
        every = [(tuple(position), dirty)  # (a JSON transport gives lists back)
                 for position, dirty in self.comm.gather((mine, self.engine_dirty))]
        target = min(position for position, _ in every)
        if target == (0, 0):  # a fresh start; every rank builds anew if any has loaded something
            if any(position != target or dirty for position, dirty in every):
                self.engine = self.engine_cls(self.spec, self.data, self.cpu_share)
            return None
        if mine == target:
            return checkpoint
        log.warning("job %s: rank %d goes back from checkpoint %s to %s, where another machine's "
                    "last one is", self.job_id, self.rank, mine, target)
        checkpoint = self.restore(at_or_before=target, rebuild=False)
        if checkpoint is None or (checkpoint["epoch"], checkpoint["step"]) != target:
            raise CheckpointInvalid(
                f"the machines of this job resume from different points: {sorted(set(every))}, "
                f"and this one (rank {self.rank}) no longer has a good checkpoint at {target}. "
                "Expected: the same checkpoints on every machine; delete the job's checkpoints "
                "on every machine to start over, or raise checkpoint.keep_last.")
        return checkpoint

    def restore(self, at_or_before: tuple[int, int] | None = None, rebuild: bool = True) -> dict | None:
        """Load the newest checkpoint whose bytes match their sha256; older ones if it does not.
        With `at_or_before`, only checkpoints no later than that (epoch, step). A load that
        failed may have changed some weights: the engine is built anew (`rebuild`), or marked
        `engine_dirty` for the caller to rebuild. None when no checkpoint stands whole (a fresh
        start); CheckpointInvalid when some do but none of them loads."""
        tried_a_load = False
        self.engine_dirty = False
        unfit = []  # (checkpoint, why): whole on disk, yet they do not load into this model
        for checkpoint in reversed(list(self.state.checkpoints)):
            if at_or_before is not None and (checkpoint["epoch"], checkpoint["step"]) > at_or_before:
                continue
            path = self.job_dir / checkpoint["path"]
            problem = _verify(path, checkpoint)
            if problem is None:
                tried_a_load = True
                try:
                    if self.engine.load_checkpoint(path) == (checkpoint["epoch"], checkpoint["step"]):
                        for newer, why in unfit:
                            self.reject(newer, why)
                        self.restore_timers(checkpoint)
                        return checkpoint
                    problem = "its contents are for another epoch and step than its event says"
                except CheckpointInvalid as e:
                    problem = str(e)
                unfit.append((checkpoint, problem))
                continue
            self.reject(checkpoint, problem)
        if unfit:
            # their bytes are as written, so this is not damage but a model built otherwise
            # than theirs: starting afresh would throw the job's training away. They stay on
            # record for a resume once the cause is gone.
            last, why = unfit[0]
            raise CheckpointInvalid(
                f"none of the job's {len(unfit)} checkpoint(s) that are whole on disk loads into "
                f"the model built now; the last, {last['path']} (epoch {last['epoch']}, step "
                f"{last['step']}): {why}. Expected: the network those checkpoints were saved "
                "from: the same data (a changed category or column changes its size) and an "
                "epochd that writes the same layout. Put back what changed, then "
                f'"epochd resume {self.job_id}" goes on from the last checkpoint; to start the '
                f"job over instead, delete jobs/{self.job_id}/checkpoints/ and resume it.")
        if tried_a_load and rebuild:  # a failed load may have changed some weights: start clean
            self.engine = self.engine_cls(self.spec, self.data, self.cpu_share)
        self.engine_dirty = tried_a_load and not rebuild
        return None

    def reject(self, checkpoint: dict, problem: str) -> None:
        self.record(CheckpointRejected(path=checkpoint["path"], reason=problem))
        log.warning("job %s: checkpoint %s rejected: %s", self.job_id, checkpoint["path"], problem)

    def restore_timers(self, checkpoint: dict) -> None:
        if checkpoint["step"] < checkpoint["steps_per_epoch"]:
            self.timers = Timers(checkpoint["epoch_seconds"], checkpoint["compute_seconds"],
                                 checkpoint["data_seconds"], checkpoint["cpu_seconds"])

    # ---------------------------------------------------------------- policies

    @property
    def schedule(self) -> dict:
        return self.spec["learning_rate_scheduler"]

    def plateau_values(self) -> list:
        s = self.schedule
        return self.state.monitor_values(s["monitor"]) if s["name"] == "plateau" else []

    def announce_lr(self) -> None:
        """`lr_changed` when this epoch starts at another rate than the last one ran at."""
        if self.step > 0:  # resumed mid-epoch: announced before the pause
            return
        lr = policies.step_lrs(self.schedule, self.spec["learning_rate"], self.epoch - 1, self.step,
                               1, self.engine.steps_per_epoch, self.spec["epochs"],
                               self.plateau_values())[0]
        previous = self.state.learning_rate or self.spec["learning_rate"]
        if lr != previous:
            self.record(LrChanged(epoch=self.epoch, from_=previous, to=lr,
                                  reason=policies.lr_change_reason(
                                      self.schedule, self.plateau_values(),
                                      self.spec["learning_rate"], self.epoch - 1)))

    def choose_monitor(self) -> tuple[str, str]:
        """The metric that picks the best weights (and drives early stopping and plateau)."""
        has_val = self.data.n_val > 0
        es = self.spec["early_stopping"]
        monitor = es["monitor"] if es else ("val_loss" if has_val else "train_loss")
        mode = policies.resolve_mode(monitor, es["mode"] if es else "auto")
        wanted = {monitor}
        if self.schedule["name"] == "plateau":
            wanted.add(self.schedule["monitor"])
        for name in wanted:
            self.check_metric(name, has_val)
        return monitor, mode

    def check_metric(self, name: str, has_val: bool) -> None:
        task = self.data.task
        if name.startswith("val_") and not has_val:
            raise DataError(f'the job monitors "{name}" but has no validation data. Expected: a '
                            "val_data_path or a validation_split above 0, or a train_ metric.")
        if ("accuracy" in name and task == "regression") or (
                any(m in name for m in ("mae", "rmse", "r2")) and task == "classification"):
            raise DataError(f'the job monitors "{name}", which a {task} job does not report. '
                            "Expected: a loss, accuracy (classification) or mae/rmse/r2 "
                            "(regression); or set \"task\" explicitly.")

    # ---------------------------------------------------------------- paths and outputs

    def check_paths(self) -> None:
        """The daemon checked the paths at acceptance; check again, as links may have moved."""
        roots = [Path(p) for p in os.environ.get("EPOCHD_ALLOW_ROOTS", "").split(os.pathsep) if p]
        for key in ("train_data_path", "val_data_path", "output_path"):
            value = self.spec[key]
            if value and roots and not path_allowed(Path(value), roots):
                raise PathNotAllowed(f'"{key}" {value} now resolves outside the allowed roots '
                                     f"({', '.join(map(str, roots))}). Expected: a path under them.")

    def setting_notes(self) -> list[str]:
        """What the job file sets that this job does not use (`spec.ignored_settings`), from
        job.json as dropped: the normalised spec no longer tells a given value from a default."""
        try:
            data = (self.job_dir / "job.json").read_bytes()
            if hashlib.sha256(data).hexdigest() != self.accepted_sha256:
                return []  # edited since: not the file the job was accepted from
            return ignored_settings(validate(parse_job_bytes(data)))
        except (OSError, BadJobFile):  # accepted under other rules, or gone: nothing to add
            return []

    def check_model_fits(self) -> None:
        """A network whose parameters alone outgrow the memory the job may use is refused before
        it is built: building it would take the machine's memory (and the other jobs' with it)
        until the kernel killed the worker, and the daemon retried it. On a GPU the training
        state lives there; the host still holds the weights as they are built and saved. Each
        mirrored replica holds a copy in the one process; each DDP rank is a process of its own
        (limits.memory_mb bounds each process, the machine all of them)."""
        from engines import architecture, parameter_count, training_bytes
        arch = architecture(self.spec, self.data)
        on_gpu = bool(assigned_gpus())
        one = parameter_count(arch) * 4 * 2 if on_gpu else training_bytes(self.spec, arch)
        dist = self.spec.get("distributed") or {}
        replicas = dist.get("replicas", 1) if dist.get("strategy") == "mirrored" else 1
        ranks = dist.get("processes", 1) if dist.get("strategy") == "ddp" else 1
        excess = memory_excess(one * replicas, ranks, (self.spec.get("limits") or {}).get("memory_mb"))
        if excess is None:
            return
        need, room, where = excess
        copies = replicas * (1 if where == MEMORY_LIMIT else ranks)
        ap = self.spec["algorithm_params"]
        what = ("its weights as they are built and saved" if on_gpu else
                f"its weights, gradients, {self.spec['optimizer']['name']}'s state and a copy")
        raise ModelTooLarge(
            f"the model is too large: {parameter_count(arch):,} parameters ({ap['model_type']}, "
            f"hidden_units {ap['hidden_units']}, {arch['input_dim']} inputs) need about "
            f"{need / 2**30:.1f} GiB for {what}{f', in {copies} copies' if copies > 1 else ''}, "
            f"more than {where} ({room / 2**30:.1f} GiB). "
            "Expected: a model that fits; use fewer or narrower hidden layers"
            + (", or raise limits.memory_mb." if where == MEMORY_LIMIT else "."))

    def output_dir(self) -> Path:
        folder = Path(self.spec["output_path"] or self.job_dir / "model")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".epochd-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            what = e.strerror
            for above in (folder, *folder.parents):
                if above.exists() or above.is_symlink():
                    if not above.is_dir():
                        what = f"{above} is a file, not a folder"
                    break
            raise PathNotAllowed(f'cannot write to output_path "{folder}": {what}. Expected: a '
                                 "folder the epochd service user can create and write; change "
                                 "output_path or the folder's permissions.") from None
        return folder

    def finish(self) -> None:
        if not self.leader:
            return  # each machine's leader writes the outputs and the final word
        from .plot import plot_history
        out, spec = self.out_dir, self.spec
        es = spec["early_stopping"]
        best_path = out / self.engine_cls.best_file
        if es and es["restore_best_weights"] and self.state.best_saved and best_path.exists():
            self.engine.load_weights(best_path)
        history = self.state.training_history()
        files = {"model": out / self.engine_cls.weights_file, "model_json": out / "model.json",
                 "preprocess": out / "preprocess.json", "history": out / "history.json",
                 "plot": out / "learning_curves.png"}
        atomic_write_with(files["model"], self.engine.save_weights)
        _write_json(files["model_json"], self.model_description())
        _write_json(files["preprocess"], self.data.preprocess)
        _write_json(files["history"], history)
        atomic_write_with(files["plot"], lambda p: plot_history(history, p, spec["name"],
                                                                self.state.best_saved))
        files |= self.engine.export(out)
        if best_path.exists():
            files["best"] = best_path
        faults.point("finish.unrecorded")
        self.record_completed(files)

    def model_description(self) -> dict:
        """model.json: what `epochd predict` rebuilds the network from. At the end it goes into
        model.json beside preprocess.json; with the first best weights of a run, both go into
        best.json, so that the best model so far can be used while the job runs and after it
        is paused, cancelled or has failed, while a finished model of an earlier job in the
        same folder stays whole until this one ends."""
        from engines import architecture
        return {**architecture(self.spec, self.data), "weights": self.engine_cls.weights_file,
                "best_weights": self.engine_cls.best_file, "job_id": self.job_id}

    def record_completed(self, files: dict) -> None:
        best = self.state.best_saved
        last = self.state.history[-1]
        final = {k: v for k, v in last.items() if k.startswith(("train_", "val_"))}
        self.record(Completed(
            epochs_run=self.state.epochs_done,
            stop_reason="early_stopping" if self.state.stop_reason == "early_stopping" else "max_epochs",
            best=None if best is None else {k: best[k] for k in ("epoch", "monitor", "value")},
            final_metrics=final,
            outputs={k: relative_to_or_absolute(v, self.job_dir) for k, v in files.items()}))
        log.info("job %s: completed after %d epochs", self.job_id, self.state.epochs_done)

    def fail(self, e: Exception) -> None:
        oom = device_out_of_memory(e)
        expected = isinstance(e, EXPECTED_ERRORS) or oom is not None
        retryable = isinstance(e, (MemoryError, PortInUse, DataChanged, CheckpointInvalid)) or (
            isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EIO, errno.EROFS, errno.ENOMEM)) or (
            oom is not None)
        if self.world > 1 and not (expected or retryable):
            # in a DDP rank an unexpected error is most often a peer's death seen through the
            # transport ("connection reset"): not this job's fault. Dying without a final word
            # makes it a crash, which the daemon retries from the last checkpoint (and fails
            # after --max-retries, pointing at worker.log, if it is a real bug).
            log.error("job %s: rank %d stops on %s: %s", self.job_id, self.rank, type(e).__name__, e)
            raise e
        log.error("job %s: failed: %s: %s", self.job_id, type(e).__name__, e,
                  exc_info=not expected)
        message = oom or str(e) or repr(e)
        if isinstance(e, PortInUse):
            message += f' Then "epochd resume {self.job_id}" runs it again.'
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EIO, errno.EROFS):
            what = {errno.ENOSPC: "the disk is full", errno.EIO: "the disk reported an I/O error",
                    errno.EROFS: "the filesystem is read-only (a disk error makes ext4 and others "
                                 "remount so)"}[e.errno]
            message = (f"{what} while writing {e.filename or 'a file'} ({e.strerror}). Expected: room "
                       "for checkpoints and outputs on a working disk. Free space or fix the disk, "
                       f'then "epochd resume {self.job_id}" continues from the last checkpoint.')
        self.record(Failed(error=type(e).__name__, message=message,
                           traceback=None if expected else traceback.format_exc(),
                           retryable=retryable))


MACHINE_OWN = ("name", "output_path", "train_data_path", "val_data_path", "priority", "threads", "limits")


def device_out_of_memory(e: BaseException) -> str | None:
    """The failure message for a GPU that ran out of memory (torch's OutOfMemoryError,
    TensorFlow's ResourceExhaustedError), or None for any other error. Retryable, since the memory
    may have been another program's; batch_size and the model are fixed once a job is accepted,
    so the message names them as what a new submission can change."""
    kind = type(e).__name__
    if kind not in ("OutOfMemoryError", "ResourceExhaustedError") and "out of memory" not in str(e).lower():
        return None
    if isinstance(e, (MemoryError, OSError)):  # the host's memory: not this
        return None
    first = (str(e).strip().splitlines() or [kind])[0][:300]
    return (f"the GPU ran out of memory ({kind}: {first}). Expected: a job that fits the GPU's "
            "memory: if another program held it, free it and resume the job; otherwise submit it "
            'again with a smaller batch_size (gradient_accumulation_steps keeps the update the '
            'same), "mixed_precision": "bf16" or "fp16", or fewer or narrower hidden layers.')


def machine_fingerprint(spec: dict, data) -> dict:
    """What the machines of one job must have alike: the job file but for each machine's own
    settings (`MACHINE_OWN`, `distributed.node_rank` and `rdzv_timeout`, which GPUs `devices`
    names: only how many), and the data as read (its rows, and the preprocessing fitted on
    them, which any change in the rows changes)."""
    same = {key: value for key, value in spec.items() if key not in MACHINE_OWN}
    same["devices"] = f"{gpu_count_asked(spec['devices'])} GPU(s)"
    same["distributed"] = {key: value for key, value in spec["distributed"].items()
                           if key not in ("node_rank", "rdzv_timeout")}
    same["data rows"] = [data.n_train, data.n_val]
    digest = hashlib.sha256(orjson.dumps(data.preprocess, option=orjson.OPT_SORT_KEYS)).hexdigest()
    same["data (preprocessing fitted on it)"] = digest[:12]
    return same


def machine_differences(every: dict[int, dict]) -> list[str]:
    """"key: A on node 0, B on node 1" for each setting whose value is not the same on every
    node of `every` (node -> its fingerprint), nested keys dotted."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in d.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out
    flats = {node: flat(fingerprint) for node, fingerprint in sorted(every.items())}
    keys = sorted(set().union(*flats.values()))
    missing = object()
    differences = []
    for key in keys:
        values = {node: f.get(key, missing) for node, f in flats.items()}
        if len({orjson.dumps(v) if v is not missing else b"-" for v in values.values()}) > 1:
            differences.append(f"{key}: " + ", ".join(
                f"{'(none)' if v is missing else orjson.dumps(v).decode()} on node {node}"
                for node, v in values.items()))
    return differences


class TorchCollectives:
    """What the ranks of a DDP run agree on, over torch.distributed's process group. (A
    TensorFlow job on several machines has the same four over its strategy's collectives:
    `engines.tf_engine.Collectives`.)"""

    def broadcast(self, value):
        """Rank 0's `value` on every rank."""
        import torch.distributed as tdist
        box = [value]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order."""
        import torch.distributed as tdist
        every = [None] * tdist.get_world_size()
        tdist.all_gather_object(every, value)
        return every

    def any(self, flag: bool) -> bool:
        """Whether any rank's `flag` is set."""
        import torch
        import torch.distributed as tdist
        box = torch.tensor([1 if flag else 0])
        tdist.all_reduce(box, op=tdist.ReduceOp.MAX)
        return bool(box.item())

    def barrier(self) -> None:
        import torch.distributed as tdist
        tdist.barrier()


def _verify(path: Path, checkpoint: dict) -> str | None:
    if not path.exists():
        return "the file is missing"
    if path.stat().st_size != checkpoint["bytes"]:
        return f"size {path.stat().st_size} where its event recorded {checkpoint['bytes']}"
    if sha256_file(path) != checkpoint["sha256"]:
        return "sha256 does not match its event (the file is damaged or was replaced)"
    return None


def _write_json(path: Path, value) -> None:
    atomic_write_bytes(path, orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    faults.role = "worker"
    flags = Flags()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, flags.handle)  # first thing: a shutdown may come during imports
    parser = argparse.ArgumentParser(prog="python -m daemon.worker")
    parser.add_argument("--spool", required=True)
    parser.add_argument("--job", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spool = Spool(Path(args.spool))
    lock = job_lock(spool, args.job)
    if not lock.acquire():
        log.error("job %s is held by another live worker; exiting", args.job)
        return EXIT_LOCKED
    cpu_share = int(os.environ.get("EPOCHD_CPU_SHARE", os.cpu_count() or 1))
    with lock:
        with EventLog(spool.events_path(args.job)) as events:
            spec = fold(events.records).spec or {}
            dist = spec.get("distributed") or {}
            ddp = dist.get("strategy", "ddp") == "ddp"
            if not ddp and dist.get("nnodes", 1) > 1:
                return run_multi_worker(spool, args.job, events, flags, cpu_share, spec)
            if not ddp or (dist.get("processes", 1) == 1 and dist.get("nnodes", 1) == 1):
                Worker(spool, args.job, events, flags, cpu_share).run()
                return 0
        backend = dist.get("backend", "auto")
        if backend == "auto":
            backend = "nccl" if gpu_count_asked(spec.get("devices")) else "gloo"
        return launch_ranks(spool, args.job, dist, cpu_share, backend, flags)


def run_multi_worker(spool: Spool, job_id: str, events: EventLog, flags: Flags, cpu_share: int,
                     spec: dict) -> int:
    """A TensorFlow job on several machines (`"mirrored"` with `workers`): this machine's one
    process is node `node_rank` of a MultiWorkerMirroredStrategy. Like a DDP machine's leader
    it writes this machine's log, checkpoints and outputs, and takes node 0's decisions, which
    travel over the strategy's own collectives. A peer's death surfaces as an error in a
    collective: the process then dies without a final word, a crash the daemon retries.
    Machines that do not all register within `rdzv_timeout` are no crash: as with DDP's
    rendezvous, the worker ends without a word and the daemon starts it again."""
    import tensorflow as tf
    from engines.tf_engine import Collectives, machines_met
    dist = spec["distributed"]
    comm = Collectives(spec)
    worker = Worker(spool, job_id, events, flags, cpu_share, rank=dist["node_rank"],
                    world=dist["nnodes"], comm=comm)
    try:
        worker.run()
    except tf.errors.DeadlineExceededError as e:
        if machines_met():
            raise
        log.warning("job %s: the other machines (%s) did not all register within rdzv_timeout (%g s): "
                    "start the job on each of them; the daemon starts this one again (%s)", job_id,
                    ", ".join(dist["workers"]), dist["rdzv_timeout"], str(e).splitlines()[0])
    return 0


class MeetingWatch:
    """Leaves a meeting of machines at once on a pause, a cancel or a shutdown.

    Before its ranks start, the launcher of a DDP job on several machines waits for the others
    at the rendezvous for up to `rdzv_timeout` (15 minutes by default), node 0 inside C++,
    where Python's signal handlers wait for the call to return, and nobody reads control
    files. This thread watches for both meanwhile (control/ four times a second; signals
    through the wakeup fd, which the C-level handler writes at once) and, as long as the ranks
    have not started (`started` not called), ends the process: nothing has run, the job's log
    is untouched, and the daemon carries out the request, or its own shutdown, as for a job
    without a worker. Make it in the main thread. (TensorFlow's cluster registration holds the
    GIL while it waits, so no thread could do this there.)"""

    def __init__(self, spool: Spool, job_id: str, waiting_for: str):
        self.spool, self.job_id, self.waiting_for = spool, job_id, waiting_for
        self.gate = threading.Lock()
        self.running = False
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self.previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self.watch, name="meeting-watch", daemon=True).start()

    def started(self) -> None:
        """The machines have met and the run begins: from here on its own checks take over."""
        with self.gate:
            if self.running:
                return
            self.running = True
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self.previous_fd)

    def watch(self) -> None:
        while True:
            ready, _, _ = select.select([self.read_fd], [], [], 0.25)
            why = "a shutdown signal" if ready else next(
                (f"a {r.action} request" for r in control.pending_for(self.spool, self.job_id)
                 if r.action in ("pause", "cancel")), None)
            with self.gate:
                if self.running:
                    return
                if why:
                    log.info("job %s: %s came while waiting for %s; leaving before the run starts",
                             self.job_id, why, self.waiting_for)
                    sys.stdout.flush()
                    os._exit(0)


def launch_ranks(spool: Spool, job_id: str, dist: dict, cpu_share: int, backend: str = "gloo",
                 flags: Flags | None = None) -> int:
    """DDP: start this machine's `processes` ranks through torch's elastic launcher, with no
    restarts: a rank that dies ends the attempt, and the daemon's retry resumes it from the
    last checkpoint like any crash. One machine: a c10d rendezvous on a free loopback port.
    Several (`nnodes`): the static rendezvous at `rdzv_endpoint`, which node 0 hosts, so that
    machine k's ranks are k * processes onwards and node 0 holds rank 0. This process holds
    the job's lock while they run and passes a shutdown signal on to them. Exit code 0 when
    the run ended on record (the leader's final event), else 1. On the other machines the
    launcher first makes sure node 0's rendezvous is this attempt's (`fresh_rendezvous`)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    _short_exit_barrier()
    ranks, nnodes = dist.get("processes", 1), dist.get("nnodes", 1)
    logs = DefaultLogsSpecs(log_dir=str(spool.job_dir(job_id) / "ranks"), redirects=Std.NONE, tee=Std.NONE)
    if nnodes == 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            endpoint = f"127.0.0.1:{s.getsockname()[1]}"
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=ranks, run_id=f"epochd-{job_id}",
            rdzv_backend="c10d", rdzv_endpoint=endpoint, max_restarts=0,
            monitor_interval=0.1, start_method="spawn", logs_specs=logs)
    else:
        endpoint = dist["rdzv_endpoint"]
        config = LaunchConfig(
            min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=ranks, run_id=dist["rdzv_id"],
            rdzv_backend="static", rdzv_endpoint=endpoint,
            rdzv_configs={"rank": dist["node_rank"], "timeout": int(dist["rdzv_timeout"])},
            max_restarts=0, monitor_interval=0.1, start_method="spawn", logs_specs=logs)
    global _meeting
    _meeting = MeetingWatch(spool, job_id, f"the other machines at the rendezvous {endpoint}") \
        if nnodes > 1 and _agent_tells_start() else None
    try:
        if nnodes > 1 and dist["node_rank"] != 0 and not fresh_rendezvous(
                job_id, endpoint, dist["node_rank"], dist["rdzv_timeout"], flags or Flags()):
            return 0  # shut down while waiting: nothing ran
        log.info("job %s: starting %d DDP ranks on node %d of %d (%s, rendezvous %s)", job_id, ranks,
                 dist.get("node_rank", 0), nnodes, backend, endpoint)
        elastic_launch(config, rank_main)(str(spool.root), job_id, max(1, cpu_share // ranks), backend)
    except Exception as e:  # ChildFailedError, SignalException: the log says whether it matters
        log.error("job %s: the ranks ended with %s: %s", job_id, type(e).__name__, e)
    return 1 if foldcache.replay(spool.events_path(job_id)).status == Status.RUNNING else 0


def fresh_rendezvous(job_id: str, endpoint: str, node_rank: int, timeout: float, flags: Flags) -> bool:
    """Wait until node 0's rendezvous store at `endpoint` is one this machine has not been to.

    A store outlives its attempt by a few seconds on node 0 (its launcher's exit barrier and
    exit). A machine whose daemon restarts quickly would join that finished rendezvous: its
    agent finds every key of the last round already set and starts its ranks at once, and
    they wait in vain for a node 0 that is by then hosting a new store, until `rdzv_timeout`
    ends both attempts. So each visit marks the store with this machine's node rank (an atomic
    `add`): a store that has seen this node before belongs to an earlier attempt, and the
    machine waits for node 0's next one. False when a shutdown came while waiting; raises
    TimeoutError after `timeout` seconds."""
    import datetime
    from torch.distributed import TCPStore
    host, port = endpoint.rsplit(":", 1)
    deadline, said = time.monotonic() + timeout, False
    log.info("job %s: node %d looks for node 0's rendezvous at %s (for up to %g s)", job_id, node_rank,
             endpoint, timeout)
    while not flags.shutdown:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:  # a plain connect first: the store's client would log each refused try loudly
            socket.create_connection((host.strip("[]"), int(port)), timeout=min(left, 5)).close()
        except OSError:
            time.sleep(min(0.5, max(left, 0)))
            continue
        try:
            store = TCPStore(host.strip("[]"), int(port), is_master=False,
                             timeout=datetime.timedelta(seconds=max(1.0, min(left, 30))))
            visits = store.add(f"epochd/visited/node{node_rank}", 1)
            del store  # disconnects
        except RuntimeError as e:  # the store went away between connect and add
            log.info("job %s: node 0's rendezvous store at %s did not answer (%s); trying again",
                     job_id, endpoint, str(e).splitlines()[0])
            time.sleep(0.5)
            continue
        if visits == 1:
            return True
        if not said:
            log.info("job %s: node 0's rendezvous at %s still serves an earlier attempt; waiting for "
                     "node 0 to start the next one", job_id, endpoint)
            said = True
        time.sleep(0.5)
    if flags.shutdown:
        return False
    raise TimeoutError(f"node 0's rendezvous at {endpoint} did not start a new attempt within "
                       f"rdzv_timeout ({timeout:g} s): is epochd running the job on node 0?")


EXIT_BARRIER_SECONDS = 2
_meeting: MeetingWatch | None = None  # this launcher's, while its machines meet


def _agent_tells_start() -> bool:
    """Whether torch's agent starts its ranks through the method `_short_exit_barrier` hooks
    (torch 1.9 onwards). Checked rather than assumed: without it a MeetingWatch would not know
    that the run had started, and a pause would end the ranks' launcher under them."""
    try:
        from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    except ImportError:
        return False
    return callable(getattr(LocalElasticAgent, "_start_workers", None))



def _short_exit_barrier() -> None:
    """When its ranks are done, torch's launcher waits up to 300 s (its exit barrier) for the
    other machines' launchers to be done too. A machine whose daemon stopped never arrives,
    and the others would hold their jobs that long, node 0 keeping the rendezvous store of a
    finished attempt open for the next one to stumble on. Each machine's ranks have recorded
    how their run ended before they exit, so nothing waits on the barrier: 2 s. (The launcher
    builds its agent from this module attribute, in this process only.)"""
    import torch.distributed.launcher.api as launcher
    if getattr(launcher.LocalElasticAgent, "epochd_short_barrier", False):
        return

    class Agent(launcher.LocalElasticAgent):
        epochd_short_barrier = True

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("exit_barrier_timeout", EXIT_BARRIER_SECONDS)
            super().__init__(*args, **kwargs)

        def _start_workers(self, *args, **kwargs):  # the rendezvous is over: the ranks start
            if _meeting is not None:
                _meeting.started()
            return super()._start_workers(*args, **kwargs)
    launcher.LocalElasticAgent = Agent


def rank_main(spool_root: str, job_id: str, cpu_share: int, backend: str = "gloo") -> None:
    """One DDP rank (started by `launch_ranks`, which sets RANK, WORLD_SIZE, MASTER_ADDR...).
    On GPUs rank k of this machine drives its k-th GPU (of those the daemon gave the job)."""
    import datetime
    import torch.distributed as tdist
    faults.role = "worker"
    flags = Flags()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, flags.handle)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s rank " + os.environ.get("RANK", "?")
                        + ": %(message)s")
    if backend == "nccl":
        import torch
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # NCCL's collectives use it
    tdist.init_process_group(backend, timeout=datetime.timedelta(seconds=300))
    rank, world = tdist.get_rank(), tdist.get_world_size()
    spool = Spool(Path(spool_root))
    leader = int(os.environ.get("LOCAL_RANK", rank)) == 0  # this machine's first rank
    events = EventLog(spool.events_path(job_id)) if leader else None
    records = events.records if events is not None else read_foldable(spool.events_path(job_id))
    tdist.barrier()  # every rank has read the log before its leader appends to it
    worker = Worker(spool, job_id, events, flags, cpu_share, rank=rank, world=world, records=records)
    worker.run()
    for sig in (signal.SIGTERM, signal.SIGINT):  # the run is over: a late signal ends the rank
        signal.signal(sig, signal.SIG_DFL)
    if worker.state.status == Status.FAILED:
        os._exit(1)  # the others may wait in a collective: the launcher stops them
    if events is not None:
        events.close()
    tdist.destroy_process_group()
    log.info("job %s: rank %d done", job_id, rank)
    if flags.shutdown:  # the launcher is shutting down and will not collect a return value,
        sys.stdout.flush()  # for which its wrapper would wait until it is killed
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
